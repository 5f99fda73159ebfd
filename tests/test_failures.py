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
def test_stage_failure_keeps_the_record(tiny_model_dir, tmp_path, monkeypatch, capsys, ray_cleanup, error, code, status):
    def boom(*args, **kwargs):
        raise error

    monkeypatch.setattr(pm, "evaluate_and_gate", boom)
    argv = ["recipe=tiny", f"model.base_model={tiny_model_dir}", f"run.output_dir={tmp_path}", "run.name=r",
            "run.stages=[eval]", "tracking.mode=disabled", "run.num_cpus=1", "data.max_prompt_tokens=4096"]
    assert pm.main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Rerun the same command to resume" in err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["stages"] == {"eval": status}
    assert summary["error"]["stage"] == "eval" and summary["error"]["type"] == type(error).__name__
    if code == 1:
        assert "decoder exploded" in err and (tmp_path / "r" / "error.log").is_file()
        assert "RuntimeError: decoder exploded" in (tmp_path / "r" / "error.log").read_text()
    else:
        assert "python -m pipeline.main recipe=tiny" in err
