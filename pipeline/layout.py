"""Where a run keeps what (the one home of every run-directory path; README "What a run leaves behind").

    run = RunLayout(Path("outputs/smollm2"))
    run.drafter          # outputs/smollm2/train/drafter
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def resolved_config(self) -> Path:
        return self.root / "resolved_config.yaml"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def console(self) -> Path:
        return self.root / "console.log"

    @property
    def error_log(self) -> Path:
        return self.root / "error.log"

    @property
    def budget(self) -> Path:
        """run.budget_min's choice of data.train.limit (pipeline/estimate.py BudgetChoice)."""
        return self.root / "budget.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def teacher_manifest(self) -> Path:
        return self.teacher / "manifest.json"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def drafter(self) -> Path:
        """The trained drafter: drafter.safetensors, arch.json, train_metrics.json."""
        return self.train / "drafter"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def eval_record(self) -> Path:
        return self.eval / "eval_record.json"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def bench(self) -> Path:
        return self.root / "bench"
