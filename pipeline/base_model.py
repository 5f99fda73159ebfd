"""Loading the frozen base model and its tokenizer, with errors a user can act on."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.config import ModelConfig
from pipeline.gguf import converted_dir, gguf_source, is_gguf
from pipeline.lineage import hash_dir

REPO_ROOT = Path(__file__).resolve().parent.parent

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(cfg: ModelConfig) -> str:
    """A local directory (absolute, or relative to the cwd or to the repo), the cached HF conversion of a
    GGUF (pipeline/gguf.py: converted on first use), or a hub name, as is."""
    name = cfg.base_model
    if is_gguf(name):
        return str(converted_dir(name, cfg.cache_dir, search_dirs=(REPO_ROOT,)))
    for candidate in (Path(name), REPO_ROOT / name):
        if candidate.is_dir():
            return str(candidate.resolve())
    return name


def _missing_model_error(name: str, err: Exception) -> ValueError:
    return ValueError(
        f"cannot load base model {name!r}: {err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
        "  It is neither a local model directory nor a hub model available in the local cache. "
        "On a cluster, pre-download it (huggingface-cli download NAME) or point model.base_model at a "
        "directory holding config.json, the weights and the tokenizer."
    )


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg)
    try:
        return AutoTokenizer.from_pretrained(path, revision=cfg.revision or None,
                                             trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _missing_model_error(cfg.base_model, e) from e


def load_base_model(cfg: ModelConfig, device: str = "cpu", dtype: str | None = None, device_map=None):
    """(model, tokenizer), model frozen in eval mode. `device_map` (e.g. "auto") shards one replica
    over the visible GPUs; otherwise the model goes to `device`."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg)
    torch_dtype = DTYPES[dtype or cfg.dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=cfg.revision or None, dtype=torch_dtype, device_map=device_map,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise _missing_model_error(cfg.base_model, e) from e
    if device_map is None:
        model.to(device)
    model.eval().requires_grad_(False)
    tokenizer = load_tokenizer(cfg)
    check_vocab(tokenizer, model.config.vocab_size, cfg.base_model)
    return model, tokenizer


def check_vocab(tokenizer, vocab_size: int, what: str) -> None:
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer of {what!r} has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{vocab_size}: tokenizer and model do not belong together")


def base_model_fingerprint(cfg: ModelConfig) -> str:
    """Content hash of the base model's files (local dir or the hub cache's snapshot). A converted GGUF
    is the hash of its converted files (checked when it was resolved), not of the absolute GGUF path
    its source.json also records."""
    path = Path(resolve_model_path(cfg))
    source = gguf_source(path)
    if source is not None:
        return source["converted_hash"]
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(cfg.base_model, revision=cfg.revision or None, local_files_only=True))
        except Exception as e:  # noqa: BLE001 - any failure here means "not available locally"
            raise _missing_model_error(cfg.base_model, e) from e
    return hash_dir(path)


def read_tensors(model_dir: Path, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """{our name: tensor} for {our name: checkpoint name}, reading only those tensors from a local
    safetensors checkpoint (model.safetensors, or the files its model.safetensors.index.json names). A name
    the checkpoint lacks, or whose file is absent, is left out: the caller decides what that means."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    where = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
    by_file: dict[str, dict[str, str]] = {}
    for ours, theirs in names.items():
        by_file.setdefault(where.get(theirs, "model.safetensors"), {})[ours] = theirs
    out = {}
    for file, wanted in by_file.items():
        if not (model_dir / file).is_file():
            continue
        with safe_open(str(model_dir / file), "pt") as f:
            keys = set(f.keys())
            for ours, theirs in wanted.items():
                if theirs in keys:
                    out[ours] = f.get_tensor(theirs)
    return out


def input_embeddings(model) -> torch.Tensor:
    """The base model's (V, H) input embedding table, detached, on CPU (the drafter's frozen E)."""
    return model.get_input_embeddings().weight.detach().float().cpu()
