"""Hybrid drafting (eval/ngram.py, SpeculativeDecoder(ngram=N)): the drafter's beams and one
prompt-lookup path in the same packed tree, verified by the same single forward.

    python -m pytest tests/test_hybrid.py -q

The lookup is checked against a plain-Python implementation of its rule on random texts; the hybrid
decoder token for token against `model.generate(do_sample=False)`, on prompts that repeat themselves
(so the lookup path is really taken) and on random ones.
"""

from __future__ import annotations

import pytest
import torch

from eval.decoder import plain_greedy, plain_step, prefill
from eval.metrics import DecodeStats
from eval.ngram import history, lookup_paths
from eval.speculative import SpeculativeDecoder
from tests.test_decoder import TableDrafter, V, hf_greedy, make_prompts, random_drafter
from tests.test_tree import single_thread, tiny_llama  # noqa: F401  (single_thread: autouse fixture)

MAX_NEW = 24


def lookup_reference(text: list[int], length: int, max_ngram: int, min_ngram: int) -> list[int] | None:
    """The rule, spelled out: the longest suffix n (max..min) with an earlier occurrence whose whole
    continuation of length - 1 tokens is known; the most recent such occurrence."""
    end = len(text) - 1
    for n in range(max_ngram, min_ngram - 1, -1):
        if end < n:
            continue
        suffix = text[end - n + 1:]
        starts = [i for i in range(end) if text[i:i + n] == suffix and i + n + max(length - 2, 0) <= end]
        if starts:
            i = max(starts)
            return [text[end]] + text[i + n:i + n + length - 1]
    return None


@pytest.mark.parametrize("length", [1, 2, 4, 6])
@pytest.mark.parametrize("ngrams", [(3, 1), (2, 2), (4, 2)])
def test_lookup_matches_the_rule_on_random_texts(length, ngrams):
    max_ngram, min_ngram = ngrams
    gen = torch.Generator().manual_seed(length * 10 + max_ngram)
    for trial in range(20):
        B = 5
        lengths = torch.randint(1, 40, (B,), generator=gen)
        C = int(lengths.max()) + 3
        vocab = 3 if trial % 2 else 6  # small alphabets: many matches, some rows with none
        seq = torch.randint(0, vocab, (B, C), generator=gen)
        end = lengths - 1
        path, found = lookup_paths(seq, end, length, max_ngram, min_ngram)
        for b in range(B):
            expect = lookup_reference(seq[b, :int(end[b]) + 1].tolist(), length, max_ngram, min_ngram)
            assert bool(found[b]) == (expect is not None), (b, seq[b], end[b])
            if expect is not None:
                assert path[b].tolist() == expect
            assert int(path[b, 0]) == int(seq[b, end[b]])


def test_lookup_refuses_bad_settings():
    seq = torch.zeros(1, 4, dtype=torch.long)
    for args in [(0, 3, 1), (3, 1, 2), (3, 2, 0)]:
        with pytest.raises(ValueError, match="need length"):
            lookup_paths(seq, torch.tensor([3]), *args)


def test_history_is_prompt_plus_committed_tokens_plus_g0():
    model = tiny_llama("sdpa")
    prompts = make_prompts(3, seed=4)
    state = prefill(model, prompts, max_cache_len=64, max_new_tokens=8, eos_token_id=None)
    for _ in range(5):
        plain_step(model, state, DecodeStats(1, 1))
    seq, end = history(state)
    for b, prompt in enumerate(prompts):
        text = prompt + state.new_tokens[b] + [int(state.g0_B[b])]
        assert seq[b, :int(end[b]) + 1].tolist() == text


def repetitive_prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a random phrase, as extraction and code-editing prompts repeat their input."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        phrase = torch.randint(3, V, (int(torch.randint(3, 8, (1,), generator=gen)),), generator=gen).tolist()
        out.append((phrase * 4)[:int(torch.randint(8, 28, (1,), generator=gen))])
    return out


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama("sdpa")
    prompts = repetitive_prompts(6, seed=0) + make_prompts(6, seed=3)
    reference = hf_greedy(model, prompts, MAX_NEW, None)
    return model, prompts, reference


def in_batches(dec: SpeculativeDecoder, other: SpeculativeDecoder, prompts, batch_size: int):
    """Both decoders over `prompts` in batches: (dec's tokens, other's tokens, dec's and other's merged stats)."""
    out, other_out, stats, other_stats = [], [], [], []
    for i in range(0, len(prompts), batch_size):
        result, other_result = dec.generate(prompts[i:i + batch_size], MAX_NEW, None), \
            other.generate(prompts[i:i + batch_size], MAX_NEW, None)
        out += result.tokens
        other_out += other_result.tokens
        stats.append(result.stats)
        other_stats.append(other_result.stats)
    return out, other_out, DecodeStats.merge(stats), DecodeStats.merge(other_stats)


@pytest.mark.parametrize("beam_width,beam_length,batch_size", [(1, 3, 1), (4, 4, 4), (2, 6, 3)])
def test_hybrid_is_lossless_and_the_lookup_path_is_taken(setup, beam_width, beam_length, batch_size):
    model, prompts, reference = setup
    drafter = random_drafter(model)  # almost never right: what the hybrid accepts beyond it is the lookup's
    hybrid = SpeculativeDecoder(model, drafter, beam_width, beam_length, ngram=3)
    alone = SpeculativeDecoder(model, drafter, beam_width, beam_length)
    out, alone_out, merged, merged_alone = in_batches(hybrid, alone, prompts, batch_size)
    assert out == reference and alone_out == reference
    assert merged.beam_width == beam_width + 1  # the lookup path is one more path of the tree
    assert merged.lookup_wins > 0
    assert merged.num_forwards < merged_alone.num_forwards, (merged.to_dict(), merged_alone.to_dict())
    assert merged.tokens_per_step > merged_alone.tokens_per_step


