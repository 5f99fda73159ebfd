"""Speculative sampling (eval/sampling.py): statistical losslessness against the EXACT law of the base model.

    python -m pytest tests/test_sampling.py -q

A tiny random Llama with a vocabulary of V = 8 makes the law of the first NUM_TOKENS = 3 sampled
tokens tractable: all V^3 = 512 continuations are scored with the model's own probabilities at
T = 0.6 (T != 1 so that the temperature of both p and q matters). N = 4000 rows of the same prompt
are sampled in one batch, and a chi-square goodness-of-fit test (cells with expected count < 5
pooled, smallest first, into groups of expected count >= 5) must not reject at ALPHA = 1e-3.

False alarms: a correct sampler fails each such test with probability 1e-3 over the draw of the
seeds; the seeds are fixed, so the outcome is deterministic (p-values seen: 0.20 to 0.67).

Teeth: the same test at the same N and alpha must reject (p < ALPHA) two wrong rules:
  - no residual correction: every candidate tested against p itself and the bonus drawn from p
    (not normalize(max(p - q, 0))); chi-square ~3000 on 143 df here, p-value 0.0 in float64;
  - `reference_compatible=True` (deterministic beams, u < p/Q per beam, longest kept): chi-square
    ~2e4 to 4e4 on 143 df, p-value 0.0 in float64.
Both are far beyond detectable at this N (even "bonus from p, residual kept between candidates"
scores p < 1e-100 here), so the teeth tests do not depend on a lucky seed.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eval.sampling as sampling_module
from eval.decoder import plain_greedy
from eval.sampling import accept_tree, plain_sample, sample_chains
from eval.speculative import SpeculativeDecoder
from eval.tree import pack_tree
from pipeline.drafter import build_drafter, make_arch
from tests.test_tree import single_thread, tiny_llama  # noqa: F401  (single_thread: autouse fixture)

V = 8
T = 0.6
NUM_TOKENS = 3
N_SAMPLES = 4000
ALPHA = 1e-3
PROMPT = [3, 1, 4, 1, 5, 2]


# ---- exact law and chi-square ------------------------------------------------------------------

def exact_law(model, prompt: list[int], num_tokens: int, temperature: float) -> torch.Tensor:
    """(V ** n,) probability of every continuation x_1..x_n under ancestral sampling at T, indexed
    by the base-V number x_1 x_2 .. x_n. One forward over all V ** (n - 1) prefixes."""
    prefixes_MK = torch.tensor(list(itertools.product(range(V), repeat=num_tokens - 1)), dtype=torch.long)
    prefixes_MK = prefixes_MK.view(V ** (num_tokens - 1), num_tokens - 1)  # also right when n = 1
    ids_MS = torch.cat([torch.tensor(prompt).expand(len(prefixes_MK), -1), prefixes_MK], dim=1)
    with torch.no_grad():
        log_p_MnV = F.log_softmax(model(ids_MS).logits[:, -num_tokens:].double() / temperature, dim=-1)
    log_prefix_M = log_p_MnV[:, :-1].gather(-1, prefixes_MK[..., None]).sum(dim=(1, 2))
    return (log_prefix_M[:, None] + log_p_MnV[:, -1]).exp().flatten()  # row m = prefix m, in base-V order


def cell_counts(sequences: list[list[int]], num_tokens: int) -> torch.Tensor:
    assert all(len(s) == num_tokens for s in sequences)
    index = torch.tensor([sum(x * V ** (num_tokens - 1 - i) for i, x in enumerate(s)) for s in sequences])
    return torch.bincount(index, minlength=V ** num_tokens).double()


def chi_square_survival(stat: float, df: int) -> float:
    """P(chi2_df >= stat) = Q(df / 2, stat / 2), the regularized upper incomplete gamma."""
    try:
        from scipy.stats import chi2
    except ImportError:
        return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                             torch.tensor(stat / 2, dtype=torch.float64)))
    return float(chi2.sf(stat, df))


def chi_square_p_value(observed_C: torch.Tensor, law_C: torch.Tensor, min_expected: float = 5.0) -> float:
    """Goodness of fit of counts to a law. Cells with expected < min_expected are pooled, smallest
    first, into groups reaching min_expected (a last short group joins the previous one); the
    grouping depends on the law only, so the statistic stays chi-square with groups - 1 df."""
    expected_C = law_C.double() * observed_C.sum()
    big_C = expected_C >= min_expected
    observed, expected = observed_C[big_C].tolist(), expected_C[big_C].tolist()
    small = (~big_C).nonzero()[:, 0]
    group_o = group_e = 0.0
    for i in small[expected_C[small].argsort()].tolist():
        group_o, group_e = group_o + float(observed_C[i]), group_e + float(expected_C[i])
        if group_e >= min_expected:
            observed.append(group_o)
            expected.append(group_e)
            group_o = group_e = 0.0
    if group_e > 0:
        observed[-1] += group_o
        expected[-1] += group_e
    o, e = torch.tensor(observed), torch.tensor(expected)
    assert (e >= min_expected).all() and len(e) > 1
    return chi_square_survival(float(((o - e) ** 2 / e).sum()), len(e) - 1)


def test_chi_square_helpers():
    # chi2 with 2 df: survival exp(-x / 2); with scipy missing, torch's gammaincc gives it.
    assert chi_square_survival(3.0, 2) == pytest.approx(float(torch.exp(torch.tensor(-1.5))), rel=1e-6)
    law = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    assert chi_square_p_value(torch.tensor([50.0, 30, 10, 6, 4]), law) == pytest.approx(1.0)
    assert chi_square_p_value(torch.tensor([80.0, 10, 5, 3, 2]), law) < 1e-6


# ---- models and drafters ----------------------------------------------------------------------

class LastTokenDrafter(nn.Module):
    """Stub drafter with the real interface that partly agrees with the base model: its logits are
    the base model's logits given only the last token (no other context)."""

    def __init__(self, logits_VV: torch.Tensor):
        super().__init__()
        self.register_buffer("logits_VV", logits_VV)

    def init_state(self, like_h, *batch_dims):
        return like_h.new_zeros(*batch_dims, 1)

    def next_state(self, state, token_ids):
        return token_ids[..., None].to(state.dtype)

    def logits(self, h, state):
        return self.logits_VV[state[..., 0].long()]


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama("sdpa", vocab_size=V)
    with torch.no_grad():
        last_token_logits_VV = model(torch.arange(V)[:, None]).logits[:, 0]
    drafters = {
        "random": build_drafter(make_arch(V, model.config.hidden_size), model.model.embed_tokens.weight, seed=0),
        "last_token": LastTokenDrafter(last_token_logits_VV),
    }
    return model, drafters, exact_law(model, PROMPT, NUM_TOKENS, T)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def speculative_p_value(setup, drafter: str, W: int, L: int, seed: int = 1, **kwargs):
    model, drafters, law = setup
    decoder = SpeculativeDecoder(model, drafters[drafter], beam_width=W, beam_length=L, temperature=T, **kwargs)
    result = decoder.generate([PROMPT] * N_SAMPLES, NUM_TOKENS, None, generator=seeded(seed))
    return chi_square_p_value(cell_counts(result.tokens, NUM_TOKENS), law), result.stats


