"""What the package's attention kernels cost a process at each new length bucket (issue 13: a new bucket <= 2 s).

`kernels.tree_attention` compiles its two Triton kernels the first time a process meets a query block size (16 or
32 queries a program, `kernels.attention_tiling`; the cache's width, the steps and the slices are runtime arguments),
and Triton keeps them on disk for the next process. This calls the op on the LLaVA-1.5-7B attention shape (32 heads
of 128, bf16) at every bucket width from 256 to 4096 slots, for a verify's 60 queries and a draft level's 10, with an
empty Triton cache, and prints each call's first-call seconds against a repeated call.

    python benchmarks/gpu_attention_compile.py --out $OUT/attention_compile.json

Written on 2026-12-06, when the kernels still compiled one variant per power-of-two tiling; first run after the
tilings became runtime arguments (2026-12-06 night).
`gpu_plan_issue13.sh buckets_attention` measures the same through whole fast-path calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="")
    parser.add_argument("--max-width", type=int, default=4096)
    args = parser.parse_args()
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()  # before Triton is imported: every compile is real
    import torch

    from specvlm_hf import kernels
    from specvlm_hf.bench import software_versions

    device = torch.device("cuda")
    rows = []
    for width in range(256, args.max_width + 1, 256):
        for queries in (60, 10):
            q = torch.randn(1, 32, queries, 128, dtype=torch.bfloat16, device=device)
            k, v = (torch.randn(1, 32, width, 128, dtype=torch.bfloat16, device=device) for _ in "kv")
            mask = torch.zeros(1, 1, queries, width, dtype=torch.bfloat16, device=device)
            times = []
            for _ in range(2):
                torch.cuda.synchronize()
                start = time.perf_counter()
                kernels.tree_attention(q, k, v, mask, 128**-0.5)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            row = {
                "width": width,
                "queries": queries,
                "tiling": kernels.attention_tiling(32, queries, width),
                "first_s": times[0],
                "again_s": times[1],
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({**software_versions(), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
