"""Drafter beam search (docs/design.md §3): W beams of L tokens from (h, g0), beams[..., 0] == g0.

Deterministic top-W over the drafter's joint log-probability of the draft tokens, vectorized over
the batch B and the beams W; the only Python loop is over the L - 1 draft depths. At W = 1 without
drafter distributions (greedy verification) the search is a greedy chain, run without the beam
bookkeeping (same tokens; about a third of the drafting time saved on CPU). The drafter is
used only through `init_state`, `next_state` and `logits` (pipeline/drafter.py), so test stubs with
the same three methods can stand in for it. A drafter with a draft vocabulary (a `d2t` id map) is
searched in its own N-token space and its indices mapped to base ids: the same beams as a search
over the base vocabulary with -inf outside it, at N/V of the cost.

Like the reference (and TensorRT-LLM's port), the drafter's logits are processed before the
log-softmax of the search (`reference_logits`, `top_logits=50` by default): the row max is subtracted,
the top 50 are kept and every other logit is set to -5e4. At W > 1 this changes which beams win and
their scores; at W = 1 the tokens are the same (argmax) and only the scores change. `top_logits=0`
searches the unprocessed distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eval.decoder import DecodeState, Proposal, Proposer


@dataclass
class Beams:
    tokens_BWL: torch.Tensor  # long; [..., 0] is g0, [..., k] the k-th draft token
    scores_BW: torch.Tensor  # joint drafter log-prob of drafts 1..L-1, best beam first
    # log_probs_BWKV[b, w, k - 1] is the drafter distribution that drafted tokens_BWL[b, w, k]
    # (K = L - 1), kept along the beam's own history: sampling verification needs Q per kept token.
    log_probs_BWKV: torch.Tensor | None


def _param_dtype(module, default: torch.dtype) -> torch.dtype:
    param = next(iter(module.parameters()), None) if hasattr(module, "parameters") else None
    return param.dtype if param is not None else default


def vocab_logits(drafter, h: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """The drafter's logits over the BASE vocabulary (-inf outside a draft vocabulary)."""
    return drafter.vocab_logits(h, state) if hasattr(drafter, "vocab_logits") else drafter.logits(h, state)


def _to_tokens(drafter, index: torch.Tensor) -> torch.Tensor:
    """Drafter output indices -> base token ids (the identity without a draft vocabulary)."""
    d2t = getattr(drafter, "d2t", None)
    return index if d2t is None else d2t[index]


REFERENCE_TOP_LOGITS = 50
MASKED_LOGIT = -5e4


def reference_logits(logits_V: torch.Tensor, top_logits: int) -> torch.Tensor:
    """The reference's processing of drafter logits before the search: subtract the row max, keep the
    top `top_logits`, set the rest to -5e4 (a logit already -inf, outside a draft vocabulary, stays -inf).
    0, or at least the row length, keeps every logit (only the max is subtracted)."""
    shifted = logits_V - logits_V.max(dim=-1, keepdim=True).values
    if top_logits <= 0 or top_logits >= shifted.shape[-1]:
        return shifted
    top = shifted.topk(top_logits, dim=-1)
    rest = torch.where(torch.isinf(shifted), shifted, torch.full_like(shifted, MASKED_LOGIT))
    return rest.scatter(-1, top.indices, top.values)


def _take_beams(x_BW_: torch.Tensor, parent_BW: torch.Tensor) -> torch.Tensor:
    """x reordered along dim 1 so that new beam w inherits from old beam parent_BW[:, w]."""
    index = parent_BW.view(*parent_BW.shape, *([1] * (x_BW_.dim() - 2))).expand(-1, -1, *x_BW_.shape[2:])
    return x_BW_.gather(1, index)


