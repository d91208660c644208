"""The fast path over many kept length buckets, call after call, checked against plain `generate` (issue 13).

A 7B run (`gpu_long_running.py --only plain_static,fast,round_cost`, H100, 2026-12-05 17:40 UTC) met an illegal
memory access in the first call after its `fast` section: 9 buckets met twice with 48 new tokens (all kept, their
target caches sharing the longest one's memory), then the first prompt again with 96 new tokens. This script repeats
that sequence of calls on the tiny LLaVA shape in fp32 (fast to compile), each call's greedy output compared with
plain `generate`, once with the round functions compiled ahead of time into a store (`startup.use_cache_dir`, as
that run did) and once compiled in process, each in a process of its own (a crash ends only its own mode). A third
mode, `precompiled_static_plain`, takes the plain references with a static cache, as that run did: transformers then
compiles its decoding step (its own CUDA graphs), interleaved with the fast path's. The calls run in that run's order:
the plain sweeps, then the fast sweeps, then plain and fast call by call. On the tiny shape (H200, 2026-12-05 18:00
UTC) the first two modes gave 21/21 equal calls each, no crash; `--seven-b` repeats it on the 7B shape in bf16, and
`--tiny-dtype bfloat16` the tiny shape in bf16 (the failing run's dtype, whose sdpa kernels and inductor code are not
those of fp32; outputs may then differ by bf16 noise, crashes are what it looks for). In that mode each row also
compares plain `generate` with itself, dynamic against static cache (`plain_dynamic_vs_static_first_difference`):
bf16 rounding alone, for a sense of how early random weights diverge.

The likely cause, found later in torch's source: the graphs shared one cuBLAS workspace, which transformers' compiled
decoding (CUDA graph trees) freed; `precompiled_static_plain` is the mode that interleaves it, and the fast path now
gives each graph a workspace of its own (`hf_internals.cublas_workspace_of_its_own`; `gpu_cublas_workspace.py`).

    python benchmarks/gpu_kept_buckets.py [--smoke] [--seven-b | --tiny-dtype bfloat16] [--modes ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
LENGTHS = (601, 89, 345, 857, 1113, 1369, 1625, 1881, 2137)


def as_text(output) -> str:
    """A timed-out child's captured output (bytes, text or None) as text."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def calls() -> list[tuple[int, int]]:
    """(prompt length, new tokens) in the failing run's order."""
    return [(n, 48) for n in LENGTHS] * 2 + [(LENGTHS[0], 96), (LENGTHS[-1], 96), (LENGTHS[1], 96)]


def child(mode: str, smoke: bool, seven_b: bool, cudnn_sdpa: bool = True, tiny_dtype: str = "float32") -> None:
    sys.path.insert(0, os.path.join(HERE, ".."))
    sys.path.insert(0, HERE)
    if smoke:
        os.environ["TINY"] = "1"
    import torch

    import gpu_check_tree
    from gpu_long_running import build, make_inputs, timed_call
    from gpu_check_tree import first_difference
    from specvlm_hf import precompile
    from specvlm_hf.startup import use_cache_dir

    if not cudnn_sdpa:  # sdpa's cuDNN kernel (the verify's, on Hopper) out of the picture
        torch.backends.cuda.enable_cudnn_sdp(False)
    if mode.startswith("precompiled"):
        use_cache_dir(tempfile.mkdtemp(prefix="specvlm_kept_"))
    else:
        precompile.use_store(None)
    plain_kwargs = {"cache_implementation": "static"} if mode.endswith("static_plain") else {}
    gpu_check_tree.TINY = not seven_b
    dtype = getattr(torch, tiny_dtype)
    target, draft = build(None if seven_b else dtype)
    sequence = calls()[: 4 if smoke else None]
    sweeps = len(LENGTHS) * 2 if not smoke else 2

    def prompt(index, length):
        inputs = make_inputs(
            min(length, 300) if smoke else length, torch.Generator().manual_seed(index % len(LENGTHS))
        )
        if not seven_b and "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return inputs

    # as the failing run: the plain sweeps, then the fast sweeps, then plain and fast call by call
    plain = {i: timed_call(target, prompt(i, n), t, **plain_kwargs)[1] for i, (n, t) in enumerate(sequence[:sweeps])}
    for index, (length, new_tokens) in enumerate(sequence):
        inputs = prompt(index, length)
        if index not in plain:
            plain[index] = timed_call(target, inputs, new_tokens, **plain_kwargs)[1]
        try:
            _, fast = timed_call(target, inputs, new_tokens, assistant_model=draft, cache_implementation="static")
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        except Exception as error:
            traceback.print_exc()
            print("ROW " + json.dumps({"mode": mode, "call": index, "length": length, "error": repr(error)[:400]}))
            return
        kept = sorted(length for length, _ in getattr(draft, "_specvlm_fast_paths").paths)
        length = inputs["input_ids"].shape[1]
        row = {"mode": mode, "call": index, "length": length, "new_tokens": new_tokens, "equal": plain[index] == fast}
        row["first_difference"] = first_difference(plain[index], fast)
        if plain_kwargs:  # a control: plain `generate` against itself, dynamic against static cache (in bf16 the two
            # round differently too; a fast path that differs no earlier than this is within plain decoding's noise)
            dynamic = timed_call(target, inputs, new_tokens)[1]
            row["plain_dynamic_vs_static_first_difference"] = first_difference(dynamic, plain[index])
        if torch.cuda.is_available():  # what the kept buckets hold (each captured graph owns a cuBLAS workspace)
            row["allocated_GB"] = round(torch.cuda.memory_allocated() / 2**30, 3)
            row["reserved_GB"] = round(torch.cuda.memory_reserved() / 2**30, 3)
        print("ROW " + json.dumps({**row, "kept": kept}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--modes", default="precompiled,in_process,precompiled_static_plain")
    parser.add_argument(
        "--seven-b", action="store_true", help="the 7B shape in bf16 (outputs may differ by bf16 noise)"
    )
    parser.add_argument("--no-cudnn-sdpa", action="store_true", help="sdpa without its cuDNN kernel")
    parser.add_argument("--tiny-dtype", default="float32", choices=("float32", "bfloat16"), help="the tiny shape's")
    parser.add_argument("--timeout", type=float, default=None, help="seconds a mode may run (560 for 7B, else 190)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.smoke, args.seven_b, not args.no_cudnn_sdpa, args.tiny_dtype)
        return
    for mode in args.modes.split(","):
        command = [sys.executable, os.path.abspath(__file__), "--child", mode]
        command += (["--smoke"] if args.smoke else []) + (["--seven-b"] if args.seven_b else [])
        command += (["--no-cudnn-sdpa"] if args.no_cudnn_sdpa else []) + ["--tiny-dtype", args.tiny_dtype]
        timeout = args.timeout or (560 if args.seven_b else 190)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            stdout, stderr, status = done.stdout, done.stderr, f"exit {done.returncode}"
        except subprocess.TimeoutExpired as expired:  # the calls made so far still count
            stdout, stderr = as_text(expired.output), as_text(expired.stderr)
            status, done = f"stopped after {timeout} s", None
        rows = [line[4:] for line in stdout.splitlines() if line.startswith("ROW ")]
        print("\n".join(rows), flush=True)
        if done is None or done.returncode or not rows or "error" in rows[-1]:
            print(f"{mode}: {status}\n" + stderr[-2500:], flush=True)


if __name__ == "__main__":
    main()
