"""Speculative SAMPLING (temperature T > 0, docs/design.md §3 "Verification, sampling") and plain sampling.

    decoder = SpeculativeDecoder(model, drafter, beam_width=4, beam_length=5, temperature=0.8)
    result = decoder.generate(prompts, 128, eos_token_id, generator=torch.Generator().manual_seed(0))
    baseline = plain_sample(model, prompts, 128, eos_token_id, temperature=0.8, generator=...)

Tested (chi-square against the exact law of the base model) by:

    python -m pytest tests/test_sampling.py -q

Notation: p(.|ctx) = softmax(base logits / T), q(.|h, ctx) = softmax(drafter logits / T).

LOSSLESS RULE (default). One step, from the committed context c, with g0 ~ p(.|c) already drawn:
  1. `sample_chains`: W independent chains, each an ancestral sample path x_1..x_{L-1} of the
     drafter from (h, g0): x_k ~ q(.|h, g0, x_<k). Chains sharing a prefix are packed once by
     `pack_tree` (dedup), so ONE base forward gives p at every node of the tree.
  2. `accept_tree`, multi-draft recursive rejection sampling (SpecInfer's MSS with i.i.d. drafts).
     At the accepted node a (depth k - 1, a = g0 y_1..y_{k-1}), the candidates are the depth-k
     tokens of all chains through a, duplicates kept as separate trials, in chain order. Start with
     r = p(.|c, a); for each candidate x: accept with probability min(1, r(x)/q(x)); on rejection
     r <- normalize(max(r - q, 0)). If one is accepted, y_k = x and repeat at depth k + 1 with a
     fresh r = p(.|c, a, x). If all are rejected, the bonus is drawn from the final r and the step
     ends. At a leaf (all L - 1 depths accepted) the bonus is drawn from p(.|c, a). The step commits
     g0 y_1..y_n; the bonus is the next step's g0.

  Proof sketch that the committed tokens are distributed exactly as ancestral sampling from p:
  (a) One test. If x ~ q and r is any distribution: P(accept, x = v) = q(v) min(1, r(v)/q(v)) =
      min(r, q)(v), and P(reject) = 1 - sum_v min(r, q)(v) = sum_v max(r - q, 0)(v) =: z. So
      "accept x, else draw from max(r - q, 0)/z" outputs exactly r(v) = min(r, q)(v) + max(r - q, 0)(v).
  (b) m i.i.d. candidates (MSS lemma), by induction on m: rejection of candidate 1 depends only on
      (x_1, u_1), so candidates 2..m are still i.i.d. q given it; by induction they turn the
      residual r' = max(r - q, 0)/z into an exact r' sample; by (a) the output is exactly r. m = 0
      is the bonus draw itself.
  (c) Why the candidates at node a ARE i.i.d. q(.|h, c, a) given everything seen so far: chains are
      independent, and a chain's depth-k token is drawn from q given only its own depth-<k tokens.
      The accept/reject history up to depth k - 1 (and so the set of chains through a, hence m)
      is a function of depth-<k tokens and of independent uniforms. Conditioning on it leaves the
      depth-k tokens of the chains through a i.i.d. q(.|h, c, a).
  (d) Hence at every depth the next committed token (accepted candidate or bonus) is exactly
      p(.|c, a) given the whole past; the leaf bonus is drawn from p(.|c, a) directly, and g0 was
      drawn from p at the previous step (or at prefill). So every committed token is distributed
      as p given all earlier tokens: the chain rule gives the law of ancestral sampling at T.
      Cutting at max_new_tokens or after the first EOS keeps a prefix of that sequence, whose law
      is the one plain sampling gives. The drafter, W, L, tree dedup and batching change only the
      speed, never the law (as long as the q in the ratio is the q that drew the candidate).

REFERENCE RULE (`reference_compatible=True`, `accept_reference`), as apple/ml-recurrent-drafter:
beams from the usual deterministic beam search (eval/beam.py); per beam and draft k accept while
u_k < p(x_k)/Q(x_k), Q the drafter distribution kept by the beam search (untempered, as there);
keep the beam with the longest accepted prefix (first on ties); the bonus is drawn from
normalize(max(p - Q, 0)) at the first rejected draft of that beam, or from p after a fully accepted
beam. It is NOT lossless: the beams are the drafter's top-W paths, not samples from Q (so (a) does
not hold), the W beams are tested against the same p with no residual in between, and taking the
max over beams favours tokens that are accepted more often.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eval.beam import _param_dtype, vocab_logits
from eval.decoder import Acceptance, DecodeState, GenerationResult, Proposal, Proposer, _decode, plain_step
from eval.metrics import DecodeStats
from eval.tree import Tree


@dataclass
class Chains:
    tokens_BWL: torch.Tensor  # long; [..., 0] is g0, [..., k] the k-th sampled draft token
    # q_BWKV[b, w, k - 1] is the distribution (at T) that drew tokens_BWL[b, w, k], K = L - 1
    q_BWKV: torch.Tensor


@dataclass
class Choice:
    chain_B: torch.Tensor  # chain (beam) holding the accepted prefix
    num_accepted_B: torch.Tensor  # accepted drafts n; g0 + n drafts are committed
    bonus_B: torch.Tensor  # the next g0


# ---- distributions ------------------------------------------------------------------------

def probs_at(logits_NV: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.softmax(logits_NV.float() / temperature, dim=-1)


def sample_probs(probs_NV: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(..., V) probabilities -> (...) one token each."""
    flat_NV = probs_NV.reshape(-1, probs_NV.shape[-1])
    return torch.multinomial(flat_NV, 1, generator=generator).view(probs_NV.shape[:-1])


