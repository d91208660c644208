"""Do CUDA graphs that share torch's cuBLAS workspace break when it is cleared? (issue 13's kept-bucket crash)

torch keeps one cuBLAS workspace per (handle, stream), allocated on first use; graphs captured on one stream (the
default capture stream of `torch.cuda.graph`) embed the first capture's workspace, which lives in that graph's memory
pool. CUDA graph trees (torch.compile's "reduce-overhead", which transformers' static-cache `generate` uses on a GPU)
clear every workspace around each recording. This script captures two GEMM graphs on one stream, destroys the
first, clears the workspaces as graph trees do, lets the allocator hand the freed memory to a new tensor, replays
the second graph and checks its output and the new tensor. Each case runs in a process of its own (an illegal
memory access ends the process):

- `shared`: the captures as `torch.cuda.graph` makes them (the fast path before `cublas_workspace_of_its_own`);
- `own`: each capture inside `hf_internals.cublas_workspace_of_its_own` (the fast path now).

    python benchmarks/gpu_cublas_workspace.py [--out FILE]

Expected, if the diagnosis holds: `shared` corrupts the new tensor, gives a wrong product or dies; `own` is clean.
Measured on an H100 (2026-12-06, torch 2.11.0+cu130; results/gpu_cublas_workspace_h100.json): `shared` overwrote the
new tensor (its products stayed right), `own` left it intact.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def child(case: str) -> dict:
    sys.path.insert(0, os.path.join(HERE, ".."))
    import torch

    from specvlm_hf.bench import software_versions
    from specvlm_hf.hf_internals import cublas_workspace_of_its_own

    wrap = cublas_workspace_of_its_own if case == "own" else contextlib.nullcontext
    torch.manual_seed(0)
    # the verify's MLP shapes: 60 rows by 4096 x 11008, then by 11008 x 4096 (a long reduction: split-K kernels,
    # which use the workspace)
    x = torch.randn(60, 4096, device="cuda", dtype=torch.bfloat16)

    def weights():
        up = torch.randn(4096, 11008, device="cuda", dtype=torch.bfloat16) / 64
        return up, torch.randn(11008, 4096, device="cuda", dtype=torch.bfloat16) / 105

    pairs = [weights(), weights()]
    expected = (x @ pairs[1][0]) @ pairs[1][1]
    (x @ pairs[0][0]) @ pairs[0][1]  # eager warm-up (kernels loaded, the default stream's workspace made)
    graphs, outputs = [], []
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    for up, down in pairs:
        graph = torch.cuda.CUDAGraph()
        with wrap(), torch.cuda.graph(graph):
            outputs.append((x @ up) @ down)
        graphs.append(graph)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # what stays reserved: segments with live blocks, and the graphs' private pools
    captured_mib = (torch.cuda.memory_reserved() - before) / 2**20  # with `own`: a workspace per graph in its pool
    del graphs[0], outputs[0]  # the first graph (and, with `shared`, the workspace's pool) dropped
    torch._C._cuda_clearCublasWorkspaces()  # as CUDA graph trees do around each recording
    torch.cuda.empty_cache()
    filler = torch.full((64 << 20,), 7.0, device="cuda")  # 256 MB: may take the freed memory
    for _ in range(20):
        graphs[0].replay()
    torch.cuda.synchronize()
    return {
        "case": case,
        **software_versions(),
        "product_equal": bool(torch.equal(outputs[0], expected)),
        "product_max_error": float((outputs[0].float() - expected.float()).abs().max()),
        "filler_intact": bool((filler == 7.0).all()),
        "two_captures_reserved_MiB": round(captured_mib, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child)), flush=True)
        return
    rows = []
    for case in ("own", "shared"):
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", case], capture_output=True, text=True, timeout=300
        )
        lines = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        failed = {"case": case, "exit": done.returncode, "stderr": done.stderr[-1500:]}
        row = json.loads(lines[-1]) if lines else failed
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
