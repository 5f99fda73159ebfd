"""Promotion gate: decide from the eval record, then export a promoted drafter or keep a candidate.

A decision record lists every rule with its measured value and threshold, and names the rule that
decided (the first that failed, or "all rules passed").
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from safetensors.torch import load_file

from pipeline import atomic
from pipeline.config import TRAINING_FREE, GateConfig
from pipeline.heads import read_arch
from pipeline.tracking import log_artifact


def _rule(name: str, value, threshold, passed: bool) -> dict:
    return {"rule": name, "value": value, "threshold": threshold, "passed": bool(passed)}


def decide(record: dict, gate: GateConfig) -> dict:
    """Every rule with its measured value; promoted only if all pass. Speedups from one eval run
    (interleaved repeats, same process); 'beats X' means by more than both 95% intervals together."""
    methods = record.get("methods", {})
    ours = methods.get("redrafter", {"speedup": record["speedup"], "speedup_ci95": record["speedup_ci95"],
                                     "tokens_per_step": record["tokens_per_step"]})
    rules = [
        _rule("lossless", record["lossless"], gate.require_lossless, record["lossless"] or not gate.require_lossless),
        _rule("min_tokens_per_step", record["tokens_per_step"], gate.min_tokens_per_step,
              record["tokens_per_step"] >= gate.min_tokens_per_step),
        _rule("min_speedup", record["speedup"], gate.min_speedup, record["speedup"] >= gate.min_speedup),
    ]
    free = {k: v for k, v in methods.items() if k in TRAINING_FREE}
    if gate.beat_training_free and free:
        best = max(free, key=lambda k: free[k]["speedup"])
        rules.append(_beats("beats_training_free", ours, free[best], best))
    inc = methods.get("incumbent")
    if gate.beat_incumbent and inc is not None:
        # tau of greedy decoding is deterministic: any increase is real; speedup must clear the noise
        rules.append(_rule("beats_incumbent_tau", ours["tokens_per_step"], inc["tokens_per_step"],
                           ours["tokens_per_step"] > inc["tokens_per_step"]))
        rules.append(_beats("beats_incumbent_speedup", ours, inc, "incumbent"))
        worst = _worst_category_drop(ours.get("by_category", {}), inc.get("by_category", {}))
        if worst is not None:
            rules.append(_rule("category_regression", worst, gate.max_category_regression,
                               worst[1] <= gate.max_category_regression))
    failed = [r for r in rules if not r["passed"]]
    reason = "; ".join(f"{r['rule']}: measured {_fmt(r['value'])}, required {_fmt(r['threshold'])}"
                       for r in failed) or "all rules passed"
    return {"promoted": not failed, "decided_by": failed[0]["rule"] if failed else "all rules passed",
            "reason": reason, "rules": rules}


def _beats(rule: str, ours: dict, other: dict, name: str) -> dict:
    """Our speedup above the other's by more than both 95% intervals together. With a single repeat there
    is no interval: the rule cannot decide on noise, so it does not pass (rerun with eval.repeats >= 2)."""
    if ours["speedup_ci95"] is None or other["speedup_ci95"] is None:
        return _rule(rule, ours["speedup"], f"{name} {other['speedup']:.3f} + noise (n/a: one repeat, cannot decide; "
                     "set eval.repeats >= 2)", False)
    margin = other["speedup"] + other["speedup_ci95"] + ours["speedup_ci95"]
    return _rule(rule, ours["speedup"], f"{name} {other['speedup']:.3f} + noise", ours["speedup"] > margin)


def _worst_category_drop(ours: dict, inc: dict):
    """(category, relative tau drop vs the incumbent) for the worst category, None without categories."""
    drops = [(c, (inc[c]["tokens_per_step"] - ours[c]["tokens_per_step"]) / inc[c]["tokens_per_step"])
             for c in ours if c in inc and inc[c]["tokens_per_step"]]
    return max(drops, key=lambda d: d[1]) if drops else None


def registry_entry(registry_dir: Path, base_model_hash: str, eval_set_hash: str) -> Path:
    """The incumbent record for one base model on one eval set."""
    return registry_dir / base_model_hash[:16] / eval_set_hash[:16] / "incumbent.json"


def find_incumbent(registry_dir: Path, base_model_hash: str, eval_set_hash: str, candidate_sha256: str) -> Path | None:
    """The exported drafter directory of the promoted incumbent, if there is one on disk and it is
    not the candidate itself (a re-run of the run that promoted it)."""
    entry = registry_entry(registry_dir, base_model_hash, eval_set_hash)
    if not entry.is_file():
        return None
    info = json.loads(entry.read_text())
    drafter = Path(info["drafter_dir"])
    if info.get("candidate_sha256") == candidate_sha256 or not (drafter / "model.safetensors").is_file():
        return None
    return drafter


def record_promotion(registry_dir: Path, base_model_hash: str, eval_set_hash: str, export_dir: Path,
                     record: dict, candidate_sha256: str) -> None:
    """The newly promoted drafter becomes the incumbent; it is copied into the registry so that a
    later run of the same recipe (which rewrites its own export dir) still has it to compare with."""
    entry = registry_entry(registry_dir, base_model_hash, eval_set_hash)
    keep = entry.parent / f"drafter-{candidate_sha256[:12]}"
    if keep.exists():
        shutil.rmtree(keep)
    shutil.copytree(export_dir / "drafter", keep)
    entry.write_text(json.dumps({"drafter_dir": str(keep), "export_dir": str(export_dir),
                                 "candidate_sha256": candidate_sha256,
                                 "tokens_per_step": record["tokens_per_step"], "speedup": record["speedup"],
                                 "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def publish(decision: dict, drafter_dir: Path, record: dict, lineage: dict, export_root: Path,
            tracker=None, artifact_name: str = "drafter", data: dict | None = None) -> Path:
    """Export into export_root/promoted or export_root/candidate:

        <kind>/drafter/{config.json, model.safetensors}   (exactly the reference format)
        <kind>/README.md (model card), serving.json       (pipeline/handoff.py)
        <kind>/eval_record.json, lineage.json, decision.json
    and log it to W&B as a `drafter` artifact with alias `promoted` or `candidate`. `data` is what the
    card says about the training data (the teacher manifest's counts and accounting)."""
    from pipeline.handoff import write_handoff

    kind = "promoted" if decision["promoted"] else "candidate"
    final = export_root / kind
    # built in a temporary directory and renamed into place: an export is whole or absent, never partial
    atomic.sweep(export_root, kind)  # left by a run killed mid-export
    head, arch = read_arch(json.loads((drafter_dir / "arch.json").read_text()))
    state = load_file(str(drafter_dir / "drafter.safetensors"))
    # re-running the gate on the same checkpoint replaces its own export
    with atomic.replacing_dir(final) as out:
        head.export(state, arch, out / "drafter")
        for name, obj in (("eval_record.json", record), ("lineage.json", lineage), ("decision.json", decision)):
            (out / name).write_text(json.dumps(obj, indent=2, default=str) + "\n")
        write_handoff(out, record, arch, decision, lineage, data)
    out = final
    if tracker is not None:
        log_artifact(tracker, out, name=artifact_name, type="drafter", aliases=[kind],
                     metadata={"decision": decision["reason"], "tokens_per_step": record["tokens_per_step"],
                               "speedup": record["speedup"], "lossless": record["lossless"]})
    return out