def sample_from_logits(logits_BV: torch.Tensor, temperature: float,
                       generator: torch.Generator | None) -> torch.Tensor:
    """The sampling `pick_next` of eval/decoder.py: one token per row from softmax(logits / T)."""
    return sample_probs(probs_at(logits_BV, temperature), generator)


def residual(p_BV: torch.Tensor, q_BV: torch.Tensor) -> torch.Tensor:
    """normalize(max(p - q, 0)): what p still owes after a rejected draw from q. Where it has no
    mass (p == q) a rejection had probability 0; p is returned so the row stays a distribution."""
    left_BV = (p_BV - q_BV).clamp(min=0.0)
    mass_B1 = left_BV.sum(-1, keepdim=True)
    return torch.where(mass_B1 > 1e-12, left_BV / mass_B1.clamp(min=1e-12), p_BV)


def uniform(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=like.device)


# ---- lossless: sampled chains + multi-draft recursive rejection sampling ----------------------

@torch.no_grad()
def sample_chains(drafter, h_BH: torch.Tensor, g0_B: torch.Tensor, num_chains: int, chain_length: int,
                  temperature: float, generator: torch.Generator | None) -> Chains:
    """W independent ancestral sample paths of the drafter from (h, g0); chain_length L includes g0.
    Same drafter interface as eval/beam.py (init_state, next_state, logits)."""
    W, L = num_chains, chain_length
    B = g0_B.shape[0]
    h_BH = h_BH.to(_param_dtype(drafter, h_BH.dtype))
    h_BWH = h_BH[:, None, :].expand(B, W, h_BH.shape[-1])
    tokens_BWL = g0_B[:, None, None].expand(B, W, 1).clone()
    state_BWS = drafter.init_state(h_BH, B, W)
    q_steps = []  # (B, W, V) per draft depth
    for k in range(1, L):
        state_BWS = drafter.next_state(state_BWS, tokens_BWL[..., k - 1])
        q_BWV = probs_at(vocab_logits(drafter, h_BWH, state_BWS), temperature)
        tokens_BWL = torch.cat([tokens_BWL, sample_probs(q_BWV, generator)[..., None]], dim=-1)
        q_steps.append(q_BWV)
    q_BWKV = torch.stack(q_steps, dim=2) if q_steps else h_BH.new_zeros(B, W, 0, 0, dtype=torch.float)
    return Chains(tokens_BWL, q_BWKV)


