"""A run that fails or is interrupted keeps its record: summary.json with each stage's status and the
error, the traceback in error.log, and one line on the console saying what was saved and how to resume.

    python -m pytest tests/test_failures.py -q
"""

from __future__ import annotations

import json

import pytest

import pipeline.main as pm


@pytest.fixture
def ray_cleanup():
    yield
    import ray

    ray.shutdown()


@pytest.mark.parametrize("error,code,status", [(RuntimeError("decoder exploded"), 1, "failed"),
                                               (KeyboardInterrupt(), 130, "interrupted")])
def test_stage_failure_keeps_the_record(tiny_model_dir, tmp_path, monkeypatch, capsys, ray_free, ray_cleanup, error,
                                        code, status):
    def boom(*args, **kwargs):
        raise error

    import pipeline.teacher

    monkeypatch.setattr(pipeline.teacher, "run_teacher", boom)  # the stage fails after it started
    argv = ["recipe=tiny", f"model.base_model={tiny_model_dir}", f"run.output_dir={tmp_path}", "run.name=r",
            "run.stages=[teacher]", "tracking.mode=disabled", "run.num_cpus=1", "data.max_prompt_tokens=4096",
            "data.train.limit=6", "teacher.max_new_tokens=4"]
    assert pm.main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Rerun the same command to resume" in err
    assert err in (tmp_path / "r" / "console.log").read_text()  # the error line is in the run's console log
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["stages"] == {"teacher": status}
    assert summary["error"]["stage"] == "teacher" and summary["error"]["type"] == type(error).__name__
    if code == 1:
        assert "decoder exploded" in err and (tmp_path / "r" / "error.log").is_file()
        assert "RuntimeError: decoder exploded" in (tmp_path / "r" / "error.log").read_text()
    else:
        assert "python -m pipeline.main recipe=tiny" in err


def test_sigterm_stops_like_ctrl_c_and_keeps_the_record(tmp_path):
    """`kill` / `ray job stop` / a preempting scheduler send SIGTERM: the stage is recorded as interrupted,
    finished work is kept, and the last line says how to resume."""
    import signal
    import subprocess
    import sys
    import time

    argv = ["recipe=tiny", f"run.output_dir={tmp_path}", "run.name=r",  # the recipe's own tiny base model
            "run.stages=[teacher]", "tracking.mode=disabled", "run.num_cpus=2", "teacher.max_new_tokens=8",
            "teacher.shard_size=1", "teacher.num_actors=1", "data.train.limit=200", "data.max_prompt_tokens=4096"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.main", *argv], cwd=pm.Path(pm.__file__).parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shards = tmp_path / "r" / "teacher" / "shards"
    deadline = time.time() + 300
    while not shards.is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Rerun the same command to resume" in err.strip().splitlines()[-1]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["stages"] == {"teacher": "interrupted"} and summary["error"]["type"] == "KeyboardInterrupt"