# ---- losslessness -------------------------------------------------------------------------------

def test_plain_sample_matches_exact_law(setup):
    model, _, law = setup
    result = plain_sample(model, [PROMPT] * N_SAMPLES, NUM_TOKENS, None, temperature=T, generator=seeded(0))
    assert chi_square_p_value(cell_counts(result.tokens, NUM_TOKENS), law) > ALPHA
    assert result.stats.tokens_per_step == 1.0


@pytest.mark.parametrize("drafter, W, L, tree_attention", [
    ("random", 4, 3, True),  # many duplicate chains, rejections at depth 1 and 2
    ("last_token", 4, 3, True),
    ("last_token", 2, 2, False),  # leaf bonuses inside the first 3 tokens, no prefix sharing
])
def test_speculative_sampling_matches_exact_law(setup, drafter, W, L, tree_attention):
    p_value, stats = speculative_p_value(setup, drafter, W, L, tree_attention=tree_attention)
    first_step = stats.accepted[:N_SAMPLES]  # every row's first step: nothing truncated yet
    assert sum(first_step) / N_SAMPLES > 0.3, stats.to_dict()  # acceptance is really exercised
    assert p_value > ALPHA, p_value


@pytest.mark.parametrize("drafter, W", [("random", 2), ("last_token", 1)])
def test_hybrid_sampling_matches_exact_law(setup, drafter, W):
    """Hybrid drafting at T > 0: a prompt-lookup path enters the rejection sampling as a point mass
    (eval/ngram.py LookupProposer). On this prompt the lookup path is taken in many steps."""
    p_value, stats = speculative_p_value(setup, drafter, W, 3, ngram=3)
    assert stats.lookup_wins > 0.05 * N_SAMPLES, stats.to_dict()
    assert p_value > ALPHA, p_value


def test_hybrid_sampling_that_accepts_lookup_tokens_outright_fails(setup, monkeypatch):
    """Teeth: treating the lookup path like a verified greedy draft (accepted whenever p > 0, by a
    near-zero q) is biased towards repeating the context, and the same test rejects it."""
    import eval.ngram as ngram_module

    monkeypatch.setattr(ngram_module, "point_mass", lambda tokens_BK, V, dtype: torch.full(
        (*tokens_BK.shape, V), 1e-6, dtype=dtype))
    p_value, _ = speculative_p_value(setup, "random", 2, 3, ngram=3)
    assert p_value < ALPHA, p_value


def test_no_residual_correction_fails_the_same_test(setup, monkeypatch):
    """Teeth: test every candidate against p and draw the bonus from p (no max(p - q, 0))."""
    monkeypatch.setattr(sampling_module, "residual", lambda p_BV, q_BV: p_BV)
    p_value, _ = speculative_p_value(setup, "last_token", 4, 3)
    assert p_value < ALPHA, p_value


