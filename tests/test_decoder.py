"""Greedy speculative decoding (eval/decoder.py) and its metrics (eval/metrics.py).

    python -m pytest tests/test_decoder.py -q

Losslessness is checked token for token against `model.generate(do_sample=False)` and against
`plain_greedy`, with a random drafter (almost nothing accepted), a partly right drafter (ragged
acceptance) and an oracle drafter (everything accepted); a decoder that accepts one token too many
must fail the same check.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eval.decoder as decoder_module
from eval.decoder import Acceptance, accept, commit, compile_base, first_divergence, plain_greedy, prefill, verify
from eval.metrics import DecodeStats
from eval.speculative import SpeculativeDecoder
from pipeline.drafter import build_drafter, make_arch
from tests.test_tree import IMPLS, single_thread, tiny_llama  # noqa: F401  (single_thread: autouse fixture)

V = 256
MAX_NEW = 12


class TableDrafter(nn.Module):
    """Stub drafter with the real interface: proposes propose_V[last token], never forbid_V[last token]."""

    def __init__(self, propose_V: torch.Tensor, forbid_V: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("propose_V", propose_V)
        self.register_buffer("forbid_V", forbid_V if forbid_V is not None else propose_V.new_full(propose_V.shape, -1))

    def init_state(self, like_h, *batch_dims):
        return like_h.new_zeros(*batch_dims, 1)

    def next_state(self, state, token_ids):
        return token_ids[..., None].to(state.dtype)  # the state is just the last token

    def logits(self, h, state):
        # scatter, not F.one_hot (which reads its indices back to check them): capturable in a CUDA graph
        last = state[..., 0].long()
        zeros = torch.zeros(*last.shape, len(self.propose_V), device=last.device)
        logits = zeros.scatter(-1, self.propose_V[last][..., None], 10.0)
        forbid = self.forbid_V[last]
        return logits.scatter_add(-1, forbid.clamp(min=0)[..., None], -1e4 * (forbid >= 0)[..., None].float())


def bigram_table(model) -> torch.Tensor:
    """Base model's greedy next token after each single token: exact when attention is switched off."""
    with torch.no_grad():
        return model(torch.arange(V)[:, None]).logits[:, 0].argmax(-1)


def seen_bigram_table(prompts, continuations) -> torch.Tensor:
    """Most frequent next token after each token in the base model's own greedy outputs: a drafter
    that agrees with the base model often but not always (ragged acceptance, tau ~2)."""
    counts = torch.zeros(V, V)
    for prompt, continuation in zip(prompts, continuations):
        seq = prompt[-1:] + continuation
        for a, b in zip(seq, seq[1:]):
            counts[a, b] += 1
    return counts.argmax(-1)


def make_prompts(n: int, seed: int, max_len: int = 24) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=gen).tolist()
    return [torch.randint(3, V, (n_tok,), generator=gen).tolist() for n_tok in lengths]


def hf_greedy(model, prompts, max_new_tokens, eos_token_id):
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos_token_id, pad_token_id=0)
        out.append(gen[0, len(prompt):].tolist())
    return out


def ragged_eos_case(model, prompts, reference=None, max_new: int = MAX_NEW):
    """(free, eos, reference) for ragged decoding tests: `free` = the model's greedy continuations
    without an eos; eos = the token it emits most (after the first two), so that in `reference` (greedy
    decoding with that eos: plain_greedy, or the function given) some rows stop early and others run to
    max_new, which is asserted. Shared by the decoder, graph, baseline and CUDA tests."""
    free = plain_greedy(model, prompts, max_new, None).tokens
    counts = torch.bincount(torch.tensor(sum((t[2:] for t in free), [])), minlength=model.config.vocab_size)
    eos = int(counts.argmax())
    ref = (reference or (lambda *a: plain_greedy(*a).tokens))(model, prompts, max_new, eos)
    assert any(len(t) < max_new for t in ref) and any(len(t) == max_new for t in ref)
    return free, eos, ref


@pytest.fixture(scope="module", params=IMPLS)
def setup(request):
    """model, prompts, eos, HF reference outputs and a seen-bigram table; eos is a token the model
    often emits, so some rows stop early and others run to max_new_tokens."""
    model = tiny_llama(request.param)
    prompts = make_prompts(16, seed=0)
    free, eos, reference = ragged_eos_case(model, prompts, hf_greedy)
    return model, prompts, eos, reference, seen_bigram_table(prompts, free)


