"""Whether float8 products of a draft level's 10 rows are faster than bf16 ones on a GPU (issue 13).

A 7B-shaped round spends ~2.2 ms of its ~10 in the draft's products (results/README.md, H100 profile), each reading
a weight for about 10 rows, near the weight-read floor: only fewer bytes make them faster. This times, for each
product of a LLaVA-1.5-7B draft level (joined q/k/v and gate/up, as the fast path runs them), bf16 `F.linear`
against `torch._scaled_mm` on e4m3 weights with one scale per output row, the input quantized per row in the same
call (its amax, scale and cast counted), eager and compiled by inductor (which may fuse the quantization), each as
100 calls captured in one CUDA graph (microseconds a call). It also checks the fp8 product against the bf16 one
(relative error). The fp8 draft of `fp8_draft.py` runs q/k/v and gate/up as separate products (its `Fp8Linear`s
are not joined), so its round may gain less than these joined shapes suggest. `benchmarks/cpu_fp8_draft.py`
measures what such a draft costs in acceptance.

    python benchmarks/gpu_fp8_draft.py [--out FILE]      # ~1 min on an H100
    python benchmarks/gpu_fp8_draft.py --check           # the plumbing and errors only (CPU or GPU, no timing)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fp8_draft import fp8_linear, quantize_rows  # noqa: E402
from graph_timing import per_call_us  # noqa: E402

ROWS = 10  # a tree level's frontier
SHAPES = {  # product: (input width, output width), LLaVA-1.5-7B's draft layer, its fc and the target's lm_head
    "fc": (8192, 4096),
    "qkv (joined)": (4096, 12288),
    "o": (4096, 4096),
    "gate/up (joined)": (4096, 22016),
    "down": (11008, 4096),
    "lm_head": (4096, 32064),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--check", action="store_true", help="errors only, no timing")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    timing = device == "cuda" and not args.check
    compiled_linear = torch.compile(fp8_linear) if timing else fp8_linear
    compiled_bf16 = torch.compile(torch.nn.functional.linear) if timing else torch.nn.functional.linear
    generator = torch.Generator(device=device).manual_seed(0)
    rows, totals = [], {"bf16_us": 0.0, "fp8_us": 0.0, "fp8_compiled_us": 0.0}
    for name, (width_in, width_out) in SHAPES.items():
        x = torch.randn(ROWS, width_in, device=device, generator=generator).to(dtype)
        weight = (torch.randn(width_out, width_in, device=device, generator=generator) / width_in**0.5).to(dtype)
        weight_fp8, weight_scale = quantize_rows(weight)
        weight_scale = weight_scale.t().contiguous()  # (1, out)
        reference = torch.nn.functional.linear(x.float(), weight.float())
        got = fp8_linear(x, weight_fp8, weight_scale).float()
        row = {
            "product": name,
            "shape": [ROWS, width_in, width_out],
            "weight_MB_bf16": width_in * width_out * 2 / 1e6,
            "fp8_relative_error": ((got - reference).norm() / reference.norm()).item(),
        }
        if timing:
            row["bf16_us"] = per_call_us(lambda: torch.nn.functional.linear(x, weight))
            row["bf16_compiled_us"] = per_call_us(lambda: compiled_bf16(x, weight))
            row["fp8_us"] = per_call_us(lambda: fp8_linear(x, weight_fp8, weight_scale))
            row["fp8_compiled_us"] = per_call_us(lambda: compiled_linear(x, weight_fp8, weight_scale))
            for key in totals:
                totals[key] += row[key]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if timing:
        print(
            f"a draft level's products: bf16 {totals['bf16_us']:.1f} us, fp8 {totals['fp8_us']:.1f} us "
            f"(compiled {totals['fp8_compiled_us']:.1f}); eight levels a round: "
            f"{8 * (totals['bf16_us'] - min(totals['fp8_us'], totals['fp8_compiled_us'])) / 1000:.2f} ms saved",
            flush=True,
        )
    machine = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    if args.out:
        with open(args.out, "w") as f:
            report = {"machine": machine, "torch": torch.__version__, "rows": rows, "level_totals": totals}
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
