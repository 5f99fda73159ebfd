"""Experiment tracking: a thin layer over W&B, plus a no-op stand-in with the same surface.

    run = open_run(cfg.tracking, run_dir, name="tiny-train", job_type="train", group="tiny", config={...})
    run.log({"train/loss": 1.2}, step=10); run.summary["heldout/top1_1"] = 0.4
    log_artifact(run, export_dir, name="drafter", type="model", aliases=["candidate"], metadata={...})
    run.finish()

Modes (tracking.mode): "offline" (default: files under <run_dir>/wandb, never the network, sync later
with `wandb sync <run_dir>/wandb/offline-run-*`), "online", "disabled" (a NullRun). Non-zero ranks
get a NullRun too, so training code logs unconditionally.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import TrackingConfig

MODES = ("offline", "online", "disabled")


class NullRun:
    """What open_run returns when nothing should be recorded: every call is accepted and dropped."""

    dir = None  # no files on disk

    def __init__(self):
        self.summary: dict = {}
        self.config: dict = {}

    def log(self, data: dict, step: int | None = None, commit: bool | None = None) -> None:
        pass

    def log_artifact(self, artifact, name: str | None = None, type: str | None = None,
                     aliases: list[str] | None = None, **kwargs) -> None:
        pass

    def finish(self, exit_code: int | None = None) -> None:
        pass


def online_credentials_problem(cfg: TrackingConfig) -> str | None:
    """tracking.mode=online needs W&B credentials: WANDB_API_KEY, or a `wandb login` entry in ~/.netrc
    (or $NETRC) for the W&B host. Without them wandb.init would fail (or wait for a login) only when the
    first stage has finished, so the pipeline checks before any work and refuses (it does not fall back to
    offline silently: a user who asked for live runs should know they are not getting them)."""
    if cfg.mode != "online" or os.environ.get("WANDB_API_KEY"):
        return None
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if path.is_file() and netrc.netrc(str(path)).authenticators(host):
            return None
    except (netrc.NetrcParseError, OSError):
        pass
    return (f"tracking.mode=online but no W&B credentials were found (no WANDB_API_KEY, no {host} entry in {path}): "
            "run `wandb login` or export WANDB_API_KEY, or set tracking.mode=offline to record the runs locally and "
            "upload them later with `wandb sync`")


def _quiet_env(mode: str) -> None:
    """No login prompt, no banner, and in offline mode nothing that could reach the network."""
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    if mode == "offline":
        os.environ["WANDB_DISABLE_CODE"] = "true"


def open_run(cfg: TrackingConfig, run_dir: Path, name: str, job_type: str, group: str, config: dict):
    """A W&B run writing under <run_dir>/wandb (mode from cfg), or a NullRun when mode is disabled."""
    if cfg.mode not in MODES:
        raise ValueError(f"tracking.mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.mode == "disabled":
        return NullRun()
    _quiet_env(cfg.mode)
    import wandb

    run_dir = Path(run_dir)
    (run_dir / "wandb").mkdir(parents=True, exist_ok=True)  # wandb.init(dir=X) writes into X/wandb
    return wandb.init(project=cfg.project, entity=cfg.entity or None, dir=str(run_dir), name=name,
                      job_type=job_type, group=group or None, config=config, mode=cfg.mode,
                      reinit="create_new",  # a driver may hold its own run while a stage opens one
                      settings=wandb.Settings(silent=True, console="off"))


def log_artifact(run, path: str | Path, name: str, type: str, aliases: list[str] | None = None,
                 metadata: dict | None = None):
    """Log a file or a directory as a W&B artifact with aliases; a no-op (None) for a NullRun."""
    if isinstance(run, NullRun):
        return None
    import wandb

    path = Path(path)
    if not path.exists():
        raise ValueError(f"cannot log artifact {name!r}: {path} does not exist")
    artifact = wandb.Artifact(name=name, type=type, metadata=metadata or {})
    if path.is_dir():
        artifact.add_dir(str(path))
    else:
        artifact.add_file(str(path))
    return run.log_artifact(artifact, aliases=list(aliases or []))


def read_offline_run(run_path: str | Path, wait_s: float = 30.0) -> dict:
    """What an offline run recorded, read back from its transaction log (`run-<id>.wandb`):
    {"history": [{key: value, "_step": n}, ...], "summary": {key: value}, "artifacts": [{name, type, aliases}],
     "group", "job_type", "name"}.

    wandb >= 0.2x (wandb-core) writes no files/wandb-summary.json for offline runs; everything is in
    this log, a LevelDB-style record log (32 KiB blocks, 7-byte record headers) of protobuf Records.

    `run.finish()` returns before the W&B service has flushed the log (it is written by another
    process, and closed after finish tells the service the run is done), so a log read in the same
    process right after finish can be partial. A finished run's log ends with its exit record: this
    waits up to `wait_s` seconds for it and raises if it never comes (a run still going, or killed)."""
    import time

    run_path = Path(run_path)
    logs = [run_path] if run_path.is_file() else sorted(run_path.glob("run-*.wandb"))
    if not logs:
        raise ValueError(f"no W&B transaction log (run-*.wandb) in {run_path}")
    deadline = time.monotonic() + wait_s
    while True:
        out = _parse_transaction_log(logs[0].read_bytes())
        if out.pop("exited"):
            return out
        if time.monotonic() > deadline:
            raise ValueError(f"{logs[0]} holds no exit record after {wait_s:.0f} s: the run has not finished "
                             "(still running, or killed before wandb finished it)")
        time.sleep(0.1)


def _parse_transaction_log(data: bytes) -> dict:
    """The records of a (possibly still growing) transaction log; a torn last record is left out."""
    import json

    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict = {"history": [], "summary": {}, "artifacts": [], "group": "", "job_type": "", "name": "",
                 "exited": False}
    pos, block, pending = 7, 32768, b""  # 7 = header ":W&B" + magic (2 bytes) + version (1 byte)
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if pos > len(data):  # the writer is mid-record
            break
        if kind == 0 and length == 0:  # zero padding
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (2, 3):
            continue
        rec = pb.Record()
        try:
            rec.ParseFromString(pending)
        except DecodeError:
            break
        which = rec.WhichOneof("record_type")
        out["exited"] |= which == "exit"
        if which == "run":  # a later run record (an update) may leave fields empty: keep what was set
            found = {"group": rec.run.run_group, "job_type": rec.run.job_type, "name": rec.run.display_name}
            out.update({k: v for k, v in found.items() if v})
        elif which == "history":
            row = {it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in rec.history.item}
            out["history"].append(row)
        elif which == "summary":
            for it in rec.summary.update:
                out["summary"][it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
        elif which == "artifact":
            out["artifacts"].append({"name": rec.artifact.name, "type": rec.artifact.type,
                                     "aliases": list(rec.artifact.aliases)})
    return out