def accept_tree(tokens_BWL: torch.Tensor, q_BWKV: torch.Tensor, logits_BPV: torch.Tensor,
                unpacker_BWL: torch.Tensor, temperature: float, generator: torch.Generator | None,
                candidate_BW: torch.Tensor | None = None) -> Choice:
    """Multi-draft recursive rejection sampling over the packed tree (module docstring, steps 2 and
    (a)-(d)). Vectorized over rows; loops over depth k and over the W candidates. Each chain is tested
    with its own q, so independent candidates of different laws mix (hybrid drafting's point masses,
    eval/ngram.py); chains with candidate_BW False are never trials."""
    B, W, L = tokens_BWL.shape
    rows_B = torch.arange(B, device=tokens_BWL.device)
    chain_B = torch.zeros(B, dtype=torch.long, device=tokens_BWL.device)  # any chain through the node
    through_BW = torch.ones(B, W, dtype=torch.bool, device=tokens_BWL.device)  # chains through the node
    if candidate_BW is not None:
        through_BW &= candidate_BW
    going_B = torch.ones(B, dtype=torch.bool, device=tokens_BWL.device)  # every draft so far accepted
    num_accepted_B = torch.zeros_like(chain_B)
    bonus_B = torch.zeros_like(chain_B)
    for k in range(1, L):
        node_B = unpacker_BWL[rows_B, chain_B, k - 1]  # the accepted node, depth k - 1
        r_BV = probs_at(logits_BPV[rows_B, node_B], temperature)  # fresh p at the node
        accepted_B = torch.zeros_like(going_B)
        for w in range(W):
            x_B = tokens_BWL[:, w, k]
            q_BV = q_BWKV[:, w, k - 1]  # the q that drew x (a drafter chain's, or a lookup path's point mass)
            trial_B = going_B & through_BW[:, w] & ~accepted_B
            ratio_B = r_BV.gather(1, x_B[:, None])[:, 0] / q_BV.gather(1, x_B[:, None])[:, 0]
            ok_B = trial_B & (uniform(B, x_B, generator) < ratio_B)  # u in [0, 1): P = min(1, ratio)
            r_BV = torch.where((trial_B & ~ok_B)[:, None], residual(r_BV, q_BV), r_BV)
            chain_B = torch.where(ok_B, w, chain_B)
            accepted_B |= ok_B
        stopped_B = going_B & ~accepted_B  # every candidate rejected: bonus from the final residual
        bonus_B = torch.where(stopped_B, sample_probs(r_BV, generator), bonus_B)
        going_B &= accepted_B
        num_accepted_B += going_B.long()
        through_BW &= tokens_BWL[:, :, k] == tokens_BWL[rows_B, chain_B, k][:, None]
    leaf_B = unpacker_BWL[rows_B, chain_B, L - 1]  # rows still going accepted the whole chain
    leaf_bonus_B = sample_probs(probs_at(logits_BPV[rows_B, leaf_B], temperature), generator)
    return Choice(chain_B, num_accepted_B, torch.where(going_B, leaf_bonus_B, bonus_B))


# ---- reference rule (NOT lossless) -----------------------------------------------------------

