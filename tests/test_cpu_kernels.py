"""The base model's linear layers on oneDNN (eval/cpu_kernels.py, `eval.cpu_kernels=onednn`): the same
logits to float32 rounding, the same greedy tokens, and speculative decoding on the swapped model
lossless against plain decoding on it, token for token, batched and ragged; and `auto`, which times both
kernels on the model and keeps the faster.

    python -m pytest tests/test_cpu_kernels.py -q
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eval.cpu_kernels import (apply_cpu_kernels, faster_kernel, onednn_available, onednn_problem,
                               use_onednn_linears, use_stock_linears)
from eval.decoder import plain_greedy
from eval.speculative import SpeculativeDecoder
from pipeline.config import ConfigError, load_config
from tests.test_decoder import MAX_NEW, TableDrafter, make_prompts, ragged_eos_case, random_drafter, seen_bigram_table
from tests.test_tree import single_thread, tiny_llama  # noqa: F401  (single_thread: autouse fixture)

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@torch.no_grad()
def test_onednn_linears_compute_the_same_model():
    stock, swapped = tiny_llama("sdpa"), tiny_llama("sdpa")  # same seed: the same weights
    linears = sum(isinstance(m, nn.Linear) for m in swapped.modules())
    assert apply_cpu_kernels(swapped, "onednn") == {"kernels": "onednn", "swapped": linears} and linears > 0
    assert use_onednn_linears(swapped) == 0  # once is enough
    assert sum(isinstance(m, nn.Linear) for m in swapped.modules()) == linears  # still nn.Linear, dense weights
    assert swapped.lm_head.weight is swapped.get_output_embeddings().weight
    ids = torch.randint(3, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    a, b = stock(ids).logits, swapped(ids).logits
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert apply_cpu_kernels(stock, "stock")["swapped"] == 0 and not hasattr(stock.lm_head, "_onednn_weight")

    # the kernel really runs: a changed reordered copy changes the output
    swapped.lm_head._onednn_weight = torch.zeros_like(swapped.lm_head.weight).to_mkldnn()
    assert swapped(ids).logits.abs().max() == 0


@torch.no_grad()
def test_speculative_decoding_on_onednn_linears_is_lossless():
    model = tiny_llama("sdpa")
    prompts = make_prompts(12, seed=1)
    stock_tokens = plain_greedy(model, prompts, MAX_NEW, None).tokens
    apply_cpu_kernels(model, "onednn")
    free, eos, reference = ragged_eos_case(model, prompts)
    assert free == stock_tokens  # the tiny model's greedy text is unchanged by the kernel
    for drafter in (random_drafter(model), TableDrafter(seen_bigram_table(prompts, free))):
        decoder = SpeculativeDecoder(model, drafter, beam_width=3, beam_length=4)
        for i in range(0, len(prompts), 4):
            assert decoder.generate(prompts[i:i + 4], MAX_NEW, eos).tokens == reference[i:i + 4]


def test_onednn_refuses_what_it_does_not_run():
    bf16 = tiny_llama("sdpa").to(torch.bfloat16)
    assert "float32" in onednn_available(bf16)
    assert "CPU kernel" in onednn_problem("cuda", "float32", False) and onednn_problem("cpu", "float32", False) is None
    with pytest.raises(ValueError, match="eval.cpu_kernels=onednn: the model is bfloat16"):
        apply_cpu_kernels(bf16, "onednn")
    with pytest.raises(ValueError, match="choose one of stock, onednn"):
        apply_cpu_kernels(bf16, "mkl")
    for bad in (["eval.dtype=bfloat16"], ["eval.compile=default"], ["eval.device=cuda"]):
        with pytest.raises(ConfigError, match="onednn is a float32 CPU kernel"):
            load_config(["recipe=smollm2", "eval.cpu_kernels=onednn", *bad])
    assert load_config(["recipe=tiny", "eval.cpu_kernels=onednn"]).eval.cpu_kernels == "onednn"


def _swapped(model) -> int:
    return sum("forward" in vars(m) for m in model.modules() if isinstance(m, nn.Linear))


@torch.no_grad()
def test_stock_linears_undo_the_swap():
    model, stock = tiny_llama("sdpa"), tiny_llama("sdpa")
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    linears = apply_cpu_kernels(model, "onednn")["swapped"]
    assert use_stock_linears(model, keep=True) == linears and _swapped(model) == 0
    assert hasattr(model.lm_head, "_onednn_weight")  # kept: swapping back costs no reorder
    model.lm_head._onednn_weight = torch.zeros_like(model.lm_head.weight).to_mkldnn()
    assert torch.equal(model(ids).logits, stock(ids).logits)  # torch's own forward again, bit for bit
    assert use_onednn_linears(model) == linears and model(ids).logits.abs().max() == 0  # the kept copy runs
    assert use_stock_linears(model) == linears and not hasattr(model.lm_head, "_onednn_weight")


def test_faster_kernel_is_the_cheaper_sum():
    assert faster_kernel({"stock": {"1": 40.0, "4": 63.0}, "onednn": {"1": 31.0, "4": 35.0}}) == "onednn"
    assert faster_kernel({"stock": {"1": 40.0, "4": 63.0}, "onednn": {"1": 62.0, "4": 77.0}}) == "stock"
    # the sum, not the 1-token forward alone: a speculative step is one of the larger shapes
    assert faster_kernel({"stock": {"1": 30.0, "4": 60.0}, "onednn": {"1": 33.0, "4": 40.0}}) == "onednn"


@torch.no_grad()
def test_auto_times_both_kernels_and_keeps_the_faster():
    # the config keeps auto: the eval decides on the machine it runs on, and records what it chose
    assert load_config(["recipe=tiny"]).eval.cpu_kernels == "auto"
    assert load_config(["recipe=smollm2"]).eval.cpu_kernels == "auto"
    model, stock = tiny_llama("sdpa"), tiny_llama("sdpa")
    got = apply_cpu_kernels(model, "auto")
    ms = got["auto"]["forward_ms"]
    assert set(ms) == {"stock", "onednn"} and all(set(v) == {"1", "2", "3", "4", "5", "6", "8"} for v in ms.values())
    assert all(t > 0 for v in ms.values() for t in v.values())
    assert got["kernels"] == faster_kernel(ms) == got["auto"]["kernels"]
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    # the model runs what was chosen, and holds reordered copies only when oneDNN was
    assert got["swapped"] == _swapped(model) == (linears if got["kernels"] == "onednn" else 0)
    assert hasattr(model.lm_head, "_onednn_weight") == (got["kernels"] == "onednn")
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(ids).logits, stock(ids).logits, atol=1e-4, rtol=1e-4)
    # where oneDNN cannot run the model, stock without timing anything
    assert apply_cpu_kernels(tiny_llama("sdpa").to(torch.bfloat16), "auto") == {"kernels": "stock", "swapped": 0}
