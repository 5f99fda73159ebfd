"""The decoding machinery every method shares (docs/design.md §3): the static KV cache, the verify
forward over a packed tree, greedy verification, the commit, and `run_step`, the one step skeleton:
a Proposer's candidate paths -> `pack_tree()` -> ONE base forward -> a verifier -> `commit()`.
Plain greedy decoding is that step with g0 alone; ReDrafter (eval/speculative.py), its sampling
mode (eval/sampling.py), hybrid drafting (eval/ngram.py) and lookahead (eval/lookahead.py) plug
their proposers and verifiers into it.

    result = plain_greedy(model, prompts, max_new_tokens=128, eos_token_id=tok.eos_token_id)

KV cache layout (transformers' `StaticCache`, preallocated and indexed by slot): row b's committed
tokens occupy slots [0, ctx_b). A step writes the packed tree of every row at the shared slots
[S, S + P), S = max_b ctx_b; the float mask lets row b see slots < ctx_b plus its own tree
ancestors (slots in [ctx_b, S) hold stale entries and stay masked). After acceptance the accepted
path's K/V are copied from their packed slots to [ctx_b, ctx_b + n + 1) and ctx_b advances: a
rejected draft costs nothing but a pointer that does not move.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from eval.metrics import DecodeStats
from eval.tree import Tree, pack_tree
from pipeline.support import attention_windows, output_logits


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt, cut after the first EOS and at max_new_tokens
    stats: DecodeStats
    seconds: float
    decode_seconds: float = float("nan")  # the decode loop alone, after the prefill


@dataclass
class DecodeState:
    cache: StaticCache
    ctx_B: torch.Tensor  # committed length per row == number of cache slots holding committed tokens
    g0_B: torch.Tensor  # the base model's next token after the committed ones (not yet in the cache)
    h_BD: torch.Tensor  # base hidden state (post final norm) at the last committed position
    out_BN: torch.Tensor  # committed new tokens: row b's are out_BN[b, :num_new_B[b]] (not yet truncated)
    num_new_B: torch.Tensor
    done_B: torch.Tensor  # rows past EOS / max_new_tokens keep riding in the batch, frozen
    max_new_tokens: int
    eos_token_id: int | None
    prompt_BT: torch.Tensor  # the prompts, right-padded (read by prompt-lookup candidates: eval/ngram.py)
    prompt_len_B: torch.Tensor
    # A static step (eval/graphs.py): the tree padded to W * L slots and written at max_b ctx_b as a
    # tensor, the K/V commit unconditional: no shape and no control flow depends on a value, so no step
    # reads anything back to the host and the whole step can be captured as one CUDA graph.
    static: bool = False

    @property
    def new_tokens(self) -> list[list[int]]:
        """Committed new tokens per row as lists (read once at the end, never inside the step loop)."""
        return [row[:n] for row, n in zip(self.out_BN.tolist(), self.num_new_B.tolist())]


@dataclass
class Acceptance:
    beam_B: torch.Tensor  # chosen beam: longest accepted prefix, first on ties
    num_accepted_B: torch.Tensor  # accepted drafts n (tokens committed this step = n + 1)
    tokens_BL: torch.Tensor  # chosen beam's tokens; the first n + 1 are committed
    path_BL: torch.Tensor  # packed indices of the chosen beam's tokens
    next_g0_B: torch.Tensor  # base prediction after the last accepted token ("bonus" token)
    next_h_BD: torch.Tensor  # base hidden state at the last accepted token


# ---- cache and base forward ----------------------------------------------------------------

def seek(cache: StaticCache, slot) -> None:
    """Make the next forward write its K/V at slots [slot, slot + q).

    transformers 5.23's StaticLayer ignores `cache_position` and writes at its own running counter
    `cumulative_length`; setting that counter is the only way to choose the slot. `slot` may be a 0-d
    tensor on the cache's device (a static step: no host read)."""
    for layer in cache.layers:
        if isinstance(slot, torch.Tensor):
            layer.cumulative_length.copy_(slot)
        else:
            layer.cumulative_length.fill_(slot)


