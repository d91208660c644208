"""An experiment for issue 13 (benchmarks only, not used by the package): the fp8 draft head's product as one Triton
kernel reading e4m3 weights and the hidden states as they are (bf16), instead of `torch._scaled_mm`.

`draft.use_fp8_head()` quantizes the ~10 hidden-state rows of a tree level to e4m3 (a reduction and a cast, one or
two kernels) and runs cuBLAS's row-scaled fp8 GEMM. In whole rounds that saved about half of what halving the head's
bytes should (Qwen2.5-VL-7B on an H200: -0.44 ms against ~0.9; results/README.md): the 10-row fp8 GEMM runs well
below the copy bandwidth. A product this skinny is a weight read: here each program reads `BLOCK_N` e4m3 rows of the
head once, converts them in registers and multiplies them with every hidden-state row (padded to 16 for `tl.dot`),
then applies the rows' scales; the hidden states stay bf16 (no quantization kernel, and closer to the bf16 head).

    python benchmarks/fp8_head_triton.py                 # GPU: timings against bf16 and torch._scaled_mm
    python benchmarks/fp8_head_triton.py --check-only    # CPU: checks the kernel in Triton's interpreter

Status (2026-12-06): checked in the interpreter only; not yet timed on a GPU (`--out` writes the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernel runs on the CPU

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from specvlm_hf.modeling_specvlm_draft import fp8_logits, fp8_rows_padded  # noqa: E402

SHAPES = {  # (rows of a tree level, hidden, vocabulary)
    "llava-7b": (10, 4096, 32064),
    "qwen2.5-vl-7b": (10, 3584, 152064),
    "gemma-3-12b": (10, 3840, 262208),
}


@triton.jit
def _fp8_head_kernel(
    x_ptr, w_ptr, scale_ptr, out_ptr, rows, vocab, x_stride, w_stride, out_stride,
    HIDDEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP32: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)  # BLOCK_N rows of the head
    m = tl.arange(0, BLOCK_M)
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for start in range(0, HIDDEN, BLOCK_K):  # the hidden size is a constant of the model: one compile per model
        k = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * x_stride + k[None, :], mask=(m[:, None] < rows) & (k[None, :] < HIDDEN))
        w = tl.load(w_ptr + n[:, None] * w_stride + k[None, :], mask=(n[:, None] < vocab) & (k[None, :] < HIDDEN))
        if FP32:  # Triton's CPU interpreter multiplies bf16 operands of `tl.dot` as their raw bits
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
        else:
            acc += tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
    scale = tl.load(scale_ptr + n, mask=n < vocab, other=0.0)
    acc = acc * scale[None, :]
    tl.store(out_ptr + m[:, None] * out_stride + n[None, :], acc, mask=(m[:, None] < rows) & (n[None, :] < vocab))


def fp8_head_product(
    hidden_states: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, count: int, block_n: int = 64
) -> torch.Tensor:
    """`hidden_states (m, d) @ (weight * scale.T).T` for `fp8_rows_padded`'s head (`weight (n, d)` e4m3, `scale
    (1, n)`), the first `count` columns, float32; `m` at most 16."""
    rows, hidden = hidden_states.shape
    if rows > 16:
        raise ValueError(f"the kernel takes at most 16 rows, got {rows}")
    out = torch.empty(rows, count, dtype=torch.float32, device=hidden_states.device)
    grid = (triton.cdiv(count, block_n),)
    _fp8_head_kernel[grid](
        hidden_states, weight, scale, out, rows, count,
        hidden_states.stride(0), weight.stride(0), out.stride(0),
        HIDDEN=hidden, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128, FP32=os.environ.get("TRITON_INTERPRET") == "1",
    )  # fmt: skip
    return out


def check(device: str) -> dict:
    """The kernel against the dequantized head's product in float32, and the package's `fp8_logits` beside it."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 256, generator=generator)
    head = torch.randn(1000, 256, generator=generator) / 16
    weight, scale, count = fp8_rows_padded(head, device)
    hidden = hidden.to(device)
    exact = hidden.float() @ (weight.float() * scale.t())[:count].t()
    ours = fp8_head_product(hidden.to(torch.bfloat16), weight, scale, count)
    package = fp8_logits(hidden.to(torch.bfloat16), weight, scale, count).float()
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
    row["scaled_mm_us"] = per_call_us(lambda: fp8_logits(states, weight, scale, count))
    for block_n in (32, 64, 128):
        row[f"triton_{block_n}_us"] = per_call_us(lambda: fp8_head_product(states, weight, scale, count, block_n))
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
