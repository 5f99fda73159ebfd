"""The static step (eval/graphs.py): the whole greedy step at fixed shapes, run eagerly here (CUDA
graphs replay it on a GPU: tests/test_cuda.py).

    python -m pytest tests/test_graphs.py -q

Token for token against plain greedy decoding (batched, ragged prompts, EOS rows, several (W, L),
buffers reused across calls), and no host read inside the step: every aten op that reads a device
value back to the host, or whose output shape depends on values, is counted while the step runs.
The dynamic step (eval/decoder.py run_step) must trip the same counter.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eval.beam import BeamProposer
from eval.decoder import (DecodeState, commit_kv, greedy_verifier, new_cache, plain_greedy, prefill, run_step,
                          stack_kv)
from eval.graphs import GraphedDecoder
from eval.metrics import DecodeStats
from eval.step_bench import OracleProposer, corruption_rate, llama_shape, verifier_fixed_point
from eval.step_bench import main as bench_main
from tests.test_decoder import (MAX_NEW, TableDrafter, V, make_prompts, ragged_eos_case, random_drafter,
                                seen_bigram_table)
from tests.test_tree import IMPLS, single_thread, tiny_llama  # noqa: F401  (single_thread: autouse fixture)

# aten ops that make the host wait for the device (a value read back) or whose output shape depends
# on values (a hidden read): either breaks CUDA graph capture.
HOST_READS = {"_local_scalar_dense", "item", "equal", "is_nonzero", "nonzero", "masked_select", "unique",
              "_unique", "_unique2", "unique_consecutive", "unique_dim", "repeat_interleave"}


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module", params=IMPLS)
def setup(request):
    model = tiny_llama(request.param)
    prompts = make_prompts(12, seed=4)
    free, eos, reference = ragged_eos_case(model, prompts)
    return model, prompts, eos, reference, TableDrafter(seen_bigram_table(prompts, free))


@pytest.mark.parametrize("W,L", [(1, 4), (3, 4), (4, 2), (2, 5)])
def test_static_step_is_lossless(setup, W, L):
    model, prompts, eos, reference, table = setup
    decoder = GraphedDecoder(model, BeamProposer(table, W, L), W, L, max_cache_len=96)
    first = decoder.generate(prompts[:8], MAX_NEW, eos)
    assert first.tokens == reference[:8], (W, L)
    assert first.stats.tokens_per_step > 1.3, first.stats.to_dict()  # acceptance is exercised
    assert decoder.generate(prompts[4:12], MAX_NEW, eos).tokens == reference[4:12]  # the same buffers again
    assert [decoder.generate([p], MAX_NEW, eos).tokens[0] for p in prompts[:3]] == reference[:3]  # batch 1
    assert len(decoder.buckets) == 2
    assert all(hasattr(step.cache, "kv_stack") for step in decoder.buckets.values())  # the one-gather commit ran


def test_the_stacked_commit_moves_what_the_per_layer_commit_moves():
    """stack_kv: every layer's K/V become views of one tensor (what the model writes lands in it), and
    committing through it moves exactly what the per-layer gather/scatter moves, overlapping ranges too."""
    model = tiny_llama("sdpa")
    per_layer, stacked = new_cache(model, 3, 32), new_cache(model, 3, 32)
    gen = torch.Generator().manual_seed(0)
    for a, b in zip(per_layer.layers, stacked.layers):
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            x.copy_(torch.randn(x.shape, generator=gen))
            y.copy_(x)
    assert stack_kv(stacked)
    base = stacked.kv_stack.untyped_storage().data_ptr()
    assert all(buf.untyped_storage().data_ptr() == base for layer in stacked.layers for buf in (layer.keys, layer.values))
    src_BL = torch.tensor([[9, 10, 11], [12, 14, 15], [4, 5, 6]])
    dst_BL = torch.tensor([[7, 8, 9], [10, 11, 12], [4, 5, 6]])  # overlapping, and a row already in place
    commit_kv(per_layer, src_BL, dst_BL, static=True)
    commit_kv(stacked, src_BL, dst_BL, static=True)
    for a, b in zip(per_layer.layers, stacked.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert not torch.equal(per_layer.layers[0].keys[0, :, 7], stacked.kv_stack[0, 0, :, 0])  # it did move something


def test_static_step_with_a_real_drafter_and_plain(setup):
    model, prompts, eos, reference, _ = setup
    decoder = GraphedDecoder(model, BeamProposer(random_drafter(model), 4, 3), 4, 3, max_cache_len=96)
    assert decoder.generate(prompts, MAX_NEW, eos).tokens == reference
    plain = GraphedDecoder.plain(model, max_cache_len=64)
    result = plain.generate(prompts, MAX_NEW, eos)
    assert result.tokens == reference and result.stats.tokens_per_step == 1.0
    assert plain.generate(prompts[:2], 0, eos).tokens == [[], []]


@torch.no_grad()  # as GraphedDecoder.generate runs it: the stacked K/V views take no autograd history
def test_the_static_step_reads_nothing_back(setup):
    model, prompts, eos, _, table = setup
    decoder = GraphedDecoder(model, BeamProposer(table, 3, 4), 3, 4, max_cache_len=96)
    decoder.generate(prompts[:4], MAX_NEW, eos)
    step = decoder.buckets[(4, MAX_NEW, eos)]
    step.load(prefill(model, prompts[:4], 96, MAX_NEW, eos, cache=step.cache))
    with HostReads() as reads:
        for _ in range(3):
            step.body()
    assert reads.seen == []
    # teeth: the dynamic step reads the batch's tree size and write slot back, and the counter sees it
    state: DecodeState = prefill(model, prompts[:4], 96, MAX_NEW, eos)
    with HostReads() as reads:
        run_step(model, BeamProposer(table, 3, 4), greedy_verifier, state, DecodeStats(3, 4))
    assert "_local_scalar_dense" in reads.seen


def test_clear_errors(setup):
    model, prompts, eos, _, table = setup
    decoder = GraphedDecoder(model, BeamProposer(table, 3, 4), 3, 4, max_cache_len=40)
    with pytest.raises(ValueError, match="max_cache_len=40 is too short"):
        decoder.generate(prompts, MAX_NEW, eos)
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        GraphedDecoder(model, BeamProposer(table, 3, 4), 3, 4, max_cache_len=96, graphs=True)


def test_oracle_stand_in_controls_acceptance(setup):
    """The scale bench's drafter stand-in (eval/step_bench.py): the base model's own continuation with
    tokens replaced at a set rate. Rate 0 accepts every draft (tau = L); a rate set for tau = 3 lands
    near 3; the output stays the base model's, token for token."""
    model, prompts, _, _, _ = setup
    W, L, new = 2, 5, 24
    continuation = plain_greedy(model, prompts, new + 2 * L, None).tokens
    reference = [c[:new] for c in continuation]
    for target in (L, 3.0):
        rate = corruption_rate(target, L)
        proposer = OracleProposer(BeamProposer(random_drafter(model), W, L), continuation, rate, V, seed=0)
        result = GraphedDecoder(model, proposer, W, L, max_cache_len=96).generate(prompts, new, None)
        assert result.tokens == reference
        if target == L:
            assert rate == 0.0 and result.stats.tokens_per_step == L
        else:
            assert 2.4 < result.stats.tokens_per_step < 3.6, result.stats.tokens_per_step


