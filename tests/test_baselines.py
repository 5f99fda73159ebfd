"""Training-free baselines (eval/baselines.py, eval/lookahead.py) on tiny random Llamas.

    python -m pytest tests/test_baselines.py -q

Losslessness is checked token for token against `model.generate(do_sample=False)` with EOS stopping on
prompts of 1..24 tokens; Lookahead's packed mask and positions by hand and against a plain forward
over each packed token's visible sequence; acceleration on a prompt whose greedy continuation repeats.
"""

from __future__ import annotations

import pytest
import torch

import eval.decoder as decoder_module
from eval.baselines import assisted_steps, lookahead_generate, prompt_lookup_generate
from eval.decoder import prefill
from eval.lookahead import LookaheadDecoder, NgramPool, pack_lookahead
from eval.metrics import DecodeStats
from eval.tree import pack_tree
from tests.test_decoder import assert_cache_matches_prefill, hf_greedy, make_prompts, ragged_eos_case
from tests.test_tree import IMPLS, single_thread, tiny_llama  # noqa: F401  (single_thread: autouse fixture)

V = 256
MAX_NEW = 16
REPETITIVE_PROMPT = [5, 6, 7, 8] * 6  # the tiny model's greedy continuation cycles (124 127 169)*5


@pytest.fixture(scope="module", params=IMPLS)
def setup(request):
    """model, 10 prompts of different lengths, an EOS the model often emits (some rows stop early,
    others run to MAX_NEW) and HF's greedy outputs."""
    model = tiny_llama(request.param)
    prompts = make_prompts(10, seed=0)
    assert len({len(p) for p in prompts}) >= 8
    _, eos, reference = ragged_eos_case(model, prompts, hf_greedy, MAX_NEW)
    return model, prompts, eos, reference


# ---- prompt lookup ----------------------------------------------------------------------------

def test_prompt_lookup_equals_hf_generate(setup):
    model, prompts, eos, reference = setup
    result = prompt_lookup_generate(model, prompts, MAX_NEW, eos)
    assert result.tokens == reference
    stats = result.stats
    # transformers never overshoots: committed tokens per forward add up to exactly the output.
    assert sum(a + 1 for a in stats.accepted) == sum(len(t) for t in reference)
    assert stats.num_forwards == stats.num_steps and stats.tokens_per_step > 1.0
    assert prompt_lookup_generate(model, prompts[:2], 0, eos).tokens == [[], []]


def test_assisted_steps_by_hand():
    # Prompt of 5. Forward 0: prompt + 3 candidates, 1 accepted -> commits 2, cache cropped to 6.
    # Forward 1: last token + 2 candidates, none accepted -> commits 1. Forward 2: no candidates, commits 1.
    committed, verified = assisted_steps([(8, 0), (3, 6), (1, 7)], prompt_len=5, num_new=4)
    assert committed == [2, 1, 1] and verified == [4, 3, 1]


# ---- lookahead: packing ------------------------------------------------------------------------