def attention_bias(ctx_B: torch.Tensor, tree_mask_BQQ: torch.Tensor, write_at, max_cache_len: int,
                   dtype: torch.dtype, position_ids_BQ: torch.Tensor | None = None,
                   window: int | None = None) -> torch.Tensor:
    """(B, 1, Q, max_cache_len) ADDITIVE float mask: 0 where allowed, dtype-min elsewhere.

    Row b's queries see its committed slots < ctx_b and, inside [write_at, write_at + Q), their
    tree ancestors. A boolean 4D mask is silently wrong under eager attention (docs/design.md §6).
    With a sliding `window`, a query at position p also needs the key's position k > p - window
    (transformers' sliding-window rule): committed slot m holds position m, packed slot write_at + j
    holds position_ids_BQ[:, j]. `write_at` is an int, or a 0-d tensor in a static step (eval/graphs.py):
    every shape here depends on Q and max_cache_len alone, and nothing is read back to the host."""
    B, Q, _ = tree_mask_BQQ.shape
    if isinstance(write_at, int):
        assert int(ctx_B.max()) <= write_at and write_at + Q <= max_cache_len
    slot_M = torch.arange(max_cache_len, device=ctx_B.device)
    rel_M = slot_M - write_at  # the packed index a slot holds, where it is inside the tree
    in_tree_M = (rel_M >= 0) & (rel_M < Q)
    rel_M = rel_M.clamp(0, Q - 1)
    tree_BQM = tree_mask_BQQ.gather(2, rel_M.expand(B, Q, max_cache_len)) & in_tree_M
    allowed_BQM = (slot_M < ctx_B[:, None])[:, None, :] | tree_BQM  # committed slots are < write_at
    if window is not None:
        key_pos_BM = torch.where(in_tree_M, position_ids_BQ.gather(1, rel_M.expand(B, max_cache_len)), slot_M)
        allowed_BQM &= key_pos_BM[:, None, :] > position_ids_BQ[:, :, None] - window
    bias = torch.zeros(B, 1, Q, max_cache_len, dtype=dtype, device=ctx_B.device)
    return bias.masked_fill_(~allowed_BQM[:, None], torch.finfo(dtype).min)


def layer_windows(model) -> tuple[int | None, ...]:
    """Per decoder layer: None (full attention) or its sliding window (pipeline/support.py); read once
    per model."""
    windows = model.__dict__.get("_draftforge_windows")
    if windows is None:
        windows = model.__dict__["_draftforge_windows"] = attention_windows(model.config)
    return windows


def attention_masks(model, ctx_B: torch.Tensor, tree_mask_BQQ: torch.Tensor, position_ids_BQ: torch.Tensor,
                    write_at, max_cache_len: int):
    """What the base forward takes as `attention_mask`: one additive mask when every layer attends the
    same way, else {layer type: mask} (transformers' hybrid models accept that mapping as is)."""
    kinds = sorted(set(layer_windows(model)), key=lambda w: w is not None)  # None (full) first
    masks = {w: attention_bias(ctx_B, tree_mask_BQQ, write_at, max_cache_len, model.dtype, position_ids_BQ, w)
             for w in kinds}
    if len(masks) == 1:
        return next(iter(masks.values()))
    return {"sliding_attention" if w is not None else "full_attention": m for w, m in masks.items()}


