"""Timing a short GPU call: many calls captured in one CUDA graph, so neither Python nor graph launches count."""

from __future__ import annotations

import torch


def per_call_us(fn, calls: int = 100, replays: int = 20) -> float:
    """Microseconds a call of `fn()`, from a CUDA graph of `calls` calls replayed `replays` times (after three
    warm-up calls on a side stream, as capture requires)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / (replays * calls)
