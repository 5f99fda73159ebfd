"""Whole-or-absent writes: every file or directory that marks work as done (a teacher shard, a manifest,
a trained drafter, an eval record, an export, summary.json) is written beside its final path under a
hidden temporary name and renamed into place, so a kill or a full disk leaves the old state or the new
one, never half of either. A writer's temporary leftovers (`.<name>.tmp-<pid>`) are removed on error;
a killed writer's are swept by `sweep` when its stage starts again.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_sibling(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yields a temporary file path beside `path`; renamed onto `path` when the block succeeds,
    removed when it raises."""
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def replacing_dir(path: Path) -> Iterator[Path]:
    """Yields an empty temporary directory beside `path`; it replaces `path` (whole) when the block
    succeeds and is removed when it raises."""
    tmp = temp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj, **dumps_kwargs) -> None:
    write_text(path, json.dumps(obj, indent=2, **dumps_kwargs) + "\n")


def sweep(directory: Path, name: str = "*") -> None:
    """Remove the temporary leftovers of writers that died mid-write (of `name`, or of any file)."""
    for stale in Path(directory).glob(f".{name}.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