def random_drafter(model):
    return build_drafter(make_arch(V, model.config.hidden_size), model.model.embed_tokens.weight, seed=0)



def assert_cache_matches_prefill(model, state, prompts, check_h: bool = True) -> None:
    """Every row's committed cache slots, g0 (and h) equal a fresh prefill of its committed tokens."""
    for b, prompt in enumerate(prompts):
        committed = prompt + state.new_tokens[b]
        assert int(state.ctx_B[b]) == len(committed)
        fresh = model.model(input_ids=torch.tensor([committed]), use_cache=True)
        n = len(committed)
        for layer, fresh_layer in zip(state.cache.layers, fresh.past_key_values.layers):
            torch.testing.assert_close(layer.keys[b, :, :n], fresh_layer.keys[0], atol=1e-4, rtol=0)
            torch.testing.assert_close(layer.values[b, :, :n], fresh_layer.values[0], atol=1e-4, rtol=0)
        if check_h:
            torch.testing.assert_close(state.h_BD[b], fresh.last_hidden_state[0, -1], atol=1e-4, rtol=0)
        assert int(state.g0_B[b]) == int(model.lm_head(fresh.last_hidden_state[0, -1]).argmax())

def test_plain_greedy_equals_hf_generate(setup):
    model, prompts, eos, reference, _ = setup
    assert plain_greedy(model, prompts, MAX_NEW, eos).tokens == reference  # batched, ragged
    result = plain_greedy(model, prompts[:3], MAX_NEW, eos)
    assert result.stats.tokens_per_step == 1.0 and result.stats.verified_tokens_per_step == 1.0
    # the decode loop's time excludes the prefill (eval/profile.py's plain step is decode_seconds / steps)
    assert 0 < result.decode_seconds < result.seconds
    # on CPU the loop's base forwards are timed too (the timed run's ideal speedup: eval/compare.py)
    assert result.stats.decode_seconds == result.decode_seconds
    assert 0 < result.stats.forward_seconds < result.stats.decode_seconds


def test_timed_run_prices_its_own_verify_forward(setup):
    """compare() gives each timed method the ideal of its own run: tau x plain step / its verify forward."""
    from types import SimpleNamespace

    from data.prompts import Prompt
    from eval.compare import compare
    from eval.decoder import NO_CLOCK, ForwardTimer, forward_timer

    model, prompts, eos, reference, _ = setup
    stats = DecodeStats(1, 1)
    assert isinstance(forward_timer(model, stats), ForwardTimer)
    assert forward_timer(SimpleNamespace(device=torch.device("cuda")), stats) is NO_CLOCK  # would need a sync
    decoder = SpeculativeDecoder(model, random_drafter(model), beam_width=2, beam_length=3)
    spec = decoder.generate(prompts[:2], MAX_NEW, eos)
    assert 0 < spec.stats.forward_seconds < spec.stats.decode_seconds == spec.decode_seconds
    items = [Prompt(id=str(i), text="", input_ids=p) for i, p in enumerate(prompts[:3])]
    out = compare({"plain": lambda b: plain_greedy(model, b, MAX_NEW, eos),
                   "spec": lambda b: decoder.generate(b, MAX_NEW, eos)}, items, 1, 2, progress=False)
    t, plain = out["spec"]["step_timing"], out["plain"]["step_timing"]
    assert t["forwards"] == 2 * out["spec"]["decode_stats"]["num_forwards"]  # both repeats are timed
    assert 0 < t["forward_ms"] < t["step_ms"] and 0 < plain["forward_ms"] < plain["step_ms"]
    assert out["spec"]["ideal_speedup"] == pytest.approx(out["spec"]["tokens_per_step"] * plain["step_ms"]
                                                         / t["forward_ms"])
    assert out["spec"]["decoder_efficiency"] == pytest.approx(out["spec"]["speedup"] / out["spec"]["ideal_speedup"])
    assert "ideal_speedup" not in out["plain"]


def test_lossless_with_random_drafter_batch_1(setup):
    model, prompts, eos, reference, _ = setup
    decoder = SpeculativeDecoder(model, random_drafter(model), beam_width=4, beam_length=4)
    assert [decoder.generate([p], MAX_NEW, eos).tokens[0] for p in prompts] == reference


