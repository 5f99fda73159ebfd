"""compare(): speedups against plain in the same repeat, losslessness token for token, categories."""

import dataclasses

from data.prompts import Prompt
from eval.compare import compare, mean_ci95
from eval.decoder import plain_greedy
from eval.speculative import SpeculativeDecoder
from pipeline.drafter import build_drafter, make_arch
from tests.test_tree import single_thread, tiny_llama  # noqa: F401  (single_thread: autouse fixture)


def test_compare_reports_every_method_and_catches_a_lossy_one():
    model = tiny_llama("sdpa")
    cfg = model.config
    drafter = build_drafter(make_arch(cfg.vocab_size, cfg.hidden_size), model.get_input_embeddings().weight.detach())
    dec = SpeculativeDecoder(model, drafter, 2, 3)
    prompts = [Prompt(id=f"p{i}", text="", input_ids=[3 + i, 7, 9 + i], category="ab"[i % 2]) for i in range(4)]

    def lossy(batch):  # a decoder that changes one token of the first prompt
        result = plain_greedy(model, batch, 8, None)
        if batch[0] == prompts[0].input_ids:
            result = dataclasses.replace(result, tokens=[[t + 1 for t in result.tokens[0]]] + result.tokens[1:])
        return result

    methods = {"plain": lambda b: plain_greedy(model, b, 8, None), "redrafter": lambda b: dec.generate(b, 8, None),
               "lossy": lossy}
    out = compare(methods, prompts, batch_size=1, repeats=2, progress=False)
    assert out["plain"]["speedup"] == 1.0 and out["plain"]["speedup_ci95"] == 0.0
    assert out["redrafter"]["lossless"] and len(out["redrafter"]["speedup_per_repeat"]) == 2
    assert not out["lossy"]["lossless"] and out["lossy"]["mismatched_prompts"] == ["p0"]
    assert set(out["redrafter"]["by_category"]) == {"a", "b"}
    assert 1.0 <= out["redrafter"]["by_category"]["a"]["tokens_per_step"] <= 3


def test_mean_ci95():
    assert mean_ci95([2.0]) == (2.0, None)  # one repeat: no noise estimate, never a certain 0
    m, ci = mean_ci95([1.0, 2.0, 3.0])
    assert m == 2.0 and abs(ci - 4.30 * 1.0 / 3 ** 0.5) < 1e-9


def test_batches_never_mix_categories():
    from eval.compare import make_batches

    prompts = [Prompt(id=str(i), text="", input_ids=[1], category="ab"[i % 2]) for i in range(7)]
    batches = make_batches(prompts, 2)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(len({prompts[i].category for i in b}) == 1 and len(b) <= 2 for b in batches)
    assert [len(b) for b in batches] == [2, 2, 2, 1]  # a: 0,2,4,6  b: 1,3,5


def test_one_repeat_reports_no_interval(capsys):
    from eval.compare import ci_text
    from pipeline.main import print_summary

    assert ci_text(None) == "±n/a" and ci_text(0.0) == "±0.00" and ci_text(0.123, 6) == "±0.12 "
    method = {"tokens_per_step": 1.5, "tokens_per_s": 20.0, "speedup": 1.1, "speedup_ci95": None, "lossless": True}
    record = {"tokens_per_step": 1.5, "beam_width": 1, "beam_length": 3, "num_prompts": 4, "speedup": 1.1,
              "speedup_ci95": None, "spec_tokens_per_s": 20.0, "plain_tokens_per_s": 18.0, "lossless": True,
              "methods": {"plain": {**method, "speedup": 1.0}, "redrafter": method}}
    print_summary({"record": record, "decision": {"promoted": False, "reason": "x"}, "export_dir": "e", "run_dir": "r"})
    out = capsys.readouterr().out
    assert "1.10x ±n/a" in out and "±0.00" not in out and "hybrid" not in out
    for behind, said in (({}, "hybrid: the fastest method overall and in every category"),
                         ({"roleplay": {"redrafter": 1.14, "hybrid": 1.12}},
                          "hybrid: not the fastest in roleplay (redrafter 1.14x vs hybrid 1.12x)")):
        print_summary({"record": record | {"hybrid_behind": behind}, "decision": {"promoted": False, "reason": "x"},
                       "export_dir": "e", "run_dir": "r"})
        assert said in capsys.readouterr().out
    profile = {"plain_step_ms": 50.0, "ms_per_step": {"base_forward": 60.0}, "profiled_prompts": 4,
               "cost_ratio": {"ratio": 0.016}}
    timed = {"source": "timed run", "prompts": 27, "plain_step_ms": 48.0, "verify_forward_ms": 58.0}
    for extra, said in (({"ideal_timing": timed}, "plain step 48.0 ms / verify forward 58.0 ms, from the timed run "
                                                  "over 27 prompts); decoder efficiency 0.90"),
                        ({}, "plain step 50.0 ms / verify forward 60.0 ms, from the profile over 4 prompts")):
        print_summary({"record": record | {"ideal_speedup": 1.22, "decoder_efficiency": 0.9, "step_profile": profile}
                       | extra, "decision": {"promoted": False, "reason": "x"}, "export_dir": "e", "run_dir": "r"})
        assert said in capsys.readouterr().out


def test_paired_bootstrap_interval():
    """Prompt-to-prompt variation cancels in the pairing: prompts of very different lengths, each exactly
    2x faster under the method, give 2.0 with a zero-width interval; timing noise widens it, more
    prompts narrow it; one repeat gives no interval."""
    import random

    from eval.compare import paired_bootstrap_ci95

    rng = random.Random(0)
    lengths = [rng.uniform(0.5, 20.0) for _ in range(30)]  # seconds per prompt under the baseline
    tokens = [64] * 30
    ref = [lengths, lengths]
    exact = [[t / 2 for t in lengths]] * 2
    assert paired_bootstrap_ci95(tokens, exact, tokens, ref, [list(range(30))]) < 1e-12

    def noisy(n, sd):
        return [[t / 2 * (1 + rng.gauss(0, sd)) for t in lengths[:n]] for _ in range(3)]

    few, many = [list(range(10))], [list(range(30))]
    wide = paired_bootstrap_ci95(tokens[:10], noisy(10, 0.2), tokens[:10], [lengths[:10]] * 3, few)
    narrow = paired_bootstrap_ci95(tokens, noisy(30, 0.02), tokens, [lengths] * 3, many)
    assert 0 < narrow < wide
    assert paired_bootstrap_ci95(tokens, exact[:1], tokens, ref[:1], many) is None
