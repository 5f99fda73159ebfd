"""Two pipelines on one machine at once, each with the local Ray it starts, do not interfere
(pipeline/main.py init_ray).

    python -m pytest tests/test_two_runs.py -q

Ray's State API, which Ray Train's PlacementGroupCleaner polls from a worker, finds "its" cluster by
scanning the machine; with two clusters up it failed with "Found multiple active Ray instances" in the
middle of training. Two real runs (teacher + train) started together must both finish with neither error.

They also carry planted secrets in their environment (WANDB_API_KEY, HF_TOKEN, WANDB_ENTITY-style
tokens): not one byte of them may appear in anything the runs wrote (resolved config, lineage, logs,
checkpoints, the offline W&B run of run "a").
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.test_e2e import REPO


def test_two_runs_at_once_each_use_their_own_cluster(tiny_model_dir, tmp_path):
    secrets = {"WANDB_API_KEY": "planted0wandb0key0d3adb33f", "HF_TOKEN": "hf_planted0token0c0ffee",
               "HUGGING_FACE_HUB_TOKEN": "hf_planted0hub0token0beef"}

    def start(name):
        mode = "offline" if name == "a" else "disabled"
        argv = [sys.executable, "-m", "pipeline.main", "recipe=tiny", f"model.base_model={tiny_model_dir}",
                f"run.output_dir={tmp_path}", f"run.name={name}", f"tracking.mode={mode}", "run.num_cpus=2",
                "data.max_prompt_tokens=4096", "data.train.limit=8", "teacher.num_actors=1", "teacher.shard_size=4",
                "teacher.max_new_tokens=8", "train.num_workers=1", "train.epochs=2", "train.batch_size=2",
                "train.warmup_steps=1", "run.stages=[teacher,train]"]
        log = open(tmp_path / f"{name}.log", "w")
        env = {**os.environ, **secrets}
        return subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env), log

    runs = [start("a"), start("b")]
    for proc, log in runs:
        assert proc.wait(timeout=600) == 0, (tmp_path / f"{log.name}").read_text()[-3000:]
        log.close()
    for name in ("a", "b"):
        text = (tmp_path / f"{name}.log").read_text()
        assert "multiple active Ray instances" not in text and "ConnectionError" not in text, text[-3000:]
        assert (tmp_path / name / "train" / "drafter").is_dir()
    written = [f for f in tmp_path.rglob("*") if f.is_file() and not f.is_symlink()]
    assert any("offline-run" in str(f) for f in written)  # the W&B files are among them
    for f in written:
        data = f.read_bytes()
        leaked = [k for k, v in secrets.items() if v.encode() in data]
        assert not leaked, f"{f} holds {leaked}"
