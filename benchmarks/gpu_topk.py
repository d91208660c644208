"""The draft's top-k over a vocabulary: torch's `topk` of whole rows against `tree.top_k_of_rows`'s two passes over
chunks (`tree.CHUNKED_TOP_K`), each timed as 100 calls captured in one CUDA graph (microseconds a call), with the
values checked equal (issue 13).

A draft level takes the top-k of `(frontier, vocabulary)` log-probabilities: 10 rows of LLaVA's 32064 ids, one row at
the root; 152064 is Qwen2.5-VL's vocabulary, 8192 a reduced draft vocabulary.

    python benchmarks/gpu_topk.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from specvlm_hf import tree  # noqa: E402

SHAPES = ((10, 32064), (1, 32064), (10, 152064), (1, 152064), (10, 8192))
CALLS = 100


def per_call_us(fn, values: torch.Tensor) -> float:
    """Microseconds a call of `fn(values)`, from a CUDA graph of `CALLS` calls replayed 20 times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(values)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn(values)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / (20 * CALLS)


def chunked(values: torch.Tensor):
    saved, tree.CHUNKED_TOP_K = tree.CHUNKED_TOP_K, True
    try:
        return tree.top_k_of_rows(values, 10)
    finally:
        tree.CHUNKED_TOP_K = saved


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    generator = torch.Generator(device="cuda").manual_seed(0)
    for shape in SHAPES:
        values = torch.randn(shape, device="cuda", generator=generator).log_softmax(-1)
        equal = torch.equal(chunked(values)[0], values.topk(10, dim=-1)[0])
        row = {
            "shape": list(shape),
            "chunks": tree.top_k_chunks(shape[-1], 10),
            "topk_us": per_call_us(lambda v: v.topk(10, dim=-1), values),
            "chunked_us": per_call_us(chunked, values),
            "values_equal": equal,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"machine": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
