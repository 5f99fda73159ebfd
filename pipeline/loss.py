"""Distillation batches and loss (spec section 4): forward KL(teacher || drafter) per draft position.

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
    return {
        "h_NH": torch.from_numpy(cat["hidden"][start + local_j].astype(np.float32)),
        "tokens_NK": torch.from_numpy(np.where(mask, cat["tokens"][flat], 0).astype(np.int64)),
        "topk_ids_NKk": torch.from_numpy(cat["topk_ids"][flat].astype(np.int64)),
        "topk_logprobs_NKk": torch.from_numpy(cat["topk_logprobs"][flat].astype(np.float32)),
        "tail_logprob_NK": torch.from_numpy(cat["tail_logprob"][flat].astype(np.float32)),
        "mask_NK": torch.from_numpy(mask),
        "num_tokens": torch.tensor(int(lengths.sum())),
    }


def position_weights(K: int, decay: float) -> torch.Tensor:
    """decay**(i-1) for draft positions i = 1..K, normalized to sum 1."""
    w = torch.tensor([decay ** i for i in range(K)], dtype=torch.float32)
    if not torch.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"train.position_weight_decay={decay} gives unusable position weights {w.tolist()}")
    return w / w.sum()


def distill_loss(logits_NKV: torch.Tensor, batch: dict[str, torch.Tensor],
                 weights_K: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, stats). stats holds per-position SUMS (kl_sum_K, top1_sum_K, count_K) so that they
    can be added over batches and ranks before dividing; see `position_metrics`."""
    logits = logits_NKV.float()
    log_z = logits.logsumexp(-1, keepdim=True)  # [N, K, 1]
    ids = batch["topk_ids_NKk"]
    q_top = logits.gather(-1, ids) - log_z  # drafter log-probs on the teacher's top-k
    # drafter tail: mass outside the top-k, as a logsumexp over those logits (no 1 - sum cancellation)
    q_tail = (logits.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True) - log_z).clamp_min(_LOG_FLOOR)
    p_log = torch.cat([batch["topk_logprobs_NKk"], batch["tail_logprob_NK"].unsqueeze(-1)], -1).clamp_min(_LOG_FLOOR)
    q_log = torch.cat([q_top, q_tail], -1)
    kl_NK = (p_log.exp() * (p_log - q_log)).sum(-1)

    mask = batch["mask_NK"].to(kl_NK.dtype)
    count_K = mask.sum(0)
    kl_sum_K = (kl_NK * mask).sum(0)
    present = (count_K > 0).to(kl_NK.dtype)  # positions no anchor reaches carry no weight this batch
    w = weights_K.to(kl_NK) * present
    loss = (w * kl_sum_K / count_K.clamp_min(1)).sum() / w.sum().clamp_min(1e-12)

    with torch.no_grad():
        top1_NK = (logits.argmax(-1) == ids[..., 0]).to(kl_NK.dtype)
        stats = {"kl_sum_K": kl_sum_K.detach(), "top1_sum_K": (top1_NK * mask).sum(0), "count_K": count_K}
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

