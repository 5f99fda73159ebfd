"""Distillation batches and loss (docs/design.md §4): forward KL(teacher || drafter) per draft position.

Anchors. A teacher sequence stores n positions (pipeline/shards.py): tokens[j], the base model's
post-norm hidden[j], and the teacher's distribution of the token AFTER tokens[j]. Anchor j
(0 <= j <= n-2) is one training example:

    h   = hidden[j]            the base model's state that produced g0
    g0  = tokens[j+1]          the base model's own token there
    draft step i = 1..K        the RNN has consumed tokens[j+1 .. j+i] (teacher forcing; step 1: g0 only)
                               and predicts the token after tokens[j+i]; its target is the teacher's
                               distribution at position j+i; valid only while j+i <= n-1.

Spec indexing: the spec calls the g0 position t and predicts x_{t+i} against the teacher at t+i-1;
ours is the same with anchor j = t-1 (h is the state at t-1, which emitted x_t = g0).

Loss: forward KL over k+1 buckets: the teacher's top-k ids plus one tail bucket holding the rest of
the vocabulary (drafter tail = logsumexp of the logits outside the top-k, exact in log space).
Per position: masked mean over valid anchors; positions weighted by decay**(i-1), normalized.

Draft vocabulary (drafter logits over N tokens, `t2d_V` maps a base id to its draft index or -1):
the target is the teacher's distribution CONDITIONED on the token being draftable, p(x | x in Vd),
over the buckets (teacher top-k ids inside Vd) + tail. Why this target: a drafter that can only
propose tokens of Vd maximizes both acceptance rules with it. Greedy: the draft is accepted iff it
is the teacher's argmax; among tokens of Vd the conditional has the same argmax as p. Sampling:
acceptance is sum_x min(p(x), q(x)) over x in Vd (q is 0 elsewhere), at most P(Vd), and q = p(.|Vd)
reaches it. Out-of-vocabulary top-k entries are dropped and the rest renormalized; the teacher's tail
is counted as inside Vd (its split is not stored; with the N most frequent tokens covering almost
all response tokens the out-of-vocabulary part of the tail is small). With the full vocabulary the
loss is exactly the one above (no renormalization).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.shards import TeacherSequence

_LOG_FLOOR = -1e4  # stands in for log(0) so that 0 * (log 0 - log 0) is 0, not nan


def make_batch(seqs: list[TeacherSequence], K: int) -> dict[str, torch.Tensor]:
    """All anchors of `seqs` as tensors (N = total anchors, K = draft positions, k = teacher top-k):

        h_NH [N, H] float32, tokens_NK [N, K] long (column 0 is g0), topk_ids_NKk [N, K, k] long,
        topk_logprobs_NKk [N, K, k], tail_logprob_NK [N, K], mask_NK [N, K] bool
    plus num_tokens (teacher positions read), a 0-d tensor. Invalid (masked) slots hold token 0
    and a copy of the sequence's last target; they never reach the loss."""
    assert K >= 1
    if not seqs:
        raise ValueError("make_batch needs at least one teacher sequence")
    lengths = np.array([len(s.tokens) for s in seqs], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    num_anchors = np.maximum(lengths - 1, 0)
    # anchor -> (its sequence's start, local j, sequence length), without a per-anchor loop
    seq_of = np.repeat(np.arange(len(seqs)), num_anchors)
    local_j = np.arange(num_anchors.sum()) - np.repeat(np.cumsum(num_anchors) - num_anchors, num_anchors)
    start, n = starts[seq_of], lengths[seq_of]
    local_pos = local_j[:, None] + np.arange(1, K + 1)[None, :]  # j + i: input token and target position
    mask = local_pos <= n[:, None] - 1
    flat = start[:, None] + np.minimum(local_pos, n[:, None] - 1)  # clamped into the sequence; masked anyway
    cat = {f: np.concatenate([getattr(s, f) for s in seqs])
           for f in ("tokens", "hidden", "topk_ids", "topk_logprobs", "tail_logprob")}
    # on-policy anchors (train.anchors): every token fed to the drafter up to step i (g0 .. tokens[j+i]) is the
    # teacher's argmax after the one before it, i.e. the path greedy decoding would have taken. A sequence's
    # first position is never fed (local_pos >= 1), so the comparison across sequence boundaries is unused.
    agrees = np.zeros(len(cat["tokens"]), dtype=bool)
    agrees[1:] = cat["tokens"][1:] == cat["topk_ids"][:-1, 0]
    on_policy = np.logical_and.accumulate(agrees[flat], axis=1) & mask
    return {
        "h_NH": torch.from_numpy(cat["hidden"][start + local_j].astype(np.float32)),
        "tokens_NK": torch.from_numpy(np.where(mask, cat["tokens"][flat], 0).astype(np.int64)),
        "topk_ids_NKk": torch.from_numpy(cat["topk_ids"][flat].astype(np.int64)),
        "topk_logprobs_NKk": torch.from_numpy(cat["topk_logprobs"][flat].astype(np.float32)),
        "tail_logprob_NK": torch.from_numpy(cat["tail_logprob"][flat].astype(np.float32)),
        "mask_NK": torch.from_numpy(mask),
        "on_policy_NK": torch.from_numpy(on_policy),
        "num_tokens": torch.tensor(int(lengths.sum())),
    }


def position_weights(K: int, decay: float) -> torch.Tensor:
    """decay**(i-1) for draft positions i = 1..K, normalized to sum 1."""
    w = torch.tensor([decay ** i for i in range(K)], dtype=torch.float32)
    if not torch.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"train.position_weight_decay={decay} gives unusable position weights {w.tolist()}")
    return w / w.sum()