def base_forward(model, cache: StaticCache, tokens_BQ: torch.Tensor, position_ids_BQ: torch.Tensor,
                 bias_B1QM, write_at) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_BQD post-norm, logits_BQV) through the public API, K/V written at [write_at, +Q);
    `write_at` an int or a 0-d tensor (a static step)."""
    seek(cache, write_at)
    Q = tokens_BQ.shape[1]
    out = model.model(
        input_ids=tokens_BQ, attention_mask=bias_B1QM, position_ids=position_ids_BQ, past_key_values=cache,
        use_cache=True,
        # Ignored by 5.23 (see seek()); passed so versions that honour it write the same slots.
        cache_position=torch.arange(Q, device=tokens_BQ.device) + write_at,
    )
    hidden_BQD = out.last_hidden_state
    return hidden_BQD, output_logits(model, hidden_BQD)


def compile_base(model, mode: str):
    """torch.compile the base model's transformer body in place (`model.model.forward`), so that every
    decoding method given this model (plain, speculative, the baselines through `model.generate`)
    runs the same compiled code. `mode` is torch.compile's: "default", "reduce-overhead" (CUDA graphs
    on CUDA), "max-autotune"; "none" leaves the model eager. Shapes are dynamic: the packed tree size
    and the cache length change between steps and prompts; recompiles are bounded by dynamo's limit,
    past which a new shape runs eagerly (same outputs)."""
    if mode == "none":
        return model
    if getattr(model.model.forward, "_draftforge_compiled", None):
        raise ValueError("the base model is already compiled")
    eager = model.model.forward
    compiled = torch.compile(eager, mode=None if mode == "default" else mode, dynamic=True)
    compiled._draftforge_compiled = mode
    compiled._draftforge_eager = eager
    model.model.forward = compiled
    return model


@contextlib.contextmanager
def without_cuda_graphs(model):
    """Inside, a base model compiled with CUDA graphs ("reduce-overhead") runs its eager forward:
    for callers that keep a forward's outputs across forwards (transformers' `generate` keeps K/V
    outputs in its DynamicCache), which the next graph replay would overwrite. Otherwise a no-op."""
    forward = model.model.forward
    if getattr(forward, "_draftforge_compiled", None) != "reduce-overhead":
        yield False
        return
    model.model.forward = forward._draftforge_eager
    try:
        yield True
    finally:
        model.model.forward = forward


def new_cache(model, batch_size: int, max_cache_len: int) -> StaticCache:
    """A StaticCache with its K/V buffers allocated now, outside any compiled region. Left lazy, the
    first (prefill) forward would allocate them inside torch.compile's graph, unmarked as static
    addresses: CUDA graphs are then skipped, and on CUDA inductor fails to lower the slot index.

    Every layer gets a full-length StaticLayer, sliding ones too: slot == position for committed
    tokens, which the masks (`attention_masks`) and `commit_kv` rely on. transformers would give a
    sliding layer a window-long ring buffer; its window is applied by the mask instead."""
    cfg = model.config.get_text_config(decoder=True)
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    cache.layers = [StaticLayer(max_cache_len=max_cache_len) for _ in cache.layers]
    heads = cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache.early_initialization(batch_size, heads, head_dim, model.dtype, model.device)
    return cache


def stack_kv(cache: StaticCache) -> bool:
    """Move every layer's K and V buffers into one (2 x layers, B, H, S, D) tensor, `cache.kv_stack`,
    each layer's buffers becoming views of it (transformers writes them in place, so the views stay
    valid); `commit_kv` then moves the accepted slots of all layers with one gather and one scatter
    instead of 2 x layers of each (on a GPU, 2 kernels instead of 4 x layers). Returns False, changing
    nothing, when the layers' buffers differ in shape. Not for torch.compile's path, whose static
    addresses are the per-layer tensors (eval/graphs.py uses it)."""
    bufs = [b for layer in cache.layers for b in (layer.keys, layer.values)]
    if len({(b.shape, b.dtype, b.device) for b in bufs}) != 1:
        return False
    stack = torch.stack(bufs)
    for i, layer in enumerate(cache.layers):
        layer.keys, layer.values = stack[2 * i], stack[2 * i + 1]
    cache.kv_stack = stack
    return True


def commit_kv(cache: StaticCache, src_BL: torch.Tensor, dst_BL: torch.Tensor, static: bool = False) -> None:
    """Copy K/V of slots src to slots dst per row (gather everything first, then scatter, so
    overlapping source and destination ranges are safe). `static`: always copy (no host read)."""
    if not static and torch.equal(src_BL, dst_BL):  # batch 1 accepting along beam 0: already in place
        return
    stack = getattr(cache, "kv_stack", None)
    if stack is not None:  # stack_kv: all layers at once
        N, _, H, _, D = stack.shape
        moved = stack.gather(3, src_BL[None, :, None, :, None].expand(N, -1, H, -1, D))
        stack.scatter_(3, dst_BL[None, :, None, :, None].expand(N, -1, H, -1, D), moved)
        return
    for layer in cache.layers:
        for buf_BHMD in (layer.keys, layer.values):
            H, D = buf_BHMD.shape[1], buf_BHMD.shape[3]
            src = src_BL[:, None, :, None].expand(-1, H, -1, D)
            moved = buf_BHMD.gather(2, src)
            buf_BHMD.scatter_(2, dst_BL[:, None, :, None].expand(-1, H, -1, D), moved)


def argmax_token(logits_BV: torch.Tensor) -> torch.Tensor:
    """The greedy `pick_next`: (B, V) logits -> (B,) next tokens."""
    return logits_BV.argmax(-1)


def check_prompts(prompts: list[list[int]]) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")


def prefill(model, prompts: list[list[int]], max_cache_len: int, max_new_tokens: int,
            eos_token_id: int | None, pick_next: Callable = argmax_token,
            cache: StaticCache | None = None) -> DecodeState:
    """Ragged prompts at slots [0, len_b), right-padded; padding is masked out. The first g0 is
    `pick_next(logits at each prompt's last token)`. `cache`: reuse this one (same batch size and
    length; eval/graphs.py keeps its K/V buffers at fixed addresses) instead of allocating one."""
    check_prompts(prompts)
    device = model.device
    B, T = len(prompts), max(len(p) for p in prompts)
    tokens_BT = torch.zeros(B, T, dtype=torch.long, device=device)
    for b, prompt in enumerate(prompts):
        tokens_BT[b, :len(prompt)] = torch.tensor(prompt, device=device)
    len_B = torch.tensor([len(p) for p in prompts], device=device)
    pos_T = torch.arange(T, device=device)
    causal_BTT = (pos_T[None, :, None] >= pos_T[None, None, :]) & (pos_T[None, None, :] < len_B[:, None, None])
    causal_BTT |= torch.eye(T, dtype=torch.bool, device=device)  # pad queries see themselves only
    if cache is None:
        cache = new_cache(model, B, max_cache_len)
    masks = attention_masks(model, torch.zeros_like(len_B), causal_BTT, pos_T.expand(B, T), 0, max_cache_len)
    hidden_BTD, logits_BTV = base_forward(model, cache, tokens_BT, pos_T.expand(B, T), masks, 0)
    last_B = len_B - 1
    rows = torch.arange(B, device=device)
    out_BN = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    return DecodeState(cache, len_B, pick_next(logits_BTV[rows, last_B]), hidden_BTD[rows, last_B],
                       out_BN, torch.zeros(B, dtype=torch.long, device=device),
                       torch.full((B,), max_new_tokens == 0, device=device), max_new_tokens, eos_token_id,
                       tokens_BT, len_B.clone())  # its own tensor: a static step rewrites ctx_B in place


def tree_inputs(model, state: DecodeState, tree: Tree):
    """(position_ids_BP, attention masks, write_at) of the forward over `tree`: positions = context
    length + depth; the tree is written at the shared slots from write_at = max_b ctx_b (a 0-d tensor
    in a static step)."""
    write_at = state.ctx_B.max() if state.static else int(state.ctx_B.max())
    position_ids_BP = state.ctx_B[:, None] + tree.depth_BP
    masks = attention_masks(model, state.ctx_B, tree.tree_mask_BPP, position_ids_BP, write_at,
                            state.cache.get_max_length())
    return position_ids_BP, masks, write_at


def forward_tree(model, state: DecodeState, tree: Tree) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ONE base forward over every row's packed tree; returns (hidden_BPD, logits_BPV, write_at)."""
    position_ids_BP, masks, write_at = tree_inputs(model, state, tree)
    hidden_BPD, logits_BPV = base_forward(model, state.cache, tree.tokens_BP, position_ids_BP, masks, write_at)
    return hidden_BPD, logits_BPV, write_at


