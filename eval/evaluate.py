"""Eval stage: speculative decoding vs plain greedy decoding of the same base model, same prompts,
same process, interleaved repeats. Writes eval_record.json and eval.png into the stage directory.

    python -m pipeline.main recipe=tiny run.stages=[eval]     # re-run just this stage
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from data.prompts import load_prompts, select_prompts
from eval.compare import ci_text, compare
from eval.cpu_kernels import apply_cpu_kernels
from eval.decoder import compile_base, first_divergence, only_numerical_ties, plain_greedy
from eval.speculative import SpeculativeDecoder
from pipeline import atomic
from pipeline.base_model import input_embeddings, load_base_model
from pipeline.config import ADDED_LATER, TRAINING_FREE, DataConfig, EvalConfig, ModelConfig
from pipeline.drafter import Drafter
from pipeline.heads import read_arch
from pipeline.lineage import hash_json, hashed_settings, sha256_file


def load_trained_drafter(drafter_dir: Path, base_model, dtype: torch.dtype) -> Drafter:
    """The train stage's fp32 drafter, checked against the base model it will draft for."""
    head, arch = read_arch(json.loads((drafter_dir / "arch.json").read_text()))
    cfg = base_model.config
    if arch.vocab_size != cfg.vocab_size or arch.hidden_size != cfg.hidden_size:
        raise ValueError(
            f"drafter in {drafter_dir} was trained for vocab_size={arch.vocab_size}, hidden_size={arch.hidden_size} "
            f"but the base model has vocab_size={cfg.vocab_size}, hidden_size={cfg.hidden_size}: "
            "tokenizer/vocab mismatch between drafter and base model"
        )
    state = load_file(str(drafter_dir / "drafter.safetensors"))
    return head.from_state(arch, state, input_embeddings(base_model), dtype).to(base_model.device)


def _lossless(eval_cfg: EvalConfig, ours: dict) -> dict:
    """Greedy: token for token against plain greedy decoding, on every prompt; with
    eval.allow_numerical_ties, a prompt that diverges only at a numerical tie of the base model
    (eval.decoder.first_divergence) passes, and the record lists it. Sampling: by the verification
    rule (recursive rejection sampling is exact; tests/test_sampling.py checks it with a chi-square
    test that the wrong rules fail); the reference rule is not lossless."""
    if eval_cfg.temperature == 0:
        divergences = ours.get("divergences", {})
        ties = only_numerical_ties(divergences)
        check = "token-for-token vs plain greedy"
        if divergences:
            check += (f"; {len(divergences)} prompt(s) diverge, " +
                      ("all at numerical ties of the base model" if ties else "NOT at numerical ties"))
        return {"lossless": ours["lossless"] or (ties and eval_cfg.allow_numerical_ties), "lossless_check": check,
                "lossless_exact": ours["lossless"], "mismatched_prompts": ours["mismatched_prompts"],
                "divergences": divergences}
    if eval_cfg.reference_compatible:
        return {"lossless": False, "lossless_check": "reference acceptance rule: not lossless at T > 0",
                "mismatched_prompts": []}
    return {"lossless": True, "lossless_check": "recursive rejection sampling (proof: eval/sampling.py; "
            "chi-square test: tests/test_sampling.py)", "mismatched_prompts": []}


def eval_set_key(data_cfg: DataConfig, eval_cfg: EvalConfig) -> str:
    """Identifies 'the same eval set' for comparing with an incumbent: source, selection, lengths."""
    return hash_json({"source": vars(data_cfg.eval), "max_prompt_tokens": data_cfg.max_prompt_tokens,
                      "chat_template": data_cfg.chat_template, "num_prompts": eval_cfg.num_prompts,
                      "max_new_tokens": eval_cfg.max_new_tokens})