def test_pack_lookahead_hand_example():
    """W = 3, N = 3, two pooled 3-grams under g0 = 9: verification beams [9 1 2], [9 1 3] and a window
    level 0 = [g0 4 5], level 1 = [6 7 8] (Jacobi guesses at positions ctx + level + column)."""
    beams = torch.tensor([[[9, 1, 2], [9, 1, 3]]])
    window = torch.tensor([[[9, 4, 5], [6, 7, 8]]])
    tree = pack_lookahead(pack_tree(beams), window)
    #            g0 1  2  3 | 4  5 | 6  7  8
    assert tree.tokens_BP.tolist() == [[9, 1, 2, 3, 4, 5, 6, 7, 8]]
    assert tree.depth_BP.tolist() == [[0, 1, 2, 2, 1, 2, 1, 2, 3]]
    assert tree.num_packed_B.tolist() == [9]
    assert tree.unpacker_BWL.tolist() == [[[0, 1, 2], [0, 1, 3]]]
    expected = [
        [1, 0, 0, 0, 0, 0, 0, 0, 0],  # g0 (= window cell (0, 0))
        [1, 1, 0, 0, 0, 0, 0, 0, 0],  # 1: g0 1
        [1, 1, 1, 0, 0, 0, 0, 0, 0],  # 2: g0 1 2
        [1, 1, 0, 1, 0, 0, 0, 0, 0],  # 3: g0 1 3
        [1, 0, 0, 0, 1, 0, 0, 0, 0],  # 4 = (0, 1): g0 4
        [1, 0, 0, 0, 1, 1, 0, 0, 0],  # 5 = (0, 2): g0 4 5
        [1, 0, 0, 0, 0, 0, 1, 0, 0],  # 6 = (1, 0): g0 6
        [1, 0, 0, 0, 1, 0, 0, 1, 0],  # 7 = (1, 1): g0 4 7
        [1, 0, 0, 0, 1, 1, 0, 0, 1],  # 8 = (1, 2): g0 4 5 8
    ]
    assert tree.tree_mask_BPP.int().tolist() == [expected]


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_logits_equal_plain_forward_over_visible_sequence(impl):
    """Every packed token's logits == a plain forward over the context + the packed tokens it sees,
    in depth order; the seen tokens' depths are exactly 0..depth (consecutive positions)."""
    model = tiny_llama(impl)
    prompts = [[11, 12, 13, 14, 15], [21, 22]]  # ragged: row 1's slots [2, 5) are stale and masked
    W, N = 3, 4
    with torch.no_grad():
        state = prefill(model, prompts, max_cache_len=64, max_new_tokens=8, eos_token_id=None)
        g0 = state.g0_B
        beams = torch.stack([torch.stack([torch.cat([g0[b:b + 1], torch.tensor(c)]) for c in conts])
                             for b, conts in enumerate([[[3, 4, 5], [3, 6, 7]], [[8, 9, 10], [8, 9, 10]]])])
        window = torch.randint(3, V, (2, N - 1, W), generator=torch.Generator().manual_seed(0))
        window[:, 0, 0] = g0
        verification = pack_tree(beams)  # row 0 packs 6 tokens, row 1 (a duplicated beam) 4 + 2 pads
        tree = pack_lookahead(verification, window)
        _, logits_BPV, _ = decoder_module.forward_tree(model, state, tree)
        for b, prompt in enumerate(prompts):
            for q in range(tree.size):
                if int(verification.num_packed_B[b]) <= q < verification.size:
                    continue  # pad slot: attends to itself only, output never read
                seen = tree.tree_mask_BPP[b, q].nonzero().flatten()
                depths = tree.depth_BP[b, seen]
                assert sorted(depths.tolist()) == list(range(int(tree.depth_BP[b, q]) + 1))
                visible = tree.tokens_BP[b, seen[depths.argsort()]].tolist()
                expected = model(torch.tensor([prompt + visible])).logits[0, -1]
                torch.testing.assert_close(logits_BPV[b, q], expected, atol=1e-4, rtol=0)


def test_ngram_pool_keeps_the_latest_guess_set_size_continuations():
    pool = NgramPool(size=2)
    pool.add(1, (2, 3))
    pool.add(1, (4, 5))
    pool.add(1, (2, 3))  # known: becomes the newest
    pool.add(1, (6, 7))  # full: the oldest, (4, 5), goes
    assert pool.get(1) == [(2, 3), (6, 7)] and pool.get(2) == []


# ---- lookahead: decoding -----------------------------------------------------------------------

def test_lookahead_batch_1_equals_hf_generate(setup):
    model, prompts, eos, reference = setup
    results = [lookahead_generate(model, [p], MAX_NEW, eos) for p in prompts]
    assert [r.tokens[0] for r in results] == reference
    stats = DecodeStats.merge(r.stats for r in results)
    assert stats.num_forwards == stats.num_steps  # batch 1: one record per base forward
    assert sum(a + 1 for a in stats.accepted) >= sum(len(t) for t in reference)  # may overshoot EOS/max