# ---- greedy verification ------------------------------------------------------------------

def verify(logits_BPV: torch.Tensor, beams_BWL: torch.Tensor, unpacker_BWL: torch.Tensor):
    """(accept_len_BW, pred_BWL): pred[..., k] = base argmax after beam tokens 0..k; draft k + 1 is
    accepted iff it equals pred[..., k] and every earlier draft was accepted."""
    B, W, L = beams_BWL.shape
    pred_BWL = logits_BPV.argmax(-1).gather(1, unpacker_BWL.flatten(1)).view(B, W, L)
    match_BWK = beams_BWL[..., 1:] == pred_BWL[..., :-1]
    accept_len_BW = match_BWK.long().cumprod(dim=-1).sum(dim=-1)
    return accept_len_BW, pred_BWL


def accept(accept_len_BW: torch.Tensor, pred_BWL: torch.Tensor, beams_BWL: torch.Tensor,
           unpacker_BWL: torch.Tensor, hidden_BPD: torch.Tensor) -> Acceptance:
    """Pick the beam with the longest accepted prefix; the base's prediction after its last accepted
    token is the next g0 (so every step commits at least one token) and the hidden there the next h."""
    rows_B = torch.arange(beams_BWL.shape[0], device=beams_BWL.device)
    beam_B = accept_len_BW.argmax(dim=-1)  # argmax returns the first maximum: lowest beam on ties
    n_B = accept_len_BW[rows_B, beam_B]
    path_BL = unpacker_BWL[rows_B, beam_B]
    return Acceptance(beam_B, n_B, beams_BWL[rows_B, beam_B], path_BL, pred_BWL[rows_B, beam_B, n_B],
                      hidden_BPD[rows_B, path_BL[rows_B, n_B]])


