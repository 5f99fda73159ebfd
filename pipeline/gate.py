"""Promotion gate: decide from the eval record, then export a promoted drafter or keep a candidate.

A decision record lists every rule with its measured value and threshold, and names the rule that
decided (the first that failed, or "all rules passed").
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file

from pipeline.config import GateConfig
from pipeline.drafter import DrafterArch
from pipeline.export import export_drafter
from pipeline.tracking import log_artifact


def decide(record: dict, gate: GateConfig) -> dict:
    rules = [
        {"rule": "lossless", "value": record["lossless"], "threshold": gate.require_lossless,
         "passed": record["lossless"] or not gate.require_lossless},
        {"rule": "min_tokens_per_step", "value": record["tokens_per_step"], "threshold": gate.min_tokens_per_step,
         "passed": record["tokens_per_step"] >= gate.min_tokens_per_step},
        {"rule": "min_speedup", "value": record["speedup"], "threshold": gate.min_speedup,
         "passed": record["speedup"] >= gate.min_speedup},
    ]
    failed = [r for r in rules if not r["passed"]]
    if failed:
        reason = "; ".join(f"{r['rule']}: measured {_fmt(r['value'])}, required {_fmt(r['threshold'])}"
                           for r in failed)
    else:
        reason = "all rules passed"
    return {"promoted": not failed, "decided_by": failed[0]["rule"] if failed else "all rules passed",
            "reason": reason, "rules": rules}


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def publish(decision: dict, drafter_dir: Path, record: dict, lineage: dict, export_root: Path,
            tracker=None, artifact_name: str = "drafter") -> Path:
    """Export into export_root/promoted or export_root/candidate:

        <kind>/drafter/{config.json, model.safetensors}   (exactly the reference format)
        <kind>/eval_record.json, lineage.json, decision.json
    and log it to W&B as a `drafter` artifact with alias `promoted` or `candidate`."""
    kind = "promoted" if decision["promoted"] else "candidate"
    out = export_root / kind
    if out.exists():
        shutil.rmtree(out)  # re-running the gate on the same checkpoint replaces its own export
    arch = DrafterArch(**json.loads((drafter_dir / "arch.json").read_text()))
    state = load_file(str(drafter_dir / "drafter.safetensors"))
    export_drafter(state, arch, out / "drafter")
    for name, obj in (("eval_record.json", record), ("lineage.json", lineage), ("decision.json", decision)):
        (out / name).write_text(json.dumps(obj, indent=2, default=str) + "\n")
    if tracker is not None:
        log_artifact(tracker, out, name=artifact_name, type="drafter", aliases=[kind],
                     metadata={"decision": decision["reason"], "tokens_per_step": record["tokens_per_step"],
                               "speedup": record["speedup"], "lossless": record["lossless"]})
    return out
