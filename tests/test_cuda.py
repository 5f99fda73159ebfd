"""The decoder's CUDA paths: bf16 greedy losslessness, CUDA graphs (torch.compile reduce-overhead),
and statistical losslessness of speculative sampling with CUDA random generators.

    python -m pytest tests/test_cuda.py -q      # on a machine with a CUDA device

Every test here needs a CUDA device and is skipped without one (CI has none); the same decoder code
is tested on CPU by tests/test_decoder.py and tests/test_sampling.py. The checks are the CPU ones,
moved to the GPU: token for token against plain greedy decoding in the same dtype on the same
device, and the chi-square test of tests/test_sampling.py against the exact law.
"""

from __future__ import annotations

import pytest
import torch

from eval.decoder import compile_base, first_divergence, plain_greedy
from eval.speculative import SpeculativeDecoder
from pipeline.drafter import build_drafter, make_arch
from tests.test_decoder import MAX_NEW, TableDrafter, V, make_prompts, ragged_eos_case, seen_bigram_table
from tests.test_tree import IMPLS, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)")

CUDA = "cuda"


def cuda_setup(impl: str, dtype: torch.dtype):
    """A tiny Llama on the GPU, ragged prompts, plain greedy outputs (the reference) and an eos that
    the model often emits (some rows stop early), plus a seen-bigram drafter (ragged acceptance)."""
    model = tiny_llama(impl).to(CUDA, dtype)
    prompts = make_prompts(16, seed=0)
    free, eos, reference = ragged_eos_case(model, prompts)
    table = TableDrafter(seen_bigram_table(prompts, free)).to(CUDA)
    return model, prompts, eos, reference, table


@pytest.mark.parametrize("impl", IMPLS)
def test_plain_greedy_on_cuda_equals_hf_generate(impl):
    model = tiny_llama(impl).to(CUDA)
    prompts = make_prompts(6, seed=3)
    ours = plain_greedy(model, prompts, MAX_NEW, None).tokens
    for prompt, tokens in zip(prompts, ours):
        ids = torch.tensor([prompt], device=CUDA)
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                            pad_token_id=0)
        assert tokens == hf[0, len(prompt):].tolist()


@pytest.mark.parametrize("impl", IMPLS)
def test_greedy_lossless_in_bf16_on_cuda(impl):
    """bf16 on the GPU (the production dtype): batched, ragged acceptance, tree attention on and off,
    beam width 1; every row equals bf16 plain greedy decoding token for token."""
    model, prompts, eos, reference, table = cuda_setup(impl, torch.bfloat16)
    assert [plain_greedy(model, [p], MAX_NEW, eos).tokens[0] for p in prompts[:8]] == reference[:8]
    random = build_drafter(make_arch(V, model.config.hidden_size), model.model.embed_tokens.weight, seed=0)
    random = random.to(CUDA, torch.bfloat16)
    for drafter, W, L, tree in ((table, 3, 4, True), (table, 4, 3, False), (table, 1, 5, True), (random, 4, 3, True)):
        decoder = SpeculativeDecoder(model, drafter, beam_width=W, beam_length=L, tree_attention=tree)
        result = decoder.generate(prompts[:8], MAX_NEW, eos)
        assert result.tokens == reference[:8], (W, L, tree)
        assert decoder.generate(prompts[8:], MAX_NEW, eos).tokens == reference[8:], (W, L, tree)
        if drafter is table:
            assert result.stats.tokens_per_step > 1.3, result.stats.to_dict()  # acceptance is exercised


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graphs_decode_identically(dtype):
    """eval.compile=reduce-overhead (torch.compile with CUDA graphs) on the base model, and no CUDA
    graph skipped. fp32: plain and speculative decoding give the eager tokens. bf16: inductor's
    kernels are shape-specialized and round differently for a 1-token step and a Q-token tree, so
    a near-tie can flip (seen once in 8 HumanEval prompts with the tiny model); speculative decoding
    must equal plain decoding of the same compiled model except where it diverges at a numerical
    tie (eval.decoder.first_divergence)."""
    from torch._dynamo.utils import counters

    model, prompts, eos, reference, table = cuda_setup("sdpa", dtype)
    compiled = compile_base(tiny_llama("sdpa").to(CUDA, dtype), "reduce-overhead")
    counters.clear()
    plain = plain_greedy(compiled, prompts[:8], MAX_NEW, eos).tokens
    if dtype == torch.float32:
        assert plain == reference[:8]
    decoder = SpeculativeDecoder(compiled, table, beam_width=3, beam_length=4)
    for _ in range(2):  # the second pass replays recorded graphs
        spec = decoder.generate(prompts[:4], MAX_NEW, eos).tokens
        spec += [decoder.generate([p], MAX_NEW, eos).tokens[0] for p in prompts[4:8]]
        if dtype == torch.float32:
            assert spec == plain
        for p, a, b in zip(prompts, plain, spec):
            d = first_divergence(compiled, p, a, b)
            assert d is None or d["near_tie"], d
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