def commit(state: DecodeState, acc: Acceptance, write_at: int) -> torch.Tensor:
    """Append g0 + accepted drafts to the active rows and advance them; returns the active mask.
    Vectorized over rows: no Python loop, and no host sync."""
    active_B = ~state.done_B
    L = acc.path_BL.shape[1]
    offsets_L = torch.arange(L, device=state.ctx_B.device)
    # All L columns are moved: those past n land at slots >= the new ctx_b, masked until rewritten.
    commit_kv(state.cache, write_at + acc.path_BL, state.ctx_B[:, None] + offsets_L, static=state.static)
    num_commit_B = torch.where(active_B, acc.num_accepted_B + 1, 0)
    state.ctx_B = state.ctx_B + num_commit_B
    state.g0_B = torch.where(active_B, acc.next_g0_B, state.g0_B)
    state.h_BD = torch.where(active_B[:, None], acc.next_h_BD.to(state.h_BD.dtype), state.h_BD)
    # Tokens: all L columns are written past each active row's count (columns past n are overwritten
    # by the next step or lie past the count); finished rows rewrite what they hold. A row stops once
    # it holds >= max_new_tokens, so it holds < max_new_tokens + L: a width of max_new_tokens + 2L fits.
    if state.out_BN.shape[1] < state.max_new_tokens + 2 * L:  # shapes only (no sync): the first step, or a longer path
        state.out_BN = torch.nn.functional.pad(state.out_BN, (0, state.max_new_tokens + 2 * L - state.out_BN.shape[1]))
    index_BL = state.num_new_B[:, None] + offsets_L
    kept_BL = torch.where(active_B[:, None], acc.tokens_BL, state.out_BN.gather(1, index_BL))
    state.out_BN.scatter_(1, index_BL, kept_BL)
    committed_BL = offsets_L < num_commit_B[:, None]
    hit_eos_B = ((acc.tokens_BL == state.eos_token_id) & committed_BL).any(dim=1) if state.eos_token_id is not None \
        else torch.zeros_like(active_B)
    state.num_new_B = state.num_new_B + num_commit_B
    state.done_B = state.done_B | hit_eos_B | (state.num_new_B >= state.max_new_tokens)
    return active_B


def truncate(tokens: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    tokens = tokens[:max_new_tokens]
    if eos_token_id is not None and eos_token_id in tokens:
        tokens = tokens[:tokens.index(eos_token_id) + 1]
    return tokens


TIE_ULPS = 4  # a divergence within this many ulps (of the model's dtype, at the logits' scale) is a tie


@torch.no_grad()
def first_divergence(model, prompt: list[int], reference: list[int], other: list[int]) -> dict | None:
    """Where two greedy continuations of `prompt` first differ, and whether the base model's choice
    there was a numerical tie. None when they are equal.

    Batched verification (Q tokens in one forward, other kernels or tilings) rounds differently
    from one-token decoding; in bf16 that can flip the argmax where two logits are within rounding.
    One forward over prompt + the shared prefix gives the two tokens' logits: `near_tie` when they
    differ by at most TIE_ULPS ulps of the model's dtype at the larger logit's magnitude. A real
    decoder bug (a wrong token accepted) shows as a gap far beyond that, or as a length mismatch."""
    if reference == other:
        return None
    k = next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b), min(len(reference), len(other)))
    info = {"position": k, "reference_token": reference[k] if k < len(reference) else None,
            "other_token": other[k] if k < len(other) else None, "logit_gap": None, "tolerance": None,
            "near_tie": False}
    if info["reference_token"] is None or info["other_token"] is None:
        return info  # one stopped (EOS / length) where the other went on: not a rounding question
    with without_cuda_graphs(model):
        ids = torch.tensor([prompt + reference[:k]], device=model.device)
        logits_V = model(input_ids=ids, use_cache=False).logits[0, -1].float()
    a, b = float(logits_V[reference[k]]), float(logits_V[other[k]])
    tolerance = TIE_ULPS * torch.finfo(model.dtype).eps * max(abs(a), abs(b), 1.0)
    return info | {"logit_gap": a - b, "tolerance": tolerance, "near_tie": abs(a - b) <= tolerance}


