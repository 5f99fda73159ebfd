"""End to end: a real two-node Ray cluster on this machine (`ray start --head` plus `ray start
--address=...`, one CPU each), then `launch/submit.sh` (`ray job submit`) runs
`python -m pipeline.main recipe=tiny`, scaled down by overrides, through real Ray Data, Ray Train,
DeepSpeed and W&B (offline). Ray's state API must show teacher actors and training workers on both
nodes (one CPU per node forces the spread); the run directory is on storage both nodes see. The first
submission is stopped with `ray job stop` mid-teacher; the same submission again resumes it.

    python -m pytest tests/test_e2e.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.main import free_port
from pipeline.tracking import read_offline_run

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

SCALED_DOWN = [
    "recipe=tiny", "run.name=e2e",
    "data.train.limit=24", "teacher.max_new_tokens=48", "teacher.shard_size=2", "teacher.batch_size=2",
    "train.epochs=1", "train.batch_size=4", "train.log_every=2", "train.checkpoint_every=3",
    "eval.num_prompts=3", "eval.max_new_tokens=24", "eval.repeats=1",
]
SHARDS = 12  # 24 prompts, 2 per shard: small shards, so that `ray job stop` lands while some are pending


@pytest.fixture(scope="module")
def ray_cluster():
    """A real two-node Ray cluster on this machine: a head and a second node joined with
    `ray start --address`, one CPU each; afterwards its processes, and only those, are stopped."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    dash, gcs = free_port(), free_port()
    # Each node's job agent gets a port of its own: on Ray's fixed default (52365) another Ray cluster on this
    # machine (a developer's, another test's) holds it, and every submission fails "No available agent".
    # Ray's sockets live in each node's temp dir and a socket path has at most 107 bytes: short dirs in /tmp,
    # not pytest's deeper ones
    head, node2 = (Path(tempfile.mkdtemp(prefix=f"df-{name}-")) for name in ("head", "node2"))
    try:
        start = subprocess.run(
            [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=1", f"--temp-dir={head}",
             f"--dashboard-agent-listen-port={free_port()}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats"],
            env=env, capture_output=True, text=True, timeout=180,
        )
        assert start.returncode == 0, start.stdout + start.stderr
        # Ray >= 2.5x: the head made a token (~/.ray/auth_token); a joining node must present it
        token = os.path.isfile(os.path.expanduser("~/.ray/auth_token"))
        # node 2 has its own temp dir, as a second machine would have: two nodes unpacking the job's
        # working_dir into one shared temp dir would delete each other's copy
        join = subprocess.run(
            [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1", "--disable-usage-stats",
             f"--temp-dir={node2}", f"--dashboard-agent-listen-port={free_port()}"],
            env={**env, "RAY_AUTH_MODE": "token"} if token else env, capture_output=True, text=True, timeout=180,
        )
        assert join.returncode == 0, join.stdout + join.stderr
        # the clients (job submit/stop, the state API) present the token too
        yield {**env, "RAY_ADDRESS": f"http://127.0.0.1:{dash}", **({"RAY_AUTH_MODE": "token"} if token else {})}
    finally:
        stop_cluster([head, node2], gcs)
        for d in (head, node2):
            shutil.rmtree(d, ignore_errors=True)