def distill_loss(logits_NKV: torch.Tensor, batch: dict[str, torch.Tensor], weights_K: torch.Tensor,
                 t2d_V: torch.Tensor | None = None, d2t: torch.Tensor | None = None, objective: str = "kl",
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, stats). stats holds per-position SUMS (kl_sum_K, top1_sum_K, count_K, and on_policy_top1_sum_K,
    on_policy_count_K where the batch marks on-policy anchors) so that they can be added over batches and
    ranks before dividing; see `position_metrics`. With a draft
    vocabulary, logits are over its N tokens and t2d_V / d2t map base ids <-> draft indices.
    objective "kl" minimizes the KL above; "ce" the reference's hard-label cross-entropy on the teacher's
    top-1 token (the regenerated response token, for a greedy teacher); KL is reported either way."""
    if objective not in ("kl", "ce"):
        raise ValueError(f"loss objective must be kl or ce, got {objective!r}")
    logits = logits_NKV.float()
    log_z = logits.logsumexp(-1, keepdim=True)  # [N, K, 1]
    ids = batch["topk_ids_NKk"]
    p_top = batch["topk_logprobs_NKk"]
    if t2d_V is not None:  # teacher top-k -> draft indices; the ones outside the draft vocabulary drop out
        ids = t2d_V[ids]
        inside = ids >= 0
        ids = ids.clamp_min(0)  # index 0 stands in for dropped entries: excluded below, never a real target
        p_top = torch.where(inside, p_top, float("-inf"))
    q_top = logits.gather(-1, ids) - log_z  # drafter log-probs on the teacher's top-k
    # drafter tail: mass outside the top-k, as a logsumexp over those logits (no 1 - sum cancellation)
    if t2d_V is None:
        outside_topk = logits.scatter(-1, ids, float("-inf"))
    else:  # only the kept (draftable) top-k ids leave the tail; scatter_add is order-independent
        hits = torch.zeros_like(logits, dtype=torch.int32).scatter_add_(-1, ids, inside.to(torch.int32))
        outside_topk = logits.masked_fill(hits > 0, float("-inf"))
    q_tail = (outside_topk.logsumexp(-1, keepdim=True) - log_z).clamp_min(_LOG_FLOOR)
    p_log = torch.cat([p_top, batch["tail_logprob_NK"].unsqueeze(-1)], -1)
    if t2d_V is not None:  # condition on "the token is draftable": renormalize over the kept buckets
        p_log = p_log - p_log.logsumexp(-1, keepdim=True)
    p_log = p_log.clamp_min(_LOG_FLOOR)
    q_log = torch.cat([q_top, q_tail], -1)
    kl_NK = (p_log.exp() * (p_log - q_log)).sum(-1)

    mask = batch["mask_NK"].to(kl_NK.dtype)
    count_K = mask.sum(0)
    kl_sum_K = (kl_NK * mask).sum(0)
    if objective == "kl":
        obj_sum_K, obj_count_K = kl_sum_K, count_K
    else:  # a top-1 outside the draft vocabulary cannot be a hard label: those anchors do not count
        obj_mask = mask if t2d_V is None else mask * inside[..., 0].to(mask.dtype)
        obj_sum_K, obj_count_K = (-q_top[..., 0] * obj_mask).sum(0), obj_mask.sum(0)
    present = (obj_count_K > 0).to(kl_NK.dtype)  # positions no anchor reaches carry no weight this batch
    w = weights_K.to(kl_NK) * present
    loss = (w * obj_sum_K / obj_count_K.clamp_min(1)).sum() / w.sum().clamp_min(1e-12)

    with torch.no_grad():
        best = logits.argmax(-1) if d2t is None else d2t[logits.argmax(-1)]  # as a base token id
        top1_NK = (best == batch["topk_ids_NKk"][..., 0]).to(kl_NK.dtype)
        stats = {"kl_sum_K": kl_sum_K.detach(), "top1_sum_K": (top1_NK * mask).sum(0), "count_K": count_K}
        if "on_policy_NK" in batch:  # the same sums over the on-policy anchors (make_batch), from the same logits
            on_policy = mask * batch["on_policy_NK"].to(mask.dtype)
            stats.update(on_policy_top1_sum_K=(top1_NK * on_policy).sum(0), on_policy_count_K=on_policy.sum(0))
    return loss, stats


def add_stats(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in b.items()} if a is None else {k: a[k] + b[k] for k in a}


def position_metrics(stats: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
    """{prefix}kl_{i} and {prefix}top1_{i} for draft positions i = 1..K (means over valid anchors)."""
    count = stats["count_K"].clamp_min(1)
    out = {}
    for i, (kl, top1) in enumerate(zip((stats["kl_sum_K"] / count).tolist(), (stats["top1_sum_K"] / count).tolist())):
        out[f"{prefix}kl_{i + 1}"] = kl
        out[f"{prefix}top1_{i + 1}"] = top1
    return out