def only_numerical_ties(divergences: dict) -> bool:
    """True when there are divergences ({prompt id: first_divergence(...)}) and every one is a tie."""
    return bool(divergences) and all(d["near_tie"] for d in divergences.values())


# ---- decoding loops -------------------------------------------------------------------------

@torch.no_grad()
def _decode(model, prompts, max_new_tokens: int, eos_token_id: int | None, step, stats: DecodeStats,
            step_slots: int, pick_next: Callable = argmax_token) -> GenerationResult:
    """Prefill, then `step(state, stats)` until every row is done. `step_slots` bounds the cache
    slots one step may use beyond max_b ctx_b (its packed size + the tokens it may overshoot)."""
    check_prompts(prompts)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    start = time.perf_counter()
    max_cache_len = max(len(p) for p in prompts) + max_new_tokens + step_slots
    state = prefill(model, prompts, max_cache_len, max_new_tokens, eos_token_id, pick_next)
    done = bool(state.done_B.all())  # reading it waits for the prefill
    loop_start = time.perf_counter()
    while not done:
        step(state, stats)
        stats.num_forwards += 1
        done = bool(state.done_B.all())
    loop_seconds = time.perf_counter() - loop_start
    stats.decode_seconds += loop_seconds
    tokens = [truncate(t, max_new_tokens, eos_token_id) for t in state.new_tokens]
    return GenerationResult(tokens, stats, time.perf_counter() - start, loop_seconds)


def plain_step(model, state: DecodeState, stats: DecodeStats, pick_next: Callable = argmax_token,
               clock=None) -> None:
    """One token per row per forward: g0 goes in, the next g0 (`pick_next` of its logits) comes out."""
    run_step(model, PlainProposer(), NextToken(pick_next), state, stats, clock=clock or NO_CLOCK)


def plain_greedy(model, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None) -> GenerationResult:
    """Batched plain greedy decoding (the speedup baseline): one token per row per forward."""
    stats = DecodeStats(1, 1)
    clock = forward_timer(model, stats)
    return _decode(model, prompts, max_new_tokens, eos_token_id,
                   lambda state, stats: plain_step(model, state, stats, clock=clock), stats, step_slots=2)


# ---- the one step skeleton (docs/design.md §3.1) ---------------------------------------------

@dataclass
class Proposal:
    paths_BWL: torch.Tensor  # candidate paths, [..., 0] == g0; L counts g0 (reference convention)
    q_BWKV: torch.Tensor | None = None  # what drew draft k of each path (sampling verifiers); None if unused
    # sampling: paths that are trials of the rejection sampling (False: a placeholder copy, never a trial)
    candidate_BW: torch.Tensor | None = None


class Proposer(abc.ABC):
    """Makes a step's candidate paths: drafter beams (eval/beam.py), sampled drafter chains
    (eval/sampling.py), a prompt-lookup path beside either (eval/ngram.py), lookahead's pooled n-grams
    with its Jacobi window (eval/lookahead.py), or g0 alone (plain decoding)."""

    @abc.abstractmethod
    def propose(self, state: DecodeState) -> Proposal:
        """The step's candidate paths from the row states (every proposer defines it)."""

    def pack(self, proposal: Proposal, dedup: bool, size: int | None = None) -> Tree:
        """The tree the forward runs over (shared prefixes once); lookahead adds its window here.
        `size`: a static step's fixed packed length (eval/graphs.py), None = as many as the rows need."""
        return pack_tree(proposal.paths_BWL, dedup=dedup, size=size)

    def observe(self, state: DecodeState, acc: Acceptance, logits_BPV: torch.Tensor, tree: Tree,
                active_B: torch.Tensor, stats: DecodeStats) -> None:
        """After the commit: what the proposer learns from the forward (lookahead's pool, lookup wins)."""


class PlainProposer(Proposer):
    def propose(self, state: DecodeState) -> Proposal:
        return Proposal(state.g0_B[:, None, None])

    def pack(self, proposal: Proposal, dedup: bool, size: int | None = None) -> Tree:  # one token, built directly
        g0_B1 = proposal.paths_BWL[:, 0]
        zeros_B1 = torch.zeros_like(g0_B1)
        B = g0_B1.shape[0]
        return Tree(g0_B1, zeros_B1, torch.ones(B, 1, 1, dtype=torch.bool, device=g0_B1.device), zeros_B1[:, :, None],
                    torch.ones(B, dtype=torch.long, device=g0_B1.device))


