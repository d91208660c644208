"""The draft's top-k over a vocabulary: torch's `topk` of whole rows against a top-k in two passes over equal chunks
of the row (each chunk's `k` largest, then the `k` largest of those: the same values), each timed as 100 calls
captured in one CUDA graph (microseconds a call), with the values checked equal (issue 13).

A draft level takes the top-k of `(frontier, vocabulary)` log-probabilities: 10 rows of LLaVA's 32064 ids, one row at
the root; 152064 is Qwen2.5-VL's vocabulary, 8192 a reduced draft vocabulary. On a GPU torch's `topk` of such rows
runs a multi-block radix select (about a dozen kernels a call); the two-pass form runs two single-block ones. On an
H100 (2026-12-06, results/README.md) it saved 5 us a draft level at 10 x 32064, lost 25 us at 10 x 152064, and in the
7B round (then `tree.CHUNKED_TOP_K`) gained nothing measurable, so this form lives here only. Since 2026-12-06 the
package's own op (`kernels.top_k_rows`, two Triton kernels, `fused_op_us`) is timed beside them.

    python benchmarks/gpu_topk.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from graph_timing import per_call_us  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from specvlm_hf.kernels import fused_top_k_usable, top_k_rows  # noqa: E402

SHAPES = ((10, 32064), (1, 32064), (1, 100), (10, 152064), (1, 152064), (10, 8192), (10, 262208))


def chunk_count(length: int, k: int) -> int | None:
    """The divisor `c` of `length` that makes the longer of the two passes (`length / c` entries, then `c * k`)
    shortest; None when none makes both at most a quarter of the row."""
    best = None
    for chunks in range(2, length // max(k, 1) + 1):
        if length % chunks == 0:
            longest = max(length // chunks, chunks * k)
            best = min(best or (longest, chunks), (longest, chunks))
    return best[1] if best is not None and best[0] <= length // 4 else None


def chunked_top_k(values: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """`values.topk(k, dim=-1)` in two passes over `chunk_count` equal chunks of each row (where values tie, which
    index comes first may differ)."""
    chunks = chunk_count(values.shape[-1], k)
    if chunks is None:
        return values.topk(k, dim=-1)
    width = values.shape[-1] // chunks
    chunk_values, chunk_indices = values.unflatten(-1, (chunks, width)).topk(k, dim=-1)  # (..., chunks, k)
    chunk_indices = chunk_indices + torch.arange(0, values.shape[-1], width, device=values.device)[:, None]
    best_values, best = chunk_values.flatten(-2).topk(k, dim=-1)
    return best_values, chunk_indices.flatten(-2).gather(-1, best)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--check", action="store_true", help="only check the two forms agree (CPU or GPU)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    generator = torch.Generator(device=device).manual_seed(0)
    for shape in SHAPES:
        values = torch.randn(shape, device=device, generator=generator).log_softmax(-1)
        got, expected = chunked_top_k(values), values.topk(10, dim=-1)
        fused = top_k_rows(values, 10, fused=True)
        row = {
            "shape": list(shape),
            "chunks": chunk_count(shape[-1], 10),
            "values_equal": torch.equal(got[0], expected[0]),
            "indices_equal": torch.equal(got[1], expected[1]),
            "fused_op": fused_top_k_usable(values.device),
            "fused_values_equal": torch.equal(fused[0], expected[0]),
            "fused_indices_equal": torch.equal(fused[1], expected[1]),
        }
        if not args.check:
            row["topk_us"] = per_call_us(lambda: values.topk(10, dim=-1))
            row["chunked_us"] = per_call_us(lambda: chunked_top_k(values))
            row["fused_op_us"] = per_call_us(lambda: top_k_rows(values, 10, fused=True))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not all(row["values_equal"] and row["fused_values_equal"] for row in rows):
        raise SystemExit("the two-pass top-k or the fused op gave other values than torch's topk")
    machine = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
