"""What a run will do with the outputs already in its run directory, decided before any work:
each stage is "run", "resume", "reuse" or "refused" (with the reason). `--dry-run` prints this plan;
a real run computes it first and stops on a refusal before Ray starts or anything is written.

    plan = plan_stages(cfg, run_dir)       # [StagePlan(stage, action, detail), ...]

The checks are the ones the stages themselves make (the teacher's data fingerprint, the train and eval
inputs hashes), computed the same way, so the plan does not promise a reuse the run would refuse.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config, resolve_drafter
from pipeline.layout import RunLayout

RUN, RESUME, REUSE, REFUSED = "run", "resume", "reuse", "refused"


@dataclass
class StagePlan:
    stage: str
    action: str  # run | resume | reuse | refused
    detail: str = ""

    def line(self) -> str:
        words = {RUN: "will run", RESUME: "will resume", REUSE: "reused", REFUSED: "REFUSED"}[self.action]
        return f"stage {self.stage}: {words}" + (f" ({self.detail})" if self.detail else "")


def plan_stages(cfg: Config, run_dir: Path) -> list[StagePlan]:
    plans: list[StagePlan] = []
    run = RunLayout(run_dir)
    teacher_dir, train_dir = run.teacher, run.train
    upstream_changes = False  # a stage that (re)makes its output invalidates the reuse of what follows
    if "teacher" in cfg.run.stages:
        plans.append(_plan_teacher(cfg, teacher_dir))
        upstream_changes = plans[-1].action != REUSE
    if "train" in cfg.run.stages:
        if upstream_changes:
            plans.append(StagePlan("train", RUN, "on the teacher data this run makes"))
        else:
            plans.append(_plan_train(cfg, teacher_dir, train_dir))
        upstream_changes = upstream_changes or plans[-1].action != REUSE
    if "eval" in cfg.run.stages:
        if upstream_changes:
            plans.append(StagePlan("eval", RUN, "on the drafter this run trains"))
        else:
            plans.append(_plan_eval(cfg, run.drafter, run.eval))
    return plans


def refusals(plans: list[StagePlan]) -> list[StagePlan]:
    return [p for p in plans if p.action == REFUSED]


def _plan_teacher(cfg: Config, out_dir: Path) -> StagePlan:
    from pipeline.base_model import load_tokenizer
    from pipeline.teacher import (
        FINGERPRINT,
        JOURNAL,
        MANIFEST,
        SHARDS,
        data_fingerprint,
        fingerprint_changes,
        read_journal,
        training_prompts,
        verify_shards,
    )

    path = out_dir / FINGERPRINT
    if not path.is_file():
        if any((out_dir / n).exists() for n in (SHARDS, JOURNAL, MANIFEST)):
            return StagePlan("teacher", REFUSED, f"{out_dir} holds teacher files but no {FINGERPRINT}: their origin "
                             "is unknown; pick a new run.name or delete it")
        return StagePlan("teacher", RUN)
    tokenizer = load_tokenizer(cfg.model)
    prompts, _ = training_prompts(cfg.data, tokenizer, cfg.teacher.responses)
    new = data_fingerprint(cfg.model, cfg.data, cfg.teacher, tokenizer, prompts, cfg.run.seed)
    changed = fingerprint_changes(json.loads(path.read_text()), new)
    if changed:
        shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        return StagePlan("teacher", REFUSED, f"its data was made from other inputs: {shown}. Pick a new run.name, "
                         f"or delete {out_dir} to regenerate")
    total = -(-len(prompts) // cfg.teacher.shard_size)
    if (out_dir / MANIFEST).is_file():
        problems = verify_shards(out_dir)
        if not problems:
            return StagePlan("teacher", REUSE, f"{total} shards verified against their checksums")
        return StagePlan("teacher", RESUME, f"{len(problems)} damaged shard(s) will be regenerated")
    journaled = len(read_journal(out_dir))
    return StagePlan("teacher", RESUME, f"{journaled} of {total} shards journaled; the rest will be generated")


def _plan_train(cfg: Config, teacher_dir: Path, out_dir: Path) -> StagePlan:
    from pipeline.teacher import load_manifest
    from pipeline.train import (
        DRAFTER_FILES,
        _check_base_model,
        latest_checkpoint_step,
        other_checkpoints,
        train_inputs,
        train_run_name,
        world_size_conflict,
    )

    try:
        manifest = load_manifest(teacher_dir)
        drafter_cfg = resolve_drafter(cfg.drafter, manifest["vocab_size"])
        _check_base_model(cfg.model, drafter_cfg, manifest)
    except ValueError as e:
        return StagePlan("train", REFUSED, str(e))
    inputs = train_inputs(manifest, drafter_cfg, cfg.train, cfg.run.seed)
    drafter = out_dir / "drafter"
    if all((drafter / f).is_file() for f in DRAFTER_FILES):
        if json.loads((drafter / "train_metrics.json").read_text()).get("inputs") == inputs:
            return StagePlan("train", REUSE, f"the drafter in {drafter} was trained from these inputs")
    step = latest_checkpoint_step(out_dir, train_run_name(inputs))
    if step is not None:
        return StagePlan("train", RESUME, f"from the checkpoint at step {step}")
    others = other_checkpoints(out_dir, inputs)
    conflict = world_size_conflict(out_dir, inputs, others)
    if conflict:
        return StagePlan("train", REFUSED, conflict)
    note = "".join(f"; the checkpoint at step {o['step']} in ray/{o['run_name']} is not used (other "
                   f"{', '.join(o['changed'][:3]) or 'inputs'})" for o in others)
    return StagePlan("train", RUN, "from step 0" + note)


def _plan_eval(cfg: Config, drafter_dir: Path, out_dir: Path) -> StagePlan:
    from eval.evaluate import eval_inputs, eval_set_key, finished_record
    from pipeline.base_model import base_model_fingerprint
    from pipeline.gate import find_incumbent
    from pipeline.lineage import sha256_file

    if not (drafter_dir / "drafter.safetensors").is_file():
        return StagePlan("eval", REFUSED, f"no trained drafter in {drafter_dir}: run the train stage first")
    base_hash = base_model_fingerprint(cfg.model)
    metrics = drafter_dir / "train_metrics.json"
    trained_for = json.loads(metrics.read_text()).get("base_model_hash") if metrics.is_file() else None
    if trained_for and trained_for != base_hash:
        return StagePlan("eval", REFUSED, f"the drafter in {drafter_dir} was trained for another base model")
    registry = Path(cfg.gate.registry_dir or Path(cfg.run.output_dir) / "registry").resolve()
    incumbent = find_incumbent(registry, base_hash, eval_set_key(cfg.data, cfg.eval),
                               sha256_file(drafter_dir / "drafter.safetensors"))
    inputs = eval_inputs(cfg.model, cfg.data, cfg.eval, drafter_dir, incumbent)
    if finished_record(out_dir, inputs) is not None:
        return StagePlan("eval", REUSE, "the eval record of this drafter and settings")
    return StagePlan("eval", RUN)
