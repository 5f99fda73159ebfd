"""Faults in the teacher stage, each with a real process killed by a real signal or a real full disk
(README fault matrix).

    python -m pytest tests/test_faults.py -q

The teacher stage runs as the user runs it (`python -m pipeline.main ... run.stages=[teacher]` in its
own process, which starts its own local Ray); the test watches the journal and strikes while shards are
still pending. Every outcome is compared with a clean run of the same command: shards byte-identical
(greedy teacher), every prompt in exactly one shard, finished shards never rewritten.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from pipeline.lineage import sha256_file
from tests.test_e2e import REPO

PROMPTS, SHARD = 16, 2
SHARDS = PROMPTS // SHARD


def argv(model_dir, out_dir, name="r"):
    return [sys.executable, "-m", "pipeline.main", "recipe=tiny", f"model.base_model={model_dir}",
            f"run.output_dir={out_dir}", f"run.name={name}", "tracking.mode=disabled", "run.num_cpus=2",
            "data.max_prompt_tokens=4096", f"data.train.limit={PROMPTS}", "teacher.num_actors=2",
            f"teacher.shard_size={SHARD}", "teacher.max_new_tokens=32", "run.stages=[teacher]"]


def journal(run_dir) -> list[dict]:
    path = run_dir / "teacher" / "progress.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def shard_files(run_dir) -> dict[str, tuple]:
    """name -> (inode, mtime_ns, sha256) of every shard file: a rewrite changes the inode (write + rename)."""
    shards = run_dir / "teacher" / "shards"
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, sha256_file(p)) for p in sorted(shards.glob("shard-*"))}


def manifest_shards(run_dir) -> dict[str, dict]:
    manifest = json.loads((run_dir / "teacher" / "manifest.json").read_text())
    assert manifest["num_sequences"] == PROMPTS and len(manifest["shards"]) == SHARDS
    assert all(s["rows"] == SHARD for s in manifest["shards"])  # every prompt in exactly one shard
    return {s["name"]: s for s in manifest["shards"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny random Llama with room for the recipe's longest training prompt + 32 new tokens."""
    from tests.conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model"), max_position_embeddings=1024)