def stop_cluster(temp_dirs: list[Path], gcs_port: int, grace_s: float = 2.0) -> None:
    """Stop the processes of one `ray start` cluster and only those: `ray stop` would stop every Ray process
    on the machine, the local clusters of tests running beside this one included. A cluster's processes
    name its temp dirs or its GCS port on their command lines; the processes they started go with them.
    SIGTERM, then SIGKILL after `grace_s` (as `ray stop --force`): the raylets, the GCS, the monitor and the
    runtime-env agents were all still up 10 s after SIGTERM, so a longer grace only made the teardown wait."""
    import psutil

    dirs = [str(d) for d in temp_dirs]

    def ours(args: list[str]) -> bool:
        return any(d in a for a in args for d in dirs) or any(a.endswith((f":{gcs_port}", f"={gcs_port}"))
                                                             for a in args)

    roots = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid() and ours(p.info["cmdline"] or [])]
    procs = {p.pid: p for p in roots}
    for root in roots:
        try:
            procs.update({c.pid: c for c in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for proc in procs.values():
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


STATE = """
import json, os
from ray.util.state import list_actors, list_nodes
address = os.environ["RAY_ADDRESS"]
nodes = [n.node_id for n in list_nodes(address=address, filters=[("state", "=", "ALIVE")])]
actors = [{"class_name": a.class_name, "node_id": a.node_id} for a in list_actors(address=address, limit=10000)]
print(json.dumps({"nodes": nodes, "actors": actors}))
"""


def _placement(env: dict) -> dict:
    """{"nodes": alive node ids, "actors": [{class_name, node_id}]} from Ray's state API (finished actors too)."""
    done = subprocess.run([sys.executable, "-c", STATE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_submission(cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """Run a `ray job submit` command; a freshly started cluster can answer "No available agent to submit
    job, please try again later" for a few seconds: then try again (nothing was submitted)."""
    import time

    deadline = time.time() + 60
    while True:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in proc.stdout + proc.stderr or time.time() > deadline:
            return proc
        time.sleep(1)


def _submit(env: dict, out: Path, overrides: list[str] | None = None) -> str:
    proc = _run_submission(
        ["bash", str(REPO / "launch" / "submit.sh"), *(overrides or [*SCALED_DOWN, f"run.output_dir={out}"])],
        env, timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "succeeded" in log.lower(), log[-6000:]
    return log


@pytest.mark.e2e
def test_tiny_pipeline_through_ray_job_submit_stopped_mid_teacher_then_resumed(ray_cluster, tmp_path):
    """The whole pipeline through `ray job submit` on two nodes, interrupted the way a user interrupts it:
    `ray job stop` while the teacher stage runs (Ray sends the driver SIGTERM). The job stops, the run
    directory records the teacher stage as interrupted, and submitting the same command again keeps
    every shard journaled before the stop (same inode, same bytes), finishes the rest and runs every
    later stage. (One test, not two: each submission costs a driver, its actors and a Ray Train run.)"""
    import time

    env = ray_cluster
    overrides = [*SCALED_DOWN, f"run.output_dir={tmp_path}"]
    run = tmp_path / "e2e"
    job = f"draftforge-stop-{os.getpid()}"
    submitted = _run_submission(
        [str(BIN / "ray"), "job", "submit", "--no-wait", f"--submission-id={job}", "--working-dir", str(REPO),
         "--runtime-env-json", '{"excludes": ["outputs/", ".venv/", "venv/", "wandb/", ".git/"]}',
         "--", "python", "-m", "pipeline.main", *overrides],
        env, timeout=300)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    journal = run / "teacher" / "progress.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and (not journal.is_file() or len(journal.read_text().splitlines()) < 1):
        time.sleep(0.05)
    assert journal.is_file(), "the teacher stage never journaled a shard"
    stopped = subprocess.run([str(BIN / "ray"), "job", "stop", job], env=env, capture_output=True, text=True,
                             timeout=300)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    done = [json.loads(line)["name"] for line in journal.read_text().splitlines() if line.strip().endswith("}")]
    assert len(done) < SHARDS, "the teacher stage finished before the stop"
    shards = run / "teacher" / "shards"
    kept = {name: ((shards / name).stat().st_ino, (shards / name).read_bytes()) for name in done}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages"]["teacher"] == "interrupted", summary
    assert not (run / "train").exists()

    log = _submit(env, tmp_path, overrides=overrides)
    assert "stage teacher: will resume" in log, log[-3000:]
    assert "=== draftforge summary ===" in log

    # both nodes worked: the teacher actors and the training workers ran on each of them
    placement = _placement(env)
    assert len(placement["nodes"]) == 2, placement["nodes"]
    for kind in ("TeacherWorker", "RayTrainWorker"):
        used = {a["node_id"] for a in placement["actors"] if kind in a["class_name"]}
        assert used == set(placement["nodes"]), (kind, used, placement)

    # teacher: shards + manifest whose checksums hold; the shards journaled before the stop kept as they were
    manifest = json.loads((run / "teacher" / "manifest.json").read_text())
    assert manifest["num_sequences"] == 24 and len(manifest["shards"]) == SHARDS
    assert all((shards / s["name"]).is_file() for s in manifest["shards"])
    assert {name: ((shards / name).stat().st_ino, (shards / name).read_bytes()) for name in done} == kept

    # train: Ray Train checkpoints and the final drafter
    checkpoints = list((run / "train").rglob("checkpoint_*"))
    assert checkpoints, "no Ray Train checkpoint written"
    assert (run / "train" / "drafter" / "drafter.safetensors").is_file()

    # eval record with the spec's metrics, measured (not defaults)
    record = json.loads((run / "eval" / "eval_record.json").read_text())
    assert record["lossless"] is True
    assert 1.0 <= record["tokens_per_step"] <= record["beam_length"]
    assert record["plain_tokens_per_s"] > 0 and record["speedup"] > 0

    # gate: promoted or candidate, always with the reason and the reference-format drafter
    kind = "promoted" if (run / "export" / "promoted").exists() else "candidate"
    export = run / "export" / kind
    decision = json.loads((export / "decision.json").read_text())
    assert decision["promoted"] == (kind == "promoted") and decision["reason"]
    assert sorted(p.name for p in (export / "drafter").iterdir()) == ["config.json", "model.safetensors"]
    lineage = json.loads((export / "lineage.json").read_text())
    assert lineage["base_model_hash"] and lineage["teacher_manifest_hash"] and lineage["code_version"]

    # W&B offline runs: one group, one run per stage (the stopped teacher had not opened its run yet),
    # the eval as tables and the plot as an image
    runs = [read_offline_run(p.parent) for p in (run / "wandb").rglob("run-*.wandb")]
    assert sorted(r["job_type"] for r in runs) == ["eval", "teacher", "train"], runs
    assert {r["group"] for r in runs} == {run.name}
    keys = set().union(*(r["summary"] for r in runs)) if runs else set()
    assert "tokens_per_step" in keys and any(k.startswith("train/") for k in keys), keys
    logged = {k: v for r in runs for row in r["history"] for k, v in row.items()}
    assert logged["eval/methods/_type"] == "table-file" and logged["eval/by_category/_type"] == "table-file"
    assert logged["eval/plot/_type"] == "image-file" and logged["eval/methods/nrows"] >= 3
    aliases = {a for r in runs for art in r["artifacts"] for a in art["aliases"]}
    assert kind in aliases, aliases
    # (reuse of finished stages: tests/test_plan.py)
