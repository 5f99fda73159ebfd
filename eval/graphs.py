"""The whole greedy step as one CUDA graph per bucket (docs/design.md §3.6).

    decoder = GraphedDecoder(model, BeamProposer(drafter, W, L), num_paths=W, beam_length=L, max_cache_len=1024)
    result = decoder.generate(prompts, max_new_tokens=256, eos_token_id=eos)     # == plain_greedy's tokens
    plain = GraphedDecoder.plain(model, max_cache_len=1024).generate(prompts, 256, eos)

The step is the repo's one step skeleton (eval/decoder.py `core_step`): beam search, packing, the
verify forward, greedy acceptance and the cache commit, run with `DecodeState.static`: the tree
padded to W * L slots, its write slot a device tensor, the K/V commit unconditional. Nothing in it
reads a value back to the host, and every shape depends only on the bucket: (batch size, max cache
length, max_new_tokens, eos id, W, L). So on CUDA it is captured ONCE per bucket (`torch.cuda.CUDAGraph`)
and each step is one replay; the decode loop's only host read per step is the small readout
tensor (accepted drafts, active rows, packed tokens, finished rows), which both the statistics and
the stopping test need. On CPU (or with graphs=False) the same static step runs eagerly: that is
how CI tests it, token for token against plain greedy decoding, and without host reads
(tests/test_graphs.py counts them).

The decoding state lives in buffers at fixed addresses (`StaticStep`): each generate() prefills
into the bucket's own KV cache, copies its state into the buffers and replays. The step writes its
new state back into the same buffers at its end (`core_step` returns new tensors; the copies are
part of the graph).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from eval.decoder import (DecodeState, GenerationResult, NextToken, PlainProposer, Proposer, argmax_token,
                          check_prompts, core_step, greedy_verifier, new_cache, prefill, stack_kv, truncate)
from eval.metrics import DecodeStats
from eval.ngram import LookupProposer

# The decoding state a step reads and rewrites (its other fields are constant during a decode).
STATE_FIELDS = ("ctx_B", "g0_B", "h_BD", "out_BN", "num_new_B", "done_B")
WARMUP_STEPS = 3  # eager steps on a side stream before capture (allocator, cuBLAS workspaces, lazy inits)
CACHE_ROUND = 256  # without a fixed max_cache_len, each call's is rounded up to this (fewer buckets)


def use_graphs(model, graphs: bool | None) -> bool:
    """None: CUDA graphs exactly when the model is on a CUDA device."""
    on_cuda = model.device.type == "cuda"
    if graphs and not on_cuda:
        raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {model.device}")
    return on_cuda if graphs is None else graphs


class StaticStep:
    """One bucket: its KV cache, its state buffers, and the step over them (captured on first use
    when `graphs`)."""

    def __init__(self, model, proposer: Proposer, verifier: Callable, batch_size: int, max_cache_len: int,
                 width: int, dedup: bool, graphs: bool):
        self.model, self.proposer, self.verifier, self.dedup, self.graphs = model, proposer, verifier, dedup, graphs
        self.cache = new_cache(model, batch_size, max_cache_len)
        stack_kv(self.cache)  # one gather + one scatter commits the accepted K/V of every layer
        self.width = width  # out_BN columns: max_new_tokens + 2 L (eval/decoder.py commit)
        self.state: DecodeState | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.readout_4B = torch.zeros(4, batch_size, dtype=torch.long, device=model.device)

    def load(self, state: DecodeState) -> DecodeState:
        """Take a freshly prefilled state (in this bucket's cache) into the fixed buffers."""
        pad = self.width - state.out_BN.shape[1]
        state.out_BN = torch.nn.functional.pad(state.out_BN, (0, pad))
        state.static = True
        if self.state is None:
            self.state = state
            return state
        for name in STATE_FIELDS:
            getattr(self.state, name).copy_(getattr(state, name))
        self.state.prompt_BT, self.state.prompt_len_B = state.prompt_BT, state.prompt_len_B
        return self.state

    def body(self) -> None:
        """core_step over the buffers, the new state copied back into them, the readout filled."""
        state = self.state
        buffers = {name: getattr(state, name) for name in STATE_FIELDS}
        out = core_step(self.model, self.proposer, self.verifier, state, self.dedup)
        for name, buffer in buffers.items():
            new = getattr(state, name)
            if new is not buffer:
                buffer.copy_(new)
                setattr(state, name, buffer)
        self.readout_4B.copy_(torch.stack([out.acc.num_accepted_B, out.active_B.long(), out.tree.num_packed_B,
                                           state.done_B.long()]))

    def capture(self) -> None:
        """Record `body` as one CUDA graph. The warm-up steps advance the state; it is restored after
        them (K/V they wrote lie at slots >= each row's context, masked until rewritten)."""
        snapshot = {name: getattr(self.state, name).clone() for name in STATE_FIELDS}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.body()
        torch.cuda.current_stream().wait_stream(side)
        for name, value in snapshot.items():
            getattr(self.state, name).copy_(value)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.body()
        self.graph = graph

    def run(self) -> list[list[int]]:
        """One step; returns the readout rows (accepted drafts, active, packed tokens, done) per row:
        the step's one host read."""
        if self.graphs and self.graph is None:
            self.capture()
        if self.graph is not None:
            self.graph.replay()
        else:
            self.body()
        return self.readout_4B.tolist()


class GraphedDecoder:
    """Greedy decoding with the static step, on CUDA through CUDA graphs (one per bucket). `proposer`
    is a greedy one with fixed-size paths: the drafter's beams (eval/beam.py BeamProposer), g0 alone
    (`GraphedDecoder.plain`), or a stand-in with the same shapes (eval/step_bench.py)."""

    def __init__(self, model, proposer: Proposer, num_paths: int, beam_length: int, max_cache_len: int | None = None,
                 verifier: Callable = greedy_verifier, dedup: bool = True, graphs: bool | None = None):
        """`max_cache_len`: every bucket's cache length (a call that needs more is refused); None = each
        call's need rounded up to CACHE_ROUND (one bucket per length class)."""
        self.model, self.proposer, self.verifier = model, proposer, verifier
        self.num_paths, self.beam_length, self.max_cache_len, self.dedup = num_paths, beam_length, max_cache_len, dedup
        self.graphs = use_graphs(model, graphs)
        if self.graphs and isinstance(proposer, LookupProposer):
            raise ValueError("the hybrid's prompt lookup reads each call's prompts, whose shape a captured graph "
                             "cannot follow: run the hybrid eagerly (SpeculativeDecoder) or with graphs=False")
        self.buckets: dict[tuple, StaticStep] = {}

    @classmethod
    def plain(cls, model, max_cache_len: int | None = None, graphs: bool | None = None) -> GraphedDecoder:
        """Plain greedy decoding (one token per row per forward) with the same machinery: the baseline."""
        return cls(model, PlainProposer(), 1, 1, max_cache_len, verifier=NextToken(argmax_token), graphs=graphs)

    def bucket(self, batch_size: int, max_new_tokens: int, eos_token_id: int | None, max_cache_len: int) -> StaticStep:
        key = (batch_size, max_new_tokens, eos_token_id)  # constants of the captured step
        if self.max_cache_len is None:
            key += (max_cache_len,)
        if key not in self.buckets:
            self.buckets[key] = StaticStep(self.model, self.proposer, self.verifier, batch_size, max_cache_len,
                                           max_new_tokens + 2 * self.beam_length, self.dedup, self.graphs)
        return self.buckets[key]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None) -> GenerationResult:
        check_prompts(prompts)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        # a step writes its W * L tree past max_b ctx_b; a row may overshoot max_new_tokens by L - 1
        need = max(len(p) for p in prompts) + max_new_tokens + (self.num_paths + 1) * self.beam_length
        max_cache_len = self.max_cache_len or -(-need // CACHE_ROUND) * CACHE_ROUND
        if need > max_cache_len:
            raise ValueError(f"max_cache_len={self.max_cache_len} is too short: the longest prompt "
                             f"({max(len(p) for p in prompts)} tokens) + max_new_tokens ({max_new_tokens}) + a step's "
                             f"slots ({(self.num_paths + 1) * self.beam_length}) need {need}")
        start = time.perf_counter()
        step = self.bucket(len(prompts), max_new_tokens, eos_token_id, max_cache_len)
        state = step.load(prefill(self.model, prompts, max_cache_len, max_new_tokens, eos_token_id, cache=step.cache))
        stats = DecodeStats(self.num_paths, self.beam_length)
        done = bool(state.done_B.all())  # also waits for the prefill: the loop's time is its own
        loop_start = time.perf_counter()
        while not done:
            accepted_B, active_B, packed_B, done_B = step.run()
            stats.record([a for a, on in zip(accepted_B, active_B) if on], [p for p, on in zip(packed_B, active_B) if on])
            stats.num_forwards += 1
            done = all(done_B)
        loop_seconds = time.perf_counter() - loop_start  # the last readout waited for the last step
        tokens = [truncate(t, max_new_tokens, eos_token_id) for t in state.new_tokens]
        return GenerationResult(tokens, stats, time.perf_counter() - start, loop_seconds)
