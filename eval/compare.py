"""Measure several decoding methods against plain greedy decoding: same model, same prompts, same
process, interleaved per batch: each batch (a prompt at batch size 1) runs under every method back to
back, in an order that rotates from batch to batch and repeat to repeat, so a machine that speeds up or
slows down over minutes shifts a method's time and the baseline's time for the same prompt alike.

    results = compare({"plain": plain_fn, "redrafter": spec_fn, ...}, prompts, batch_size=1, repeats=3)

Every method is a function `batch of token lists -> GenerationResult`. The first method named
`reference` (default "plain") is the baseline: speedup_r = tokens/s of the method in repeat r over
tokens/s of the baseline in the same repeat; the record gives their mean, tau from the method's
DecodeStats, and losslessness token for token against the baseline.

The 95% interval (`speedup_ci95`, a half-width) is a paired bootstrap over batches (prompts at batch
size 1), stratified by category: each batch's time under the method and under the baseline, averaged
over repeats, are resampled together, so prompt-to-prompt variation cancels in the ratio and what is
left is how much the speedup would move with another draw of prompts and another timing run. It needs
at least two repeats (with one, timing noise cannot be told apart: "n/a"); the t-interval over the
repeats alone (`speedup_ci95_repeats`), with 2-3 repeats, is far wider and is kept for reference.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm import tqdm

from data.prompts import Prompt
from eval.decoder import GenerationResult, only_numerical_ties
from eval.metrics import DecodeStats

Method = Callable[[list[list[int]]], GenerationResult]


def mean_ci95(xs: list[float]) -> tuple[float, float | None]:
    """Mean and half-width of a t-based 95% interval over repeats; the half-width is None for a single
    repeat (noise cannot be estimated: reported as "n/a", never as a certain 0)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}.get(len(xs), 1.96)
    return m, t * sd / math.sqrt(len(xs))


BOOTSTRAP_SAMPLES = 2000


def paired_bootstrap_ci95(tokens: list[int], seconds: list[list[float]], ref_tokens: list[int],
                          ref_seconds: list[list[float]], strata: list[list[int]], seed: int = 0) -> float | None:
    """Half-width of the 95% percentile interval of speedup = (tokens / seconds) / (ref tokens / ref seconds)
    over batches resampled with replacement within each stratum (category). tokens[b]: tokens of batch b;
    seconds[r][b]: its time in repeat r (averaged over repeats before resampling). None with < 2 repeats
    or < 2 batches."""
    import numpy as np

    if len(seconds) < 2 or len(tokens) < 2:
        return None
    t_m, t_ref = np.mean(seconds, axis=0), np.mean(ref_seconds, axis=0)
    tok_m, tok_ref = np.asarray(tokens, float), np.asarray(ref_tokens, float)
    rng = np.random.default_rng(seed)
    picks = np.concatenate([rng.choice(s, size=(BOOTSTRAP_SAMPLES, len(s))) for s in strata if s], axis=1)
    speedups = (tok_m[picks].sum(1) / t_m[picks].sum(1)) / (tok_ref[picks].sum(1) / t_ref[picks].sum(1))
    lo, hi = np.percentile(speedups, [2.5, 97.5])
    return float(hi - lo) / 2


def ci_text(half_width: float | None, width: int = 0) -> str:
    """'±0.12' or '±n/a' (one repeat), left-aligned to `width` characters."""
    return f"{'±n/a' if half_width is None else f'±{half_width:.2f}':<{width}}"


def lossless_text(m: dict) -> str:
    """True; "ties (k)" when the k mismatched prompts all diverge at numerical ties; False otherwise."""
    divergences = m.get("divergences", {})
    return f"ties ({len(divergences)})" if not m["lossless"] and only_numerical_ties(divergences) else str(m["lossless"])


