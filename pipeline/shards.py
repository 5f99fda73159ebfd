"""Teacher data on disk: parquet shards, one row per regenerated sequence (schema version 1).

Row layout (n = number of stored positions; position j is absolute position prompt_len - 1 + j):
    prompt_id      string
    prompt_len     int32     tokens in the prompt
    tokens         list<int32> [n]     tokens[0] = last prompt token, tokens[1:] = the response
    hidden         binary   [n, H]     base model's last-layer hidden state AFTER the final norm
    topk_ids       binary   [n, k]     int32, teacher's top-k next-token ids at position j (sorted, best first)
    topk_logprobs  binary   [n, k]     float32, their log-probs
    tail_logprob   binary   [n]        float32, log of the probability mass outside the top-k
Binary columns are raw little-endian arrays; H, k and the hidden dtype are in the manifest.
Files are written to a temporary name and renamed, so a shard either exists whole or not at all.

Hidden-state storage (`teacher.hidden_dtype`), bytes per position:
    float32       4H
    float16       2H
    bfloat16      2H    the upper half of each float32, rounded to nearest even (shards written before
                        this format held 4H bytes of float32; both are read, told apart by their size)
    float8_e4m3   H + 4 a float32 scale per position (max |h| / 448), then H e4m3 bytes of h / scale
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import atomic

SCHEMA_VERSION = 1
HIDDEN_DTYPES = ("float16", "bfloat16", "float32", "float8_e4m3")
E4M3_MAX = 448.0


def hidden_bytes_per_position(hidden_size: int, hidden_dtype: str) -> int:
    return {"float32": 4 * hidden_size, "float16": 2 * hidden_size, "bfloat16": 2 * hidden_size,
            "float8_e4m3": hidden_size + 4}[hidden_dtype]


def encode_hidden(hidden: np.ndarray, hidden_dtype: str) -> bytes:
    """[n, H] float hidden states -> the stored bytes (layouts in the module docstring)."""
    import torch

    h = torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32))
    if hidden_dtype == "float32":
        return h.numpy().tobytes()
    if hidden_dtype == "float16":
        return h.half().numpy().tobytes()
    if hidden_dtype == "bfloat16":
        return h.bfloat16().view(torch.int16).numpy().tobytes()
    if hidden_dtype == "float8_e4m3":
        scale = (h.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        q = (h / scale).to(torch.float8_e4m3fn).view(torch.uint8)
        return scale.numpy().tobytes() + q.numpy().tobytes()
    raise ValueError(f"unknown hidden dtype {hidden_dtype!r}; one of {', '.join(HIDDEN_DTYPES)}")


def decode_hidden(data: bytes, n: int, hidden_size: int, hidden_dtype: str) -> np.ndarray:
    """The stored bytes -> [n, H] hidden states (float16 stays float16; the others come back as float32)."""
    import torch

    if hidden_dtype == "float16":
        return np.frombuffer(data, dtype=np.float16).reshape(n, hidden_size)
    if hidden_dtype == "float32" or (hidden_dtype == "bfloat16" and len(data) == 4 * n * hidden_size):
        return np.frombuffer(data, dtype=np.float32).reshape(n, hidden_size)  # (older bf16 shards: float32)
    if hidden_dtype == "bfloat16":
        raw = torch.from_numpy(np.frombuffer(data, dtype=np.int16).copy()).view(torch.bfloat16)
        return raw.float().numpy().reshape(n, hidden_size)
    if hidden_dtype == "float8_e4m3":
        scale = np.frombuffer(data[:4 * n], dtype=np.float32).reshape(n, 1)
        q = torch.from_numpy(np.frombuffer(data[4 * n:], dtype=np.uint8).copy()).view(torch.float8_e4m3fn)
        return q.float().numpy().reshape(n, hidden_size) * scale
    raise ValueError(f"unknown hidden dtype {hidden_dtype!r}; one of {', '.join(HIDDEN_DTYPES)}")

SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt_len", pa.int32()),
    ("tokens", pa.list_(pa.int32())),
    ("hidden", pa.binary()),
    ("topk_ids", pa.binary()),
    ("topk_logprobs", pa.binary()),
    ("tail_logprob", pa.binary()),
])


@dataclass
class TeacherSequence:
    prompt_id: str
    prompt_len: int
    tokens: np.ndarray  # int32 [n]
    hidden: np.ndarray  # [n, H]
    topk_ids: np.ndarray  # int32 [n, k]
    topk_logprobs: np.ndarray  # float32 [n, k]
    tail_logprob: np.ndarray  # float32 [n]

    def __post_init__(self):
        n = len(self.tokens)
        assert self.hidden.shape[0] == n and self.topk_ids.shape[0] == n, "ragged teacher record"
        assert self.topk_logprobs.shape == self.topk_ids.shape and self.tail_logprob.shape == (n,)


def write_shard(seqs: list[TeacherSequence], path: str | Path, hidden_dtype: str = "float16") -> None:
    table = pa.table({
        "prompt_id": [s.prompt_id for s in seqs],
        "prompt_len": np.array([s.prompt_len for s in seqs], dtype=np.int32),
        "tokens": [s.tokens.astype(np.int32) for s in seqs],
        "hidden": [encode_hidden(s.hidden, hidden_dtype) for s in seqs],
        "topk_ids": [np.ascontiguousarray(s.topk_ids, dtype=np.int32).tobytes() for s in seqs],
        "topk_logprobs": [np.ascontiguousarray(s.topk_logprobs, dtype=np.float32).tobytes() for s in seqs],
        "tail_logprob": [np.ascontiguousarray(s.tail_logprob, dtype=np.float32).tobytes() for s in seqs],
    }, schema=SCHEMA)
    # e.g. a full disk: no partial file stays behind (a killed writer's is swept when the stage starts)
    with atomic.replacing(Path(path)) as tmp:
        pq.write_table(table, tmp)


def decode_row(row: dict, hidden_size: int, top_k: int, hidden_dtype: str = "float16") -> TeacherSequence:
    """One parquet row (as a dict of python/numpy values) -> arrays."""
    tokens = np.asarray(row["tokens"], dtype=np.int32)
    n = len(tokens)
    return TeacherSequence(
        prompt_id=str(row["prompt_id"]),
        prompt_len=int(row["prompt_len"]),
        tokens=tokens,
        hidden=decode_hidden(row["hidden"], n, hidden_size, hidden_dtype),
        topk_ids=np.frombuffer(row["topk_ids"], dtype=np.int32).reshape(n, top_k),
        topk_logprobs=np.frombuffer(row["topk_logprobs"], dtype=np.float32).reshape(n, top_k),
        tail_logprob=np.frombuffer(row["tail_logprob"], dtype=np.float32).reshape(n),
    )


def read_shard(path: str | Path, hidden_size: int, top_k: int, hidden_dtype: str = "float16") -> list[TeacherSequence]:
    """The shard's sequences; a NaN or infinite hidden state or log-prob (a base model that overflowed in
    its dtype, or a damaged writer) is refused by name rather than trained on."""
    table = pq.read_table(path, schema=SCHEMA)
    seqs = [decode_row(r, hidden_size, top_k, hidden_dtype) for r in table.to_pylist()]
    for i, s in enumerate(seqs):
        problem = non_finite(s)
        if problem:
            raise ValueError(f"{path}: row {i} (prompt {s.prompt_id!r}) has {problem}; regenerate the teacher "
                             "data (delete the shard and rerun: only it is regenerated) with model.dtype=float32 or "
                             "bfloat16")
    return seqs


def non_finite(seq: TeacherSequence) -> str | None:
    """What is not finite in a teacher record (None when all is well). The tail log-prob may be -inf
    (no mass outside the top-k); nothing else may."""
    if not np.isfinite(seq.hidden).all():
        return "non-finite hidden states"
    if not np.isfinite(seq.topk_logprobs).all():
        return "non-finite top-k log-probs"
    if np.isnan(seq.tail_logprob).any() or np.isposinf(seq.tail_logprob).any():
        return "a NaN or +inf tail log-prob"
    return None