@torch.no_grad()
def draft(drafter, h_BH: torch.Tensor, g0_B: torch.Tensor, beam_width: int, beam_length: int,
          keep_log_probs: bool = True, top_logits: int = REFERENCE_TOP_LOGITS) -> Beams:
    """Beam search over the drafter. beam_length L INCLUDES g0 (reference convention). top_logits: see
    `reference_logits` (50 = the reference's search, 0 = the unprocessed drafter distribution)."""
    W, L = beam_width, beam_length
    if W < 1 or L < 1:
        raise ValueError(f"beam_width and beam_length must be >= 1, got W={W}, L={L}")
    B = g0_B.shape[0]
    h_BH = h_BH.to(_param_dtype(drafter, h_BH.dtype))
    h_BWH = h_BH[:, None, :].expand(B, W, h_BH.shape[-1])
    tokens_BWL = g0_B[:, None, None].expand(B, W, 1).clone()
    # Only beam 0 is alive before the first draft (all beams are the same g0): with the others at
    # -inf, the first top-W picks W distinct tokens from beam 0's distribution.
    scores_BW = torch.full((B, W), float("-inf"), device=g0_B.device)
    scores_BW[:, 0] = 0.0
    state_BWS = drafter.init_state(h_BH, B, W)
    if W == 1 and not keep_log_probs:
        return _greedy_chain(drafter, h_BWH, tokens_BWL, state_BWS, L, top_logits)
    log_probs_BWKV = None
    for k in range(1, L):
        state_BWS = drafter.next_state(state_BWS, tokens_BWL[..., k - 1])
        log_probs_BWV = F.log_softmax(reference_logits(drafter.logits(h_BWH, state_BWS).float(), top_logits), dim=-1)
        V = log_probs_BWV.shape[-1]
        if W > V:
            raise ValueError(f"beam_width {W} exceeds the vocabulary size {V}")
        joint_BN = (scores_BW[..., None] + log_probs_BWV).flatten(1)  # N = W * V candidates
        scores_BW, best_BW = joint_BN.topk(W, dim=-1)  # sorted: beam 0 is the most likely
        parent_BW, token_BW = best_BW // V, _to_tokens(drafter, best_BW % V)
        tokens_BWL = torch.cat([_take_beams(tokens_BWL, parent_BW), token_BW[..., None]], dim=-1)
        state_BWS = _take_beams(state_BWS, parent_BW)
        if keep_log_probs:
            if getattr(drafter, "d2t", None) is not None:  # Q over base tokens: 0 outside the draft vocabulary
                log_probs_BWV = log_probs_BWV.new_full((*log_probs_BWV.shape[:-1], drafter.arch.vocab_size),
                                                       float("-inf")).index_copy_(-1, drafter.d2t, log_probs_BWV)
            step_BW1V = _take_beams(log_probs_BWV, parent_BW)[:, :, None, :]
            log_probs_BWKV = step_BW1V if log_probs_BWKV is None else torch.cat(
                [_take_beams(log_probs_BWKV, parent_BW), step_BW1V], dim=2)
    return Beams(tokens_BWL, scores_BW, log_probs_BWKV)


def _greedy_chain(drafter, h_B1H: torch.Tensor, tokens_B11: torch.Tensor, state_B1S: torch.Tensor, L: int,
                  top_logits: int) -> Beams:
    """Beam search at W = 1: the argmax at every depth (top-1 of log_softmax is the argmax of the
    logits), with the joint log-prob as max logit - logsumexp (of the processed logits: after the max is
    subtracted the best is 0, and the -5e4 of the dropped ones vanish from the logsumexp in float32)."""
    tokens = [tokens_B11[..., 0]]
    score_B1 = torch.zeros(tokens_B11.shape[:2], device=tokens_B11.device)
    for _ in range(1, L):
        state_B1S = drafter.next_state(state_B1S, tokens[-1])
        logits_B1V = drafter.logits(h_B1H, state_B1S).float()
        best_B1, token_B1 = logits_B1V.max(dim=-1)
        if 0 < top_logits < logits_B1V.shape[-1]:
            kept_B1V = logits_B1V.topk(top_logits, dim=-1).values
            score_B1 = score_B1 + best_B1 - kept_B1V.logsumexp(dim=-1)
        else:
            score_B1 = score_B1 + best_B1 - logits_B1V.logsumexp(dim=-1)
        tokens.append(_to_tokens(drafter, token_B1))
    return Beams(torch.stack(tokens, dim=-1), score_B1, None)


class BeamProposer(Proposer):
    """The drafter's W beams of length L from (h, g0): ReDrafter's proposal. keep_log_probs for the
    reference sampling rule (it needs the drafter distribution along each beam)."""

    def __init__(self, drafter, beam_width: int, beam_length: int, top_logits: int = REFERENCE_TOP_LOGITS,
                 keep_log_probs: bool = False):
        self.drafter, self.beam_width, self.beam_length = drafter, beam_width, beam_length
        self.top_logits, self.keep_log_probs = top_logits, keep_log_probs

    def propose(self, state: DecodeState) -> Proposal:
        beams = draft(self.drafter, state.h_BD, state.g0_B, self.beam_width, self.beam_length,
                      keep_log_probs=self.keep_log_probs, top_logits=self.top_logits)
        return Proposal(beams.tokens_BWL, beams.log_probs_BWKV)
