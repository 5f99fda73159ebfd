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


def test_a_local_ray_that_misses_its_startup_limit_is_started_again(monkeypatch, capsys):
    """Ray gives a starting node a fixed 30 s; on a busy 2-core machine it can miss them. start_local_ray
    shuts the half-started cluster down and starts it again, with a fresh dashboard port, a line each time;
    any other error, or the last attempt's, reaches the caller."""
    import ray

    from pipeline.main import start_local_ray

    timeout = Exception("The current node timed out during startup. This could happen because ...")
    calls, shutdowns = [], []
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(len(calls)))

    def init_failing(times, error=timeout):
        def init(**options):
            calls.append(options["dashboard_port"])
            if len(calls) <= times:
                raise error
        calls.clear(), shutdowns.clear()
        monkeypatch.setattr(ray, "init", init)

    init_failing(1)
    port = start_local_ray(lambda port: {"dashboard_port": port})
    assert calls[-1] == port and len(calls) == 2 and shutdowns == [1]
    assert "did not start in time" in capsys.readouterr().err
    init_failing(3)
    with pytest.raises(Exception, match="timed out during startup"):
        start_local_ray(lambda port: {"dashboard_port": port}, attempts=3)
    assert len(calls) == 3 and shutdowns == [1, 2]
    init_failing(1, ValueError("bad option"))
    with pytest.raises(ValueError, match="bad option"):
        start_local_ray(lambda port: {"dashboard_port": port})
    assert len(calls) == 1 and shutdowns == []
