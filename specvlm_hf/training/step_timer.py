"""Where a training step's time goes: teacher forward, draft forward + backward, optimizer, data.

`DistillTrainer.timer = StepTimer(device)` turns it on (`benchmarks/train_throughput.py` does). GPU phases are
timed with CUDA events, so timing never makes the host wait for the GPU; the events are read in `summary`.
The data phase is host time: how long the training loop waited for its next micro-batches.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class StepTimer:
    """Records `(step, phase, duration)` of every timed region.

    Args:
        device: the training device (CUDA: event timing of the work queued inside a region; else host time).
    """

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self._records: list[tuple[int, str, object, object]] = []

    @contextmanager
    def phase(self, name: str, step: int, host: bool = False):
        """Times the block as phase `name` of optimizer step `step` (host time when `host` or off CUDA)."""
        if self.cuda and not host:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._records.append((step, name, start, end))
        else:
            start = time.perf_counter()
            yield
            self._records.append((step, name, start, time.perf_counter()))

    def summary(self, first_step: int = 0) -> dict:
        """Seconds per phase summed over steps >= `first_step` (waits for the GPU), and the steps counted."""
        if self.cuda:
            torch.cuda.synchronize()
        seconds: dict[str, float] = defaultdict(float)
        steps = set()
        for step, name, start, end in self._records:
            if step < first_step:
                continue
            steps.add(step)
            seconds[name] += start.elapsed_time(end) / 1000 if isinstance(start, torch.cuda.Event) else end - start
        return {"seconds": dict(seconds), "steps": len(steps)}
