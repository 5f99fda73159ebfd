"""The base model's linear layers on oneDNN with weights reordered once (`eval.cpu_kernels=onednn`).

On a CPU a decoding step is a few rows through every linear layer. The stock float32 path (MKL's
gemv for one row, its sgemm for several) streams the row-major weight on every call, and for 2 to 8
rows the sgemm path cost about 1.6x the 1-row one on this repo's AMD EPYC (docs/design.md §3.8).
oneDNN's linear on a weight reordered once into its blocked layout read the same weights faster
at every row count: a SmolLM2-135M forward took 31 ms for one token instead of 40, and 36 ms for five
instead of 55 (`python -m eval.forward_cost --cpu-kernels onednn`).

`use_onednn_linears` swaps the forward of every `nn.Linear` of the model for that kernel, in place:
the modules stay `nn.Linear` with their dense weights (tied embeddings, parameter counts and the
output embedding keep working), and each holds a reordered copy beside them, so the model's weights
take twice the memory. Every decoding method of the eval runs through the same swapped layers, plain
decoding included, so speedups compare like with like, and the lossless check compares the
speculative output with plain decoding on that same model.
"""

from __future__ import annotations

import types

import torch
from torch import nn

KERNELS = ("stock", "onednn", "auto")


def _onednn_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    lead = x.shape[:-1]
    rows = x.reshape(-1, self.in_features).contiguous().to_mkldnn()
    y = torch._C._nn.mkldnn_linear(rows, self._onednn_weight, self._onednn_bias).to_dense()
    return y.reshape(*lead, self.out_features)


def onednn_available(model) -> str | None:
    """None when `use_onednn_linears` can run on this model, else why not."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (torch.backends.mkldnn)"
    if model.device.type != "cpu":
        return f"the model is on {model.device.type}, oneDNN linears are a CPU kernel"
    if model.dtype != torch.float32:
        return f"the model is {model.dtype}; the oneDNN path here is float32"
    if getattr(model.model.forward, "_draftforge_compiled", None):  # eval/decoder.py compile_base
        return "the model is torch.compiled; oneDNN linears are for the eager model"
    return None


@torch.no_grad()
def use_onednn_linears(model) -> int:
    """Run every nn.Linear of `model` through oneDNN on a weight reordered once; returns how many.
    Idempotent; raises ValueError where the model cannot (see onednn_available). Inference only: the
    reordered copies do not follow later changes to the weights, and carry no gradient."""
    why = onednn_available(model)
    if why:
        raise ValueError(f"eval.cpu_kernels=onednn: {why}")
    swapped = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and not hasattr(module, "_onednn_weight"):
            module._onednn_weight = module.weight.detach().contiguous().to_mkldnn()
            module._onednn_bias = None if module.bias is None else module.bias.detach().contiguous().to_mkldnn()
            module.forward = types.MethodType(_onednn_forward, module)
            swapped += 1
    return swapped


def apply_cpu_kernels(model, kernels: str) -> int:
    """`eval.cpu_kernels` on a loaded base model: "stock" leaves it as it is, "onednn" swaps its linear
    layers (use_onednn_linears), "auto" swaps them where oneDNN can run this model (a config loaded by
    pipeline.config has already resolved auto). Returns the number of layers swapped."""
    if kernels not in KERNELS:
        raise ValueError(f"eval.cpu_kernels={kernels!r}; choose one of {', '.join(KERNELS)}")
    if kernels == "auto":
        kernels = "stock" if onednn_available(model) else "onednn"
    return use_onednn_linears(model) if kernels == "onednn" else 0
