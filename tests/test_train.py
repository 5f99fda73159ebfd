"""Train stage end to end on a tiny random Llama: teacher shards computed here from the real model's
greedy generations and forward passes, 2 Ray Train workers, DeepSpeed ZeRO-2 on CPU, W&B offline.
Checks: the loss falls, the drafter is written with the spec's tensor names, W&B recorded the metrics,
a stopped-and-resumed run reproduces the uninterrupted run's losses, a finished stage is reused.

    python -m pytest tests/test_train.py -q
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import DrafterConfig, ModelConfig, TrackingConfig, TrainConfig
from pipeline.heads import read_arch
from pipeline.export import expected_tensors
from pipeline.lineage import sha256_file, tokenizer_hash
from pipeline.shards import TeacherSequence, write_shard
from pipeline.tracking import read_offline_run
from pipeline.train import TeacherData, latest_checkpoint_step, load_embedding_table, run_train
from tests.test_faults import small_disk  # noqa: F401  (fixture: a real tmpfs that fills up)

TOP_K = 8
TRAIN = TrainConfig(num_workers=2, cpus_per_worker=1, zero_stage=2, lr=1e-2, warmup_steps=2, epochs=4, batch_size=2,
                    heldout_fraction=0.1, log_every=5, checkpoint_every=10, position_weight_decay=0.8)
DRAFTER = DrafterConfig(horizon=4)


@torch.no_grad()
def teacher_sequence(model, prompt: list[int], new_tokens: int, prompt_id: str) -> TeacherSequence:
    """Greedy continuation of `prompt`, then one forward: post-norm hidden states and the next-token
    distribution (top-k + tail) at the last prompt token and every response token."""
    ids = torch.tensor([prompt])
    for _ in range(new_tokens):
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    hidden_TH = model.model(ids).last_hidden_state[0]
    logprobs_TV = torch.log_softmax(model.lm_head(hidden_TH).float(), -1)
    stored = slice(len(prompt) - 1, ids.shape[1])
    top_lp, top_ids = logprobs_TV[stored].topk(TOP_K, dim=-1)
    tail = logprobs_TV[stored].scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    return TeacherSequence(prompt_id, len(prompt), ids[0, stored].int().numpy(), hidden_TH[stored].numpy(),
                           top_ids.int().numpy(), top_lp.numpy(), tail.numpy())


def write_teacher_dir(model_dir: Path, out: Path, num_shards: int = 4, per_shard: int = 6) -> Path:
    """Teacher shards + manifest in the teacher stage's layout (pipeline/teacher.py)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    (out / "shards").mkdir(parents=True)
    shards = []
    for s in range(num_shards):
        seqs = []
        for r in range(per_shard):
            i = s * per_shard + r
            prompt = rng.integers(1, model.config.vocab_size, size=3 + i % 4).tolist()
            seqs.append(teacher_sequence(model, prompt, new_tokens=10 + 3 * (i % 5), prompt_id=str(i)))
        name = f"shard-{s:05d}.parquet"
        write_shard(seqs, out / "shards" / name)
        shards.append({"name": name, "sha256": sha256_file(out / "shards" / name), "rows": len(seqs),
                       "tokens": sum(len(q.tokens) - 1 for q in seqs)})
    manifest = {"schema_version": 1, "hidden_size": model.config.hidden_size, "vocab_size": model.config.vocab_size,
                "top_k": TOP_K, "hidden_dtype": "float16",
                "tokenizer_hash": tokenizer_hash(AutoTokenizer.from_pretrained(model_dir)),
                "num_sequences": sum(s["rows"] for s in shards), "num_tokens": sum(s["tokens"] for s in shards),
                "shards": shards}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir, tmp_path_factory):
    return write_teacher_dir(tiny_model_dir, tmp_path_factory.mktemp("teacher"))


def losses(out_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows}  # a resumed run appends; the last line per step wins