@pytest.fixture(scope="module")
def clean(model_dir, tmp_path_factory):
    """The same teacher command, uninterrupted: the shards every faulty run must end up with."""
    out = tmp_path_factory.mktemp("clean")
    done = subprocess.run(argv(model_dir, out), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {name: s["sha256"] for name, s in manifest_shards(out / "r").items()}


def start(cmd, log_path):
    log = open(log_path, "w")  # noqa: SIM115 - closed by the caller through the process's lifetime
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log


def strike_when(proc, run_dir, at_least: int, action, timeout: float = 300) -> int:
    """Poll the journal; once `at_least` (and not all) shards are journaled, `action()`; returns how many
    were journaled then. Fails if the run ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        n = len(journal(run_dir))
        if at_least <= n < SHARDS and action():
            return n
        assert proc.poll() is None, "the teacher stage ended before the fault could be injected"
        time.sleep(0.01)
    raise AssertionError("timed out waiting for the teacher stage")


def test_a_killed_actor_loses_nothing_and_a_killed_driver_resumes_with_only_the_unfinished_shards(
        model_dir, tmp_path, clean):
    """Two faults in one teacher run, each checked on its own:
    1. SIGKILL a teacher actor while shards are pending: Ray Data restarts it and retries its shard; no
       shard is lost or journaled twice.
    2. Later, SIGKILL the whole pipeline process group (its local Ray dies with it), then run the same
       command again: the journaled shards are verified and kept (same inode, same bytes), only the rest
       are generated.
    Every shard ends byte-identical to the clean run's."""
    run_dir = tmp_path / "r"
    cmd = argv(model_dir, tmp_path)
    proc, log = start(cmd, tmp_path / "log")
    killed, family = [], []

    def kill_an_actor() -> bool:
        actors = [p for p in psutil.Process(proc.pid).children(recursive=True)
                  if "TeacherWorker" in " ".join(p.cmdline())]
        if actors:
            actors[0].send_signal(signal.SIGKILL)
            killed.append(actors[0].pid)
        return bool(actors)

    def kill_the_driver() -> bool:
        family.extend(psutil.Process(proc.pid).children(recursive=True))
        os.killpg(proc.pid, signal.SIGKILL)
        return True

    at_actor = strike_when(proc, run_dir, 1, kill_an_actor)
    # the driver dies after the restarted actor has delivered: shards journaled after the actor kill
    at_driver = strike_when(proc, run_dir, at_actor + 2, kill_the_driver)
    proc.wait(timeout=60)
    log.close()
    assert killed and at_actor < at_driver < SHARDS
    _, alive = psutil.wait_procs(family, timeout=60)
    assert not alive, f"processes of the killed run still alive: {alive}"
    names = [e["name"] for e in journal(run_dir)]
    assert len(names) == len(set(names)), names  # none journaled twice across the actor's restart
    kept = {name: shard_files(run_dir)[name] for name in names}
    assert at_driver <= len(kept) < SHARDS
    assert all(sha == clean[name] for name, (_, _, sha) in kept.items())

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    after = shard_files(run_dir)
    assert {name: after[name] for name in kept} == kept  # verified, not rewritten
    names = [e["name"] for e in journal(run_dir)]
    assert sorted(names) == sorted(clean) and len(names) == len(set(names)) == SHARDS  # each journaled once
    assert {n: s["sha256"] for n, s in manifest_shards(run_dir).items()} == clean


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem that fills up: a tmpfs mounted for this test (needs root or CAP_SYS_ADMIN)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); "
                    "test_a_full_disk_never_leaves_a_partial_shard covers the writer without one")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _resize(mount, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


def test_a_full_disk_stops_with_a_clear_error_and_the_rerun_keeps_what_was_whole(model_dir, small_disk,
                                                                                 clean):
    """The run directory on a tmpfs that fills up mid-teacher: the run stops with one line saying the disk
    is full and how to resume; no partial shard is left or journaled; after the disk grows, the same
    command keeps every journaled shard and ends with the clean run's shards."""
    run_dir = small_disk / "r"
    cmd = argv(model_dir, small_disk)
    _resize(small_disk, 64 << 20)
    proc, log = start(cmd, small_disk.parent / "log")

    def fill_the_disk() -> bool:  # leave 3 pages free: less than a shard (about 4 pages)
        _resize(small_disk, shutil.disk_usage(small_disk).used + 3 * 4096)
        return True

    strike_when(proc, run_dir, 2, fill_the_disk)
    rc = proc.wait(timeout=600)
    log.close()
    out = (small_disk.parent / "log").read_text()
    assert rc == 1, out[-3000:]
    assert "error: no space left on the disk of" in out and "rerun the same command to resume" in out, out[-3000:]
    shards = run_dir / "teacher" / "shards"
    assert not list(shards.glob(".*tmp*")), "a partial shard was left behind"
    kept = {e["name"]: shard_files(run_dir)[e["name"]] for e in journal(run_dir)}
    assert all(sha == clean[name] for name, (_, _, sha) in kept.items())  # every journaled shard is whole
    assert len(kept) < SHARDS
    _resize(small_disk, 64 << 20)
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    after = shard_files(run_dir)
    assert {name: after[name] for name in kept} == kept
    assert {n: s["sha256"] for n, s in manifest_shards(run_dir).items()} == clean


def test_a_full_disk_never_leaves_a_partial_shard(tmp_path, monkeypatch):
    """The shard writer when the disk fills up halfway through a file (the filesystem's own ENOSPC,
    raised after some bytes were written): the error reaches the caller, neither the shard nor its
    temporary file exists afterwards, and the pipeline recognises the error, also through Ray's wrapping."""
    import numpy as np
    import pyarrow.parquet as pq

    import pipeline.shards as shards_module
    from pipeline.main import disk_full
    from pipeline.shards import TeacherSequence, write_shard

    real = pq.write_table

    def half_then_full(table, where, **kwargs):
        real(table, where, **kwargs)
        with open(where, "r+b") as f:
            f.truncate(os.path.getsize(where) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards_module.pq, "write_table", half_then_full)
    seq = TeacherSequence(prompt_id="p", prompt_len=1, tokens=np.arange(4, dtype=np.int32),
                          hidden=np.zeros((4, 8), np.float32), topk_ids=np.zeros((4, 2), np.int32),
                          topk_logprobs=np.zeros((4, 2), np.float32), tail_logprob=np.zeros(4, np.float32))
    with pytest.raises(OSError) as raised:
        write_shard([seq], tmp_path / "shard-00000.parquet")
    assert list(tmp_path.iterdir()) == []
    assert disk_full(raised.value)
    wrapped = RuntimeError("teacher stage failed after 3 of 12 pending shards")
    wrapped.__cause__ = Exception("ray.exceptions.RayTaskError(OSError): ... OSError: [Errno 28] No space left on "
                                  "device")
    assert disk_full(wrapped) and not disk_full(RuntimeError("decoder exploded"))


def test_whole_or_absent_writes_keep_the_old_state_on_any_error(tmp_path):
    """pipeline/atomic.py, which every 'done' marker goes through (shards, manifests, the drafter, the eval
    record, the export, summary.json): an error mid-write leaves the previous file or directory exactly as
    it was and no temporary leftover; a killed writer's leftovers are swept."""
    from pipeline import atomic

    path = tmp_path / "record.json"
    atomic.write_json(path, {"v": 1})
    with pytest.raises(OSError):
        with atomic.replacing(path) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise OSError(errno.ENOSPC, "No space left on device")
    assert json.loads(path.read_text()) == {"v": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]

    out = tmp_path / "export"
    with atomic.replacing_dir(out) as d:
        (d / "a").write_text("old")
    with pytest.raises(OSError):
        with atomic.replacing_dir(out) as d:
            (d / "a").write_text("new")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (out / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["export", "record.json"]
    with atomic.replacing_dir(out) as d:
        (d / "b").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["b"]  # replaced whole, nothing of the old one kept

    (tmp_path / ".export.tmp-99999").mkdir()
    (tmp_path / ".record.json.tmp-99999").write_text("{")
    atomic.sweep(tmp_path, "export")
    assert not (tmp_path / ".export.tmp-99999").exists() and (tmp_path / ".record.json.tmp-99999").exists()
    atomic.sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "record.json"]
