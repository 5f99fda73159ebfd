"""The scale check of the whole step (docs/design.md §3.6): an 8B-shaped Llama on a GPU, or a small
shape on any CPU, with a drafter stand-in whose acceptance is set.

    python -m eval.step_bench --shape llama8b --device cuda --dtype bfloat16     # CUDA graphs, bs 1, 4, 8
    python -m eval.step_bench --shape smollm2                                    # the CPU version (eager)

No weights travel: the base model is built from its shape with random weights (its output layer
scaled up so that greedy choices are not bf16 ties), the drafter from the recipe's drafter settings
(same shape, random weights). The stand-in (`OracleProposer`) runs that drafter's full beam search,
then replaces beam 0 with the base model's own greedy continuation (computed by a plain run) in
which each token is replaced by another at a set rate: at rate r, drafts are accepted with
probability a = 1 - r each, so tau = 1 + a + ... + a^(L-1) (`corruption_rate` inverts it). The
output stays the base model's: every row is checked token for token against the plain run.

Per batch size, in one process, repeats interleaved (medians):
- plain step: plain greedy decoding with the same static step (and graphs), loop time / steps;
- verify forward: the base forward alone over the W * L packed tree (graph-replayed on CUDA);
- whole step: the speculative decode loop's time / steps (drafter beam search, packing, verify
  forward, acceptance, commit, and the one host read), and its ratio to the verify forward;
- per target tau: measured tau, speedup over plain decoding (loop time per token), the ideal
  (tau x plain step / verify forward) and the efficiency (speedup / ideal).
Prefill is the same work for both and is left out of every time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from eval.beam import BeamProposer
from eval.decoder import DecodeState, Proposal, Proposer, base_forward, first_divergence, prefill, tree_inputs
from eval.graphs import GraphedDecoder
from eval.tree import pack_tree

OUTPUT_SCALE = 8.0  # random output layer x this: greedy argmaxes far from bf16 rounding ties
SHAPES = {  # (LlamaConfig fields, the recipe whose drafter and (W, L) are used)
    "llama8b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                     tie_word_embeddings=False), "llama8b"),
    "smollm2": (dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5,
                     tie_word_embeddings=True), "smollm2"),
    "toy": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False), "tiny"),
}


def llama_shape(name: str, max_positions: int = 4096):
    from transformers import LlamaConfig

    fields, _ = SHAPES[name]
    return LlamaConfig(**fields, max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, attn_implementation="sdpa")


def corruption_rate(tau: float, beam_length: int) -> float:
    """The replacement rate r at which a draft-by-draft acceptance a = 1 - r gives
    E[tokens per step] = 1 + a + ... + a^(L-1) = tau (bisection; tau in [1, L])."""
    L = beam_length
    if not 1.0 <= tau <= L:
        raise ValueError(f"target tau {tau} must lie in [1, beam_length={L}]")
    if tau == L:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        a = (lo + hi) / 2
        lo, hi = (a, hi) if sum(a ** k for k in range(L)) < tau else (lo, a)
    return 1.0 - (lo + hi) / 2


class OracleProposer(Proposer):
    """A controlled-acceptance stand-in for a trained drafter (benchmarks only): the real drafter's
    beams, computed at full cost, with beam 0 replaced by the base model's known continuation, each
    token of which was replaced by another at `rate` (fixed per position, from `seed`). Static: the
    path is gathered at each row's committed count, so it is capturable like the beam search."""

    def __init__(self, inner: Proposer, continuations: list[list[int]], rate: float, vocab_size: int, seed: int = 0,
                 device: torch.device | str = "cpu"):
        self.inner, self.rate, self.vocab_size, self.seed, self.device = inner, rate, vocab_size, seed, device
        self.path_BN: torch.Tensor | None = None
        self.set_continuations(continuations)

    def set_continuations(self, continuations: list[list[int]]) -> None:
        """New continuations (same shape), written in place: a captured step reads the same tensor."""
        true_BN = torch.tensor(continuations, dtype=torch.long)
        gen = torch.Generator().manual_seed(self.seed)
        replaced_BN = torch.rand(true_BN.shape, generator=gen) < self.rate
        other_BN = (true_BN + torch.randint(1, self.vocab_size, true_BN.shape, generator=gen)) % self.vocab_size
        path_BN = torch.where(replaced_BN, other_BN, true_BN).to(self.device)
        if self.path_BN is None:
            self.path_BN = path_BN
        else:
            self.path_BN.copy_(path_BN)

    def propose(self, state: DecodeState) -> Proposal:
        paths_BWL = self.inner.propose(state).paths_BWL.clone()
        L = paths_BWL.shape[2]
        index_BL = (state.num_new_B[:, None] + torch.arange(L, device=paths_BWL.device)).clamp(max=self.path_BN.shape[1] - 1)
        oracle_BL = self.path_BN.gather(1, index_BL)
        oracle_BL[:, 0] = state.g0_B  # every path starts at g0
        paths_BWL[:, 0] = oracle_BL
        return Proposal(paths_BWL)