@pytest.fixture(scope="module")
def full_run(ray_local, tiny_model_dir, teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_full")
    result = run_train(ModelConfig(base_model=str(tiny_model_dir)), DRAFTER, TRAIN, TrackingConfig(mode="offline"),
                       teacher_dir, out, seed=0, wandb_group="test")
    return out, result


def test_training_lowers_the_loss_and_writes_the_drafter(full_run):
    out, result = full_run
    loss = losses(out)
    assert sorted(loss) == [5, 10, 15, 20]  # 4 epochs x 5 steps (2 workers x 2 sequences, 2 held out)
    assert loss[20] < 0.5 * loss[5]  # mean loss of steps 16-20 vs steps 1-5

    record = json.loads((out / "drafter" / "arch.json").read_text())
    head, arch = read_arch(record)
    assert record["head"] == head.name == "redrafter"
    state = load_file(str(out / "drafter" / "drafter.safetensors"))
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_tensors(arch)
    assert all(v.dtype == torch.float32 for v in state.values()) and arch.horizon == 4
    metrics = json.loads((out / "drafter" / "train_metrics.json").read_text())
    assert result == {**metrics, "drafter_dir": str(out / "drafter")} and metrics["steps"] == 20
    final = metrics["final"]
    for i in (1, 2, 3):
        assert 0 <= final[f"heldout/top1_{i}"] <= 1 and final[f"heldout/kl_{i}"] >= 0
    assert final["heldout/anchors"] > 0
    # the teacher data here are the model's own greedy continuations: every anchor is on its greedy path
    assert [final[f"heldout/on_policy_share_{i}"] for i in (1, 2, 3)] == [1.0] * 3
    assert [final[f"heldout/on_policy_top1_{i}"] for i in (1, 2, 3)] == \
        pytest.approx([final[f"heldout/top1_{i}"] for i in (1, 2, 3)], rel=1e-6)

    checkpoints = sorted(p.name for p in (out / "ray").glob("train-*/checkpoint_*") if p.is_dir())
    assert checkpoints == ["checkpoint_0000010", "checkpoint_0000020"]
    ckpt = next((out / "ray").glob("train-*/checkpoint_0000020"))
    assert {"meta.json", "rng_rank0.pt", "rng_rank1.pt", "state"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "meta.json").read_text())["step"] == 20


def test_wandb_offline_run_has_the_metrics(full_run):
    out, _ = full_run
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    recorded = read_offline_run(runs[0])
    for key in ("train/loss", "train/lr", "train/kl_1", "train/top1_3", "train/anchors_per_s", "train/tokens_per_s",
                "heldout/kl_1", "heldout/top1_1"):
        assert key in recorded["summary"], key
    assert [row["_step"] for row in recorded["history"] if "train/loss" in row] == [5, 10, 15, 20]


