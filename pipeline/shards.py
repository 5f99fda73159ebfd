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
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
NP_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.float32}  # bf16 stored as f32

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
    np_dtype = NP_DTYPES[hidden_dtype]
    table = pa.table({
        "prompt_id": [s.prompt_id for s in seqs],
        "prompt_len": np.array([s.prompt_len for s in seqs], dtype=np.int32),
        "tokens": [s.tokens.astype(np.int32) for s in seqs],
        "hidden": [np.ascontiguousarray(s.hidden, dtype=np_dtype).tobytes() for s in seqs],
        "topk_ids": [np.ascontiguousarray(s.topk_ids, dtype=np.int32).tobytes() for s in seqs],
        "topk_logprobs": [np.ascontiguousarray(s.topk_logprobs, dtype=np.float32).tobytes() for s in seqs],
        "tail_logprob": [np.ascontiguousarray(s.tail_logprob, dtype=np.float32).tobytes() for s in seqs],
    }, schema=SCHEMA)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
    except BaseException:  # e.g. a full disk: no partial file stays behind (a killed writer's is swept at start)
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def decode_row(row: dict, hidden_size: int, top_k: int, hidden_dtype: str = "float16") -> TeacherSequence:
    """One parquet row (as a dict of python/numpy values) -> arrays."""
    tokens = np.asarray(row["tokens"], dtype=np.int32)
    n = len(tokens)
    return TeacherSequence(
        prompt_id=str(row["prompt_id"]),
        prompt_len=int(row["prompt_len"]),
        tokens=tokens,
        hidden=np.frombuffer(row["hidden"], dtype=NP_DTYPES[hidden_dtype]).reshape(n, hidden_size),
        topk_ids=np.frombuffer(row["topk_ids"], dtype=np.int32).reshape(n, top_k),
        topk_logprobs=np.frombuffer(row["topk_logprobs"], dtype=np.float32).reshape(n, top_k),
        tail_logprob=np.frombuffer(row["tail_logprob"], dtype=np.float32).reshape(n),
    )


def read_shard(path: str | Path, hidden_size: int, top_k: int, hidden_dtype: str = "float16") -> list[TeacherSequence]:
    table = pq.read_table(path, schema=SCHEMA)
    return [decode_row(r, hidden_size, top_k, hidden_dtype) for r in table.to_pylist()]