@pytest.mark.parametrize("tree_attention", [True, False])
@pytest.mark.parametrize("drafter_kind", ["random", "seen_bigram"])
def test_lossless_batched_ragged(setup, tree_attention, drafter_kind):
    model, prompts, eos, reference, table = setup
    drafter = random_drafter(model) if drafter_kind == "random" else TableDrafter(table)
    decoder = SpeculativeDecoder(model, drafter, beam_width=3, beam_length=4, tree_attention=tree_attention)
    stats = []
    for i in range(0, len(prompts), 4):
        result = decoder.generate(prompts[i:i + 4], MAX_NEW, eos)
        assert result.tokens == reference[i:i + 4]
        stats.append(result.stats)
    merged = DecodeStats.merge(stats)
    if drafter_kind == "seen_bigram":  # ragged acceptance across rows and steps is what this exercises
        assert 1.2 < merged.tokens_per_step < 4.0, merged.to_dict()
    if not tree_attention:
        assert merged.verified_fraction_of_WL == 1.0


def test_accepting_one_token_too_many_breaks_equality(setup, monkeypatch):
    """The losslessness check has teeth: a verify() that accepts one extra draft must fail it."""
    model, prompts, eos, reference, _ = setup

    def cheating_verify(logits_BPV, beams_BWL, unpacker_BWL):
        accept_len_BW, pred_BWL = verify(logits_BPV, beams_BWL, unpacker_BWL)
        return (accept_len_BW + 1).clamp(max=beams_BWL.shape[-1] - 1), pred_BWL

    monkeypatch.setattr(decoder_module, "verify", cheating_verify)
    decoder = SpeculativeDecoder(model, random_drafter(model), beam_width=3, beam_length=4)
    tokens = decoder.generate(prompts[:4], MAX_NEW, eos).tokens
    assert tokens != reference[:4]
    # ... and no divergence it causes passes for a numerical tie (eval.allow_numerical_ties)
    divergences = [first_divergence(model, p, r, t) for p, r, t in zip(prompts, reference, tokens) if r != t]
    assert divergences and not any(d["near_tie"] for d in divergences), divergences


def test_first_divergence_tells_ties_from_errors():
    """An exact tie (two lm_head rows made equal) is a near tie; a low-logit token, a length
    mismatch and equal outputs are not."""
    model = tiny_llama("sdpa")
    prompt = make_prompts(1, seed=5)[0]
    t = plain_greedy(model, [prompt], MAX_NEW, None).tokens[0][3]
    u = (t + 1) % V
    with torch.no_grad():
        model.lm_head.weight[u] = model.lm_head.weight[t]  # logits of u and t now equal everywhere
    ref = plain_greedy(model, [prompt], MAX_NEW, None).tokens[0]
    k = next(i for i, x in enumerate(ref) if x in (t, u))
    tie = first_divergence(model, prompt, ref, ref[:k] + [t + u - ref[k]] + ref[k + 1:])
    assert tie["position"] == k and tie["logit_gap"] == 0.0 and tie["near_tie"], tie
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ref[:k]])).logits[0, -1]
    worst = int(logits.argmin())
    wrong = first_divergence(model, prompt, ref, ref[:k] + [worst])
    assert not wrong["near_tie"] and wrong["logit_gap"] > 100 * wrong["tolerance"] > 0, wrong
    short = first_divergence(model, prompt, ref, ref[:k])
    assert short["other_token"] is None and not short["near_tie"]
    assert first_divergence(model, prompt, ref, list(ref)) is None


@pytest.mark.parametrize("impl", IMPLS)
def test_oracle_drafter_accepts_everything_and_wrong_drafter_nothing(impl):
    model = tiny_llama(impl)
    with torch.no_grad():  # attention off: the greedy next token depends on the last token only
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    table = bigram_table(model)
    prompts = make_prompts(4, seed=1)
    plain = plain_greedy(model, prompts, 10, None).tokens
    L = 4
    oracle = SpeculativeDecoder(model, TableDrafter(table), beam_width=2, beam_length=L).generate(prompts, 10, None)
    assert oracle.tokens == plain
    assert oracle.stats.tokens_per_step == L and oracle.stats.acceptance_per_position == [1.0] * (L - 1)
    assert oracle.stats.num_forwards == 3  # ceil(10 / 4)
    wrong = SpeculativeDecoder(model, TableDrafter((table + 1) % V, forbid_V=table), beam_width=2, beam_length=L)
    result = wrong.generate(prompts, 10, None)
    assert result.tokens == plain
    assert result.stats.tokens_per_step == 1.0 and result.stats.acceptance_per_position[0] == 0.0


