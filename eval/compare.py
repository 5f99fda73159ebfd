"""Measure several decoding methods against plain greedy decoding: same model, same prompts, same
process, interleaved repeats (the order of methods rotates every repeat so drift favours none).

    results = compare({"plain": plain_fn, "redrafter": spec_fn, ...}, prompts, batch_size=1, repeats=3)

Every method is a function `batch of token lists -> GenerationResult`. The first method named
`reference` (default "plain") is the baseline: speedup_r = tokens/s of the method in repeat r over
tokens/s of the baseline in the same repeat; the record gives the mean and a 95% interval over
repeats, tau from the method's DecodeStats, and losslessness token for token against the baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm import tqdm

from data.prompts import Prompt
from eval.decoder import GenerationResult
from eval.metrics import DecodeStats

Method = Callable[[list[list[int]]], GenerationResult]


def mean_ci95(xs: list[float]) -> tuple[float, float]:
    """Mean and half-width of a t-based 95% interval over repeats (0 for a single repeat)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}.get(len(xs), 1.96)
    return m, t * sd / math.sqrt(len(xs))


@dataclass
class MethodRun:
    tokens: list[list[int]] = field(default_factory=list)
    stats: list[DecodeStats] = field(default_factory=list)
    seconds: float = 0.0


def run_method(method: Method, prompts: list[list[int]], batch_size: int, desc: str = "") -> MethodRun:
    run = MethodRun()
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    # disable=None: bars on a terminal only, so job logs are not flooded
    for batch in tqdm(batches, desc=desc, leave=False, unit="batch", disable=None if desc else True):
        result = method(batch)
        run.tokens += result.tokens
        run.stats.append(result.stats)
        run.seconds += result.seconds
    return run


def _summary(stats: DecodeStats) -> dict:
    d = stats.to_dict()
    return {k: d[k] for k in ("tokens_per_step", "acceptance_per_position", "verified_tokens_per_step",
                              "verified_fraction_of_WL") if k in d}


def compare(methods: dict[str, Method], prompts: list[Prompt], batch_size: int, repeats: int,
            reference: str = "plain", progress: bool = True) -> dict:
    """{method: {tokens_per_s, speedup, speedup_ci95, speedup_per_repeat, lossless, mismatched, tau...,
    by_category: {cat: {tokens_per_step, speedup}}}}"""
    assert reference in methods, f"the baseline {reference!r} must be one of the methods"
    ids = [p.input_ids for p in prompts]
    categories = sorted({p.category for p in prompts if p.category})
    names = list(methods)
    tps: dict[str, list[float]] = {n: [] for n in names}
    cat_tps: dict[str, dict[str, list[float]]] = {n: {c: [] for c in categories} for n in names}
    first: dict[str, MethodRun] = {}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            desc = f"{name} {rep + 1}/{repeats}" if progress else ""
            run = run_method(methods[name], ids, batch_size, desc)
            tps[name].append(sum(map(len, run.tokens)) / run.seconds)
            first.setdefault(name, run)
            for c in categories:  # per category: time the category's prompts on their own
                sub = [p.input_ids for p in prompts if p.category == c]
                r = run_method(methods[name], sub, batch_size)
                cat_tps[name][c].append(sum(map(len, r.tokens)) / r.seconds)
    base = first[reference].tokens
    out = {}
    for name in names:
        speedups = [a / b for a, b in zip(tps[name], tps[reference])]
        speedup, ci = mean_ci95(speedups)
        run = first[name]
        mismatched = sorted(prompts[i].id for i, (a, b) in enumerate(zip(run.tokens, base)) if a != b)
        merged = DecodeStats.merge(run.stats)
        out[name] = {
            "tokens_per_s": sum(tps[name]) / len(tps[name]), "speedup": speedup, "speedup_ci95": ci,
            "speedup_per_repeat": speedups, "lossless": not mismatched, "mismatched_prompts": mismatched,
            **_summary(merged), "decode_stats": merged.to_dict(),
        }
        if categories:
            out[name]["by_category"] = {}
            for c in categories:
                idx = [i for i, p in enumerate(prompts) if p.category == c]
                cat_stats = _category_tau(run, idx, batch_size)
                cat_speed = [a / b for a, b in zip(cat_tps[name][c], cat_tps[reference][c])]
                out[name]["by_category"][c] = {"speedup": mean_ci95(cat_speed)[0], "tokens_per_step": cat_stats}
    return out


def _category_tau(run: MethodRun, idx: list[int], batch_size: int) -> float:
    """tau over a category's prompts: committed tokens / steps, from the per-batch stats (exact at
    batch 1; at larger batches a batch's steps are shared by its rows, so this is approximate)."""
    batches = sorted({i // batch_size for i in idx})
    steps = sum(len(run.stats[b].accepted) for b in batches)
    committed = sum(sum(a + 1 for a in run.stats[b].accepted) for b in batches)
    return committed / steps if steps else float("nan")
