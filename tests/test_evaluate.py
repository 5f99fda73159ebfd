"""The eval stage on a tiny model: greedy (checked token for token) and sampling (exact rule vs the
reference rule), and what the gate makes of each record."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from eval.evaluate import run_eval
from pipeline.config import DataConfig, EvalConfig, GateConfig, ModelConfig, PromptSource
from pipeline.drafter import build_drafter, make_arch
from pipeline.gate import decide


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    arch = make_arch(model.config.vocab_size, model.config.hidden_size)
    drafter = build_drafter(arch, model.get_input_embeddings().weight.detach(), seed=3)
    (root / "drafter").mkdir()
    save_file(drafter.state_dict(), str(root / "drafter" / "drafter.safetensors"))
    (root / "drafter" / "arch.json").write_text(json.dumps(arch.to_dict()))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"def f{i}(x):\n    return x + {i}\n", "category": "ab"[i % 2]})
                               + "\n" for i in range(4)))
    data = DataConfig(eval=PromptSource(path=str(prompts), category_field="category"), chat_template="never")
    return ModelConfig(base_model=str(tiny_model_dir)), data, root


def _eval(setup, name, **kw):
    model_cfg, data, root = setup
    cfg = EvalConfig(beam_width=2, beam_length=3, max_new_tokens=8, num_prompts=0, repeats=1, num_threads=1, **kw)
    torch.manual_seed(0)
    return run_eval(model_cfg, data, cfg, root / "drafter", root / name)


def test_greedy_record(setup):
    rec = _eval(setup, "greedy", baselines=["lookahead"])
    assert rec["lossless"] is True and rec["lossless_check"].startswith("token-for-token")
    assert set(rec["methods"]) == {"plain", "redrafter", "lookahead"}
    assert set(rec["methods"]["redrafter"]["by_category"]) == {"a", "b"}
    assert 1.0 <= rec["tokens_per_step"] <= 3 and rec["speedup"] > 0
    assert (setup[2] / "greedy" / "eval.png").is_file()
    assert set(rec["machine_load"]) == {"other_cpu_fraction", "cpus", "seconds"}
    assert rec["speedup_ci95"] is None and rec["speedup_ci95_repeats"] is None  # one repeat: no interval
    # ideal = tau x plain step / verify forward, both timed in the timed run itself (CPU: every prompt)
    t, ours, plain = rec["ideal_timing"], rec["methods"]["redrafter"], rec["methods"]["plain"]
    assert t["source"] == "timed run" and t["prompts"] == rec["num_prompts"]
    assert t["plain_step_ms"] == plain["step_timing"]["step_ms"] and t["verify_forward_ms"] == ours["step_timing"]["forward_ms"]
    assert rec["ideal_speedup"] == pytest.approx(rec["tokens_per_step"] * t["plain_step_ms"] / t["verify_forward_ms"])
    assert rec["decoder_efficiency"] == pytest.approx(rec["speedup"] / rec["ideal_speedup"])
    assert 0 < ours["step_timing"]["forward_ms"] < ours["step_timing"]["step_ms"]
    prof = rec["step_profile"]  # the few-prompt profile stays for the phase breakdown, with its own ideal
    assert prof["ideal_speedup"] == pytest.approx(rec["tokens_per_step"] * prof["plain_step_ms"]
                                                  / prof["ms_per_step"]["base_forward"])
    assert "ideal_speedup" not in rec["methods"]["lookahead"]  # outside the step skeleton: not timed
    again = _eval(setup, "greedy", baselines=["lookahead"])  # same inputs: reused, not re-measured
    assert again == rec


def test_auto_beam_length_is_chosen_on_this_device_from_the_drafters_acceptance(setup):
    from eval.forward_cost import choose_beam_length, expected_tau

    # the math: tau(L) = 1 + sum_k prod_{i<=k} a_i; a longer beam wins where its forward is cheaper
    assert expected_tau([0.5, 0.5, 0.5], 4) == pytest.approx(1.875) and expected_tau([0.5], 2) == 1.5
    L, ideal = choose_beam_length([0.5, 0.5, 0.5], {1: 10.0, 2: 20.0, 3: 25.0, 4: 11.0})
    assert L == 4 and ideal[4] == pytest.approx(1.875 * 10 / 11) and set(ideal) == {2, 3, 4}
    assert choose_beam_length([0.5, 0.5, 0.5], {1: 10.0, 2: 11.0, 3: 25.0, 4: 30.0})[0] == 2

    model_cfg, data, root = setup
    cfg = EvalConfig(beam_width=1, beam_length=0, max_new_tokens=8, num_prompts=0, repeats=1, num_threads=1)
    with pytest.raises(ValueError, match="needs the drafter's held-out top-1"):
        run_eval(model_cfg, data, cfg, root / "drafter", root / "auto-none")
    drafter = root / "drafter-auto"
    drafter.mkdir()
    for f in ("drafter.safetensors", "arch.json"):
        (drafter / f).write_bytes((root / "drafter" / f).read_bytes())
    horizon = json.loads((drafter / "arch.json").read_text())["horizon"]
    (drafter / "train_metrics.json").write_text(json.dumps(
        {"final": {f"heldout/top1_{i}": 0.6 for i in range(1, horizon)}}))
    rec = run_eval(model_cfg, data, cfg, drafter, root / "auto")
    shape = rec["beam_shape"]
    assert rec["beam_length"] == shape["beam_length"] == max(shape["ideal_by_length"], key=shape["ideal_by_length"].get)
    assert set(shape["ideal_by_length"]) == set(range(2, horizon + 1)) and set(shape["forward_ms"]) == set(range(1, horizon + 1))
    assert rec["lossless"] is True and rec["decode_stats"]["beam_length"] == rec["beam_length"]
    # positions the held-out set never reached (None) end the candidates: lengths up to the last measured one
    (drafter / "train_metrics.json").write_text(json.dumps(
        {"final": {"heldout/top1_1": 0.6, "heldout/top1_2": 0.5, "heldout/top1_3": None}}))
    short = run_eval(model_cfg, data, cfg, drafter, root / "auto-short")["beam_shape"]
    assert short["heldout_acceptance"] == [0.6, 0.5] and set(short["ideal_by_length"]) == {2, 3}
    from pipeline.train import heldout_top1  # the one reader (eval.drafters reports it too): nan as None
    (drafter / "train_metrics.json").write_text(json.dumps({"final": {"heldout/top1_1": 0.6, "heldout/top1_2": float("nan")}}))
    assert heldout_top1(drafter) == [0.6] + [None] * (horizon - 2)


def test_hybrid_is_measured_beside_the_drafter_and_off_keeps_old_records_valid(setup):
    from eval.evaluate import eval_inputs
    from pipeline.lineage import hash_json

    model_cfg, data, root = setup
    rec = _eval(setup, "hybrid", baselines=[], hybrid_ngram=3, profile_prompts=0)
    assert set(rec["methods"]) == {"plain", "redrafter", "hybrid"}
    hybrid = rec["methods"]["hybrid"]
    assert hybrid["lossless"] is True and hybrid["tokens_per_step"] >= 1.0 and set(hybrid["by_category"]) == {"a", "b"}
    assert rec["tokens_per_step"] == rec["methods"]["redrafter"]["tokens_per_step"]  # the gate judges the drafter
    from eval.evaluate import hybrid_behind

    assert rec["hybrid_behind"] == hybrid_behind(rec["methods"])  # where the hybrid is not the fastest, recorded
    # hybrid_ngram=0 (off) hashes as the records made before the setting existed did
    off = eval_inputs(model_cfg, data, EvalConfig(), root / "drafter")
    assert "hybrid_ngram" not in off["eval"]
    assert hash_json(off) != hash_json(eval_inputs(model_cfg, data, EvalConfig(hybrid_ngram=3), root / "drafter"))


def test_hybrid_behind_names_the_scopes_where_another_method_is_faster():
    from eval.evaluate import hybrid_behind

    def m(speedup, **cats):
        return {"speedup": speedup, "by_category": {c: {"speedup": x} for c, x in cats.items()}}

    methods = {"plain": m(1.0, a=1.0, b=1.0), "redrafter": m(1.1, a=1.3, b=1.0), "hybrid": m(1.25, a=1.2, b=1.4),
               "prompt_lookup": m(0.9, a=1.25, b=1.5), "lookahead": m(0.6, a=0.5, b=0.5)}
    assert hybrid_behind(methods) == {"a": {"redrafter": 1.3, "prompt_lookup": 1.25, "hybrid": 1.2},
                                      "b": {"prompt_lookup": 1.5, "hybrid": 1.4}}
    methods["hybrid"] = m(1.3, a=1.4, b=1.6)
    assert hybrid_behind(methods) == {}
    methods["lookahead"] = m(1.35, a=0.5, b=0.5)
    assert hybrid_behind(methods) == {"all": {"lookahead": 1.35, "hybrid": 1.3}}


def test_sampling_records_and_gate(setup):
    exact = _eval(setup, "sampled", temperature=0.8, baselines=[])
    assert exact["lossless"] is True and "rejection sampling" in exact["lossless_check"]
    assert exact["temperature"] == 0.8 and set(exact["methods"]) == {"plain", "redrafter"}
    ref = _eval(setup, "reference", temperature=0.8, reference_compatible=True, baselines=[])
    assert ref["lossless"] is False
    gate = GateConfig(min_tokens_per_step=0.0, min_speedup=0.0, beat_training_free=False)
    assert decide(ref, gate)["decided_by"] == "lossless"


def test_lossless_verdict_with_divergences():
    """A greedy mismatch passes only when every divergence is a numerical tie AND ties are allowed."""
    from eval.evaluate import _lossless

    tie = {"position": 3, "near_tie": True, "logit_gap": 0.01, "tolerance": 0.6}
    real = {"position": 1, "near_tie": False, "logit_gap": 4.2, "tolerance": 0.6}
    ours = {"lossless": False, "mismatched_prompts": ["p1"], "divergences": {"p1": tie}}
    verdict = _lossless(EvalConfig(), ours)
    assert verdict["lossless"] is True and verdict["lossless_exact"] is False and "numerical ties" in verdict["lossless_check"]
    assert _lossless(EvalConfig(allow_numerical_ties=False), ours)["lossless"] is False
    ours["divergences"]["p2"] = real
    assert _lossless(EvalConfig(), ours)["lossless"] is False
    exact = _lossless(EvalConfig(), {"lossless": True, "mismatched_prompts": []})
    assert exact["lossless"] is True and exact["divergences"] == {}


def test_bench_end_to_end(setup, tmp_path):
    """eval.bench on a run directory: sweep, baselines, batches, profile; JSON, PNG and the best
    setting recorded in the run's eval record."""
    import shutil

    from omegaconf import OmegaConf

    from eval.bench import main as bench
    from pipeline.config import Config

    model_cfg, data, root = setup
    run = tmp_path / "run"
    shutil.copytree(root / "drafter", run / "train" / "drafter")
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "eval_record.json").write_text("{}")
    cfg = Config(model=model_cfg, data=data)
    cfg.eval.max_new_tokens = 6
    OmegaConf.save(OmegaConf.structured(cfg), run / "resolved_config.yaml")
    threads = torch.get_num_threads()
    try:
        report = bench(["--run-dir", str(run), "--widths", "1,2", "--lengths", "2,3", "--batch-sizes", "1,2",
                        "--num-prompts", "3", "--repeats", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert set(report["sweep"]) == {"plain", "W1L2", "W1L3", "W2L2", "W2L3"}
    assert set(report["methods"]) == {"plain", "redrafter", "redrafter_no_tree", "redrafter_W1", "hybrid", "prompt_lookup",
                                      "lookahead"}
    assert all(m["lossless"] for m in report["sweep"].values()) and all(m["lossless"] for m in report["methods"].values())
    assert set(report["batches"]) == {1, 2} and report["profile"]["spec_step_ms"] > 0
    assert (run / "bench" / "bench.json").is_file() and (run / "bench" / "bench.png").is_file()
    best = json.loads((run / "eval" / "eval_record.json").read_text())["best_setting"]
    assert f"W{best['beam_width']}L{best['beam_length']}" in report["sweep"] and best["dtype"] == "torch.float32"
    assert report["sweep"]["W2L3"]["beam_width"] == 2 and report["sweep"]["W2L3"]["beam_length"] == 3
    assert best["max_batch_size_where_faster"] == report["max_batch_size_where_faster"] in (0, 1, 2)
    # the sweep, baselines and batch sizes as W&B tables (+ the plot) in the run's group, job type bench
    from pipeline.tracking import read_offline_run

    (wandb_run,) = [read_offline_run(p.parent) for p in (run / "wandb").rglob("run-*.wandb")]
    assert wandb_run["job_type"] == "bench" and wandb_run["group"] == cfg.run.name
    logged = {k: v for row in wandb_run["history"] for k, v in row.items()}
    assert logged["bench/sweep/_type"] == "table-file" and logged["bench/sweep/nrows"] == 5
    assert logged["bench/methods/nrows"] == 7 and logged["bench/batch_sizes/nrows"] == 2
    assert logged["bench/plot/_type"] == "image-file"
    assert wandb_run["summary"]["bench/best_beam_width"] == best["beam_width"]
    # wandb's service writes the log after finish() returns: a partial log (torn mid-record) is waited
    # for until its exit record arrives, and refused if it never does
    import threading

    (log,) = (run / "wandb").rglob("run-*.wandb")
    whole, growing = log.read_bytes(), tmp_path / "growing.wandb"
    growing.write_bytes(whole[:len(whole) // 2 + 3])
    with pytest.raises(ValueError, match="no exit record"):
        read_offline_run(growing, wait_s=0)
    threading.Timer(0.3, growing.write_bytes, [whole]).start()
    assert read_offline_run(growing, wait_s=10) == wandb_run


def test_drafters_comparison_in_one_run(setup, tmp_path):
    """eval.drafters: a full-vocabulary and a draft-vocabulary drafter against one plain baseline."""
    import shutil

    from omegaconf import OmegaConf

    from eval.drafters import main as compare_drafters
    from pipeline.config import Config

    model_cfg, data, root = setup
    model = AutoModelForCausalLM.from_pretrained(model_cfg.base_model)
    V, H = model.config.vocab_size, model.config.hidden_size
    runs = [tmp_path / "full", tmp_path / "small"]
    cfg = Config(model=model_cfg, data=data)
    cfg.eval.max_new_tokens, cfg.eval.beam_width, cfg.eval.beam_length = 6, 2, 3
    d2t = torch.arange(0, V, 3)
    small = build_drafter(make_arch(V, H, draft_vocab_size=len(d2t)), model.get_input_embeddings().weight.detach(),
                          seed=4, d2t=d2t)
    for run in runs:
        (run / "teacher").mkdir(parents=True)
        (run / "teacher" / "manifest.json").write_text(json.dumps({"base_model_hash": "same"}))
        OmegaConf.save(OmegaConf.structured(cfg), run / "resolved_config.yaml")
    shutil.copytree(root / "drafter", runs[0] / "train" / "drafter")
    (runs[1] / "train" / "drafter").mkdir(parents=True)
    save_file(small.state_dict(), str(runs[1] / "train" / "drafter" / "drafter.safetensors"))
    (runs[1] / "train" / "drafter" / "arch.json").write_text(json.dumps(small.arch.to_dict()))
    for run in runs:
        (run / "train" / "drafter" / "train_metrics.json").write_text(json.dumps({"final": {"heldout/top1_1": 0.5}}))
    threads = torch.get_num_threads()
    try:
        report = compare_drafters([str(r) for r in runs] + ["--num-prompts", "2", "--repeats", "1", "--threads", "1",
                                                           "--profile-prompts", "1", "--out", str(tmp_path / "d.json")])
    finally:
        torch.set_num_threads(threads)
    full, short = report["drafters"]["full"], report["drafters"]["small"]
    assert full["lossless"] is True and short["lossless"] is True
    assert short["draft_vocab_size"] == len(d2t) and full["draft_vocab_size"] == 0
    assert short["cost"]["drafter_macs_per_draft"] < full["cost"]["drafter_macs_per_draft"]
    assert full["heldout_top1"][0] == 0.5 and short["ideal_speedup"] > 0
    for entry in (full, short):  # the eval stage's ideal: this run's tau and its own two step times (CPU)
        t = entry["step_timing"]
        assert entry["ideal_speedup"] != entry["profile_ideal_speedup"]
        assert entry["ideal_speedup"] == pytest.approx(entry["tokens_per_step"] * report["plain_step_timing"]["step_ms"]
                                                       / t["forward_ms"])
        assert entry["profile_ideal_speedup"] == pytest.approx(entry["tokens_per_step"] * entry["profile_plain_step_ms"]
                                                               / entry["profile_ms_per_step"]["base_forward"])
        assert entry["decoder_efficiency"] == pytest.approx(entry["speedup"] / entry["ideal_speedup"])
    assert json.loads((tmp_path / "d.json").read_text())["drafters"].keys() == {"full", "small"}
    (runs[1] / "teacher" / "manifest.json").write_text(json.dumps({"base_model_hash": "other"}))
    with pytest.raises(SystemExit, match="different base models"):
        compare_drafters([str(r) for r in runs])


def test_machine_load_sees_other_processes():
    """A process burning one CPU beside the eval is seen as other processes' load, with a warning."""
    import subprocess
    import sys
    import time

    from eval.evaluate import MachineLoad

    load = MachineLoad()
    burner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    time.sleep(2.0)
    with pytest.warns(UserWarning, match="other processes used"):
        seen = load.stop()
    burner.kill()
    burner.wait()
    assert seen["other_cpu_fraction"] >= 0.5 / seen["cpus"], seen  # about one CPU of `cpus`


def test_bench_writes_the_batch_size_limit_into_the_matching_serving_config(tmp_path):
    """The gate's export knows only the eval's batch size; eval.bench measures more and writes, into each
    exported serving.json of the same (W, L), up to which batch size the drafter beats plain decoding."""
    from eval.bench import max_batch_size_where_faster, update_serving_batch_limit

    def at(speedup):
        return {"speedup": speedup, "speedup_ci95": 0.02, "tokens_per_step": 1.5}

    assert max_batch_size_where_faster({1: at(1.2), 4: at(1.05), 8: at(0.9)}) == 4
    assert max_batch_size_where_faster({1: at(1.2), 4: at(0.95), 8: at(1.1)}) == 1  # a loss in between ends it
    assert max_batch_size_where_faster({1: at(0.99)}) == 0
    for kind, (W, L) in {"promoted": (1, 3), "candidate": (2, 4)}.items():
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "serving.json").write_text(json.dumps({
            "beam_width": W, "beam_length": L, "max_batch_size_where_faster": 1,
            "measured": {"device": "cpu", "batch_sizes": {"1": at(1.1)}}}))
    report = {"batches": {1: at(1.2), 4: at(1.05), 8: at(0.9)}, "max_batch_size_where_faster": 4}
    assert update_serving_batch_limit(tmp_path, 1, 3, report) == [tmp_path / "promoted" / "serving.json"]
    promoted = json.loads((tmp_path / "promoted" / "serving.json").read_text())
    assert promoted["max_batch_size_where_faster"] == 4 and set(promoted["measured"]["batch_sizes"]) == {"1", "4", "8"}
    assert promoted["measured"]["device"] == "cpu"  # the rest is kept
    untouched = json.loads((tmp_path / "candidate" / "serving.json").read_text())
    assert untouched["max_batch_size_where_faster"] == 1  # another (W, L): not what was measured


def test_greedy_record_through_the_static_step(setup):
    """eval.static_step=on (what auto means on CUDA): plain and ReDrafter run through eval/graphs.py (eagerly
    on a CPU), token for token equal to plain decoding; the record says so, and the setting is in the
    inputs hash (a static-step record is not reused for a dynamic-step run)."""
    from eval.evaluate import build_methods, eval_inputs, uses_static_step
    from eval.graphs import GraphedDecoder

    rec = _eval(setup, "static", static_step="on", baselines=[])
    assert rec["lossless"] is True and rec["static_step"] is True
    assert set(rec["methods"]) == {"plain", "redrafter"} and rec["tokens_per_step"] >= 1.0
    model_cfg, data, root = setup
    on, off = EvalConfig(static_step="on"), EvalConfig(static_step="off")
    assert eval_inputs(model_cfg, data, on, root / "drafter") != eval_inputs(model_cfg, data, off, root / "drafter")
    assert uses_static_step(EvalConfig(device="cuda")) and not uses_static_step(EvalConfig())
    assert not uses_static_step(EvalConfig(device="cuda", compile="default"))
    assert not uses_static_step(EvalConfig(static_step="on", temperature=0.8))
    model = AutoModelForCausalLM.from_pretrained(setup[0].base_model)
    drafter = build_drafter(make_arch(model.config.vocab_size, model.config.hidden_size),
                            model.get_input_embeddings().weight.detach(), seed=3)
    methods = build_methods(model, drafter, on, eos=None)
    decoder = methods["redrafter"].__closure__  # the decoders behind the methods
    assert any(isinstance(c.cell_contents, GraphedDecoder) for c in decoder)
