"""Content hashes and code version: what ties a teacher shard, a checkpoint and an export together."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_dir(path: str | Path, suffixes: tuple[str, ...] = _WEIGHT_SUFFIXES, names: tuple[str, ...] = ()) -> str:
    """sha256 over (relative name, file hash) of the matching files, in sorted order."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        if names and p.name not in names:
            continue
        if not names and not p.name.endswith(suffixes):
            continue
        h.update(p.relative_to(root).as_posix().encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """Hash of the vocabulary and special tokens: two tokenizers with the same hash encode alike."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    return hash_json({"vocab": vocab, "special": special})


def code_version() -> str:
    """git commit of the checkout (with '+dirty' when it has changes), else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "draftforge " + version("draftforge")
    except PackageNotFoundError:
        return "unknown"


def hashed_settings(settings: dict, added_later: dict) -> dict:
    """`settings` as they enter a content hash. One rule for settings added after records were already made:
    at the value that reproduces the old behaviour (its entry in `added_later`) a setting hashes as absent,
    so teacher data, drafters and eval records made before it existed stay valid; any other value is hashed."""
    return {k: v for k, v in settings.items() if not (k in added_later and v == added_later[k])}


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts as {"a.b.c": leaf}."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def changed_keys(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The dotted keys whose leaves differ between two nested dicts (sorted), `ignore` aside."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in ignore)