def test_verify_and_accept_by_hand():
    beams = torch.tensor([[[5, 1, 2], [5, 1, 3], [5, 4, 2]],
                          [[7, 7, 7], [7, 8, 7], [7, 9, 9]]])
    unpacker = torch.tensor([[[0, 1, 2], [0, 1, 3], [0, 4, 5]],
                             [[0, 1, 2], [0, 3, 4], [0, 5, 6]]])
    # Base argmax per packed slot, row 0: after 5 -> 1, after 5 1 -> 3, after 5 1 2 -> 8,
    # after 5 1 3 -> 6, after 5 4 -> 2, after 5 4 2 -> 9. Row 1: after 7 -> 9, after 7 9 -> 0.
    pred_BP = torch.tensor([[1, 3, 8, 6, 2, 9, 0], [9, 0, 0, 0, 0, 0, 0]])
    logits_BPV = F.one_hot(pred_BP, 10).float()
    hidden_BPD = torch.arange(14.0).view(2, 7, 1)
    accept_len, pred_BWL = verify(logits_BPV, beams, unpacker)
    assert accept_len.tolist() == [[1, 2, 0], [0, 0, 1]]
    assert pred_BWL[0].tolist() == [[1, 3, 8], [1, 3, 6], [1, 2, 9]]
    acc = accept(accept_len, pred_BWL, beams, unpacker, hidden_BPD)
    assert acc.beam_B.tolist() == [1, 2] and acc.num_accepted_B.tolist() == [2, 1]
    assert acc.tokens_BL.tolist() == [[5, 1, 3], [7, 9, 9]]
    assert acc.next_g0_B.tolist() == [6, 0]  # the base's own "bonus" token after the accepted ones
    assert acc.next_h_BD[:, 0].tolist() == [3.0, 12.0]  # hidden at packed slot 3 (row 0), 5 (row 1)
    ties = accept(torch.tensor([[1, 1, 0]]), pred_BWL[:1], beams[:1], unpacker[:1], hidden_BPD[:1])
    assert ties.beam_B.tolist() == [0]  # first beam on ties


def test_cache_matches_fresh_prefill_after_accepted_steps(setup):
    model, all_prompts, _, _, table = setup
    prompts = all_prompts[4:7]
    decoder = SpeculativeDecoder(model, TableDrafter(table), beam_width=3, beam_length=4)
    stats = DecodeStats(3, 4)
    with torch.no_grad():
        state = prefill(model, prompts, max_cache_len=80, max_new_tokens=40, eos_token_id=None)
        for _ in range(6):
            decoder.step(state, stats)
        assert sum(stats.accepted) > 0  # some drafts were accepted and their K/V moved
        assert_cache_matches_prefill(model, state, prompts)


def test_commit_by_hand(setup):
    """Rows stop independently inside one vectorized commit: row 0 at an EOS among its accepted
    drafts, row 1 at max_new_tokens, row 2 keeps going; a finished row is frozen from then on."""
    model, eos = setup[0], 7
    with torch.no_grad():
        state = prefill(model, [[3, 4], [5, 6, 8], [9]], max_cache_len=32, max_new_tokens=3, eos_token_id=eos)
        L, ctx_before = 4, state.ctx_B.clone()
        tokens_BL = torch.tensor([[10, eos, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]])
        acc = Acceptance(torch.zeros(3, dtype=torch.long), torch.tensor([2, 3, 0]), tokens_BL,
                         torch.arange(L).repeat(3, 1), torch.tensor([40, 41, 42]), torch.zeros(3, model.config.hidden_size))
        active = commit(state, acc, write_at=int(state.ctx_B.max()))
        assert active.tolist() == [True, True, True]
        assert state.new_tokens == [[10, eos, 12], [20, 21, 22, 23], [30]]
        assert state.done_B.tolist() == [True, True, False]
        assert (state.ctx_B - ctx_before).tolist() == [3, 4, 1]
        assert state.g0_B.tolist() == [40, 41, 42]
        acc.num_accepted_B = torch.tensor([3, 3, 1])
        assert commit(state, acc, write_at=int(state.ctx_B.max())).tolist() == [False, False, True]
        assert state.new_tokens == [[10, eos, 12], [20, 21, 22, 23], [30, 30, 31]]
        assert (state.ctx_B - ctx_before).tolist() == [3, 4, 3] and state.done_B.tolist() == [True, True, True]


