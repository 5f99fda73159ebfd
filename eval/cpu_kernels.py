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

Which kernel is faster depends on the CPU, so `auto` (the default) measures instead of assuming: on an
Intel Xeon with AMX the same oneDNN path cost 62 ms for one token where the stock one cost 40
(docs/design.md §3.8). `choose_kernels` times the decoder's verify forward at the query counts a step
uses, both kernels in interleaved rounds on the model as loaded, and keeps the faster.
"""

from __future__ import annotations

import statistics
import time
import types

import torch
from torch import nn

KERNELS = ("stock", "onednn", "auto")


def _onednn_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    lead = x.shape[:-1]
    rows = x.reshape(-1, self.in_features).contiguous().to_mkldnn()
    y = torch._C._nn.mkldnn_linear(rows, self._onednn_weight, self._onednn_bias).to_dense()
    return y.reshape(*lead, self.out_features)


def onednn_problem(device: str, dtype: str, compiled: bool) -> str | None:
    """None when oneDNN linears can run on a model on `device` in `dtype` (`compiled`: under torch.compile),
    else why not. The one statement of the conditions: for a loaded model (`onednn_available`) and for a
    config, before any work (pipeline/config.py)."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (torch.backends.mkldnn)"
    if device != "cpu":
        return f"the model is on {device}, oneDNN linears are a CPU kernel"
    if dtype != "float32":
        return f"the model is {dtype}; the oneDNN path here is float32"
    if compiled:
        return "the model is torch.compiled; oneDNN linears are for the eager model"
    return None


def onednn_available(model) -> str | None:
    """None when `use_onednn_linears` can run on this model, else why not."""
    return onednn_problem(model.device.type, str(model.dtype).removeprefix("torch."),
                          bool(getattr(model.model.forward, "_draftforge_compiled", None)))  # eval/decoder.py compile_base


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
        if isinstance(module, nn.Linear) and "forward" not in vars(module):
            if not hasattr(module, "_onednn_weight"):  # kept by use_stock_linears(keep=True)
                module._onednn_weight = module.weight.detach().contiguous().to_mkldnn()
                module._onednn_bias = None if module.bias is None else module.bias.detach().contiguous().to_mkldnn()
            module.forward = types.MethodType(_onednn_forward, module)
            swapped += 1
    return swapped


def use_stock_linears(model, keep: bool = False) -> int:
    """Undo use_onednn_linears: every nn.Linear back on torch's own forward; returns how many were swapped.
    keep=True keeps the reordered copies, so swapping back costs no reorder (choose_kernels)."""
    restored = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and "forward" in vars(module):
            del module.forward  # the instance attribute hid nn.Linear.forward
            restored += 1
        if not keep and isinstance(module, nn.Linear):
            for name in ("_onednn_weight", "_onednn_bias"):
                if hasattr(module, name):
                    delattr(module, name)
    return restored


def faster_kernel(ms: dict[str, dict[str, float]]) -> str:
    """The kernel whose verify forwards cost least in all: the sum over the timed query counts of the
    median milliseconds (a plain step is the 1-token forward, a speculative step one of the others)."""
    return min(ms, key=lambda k: sum(ms[k].values()))


@torch.inference_mode()
def choose_kernels(model, queries: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8), context: int = 200,
                   repeats: int = 5) -> dict:
    """Time the decoder's verify forward (eval/forward_cost.py) over `queries` tokens after `context`
    cached ones with the stock and the oneDNN linears, in interleaved rounds (each kernel runs every
    shape once per round, after one untimed warm-up round), and leave the model on the faster:
    {"kernels": the choice, "forward_ms": {kernel: {str(q): median ms}}}. The model must be able to run
    oneDNN (onednn_available)."""
    from eval.forward_cost import forward_runner  # forward_cost imports this module

    use_onednn_linears(model)  # the reorder happens once, outside the timing
    use_stock_linears(model, keep=True)
    forward = forward_runner(model, context, max(queries))
    runs = {q: forward(q) for q in queries}
    times: dict[str, dict[int, list[float]]] = {k: {q: [] for q in queries} for k in ("stock", "onednn")}
    for r in range(repeats + 1):
        for kernels, shapes in times.items():
            (use_onednn_linears if kernels == "onednn" else lambda m: use_stock_linears(m, keep=True))(model)
            for q, run in runs.items():
                t = time.perf_counter()
                run()
                if r:
                    shapes[q].append(1e3 * (time.perf_counter() - t))
    # query counts as strings: the record is JSON, and it must read back as it was written
    ms = {k: {str(q): round(statistics.median(ts), 2) for q, ts in shapes.items()} for k, shapes in times.items()}
    choice = faster_kernel(ms)
    if choice == "onednn":
        use_onednn_linears(model)
    else:
        use_stock_linears(model)
    return {"kernels": choice, "forward_ms": ms, "context": context}


def apply_cpu_kernels(model, kernels: str) -> dict:
    """`eval.cpu_kernels` on a loaded base model: "stock" leaves it as it is, "onednn" swaps its linear
    layers (use_onednn_linears), "auto" times both where oneDNN can run this model and keeps the faster
    (choose_kernels; stock where it cannot). Returns {"kernels": what runs, "swapped": layers swapped},
    with the timings under "auto" when it measured."""
    if kernels not in KERNELS:
        raise ValueError(f"eval.cpu_kernels={kernels!r}; choose one of {', '.join(KERNELS)}")
    if kernels == "auto":
        if onednn_available(model):
            return {"kernels": "stock", "swapped": 0}
        chosen = choose_kernels(model)
        swapped = sum("forward" in vars(m) for m in model.modules() if isinstance(m, nn.Linear))
        ms = chosen["forward_ms"]
        print("cpu kernels (auto): " + "; ".join(
            f"{k} {', '.join(f'{q}: {v:.1f}' for q, v in ms[k].items())} ms" for k in ms)
            + f" by query tokens -> {chosen['kernels']}", flush=True)
        return {"kernels": chosen["kernels"], "swapped": swapped, "auto": chosen}
    return {"kernels": kernels, "swapped": use_onednn_linears(model) if kernels == "onednn" else 0}
