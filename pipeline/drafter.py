"""The ReDrafter recurrent drafter (docs/design.md §1). Imports only torch.

    s_0 = 0
    s_t = SiLU(rnn_w(E[x_{t-1}]) + rnn_u(s_{t-1}))       x_0 = g0
    z_t = [h ; s_t]  -> input_proj (only when exit_dim != 2H) -> N residual SiLU blocks
    logits_t = lm_head_out(z_t)

Module names are chosen so that `state_dict()` keys ARE the reference export names:
`lm_head.{i}.linear.{weight,bias}`, `lm_head.{N}.weight`, `rnn_w.weight`, `rnn_u.{weight,bias}`,
`input_proj.{weight,bias}`. The base model's embedding table is a non-persistent buffer: used,
frozen, never saved.

Draft vocabulary (docs/design.md §7): with `draft_vocab_size` N > 0 the output
layer predicts only N tokens, the most frequent of the teacher's responses; `d2t[i]` is the base
token id of draft index i (a persistent buffer, saved beside the weights). The RNN still reads the
base model's full embedding table, since drafted tokens are base tokens. Losslessness does not
depend on it: the base model verifies every token, and a token outside the draft vocabulary is
simply never proposed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DrafterArch:
    """What defines a drafter's tensors (mirrors the export's config.json)."""

    vocab_size: int
    hidden_size: int
    exit_dim: int  # width of the residual blocks; 2 * hidden_size in the reference recipe
    num_draft_layers: int = 2
    rnn: bool = True
    horizon: int = 5  # trained beam length, INCLUDING g0 (reference `beam_length` convention)
    draft_vocab_size: int = 0  # 0 = the full base vocabulary; N > 0 = an N-token draft vocabulary (d2t)

    @property
    def out_size(self) -> int:
        """Rows of the output layer: the draft vocabulary, or the base vocabulary."""
        return self.draft_vocab_size or self.vocab_size

    def to_dict(self) -> dict:
        return asdict(self)


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        # Identity at init (as the reference does): the drafter starts as a linear read-out.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


def check_d2t(d2t: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """A draft -> base id map: n distinct base token ids."""
    d2t = torch.as_tensor(d2t).long().flatten()
    if d2t.numel() != n or int(d2t.min()) < 0 or int(d2t.max()) >= vocab_size or d2t.unique().numel() != n:
        raise ValueError(f"d2t must hold {n} distinct token ids in [0, {vocab_size}); got {d2t.numel()} ids")
    return d2t


class Drafter(nn.Module):
    HEAD = "redrafter"  # its head type (pipeline/heads.py)

    def __init__(self, arch: DrafterArch, embed_weight_VH: torch.Tensor, d2t: torch.Tensor | None = None):
        super().__init__()
        H, D, V = arch.hidden_size, arch.exit_dim, arch.vocab_size
        if tuple(embed_weight_VH.shape) != (V, H):
            raise ValueError(
                f"base embedding table has shape {tuple(embed_weight_VH.shape)}, drafter expects "
                f"(vocab_size={V}, hidden_size={H}): drafter and base model do not match"
            )
        self.arch = arch
        self.register_buffer("embed_VH", embed_weight_VH.detach().clone(), persistent=False)
        if arch.rnn:
            self.rnn_w = nn.Linear(H, H, bias=False)
            self.rnn_u = nn.Linear(H, H, bias=True)
        if D != 2 * H:
            self.input_proj = nn.Linear(2 * H, D)
        blocks: list[nn.Module] = [ResBlock(D) for _ in range(arch.num_draft_layers)]
        blocks.append(nn.Linear(D, arch.out_size, bias=False))
        self.lm_head = nn.Sequential(*blocks)
        if arch.draft_vocab_size:
            if not 0 < arch.draft_vocab_size <= V:
                raise ValueError(f"draft_vocab_size={arch.draft_vocab_size} must be in [1, vocab_size={V}]")
            if d2t is None:
                raise ValueError("a draft-vocabulary drafter needs its d2t id map")
            self.register_buffer("d2t", check_d2t(d2t, arch.draft_vocab_size, V))
        elif d2t is not None:
            raise ValueError("d2t given for a full-vocabulary drafter (draft_vocab_size=0)")

    def init_state(self, like_h: torch.Tensor, *batch_dims: int) -> torch.Tensor:
        """s_0 = 0, shaped (*batch_dims, H)."""
        return like_h.new_zeros(*batch_dims, self.arch.hidden_size)

    def next_state(self, state: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """s_t from s_{t-1} and x_{t-1} (any leading shape)."""
        emb = self.embed_VH[token_ids].to(state.dtype)
        if self.arch.rnn:
            return F.silu(self.rnn_w(emb) + self.rnn_u(state))
        return state + emb  # rnn: false -> running sum of embeddings

    def logits(self, h: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Logits over the drafter's output space (the draft vocabulary when it has one: map an index i
        to its base token with `d2t[i]`), from context h and state s (same leading shape)."""
        z = torch.cat([h.to(state.dtype), state], dim=-1)  # context first
        if hasattr(self, "input_proj"):
            z = self.input_proj(z)
        return self.lm_head(z)

    def vocab_logits(self, h: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Logits over the base vocabulary: tokens outside the draft vocabulary get -inf (probability 0),
        so the drafter's distribution q is a distribution over base tokens (sampling verification)."""
        logits = self.logits(h, state)
        if not self.arch.draft_vocab_size:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.arch.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.d2t, logits)

    def forward(self, h_NH: torch.Tensor, tokens_NK: torch.Tensor) -> torch.Tensor:
        """Teacher-forced drafting. tokens_NK[:, 0] is g0 and tokens_NK[:, i] the true token after it.

        Returns logits_NKV: row i is the drafter's prediction of the token that follows
        tokens_NK[:, i] (i.e. draft position i + 1)."""
        state = self.init_state(h_NH, h_NH.shape[0]).to(self.lm_head[-1].weight.dtype)
        out = []
        for i in range(tokens_NK.shape[1]):
            state = self.next_state(state, tokens_NK[:, i])
            out.append(self.logits(h_NH, state))
        return torch.stack(out, dim=1)


