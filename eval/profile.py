"""Where a greedy speculative step spends its time: the decoder's own step (eval/decoder.py run_step),
timed phase by phase through its clock hook, so the profile cannot drift from what the eval runs.

    python -m eval.bench --run-dir outputs/tiny      # prints this breakdown for the best (W, L)

Phases: drafter (beam search), packing (tree dedup + mask + positions), base forward (one forward
over the packed tokens incl. lm_head), acceptance (verify + choose beam), cache bookkeeping (K/V
copy of the accepted path, pointer and token lists). On CUDA each phase is synchronized first, so
the numbers are wall-clock per phase, not launch times.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from eval.decoder import STEP_PHASES, plain_greedy, prefill, run_step
from eval.speculative import SpeculativeDecoder

PHASES = STEP_PHASES


class _Clock:
    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync()
        self.t = time.perf_counter()

    def lap(self, phase: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.seconds[phase] += now - self.t
        self.t = now


@torch.inference_mode()
def profile_decoder(dec: SpeculativeDecoder, prompts: list[list[int]], max_new_tokens: int,
                    eos_token_id: int | None) -> dict:
    """Per-phase milliseconds per step (and share of the step) over greedy decoding of `prompts`,
    one prompt at a time, plus the plain greedy step time on the same prompts for reference."""
    clock = _Clock(dec.model.device)
    stats = dec.new_stats()
    steps = 0
    slots = dec.step_slots
    plain_seconds, plain_steps = 0.0, 0

    for prompt in prompts:
        state = prefill(dec.model, [prompt], len(prompt) + max_new_tokens + slots, max_new_tokens, eos_token_id)
        clock.lap("prefill")
        proposer, verifier = dec.parts()  # the decoder's own step parts, built once per prompt as in generate()
        while not bool(state.done_B.all()):
            run_step(dec.model, proposer, verifier, state, stats, dedup=dec.tree_attention, clock=clock)
            steps += 1
        plain = plain_greedy(dec.model, [prompt], max_new_tokens, eos_token_id)
        plain_seconds += plain.decode_seconds  # its steps alone: the prefill is no step (the spec side's is lapped out)
        plain_steps += plain.stats.num_forwards
        clock.t = time.perf_counter()
    total = sum(clock.seconds[p] for p in PHASES)
    ms = {p: 1e3 * clock.seconds[p] / steps for p in PHASES}
    step_ms, plain_ms = 1e3 * total / steps, 1e3 * plain_seconds / max(plain_steps, 1)
    tau = stats.tokens_per_step
    report = {
        "steps": steps, "beam_width": dec.beam_width, "beam_length": dec.beam_length,
        "tokens_per_step": stats.tokens_per_step,
        "ms_per_step": ms,
        "share": {p: clock.seconds[p] / total for p in PHASES},
        "spec_step_ms": step_ms,
        "plain_step_ms": plain_ms,
        # What limits the speedup: tau * plain step / step time, with the step as measured, with the
        # drafter for free, and with nothing but the base forward (every other phase for free).
        "speedup_bounds": {
            "as_measured": tau * plain_ms / step_ms,
            "free_drafter": tau * plain_ms / (step_ms - ms["drafter"]),
        },
        "cost_ratio": cost_ratio(dec),
    }
    report["speedup_bounds"]["base_forward_only"] = ideal_at(tau, report)  # the ideal at these prompts' tau
    return report


def ideal_at(tau: float, prof: dict) -> float:
    """The ideal speedup at a measured tau: tau x t(plain step) / t(verify forward over the packed tree)
    (docs/design.md §5), the two step times from a `profile_decoder` report. tau comes from the whole
    measured run; the profile's few prompts only price the two steps (its own tau, on those prompts, is
    in its speedup_bounds)."""
    return tau * prof["plain_step_ms"] / prof["ms_per_step"]["base_forward"]


def _matmul_params(module) -> int:
    """Multiply-accumulates per token of a module's linear layers (embedding lookups are not
    matmuls; a tied lm_head is a Linear and counts once)."""
    weights = {id(m.weight): m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear)}
    return sum(weights.values())


def cost_ratio(dec: SpeculativeDecoder) -> dict:
    """Multiply-accumulates per token: one drafter draft step (per beam) vs one base-model token.
    ReDrafter pays off when this is small: about 0.06 for Vicuna-7B with the reference exit width 2H
    (0.43B vs 6.6B); the tiny recipe's 5.8M-parameter base model with the same drafter shape gives 0.48."""
    drafter, base = _matmul_params(dec.drafter), _matmul_params(dec.model)
    return {"drafter_macs_per_draft": drafter, "base_macs_per_token": base, "ratio": drafter / base if base else None,
            "drafts_per_step": (dec.beam_length - 1) * dec.beam_width}