def method_table(methods: dict[str, dict], indent: str = "", name_width: int = 14, verified: bool = False) -> list[str]:
    """The methods table every report prints (eval summary, bench): tau, tokens/s, speedup with its 95%
    interval, optionally verified tokens per step, and whether the output equals plain decoding."""
    lines = [f"{indent}{'method':<{name_width}}{'tau':>6}{'tokens/s':>10}{'speedup':>16}"
             + (f"{'verified':>9}" if verified else "") + "  lossless"]
    for name, m in methods.items():
        extra = f"{m.get('verified_tokens_per_step') or 0:>9.1f}" if verified else ""
        lines.append(f"{indent}{name:<{name_width}}{m['tokens_per_step']:>6.2f}{m['tokens_per_s']:>10.0f}"
                     f"{m['speedup']:>9.2f}x {ci_text(m['speedup_ci95'], 6)}{extra} {lossless_text(m)}")
    return lines


@dataclass
class MethodRun:
    tokens: list[list[int]] = field(default_factory=list)  # per prompt, in prompt order
    stats: list[DecodeStats] = field(default_factory=list)  # per batch
    seconds: list[float] = field(default_factory=list)  # per batch


def make_batches(prompts: list[Prompt], batch_size: int) -> list[list[int]]:
    """Prompt indices per batch. A batch never mixes prompt categories (prompts are grouped by
    category, in order, then cut into batches), so per-category tau and tokens/s come straight from
    the per-batch records of the one timed run."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p.category, []).append(i)
    return [idx[j:j + batch_size] for idx in groups.values() for j in range(0, len(idx), batch_size)]


def _summary(stats: DecodeStats) -> dict:
    d = stats.to_dict()
    return {k: d[k] for k in ("tokens_per_step", "acceptance_per_position", "verified_tokens_per_step",
                              "verified_fraction_of_WL") if k in d}


def _tokens_per_s(run: MethodRun, batch_ids: list[int], batches: list[list[int]]) -> float:
    tokens = sum(len(run.tokens[i]) for b in batch_ids for i in batches[b])
    return tokens / sum(run.seconds[b] for b in batch_ids)


def step_timing(runs: list[MethodRun]) -> dict | None:
    """Milliseconds per batched forward of the decode loop over every repeat of a method: the whole step
    (`step_ms`) and its base forward alone (`forward_ms`); None where the forwards were not timed (CUDA,
    or a method outside the step skeleton: eval/decoder.py ForwardTimer)."""
    stats = [s for r in runs for s in r.stats]
    forwards = sum(s.num_forwards for s in stats)
    forward_seconds = sum(s.forward_seconds for s in stats)
    if not forwards or forward_seconds <= 0:
        return None
    return {"step_ms": 1e3 * sum(s.decode_seconds for s in stats) / forwards,
            "forward_ms": 1e3 * forward_seconds / forwards, "forwards": forwards}


def compare(methods: dict[str, Method], prompts: list[Prompt], batch_size: int, repeats: int,
            reference: str = "plain", progress: bool = True, warmup: bool = True,
            explain: Callable[[list[int], list[int], list[int]], dict | None] | None = None) -> dict:
    """{method: {tokens_per_s, speedup, speedup_ci95, speedup_per_repeat, lossless, mismatched, tau...,
    by_category: {cat: {tokens_per_step, speedup}}}}. `warmup`: run every method once on the first
    batch first, untimed (allocator, first-call overheads, torch.compile's compilation). `explain`
    (prompt, baseline tokens, method tokens) -> dict describes each mismatched prompt under
    "divergences" (eval.decoder.first_divergence: where, and whether it was a numerical tie)."""
    assert reference in methods, f"the baseline {reference!r} must be one of the methods"
    ids = [p.input_ids for p in prompts]
    batches = make_batches(prompts, batch_size)
    by_cat = {c: [b for b, batch in enumerate(batches) if prompts[batch[0]].category == c]
              for c in sorted({p.category for p in prompts if p.category})}
    names = list(methods)
    runs: dict[str, list[MethodRun]] = {n: [] for n in names}
    if warmup:
        for name in names:
            methods[name]([ids[i] for i in batches[0]])
    t0 = time.time()
    every = list(range(len(batches)))
    for rep in range(repeats):
        for name in names:
            runs[name].append(MethodRun(tokens=[[] for _ in ids], stats=[None] * len(batches),
                                        seconds=[0.0] * len(batches)))
        # disable=None: a bar on a terminal only, so job logs are not flooded
        for b in tqdm(every, desc=f"repeat {rep + 1}/{repeats}", leave=False, unit="batch",
                      disable=None if progress else True):
            shift = (rep + b) % len(names)
            for name in names[shift:] + names[:shift]:
                result = methods[name]([ids[i] for i in batches[b]])
                run = runs[name][rep]
                for i, toks in zip(batches[b], result.tokens):
                    run.tokens[i] = toks
                run.stats[b], run.seconds[b] = result.stats, result.seconds
        if progress:  # one line per repeat, also in job logs where the bars are off
            print(f"eval: repeat {rep + 1}/{repeats} ({time.time() - t0:.0f} s so far): " + ", ".join(
                f"{name} {_tokens_per_s(runs[name][rep], every, batches):.1f}" for name in names) + " tokens/s",
                flush=True)
    base = runs[reference][0].tokens
    strata = list(by_cat.values()) if by_cat else [every]
    uncategorized = [b for b in every if not any(b in s for s in strata)]
    strata += [uncategorized] if uncategorized else []

    def batch_tokens(run: MethodRun) -> list[int]:
        return [sum(len(run.tokens[i]) for i in batch) for batch in batches]

    out = {}
    timing = {name: step_timing(runs[name]) for name in names}
    for name in names:
        tps = [_tokens_per_s(r, every, batches) for r in runs[name]]
        speedups = [a / _tokens_per_s(b, every, batches) for a, b in zip(tps, runs[reference])]
        speedup, ci_repeats = mean_ci95(speedups)
        ci = paired_bootstrap_ci95(batch_tokens(runs[name][0]), [r.seconds for r in runs[name]],
                                   batch_tokens(runs[reference][0]), [r.seconds for r in runs[reference]], strata)
        if name == reference:
            ci = 0.0 if ci is not None else None
        first = runs[name][0]
        differ = [i for i, (a, b) in enumerate(zip(first.tokens, base)) if a != b]
        mismatched = sorted(prompts[i].id for i in differ)
        merged = DecodeStats.merge(first.stats)
        divergences = {prompts[i].id: explain(ids[i], base[i], first.tokens[i]) for i in differ} if explain else {}
        out[name] = {
            "tokens_per_s": sum(tps) / len(tps), "speedup": speedup, "speedup_ci95": ci,
            "speedup_ci95_repeats": ci_repeats, "speedup_per_repeat": speedups,
            "lossless": not mismatched, "mismatched_prompts": mismatched,
            **({"divergences": divergences} if divergences else {}),
            **_summary(merged), "decode_stats": merged.to_dict(),
        }
        if timing[name] and timing[reference] and name != reference:
            out[name]["step_timing"] = timing[name]
            # the ideal of THIS run: its tau, its plain step, its verify forward (docs/design.md §5)
            out[name]["ideal_speedup"] = (merged.tokens_per_step * timing[reference]["step_ms"]
                                          / timing[name]["forward_ms"])
            out[name]["decoder_efficiency"] = speedup / out[name]["ideal_speedup"]
        elif timing[name]:
            out[name]["step_timing"] = timing[name]
        if by_cat:
            out[name]["by_category"] = {
                c: {"tokens_per_step": DecodeStats.merge([first.stats[b] for b in bs]).tokens_per_step,
                    "speedup": mean_ci95([_tokens_per_s(r, bs, batches) / _tokens_per_s(p, bs, batches)
                                          for r, p in zip(runs[name], runs[reference])])[0]}
                for c, bs in by_cat.items()}
    return out