def build_drafter(arch: DrafterArch, embed_weight_VH: torch.Tensor, seed: int = 0,
                  d2t: torch.Tensor | None = None, base_head_VH: torch.Tensor | None = None) -> Drafter:
    """A new drafter. With `base_head_VH`, the base model's output embeddings, it starts as the base
    model's own read-out (init_from_base_head)."""
    torch.manual_seed(seed)
    drafter = Drafter(arch, embed_weight_VH, d2t)
    if base_head_VH is not None:
        init_from_base_head(drafter, base_head_VH)
    return drafter


def base_head_width_problem(exit_dim: int, hidden_size: int) -> str | None:
    """drafter.init=base_head copies the base model's output embeddings (hidden_size wide) into the drafter's
    output layer, which reads exit_dim features: the two must match. The one statement of that rule, for the
    pipeline's preflight (pipeline/main.py settings_problems) and for init_from_base_head."""
    if exit_dim == hidden_size:
        return None
    return (f"drafter.init=base_head starts the drafter's output layer from the base model's read-out, so "
            f"drafter.exit_dim must be its hidden size {hidden_size} (got {exit_dim}): set "
            f"drafter.exit_dim={hidden_size} or drafter.init=random")


@torch.no_grad()
def init_from_base_head(drafter: Drafter, base_head_VH: torch.Tensor) -> None:
    """`drafter.init=base_head` (docs/design.md §1): input_proj = [I 0] (z = h: the state's half starts at
    zero), the residual blocks already identity, and the output layer = the base model's output embedding
    rows of the drafter's vocabulary (d2t). At step 0 the drafter's logits are then the base model's own
    logits at h, restricted to its vocabulary: the distribution of the token after h, one position before
    the drafter's targets. Training moves from that read-out instead of from noise, in the base model's
    own feature space, as Medusa starts its heads. Needs exit_dim = hidden_size."""
    arch = drafter.arch
    H, V = arch.hidden_size, arch.vocab_size
    if problem := base_head_width_problem(arch.exit_dim, H):
        raise ValueError(problem)
    if tuple(base_head_VH.shape) != (V, H):
        raise ValueError(f"base output embeddings have shape {tuple(base_head_VH.shape)}, expected ({V}, {H})")
    rows = base_head_VH[drafter.d2t] if arch.draft_vocab_size else base_head_VH
    out = drafter.lm_head[-1]
    out.weight.copy_(rows.to(out.weight.dtype))
    proj = drafter.input_proj  # exists: exit_dim = H != 2H
    proj.weight.zero_()
    proj.weight[:, :H].copy_(torch.eye(H))
    proj.bias.zero_()


def make_arch(vocab_size: int, hidden_size: int, exit_dim: int = 0, num_draft_layers: int = 2,
              rnn: bool = True, horizon: int = 5, draft_vocab_size: int = 0) -> DrafterArch:
    """exit_dim 0 means the reference default, 2 * hidden_size; draft_vocab_size 0 the full vocabulary."""
    return DrafterArch(vocab_size, hidden_size, exit_dim or 2 * hidden_size, num_draft_layers, rnn, horizon,
                       min(draft_vocab_size, vocab_size))


def select_draft_vocab(token_counts: dict[int, int] | torch.Tensor, n: int, vocab_size: int) -> tuple[torch.Tensor, float]:
    """(d2t, coverage): the n most frequent tokens (ties: smaller id first), padded with the smallest
    unseen ids when fewer than n tokens occur; coverage = their share of all counted tokens."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    if isinstance(token_counts, dict):
        for t, c in token_counts.items():
            counts[int(t)] += c
    else:
        counts += token_counts.double()
    # a stable sort on -count keeps ids ascending among equal counts
    order = torch.sort(-counts, stable=True).indices[:n]
    total = float(counts.sum())
    coverage = float(counts[order].sum()) / total if total else 0.0
    return order.sort().values, coverage