def with_model_answers(prompts: list, model, tokenizer, answer_tokens: int, max_prompt_tokens: int) -> list:
    """Prompts with a `followup` (MT-bench turn 2) become the full conversation: the first turn, the base
    model's own plain greedy answer to it (at most `answer_tokens` tokens, its end of turn dropped), then
    the follow-up question, through the chat template. Deterministic, and the same prompt for every
    method compared. A completed conversation longer than max_prompt_tokens is dropped with a warning."""
    import dataclasses
    import warnings

    out, dropped = [], []
    for p in prompts:
        if not p.followup:
            out.append(p)
            continue
        answer = plain_greedy(model, [p.input_ids], answer_tokens, tokenizer.eos_token_id).tokens[0]
        text_answer = tokenizer.decode(answer, skip_special_tokens=True).strip()
        messages = [*p.history, {"role": "assistant", "content": text_answer}, {"role": "user", "content": p.followup}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        input_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(input_ids) > max_prompt_tokens:
            dropped.append(p.id)
            continue
        out.append(dataclasses.replace(p, text=text, input_ids=input_ids, followup="", history=messages))
    if dropped:
        warnings.warn(f"{len(dropped)} turn-2 prompt(s) longer than data.max_prompt_tokens={max_prompt_tokens} with "
                      f"the model's turn-1 answer were dropped: {', '.join(dropped[:10])}")
    return out


def uses_static_step(eval_cfg: EvalConfig) -> bool:
    """Greedy plain decoding and ReDrafter run through the static step (eval/graphs.py; one CUDA graph per
    bucket on CUDA): `eval.static_step`, where auto means on CUDA without torch.compile."""
    if eval_cfg.temperature > 0:
        return False
    if eval_cfg.static_step == "auto":
        return eval_cfg.device == "cuda" and eval_cfg.compile == "none"
    return eval_cfg.static_step == "on"


def build_methods(model, drafter, eval_cfg: EvalConfig, eos: int | None, incumbent=None) -> dict:
    """name -> (batch of token lists -> GenerationResult). 'plain' is the baseline."""
    from eval.baselines import lookahead_generate, prompt_lookup_generate

    W, L, n, T = eval_cfg.beam_width, eval_cfg.beam_length, eval_cfg.max_new_tokens, eval_cfg.temperature
    if T > 0:
        return _sampling_methods(model, drafter, eval_cfg, eos, incumbent)
    if uses_static_step(eval_cfg):  # plain and the drafters alike (a like-for-like baseline)
        from eval.beam import BeamProposer
        from eval.graphs import GraphedDecoder

        def greedy(d):
            return GraphedDecoder(model, BeamProposer(d, W, L, top_logits=eval_cfg.beam_top_logits), W, L)
        plain_decoder = GraphedDecoder.plain(model)
        plain = plain_decoder.generate
    else:
        def greedy(d):
            return SpeculativeDecoder(model, d, beam_width=W, beam_length=L, top_logits=eval_cfg.beam_top_logits)

        def plain(b, n, eos):
            return plain_greedy(model, b, n, eos)
    candidate = greedy(drafter)
    methods = {
        "plain": lambda b: plain(b, n, eos),
        "redrafter": lambda b: candidate.generate(b, n, eos),
    }
    if eval_cfg.hybrid_ngram:
        hybrid = SpeculativeDecoder(model, drafter, beam_width=W, beam_length=L, top_logits=eval_cfg.beam_top_logits,
                                    ngram=eval_cfg.hybrid_ngram, switch=eval_cfg.hybrid_switch,
                                    lookup_length=eval_cfg.hybrid_lookup_length)
        methods["hybrid"] = lambda b: hybrid.generate(b, n, eos)
    if incumbent is not None:
        inc = greedy(incumbent)
        methods["incumbent"] = lambda b: inc.generate(b, n, eos)
    for name in eval_cfg.baselines:
        if name == "prompt_lookup":
            methods[name] = lambda b: prompt_lookup_generate(model, b, n, eos)
        elif name == "lookahead":
            methods[name] = lambda b: lookahead_generate(model, b, n, eos)
    return methods


def _sampling_methods(model, drafter, eval_cfg: EvalConfig, eos: int | None, incumbent=None) -> dict:
    """At T > 0 the baseline is plain ancestral sampling; every method draws from its own seeded
    generator (outputs differ from plain sampling token by token, their law does not)."""
    import warnings

    from eval.sampling import plain_sample

    W, L, n, T = eval_cfg.beam_width, eval_cfg.beam_length, eval_cfg.max_new_tokens, eval_cfg.temperature
    if eval_cfg.baselines:
        warnings.warn(f"eval.baselines {eval_cfg.baselines} are greedy-only: not run at temperature {T}")

    def seeded():
        return torch.Generator(device=model.device).manual_seed(eval_cfg.seed)

    def spec(d, ngram=0):
        dec = SpeculativeDecoder(model, d, W, L, temperature=T, reference_compatible=eval_cfg.reference_compatible,
                                 top_logits=eval_cfg.beam_top_logits, ngram=ngram)
        return lambda b: dec.generate(b, n, eos, generator=seeded())

    methods = {"plain": lambda b: plain_sample(model, b, n, eos, T, generator=seeded()), "redrafter": spec(drafter)}
    if eval_cfg.hybrid_ngram:
        methods["hybrid"] = spec(drafter, eval_cfg.hybrid_ngram)
    if incumbent is not None:
        methods["incumbent"] = spec(incumbent)
    return methods


def eval_inputs(model_cfg: ModelConfig, data_cfg: DataConfig, eval_cfg: EvalConfig, drafter_dir: Path,
                incumbent_dir: Path | None = None) -> dict:
    """What an eval record is made from; a record with the same inputs is reused."""
    return {"drafter": sha256_file(drafter_dir / "drafter.safetensors"),
            "eval": hashed_settings(vars(eval_cfg), ADDED_LATER["eval"]),
            "data": {"eval": hashed_settings(vars(data_cfg.eval), ADDED_LATER["data"]), "max_prompt_tokens": data_cfg.max_prompt_tokens},
            "model": vars(model_cfg),
            "incumbent": sha256_file(incumbent_dir / "model.safetensors") if incumbent_dir else None}


def finished_record(out_dir: Path, inputs: dict) -> dict | None:
    """The eval record in out_dir when it was made from exactly these inputs, else None."""
    path = Path(out_dir) / "eval_record.json"
    if not path.is_file():
        return None
    try:
        done = json.loads(path.read_text())
    except json.JSONDecodeError:  # torn by a crash mid-write (older versions wrote it in place): redo the eval
        return None
    return done if isinstance(done, dict) and done.get("inputs_hash") == hash_json(inputs) else None


@torch.inference_mode()
def run_eval(model_cfg: ModelConfig, data_cfg: DataConfig, eval_cfg: EvalConfig, drafter_dir: Path,
             out_dir: Path, incumbent_dir: Path | None = None) -> dict:
    """Measure the trained drafter (and the incumbent export, when given, re-measured here on the
    same prompts) against plain greedy decoding and the training-free baselines."""
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = eval_inputs(model_cfg, data_cfg, eval_cfg, drafter_dir, incumbent_dir)
    record_path = out_dir / "eval_record.json"
    done = finished_record(out_dir, inputs)
    if done is not None:
        print(f"eval: already done for this drafter and settings, reusing {record_path}")
        return done
    if eval_cfg.num_threads:
        torch.set_num_threads(eval_cfg.num_threads)
    model, tokenizer = load_base_model(model_cfg, device=eval_cfg.device, dtype=eval_cfg.dtype)
    compile_base(model, eval_cfg.compile)  # compiled during compare()'s untimed warm-up
    kernels = apply_cpu_kernels(model, eval_cfg.cpu_kernels)  # every method below runs through the same layers
    drafter = load_trained_drafter(drafter_dir, model, model.dtype)
    incumbent = None
    if incumbent_dir is not None:
        from pipeline.export import load_exported

        incumbent = load_exported(incumbent_dir, input_embeddings(model), model.dtype).to(model.device)
    prompts = load_prompts(data_cfg.eval, tokenizer, data_cfg.max_prompt_tokens, data_cfg.chat_template)
    prompts = select_prompts(prompts, eval_cfg.num_prompts, eval_cfg.seed)  # stratified by category
    prompts = with_model_answers(prompts, model, tokenizer, eval_cfg.max_new_tokens, data_cfg.max_prompt_tokens)
    beam_shape = None
    if eval_cfg.beam_length == 0:
        beam_shape = auto_beam_length(model, drafter_dir, eval_cfg, prompts)
        eval_cfg = dataclasses.replace(eval_cfg, beam_length=beam_shape["beam_length"])
    methods = build_methods(model, drafter, eval_cfg, tokenizer.eos_token_id, incumbent)
    t0 = time.time()
    explain = functools.partial(first_divergence, model) if eval_cfg.temperature == 0 else None
    load = MachineLoad()
    results = compare(methods, prompts, eval_cfg.batch_size, eval_cfg.repeats, explain=explain)
    machine_load = load.stop()
    if eval_cfg.temperature > 0:  # token equality says nothing when sampling; see _lossless()
        for m in results.values():
            m["lossless"] = "n/a (sampling)"
    ours = results["redrafter"]
    record = {
        "inputs_hash": hash_json(inputs),
        "eval_set_hash": hash_json([(p.id, p.input_ids) for p in prompts]),
        "num_prompts": len(prompts), "prompt_ids": [p.id for p in prompts],
        # turn-2 prompts as evaluated, with the base model's own turn-1 answers (reproducible: plain greedy)
        "conversations": {p.id: p.history for p in prompts if p.history},
        "beam_width": eval_cfg.beam_width, "beam_length": eval_cfg.beam_length, "batch_size": eval_cfg.batch_size,
        **({"beam_shape": beam_shape} if beam_shape else {}),
        "max_new_tokens": eval_cfg.max_new_tokens, "device": eval_cfg.device, "dtype": eval_cfg.dtype,
        "cpu_kernels": kernels,
        # greedy plain and ReDrafter through the static step; on CUDA it is one CUDA graph per bucket
        "static_step": uses_static_step(eval_cfg),
        "temperature": eval_cfg.temperature, "reference_compatible": eval_cfg.reference_compatible,
        "torch_threads": torch.get_num_threads(), "repeats": eval_cfg.repeats,
        **_lossless(eval_cfg, ours),
        "tokens_per_step": ours["tokens_per_step"],
        "acceptance_per_position": ours["acceptance_per_position"],
        "verified_tokens_per_step": ours["verified_tokens_per_step"],
        "verified_fraction_of_WL": ours["verified_fraction_of_WL"],
        "spec_tokens_per_s": ours["tokens_per_s"], "plain_tokens_per_s": results["plain"]["tokens_per_s"],
        "speedup": ours["speedup"], "speedup_ci95": ours["speedup_ci95"],
        "speedup_ci95_repeats": ours.get("speedup_ci95_repeats"), "speedup_per_repeat": ours["speedup_per_repeat"],
        "machine_load": machine_load,
        "decode_stats": ours["decode_stats"],
        "methods": {k: {kk: vv for kk, vv in v.items() if kk != "decode_stats"} for k, v in results.items()},
        "seconds": time.time() - t0,
    }
    if "hybrid" in results:
        record["hybrid_behind"] = hybrid_behind(record["methods"])
    if eval_cfg.temperature == 0 and eval_cfg.profile_prompts > 0:
        record.update(ideal_speedup(model, drafter, eval_cfg, prompts, tokenizer.eos_token_id, record))
    plot_record(record, out_dir / "eval.png")
    atomic.write_json(record_path, record)  # written last and whole: it marks the stage done
    return record


def hybrid_behind(methods: dict) -> dict:
    """Where the hybrid is NOT the fastest: {scope: {method: its speedup, "hybrid": the hybrid's}}, scope
    "all" (the whole eval set) or a category, for the drafter alone and the training-free baselines that
    beat it there. Empty: the hybrid was the fastest everywhere."""
    rivals = [m for m in ("redrafter", *TRAINING_FREE) if m in methods]
    scopes = {"all": {m: methods[m] for m in ["hybrid", *rivals]}}
    for c in methods["hybrid"].get("by_category", {}):
        scopes[c] = {m: methods[m]["by_category"][c] for m in ["hybrid", *rivals] if c in methods[m].get("by_category", {})}
    behind = {}
    for scope, ms in scopes.items():
        ahead = {m: round(ms[m]["speedup"], 4) for m in rivals if m in ms and ms[m]["speedup"] > ms["hybrid"]["speedup"]}
        if ahead:
            behind[scope] = ahead | {"hybrid": round(ms["hybrid"]["speedup"], 4)}
    return behind


class MachineLoad:
    """How much CPU other processes used while the eval timed its methods: busy CPU time of the whole
    machine (/proc/stat) minus this process's own (and its children's), over wall time x CPUs. A timing
    taken while something else ran is not comparable; the record keeps this, and the console warns
    above WARN_OTHER_CPU. None where /proc/stat is unreadable (not Linux)."""

    WARN_OTHER_CPU = 0.10

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        import os
        import resource

        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        own = sum(getattr(resource.getrusage(w), k) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for k in ("ru_utime", "ru_stime"))
        return time.time(), busy, own

    def stop(self) -> dict | None:
        import os
        import warnings

        end = self._sample()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        cpus = os.cpu_count() or 1
        wall = end[0] - self.start[0]
        other = max(0.0, (end[1] - self.start[1]) - (end[2] - self.start[2])) / (wall * cpus)
        if other > self.WARN_OTHER_CPU:
            warnings.warn(f"other processes used {100 * other:.0f}% of this machine's {cpus} CPUs while the eval was "
                          "timing: its speedups are not comparable with a quiet machine's; rerun with nothing else "
                          "running")
        return {"other_cpu_fraction": round(other, 4), "cpus": cpus, "seconds": round(wall, 1)}


def auto_beam_length(model, drafter_dir: Path, eval_cfg: EvalConfig, prompts: list) -> dict:
    """eval.beam_length=0: the greedy beam length (W = 1) with the best ideal speedup on this device, from the
    drafter's held-out acceptance per draft position (train_metrics.json: top-1 agreement with the teacher
    after teacher-forced drafts, i.e. P(draft i accepted | drafts < i accepted)) and the verify forward's
    cost per query count, timed here at the eval prompts' median length (eval/forward_cost.py)."""
    import statistics

    from eval.forward_cost import choose_beam_length, expected_tau, forward_costs

    from pipeline.train import heldout_top1

    per_position = heldout_top1(drafter_dir)
    # up to the first position the held-out set did not reach
    acceptance = per_position[:per_position.index(None)] if None in per_position else per_position
    if not acceptance:
        raise ValueError(f"eval.beam_length=0 (auto) needs the drafter's held-out top-1 per draft position in "
                         f"{drafter_dir / 'train_metrics.json'}; set eval.beam_length to a number")
    context = int(statistics.median(len(p.input_ids) for p in prompts)) + eval_cfg.max_new_tokens // 2
    costs, _ = forward_costs(model, list(range(1, len(acceptance) + 2)), context, repeats=7)
    median_ms = {q: c["median"] for q, c in costs.items()}
    L, ideal = choose_beam_length(acceptance, median_ms)
    costs_text = ", ".join(f"{q}: {m:.1f}" for q, m in median_ms.items())
    ideal_text = ", ".join(f"{k}: {v:.2f}x" for k, v in ideal.items())
    print(f"eval: beam length {L} (auto): verify forward ms by query tokens {costs_text}; ideal by length {ideal_text}",
          flush=True)
    return {"beam_length": L, "auto": True, "forward_ms": median_ms, "context": context, "heldout_acceptance": acceptance,
            "expected_tau": {k: expected_tau(acceptance, k) for k in ideal}, "ideal_by_length": ideal}


def ideal_speedup(model, drafter, eval_cfg: EvalConfig, prompts: list, eos: int | None, record: dict) -> dict:
    """What a decoder whose step cost only the verify forward would reach at the measured tau:
    ideal = tau x t(plain step) / t(verify forward over the packed tree); decoder efficiency = measured
    speedup / ideal (docs/design.md §5). On CPU both step times come from the timed run itself (every
    prompt, every repeat: eval/compare.py step_timing). Where it was not timed (CUDA), from a profile
    of a few prompts (eval/profile.py), which also gives the phase breakdown either way."""
    from eval.profile import ideal_at, profile_decoder

    decoder = SpeculativeDecoder(model, drafter, eval_cfg.beam_width, eval_cfg.beam_length,
                                 top_logits=eval_cfg.beam_top_logits)
    prof = profile_decoder(decoder, [p.input_ids for p in prompts[:eval_cfg.profile_prompts]],
                           eval_cfg.max_new_tokens, eos)
    profile_ideal = ideal_at(record["tokens_per_step"], prof)
    ours, plain = record["methods"]["redrafter"], record["methods"]["plain"]
    step_profile = {"plain_step_ms": prof["plain_step_ms"], "spec_step_ms": prof["spec_step_ms"],
                    "ms_per_step": prof["ms_per_step"], "cost_ratio": prof["cost_ratio"],
                    "profiled_prompts": eval_cfg.profile_prompts, "ideal_speedup": profile_ideal}
    if "ideal_speedup" in ours:
        ideal = ours["ideal_speedup"]
        source = {"source": "timed run", "prompts": record["num_prompts"], "repeats": eval_cfg.repeats,
                  "plain_step_ms": plain["step_timing"]["step_ms"],
                  "verify_forward_ms": ours["step_timing"]["forward_ms"], "spec_step_ms": ours["step_timing"]["step_ms"]}
    else:
        ideal = profile_ideal
        source = {"source": "profile", "prompts": eval_cfg.profile_prompts, "repeats": 1,
                  "plain_step_ms": prof["plain_step_ms"], "verify_forward_ms": prof["ms_per_step"]["base_forward"],
                  "spec_step_ms": prof["spec_step_ms"]}
    return {"ideal_speedup": ideal, "decoder_efficiency": record["speedup"] / ideal, "ideal_timing": source,
            "step_profile": step_profile}


def plot_record(record: dict, path: Path) -> None:
    """eval.png: acceptance per draft position (integer positions), speedup per method with its 95%
    interval, and speedup per prompt category for every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 3.8))
    acc = [a if a is not None else 0.0 for a in record["acceptance_per_position"]]  # None: never reached
    positions = list(range(1, len(acc) + 1))
    ax1.bar(positions, acc, color="tab:blue")
    ax1.set(xlabel="draft position i", ylabel="acceptance rate a_i", ylim=(0, 1), xticks=positions,
            title=f"tau = {record['tokens_per_step']:.2f} tokens/step")
    methods = {k: v for k, v in record["methods"].items() if k != "plain"}
    names = list(methods)
    ax2.bar(names, [m["speedup"] for m in methods.values()],
            yerr=[m["speedup_ci95"] or 0.0 for m in methods.values()], capsize=4,
            color=["tab:blue" if n == "redrafter" else "tab:gray" for n in names])
    ax2.axhline(1.0, color="black", linewidth=0.8)
    ax2.set(ylabel="speedup vs plain greedy (95% CI)",
            title=f"ReDrafter {record['speedup']:.2f}x {ci_text(record['speedup_ci95'])}")
    ax2.tick_params(axis="x", labelrotation=20)
    categories = sorted({c for m in methods.values() for c in m.get("by_category", {})})
    if categories:
        x, width = np.arange(len(categories)), 0.8 / len(methods)
        for i, (name, m) in enumerate(methods.items()):
            ax3.bar(x + i * width, [m.get("by_category", {}).get(c, {}).get("speedup", 0.0) for c in categories],
                    width, label=name)
        ax3.set_xticks(x + width * (len(methods) - 1) / 2, categories, rotation=30, ha="right")
        ax3.axhline(1.0, color="black", linewidth=0.8)
        ax3.legend(fontsize=7)
    ax3.set(ylabel="speedup vs plain greedy", title="per category")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
