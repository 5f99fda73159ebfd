"""Anchor batches and the distillation loss (pipeline/loss.py) on hand-built teacher sequences."""

import math

import numpy as np
import pytest
import torch

from pipeline.loss import distill_loss, make_batch, position_metrics, position_weights
from pipeline.shards import TeacherSequence


def teacher_from_logprobs(tokens: list[int], logprobs_nV: torch.Tensor, k: int, H: int = 4, seed: int = 0):
    """A TeacherSequence whose top-k / tail entries are taken from a full next-token distribution."""
    top_lp, top_ids = logprobs_nV.topk(k, dim=-1)
    tail = logprobs_nV.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    hidden = np.random.default_rng(seed).standard_normal((len(tokens), H)).astype(np.float16)
    return TeacherSequence("p", 3, np.asarray(tokens, np.int32), hidden, top_ids.int().numpy(),
                           top_lp.float().numpy(), tail.float().numpy())


def random_teacher(n: int, V: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logprobs = torch.log_softmax(3 * torch.randn(n, V, generator=g), -1)
    tokens = torch.randint(0, V, (n,), generator=g).tolist()
    return teacher_from_logprobs(tokens, logprobs, k, seed=seed), logprobs


def test_make_batch_anchor_layout():
    """Anchor j, step i: input tokens[j+i] (column i-1), target = teacher at position j+i, valid iff j+i <= n-1."""
    K, V, k = 3, 11, 2
    a, lp_a = random_teacher(4, V, k, seed=1)  # 3 anchors
    b, lp_b = random_teacher(2, V, k, seed=2)  # 1 anchor
    batch = make_batch([a, b], K)
    assert batch["h_NH"].shape == (4, 4) and batch["tokens_NK"].shape == (4, K)
    assert batch["topk_ids_NKk"].shape == (4, K, k) and batch["tail_logprob_NK"].shape == (4, K)
    assert int(batch["num_tokens"]) == 6
    assert batch["mask_NK"].tolist() == [[True, True, True], [True, True, False], [True, False, False],
                                         [True, False, False]]
    for row, (seq, j) in enumerate([(a, 0), (a, 1), (a, 2), (b, 0)]):
        np.testing.assert_array_equal(batch["h_NH"][row].numpy(), seq.hidden[j].astype(np.float32))
        for c in range(K):
            pos = j + 1 + c
            if pos > len(seq.tokens) - 1:
                continue
            assert batch["tokens_NK"][row, c] == seq.tokens[pos]  # step c+1 consumed tokens[j+1..j+c+1]
            np.testing.assert_array_equal(batch["topk_ids_NKk"][row, c].numpy(), seq.topk_ids[pos])
            np.testing.assert_array_equal(batch["topk_logprobs_NKk"][row, c].numpy(), seq.topk_logprobs[pos])
            assert batch["tail_logprob_NK"][row, c] == seq.tail_logprob[pos]


def test_on_policy_anchors_follow_the_teachers_own_greedy_path():
    """on_policy_NK[anchor j, step i]: tokens[j+1 .. j+i] each are the teacher's argmax after the token before
    (greedy decoding could have fed them); across two sequences, never mixing them up."""
    from pipeline.train import training_anchors

    V = 9
    # the teacher's argmax after each position: 5, 6, 7, 8, 1 (the last is never a fed token's predecessor)
    logprobs = torch.log_softmax(torch.nn.functional.one_hot(torch.tensor([5, 6, 7, 8, 1]), V).float() * 4, -1)
    seq = teacher_from_logprobs([0, 5, 6, 2, 8], logprobs, k=2)  # tokens 1, 2 on the path; 3 is not (2 != 7); 4 is
    other = teacher_from_logprobs([3, 1], torch.log_softmax(torch.zeros(2, V), -1), k=2)  # a tie: argmax is id 0
    batch = make_batch([seq, other], 3)
    assert batch["on_policy_NK"].tolist() == [
        [True, True, False],    # anchor 0: fed 5 (ok), 6 (ok), 2 (not 7)
        [True, False, False],   # anchor 1: fed 6 (ok), 2 (no)
        [False, False, False],  # anchor 2: fed 2 (no), then 8 would be on the path but follows a miss
        [True, False, False],   # anchor 3: fed 8 (the argmax after 2), then past the end (masked)
        [False, False, False],  # the other sequence: fed 1, the teacher's argmax after 3 is 0
    ]
    assert not (batch["on_policy_NK"] & ~batch["mask_NK"]).any()
    assert training_anchors(batch, "all") is batch
    masked = training_anchors(batch, "on_policy")
    assert masked["mask_NK"].tolist() == batch["on_policy_NK"].tolist() and batch["mask_NK"][0].all()  # a copy
    with pytest.raises(ValueError, match="train.anchors"):
        training_anchors(batch, "some")
    # the loss's stats carry the on-policy sums from the same logits: equal to the sums over the masked batch
    logits = torch.randn(5, 3, V, generator=torch.Generator().manual_seed(3))
    logits[0, 0, 6] = logits[1, 0, 7] = 9.0  # top-1 agrees with the teacher at two on-policy anchors
    _, stats = distill_loss(logits, batch, torch.ones(3))
    _, alone = distill_loss(logits, masked, torch.ones(3))
    assert torch.equal(stats["on_policy_count_K"], alone["count_K"]) and stats["on_policy_count_K"].tolist() == [3, 1, 0]
    assert torch.equal(stats["on_policy_top1_sum_K"], alone["top1_sum_K"]) and stats["on_policy_top1_sum_K"].sum() > 0


def _logits_like_teacher(batch_seqs, logprobs, K):
    """Drafter logits equal to the teacher's full log-softmax at every (anchor, step) target position."""
    rows = []
    for seq_lp, n in logprobs:
        for j in range(n - 1):
            rows.append(torch.stack([seq_lp[min(j + 1 + c, n - 1)] for c in range(K)]))
    return torch.stack(rows)


def test_kl_is_zero_for_the_teacher_itself_and_positive_otherwise():
    K, V, k = 3, 50, 5
    (a, lp_a), (b, lp_b) = random_teacher(7, V, k, 3), random_teacher(5, V, k, 4)
    batch = make_batch([a, b], K)
    w = position_weights(K, 0.8)
    logits = _logits_like_teacher([a, b], [(lp_a, 7), (lp_b, 5)], K) + 1.7  # a shift changes nothing
    loss, stats = distill_loss(logits, batch, w)
    assert abs(loss.item()) < 1e-5
    metrics = position_metrics(stats, "t/")
    assert all(metrics[f"t/top1_{i}"] == 1.0 and abs(metrics[f"t/kl_{i}"]) < 1e-5 for i in (1, 2, 3))

    other = torch.randn(logits.shape, requires_grad=True)
    loss2, _ = distill_loss(other, batch, w)
    assert loss2.item() > 0.1
    loss2.backward()
    assert other.grad is not None and other.grad.abs().sum() > 0 and torch.isfinite(other.grad).all()


def test_masked_targets_do_not_change_the_loss():
    K, V, k = 4, 30, 3
    a, _ = random_teacher(4, V, k, 5)
    batch = make_batch([a], K)
    logits = torch.randn(*batch["tokens_NK"].shape, V)
    loss, stats = distill_loss(logits, batch, position_weights(K, 0.9))
    mask = batch["mask_NK"]
    assert not mask.all()
    poisoned = dict(batch)
    poisoned["topk_logprobs_NKk"] = torch.where(mask[..., None], batch["topk_logprobs_NKk"], torch.tensor(-0.01))
    poisoned["tail_logprob_NK"] = torch.where(mask, batch["tail_logprob_NK"], torch.tensor(5.0))
    poisoned["topk_ids_NKk"] = torch.where(mask[..., None], batch["topk_ids_NKk"], torch.tensor(0))
    poisoned_logits = torch.where(mask[..., None], logits, torch.randn_like(logits) * 100)
    loss2, stats2 = distill_loss(poisoned_logits, poisoned, position_weights(K, 0.9))
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
    assert stats2["count_K"].tolist() == stats["count_K"].tolist() == [3.0, 2.0, 1.0, 0.0]


def test_hand_checked_tiny_example():
    """V=3, k=1, one anchor, one draft step: teacher p = (0.7 | tail 0.3 over ids 1, 2);
    drafter logits (0, 0, ln 2) -> q = (1/4, 1/4, 1/2): q_top = 1/4, q_tail = 3/4.
    KL = 0.7 ln(0.7/0.25) + 0.3 ln(0.3/0.75)."""
    seq = TeacherSequence("p", 1, np.array([2, 0], np.int32), np.zeros((2, 2), np.float16),
                          np.array([[1], [0]], np.int32), np.log(np.array([[0.5], [0.7]], np.float32)),
                          np.log(np.array([0.5, 0.3], np.float32)))
    batch = make_batch([seq], 1)
    assert batch["tokens_NK"].tolist() == [[0]] and batch["topk_ids_NKk"].tolist() == [[[0]]]
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)]]])
    loss, stats = distill_loss(logits, batch, position_weights(1, 1.0))
    expected = 0.7 * math.log(0.7 / 0.25) + 0.3 * math.log(0.3 / 0.75)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert position_metrics(stats, "")["top1_1"] == 0.0  # drafter argmax is id 2, teacher's top-1 is id 0


def test_position_weights():
    w = position_weights(4, 0.5)
    assert torch.allclose(w, torch.tensor([8.0, 4.0, 2.0, 1.0]) / 15)
    with pytest.raises(ValueError):
        position_weights(3, float("inf"))
