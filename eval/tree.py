"""Dynamic tree attention (docs/design.md §3): pack the W beams' shared prefixes once.

All beams share g0 and often more. For every (beam i, depth k) the token is a copy of the one at
(smallest beam j with the same first k + 1 tokens, depth k); only those first occurrences are
packed, in beam-major then depth order, so along any beam path the packed indices strictly
increase (a token's ancestors are always packed before it). Everything is vectorized over B, W, L:
prefix equality is the cumulative product over depth of token equality.

Rows of a batch pack to different counts; the packed axis is padded to P = max over the batch and
pad slots attend only to themselves (their outputs are never read).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Tree:
    tokens_BP: torch.Tensor  # packed token ids (pad slots hold 0)
    depth_BP: torch.Tensor  # depth in the beam, 0 for g0 (and for pad slots); position id = ctx + depth
    tree_mask_BPP: torch.Tensor  # bool [b, query, key]: key is the query itself or one of its ancestors
    unpacker_BWL: torch.Tensor  # packed index of (beam, depth): packed_BP.gather(1, unpacker) == beams
    num_packed_B: torch.Tensor  # packed tokens per row (<= W * L)

    @property
    def size(self) -> int:
        return self.tokens_BP.shape[1]


def first_occurrence(beams_BWL: torch.Tensor) -> torch.Tensor:
    """first_BWL[b, i, k] = smallest beam j whose first k + 1 tokens equal beam i's."""
    equal_BWWL = beams_BWL[:, :, None, :] == beams_BWL[:, None, :, :]
    same_prefix_BWWL = equal_BWWL.to(torch.uint8).cumprod(dim=-1)
    return same_prefix_BWWL.argmax(dim=2)  # argmax returns the first maximum: the smallest j (j = i always matches)


def pack_tree(beams_BWL: torch.Tensor, dedup: bool = True, size: int | None = None) -> Tree:
    """Packed tokens, tree mask and unpacker. dedup=False packs all W * L tokens (baseline). `size`
    fixes the packed length (W * L fits any tree) instead of the batch's largest count, which must be
    read back to the host: a static step (eval/graphs.py) passes it."""
    B, W, L = beams_BWL.shape
    device = beams_BWL.device
    beam_BWL = torch.arange(W, device=device)[None, :, None].expand(B, W, L)
    depth_BWL = torch.arange(L, device=device)[None, None, :].expand(B, W, L)
    first_BWL = first_occurrence(beams_BWL) if dedup else beam_BWL
    is_first_BN = (first_BWL == beam_BWL).flatten(1)  # N = W * L, beam-major
    packed_index_BN = is_first_BN.long().cumsum(dim=1) - 1  # valid at first occurrences
    unpacker_BWL = packed_index_BN.gather(1, (first_BWL * L + depth_BWL).flatten(1)).view(B, W, L)
    num_packed_B = is_first_BN.sum(dim=1)
    P = int(num_packed_B.max()) if size is None else size

    # Duplicates scatter the same value to the same slot (same prefix => same token, same depth).
    flat_unpacker_BN = unpacker_BWL.flatten(1)
    tokens_BP = beams_BWL.new_zeros(B, P).scatter_(1, flat_unpacker_BN, beams_BWL.flatten(1))
    depth_BP = beams_BWL.new_zeros(B, P).scatter_(1, flat_unpacker_BN, depth_BWL.flatten(1))
    return Tree(tokens_BP, depth_BP, ancestor_mask(unpacker_BWL, P), unpacker_BWL, num_packed_B)


def ancestor_mask(unpacker_BWL: torch.Tensor, P: int) -> torch.Tensor:
    """mask_BPP[b, q, kv] = kv is q itself or an ancestor of q (q and kv packed indices)."""
    B, W, L = unpacker_BWL.shape
    query_BWLL = unpacker_BWL[..., :, None].expand(B, W, L, L)  # [..., k, k'] = packed index at depth k
    key_BWLL = unpacker_BWL[..., None, :].expand(B, W, L, L)  # [..., k, k'] = packed index at depth k'
    is_ancestor_LL = torch.ones(L, L, dtype=torch.bool, device=unpacker_BWL.device).tril()  # k' <= k
    key_BWLL = torch.where(is_ancestor_LL, key_BWLL, query_BWLL)  # non-ancestors re-mark the diagonal
    flat_BN = (query_BWLL * P + key_BWLL).flatten(1)
    mask_BN = torch.eye(P, dtype=torch.bool, device=unpacker_BWL.device).flatten().repeat(B, 1)
    return mask_BN.scatter_(1, flat_BN, True).view(B, P, P)
