"""Teacher shard storage (pipeline/shards.py): every hidden-state format round-trips within its
precision, takes the bytes it promises, and older bfloat16 shards (stored as float32) still read.

    python -m pytest tests/test_shards.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.shards import (HIDDEN_DTYPES, TeacherSequence, decode_hidden, encode_hidden, hidden_bytes_per_position,
                             read_shard, write_shard)

N, H, K = 7, 64, 4


def hidden(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((N, H)).astype(np.float32) * rng.uniform(0.01, 50, (N, 1)).astype(np.float32)
    h[0, :3] = [0.0, 1e-9, -1e-9]  # zeros and values far below the row's scale
    return h


@pytest.mark.parametrize("dtype", HIDDEN_DTYPES)
def test_round_trip_and_size(dtype):
    h = hidden()
    data = encode_hidden(h, dtype)
    assert len(data) == N * hidden_bytes_per_position(H, dtype)
    back = decode_hidden(data, N, H, dtype).astype(np.float32)
    rel_step = {"float32": 0.0, "float16": 2 ** -11, "bfloat16": 2 ** -8, "float8_e4m3": 2 ** -4}[dtype]
    row_scale = np.abs(h).max(axis=1, keepdims=True)
    # relative rounding of each value, plus (for fp8) the absolute step of the smallest subnormal at the row's scale
    bound = rel_step * np.abs(h) + (row_scale / 448 * 2 ** -9 if dtype == "float8_e4m3" else 1e-30)
    if dtype == "float16":
        bound = bound + 2 ** -24  # float16's own subnormal step
    assert np.all(np.abs(back - h) <= bound + 1e-12), (dtype, float(np.max(np.abs(back - h) - bound)))


def test_sizes_meet_the_compact_goals():
    """fp8 <= H + 400 bytes per token and bf16 <= 2H + 400 with the rest of a record at top-k 32."""
    rest = 4 + 8 * 32 + 4  # token id, top-32 ids + log-probs, tail
    assert hidden_bytes_per_position(576, "float8_e4m3") + rest <= 576 + 400
    assert hidden_bytes_per_position(576, "bfloat16") + rest <= 2 * 576 + 400


def test_shard_files_in_each_format_and_older_bfloat16_shards(tmp_path):
    h = hidden(1)
    seq = TeacherSequence(prompt_id="p", prompt_len=2, tokens=np.arange(N, dtype=np.int32), hidden=h,
                          topk_ids=np.zeros((N, K), np.int32), topk_logprobs=np.full((N, K), -2.0, np.float32),
                          tail_logprob=np.full(N, -3.0, np.float32))
    sizes = {}
    for dtype in HIDDEN_DTYPES:
        write_shard([seq], tmp_path / f"{dtype}.parquet", dtype)
        (back,) = read_shard(tmp_path / f"{dtype}.parquet", H, K, dtype)
        assert back.hidden.shape == (N, H) and np.allclose(back.hidden, h, rtol=0.07, atol=np.abs(h).max() / 448)
        sizes[dtype] = (tmp_path / f"{dtype}.parquet").stat().st_size
    assert sizes["float8_e4m3"] < sizes["bfloat16"] < sizes["float32"]
    # a bfloat16 shard from before the 2-byte format held float32: still read, recognised by its size
    write_shard([seq], tmp_path / "old.parquet", "float32")
    (old,) = read_shard(tmp_path / "old.parquet", H, K, "bfloat16")
    assert np.array_equal(old.hidden, h)