def test_verifier_fixed_point(setup):
    """The stand-in's path when ties flip (bf16 on a GPU): the decoder's own output, found by proposing the
    last round's. In fp32 here plain greedy's continuation is already the fixed point (1 round); a
    continuation with a wrong token converges back to it."""
    model, prompts, _, _, _ = setup
    W, L = 2, 4
    continuation = plain_greedy(model, prompts[:4], 20, None).tokens
    decoder = GraphedDecoder(model, OracleProposer(BeamProposer(random_drafter(model), W, L), continuation, 0.0, V),
                             W, L, max_cache_len=96)
    assert verifier_fixed_point(decoder, prompts[:4], continuation) == (continuation, 1)
    wrong = [c[:5] + [(c[5] + 1) % V] + c[6:] for c in continuation]
    assert verifier_fixed_point(decoder, prompts[:4], wrong) == (continuation, 2)


def test_corruption_rate_inverts_the_expected_tau():
    for L in (4, 5, 8):
        for tau in (1.5, 3.0, L - 0.5):
            a = 1.0 - corruption_rate(tau, L)
            assert abs(sum(a ** k for k in range(L)) - tau) < 1e-6
    with pytest.raises(ValueError, match="tau"):
        corruption_rate(6.0, 5)


def test_step_bench_runs_on_cpu(tmp_path, capsys):
    """The CPU version of the scale bench, at a toy shape: it prints every measured row and writes its record."""
    out = tmp_path / "bench.json"
    bench_main(["--shape", "toy", "--batch-sizes", "1,2", "--taus", "2,3", "--beam-width", "2", "--beam-length", "4",
                "--max-new-tokens", "16", "--prompt-tokens", "8", "--repeats", "1", "--timing-steps", "3",
                "--out", str(out)])
    text = capsys.readouterr().out
    assert "whole step / verify forward" in text and "speedup" in text
    import json

    record = json.loads(out.read_text())
    assert {r["batch_size"] for r in record["rows"]} == {1, 2}
    for row in record["rows"]:
        assert row["lossless"] is True
        assert row["plain_step_ms"] > 0 and row["verify_ms"] > 0 and row["step_ms"] > 0 and row["drafter_ms"] > 0
        assert row["oracle_is_plain"] and row["oracle_rounds"] == 1  # fp32 on a CPU: no tie flips
        assert {t["target_tau"] for t in row["taus"]} == {2.0, 3.0}
    assert llama_shape("llama8b").hidden_size == 4096