def verifier_fixed_point(decoder: GraphedDecoder, prompts, continuations: list[list[int]],
                         max_rounds: int = 64) -> tuple[list[list[int]], int]:
    """(continuations, rounds): the continuation the speculative decoder itself commits when it is
    proposed (rate 0). In bf16 a batched verify forward rounds differently from one-token steps and
    flips near-ties (random weights make them common), so plain decoding's continuation would be
    rejected where the verifier picks the other token. Each round proposes the last round's output;
    the prefix before the first change repeats exactly, so the first mismatch moves forward every round."""
    n = len(continuations[0])
    for rounds in range(1, max_rounds + 1):
        decoder.proposer.set_continuations(continuations)
        out = decoder.generate(prompts, n, None).tokens
        if out == continuations:
            return continuations, rounds
        continuations = out
    return continuations, max_rounds


def build_models(shape: str, device: str, dtype: torch.dtype, seed: int = 0, exit_dim: int = 0):
    """(base model, drafter, (W, L)) of a shape: random weights, built on the device. `exit_dim` > 0
    overrides the recipe's drafter width."""
    from transformers import LlamaForCausalLM

    from pipeline.config import load_config, resolve_drafter
    from pipeline.heads import head_type

    config = llama_shape(shape)
    cfg = load_config([f"recipe={SHAPES[shape][1]}"])
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(OUTPUT_SCALE)
    drafter_cfg = resolve_drafter(cfg.drafter, config.vocab_size)
    if exit_dim:
        drafter_cfg = dataclasses.replace(drafter_cfg, exit_dim=exit_dim)
    head = head_type(drafter_cfg.head)
    arch = head.make_arch(config.vocab_size, config.hidden_size, drafter_cfg)
    d2t = None
    if arch.draft_vocab_size:
        d2t = torch.randperm(config.vocab_size, generator=torch.Generator().manual_seed(seed))[:arch.draft_vocab_size].sort().values
    drafter = head.build(arch, model.model.embed_tokens.weight, seed=seed, d2t=d2t).to(device, dtype).eval()
    with torch.no_grad():  # random residual blocks (the drafter starts as identity blocks): the real cost either way
        for p in drafter.parameters():
            p.normal_(0.0, 0.02)
    return model, drafter, (cfg.eval.beam_width, cfg.eval.beam_length)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, steps: int, graphs: bool, device: torch.device) -> float:
    """Mean seconds of `fn()` over `steps` calls after one untimed call; with `graphs`, `fn` is captured
    as a CUDA graph first (3 warm-up calls on a side stream) and each call is a replay."""
    run = fn
    if graphs:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    run()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    synchronize(device)
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def time_verify_forward(model, prompts: list[list[int]], width: int, length: int, max_cache_len: int,
                        steps: int, graphs: bool) -> float:
    """Seconds of ONE base forward over a W * L packed tree (the static step's tree), replayed."""
    device = model.device
    state = prefill(model, prompts, max_cache_len, 0, None)
    state.static = True
    gen = torch.Generator().manual_seed(1)
    beams_BWL = torch.randint(3, model.config.vocab_size, (len(prompts), width, length), generator=gen).to(device)
    beams_BWL[:, :, 0] = state.g0_B[:, None]
    tree = pack_tree(beams_BWL, size=width * length)
    position_ids_BP, masks, write_at = tree_inputs(model, state, tree)

    def forward():
        base_forward(model, state.cache, tree.tokens_BP, position_ids_BP, masks, write_at)

    return seconds_per_call(forward, steps, graphs, device)


def decode_loop(decoder: GraphedDecoder, prompts, max_new_tokens: int):
    """(tokens, stats, loop seconds): generate() with its prefill timed apart (same prefill both ways)."""
    synchronize(decoder.model.device)
    result = decoder.generate(prompts, max_new_tokens, None)
    return result.tokens, result.stats, result.decode_seconds