def test_generate_edge_cases(setup):
    model, prompts, eos, _, _ = setup
    decoder = SpeculativeDecoder(model, random_drafter(model), beam_width=2, beam_length=3)
    assert decoder.generate(prompts[:2], 0, eos).tokens == [[], []]
    with pytest.raises(ValueError, match="non-empty"):
        decoder.generate([[]], 4, eos)
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        SpeculativeDecoder(model, random_drafter(model), beam_width=V + 1, beam_length=3)


def test_metrics_by_hand():
    stats = DecodeStats(beam_width=2, beam_length=4)
    stats.record([0, 2, 1], [5, 6, 7])
    more = DecodeStats(beam_width=2, beam_length=4)
    more.record([3, 0], [8, 4])
    merged = DecodeStats.merge([stats, more])
    assert merged.tokens_per_step == pytest.approx((1 + 3 + 2 + 4 + 1) / 5)
    # a_1 = #(a >= 1) / #(a >= 0) = 3/5, a_2 = #(a >= 2) / #(a >= 1) = 2/3, a_3 = 1/2
    assert merged.acceptance_per_position == pytest.approx([3 / 5, 2 / 3, 1 / 2])
    assert merged.tokens_per_step_histogram == {1: 2, 2: 1, 3: 1, 4: 1}
    assert merged.verified_tokens_per_step == pytest.approx(6.0)
    assert merged.verified_fraction_of_WL == pytest.approx(6.0 / 8)
    never = DecodeStats(beam_width=1, beam_length=3)
    never.record([0, 0], [1, 1])
    d = json.loads(json.dumps(never.to_dict()))
    assert d["tokens_per_step"] == 1.0 and d["acceptance_per_position"] == [0.0, None]
    assert d["tokens_per_step_histogram"] == {"1": 2, "2": 0, "3": 0}
    with pytest.raises(ValueError, match="different beam shapes"):
        DecodeStats.merge([stats, never])


@pytest.mark.parametrize("setup", ["sdpa"], indirect=True)  # eager compiles twice as long and adds nothing here
def test_compiled_base_model_decodes_identically(setup):
    """eval.compile: the torch.compile'd base model (dynamic shapes: packed tree sizes and cache
    lengths vary) gives plain and speculative decoding the same tokens as the eager model."""
    model, prompts, eos, reference, table = setup
    compiled = compile_base(tiny_llama(model.config._attn_implementation), "default")
    assert compiled.model.forward._draftforge_compiled == "default"
    with pytest.raises(ValueError, match="already compiled"):
        compile_base(compiled, "default")
    assert compile_base(model, "none") is model and not hasattr(model.model.forward, "_draftforge_compiled")
    batch = prompts[:3]  # ragged; one batch size (a batch of 1 recompiles every graph: 24 s, nothing new tested)
    assert plain_greedy(compiled, batch, MAX_NEW, eos).tokens == reference[:3]
    decoder = SpeculativeDecoder(compiled, TableDrafter(table), beam_width=3, beam_length=4)
    assert decoder.generate(batch, MAX_NEW, eos).tokens == reference[:3]


def test_lossless_in_bfloat16(setup):
    """The CUDA dtype on CPU: a bf16 base model and drafter, batched and ragged, decode exactly the
    tokens of bf16 plain greedy decoding (additive mask at bf16's min, K/V copies in bf16)."""
    model, prompts, eos, _, table = setup
    bf16 = tiny_llama(model.config._attn_implementation).to(torch.bfloat16)
    drafter = build_drafter(make_arch(V, bf16.config.hidden_size), bf16.model.embed_tokens.weight, seed=0)
    reference = plain_greedy(bf16, prompts[:8], MAX_NEW, eos).tokens
    assert reference == [plain_greedy(bf16, [p], MAX_NEW, eos).tokens[0] for p in prompts[:8]]
    for d in (drafter.to(torch.bfloat16), TableDrafter(table)):
        decoder = SpeculativeDecoder(bf16, d, beam_width=3, beam_length=4)
        assert decoder.generate(prompts[:4], MAX_NEW, eos).tokens == reference[:4]
        assert decoder.generate(prompts[4:8], MAX_NEW, eos).tokens == reference[4:8]
