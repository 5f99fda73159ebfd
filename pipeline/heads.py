"""Draft head types: everything the pipeline asks of a kind of draft head, in one place (docs/design.md §1.2).

    head = head_type(drafter_cfg.head)              # "redrafter"
    arch = head.make_arch(vocab_size, hidden_size, drafter_cfg)
    module = head.build(arch, embed_VH, seed, d2t)   # train stage
    loss, stats = head.loss(engine, batch, weights, maps)
    head.export(state, arch, out_dir)                # gate: the serving format
    module = head.from_state(arch, state, embed_VH, dtype)     # eval: the trained weights
    module = head.load_export(export_dir, embed_VH, dtype)     # a serving team's check
    proposer = head.proposer(module, W, L, top_logits=..., keep_log_probs=...)   # decoding, greedy/reference
    proposer = head.chain_proposer(module, W, L, temperature, generator)         # decoding, lossless sampling

The stages and the decoder only call these. ReDrafter's recurrent head is the one type; a Medusa or EAGLE
head would be one more `HeadType` in one more module (its module, loss, export format and proposal), not
edits across the tree: the teacher data, the train loop (DeepSpeed, Ray Train, checkpoints), the one
decoding step (packing, verification, commit), the eval, the gate and the lineage stay as they are. A
trained drafter records its type in arch.json ("head"; absent = redrafter, as drafters trained before
the seam).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

HEAD_KEY = "head"  # in arch.json beside the arch's own fields


@dataclass(frozen=True)
class HeadType:
    name: str
    make_arch: Callable  # (vocab_size, hidden_size, DrafterConfig) -> arch (a dataclass: arch.json)
    arch_from_dict: Callable  # arch.json fields -> arch
    build: Callable  # (arch, embed_VH, seed, d2t, base_head=None) -> nn.Module; base_head: drafter.init=base_head
    loss: Callable  # (module, batch, position weights, vocab maps) -> (loss, stats)
    export: Callable  # (state, arch, out_dir) -> Path
    from_state: Callable  # (arch, state, embed_VH, dtype) -> nn.Module in eval mode
    load_export: Callable  # (export_dir, embed_VH, dtype) -> nn.Module
    proposer: Callable  # (module, W, L, top_logits=..., keep_log_probs=...) -> eval.decoder.Proposer
    chain_proposer: Callable  # (module, W, L, temperature, generator) -> eval.decoder.Proposer


def _redrafter() -> HeadType:
    from eval.beam import BeamProposer
    from eval.sampling import ChainProposer
    from pipeline.drafter import DrafterArch, build_drafter, make_arch
    from pipeline.export import drafter_from_state, export_drafter, load_exported
    from pipeline.loss import distill_loss

    def arch_of(vocab_size: int, hidden_size: int, cfg) -> DrafterArch:
        return make_arch(vocab_size, hidden_size, cfg.exit_dim, cfg.num_draft_layers, cfg.rnn, cfg.horizon,
                         cfg.draft_vocab_size)

    def loss(module, batch: dict, weights, maps: dict):
        # teacher-forced logits of every draft position, then KL (or CE) against the teacher records
        return distill_loss(module(batch["h_NH"], batch["tokens_NK"]), batch, weights, **maps)

    return HeadType(
        name="redrafter", make_arch=arch_of, arch_from_dict=lambda d: DrafterArch(**d),
        build=lambda arch, embed, seed=0, d2t=None, base_head=None: build_drafter(arch, embed, seed=seed, d2t=d2t,
                                                                                   base_head_VH=base_head),
        loss=loss, export=export_drafter, from_state=drafter_from_state, load_export=load_exported,
        proposer=BeamProposer, chain_proposer=ChainProposer)


_FACTORIES: dict[str, Callable[[], HeadType]] = {"redrafter": _redrafter}
HEAD_TYPES = tuple(_FACTORIES)


@functools.cache
def head_type(name: str) -> HeadType:
    """The head type called `name` (built on first use: its modules import torch and the decoder)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown draft head {name!r}; head types are {', '.join(HEAD_TYPES)}")
    return _FACTORIES[name]()


def arch_record(head: HeadType, arch) -> dict:
    """What arch.json holds: the arch's fields plus the head type."""
    return {**dataclasses.asdict(arch), HEAD_KEY: head.name}


def read_arch(record: dict):
    """(head type, arch) from an arch.json record (drafters from before the seam have no "head")."""
    fields = {k: v for k, v in record.items() if k != HEAD_KEY}
    head = head_type(record.get(HEAD_KEY, "redrafter"))
    return head, head.arch_from_dict(fields)


def head_of(module) -> HeadType:
    """The head type of a built draft module (its class says: `HEAD` attribute)."""
    return head_type(getattr(module, "HEAD", "redrafter"))