def test_hybrid_with_a_partly_right_drafter_and_an_eos(setup):
    """A drafter that is often right competes with the lookup path: the longest acceptance wins each
    step (ties go to the drafter), and rows stop at EOS as in plain decoding."""
    model, prompts, _ = setup
    free = plain_greedy(model, prompts, MAX_NEW, None).tokens
    eos = int(torch.bincount(torch.tensor(sum((t[2:] for t in free), [])), minlength=V).argmax())
    reference = hf_greedy(model, prompts, MAX_NEW, eos)
    assert any(len(t) < MAX_NEW for t in reference)
    counts = torch.zeros(V, V)
    for p, t in zip(prompts, free):
        for a, b in zip(p[-1:] + t, t):
            counts[a, b] += 1
    drafter = TableDrafter(counts.argmax(-1))
    hybrid = SpeculativeDecoder(model, drafter, beam_width=2, beam_length=4, ngram=2)
    result = hybrid.generate(prompts, MAX_NEW, eos)
    assert result.tokens == reference
    assert 0 < result.stats.lookup_wins < result.stats.num_steps


def test_hybrid_refuses_the_reference_rule_and_negative_sizes():
    model = tiny_llama("sdpa")
    drafter = random_drafter(model)
    with pytest.raises(ValueError, match="not with the reference rule"):
        SpeculativeDecoder(model, drafter, 1, 3, temperature=0.7, reference_compatible=True, ngram=3)
    with pytest.raises(ValueError, match="ngram must be >= 0"):
        SpeculativeDecoder(model, drafter, 1, 3, ngram=-1)
    SpeculativeDecoder(model, drafter, 1, 3, temperature=0.7, ngram=3)  # lossless sampling: tests/test_sampling.py


@pytest.mark.parametrize("beam_width,beam_length,batch_size,switch", [(1, 3, 1, 2), (2, 4, 3, 1), (1, 5, 4, 3)])
def test_switch_mode_is_lossless_and_keeps_the_tree_at_the_drafters_size(setup, beam_width, beam_length, batch_size,
                                                                        switch):
    """eval.hybrid_switch: rows with an m-token match verify the lookup path instead of the drafter's paths
    (no extra path), the others the drafter's; greedy output stays token for token plain greedy's."""
    model, prompts, reference = setup
    drafter = random_drafter(model)
    dec = SpeculativeDecoder(model, drafter, beam_width, beam_length, ngram=3, switch=switch)
    alone = SpeculativeDecoder(model, drafter, beam_width, beam_length)
    out, _, merged, merged_alone = in_batches(dec, alone, prompts, batch_size)
    assert out == reference
    assert merged.beam_width == beam_width  # no extra path: the tree keeps the drafter's size
    assert 0 < merged.lookup_wins < merged.num_steps * batch_size  # some rows switched, not all
    assert merged.tokens_per_step > merged_alone.tokens_per_step


@pytest.mark.parametrize("beam_length,batch_size,length", [(3, 1, 6), (4, 3, 6)])
def test_long_lookup_paths_copy_further_and_stay_lossless(setup, beam_length, batch_size, length):
    """eval.hybrid_lookup_length = K: in steps where every row has a switch match, K-token lookup paths
    alone (no drafter); a step then commits up to K tokens, more than the beams' L. Token for token
    plain greedy's; a static (captured) step keeps the drafter's length."""
    from eval.beam import BeamProposer
    from eval.graphs import GraphedDecoder
    from eval.ngram import LookupProposer

    model, prompts, reference = setup
    drafter = random_drafter(model)
    long = SpeculativeDecoder(model, drafter, 1, beam_length, ngram=3, switch=2, lookup_length=length)
    short = SpeculativeDecoder(model, drafter, 1, beam_length, ngram=3, switch=2)
    out, _, merged, merged_short = in_batches(long, short, prompts, batch_size)
    assert out == reference
    assert merged.beam_length == length and merged.num_forwards <= merged_short.num_forwards
    # rows that copy in the same steps (here one prompt batch_size times): K-token paths, copies longer than
    # the beams (a mixed batch seldom has every row copying at once)
    same = long.generate([prompts[4]] * batch_size, MAX_NEW, None)
    assert same.tokens == [reference[4]] * batch_size
    assert length in same.stats.verified and max(same.stats.accepted) >= beam_length, same.stats.to_dict()
    static = GraphedDecoder(model, LookupProposer(BeamProposer(drafter, 1, beam_length), 3, 2, length), 1, beam_length,
                            max_cache_len=128)
    result = static.generate(prompts[:4], MAX_NEW, None)  # its stats refuse a record of beam_length or more
    assert result.tokens == reference[:4] and result.stats.tokens_per_step > 1.2, result.stats.to_dict()  # lookups taken


def test_switch_mode_refuses_sampling_and_bad_sizes():
    model = tiny_llama("sdpa")
    drafter = random_drafter(model)
    with pytest.raises(ValueError, match="switch mode"):
        SpeculativeDecoder(model, drafter, 1, 3, temperature=0.7, ngram=3, switch=2)
    with pytest.raises(ValueError, match="switch mode"):
        SpeculativeDecoder(model, drafter, 1, 3, switch=2)  # no ngram
    with pytest.raises(ValueError, match="switch mode"):
        SpeculativeDecoder(model, drafter, 1, 3, ngram=3, switch=4)
    with pytest.raises(ValueError, match="needs switch mode"):
        SpeculativeDecoder(model, drafter, 1, 3, ngram=3, lookup_length=8)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        SpeculativeDecoder(model, drafter, 1, 3, ngram=3, switch=2, lookup_length=1)