@torch.no_grad()
def time_proposer(decoder: GraphedDecoder, batch_size: int, max_new_tokens: int, steps: int) -> float:
    """Seconds of the proposal alone (the drafter's beam search, at full cost) on a bucket's state,
    replayed like the step."""
    step = decoder.buckets[(batch_size, max_new_tokens, None)]

    def propose():
        decoder.proposer.propose(step.state)

    return seconds_per_call(propose, steps, decoder.graphs, decoder.model.device)


def bench(args, models=None) -> dict:
    """`models`: (base model, drafter, (W, L)) already built (else built from args.shape)."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    graphs = use_graphs_for(device, args.graphs)
    model, drafter, (W, L) = models or build_models(args.shape, args.device, dtype, exit_dim=args.exit_dim)
    W, L = args.beam_width or W, args.beam_length or L
    V = model.config.vocab_size
    M = args.prompt_tokens + args.max_new_tokens + 3 * L + (W + 1) * L + 8
    M = -(-M // args.cache_multiple) * args.cache_multiple  # aligned rows for the attention kernels
    rows = []
    for B in args.batch_sizes:
        gen = torch.Generator().manual_seed(B)
        prompts = torch.randint(3, V, (B, args.prompt_tokens), generator=gen).tolist()
        plain = GraphedDecoder.plain(model, M, graphs=graphs)
        continuation, _, _ = decode_loop(plain, prompts, args.max_new_tokens + 2 * L)
        reference = [c[:args.max_new_tokens] for c in continuation]
        fixed = GraphedDecoder(model, OracleProposer(BeamProposer(drafter, W, L), continuation, 0.0, V, device=device),
                               W, L, M, graphs=graphs)
        continuation, rounds = verifier_fixed_point(fixed, prompts, continuation)
        decoders = {tau: GraphedDecoder(model, OracleProposer(BeamProposer(drafter, W, L), continuation,
                                                              corruption_rate(tau, L), V, seed=B, device=device),
                                          W, L, M, graphs=graphs)
                    for tau in args.taus}
        plain_times = []
        spec = {tau: {"times": [], "steps": [], "tau": [], "lossless": True, "ties": 0, "first": None} for tau in args.taus}
        plain_steps = args.max_new_tokens
        for _ in range(args.warmup + args.repeats):  # interleaved: plain, then every tau, per repeat
            tokens, stats, seconds = decode_loop(plain, prompts, args.max_new_tokens)
            assert tokens == reference, "the static plain step must repeat itself"
            plain_times.append(seconds / stats.num_forwards)
            plain_steps = stats.num_forwards
            for tau, decoder in decoders.items():
                tokens, stats, seconds = decode_loop(decoder, prompts, args.max_new_tokens)
                s = spec[tau]
                s["times"].append(seconds), s["steps"].append(stats.num_forwards), s["tau"].append(stats.tokens_per_step)
                for p, a, b in zip(prompts, reference, tokens):
                    if a != b:
                        d = first_divergence(model, p, a, b)
                        s["lossless"] = False
                        s["ties"] += bool(d and d["near_tie"])
                        s["first"] = s["first"] or d
        plain_times, plain_step = plain_times[args.warmup:], statistics.median(plain_times[args.warmup:])
        verify = time_verify_forward(model, prompts, W, L, M, args.timing_steps, graphs)
        drafter_ms = 1e3 * time_proposer(next(iter(decoders.values())), B, args.max_new_tokens, args.timing_steps)
        sweep = {q: 1e3 * time_verify_forward(model, prompts, q, 1, M + q, args.timing_steps, graphs)
                 for q in args.packed_sweep}
        taus = []
        for tau, s in spec.items():
            times, steps = s["times"][args.warmup:], s["steps"][args.warmup:]
            step = statistics.median(t / n for t, n in zip(times, steps))
            measured_tau = statistics.median(s["tau"][args.warmup:])
            speedups = [(p * plain_steps) / t for p, t in zip(plain_times, times)]  # paired per repeat
            ideal = measured_tau * plain_step / verify
            speedup = statistics.median(speedups)
            taus.append({"target_tau": float(tau), "tau": measured_tau, "rate": corruption_rate(tau, L),
                         "step_ms": 1e3 * step, "speedup": speedup, "speedup_min": min(speedups),
                         "speedup_max": max(speedups), "ideal": ideal, "efficiency": speedup / ideal,
                         "step_over_verify": step / verify, "lossless": s["lossless"], "tie_divergences": s["ties"],
                         "first_divergence": s["first"]})
        steps_ms = [t["step_ms"] for t in taus]
        rows.append({"batch_size": B, "plain_step_ms": 1e3 * plain_step, "verify_ms": 1e3 * verify,
                     "oracle_rounds": rounds, "oracle_is_plain": [c[:args.max_new_tokens] for c in continuation] == reference,
                     "drafter_ms": drafter_ms,
                     "rest_over_verify": (statistics.median(t["step_ms"] for t in taus) - drafter_ms) / (1e3 * verify),
                     "step_ms": statistics.median(steps_ms), "step_over_verify": statistics.median(steps_ms) / (1e3 * verify),
                     "packed_tokens": W * L, "lossless": all(t["lossless"] for t in taus), "taus": taus,
                     "verify_ms_by_packed_tokens": sweep})
        print_row(rows[-1])
    import transformers

    return {"shape": args.shape, "device": describe(device), "dtype": args.dtype, "cuda_graphs": graphs,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "beam_width": W, "beam_length": L, "prompt_tokens": args.prompt_tokens, "max_cache_len": M,
            "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
            "drafter_exit_dim": drafter.arch.exit_dim, "drafter_parameters": sum(p.numel() for p in drafter.parameters()),
            "base_parameters": sum(p.numel() for p in model.parameters()), "rows": rows}


def use_graphs_for(device: torch.device, graphs: str) -> bool:
    return device.type == "cuda" if graphs == "auto" else graphs == "on"


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def print_row(row: dict) -> None:
    print(f"bs={row['batch_size']}: plain step {row['plain_step_ms']:.2f} ms, verify forward over {row['packed_tokens']} "
          f"packed tokens {row['verify_ms']:.2f} ms, whole step {row['step_ms']:.2f} ms: "
          f"whole step / verify forward {row['step_over_verify']:.2f}x; drafter alone {row['drafter_ms']:.2f} ms, "
          f"(whole step - drafter) / verify forward {row['rest_over_verify']:.2f}x; stand-in path: "
          + ("plain greedy's" if row["oracle_is_plain"] else f"the verifier's own (fixed point in {row['oracle_rounds']} rounds)"),
          flush=True)
    if row["verify_ms_by_packed_tokens"]:
        print("    verify forward by packed tokens: " + ", ".join(
            f"{q}: {ms:.2f} ms" for q, ms in row["verify_ms_by_packed_tokens"].items()), flush=True)
    for t in row["taus"]:
        print(f"    tau target {t['target_tau']:.0f} (measured {t['tau']:.2f}): speedup {t['speedup']:.2f}x "
              f"[{t['speedup_min']:.2f}, {t['speedup_max']:.2f}], ideal {t['ideal']:.2f}x, efficiency "
              f"{t['efficiency']:.2f}, lossless {t['lossless']}"
              + (f" ({t['tie_divergences']} rows diverged at numerical ties; first: {t['first_divergence']})"
                 if not t["lossless"] else ""), flush=True)


def _numbers(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.step_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--graphs", default="auto", choices=["auto", "on", "off"], help="auto: CUDA graphs on CUDA")
    ap.add_argument("--batch-sizes", type=_numbers(int), default=[1, 4, 8])
    ap.add_argument("--taus", type=_numbers(float), default=[3.0, 4.0, 5.0])
    ap.add_argument("--exit-dim", type=int, default=0, help="0 = the recipe's drafter width (exit_dim)")
    ap.add_argument("--beam-width", type=int, default=0, help="0 = the shape's recipe (eval.beam_width)")
    ap.add_argument("--beam-length", type=int, default=0, help="0 = the shape's recipe (eval.beam_length)")
    ap.add_argument("--packed-sweep", type=_numbers(int), default=[],
                    help="also time the verify forward alone over these packed sizes (e.g. 1,16,32,64)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed repeats first")
    ap.add_argument("--timing-steps", type=int, default=50, help="replays of the verify forward timed")
    ap.add_argument("--cache-multiple", type=int, default=64, help="round the KV cache length up to this")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    ap.add_argument("--out", type=Path, default=None, help="write the record as JSON here")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = bench(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
