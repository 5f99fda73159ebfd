"""ReDrafter speculative decoding (docs/design.md §3): the drafter's proposal and a verifier plugged into
the one step skeleton (eval/decoder.py run_step).

    decoder = SpeculativeDecoder(model, drafter, beam_width=4, beam_length=5)
    result = decoder.generate(prompts, max_new_tokens=128, eos_token_id=tok.eos_token_id)

| temperature | mode                      | proposer                        | verifier                         |
| 0           | greedy (identical output) | drafter beams (eval/beam.py)    | greedy (eval/decoder.py)          |
| 0, ngram=N  | hybrid                    | beams + a prompt-lookup path    | greedy                            |
| 0, switch=m | hybrid, switch mode       | lookup path if an m-token match | greedy                            |
|             |                           | exists, else the beams          |                                   |
| 0, switch=m,| hybrid, long switch       | K-token lookup paths when every | greedy                            |
| lookup_length=K |                       | row has a match, else as above  |                                   |
| T, ngram=N  | hybrid sampling           | chains + a lookup point mass    | recursive rejection sampling      |
| T > 0       | lossless sampling         | drafter chains (eval/sampling)  | recursive rejection sampling      |
| T > 0, ref. | the reference rule        | beams with their log-probs      | the reference's (NOT lossless)    |
"""

from __future__ import annotations

import functools
import warnings

import torch

from eval.beam import REFERENCE_TOP_LOGITS
from eval.decoder import (NO_CLOCK, DecodeState, GenerationResult, Proposer, _decode, argmax_token, forward_timer,
                          greedy_verifier, run_step)
from eval.metrics import DecodeStats
from eval.ngram import LookupProposer
from eval.sampling import SamplingVerifier, accept_reference, accept_tree, sample_from_logits
from pipeline.heads import head_of


class SpeculativeDecoder:
    """temperature 0: greedy, output identical to `plain_greedy`. temperature > 0: sampling
    (eval/sampling.py), lossless by default; `reference_compatible=True` uses the reference's
    acceptance rule instead, which is NOT lossless. `ngram` = N > 0 adds one prompt-lookup path to the
    beams or chains (hybrid drafting, docs/design.md §3.3; greedy or lossless sampling)."""

    def __init__(self, model, drafter, beam_width: int, beam_length: int, tree_attention: bool = True,
                 temperature: float = 0.0, reference_compatible: bool = False, top_logits: int = REFERENCE_TOP_LOGITS,
                 ngram: int = 0, switch: int = 0, lookup_length: int = 0):
        if beam_width < 1 or beam_length < 1:
            raise ValueError(f"beam_width and beam_length must be >= 1, got {beam_width}, {beam_length}")
        if beam_width > model.config.vocab_size:
            raise ValueError(f"beam_width {beam_width} exceeds the vocabulary size {model.config.vocab_size}")
        if not temperature >= 0.0:  # also rejects nan
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if reference_compatible and temperature == 0.0:
            warnings.warn("reference_compatible only changes sampling (temperature > 0); ignored at temperature 0")
        if ngram < 0:
            raise ValueError(f"ngram must be >= 0 (0 = drafter beams only), got {ngram}")
        if switch and (temperature > 0.0 or not 0 < switch <= ngram):
            raise ValueError(f"hybrid switch mode (switch={switch}) needs greedy decoding and 1 <= switch <= ngram={ngram}")
        if lookup_length and (not switch or lookup_length < 2):
            raise ValueError(f"lookup_length={lookup_length} needs switch mode and at least 2 tokens (0 = the beam length)")
        if ngram and temperature > 0.0 and reference_compatible:
            raise ValueError("hybrid drafting (ngram > 0) is greedy or lossless sampling: not with the reference rule")
        self.model, self.drafter = model, drafter
        self.head = head_of(drafter)  # its proposals (pipeline/heads.py): beams, chains
        self.beam_width, self.beam_length = beam_width, beam_length
        self.tree_attention = tree_attention  # False: verify all W * L tokens, no prefix sharing
        self.temperature, self.reference_compatible = temperature, reference_compatible
        self.top_logits = top_logits  # the beam search's logit processing (eval/beam.py reference_logits)
        self.ngram, self.switch = ngram, switch
        self.lookup_length = lookup_length  # switch mode: K-token lookup paths when every row copies (eval/ngram.py)
        self.num_paths = beam_width + (1 if ngram and not switch else 0)
        self.max_path_length = max(beam_length, lookup_length)  # a step commits at most this many tokens

    @property
    def step_slots(self) -> int:
        """Cache slots a step may use beyond max_b ctx_b: W * L packed slots (or K, a long lookup path),
        and a row may overshoot max_new_tokens by the longest path - 1."""
        return max(self.num_paths * self.beam_length, self.lookup_length) + self.max_path_length

    def new_stats(self) -> DecodeStats:
        return DecodeStats(self.num_paths, self.max_path_length)

    def parts(self, generator: torch.Generator | None = None) -> tuple[Proposer, object]:
        """(proposer, verifier) of this decoder's step; `generator` drives every random draw at T > 0."""
        W, L, T = self.beam_width, self.beam_length, self.temperature
        if T == 0.0:  # greedy verification needs no drafter probabilities: the search skips keeping them
            proposer, verifier = self.head.proposer(self.drafter, W, L, top_logits=self.top_logits), greedy_verifier
            if self.ngram:
                proposer = LookupProposer(proposer, self.ngram, self.switch, self.lookup_length)
        elif self.reference_compatible:
            proposer = self.head.proposer(self.drafter, W, L, top_logits=self.top_logits, keep_log_probs=True)
            verifier = SamplingVerifier(accept_reference, T, generator)
        else:
            proposer = self.head.chain_proposer(self.drafter, W, L, T, generator)
            verifier = SamplingVerifier(accept_tree, T, generator)
            if self.ngram:  # the lookup path enters the rejection sampling as a point mass (eval/ngram.py)
                proposer = LookupProposer(proposer, self.ngram)
        return proposer, verifier

    def step(self, state: DecodeState, stats: DecodeStats, generator: torch.Generator | None = None,
             clock=NO_CLOCK) -> None:
        run_step(self.model, *self.parts(generator), state, stats, dedup=self.tree_attention, clock=clock)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None,
                 generator: torch.Generator | None = None) -> GenerationResult:
        """`generator` drives every random draw when temperature > 0 (None: torch's global RNG)."""
        stats = self.new_stats()
        pick_next = argmax_token
        if self.temperature > 0.0:
            pick_next = functools.partial(sample_from_logits, temperature=self.temperature, generator=generator)
        elif generator is not None:
            warnings.warn("generator is ignored at temperature 0 (greedy decoding draws nothing)")
        proposer, verifier = self.parts(generator)
        clock = forward_timer(self.model, stats)

        def step(state: DecodeState, stats: DecodeStats) -> None:
            run_step(self.model, proposer, verifier, state, stats, dedup=self.tree_attention, clock=clock)

        return _decode(self.model, prompts, max_new_tokens, eos_token_id, step, stats, step_slots=self.step_slots,
                       pick_next=pick_next)