def greedy_verifier(proposal: Proposal, tree: Tree, logits_BPV: torch.Tensor, hidden_BPD: torch.Tensor) -> Acceptance:
    """Greedy verification: the longest prefix equal to the base model's argmax chain (lossless)."""
    accept_len_BW, pred_BWL = verify(logits_BPV, proposal.paths_BWL, tree.unpacker_BWL)
    return accept(accept_len_BW, pred_BWL, proposal.paths_BWL, tree.unpacker_BWL, hidden_BPD)


class NextToken:
    """The plain 'verifier': nothing to verify, the next g0 is `pick_next` of the logits after g0."""

    def __init__(self, pick_next: Callable = argmax_token):
        self.pick_next = pick_next

    def __call__(self, proposal: Proposal, tree: Tree, logits_BPV: torch.Tensor, hidden_BPD: torch.Tensor) -> Acceptance:
        zeros_B = torch.zeros_like(proposal.paths_BWL[:, 0, 0])
        return Acceptance(zeros_B, zeros_B, proposal.paths_BWL[:, 0], zeros_B[:, None], self.pick_next(logits_BPV[:, 0]),
                          hidden_BPD[:, 0])


class _NoClock:
    def lap(self, phase: str) -> None:
        pass


NO_CLOCK = _NoClock()


class ForwardTimer:
    """A step clock that adds the base forward's host time to `stats.forward_seconds`, so the timed run
    itself prices the verify forward for the ideal speedup (docs/design.md §5): two clock reads a step,
    nothing else. CPU only: on CUDA the forward's time needs a sync, which would slow the step it times."""

    def __init__(self, stats: DecodeStats):
        self.stats, self.t = stats, 0.0

    def lap(self, phase: str) -> None:
        if phase == "packing":  # the forward starts now
            self.t = time.perf_counter()
        elif phase == "base_forward":
            self.stats.forward_seconds += time.perf_counter() - self.t


def forward_timer(model, stats: DecodeStats):
    """A `ForwardTimer` on `stats` where the model runs on the CPU, else no clock (see ForwardTimer)."""
    return ForwardTimer(stats) if model.device.type == "cpu" else NO_CLOCK


STEP_PHASES = ("drafter", "packing", "base_forward", "acceptance", "cache_bookkeeping")


@dataclass
class StepOutcome:
    proposal: Proposal
    tree: Tree
    acc: Acceptance
    logits_BPV: torch.Tensor
    active_B: torch.Tensor  # the rows this step committed to (not done before it)


def core_step(model, proposer: Proposer, verifier: Callable, state: DecodeState, dedup: bool = True,
              clock=NO_CLOCK) -> StepOutcome:
    """propose -> pack -> ONE base forward -> verify -> commit, on the device alone: nothing here is
    read back to the host when `state.static` (the tree then has W * L slots), so eval/graphs.py can
    capture it whole as one CUDA graph. `clock.lap(phase)` after each phase (STEP_PHASES)."""
    proposal = proposer.propose(state)
    clock.lap("drafter")
    tree = proposer.pack(proposal, dedup, size=proposal.paths_BWL[0].numel() if state.static else None)
    position_ids_BP, masks, write_at = tree_inputs(model, state, tree)
    clock.lap("packing")
    hidden_BPD, logits_BPV = base_forward(model, state.cache, tree.tokens_BP, position_ids_BP, masks, write_at)
    clock.lap("base_forward")
    acc = verifier(proposal, tree, logits_BPV, hidden_BPD)
    clock.lap("acceptance")
    active_B = commit(state, acc, write_at)
    return StepOutcome(proposal, tree, acc, logits_BPV, active_B)


def run_step(model, proposer: Proposer, verifier: Callable, state: DecodeState, stats: DecodeStats,
             dedup: bool = True, clock=NO_CLOCK) -> None:
    """THE decoding step, for every method of the repo: `core_step`, then the step's statistics and
    what the proposer learns. `clock.lap(phase)` lets eval/profile.py time this very step."""
    out = core_step(model, proposer, verifier, state, dedup, clock)
    stats.record(out.acc.num_accepted_B[out.active_B].tolist(), out.tree.num_packed_B[out.active_B].tolist())
    clock.lap("cache_bookkeeping")
    proposer.observe(state, out.acc, out.logits_BPV, out.tree, out.active_B, stats)
    clock.lap("drafter")