def test_reference_rule_is_not_lossless(setup):
    """Teeth, and the spec's claim: the reference rule over deterministic beams is biased."""
    p_value, _ = speculative_p_value(setup, "last_token", 4, 3, reference_compatible=True)
    assert p_value < ALPHA, p_value


def test_accept_tree_first_token_law_with_many_duplicates():
    """The MSS lemma alone, no base model: 3 i.i.d. candidates over 3 tokens (duplicates in most
    rows). The token committed right after g0 (accepted draft or bonus) must follow p at the root;
    150k rows make this far sharper than the end-to-end test."""
    B, W, L = 150_000, 3, 2
    gen = seeded(2)
    p_V = torch.tensor([0.6, 0.3, 0.1])
    q_V = torch.tensor([0.2, 0.3, 0.5])
    drafts_BW = torch.multinomial(q_V.expand(B, -1), W, replacement=True, generator=gen)
    tokens_BWL = torch.stack([torch.zeros_like(drafts_BW), drafts_BW], dim=-1)
    tree = pack_tree(tokens_BWL)
    logits_BPV = torch.where(tree.depth_BP[..., None] == 0, p_V.log(), torch.zeros(3))  # depth 1: uniform
    q_BWKV = q_V.expand(B, W, L - 1, 3)
    choice = accept_tree(tokens_BWL, q_BWKV, logits_BPV, tree.unpacker_BWL, 1.0, gen)
    rows = torch.arange(B)
    first_B = torch.where(choice.num_accepted_B > 0, tokens_BWL[rows, choice.chain_B, 1], choice.bonus_B)
    assert chi_square_p_value(torch.bincount(first_B, minlength=3).double(), p_V) > ALPHA
    assert 0.5 < choice.num_accepted_B.double().mean() < 1.0  # sum min(p, q) = 0.6 for one candidate


def test_accept_tree_by_hand():
    B, W, L, gen = 64, 3, 4, seeded(3)
    logits_1V = torch.tensor([[2.0, 0.0, -1.0, 0.5]])
    drafter = LastTokenDrafter(logits_1V.expand(4, 4))  # same q after every token
    chains = sample_chains(drafter, torch.zeros(B, 1), torch.zeros(B, dtype=torch.long), W, L, 1.0, gen)
    tree = pack_tree(chains.tokens_BWL)
    same = accept_tree(chains.tokens_BWL, chains.q_BWKV, logits_1V.expand(B, tree.size, 4), tree.unpacker_BWL, 1.0, gen)
    assert (same.num_accepted_B == L - 1).all()  # p == q everywhere: every draft accepted
    # p with no mass where q drew: nothing accepted, the bonus comes from the residual == p.
    only_3_V = torch.tensor([-1e4, -1e4, -1e4, 0.0])
    q_BWKV = torch.zeros(B, W, L - 1, 4)
    q_BWKV[..., 0] = 1.0
    zeros_BWL = torch.zeros(B, W, L, dtype=torch.long)
    tree = pack_tree(zeros_BWL)
    none = accept_tree(zeros_BWL, q_BWKV, only_3_V.expand(B, tree.size, 4), tree.unpacker_BWL, 1.0, gen)
    assert (none.num_accepted_B == 0).all() and (none.bonus_B == 3).all()


# ---- API ----------------------------------------------------------------------------------------

def test_generator_reproducibility_and_degenerate_shapes(setup):
    model, drafters, _ = setup
    prompts = [PROMPT, PROMPT[:2], PROMPT[::-1]]
    decoder = SpeculativeDecoder(model, drafters["random"], beam_width=3, beam_length=3, temperature=0.8)
    first = decoder.generate(prompts, 10, None, generator=seeded(5)).tokens
    assert decoder.generate(prompts, 10, None, generator=seeded(5)).tokens == first
    assert decoder.generate(prompts, 10, None, generator=seeded(6)).tokens != first
    assert [len(t) for t in first] == [10, 10, 10]
    # L = 1 drafts nothing: the same random stream as plain_sample, so the same tokens.
    one = SpeculativeDecoder(model, drafters["random"], beam_width=1, beam_length=1, temperature=0.8)
    assert one.generate(prompts, 6, None, generator=seeded(7)).tokens == \
        plain_sample(model, prompts, 6, None, 0.8, generator=seeded(7)).tokens


def test_validation_and_ignored_settings(setup):
    model, drafters, _ = setup
    with pytest.raises(ValueError, match="temperature"):
        SpeculativeDecoder(model, drafters["random"], 2, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="temperature > 0"):
        plain_sample(model, [PROMPT], 3, None, temperature=0.0)
    with pytest.warns(UserWarning, match="reference_compatible"):
        SpeculativeDecoder(model, drafters["random"], 2, 3, reference_compatible=True)
    greedy = SpeculativeDecoder(model, drafters["random"], 2, 3)
    with pytest.warns(UserWarning, match="generator is ignored"):
        tokens = greedy.generate([PROMPT], 5, None, generator=seeded(0)).tokens
    assert tokens == plain_greedy(model, [PROMPT], 5, None).tokens
