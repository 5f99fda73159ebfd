"""Beam search (eval/beam.py) and dynamic tree attention (eval/tree.py), on tiny random models.

    python -m pytest tests/test_tree.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from eval.beam import draft
from eval.decoder import forward_tree, prefill
from eval.tree import pack_tree
from pipeline.drafter import build_drafter, make_arch

IMPLS = ["eager", "sdpa"]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spinning
    made these tests 15x slower (5 s -> 75 s). Restored afterwards for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(attn_implementation: str, vocab_size: int = 256, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.1,  # wider than the default so greedy argmaxes are not near-ties
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


# ---- pack_tree --------------------------------------------------------------------------------

def test_pack_tree_hand_example():
    beams = torch.tensor([[[5, 1, 2], [5, 1, 3], [5, 4, 2]]])
    tree = pack_tree(beams)
    # Unique prefixes: (5) (5,1) (5,1,2) | (5,1,3) | (5,4) (5,4,2): 6 of W * L = 9 tokens.
    assert tree.num_packed_B.tolist() == [6]
    assert tree.tokens_BP.tolist() == [[5, 1, 2, 3, 4, 2]]
    assert tree.depth_BP.tolist() == [[0, 1, 2, 2, 1, 2]]
    assert tree.unpacker_BWL.tolist() == [[[0, 1, 2], [0, 1, 3], [0, 4, 5]]]
    expected_mask = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 0, 0, 0, 1, 0],
        [1, 0, 0, 0, 1, 1],
    ]
    assert tree.tree_mask_BPP.int().tolist() == [expected_mask]


def test_pack_tree_pads_rows_to_the_largest_tree():
    beams = torch.tensor([[[5, 1, 2], [5, 1, 3], [5, 4, 2]],
                          [[7, 7, 7], [7, 7, 7], [7, 7, 8]]])
    tree = pack_tree(beams)
    assert tree.num_packed_B.tolist() == [6, 4]
    assert tree.tokens_BP[1].tolist() == [7, 7, 7, 8, 0, 0]
    assert tree.unpacker_BWL[1].tolist() == [[0, 1, 2], [0, 1, 2], [0, 1, 3]]
    assert tree.tree_mask_BPP[1, 4:].int().tolist() == [[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]  # pads: self only


def reference_pack(beams_WL: list[list[int]]):
    """Loop-by-loop reference: a dict from prefix to packed index, beam-major then depth."""
    index_of, unpacker, parents = {}, [], {}
    for beam in beams_WL:
        row = []
        for k in range(len(beam)):
            prefix = tuple(beam[:k + 1])
            if prefix not in index_of:
                index_of[prefix] = len(index_of)
                parents[index_of[prefix]] = row[-1] if row else None
            row.append(index_of[prefix])
        unpacker.append(row)
    return index_of, unpacker, parents


def test_pack_tree_matches_loop_reference_on_random_beams():
    gen = torch.Generator().manual_seed(0)
    beams = torch.randint(0, 3, (16, 5, 4), generator=gen)  # 3 tokens: lots of sharing
    beams[:, :, 0] = beams[:, :1, 0]  # all beams share g0, as drafted beams do
    tree = pack_tree(beams)
    P = tree.size
    for b in range(beams.shape[0]):
        index_of, unpacker, parents = reference_pack(beams[b].tolist())
        assert tree.unpacker_BWL[b].tolist() == unpacker
        assert int(tree.num_packed_B[b]) == len(index_of)
        mask = torch.eye(P, dtype=torch.bool)
        for p in range(len(index_of)):
            ancestor = parents[p]
            while ancestor is not None:
                mask[p, ancestor] = True
                ancestor = parents[ancestor]
        assert torch.equal(tree.tree_mask_BPP[b], mask)
    assert torch.equal(tree.tokens_BP.gather(1, tree.unpacker_BWL.flatten(1)).view_as(beams), beams)
    assert (tree.unpacker_BWL.diff(dim=-1) > 0).all()  # ancestors are packed before descendants
    assert torch.equal(tree.depth_BP.gather(1, tree.unpacker_BWL.flatten(1)).view_as(beams),
                       torch.arange(4).expand_as(beams))


def test_pack_tree_without_dedup_packs_every_token():
    beams = torch.tensor([[[5, 1, 2], [5, 1, 3], [5, 4, 2]]])
    tree = pack_tree(beams, dedup=False)
    assert tree.num_packed_B.tolist() == [9]
    assert tree.unpacker_BWL.tolist() == [torch.arange(9).view(3, 3).tolist()]
    assert torch.equal(tree.tree_mask_BPP[0], torch.block_diag(*[torch.ones(3, 3).tril()] * 3).bool())


# ---- packed forward == each path alone ----------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dedup", [True, False])
def test_packed_forward_equals_each_beam_alone(impl, dedup):
    model = tiny_llama(impl)
    gen = torch.Generator().manual_seed(1)
    contexts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (7, 11)]
    beams = torch.tensor([[[5, 1, 2, 7], [5, 1, 3, 7], [5, 4, 2, 2], [5, 1, 2, 9]],
                          [[9, 9, 9, 9], [9, 9, 8, 1], [9, 3, 3, 3], [9, 9, 9, 8]]])
    with torch.no_grad():
        # Ragged contexts: row 0 has stale slots 7..10 below the shared write slot S = 11.
        state = prefill(model, contexts, max_cache_len=48, max_new_tokens=1, eos_token_id=None)
        tree = pack_tree(beams, dedup=dedup)
        hidden_BPD, logits_BPV, write_at = forward_tree(model, state, tree)
        assert write_at == 11
        for b, context in enumerate(contexts):
            for w in range(beams.shape[1]):
                alone = model(torch.tensor([context + beams[b, w].tolist()]), output_hidden_states=True)
                path = tree.unpacker_BWL[b, w]
                torch.testing.assert_close(logits_BPV[b, path], alone.logits[0, len(context):], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(hidden_BPD[b, path], alone.hidden_states[-1][0, len(context):],
                                           atol=1e-4, rtol=1e-4)


# ---- beam search --------------------------------------------------------------------------------

def tiny_drafter(vocab_size: int = 64, hidden: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    embed = torch.randn(vocab_size, hidden)
    drafter = build_drafter(make_arch(vocab_size, hidden), embed, seed=seed)
    for block in drafter.lm_head[:-1]:  # the reference init is identity; make the blocks matter
        torch.nn.init.normal_(block.linear.weight, std=0.3)
    return drafter.eval()


def loop_beam_search(drafter, h_H, g0: int, W: int, L: int):
    """One row, one beam at a time: the same search written with Python loops."""
    beams = [([g0], 0.0, drafter.init_state(h_H))]
    for _ in range(1, L):
        candidates = []
        for tokens, score, state in beams:
            state = drafter.next_state(state, torch.tensor(tokens[-1]))
            log_probs = F.log_softmax(drafter.logits(h_H, state), dim=-1)
            candidates += [(tokens + [v], score + float(log_probs[v]), state) for v in range(log_probs.shape[-1])]
        beams = sorted(candidates, key=lambda c: -c[1])[:W]
    return [b[0] for b in beams], [b[1] for b in beams]


def test_draft_matches_loop_beam_search_and_keeps_teacher_forced_log_probs():
    drafter = tiny_drafter()
    gen = torch.Generator().manual_seed(0)
    h_BH, g0_B = torch.randn(3, 16, generator=gen), torch.tensor([4, 9, 63])
    W, L = 4, 4
    with torch.no_grad():
        beams = draft(drafter, h_BH, g0_B, W, L, top_logits=0)  # the unprocessed distribution
        assert beams.tokens_BWL.shape == (3, W, L)
        assert torch.equal(beams.tokens_BWL[..., 0], g0_B[:, None].expand(3, W))
        for b in range(3):
            tokens, scores = loop_beam_search(drafter, h_BH[b], int(g0_B[b]), W, L)
            assert beams.tokens_BWL[b].tolist() == tokens
            torch.testing.assert_close(beams.scores_BW[b], torch.tensor(scores), atol=1e-4, rtol=0)
        # Only beam 0 is alive at depth 1 (all beams are g0): the W first drafts are distinct.
        first = draft(drafter, h_BH, g0_B, W, 2, top_logits=0).tokens_BWL[..., 1]
        assert all(len(set(row)) == W for row in first.tolist())
        # Kept log-probs are the drafter's teacher-forced distributions along each beam.
        N = 3 * W
        forced = F.log_softmax(drafter(h_BH.repeat_interleave(W, 0), beams.tokens_BWL.view(N, L)), dim=-1)
        torch.testing.assert_close(beams.log_probs_BWKV.view(N, L - 1, -1), forced[:, :L - 1], atol=1e-5, rtol=0)
        kept = beams.log_probs_BWKV.gather(-1, beams.tokens_BWL[..., 1:, None]).squeeze(-1).sum(-1)
        torch.testing.assert_close(kept, beams.scores_BW, atol=1e-4, rtol=0)
        # W = 1 without distributions takes the greedy-chain path: same tokens and scores as the search.
        for L1 in (1, 2, 5):
            chain = draft(drafter, h_BH, g0_B, 1, L1, keep_log_probs=False, top_logits=0)
            assert chain.log_probs_BWKV is None
            for b in range(3):
                tokens, scores = loop_beam_search(drafter, h_BH[b], int(g0_B[b]), 1, L1)
                assert chain.tokens_BWL[b].tolist() == tokens
                torch.testing.assert_close(chain.scores_BW[b], torch.tensor(scores), atol=1e-4, rtol=0)


def reference_rule_beam_search(drafter, h_H, g0: int, W: int, L: int, keep: int = 50):
    """An independent (numpy, one beam at a time) implementation of the reference's search: per drafter
    row, subtract the max, keep the `keep` largest logits, set all others to -5e4, then log-softmax; the
    W best (joint score) continuations of all live beams survive, best first."""
    beams = [([g0], 0.0, drafter.init_state(h_H))]
    for _ in range(1, L):
        candidates = []
        for tokens, score, state in beams:
            state = drafter.next_state(state, torch.tensor(tokens[-1]))
            logits = drafter.logits(h_H, state).double().numpy()
            logits = logits - logits.max()
            processed = np.full_like(logits, -5e4)
            top = np.argsort(-logits, kind="stable")[:keep]
            processed[top] = logits[top]
            log_probs = processed - np.log(np.exp(processed).sum())
            candidates += [(tokens + [v], score + float(log_probs[v]), state) for v in range(len(log_probs))]
        beams = sorted(candidates, key=lambda c: -c[1])[:W]
    return [b[0] for b in beams], [b[1] for b in beams]


@pytest.mark.parametrize("W", [1, 4, 8, 60])
def test_draft_is_the_reference_search_over_the_top_50_logits(W):
    """Identical beams and scores to an independent implementation of the reference's rule (W = 60 >
    50: the extra beams come from -5e4 logits at depth 1 and are outscored at depth 2, as in the reference)."""
    drafter = tiny_drafter(vocab_size=300)
    gen = torch.Generator().manual_seed(1)
    h_BH, g0_B = torch.randn(2, 16, generator=gen), torch.tensor([4, 250])
    L = 4
    with torch.no_grad():
        for keep_log_probs in (True, False):
            beams = draft(drafter, h_BH, g0_B, W, L, keep_log_probs=keep_log_probs)  # top_logits=50 by default
            for b in range(2):
                tokens, scores = reference_rule_beam_search(drafter, h_BH[b], int(g0_B[b]), W, L)
                assert beams.tokens_BWL[b].tolist() == tokens
                torch.testing.assert_close(beams.scores_BW[b].double(), torch.tensor(scores, dtype=torch.float64), atol=2e-4, rtol=0)
        if W > 1:  # the rule matters: the unprocessed search differs in members or order
            plain = draft(drafter, h_BH, g0_B, W, L, top_logits=0)
            assert not torch.equal(plain.scores_BW, beams.scores_BW)


def test_draft_edge_cases():
    drafter = tiny_drafter(vocab_size=8)
    h_BH, g0_B = torch.randn(2, 16), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        draft(drafter, h_BH, g0_B, beam_width=9, beam_length=3)
    full = draft(drafter, h_BH, g0_B, beam_width=8, beam_length=2)  # W == V: every first token once
    assert sorted(full.tokens_BWL[0, :, 1].tolist()) == list(range(8))
    only_g0 = draft(drafter, h_BH, g0_B, beam_width=3, beam_length=1)
    assert only_g0.tokens_BWL.tolist() == [[[1]] * 3, [[2]] * 3]
