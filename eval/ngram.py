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

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from eval.decoder import DecodeState


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
