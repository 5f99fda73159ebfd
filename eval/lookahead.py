"""Lookahead decoding (Fu et al., "Break the Sequential Dependency of LLM Inference Using Lookahead
Decoding", LMSYS blog 2023 / ICML 2024): a training-free greedy baseline on the decoder's static cache.

    result = lookahead_generate(model, prompts, max_new_tokens=128, eos_token_id=tok.eos_token_id,
                                window=5, ngram=4, guess_set_size=5)

Each step is ONE base forward over two branches packed side by side (`pack_lookahead()`):

- verification branch: the n-grams the pool holds under the key g0 (the next token: committed, not yet
  in the cache), as beams [g0, t_1, .., t_{N-1}] packed by `eval.tree.pack_tree` (shared prefixes once),
  then the decoder's own `verify()` / `accept()` / `commit()`: the longest matching prefix + the base's
  bonus token are committed and their K/V copied to contiguous slots. Output == plain greedy.
- lookahead branch: a window of N - 1 levels x W columns of Jacobi-iteration guesses. Cell (l, j)
  sits at position ctx + l + j and level 0 column 0 IS g0 (the tree root, packed once). Cell (l, j)
  sees the committed context, level 0 columns 0..j and its own column's levels 1..l, i.e. the
  sequence g0, w[0,1], .., w[0,j], w[1,j], .., w[l,j] at consecutive positions (the paper's
  "diagonal" history); the last level's outputs are the next Jacobi iterates.

After the forward the n-grams (w[0,j], w[1,j], .., w[N-2,j], iterate[j]) go into the pool (key = first
token, at most G per key, least recently added dropped), and the window moves one position: levels
shift up, the iterates become the last level, g0 the new level-0 column 0. Like the reference
implementation (hao-ai-lab/LookaheadDecoding, ALWAYS_FWD_ONE) the window advances by one position
whatever was accepted: its cells are guesses, never committed without verification, so this only
affects speed. The first N - 2 steps fill the window with model outputs and harvest nothing.

Stats (`DecodeStats(beam_width=G, beam_length=N)`): one record per (step, active row);
tau = tokens_per_step = committed tokens per base forward (accepted n-gram tokens + the bonus token);
`verified` is every token the row put through the forward, both branches (the step's compute),
so verified_fraction_of_WL can exceed 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eval.decoder import (Acceptance, DecodeState, GenerationResult, Proposal, Proposer, _decode, check_prompts,
                          greedy_verifier, run_step)
from eval.metrics import DecodeStats
from eval.tree import Tree, pack_tree


class NgramPool:
    """n-grams keyed by their first token; at most `size` continuations per key, oldest dropped
    (the reference's LRU: re-adding a known n-gram makes it the newest)."""

    def __init__(self, size: int):
        self.size = size
        self.by_key: dict[int, list[tuple[int, ...]]] = {}

    def add(self, key: int, continuation: tuple[int, ...]) -> None:
        entries = self.by_key.setdefault(key, [])
        if continuation in entries:
            entries.remove(continuation)
        elif len(entries) == self.size:
            entries.pop(0)
        entries.append(continuation)

    def get(self, key: int) -> list[tuple[int, ...]]:
        return self.by_key.get(key, [])


@dataclass
class LookaheadState:
    window_BLW: torch.Tensor  # Jacobi guesses, L = N - 1 levels x W columns; [:, 0, 0] is g0
    pools: list[NgramPool]  # one per row
    histories: list[list[int]] | None  # prompt + committed tokens per row, kept when pool_from_prompt
    num_steps: int = 0


def window_slots(num_levels: int, window: int, offset: int) -> torch.Tensor:
    """slots_LW: packed index of each window cell. Cells are packed level-major from `offset` on,
    except (0, 0), which is g0 at packed index 0 (the verification tree's root)."""
    slots_LW = offset - 1 + torch.arange(num_levels * window).view(num_levels, window)
    slots_LW[0, 0] = 0
    return slots_LW


def window_mask(num_levels: int, window: int) -> torch.Tensor:
    """sees_CC[q, k] over cells c = l * W + j: cell q sees cell k iff k is level 0 at a column <= q's,
    or k is in q's column at a level 1..q's level. Each cell sees itself."""
    level_C = torch.arange(num_levels).repeat_interleave(window)
    col_C = torch.arange(window).repeat(num_levels)
    ql, qc, kl, kc = level_C[:, None], col_C[:, None], level_C[None, :], col_C[None, :]
    return ((kl == 0) & (kc <= qc)) | ((kl >= 1) & (kl <= ql) & (kc == qc))


def pack_lookahead(tree: Tree, window_BLW: torch.Tensor) -> Tree:
    """The verification tree (packed at [0, P_v), index 0 = g0) followed by the lookahead window's
    cells at [P_v, P_v + (N-1) W - 1). The branches never see each other; positions = ctx + depth with
    depth = level + column for a window cell. The unpacker still describes the verification beams."""
    B, L, W = window_BLW.shape
    device = window_BLW.device
    P_v = tree.size
    slots_C = window_slots(L, W, P_v).flatten().to(device)
    P = P_v + L * W - 1
    depth_C = (torch.arange(L)[:, None] + torch.arange(W)[None, :]).flatten().to(device)

    tokens_BP = tree.tokens_BP.new_zeros(B, P)
    tokens_BP[:, :P_v] = tree.tokens_BP
    tokens_BP[:, slots_C] = window_BLW.flatten(1)  # cell (0, 0) rewrites g0 with itself
    depth_BP = tree.depth_BP.new_zeros(B, P)
    depth_BP[:, :P_v] = tree.depth_BP
    depth_BP[:, slots_C] = depth_C
    mask_BPP = torch.zeros(B, P, P, dtype=torch.bool, device=device)
    mask_BPP[:, :P_v, :P_v] = tree.tree_mask_BPP
    mask_BPP[:, slots_C[:, None], slots_C[None, :]] |= window_mask(L, W).to(device)
    return Tree(tokens_BP, depth_BP, mask_BPP, tree.unpacker_BWL, tree.num_packed_B + L * W - 1)


class LookaheadDecoder:
    def __init__(self, model, window: int = 5, ngram: int = 4, guess_set_size: int = 5,
                 pool_from_prompt: bool = False, seed: int = 0):
        if window < 1 or ngram < 2 or guess_set_size < 1:
            raise ValueError(f"need window >= 1, ngram >= 2, guess_set_size >= 1; got {window}, {ngram}, "
                             f"{guess_set_size}")
        self.model = model
        self.window, self.ngram, self.guess_set_size = window, ngram, guess_set_size
        # Also seed the pool with the prompt's n-grams and add every committed n-gram (the reference's
        # POOL_FROM_PROMPT; off by default there and here: then only the Jacobi window feeds the pool).
        self.pool_from_prompt = pool_from_prompt
        self.seed = seed

    def init_state(self, prompts: list[list[int]]) -> LookaheadState:
        """Window cells are tokens drawn from the row's own prompt (the reference's initialization)."""
        gen = torch.Generator().manual_seed(self.seed)
        L, W, N = self.ngram - 1, self.window, self.ngram
        window_BLW = torch.stack([torch.tensor(p)[torch.randint(len(p), (L, W), generator=gen)] for p in prompts])
        pools = [NgramPool(self.guess_set_size) for _ in prompts]
        if self.pool_from_prompt:
            for pool, prompt in zip(pools, prompts):
                for i in range(len(prompt) - N + 1):
                    pool.add(prompt[i], tuple(prompt[i + 1:i + N]))
        histories = [list(p) for p in prompts] if self.pool_from_prompt else None
        return LookaheadState(window_BLW.to(self.model.device), pools, histories)

    def candidates(self, la: LookaheadState, g0_B: torch.Tensor, active_B: torch.Tensor) -> torch.Tensor:
        """beams_BGN = [g0, n-gram continuation] per pooled n-gram under key g0. Rows with fewer are
        padded with copies of their first beam (deduplicated by pack_tree) or, with none, with g0
        repeated (a legitimate guess: verification keeps any accepted token exact). No row has any:
        beams_B11 = g0 alone, a plain greedy step plus the lookahead branch."""
        g0 = g0_B.tolist()
        guesses = [la.pools[b].get(g0[b]) if active else [] for b, active in enumerate(active_B.tolist())]
        G = max(len(g) for g in guesses)
        if G == 0:
            return g0_B[:, None, None]
        rows = []
        for b, g in enumerate(guesses):
            beams = [[g0[b], *cont] for cont in g] or [[g0[b]] * self.ngram]
            rows.append(beams + beams[:1] * (G - len(beams)))
        return torch.tensor(rows, device=g0_B.device)

    def step(self, state: DecodeState, stats: DecodeStats, la: LookaheadState) -> None:
        run_step(self.model, LookaheadProposer(self, la), greedy_verifier, state, stats)

    def update(self, la: LookaheadState, iterates_BW: torch.Tensor, active_B: torch.Tensor, state: DecodeState,
               num_before_B: torch.Tensor) -> None:
        """Harvest the window's column n-grams into the pool, then shift the window by one position."""
        N = self.ngram
        window_BLW = la.window_BLW
        if la.num_steps >= N - 2:  # every level now holds model outputs, not the initial prompt tokens
            columns_BWN = torch.cat([window_BLW, iterates_BW[:, None]], dim=1).transpose(1, 2).tolist()
            for b in active_B.nonzero().flatten().tolist():
                for col in columns_BWN[b]:
                    la.pools[b].add(col[0], tuple(col[1:]))
        if la.histories is not None:  # n-grams of the committed text, ending at each new token
            before, after = num_before_B.tolist(), state.num_new_B.tolist()
            for b in active_B.nonzero().flatten().tolist():
                new = state.out_BN[b, before[b]:after[b]].tolist()
                history = la.histories[b]
                history += new
                for end in range(max(len(history) - len(new) + 1, N), len(history) + 1):
                    la.pools[b].add(history[end - N], tuple(history[end - N + 1:end]))
        la.window_BLW = torch.cat([window_BLW[:, 1:], iterates_BW[:, None]], dim=1)
        la.num_steps += 1

    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None) -> GenerationResult:
        check_prompts(prompts)
        la: list[LookaheadProposer] = []  # built at the first step, inside _decode's timed region

        def step(state: DecodeState, stats: DecodeStats) -> None:
            if not la:
                la.append(LookaheadProposer(self, self.init_state(prompts)))
            run_step(self.model, la[0], greedy_verifier, state, stats)

        # A step packs at most 1 + G (N-1) verification + (N-1) W - 1 window tokens; a row may overshoot
        # max_new_tokens by N - 1.
        step_slots = (self.guess_set_size + self.window) * (self.ngram - 1) + self.ngram
        return _decode(self.model, prompts, max_new_tokens, eos_token_id, step,
                       DecodeStats(self.guess_set_size, self.ngram), step_slots)


