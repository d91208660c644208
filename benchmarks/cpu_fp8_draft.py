"""What 8-bit floating-point draft weights would cost in acceptance, on the built-in mini VLM with its shipped draft.

The draft's eight tree levels a round are matrix products of about 10 rows: they read weights, and a 7B-shaped round
spends ~2.2 ms of its ~10 in them on an H100 (results/README.md), close to their weight-read floor. Weights in
float8 (e4m3, one scale per output row) would halve those bytes. The target is untouched, so outputs stay exact
whatever the draft's precision; what fp8 changes is which tokens the draft proposes. This script measures that on
the CPU by rounding, not by fp8 kernels: each of the draft's `nn.Linear` weights and the `lm_head` rows it reads are
rounded through float8 once, and (variant `w8a8`) each product's input too, per row, before every product, as an
fp8 GEMM with row-wise scales would see them; variant `fp8` runs `fp8_draft.use_fp8_products` instead, the module
swap `gpu_round_variants.py`'s `fp8_draft` variant times: real `torch._scaled_mm` products on the CPU, `fc` left as
it is); variant `fp8_head` is the package's `draft.use_fp8_head()`, the `lm_head` rows alone as e4m3 with real
`torch._scaled_mm` products). Sigma (tokens per target forward) in tree mode on held-out prompts
(the seed `specvlm bench` uses) and whether every output still equals plain `generate`. Whether fp8 products of 10
rows are faster on a GPU is `benchmarks/gpu_fp8_draft.py`'s question.

    python benchmarks/cpu_fp8_draft.py --prompts 64 --new-tokens 96 --out results/cpu_fp8_draft.json   # ~5 min
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import specvlm_hf  # noqa: E402
from specvlm_hf import SpecVLMDraftModel  # noqa: E402
from specvlm_hf.commands.bench import _mini_cases  # noqa: E402
from specvlm_hf.mini import load  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fp8_draft import quantize_rows, use_fp8_products  # noqa: E402
from mini_acceptance import add_arguments, held_out_acceptance, write_report  # noqa: E402


def through_fp8(values: torch.Tensor) -> torch.Tensor:
    """`values` rounded through float8 e4m3 with one scale per row (last dimension), back in their dtype."""
    rounded, scale = quantize_rows(values)
    return (rounded.to(values.dtype) * scale).to(values.dtype)


def round_draft(draft: SpecVLMDraftModel, activations: bool) -> int:
    """Rounds the draft's own `nn.Linear` weights and the `lm_head` rows it reads through fp8 (the target's own
    `lm_head` stays as it is: the draft gets a rounded copy); with `activations`, each product's input too. Returns
    how many products were rounded."""
    linears = [module for module in draft.modules() if type(module) is nn.Linear]
    with torch.no_grad():
        for module in linears:
            module.weight.copy_(through_fp8(module.weight))
            if activations:
                module.register_forward_pre_hook(lambda module, args: (through_fp8(args[0]), *args[1:]))
        head = draft._head_rows if draft._head_rows is not None else draft._target_modules[1].weight
        rounded_head = through_fp8(head.detach().clone())

    def lm_head(hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.to(rounded_head.dtype)
        return nn.functional.linear(through_fp8(hidden_states) if activations else hidden_states, rounded_head)

    draft.lm_head = lm_head
    return len(linears) + 1


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants", default="fp32,w8,w8a8,fp8,fp8_head", help="fp32, w8, w8a8, fp8, fp8_head (the docstring)"
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    target, processor = load()
    specvlm_hf.enable(target)
    start = time.perf_counter()
    held_out = _mini_cases(processor, args.prompts, "cpu", torch.float32)
    references = [target.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False) for inputs in held_out]
    print(f"references: {time.perf_counter() - start:.0f} s", flush=True)

    rows = []
    print("| draft | products rounded through fp8 | sigma | outputs equal plain |\n|---|---|---|---|")
    for variant in args.variants.split(","):
        if variant not in ("fp32", "w8", "w8a8", "fp8", "fp8_head"):
            raise SystemExit(f"unknown variant {variant!r}: fp32, w8, w8a8, fp8 or fp8_head")
        draft = SpecVLMDraftModel.from_pretrained(args.draft).bind_target(target).eval()
        draft.config.decoding_mode = "tree"
        if variant == "fp8":
            rounded = use_fp8_products(draft)
        elif variant == "fp8_head":
            rounded = 1
            draft.use_fp8_head()
        else:
            rounded = 0 if variant == "fp32" else round_draft(draft, activations=variant == "w8a8")
        row = {"draft": variant, "products_rounded": rounded}
        row.update(held_out_acceptance(target, draft, held_out, references, args.new_tokens))
        rows.append(row)
        print(f"| {variant} | {rounded} | {row['sigma']:.3f} | {row['outputs_equal_plain']} |", flush=True)
    machine = "CPU (tree mode, eager, fp8 by rounding or CPU fp8 products: acceptance only, no timing)"
    write_report(args.out, machine, args.draft, rows, held_out_prompts=args.prompts, new_tokens=args.new_tokens)


if __name__ == "__main__":
    main()
