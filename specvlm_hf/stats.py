"""What a speculative `generate` call did: `SpecVLMStats` (kept on the draft as `draft.stats`) and the phase
clock that times it without adding device synchronisations."""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

# a draft whose rounds add fewer tokens than this on average, over at least `LOW_ACCEPTANCE_ROUNDS` rounds, makes
# decoding slower than plain `generate`: warn once per draft
LOW_ACCEPTANCE_SIGMA = 1.2
LOW_ACCEPTANCE_ROUNDS = 16


@dataclass
class SpecVLMStats:
    """What the last `generate` call with a SpecVLM draft did (`draft.stats`).

    Attributes:
        mode: "tree" or "chain".
        rounds: target verification forwards after the prefill.
        accepted_per_round: tokens each round added to the output, the target's own token included.
        prompt_tokens / new_tokens: lengths of the prompt and of the generated continuation.
        prefill_seconds, draft_seconds, verify_seconds, total_seconds: wall time spent in the target's
            prefill, in drafting (tree building and draft catch-up), in target verification and
            acceptance, and in the whole call.
        visual_branch: the compressor branch the draft used for the prompt's image ("none" without one).
        draft_visual_tokens / target_visual_tokens: visual tokens in the draft's cache and in the target's.
        rows_per_round: for a batch, the rows each round verified (on the fast path the captured batch size,
            masked finished rows included: it halves or more when at most half of the rows are live).
    """

    mode: str = ""
    rounds: int = 0
    accepted_per_round: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    total_seconds: float = 0.0
    visual_branch: str = "none"
    draft_visual_tokens: int = 0
    target_visual_tokens: int = 0
    rows_per_round: list[int] = field(default_factory=list)

    @property
    def sigma(self) -> float:
        """Mean tokens accepted per target forward, the target's own token included (the paper's sigma)."""
        return sum(self.accepted_per_round) / len(self.accepted_per_round) if self.accepted_per_round else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "sigma": self.sigma}


def warn_if_low_acceptance(draft, stats: SpecVLMStats) -> None:
    """Warns once per draft when it accepts almost nothing over many rounds (then speculative decoding is slower
    than plain decoding: usually a draft made for another target of the same shape, or an untrained one)."""
    if stats.rounds < LOW_ACCEPTANCE_ROUNDS or stats.sigma >= LOW_ACCEPTANCE_SIGMA:
        return
    if getattr(draft, "_specvlm_warned_low_acceptance", False):
        return
    draft._specvlm_warned_low_acceptance = True
    made_for = (draft.config.target or {}).get("name_or_path")
    warnings.warn(
        f"The SpecVLM draft accepted {stats.sigma:.2f} tokens per target forward over {stats.rounds} rounds (1.0 "
        "means nothing was accepted), so decoding runs slower than plain `generate`; outputs are still exact. "
        + (f"The draft was made for {made_for!r}. " if made_for else "")
        + "Use a draft trained for this target (`specvlm train`), or drop `assistant_model`.",
        stacklevel=3,
    )


class PhaseClock:
    """Wall time per phase ("prefill", "draft", "verify", ...). `lap(phase)` charges the time since the previous
    lap to `phase`. On CUDA it records events instead of synchronising, so timing adds no host sync; the
    totals are read once, by `totals()`."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start = time.perf_counter()
        self.last = self.start
        self.seconds: dict[str, float] = {}
        self.marks: list = [(None, self._event())] if self.cuda else []

    @staticmethod
    def _event():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def lap(self, phase: str) -> None:
        if self.cuda:
            self.marks.append((phase, self._event()))
            return
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now

    def totals(self) -> dict[str, float]:
        """Seconds per phase, and "total" (wall time since the clock started)."""
        seconds = dict(self.seconds)
        if self.cuda:
            torch.cuda.synchronize()
            for (_, before), (phase, after) in zip(self.marks, self.marks[1:]):
                seconds[phase] = seconds.get(phase, 0.0) + before.elapsed_time(after) / 1000
        seconds["total"] = time.perf_counter() - self.start
        return seconds

    def fill(self, stats: SpecVLMStats) -> None:
        """Writes the phase totals into `stats`."""
        totals = self.totals()
        stats.prefill_seconds = totals.get("prefill", 0.0)
        stats.draft_seconds = totals.get("draft", 0.0)
        stats.verify_seconds = totals.get("verify", 0.0)
        stats.total_seconds = totals["total"]
