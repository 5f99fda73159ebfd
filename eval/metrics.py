"""Decoding statistics, defined exactly as docs/design.md §5.

One record per (decode step, active row): how many drafts that row accepted and how many packed
tokens it verified. A row that has finished but still rides in the batch is not recorded.

- tokens_per_step (tau) = mean over records of (accepted drafts + 1); plain decoding gives 1.0
- acceptance_per_position[i - 1] = a_i = P(draft i accepted | drafts < i accepted), i = 1..L-1
- verified_tokens_per_step = mean packed tokens per record; verified_fraction_of_WL = that / (W * L)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable


@dataclass
class DecodeStats:
    beam_width: int
    beam_length: int
    accepted: list[int] = field(default_factory=list)  # accepted drafts per record (0..L-1)
    verified: list[int] = field(default_factory=list)  # packed (verified) tokens per record
    num_forwards: int = 0  # batched base-model forwards in the decode loop (prefill not counted)
    lookup_wins: int = 0  # hybrid drafting: records whose prompt-lookup path beat every drafter beam
    # host-clock seconds of the decode loop and of its base forwards alone (eval/decoder.py ForwardTimer,
    # on CPU only); the ideal speedup of the timed run comes from these (docs/design.md §5). 0: not timed
    decode_seconds: float = 0.0
    forward_seconds: float = 0.0

    def record(self, accepted: Iterable[int], verified: Iterable[int]) -> None:
        accepted, verified = list(accepted), list(verified)
        assert len(accepted) == len(verified)
        assert not accepted or (min(accepted) >= 0 and max(accepted) < self.beam_length), accepted
        self.accepted += accepted
        self.verified += verified

    @property
    def num_steps(self) -> int:
        return len(self.accepted)

    @property
    def tokens_per_step(self) -> float:
        return sum(a + 1 for a in self.accepted) / self.num_steps if self.accepted else float("nan")

    @property
    def acceptance_per_position(self) -> list[float]:
        """a_i for i = 1..L-1; nan where no record reached draft i."""
        rates = []
        for i in range(1, self.beam_length):
            reached = sum(a >= i - 1 for a in self.accepted)  # drafts < i all accepted
            rates.append(sum(a >= i for a in self.accepted) / reached if reached else float("nan"))
        return rates

    @property
    def tokens_per_step_histogram(self) -> dict[int, int]:
        """Records that committed exactly k tokens (k - 1 accepted drafts), k = 1..L (gpt-fast's accept counts)."""
        return {k: sum(a + 1 == k for a in self.accepted) for k in range(1, self.beam_length + 1)}

    @property
    def verified_tokens_per_step(self) -> float:
        return sum(self.verified) / self.num_steps if self.verified else float("nan")

    @property
    def verified_fraction_of_WL(self) -> float:
        """Verified tokens per step over W * L: what tree attention saves (1.0 without dedup)."""
        return self.verified_tokens_per_step / (self.beam_width * self.beam_length)

    @classmethod
    def merge(cls, stats: Iterable[DecodeStats]) -> DecodeStats:
        stats = list(stats)
        if not stats:
            raise ValueError("merge() needs at least one DecodeStats")
        shapes = {(s.beam_width, s.beam_length) for s in stats}
        if len(shapes) != 1:
            raise ValueError(f"cannot merge stats of different beam shapes {sorted(shapes)}")
        merged = cls(stats[0].beam_width, stats[0].beam_length)
        for s in stats:
            merged.record(s.accepted, s.verified)
            merged.num_forwards += s.num_forwards
            merged.lookup_wins += s.lookup_wins
            merged.decode_seconds += s.decode_seconds
            merged.forward_seconds += s.forward_seconds
        return merged

    def to_dict(self) -> dict:
        def clean(x: float) -> float | None:  # JSON has no nan
            return None if x != x else x

        return {
            "beam_width": self.beam_width,
            "beam_length": self.beam_length,
            "num_steps": self.num_steps,
            "num_forwards": self.num_forwards,
            "lookup_wins": self.lookup_wins,
            "decode_seconds": self.decode_seconds,
            "forward_seconds": self.forward_seconds,
            "tokens_per_step": clean(self.tokens_per_step),
            "acceptance_per_position": [clean(a) for a in self.acceptance_per_position],
            "tokens_per_step_histogram": {str(k): n for k, n in self.tokens_per_step_histogram.items()},
            "verified_tokens_per_step": clean(self.verified_tokens_per_step),
            "verified_fraction_of_WL": clean(self.verified_fraction_of_WL),
        }
