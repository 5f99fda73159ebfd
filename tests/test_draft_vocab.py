"""Draft vocabulary (docs/design.md §7): the drafter predicts N base tokens through a d2t id map.

    python -m pytest tests/test_draft_vocab.py -q

Checked: the choice of the N tokens; the restricted KL against a brute-force computation over full
distributions; beams identical to a search over the base vocabulary with -inf outside the draft
vocabulary; speculative decoding token-for-token equal to plain greedy, with the same acceptance as
an equivalent full-vocabulary drafter; sampling with a draft-vocabulary drafter; export round trip.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eval.beam import draft
from eval.decoder import plain_greedy
from eval.speculative import SpeculativeDecoder
from pipeline.drafter import build_drafter, make_arch, select_draft_vocab
from pipeline.export import drafter_from_state, expected_tensors, export_drafter, load_exported
from pipeline.loss import distill_loss
from pipeline.train import vocab_maps
from tests.test_decoder import MAX_NEW, V, make_prompts, seen_bigram_table
from tests.test_tree import single_thread, tiny_llama  # noqa: F401  (single_thread: autouse fixture)


def test_select_draft_vocab_most_frequent_with_coverage():
    counts = torch.zeros(10)
    counts[[7, 2, 5, 9]] = torch.tensor([50.0, 30.0, 30.0, 10.0])
    d2t, coverage = select_draft_vocab(counts, 3, 10)
    assert d2t.tolist() == [2, 5, 7]  # top 3 (2 and 5 tie; both in), stored sorted
    assert coverage == pytest.approx(110 / 120)
    d2t, coverage = select_draft_vocab({3: 4}, 3, 10)  # fewer distinct tokens than N: smallest ids fill
    assert d2t.tolist() == [0, 1, 3] and coverage == 1.0


def _brute_force_kl(logits_NKn, d2t, batch, vocab_size):
    """KL(p(.|draftable) || q) over buckets, from explicit distributions over the base vocabulary."""
    N, K, _ = logits_NKn.shape
    q_full = torch.full((N, K, vocab_size), float("-inf")).index_copy(-1, d2t, logits_NKn).log_softmax(-1).exp()
    out = torch.zeros(N, K)
    inside = torch.zeros(vocab_size, dtype=torch.bool)
    inside[d2t] = True
    for n in range(N):
        for k in range(K):
            ids = batch["topk_ids_NKk"][n, k].tolist()
            lp = batch["topk_logprobs_NKk"][n, k].tolist()
            kept = [(i, p) for i, p in zip(ids, lp) if inside[i]]
            p = [torch.tensor(x).exp().item() for _, x in kept] + [batch["tail_logprob_NK"][n, k].exp().item()]
            z = sum(p)
            q_kept = [q_full[n, k, i].item() for i, _ in kept]
            q = q_kept + [1.0 - sum(q_kept)]
            out[n, k] = sum(pi / z * (torch.log(torch.tensor(pi / z)) - torch.log(torch.tensor(qi))).item()
                            for pi, qi in zip(p, q) if pi > 0)
    return out


def _teacher_batch(N=5, K=3, k=4, vocab=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, K, vocab, generator=gen) * 2
    logp = logits.log_softmax(-1)
    top_lp, top_ids = logp.topk(k, dim=-1)
    tail = logp.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    return {"topk_ids_NKk": top_ids, "topk_logprobs_NKk": top_lp, "tail_logprob_NK": tail,
            "mask_NK": torch.ones(N, K, dtype=torch.bool)}


def test_restricted_kl_matches_brute_force():
    vocab = 30
    batch = _teacher_batch(vocab=vocab)
    d2t = torch.tensor(sorted(torch.randperm(vocab, generator=torch.Generator().manual_seed(3))[:12].tolist()))
    logits = torch.randn(5, 3, 12, generator=torch.Generator().manual_seed(4))
    maps = vocab_maps(d2t, vocab, "cpu", "kl")
    weights = torch.ones(3) / 3
    loss, stats = distill_loss(logits, batch, weights, **maps)
    want = _brute_force_kl(logits, d2t, batch, vocab)
    torch.testing.assert_close(stats["kl_sum_K"], want.sum(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, (want.mean(0) * weights).sum(), atol=1e-4, rtol=1e-4)


def test_full_permutation_draft_vocab_equals_full_vocab_loss():
    """N = V (every token draftable, in another order): the restricted loss is the full-vocabulary loss."""
    vocab = 30
    batch = _teacher_batch(vocab=vocab)
    d2t = torch.randperm(vocab, generator=torch.Generator().manual_seed(5))
    full_logits = torch.randn(5, 3, vocab, generator=torch.Generator().manual_seed(6))
    weights = torch.tensor([0.5, 0.3, 0.2])
    for objective in ("kl", "ce"):
        full, full_stats = distill_loss(full_logits, batch, weights, objective=objective)
        restricted, r_stats = distill_loss(full_logits[..., d2t], batch, weights, **vocab_maps(d2t, vocab, "cpu", objective))
        torch.testing.assert_close(restricted, full, atol=1e-5, rtol=1e-5)
        assert torch.equal(r_stats["top1_sum_K"], full_stats["top1_sum_K"])


def test_ce_objective_is_hard_label_cross_entropy():
    batch = _teacher_batch()
    logits = torch.randn(5, 3, 30, generator=torch.Generator().manual_seed(7))
    weights = torch.ones(3) / 3
    loss, _ = distill_loss(logits, batch, weights, objective="ce")
    want = F.cross_entropy(logits.flatten(0, 1), batch["topk_ids_NKk"][..., 0].flatten())
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)


class VocabLogits(nn.Module):
    """A drafter seen through its base-vocabulary logits only (no d2t): the reference for the search."""

    def __init__(self, drafter):
        super().__init__()
        self.inner = drafter

    def init_state(self, *a):
        return self.inner.init_state(*a)

    def next_state(self, *a):
        return self.inner.next_state(*a)

    def logits(self, h, s):
        return self.inner.vocab_logits(h, s)


@pytest.mark.parametrize("W", [1, 4, 8])
def test_beams_equal_search_over_base_vocab(W):
    Vb, H = 64, 16
    d2t = torch.arange(3, Vb, 3)
    drafter = build_drafter(make_arch(Vb, H, draft_vocab_size=len(d2t)), torch.randn(Vb, H), seed=1, d2t=d2t)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(0.3 * torch.randn_like(p))
    h, g0 = torch.randn(3, H), torch.tensor([1, 5, 9])
    for keep in (False, True):
        got = draft(drafter, h, g0, W, 4, keep_log_probs=keep)
        want = draft(VocabLogits(drafter), h, g0, W, 4, keep_log_probs=keep)
        assert torch.equal(got.tokens_BWL, want.tokens_BWL)
        torch.testing.assert_close(got.scores_BW, want.scores_BW)
        assert set(got.tokens_BWL[..., 1:].unique().tolist()) <= set(d2t.tolist())
        if keep:
            torch.testing.assert_close(got.log_probs_BWKV, want.log_probs_BWKV)


class _Table(nn.Module):
    """Proposes propose_V[last token] when it is in the vocabulary `ids`, else ids[0]."""

    def __init__(self, propose_V, ids):
        super().__init__()
        self.register_buffer("propose_V", propose_V)
        self.register_buffer("ids", ids)
        t2d = torch.full((len(propose_V),), 0, dtype=torch.long)
        t2d[ids] = torch.arange(len(ids))
        self.register_buffer("t2d", t2d)

    def init_state(self, like_h, *batch_dims):
        return like_h.new_zeros(*batch_dims, 1)

    def next_state(self, state, token_ids):
        return token_ids[..., None].to(state.dtype)

    def proposal_index(self, state):
        return self.t2d[self.propose_V[state[..., 0].long()]]


class DraftVocabTable(_Table):
    """Logits over the draft vocabulary, mapped by d2t."""

    @property
    def d2t(self):
        return self.ids

    def logits(self, h, state):  # a distinct small score per token: no ties between the other beams
        return 10.0 * F.one_hot(self.proposal_index(state), len(self.ids)).float() + self.ids / 1000


class FullVocabTable(_Table):
    """The same proposals as base-vocabulary logits (no d2t), -inf outside the vocabulary `ids`."""

    def logits(self, h, state):
        logits = 10.0 * F.one_hot(self.ids[self.proposal_index(state)], len(self.propose_V)).float()
        logits = logits + torch.arange(len(self.propose_V)) / 1000
        outside = torch.ones(len(self.propose_V), dtype=torch.bool)
        outside[self.ids] = False
        return logits.masked_fill(outside, float("-inf"))


@pytest.mark.parametrize("W,batch", [(1, 1), (4, 1), (4, 4)])
def test_draft_vocab_decoding_is_lossless_and_maps_ids(W, batch):
    model = tiny_llama("sdpa")
    prompts = make_prompts(8, seed=2)
    plain = plain_greedy(model, prompts, MAX_NEW, None).tokens
    table = seen_bigram_table(prompts, plain)
    d2t = torch.tensor(sorted(set(table.tolist()) | set(range(3, 40))))  # most proposals are draftable
    stats = {}
    for name, stub in (("draft", DraftVocabTable(table, d2t)), ("full", FullVocabTable(table, d2t))):
        decoder = SpeculativeDecoder(model, stub, beam_width=W, beam_length=4)
        out, taus = [], []
        for i in range(0, len(prompts), batch):
            result = decoder.generate(prompts[i:i + batch], MAX_NEW, None)
            out += result.tokens
            taus.append(result.stats.tokens_per_step)
        assert out == plain
        stats[name] = taus
    assert stats["draft"] == stats["full"]  # same proposals -> same acceptance: ids were mapped right
    assert max(stats["draft"]) > 1.5  # and they are accepted: the table agrees with the base model


def test_sampling_with_draft_vocab_runs_and_only_proposes_draftable_tokens():
    model = tiny_llama("sdpa")
    d2t = torch.arange(3, V, 2)
    drafter = build_drafter(make_arch(V, model.config.hidden_size, draft_vocab_size=len(d2t)),
                            model.model.embed_tokens.weight, seed=0, d2t=d2t)
    decoder = SpeculativeDecoder(model, drafter, beam_width=2, beam_length=3, temperature=0.8)
    result = decoder.generate(make_prompts(2, seed=3), 8, None, generator=torch.Generator().manual_seed(0))
    assert all(len(t) == 8 for t in result.tokens)
    from eval.sampling import sample_chains

    h = torch.randn(2, model.config.hidden_size)
    chains = sample_chains(drafter, h, torch.tensor([5, 6]), 3, 4, 0.8, torch.Generator().manual_seed(1))
    assert set(chains.tokens_BWL[..., 1:].unique().tolist()) <= set(d2t.tolist())
    outside = torch.ones(V, dtype=torch.bool)
    outside[d2t] = False
    assert float(chains.q_BWKV[..., outside].abs().max()) == 0.0  # q is 0 outside the draft vocabulary


def test_export_roundtrip_draft_vocab(tmp_path):
    Vb, H = 96, 16
    embed = torch.randn(Vb, H)
    d2t = torch.tensor(sorted(torch.randperm(Vb)[:40].tolist()))
    arch = make_arch(Vb, H, exit_dim=24, draft_vocab_size=40)
    drafter = build_drafter(arch, embed, seed=1, d2t=d2t)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = export_drafter(drafter.state_dict(), arch, tmp_path / "drafter")
    config = json.loads((out / "config.json").read_text())
    assert config["draft_vocab_size"] == 40 and config["vocab_size"] == Vb
    assert expected_tensors(arch)["d2t"] == (40,) and expected_tensors(arch)["lm_head.2.weight"] == (40, 24)
    loaded = load_exported(out, embed)
    assert torch.equal(loaded.d2t, d2t) and loaded.d2t.dtype == torch.long
    # the export is bf16: compare with the bf16-rounded weights (the base embeddings are not exported)
    ref = drafter_from_state(arch, {k: v if k == "d2t" else v.bfloat16().float()
                                    for k, v in drafter.state_dict().items()}, embed)
    h, tokens = torch.randn(4, H), torch.randint(0, Vb, (4, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(h, tokens), ref(h, tokens), atol=0, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("n", [0, 40])
def test_base_head_init_starts_from_the_base_models_read_out(n):
    """drafter.init=base_head: at step 0 the drafter's logits are the base model's own logits at h (over
    its vocabulary), whatever the tokens drafted so far; training then moves every weight."""
    model = tiny_llama("sdpa")  # untied: the output embeddings are not the input table
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert not torch.equal(embed, head)
    H = model.config.hidden_size
    d2t = torch.randperm(V, generator=torch.Generator().manual_seed(3))[:n].sort().values if n else None
    arch = make_arch(V, H, exit_dim=H, horizon=4, draft_vocab_size=n)
    drafter = build_drafter(arch, embed, seed=0, d2t=d2t, base_head_VH=head)
    with torch.enable_grad():  # as the training worker builds it: the init writes under its own no_grad
        assert all(p.requires_grad for p in build_drafter(arch, embed, seed=0, d2t=d2t, base_head_VH=head).parameters())
    ids = torch.randint(3, V, (3, 9), generator=torch.Generator().manual_seed(4))
    out = model(ids, output_hidden_states=True)
    h = out.hidden_states[-1][:, -1]  # the teacher's h: the last layer after the final norm
    base = out.logits[:, -1]
    logits = drafter(h, torch.randint(3, V, (3, 4), generator=torch.Generator().manual_seed(5)))
    want = base[:, d2t] if n else base
    for i in range(4):
        torch.testing.assert_close(logits[:, i], want, atol=1e-4, rtol=1e-4)
    # the random init is not that, and the init needs the base model's width
    assert not torch.allclose(build_drafter(arch, embed, seed=0, d2t=d2t)(h, ids[:, :4])[:, 0], want, atol=1e-2)
    with pytest.raises(ValueError, match="so drafter.exit_dim must be its hidden size 64 \\(got 32\\)"):
        build_drafter(make_arch(V, H, exit_dim=32, draft_vocab_size=n), embed, d2t=d2t, base_head_VH=head)
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="bad value for 'drafter.init': 'medusa'; choose random or base_head"):
        load_config(["recipe=tiny", "drafter.init=medusa"])
