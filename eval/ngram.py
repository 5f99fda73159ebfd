"""Prompt-lookup candidates on the decoder's own state, for hybrid drafting (docs/design.md §3.3).

A row's text so far is its prompt, its committed new tokens and g0 (the base model's next token, known
but not yet in the cache). `lookup_paths` finds, for each row, the most recent earlier occurrence of
the text's last n tokens (n from `max_ngram` down to `min_ngram`, the longest n that matches wins) and
proposes [g0, the L - 1 tokens that followed that occurrence]. Rows without a match get `found_B`
False; the caller substitutes a path it already verifies (the drafter's first beam), which tree
packing then shares for free.

Everything is vectorized over rows on the decoder's device: no Python loop over tokens and no host
sync (the candidate is a gather at an argmax), so the step stays capturable.
"""

from __future__ import annotations

import torch

from eval.decoder import Acceptance, DecodeState, Proposal, Proposer
from eval.metrics import DecodeStats
from eval.tree import Tree


def history(state: DecodeState) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq_BC, end_B): row b's text so far is seq_BC[b, :end_B[b] + 1], g0 at column end_B[b].
    Columns past end_B hold stale tokens; callers only read columns <= end_B."""
    B, T = state.prompt_BT.shape
    N = state.out_BN.shape[1]
    seq_BC = torch.cat([state.prompt_BT, state.out_BN.new_zeros(B, N + 1)], dim=1)
    cols_N = torch.arange(N, device=seq_BC.device)
    seq_BC.scatter_(1, state.prompt_len_B[:, None] + cols_N, state.out_BN)
    end_B = state.prompt_len_B + state.num_new_B
    seq_BC.scatter_(1, end_B[:, None], state.g0_B[:, None])
    return seq_BC, end_B


def lookup_paths(seq_BC: torch.Tensor, end_B: torch.Tensor, length: int, max_ngram: int = 3,
                 min_ngram: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(path_BL, found_B): path[b] = [seq[b, end_b], the length - 1 tokens after the most recent match].

    A match of size n is a start i with seq[i : i + n] == seq[end - n + 1 : end + 1], i + n <= end (not
    the suffix itself) and its whole continuation known: i + n + length - 2 <= end."""
    if length < 1 or not 1 <= min_ngram <= max_ngram:
        raise ValueError(f"need length >= 1 and 1 <= min_ngram <= max_ngram, got {length}, {min_ngram}, {max_ngram}")
    B, C = seq_BC.shape
    device = seq_BC.device
    rows_B = torch.arange(B, device=device)
    g0_B = seq_BC[rows_B, end_B]
    found_B = torch.zeros(B, dtype=torch.bool, device=device)
    start_B = torch.zeros(B, dtype=torch.long, device=device)  # first continuation column of the chosen match
    for n in range(max_ngram, min_ngram - 1, -1):
        if n > C:
            continue
        offsets_n = torch.arange(n, device=device)
        suffix_Bn = seq_BC.gather(1, (end_B[:, None] - n + 1 + offsets_n).clamp(min=0))
        windows_BIn = seq_BC.unfold(1, n, 1)  # I = C - n + 1 window starts
        starts_I = torch.arange(windows_BIn.shape[1], device=device)
        ok_BI = (windows_BIn == suffix_Bn[:, None, :]).all(dim=-1)
        ok_BI &= starts_I[None, :] + n + max(length - 2, 0) <= end_B[:, None]
        ok_BI &= (end_B >= n)[:, None]  # the suffix fits in the text (and a match lies before it)
        latest_B = torch.where(ok_BI, starts_I[None, :], -1).max(dim=1).values
        take_B = ~found_B & (latest_B >= 0)
        start_B = torch.where(take_B, latest_B + n, start_B)
        found_B |= take_B
    cont_BK = seq_BC.gather(1, (start_B[:, None] + torch.arange(length - 1, device=device)).clamp(max=C - 1))
    return torch.cat([g0_B[:, None], cont_BK], dim=1), found_B