def test_speculative_sampling_on_cuda_matches_exact_law(monkeypatch):
    """tests/test_sampling.py's chi-square test (N = 4000 rows, alpha = 1e-3) on the GPU, fp32,
    with a CUDA generator; the rule without residual correction must fail the same test there too."""
    import eval.sampling as sampling_module
    from tests.test_sampling import (
        ALPHA,
        N_SAMPLES,
        NUM_TOKENS,
        PROMPT,
        LastTokenDrafter,
        T,
        cell_counts,
        chi_square_p_value,
        exact_law,
    )
    from tests.test_sampling import V as SV

    model = tiny_llama("sdpa", vocab_size=SV).to(CUDA)
    with torch.no_grad():
        drafter = LastTokenDrafter(model(torch.arange(SV, device=CUDA)[:, None]).logits[:, 0])
    law = exact_law(model.cpu(), PROMPT, NUM_TOKENS, T)
    model.to(CUDA)

    def p_value(seed: int) -> tuple[float, float]:
        decoder = SpeculativeDecoder(model, drafter, beam_width=4, beam_length=3, temperature=T)
        result = decoder.generate([PROMPT] * N_SAMPLES, NUM_TOKENS, None,
                                  generator=torch.Generator(device=CUDA).manual_seed(seed))
        accepted = sum(result.stats.accepted[:N_SAMPLES]) / N_SAMPLES
        return chi_square_p_value(cell_counts(result.tokens, NUM_TOKENS), law), accepted

    p, accepted = p_value(1)
    assert accepted > 0.3 and p > ALPHA, (p, accepted)
    monkeypatch.setattr(sampling_module, "residual", lambda p_BV, q_BV: p_BV)  # teeth: no residual correction
    p_wrong, _ = p_value(1)
    assert p_wrong < ALPHA, p_wrong


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_whole_step_in_one_cuda_graph(dtype):
    """eval/graphs.py on the GPU: beam search, packing, the verify forward, acceptance and the commit
    captured as ONE CUDA graph per bucket and replayed. fp32: token for token equal to plain greedy
    decoding (batched, ragged, EOS rows; the bucket's buffers reused by a second call). bf16: equal
    to the graphed plain decoder except at numerical ties (first_divergence)."""
    from eval.beam import BeamProposer
    from eval.graphs import GraphedDecoder

    model, prompts, eos, reference, table = cuda_setup("sdpa", dtype)
    random = build_drafter(make_arch(V, model.config.hidden_size), model.model.embed_tokens.weight, seed=0)
    random = random.to(CUDA, dtype)
    plain = GraphedDecoder.plain(model, max_cache_len=64)
    plain_tokens = plain.generate(prompts[:8], MAX_NEW, eos).tokens
    assert plain.buckets[(8, MAX_NEW, eos)].graph is not None
    if dtype == torch.float32:
        assert plain_tokens == reference[:8]
    for drafter, W, L in ((table, 3, 4), (table, 1, 5), (random, 4, 3)):
        decoder = GraphedDecoder(model, BeamProposer(drafter, W, L), W, L, max_cache_len=96)
        for batch in (prompts[:8], prompts[:8]):  # the second call replays the captured graph again
            result = decoder.generate(batch, MAX_NEW, eos)
            if dtype == torch.float32:
                assert result.tokens == reference[:8], (W, L)
            for p, a, b in zip(batch, plain_tokens, result.tokens):
                d = first_divergence(model, p, a, b)
                assert d is None or d["near_tie"], d
        assert decoder.buckets[(8, MAX_NEW, eos)].graph is not None
        if drafter is table:
            assert result.stats.tokens_per_step > 1.3, result.stats.to_dict()


def test_step_bench_on_cuda():
    """The scale bench's machinery on the GPU at a toy shape (the 8B run is the device check in the README)."""
    from eval.step_bench import main as bench_main

    record = bench_main(["--shape", "toy", "--device", "cuda", "--dtype", "float32", "--batch-sizes", "1,4",
                         "--taus", "2,3", "--beam-width", "2", "--beam-length", "4", "--max-new-tokens", "24",
                         "--prompt-tokens", "8", "--repeats", "1", "--timing-steps", "5"])
    assert record["cuda_graphs"] is True
    for row in record["rows"]:
        assert row["lossless"], row