@pytest.mark.parametrize("window,ngram,guess_set_size,pool_from_prompt",
                         [(5, 4, 5, False), (3, 3, 2, False), (1, 2, 1, False), (4, 5, 3, True)])
def test_lookahead_batched_ragged_equals_hf_generate(setup, window, ngram, guess_set_size, pool_from_prompt):
    model, prompts, eos, reference = setup
    result = lookahead_generate(model, prompts, MAX_NEW, eos, window=window, ngram=ngram,
                                guess_set_size=guess_set_size, pool_from_prompt=pool_from_prompt)
    assert result.tokens == reference
    assert (result.stats.beam_width, result.stats.beam_length) == (guess_set_size, ngram)


def test_accepting_one_token_too_many_breaks_equality(setup, monkeypatch):
    """The losslessness check has teeth here too (pool n-grams are accepted on this data)."""
    model, prompts, eos, reference = setup
    verify = decoder_module.verify  # lookahead verifies through the shared step (eval/decoder.py run_step)

    def cheating_verify(logits_BPV, beams_BWL, unpacker_BWL):
        accept_len_BW, pred_BWL = verify(logits_BPV, beams_BWL, unpacker_BWL)
        return (accept_len_BW + 1).clamp(max=beams_BWL.shape[-1] - 1), pred_BWL

    monkeypatch.setattr(decoder_module, "verify", cheating_verify)
    assert lookahead_generate(model, prompts, MAX_NEW, eos).tokens != reference


def test_cache_matches_fresh_prefill_after_accepted_steps(setup):
    model = setup[0]
    prompts = [REPETITIVE_PROMPT, [40, 41, 42] * 5]
    decoder = LookaheadDecoder(model, window=4, ngram=4, guess_set_size=3, pool_from_prompt=True)
    la = decoder.init_state(prompts)
    stats = DecodeStats(3, 4)
    with torch.no_grad():
        state = prefill(model, prompts, max_cache_len=128, max_new_tokens=60, eos_token_id=None)
        for _ in range(8):
            decoder.step(state, stats, la)
        assert sum(stats.accepted) > 0  # pooled n-grams were accepted and their K/V moved
        assert_cache_matches_prefill(model, state, prompts, check_h=False)


# ---- both ------------------------------------------------------------------------------------

def test_repetitive_prompt_gives_more_than_one_token_per_step(setup):
    """When the greedy continuation repeats, both baselines commit several tokens per forward."""
    model = setup[0]
    reference = hf_greedy(model, [REPETITIVE_PROMPT], 32, None)[0]
    trigrams = list(zip(reference, reference[1:], reference[2:]))
    assert len(set(trigrams)) < len(trigrams) / 2  # precondition: the output really is repetitive
    prompt_lookup = prompt_lookup_generate(model, [REPETITIVE_PROMPT], 32, None)
    lookahead = lookahead_generate(model, [REPETITIVE_PROMPT], 32, None)
    assert prompt_lookup.tokens[0] == reference and lookahead.tokens[0] == reference
    assert prompt_lookup.stats.tokens_per_step > 1.5, prompt_lookup.stats.to_dict()
    assert lookahead.stats.tokens_per_step > 1.5, lookahead.stats.to_dict()
    assert lookahead.stats.num_forwards < len(reference) and prompt_lookup.stats.num_forwards < len(reference)


def test_edge_cases(setup):
    model, prompts, eos, _ = setup
    assert lookahead_generate(model, prompts[:2], 0, eos).tokens == [[], []]
    for generate in (lookahead_generate, prompt_lookup_generate):
        with pytest.raises(ValueError, match="non-empty"):
            generate(model, [[]], 4, eos)
    with pytest.raises(ValueError, match="ngram >= 2"):
        lookahead_generate(model, prompts[:1], 4, eos, ngram=1)
    with pytest.raises(ValueError, match="num_tokens >= 1"):
        prompt_lookup_generate(model, prompts[:1], 4, eos, num_tokens=0)