def accept_reference(tokens_BWL: torch.Tensor, log_q_BWKV: torch.Tensor, logits_BPV: torch.Tensor,
                     unpacker_BWL: torch.Tensor, temperature: float, generator: torch.Generator | None,
                     candidate_BW: torch.Tensor | None = None) -> Choice:
    """The reference's rule over deterministic beams (module docstring): biased, see there. Every beam is a
    candidate (no hybrid lookup path: SpeculativeDecoder refuses that combination)."""
    if candidate_BW is not None:
        raise ValueError("the reference acceptance rule takes no candidate mask (it is not combined with hybrid "
                         "drafting)")
    B, W, L = tokens_BWL.shape
    rows_B = torch.arange(B, device=tokens_BWL.device)
    p_BWLV = probs_at(logits_BPV.gather(1, unpacker_BWL.flatten(1)[..., None].expand(-1, -1, logits_BPV.shape[-1]))
                      .view(B, W, L, -1), temperature)  # p_BWLV[..., k, :] = p of the token after depth k
    q_BWKV = log_q_BWKV.exp()
    drafts_BWK1 = tokens_BWL[..., 1:, None]
    ratio_BWK = p_BWLV[..., :-1, :].gather(-1, drafts_BWK1)[..., 0] / q_BWKV.gather(-1, drafts_BWK1)[..., 0]
    ok_BWK = uniform(ratio_BWK.shape, tokens_BWL, generator) < ratio_BWK
    accept_len_BW = ok_BWK.long().cumprod(dim=-1).sum(dim=-1)
    beam_B = accept_len_BW.argmax(dim=-1)  # first beam on ties
    n_B = accept_len_BW[rows_B, beam_B]
    p_at_n_BV = p_BWLV[rows_B, beam_B, n_B]
    K = L - 1
    if K > 0:  # first rejected draft of the kept beam: residual there (leaf: p itself)
        q_at_n_BV = q_BWKV[rows_B, beam_B, n_B.clamp(max=K - 1)]
        p_at_n_BV = torch.where((n_B < K)[:, None], residual(p_at_n_BV, q_at_n_BV), p_at_n_BV)
    return Choice(beam_B, n_B, sample_probs(p_at_n_BV, generator))


# ---- decoding ---------------------------------------------------------------------------------

class ChainProposer(Proposer):
    """The lossless sampling mode's proposal: W independent drafter chains at temperature T (step 1)."""

    def __init__(self, drafter, num_chains: int, chain_length: int, temperature: float,
                 generator: torch.Generator | None):
        self.drafter, self.num_chains, self.chain_length = drafter, num_chains, chain_length
        self.temperature, self.generator = temperature, generator

    def propose(self, state: DecodeState) -> Proposal:
        chains = sample_chains(self.drafter, state.h_BD, state.g0_B, self.num_chains, self.chain_length,
                               self.temperature, self.generator)
        return Proposal(chains.tokens_BWL, chains.q_BWKV)


class SamplingVerifier:
    """`accept_tree` (lossless; with ChainProposer) or `accept_reference` (the reference rule; with the
    beams and their log-probabilities) as a verifier of the step skeleton (eval/decoder.py run_step)."""

    def __init__(self, rule, temperature: float, generator: torch.Generator | None):
        self.rule, self.temperature, self.generator = rule, temperature, generator

    def __call__(self, proposal: Proposal, tree: Tree, logits_BPV: torch.Tensor, hidden_BPD: torch.Tensor) -> Acceptance:
        tokens_BWL = proposal.paths_BWL
        choice = self.rule(tokens_BWL, proposal.q_BWKV, logits_BPV, tree.unpacker_BWL, self.temperature,
                           self.generator, proposal.candidate_BW)
        rows_B = torch.arange(tokens_BWL.shape[0], device=tokens_BWL.device)
        path_BL = tree.unpacker_BWL[rows_B, choice.chain_B]
        return Acceptance(choice.chain_B, choice.num_accepted_B, tokens_BWL[rows_B, choice.chain_B], path_BL,
                          choice.bonus_B, hidden_BPD[rows_B, path_BL[rows_B, choice.num_accepted_B]])


def plain_sample(model, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None,
                 temperature: float, generator: torch.Generator | None = None) -> GenerationResult:
    """Batched plain ancestral sampling at temperature T (the sampling baseline), on the same cache
    machinery as `plain_greedy`: one token per row per forward."""
    if not temperature > 0.0:
        raise ValueError(f"plain_sample needs temperature > 0 (use plain_greedy for 0), got {temperature}")

    def pick_next(logits_BV: torch.Tensor) -> torch.Tensor:
        return sample_from_logits(logits_BV, temperature, generator)

    return _decode(model, prompts, max_new_tokens, eos_token_id,
                   lambda state, stats: plain_step(model, state, stats, pick_next), DecodeStats(1, 1),
                   step_slots=2, pick_next=pick_next)