def test_resumed_run_reproduces_the_uninterrupted_losses(full_run, tiny_model_dir, teacher_dir, tmp_path, capsys):
    full_out, _ = full_run
    model_cfg, off = ModelConfig(base_model=str(tiny_model_dir)), TrackingConfig(mode="disabled")
    run_train(model_cfg, DRAFTER, dataclasses.replace(TRAIN, max_steps=10), off, teacher_dir, tmp_path)
    assert sorted(losses(tmp_path)) == [5, 10]
    run_train(model_cfg, DRAFTER, dataclasses.replace(TRAIN, max_steps=20), off, teacher_dir, tmp_path)
    resumed, full = losses(tmp_path), losses(full_out)
    assert sorted(resumed) == sorted(full) == [5, 10, 15, 20]  # windowed means; 15 and 20 come after the resume
    np.testing.assert_allclose([resumed[s] for s in sorted(full)], [full[s] for s in sorted(full)], rtol=1e-6, atol=0)
    a = load_file(str(tmp_path / "drafter" / "drafter.safetensors"))
    b = load_file(str(full_out / "drafter" / "drafter.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)

    capsys.readouterr()  # the same inputs again: reused without launching Ray Train
    run_train(model_cfg, DRAFTER, dataclasses.replace(TRAIN, max_steps=20), off, teacher_dir, tmp_path)
    assert "reusing" in capsys.readouterr().out

    # the same inputs over a damaged copy of the shards: refused, not reused unchecked
    import shutil

    damaged = tmp_path.parent / f"{tmp_path.name}-damaged-teacher"
    shutil.copytree(teacher_dir, damaged)
    shard = sorted((damaged / "shards").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="damaged"):
        run_train(model_cfg, DRAFTER, dataclasses.replace(TRAIN, max_steps=20), off, damaged, tmp_path)


def test_mismatched_teacher_data_is_refused(tiny_model_dir, teacher_dir, tmp_path):
    import shutil

    bad = tmp_path / "teacher"
    shutil.copytree(teacher_dir, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "vocab_size": manifest["vocab_size"] + 1}))
    with pytest.raises(ValueError, match="vocab_size"):
        run_train(ModelConfig(base_model=str(tiny_model_dir)), DRAFTER, TRAIN, TrackingConfig(mode="disabled"),
                  bad, tmp_path / "out")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with open(bad / "shards" / manifest["shards"][0]["name"], "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="damaged"):
        run_train(ModelConfig(base_model=str(tiny_model_dir)), DRAFTER, TRAIN, TrackingConfig(mode="disabled"),
                  bad, tmp_path / "out")


@pytest.mark.parametrize("sharded", [False, True])
def test_embedding_table_is_read_without_loading_the_model(tiny_model_dir, tmp_path, monkeypatch, sharded):
    import pipeline.base_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = model.get_input_embeddings().weight.detach()
    model_dir = tiny_model_dir
    if sharded:  # several safetensors files and model.safetensors.index.json, as large models come
        model_dir = tmp_path / "sharded"
        model.save_pretrained(model_dir, max_shard_size="20KB")
        assert len(list(model_dir.glob("*.safetensors"))) > 2 and not (model_dir / "model.safetensors").exists()
    monkeypatch.setattr(pipeline.base_model, "load_base_model", lambda *a, **k: pytest.fail("loaded the full model"))
    torch.testing.assert_close(load_embedding_table(ModelConfig(base_model=str(model_dir))), expected,
                               rtol=0, atol=0)
    # the output embeddings (drafter.init=base_head) the same way, tied or not
    torch.testing.assert_close(load_embedding_table(ModelConfig(base_model=str(model_dir)), output=True),
                               model.get_output_embeddings().weight.detach(), rtol=0, atol=0)


def test_data_split_and_order_are_deterministic(teacher_dir):
    manifest = json.loads((teacher_dir / "manifest.json").read_text())
    ranks = [TeacherData(teacher_dir, manifest, 2, 0.1, 0, r, 2) for r in (0, 1)]
    held = {(s, r) for s, rows in ranks[0].heldout.items() for r in rows}
    assert len(held) == 2 and held == {(s, r) for s, rows in ranks[1].heldout.items() for r in rows}
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == 5
    seen = [q.prompt_id for rank in ranks for step in range(5) for q in rank.batch(step)]
    assert len(seen) == len(set(seen)) == 20  # an epoch: no sequence twice, none of the held-out ones
    alone = TeacherData(teacher_dir, manifest, 2, 0.1, 0, 0, 1)  # one worker: all 4 shards are its own
    resident = []
    for step in range(alone.steps_per_epoch):
        alone.batch(step)
        resident.append(len(alone._cache))
    assert len(alone.my_shards) == 4 and max(resident) == 2  # shards stream: two in memory, never the data set
    heldout_ids = {q.prompt_id for rank in ranks for b in rank.heldout_batches() for q in b}
    assert len(heldout_ids) == 2 and not heldout_ids & set(seen)
    again = TeacherData(teacher_dir, manifest, 2, 0.1, 0, 0, 2)
    assert [q.prompt_id for q in again.batch(7)] == [q.prompt_id for q in ranks[0].batch(7)]  # epoch 1, any time
    assert [q.prompt_id for q in ranks[0].batch(5)] != [q.prompt_id for q in ranks[0].batch(0)]  # reshuffled


# full_run's training (checkpoint_every and max_failures do not change the result, so it is the same Ray
# run's inputs) with a checkpoint every 3 steps, mid-epoch too: room for two faults in its 20 steps
FAULTY = dataclasses.replace(TRAIN, checkpoint_every=3, max_failures=1)


def registered_step(out: Path) -> int:
    """The newest checkpoint Ray Train registered under out (0 without one)."""
    return max((latest_checkpoint_step(out, run.name) or 0 for run in (out / "ray").glob("train-*")), default=0)


def test_a_killed_worker_restarts_and_a_full_disk_gives_up_then_the_rerun_ends_identical(
        ray_local, tiny_model_dir, teacher_dir, full_run, small_disk, capfd):  # noqa: F811 (the fixture)
    """Two faults in one 20-step run (train.max_failures=1), the run directory on a real tmpfs:
    1. a training worker is SIGKILLed after the first checkpoint (step 3): Ray Train restarts the worker
       group from the last checkpoint inside the same Ray run;
    2. after the restarted group has registered a new checkpoint, the disk fills up: writing the next
       checkpoint fails and, with no restarts left, the stage gives up with ONE line that the pipeline
       recognises as a full disk (it prints "no space left on the disk of ... rerun the same command") and
       that says from which checkpoint a rerun resumes (only checkpoints Ray Train registered count).
    After the disk grows, the same call resumes there and ends with the uninterrupted run's (full_run's)
    drafter, bit for bit."""
    import os
    import re
    import shutil
    import signal
    import threading
    import time

    import psutil

    from pipeline.main import disk_full
    from tests.test_faults import _resize

    model, off = ModelConfig(base_model=str(tiny_model_dir)), TrackingConfig(mode="disabled")
    clean_out, clean = full_run
    out = small_disk / "train"
    _resize(small_disk, 64 << 20)
    killed, filled = [], []

    def faults():
        deadline = time.time() + 300
        while time.time() < deadline and registered_step(out) < FAULTY.checkpoint_every:  # a checkpoint to resume
            time.sleep(0.02)
        before = registered_step(out)
        ours = [p for p in psutil.Process().children(recursive=True)  # this test's own cluster only
                if any("RayTrainWorker" in part for part in p.cmdline())]
        if ours:
            os.kill(ours[0].pid, signal.SIGKILL)
            killed.append(before)
        while time.time() < deadline and registered_step(out) <= before:  # the restarted group checkpointed
            time.sleep(0.01)
        _resize(small_disk, shutil.disk_usage(small_disk).used + 4096)  # one page left: no checkpoint fits
        filled.append(registered_step(out))

    threading.Thread(target=faults, daemon=True).start()
    with pytest.raises(RuntimeError) as failure:
        run_train(model, DRAFTER, FAULTY, off, teacher_dir, out, seed=0)
    first = "".join(capfd.readouterr())
    assert killed and filled, "the faults were not injected"
    resumed = re.search(r"train: resuming from step (\d+)", first)  # the restart resumed from a checkpoint
    assert resumed and int(resumed.group(1)) % FAULTY.checkpoint_every == 0 and 0 < int(resumed.group(1)) < 20, first
    assert len(list((out / "ray").glob("train-*"))) == 1  # the same Ray run continued, no new one
    assert disk_full(failure.value), failure.value
    step = registered_step(out)
    line = str(failure.value)
    assert "\n" not in line and line.startswith("training failed after 1 restart(s) of the worker group"), line
    assert filled[0] <= step < 20
    assert line.endswith(f"Rerunning the same command resumes from the checkpoint at step {step}"), line
    assert not (out / "drafter").exists()  # no drafter from a run that did not finish

    _resize(small_disk, 64 << 20)
    result = run_train(model, DRAFTER, FAULTY, off, teacher_dir, out, seed=0)
    assert result["steps"] == clean["steps"] == 20 and result["inputs"] == clean["inputs"]
    time.sleep(2)  # worker output reaches the driver asynchronously
    assert re.search(rf"train: resuming from step {step}\b", "".join(capfd.readouterr()))
    assert sha256_file(out / "drafter" / "drafter.safetensors") == \
        sha256_file(clean_out / "drafter" / "drafter.safetensors")