def point_mass(tokens_BK: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    """q of a deterministic draft: probability 1 on the drafted token."""
    return torch.nn.functional.one_hot(tokens_BK, vocab_size).to(dtype)


class LookupProposer(Proposer):
    """Hybrid drafting: `inner`'s paths (the drafter's beams or sampled chains) plus ONE prompt-lookup
    path of the same length, last in the tree, so on equal greedy acceptance the drafter's path is the
    one kept. A row with no match repeats inner path 0, which tree packing shares for free.

    Sampling (inner paths with their q): the lookup path is a deterministic draft, i.e. a draw from the
    point mass q = one_hot(x) at each depth, independent of the drafter's chains (it is a function of
    the committed text alone). Recursive rejection sampling (eval/sampling.py, lemma (a)) holds for ANY
    proposal law, and its multi-candidate form (b) for independent candidates with different laws, taken
    in order: rejection of candidate i depends only on (x_i, u_i), so later candidates keep their laws.
    With q = one_hot(x) the test accepts x with probability min(1, r(x) / 1) = r(x), and a rejection
    leaves the residual r with x removed, renormalized. So a lookup token at a node is just one more
    trial there, and the committed tokens keep the law of plain sampling. A no-match row's placeholder
    (a copy of chain 0, NOT independent of it) is excluded from the trials (`candidate_BW`)."""

    def __init__(self, inner: Proposer, max_ngram: int, switch: int = 0, length: int = 0):
        """switch = m > 0: no extra path; a row whose text ends in a match of at least m tokens verifies the
        lookup path INSTEAD of the drafter's paths (greedy only: docs/design.md §3.3). On a CPU, where a
        forward over 4-5 tokens costs more than over 3, this keeps the tree at the drafter's size.

        length = K > 0 (switch mode, eager steps): when EVERY unfinished row has a match of at least m tokens
        whose K - 1 following tokens are known, the step verifies those K-token lookup paths alone and the
        drafter does not run; otherwise the step is as above, lookup paths as long as the drafter's. Long
        copied spans then go K tokens a step, as plain prompt lookup takes them. Deciding it reads one bool
        on the host, so a static (captured) step keeps the drafter's length."""
        if switch and not 1 <= switch <= max_ngram:
            raise ValueError(f"switch={switch} must be in [1, max_ngram={max_ngram}]")
        if length and (not switch or length < 2):
            raise ValueError(f"a lookup path length ({length}) needs switch mode and at least 2 tokens (g0 + a draft)")
        self.inner, self.max_ngram, self.switch, self.length = inner, max_ngram, switch, length
        self._used_B: torch.Tensor | None = None

    def propose(self, state: DecodeState) -> Proposal:
        seq_BC, end_B = history(state)
        if self.switch and self.length and not state.static:
            long_BK, found_B = lookup_paths(seq_BC, end_B, self.length, max_ngram=self.max_ngram, min_ngram=self.switch)
            if bool((found_B | state.done_B).all()):  # every row copies: no drafter this step
                self._used_B = found_B
                return Proposal(long_BK[:, None, :])
        inner = self.inner.propose(state)
        paths_BWL = inner.paths_BWL
        if self.switch:
            if inner.q_BWKV is not None:
                raise ValueError("hybrid switch mode is greedy only")
            lookup_BL, found_B = lookup_paths(seq_BC, end_B, paths_BWL.shape[-1], max_ngram=self.max_ngram,
                                              min_ngram=self.switch)
            self._used_B = found_B
            return Proposal(torch.where(found_B[:, None, None], lookup_BL[:, None, :], paths_BWL))
        lookup_BL, found_B = lookup_paths(seq_BC, end_B, paths_BWL.shape[-1], max_ngram=self.max_ngram)
        lookup_BL = torch.where(found_B[:, None], lookup_BL, paths_BWL[:, 0])
        paths_BWL = torch.cat([paths_BWL, lookup_BL[:, None]], dim=1)
        if inner.q_BWKV is None:  # greedy: a placeholder copy is harmless (verification is exact)
            return Proposal(paths_BWL)
        point_BKV = point_mass(lookup_BL[:, 1:], inner.q_BWKV.shape[-1], inner.q_BWKV.dtype)
        q_BWKV = torch.cat([inner.q_BWKV, point_BKV[:, None]], dim=1)
        candidate_BW = torch.cat([torch.ones_like(paths_BWL[:, :-1, 0], dtype=torch.bool), found_B[:, None]], dim=1)
        return Proposal(paths_BWL, q_BWKV, candidate_BW)

    def observe(self, state: DecodeState, acc: Acceptance, logits_BPV: torch.Tensor, tree: Tree,
                active_B: torch.Tensor, stats: DecodeStats) -> None:
        if self.switch:  # the rows that verified the lookup path instead of the drafter's
            stats.lookup_wins += int((self._used_B & active_B).sum())
            return
        lookup = tree.unpacker_BWL.shape[1] - 1  # the last path; it wins only where it beat every other
        stats.lookup_wins += int((acc.beam_B == lookup)[active_B].sum())