class LookaheadProposer(Proposer):
    """Lookahead as a proposer of the step skeleton (eval/decoder.py run_step): the pooled n-grams under
    g0 are the paths; the Jacobi window is packed beside their tree; after the commit the window's
    outputs feed the pool and the window moves."""

    def __init__(self, decoder: LookaheadDecoder, la: LookaheadState):
        self.decoder, self.la = decoder, la

    def propose(self, state: DecodeState) -> Proposal:
        self.la.window_BLW[:, 0, 0] = state.g0_B
        self.num_before_B = state.num_new_B
        return Proposal(self.decoder.candidates(self.la, state.g0_B, ~state.done_B))

    def pack(self, proposal: Proposal, dedup: bool, size: int | None = None) -> Tree:
        if size is not None:
            raise ValueError("lookahead has no static step (eval/graphs.py): its pool grows as it decodes")
        self.verification = pack_tree(proposal.paths_BWL, dedup=dedup)
        return pack_lookahead(self.verification, self.la.window_BLW)

    def observe(self, state: DecodeState, acc: Acceptance, logits_BPV: torch.Tensor, tree: Tree,
                active_B: torch.Tensor, stats: DecodeStats) -> None:
        d = self.decoder
        last_level_W = window_slots(d.ngram - 1, d.window, self.verification.size)[-1].to(logits_BPV.device)
        iterates_BW = logits_BPV[:, last_level_W].argmax(-1)  # next Jacobi iterates, positions ctx + N - 1 + j
        d.update(self.la, iterates_BW, active_B, state, self.num_before_B)


def lookahead_generate(model, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None,
                       window: int = 5, ngram: int = 4, guess_set_size: int = 5,
                       pool_from_prompt: bool = False) -> GenerationResult:
    """Batched greedy Lookahead decoding; output identical to plain greedy decoding."""
    decoder = LookaheadDecoder(model, window, ngram, guess_set_size, pool_from_prompt)
    return decoder.generate(prompts, max_new_tokens, eos_token_id)
