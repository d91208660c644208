"""The fp8 draft head's product: the package's Triton kernel (`kernels.fp8_product`) against torch's row-scaled
float8 GEMM (`torch._scaled_mm`, the package's product before it and still its CPU one) and the bf16 head (issue 13).

`torch._scaled_mm` needs the ~10 hidden-state rows of a tree level quantized to e4m3 first (a reduction and a cast)
and runs well below the copy bandwidth at 10 rows. The kernel reads `BLOCK_N` e4m3 rows of the head a program,
converts them in registers and multiplies them with the hidden states as they are (bf16, padded to 16 rows for
`tl.dot`), then applies the rows' scales.

    python benchmarks/fp8_head_triton.py                 # GPU: timings against bf16 and torch._scaled_mm
    python benchmarks/fp8_head_triton.py --check-only    # CPU: checks the kernel in Triton's interpreter

Measured on an H100 on 2026-12-06 (results/README.md): 52 against 73 us (`_scaled_mm`) and 98 (bf16) at LLaVA's
head, 203 / 232 / 383 at Qwen2.5-VL's, 367 / 408 / 710 at Gemma 3's; 32 head rows a program was fastest at all three,
and is the package's setting. The package uses the kernel since then (`kernels.FP8_KERNEL`). The same kernel on the
7B draft layer's own products (`llava-7b-fc`, `-q`, `-gate`, `-down`) did not pay (results/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernel runs on the CPU

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from specvlm_hf import kernels  # noqa: E402
from specvlm_hf.kernels import fp8_product  # noqa: E402
from specvlm_hf.modeling_specvlm_draft import fp8_logits, fp8_rows_padded  # noqa: E402

SHAPES = {  # (rows of a tree level, hidden, vocabulary; or, for the draft's own products, input and output width)
    "llava-7b": (10, 4096, 32064),
    "qwen2.5-vl-7b": (10, 3584, 152064),
    "gemma-3-12b": (10, 3840, 262208),
    "llava-7b-fc": (10, 8192, 4096),  # the draft's own products, LLaVA-1.5-7B's draft layer (weights in fp8 too?)
    "llava-7b-q": (10, 4096, 4096),  # (q, k, v and o alike)
    "llava-7b-gate": (10, 4096, 11008),  # (gate and up alike)
    "llava-7b-down": (10, 11008, 4096),
}


def fp8_head_kernel(hidden_states, weight, scale, count: int, block_n: int | None = None) -> torch.Tensor:
    """The package's kernel (`kernels.fp8_product`), with `block_n` head rows a program when given."""
    if block_n is None:
        return fp8_product(hidden_states, weight, scale, count)
    out = torch.empty(hidden_states.shape[0], count, dtype=torch.float32, device=hidden_states.device)
    previous, kernels.FP8_COLUMNS = kernels.FP8_COLUMNS, block_n
    try:
        kernels.launch_fp8(hidden_states, weight, scale, count, out)
    finally:
        kernels.FP8_COLUMNS = previous
    return out


def check(device: str) -> dict:
    """The kernel against the dequantized head's product in float32, and the package's `fp8_logits` beside it."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 256, generator=generator)
    head = torch.randn(1000, 256, generator=generator) / 16
    weight, scale, count = fp8_rows_padded(head, device)
    hidden = hidden.to(device)
    exact = hidden.float() @ (weight.float() * scale.t())[:count].t()
    ours = fp8_head_kernel(hidden.to(torch.bfloat16), weight, scale, count)
    kernels.FP8_KERNEL = False
    package = fp8_logits(hidden.to(torch.bfloat16), weight, scale, count).float()
    kernels.FP8_KERNEL = True
    reference = hidden.float() @ head.to(device).t()
    relative = lambda values: ((values - reference).norm() / reference.norm()).item()  # noqa: E731
    result = {
        "kernel_vs_dequantized_max_abs": (ours - exact).abs().max().item(),
        "kernel_relative_error": relative(ours),
        "scaled_mm_relative_error": relative(package),
    }
    # the hidden states' bf16 rounding is all that parts the kernel from the dequantized product
    bf16_exact = hidden.to(torch.bfloat16).float() @ (weight.float() * scale.t())[:count].t()
    torch.testing.assert_close(ours, bf16_exact, rtol=1e-4, atol=1e-4)
    return result


def timing(name: str) -> dict:
    """Microseconds a call (CUDA graph) of one shape's head product: bf16, the package's fp8 head, the kernel."""
    from graph_timing import per_call_us

    rows, hidden, vocab = SHAPES[name]
    head = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16) / 64
    states = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    weight, scale, count = fp8_rows_padded(head, "cuda")
    row = {"shape": name, "rows_x_hidden_x_vocab": [rows, hidden, vocab], "head_MB_bf16": head.numel() * 2 / 1e6}
    row["bf16_us"] = per_call_us(lambda: torch.nn.functional.linear(states, head))
    kernels.FP8_KERNEL = False  # the package's product before the kernel: torch._scaled_mm
    row["scaled_mm_us"] = per_call_us(lambda: fp8_logits(states, weight, scale, count))
    kernels.FP8_KERNEL = True
    for block_n in (32, 64, 128):
        row[f"triton_{block_n}_us"] = per_call_us(lambda: fp8_head_kernel(states, weight, scale, count, block_n))
    return row


def timings(shapes) -> list[dict]:
    rows = []
    for name in shapes:
        rows.append(timing(name))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"}
    result["check"] = check(device)
    print(json.dumps(result), flush=True)
    if not args.check_only and device == "cuda":
        result["timings"] = timings(args.shapes.split(","))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
