"""Promotion rules: each rule can decide, the decision names it, and the registry keeps incumbents."""

import json

from pipeline.config import GateConfig
from pipeline.gate import decide, find_incumbent, record_promotion


def _m(tau, speedup, ci=0.02, cats=None):
    m = {"tokens_per_step": tau, "speedup": speedup, "speedup_ci95": ci}
    if cats:
        m["by_category"] = {c: {"tokens_per_step": t, "speedup": speedup} for c, t in cats.items()}
    return m


def _record(ours, lossless=True, **others):
    return {"lossless": lossless, "tokens_per_step": ours["tokens_per_step"], "speedup": ours["speedup"],
            "speedup_ci95": ours["speedup_ci95"], "methods": {"plain": _m(1.0, 1.0, 0.0), "redrafter": ours, **others}}


def test_all_rules_pass():
    d = decide(_record(_m(2.5, 1.6), lookahead=_m(1.3, 1.1)), GateConfig())
    assert d["promoted"] and d["decided_by"] == "all rules passed"
    assert {r["rule"] for r in d["rules"]} == {"lossless", "min_tokens_per_step", "min_speedup", "beats_training_free"}


def test_lossless_failure_decides_first():
    d = decide(_record(_m(2.5, 1.6), lossless=False), GateConfig())
    assert not d["promoted"] and d["decided_by"] == "lossless"


def test_floor_rules():
    d = decide(_record(_m(1.2, 0.8)), GateConfig(min_tokens_per_step=1.5, min_speedup=1.0, beat_training_free=False))
    assert not d["promoted"] and d["decided_by"] == "min_tokens_per_step"
    assert "min_speedup: measured 0.800, required 1.000" in d["reason"]


def test_losing_to_a_training_free_baseline_blocks_promotion():
    d = decide(_record(_m(2.5, 1.3), prompt_lookup=_m(1.5, 1.2), lookahead=_m(1.8, 1.31)), GateConfig())
    assert not d["promoted"] and d["decided_by"] == "beats_training_free"
    assert "lookahead" in d["rules"][-1]["threshold"]


def test_incumbent_must_be_beaten_by_more_than_noise():
    within_noise = _record(_m(2.6, 1.62, ci=0.05), incumbent=_m(2.5, 1.6, ci=0.05))
    d = decide(within_noise, GateConfig(beat_training_free=False))
    assert not d["promoted"] and d["decided_by"] == "beats_incumbent_speedup"
    clear = _record(_m(2.8, 1.9, ci=0.05), incumbent=_m(2.5, 1.6, ci=0.05))
    assert decide(clear, GateConfig(beat_training_free=False))["promoted"]
    worse_tau = _record(_m(2.4, 1.9, ci=0.05), incumbent=_m(2.5, 1.6, ci=0.05))
    assert decide(worse_tau, GateConfig(beat_training_free=False))["decided_by"] == "beats_incumbent_tau"


def test_category_regression_blocks_promotion():
    rec = _record(_m(2.8, 1.9, cats={"code": 3.2, "math": 2.0}), incumbent=_m(2.5, 1.6, cats={"code": 2.6, "math": 2.4}))
    d = decide(rec, GateConfig(beat_training_free=False, max_category_regression=0.05))
    assert not d["promoted"] and d["decided_by"] == "category_regression"
    assert d["rules"][-1]["value"][0] == "math"


def test_registry_keeps_incumbent_and_ignores_the_candidate_itself(tmp_path):
    export = tmp_path / "export" / "promoted"
    (export / "drafter").mkdir(parents=True)
    (export / "drafter" / "model.safetensors").write_bytes(b"x")
    (export / "drafter" / "config.json").write_text("{}")
    reg = tmp_path / "registry"
    assert find_incumbent(reg, "b" * 64, "e" * 64, "c1") is None
    record_promotion(reg, "b" * 64, "e" * 64, export, {"tokens_per_step": 2.0, "speedup": 1.5}, "c1")
    assert find_incumbent(reg, "b" * 64, "e" * 64, "c1") is None  # re-run of the same drafter
    inc = find_incumbent(reg, "b" * 64, "e" * 64, "c2")
    assert inc is not None and (inc / "model.safetensors").read_bytes() == b"x"
    assert find_incumbent(reg, "b" * 64, "other" * 13, "c2") is None  # another eval set
    assert json.loads(next(reg.rglob("incumbent.json")).read_text())["speedup"] == 1.5


def test_one_repeat_cannot_decide_on_noise():
    d = decide(_record(_m(2.5, 1.6, ci=None), lookahead=_m(1.3, 1.1, ci=None)), GateConfig())
    assert not d["promoted"] and d["decided_by"] == "beats_training_free"
    assert "cannot decide" in d["reason"] and "eval.repeats >= 2" in d["reason"]
    d = decide(_record(_m(2.8, 1.9, ci=None), incumbent=_m(2.5, 1.6, ci=0.05)), GateConfig(beat_training_free=False))
    assert not d["promoted"] and d["decided_by"] == "beats_incumbent_speedup"
