"""Round settings measured in one process, in turns (issue 13): the differences between settings without the noise
between processes.

`gpu_round_variants.py` runs each variant in a process of its own, and transformers' compiled token varied 6.5-9.3 ms
between processes on one machine (the rounds with it), which hides cuts of a few tenths of a millisecond. Here one
process builds the LLaVA-1.5-7B-shaped target once (random bf16, batch 1, default tree), warms every setting, then
measures them in turns, `--turns` times each, a compiled static-cache token of plain `generate` beside each round;
medians per setting. Settings (`--settings`, comma-separated, in this order):

- `shipped`: the package's defaults;
- `torch_topk`: `kernels.FUSED = False` (tree levels take `torch.topk`: the shipped round before 2026-12-06
  afternoon);
- `fp8_head`: a second draft on `use_fp8_head()` (the package's Triton head kernel);
- `fp8_head_scaled_mm`: that draft with `kernels.FP8_KERNEL = False` (torch's float8 GEMM, the quantized hidden
  states);
- `fp8_head_vocab8k`: a third draft scoring 8192 ids, on the fp8 head;
- `own_attention`: `kernels.ATTENTION = False` (the verify and draft forwards on the models' own attention, cuDNN's
  sdpa: the shipped round before 2026-12-06 evening); `verify_tree_attention`: only the verify forwards on the
  package's attention kernels.

The run of 2026-12-06 14:25 UTC (`results/gpu_round_ab_attention_h100.json`) named the attention settings as they were
before the kernels became the default: its `shipped` is today's `own_attention`, `tree_attention` today's
`verify_tree_attention`, `tree_attention_draft` today's `shipped`, and `tree_attention_fp8_vocab8k` today's
`fp8_head_vocab8k`.

`--fp32-check SETTING` then checks greedy fp32 equality with plain `generate` under that setting's switches (the tiny
LLaVA shape, 5 prompt lengths, compiled and graphed as the 7B round).

    python benchmarks/gpu_round_ab.py --out $OUT/ab.json

Settings not warm by `--warm-seconds` are left out (the JSON says which). The run of 2026-12-06 (H100,
`results/gpu_round_ab_h100.json`) also had `no_draft_ahead` and `before`: a loop that queued the next tree before the
host waited (`decoding.DRAFT_AHEAD`, since removed: it changed nothing measurable); a later run
(`gpu_round_ab_fp8_weights_h100.json`) had `fp8_all` and `fp8_all_vocab8k`, a draft whose own products also read fp8
copies of their weights (`use_fp8_weights`, since removed: it did not pay).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import gpu_long_running  # noqa: E402
from gpu_fast_path import plain_ms_per_token, tree_round  # noqa: E402
from specvlm_hf import SpecVLMDraftModel, kernels  # noqa: E402
from specvlm_hf import round as round_module  # noqa: E402
from specvlm_hf.verify_attention import TREE  # noqa: E402
from specvlm_hf.bench import software_versions  # noqa: E402

SETTINGS = (
    "shipped",
    "torch_topk",
    "fp8_head",
    "fp8_head_scaled_mm",
    "fp8_head_vocab8k",
    "own_attention",
    "verify_tree_attention",
)
DRAFT_OF = {  # setting -> (its draft, on the fp8 head: its vocabulary size or None)
    "fp8_head": ("fp8", None),
    "fp8_head_scaled_mm": ("fp8", None),
    "fp8_head_vocab8k": ("fp8_vocab8k", 8192),
}
SHIPPED = {
    "fused": kernels.FUSED,
    "fp8_kernel": kernels.FP8_KERNEL,
    "attention": kernels.ATTENTION,
    "verify_attention": round_module.VERIFY_ATTENTION,
}


def apply(name: str, drafts: dict):
    """Sets the package's switches for setting `name`; returns the draft it decodes with."""
    kernels.FUSED = SHIPPED["fused"] and name != "torch_topk"
    kernels.FP8_KERNEL = SHIPPED["fp8_kernel"] and name != "fp8_head_scaled_mm"
    kernels.ATTENTION = SHIPPED["attention"] and name not in ("own_attention", "verify_tree_attention")
    round_module.VERIFY_ATTENTION = TREE if name == "verify_tree_attention" else SHIPPED["verify_attention"]
    return drafts[DRAFT_OF[name][0]] if name in DRAFT_OF else drafts["plain"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--length", type=int, default=601)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--warm-seconds", type=float, default=400)
    parser.add_argument("--out", default="results/gpu_round_ab.json")
    parser.add_argument("--fp32-check", default="", help="a setting whose greedy fp32 equality to check at the end")
    args = parser.parse_args()
    names = [n for n in args.settings.split(",") if n]
    unknown = sorted(set(names + ([args.fp32_check] if args.fp32_check else [])) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown settings {unknown}: choose from {SETTINGS}")
    start = time.perf_counter()
    target, plain = gpu_long_running.build()
    drafts = {"plain": plain}
    for name in names:
        if name in DRAFT_OF and DRAFT_OF[name][0] not in drafts:
            key, vocab = DRAFT_OF[name]
            draft = SpecVLMDraftModel.from_target(target, **({"draft_vocab_size": vocab} if vocab else {}))
            drafts[key] = draft.use_fp8_head()
    inputs = gpu_long_running.make_inputs(args.length, torch.Generator().manual_seed(0))
    result = {
        **software_versions(),
        "shape": "LLaVA-1.5-7B (random weights, bf16, sdpa, batch 1, default tree)",
        "prompt_length": args.length,
        "new_tokens": args.new_tokens,
        "warm_seconds": {},
        "not_warm": [],
    }

    def write():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)

    plain_ms_per_token(target, inputs, args.new_tokens, cache_implementation="static")  # compiles transformers'
    warm = []
    for name in names:
        if time.perf_counter() - start > args.warm_seconds:
            result["not_warm"].append(name)
            continue
        began = time.perf_counter()
        tree_round(target, apply(name, drafts), inputs, args.new_tokens, cache_implementation="static")
        result["warm_seconds"][name] = time.perf_counter() - began
        warm.append(name)
        print(f"warm {name}: {result['warm_seconds'][name]:.1f} s", flush=True)
        write()
    turns = {name: {"round_ms": [], "token_ms": [], "draft_ms": [], "verify_ms": []} for name in warm}
    for turn in range(args.turns):
        for name in warm if turn % 2 == 0 else warm[::-1]:  # alternate the order: no setting always follows another
            draft = apply(name, drafts)
            token = plain_ms_per_token(target, inputs, args.new_tokens, cache_implementation="static")
            fast = tree_round(target, draft, inputs, args.new_tokens, cache_implementation="static")
            turns[name]["token_ms"].append(token)
            turns[name]["round_ms"].append(fast["median_ms_per_round"])
            turns[name]["draft_ms"].append(fast["draft_ms_per_round"])
            turns[name]["verify_ms"].append(fast["verify_ms_per_round"])
        print(f"turn {turn + 1} done at {time.perf_counter() - start:.0f} s", flush=True)
    apply("shipped", drafts)
    rows = {}
    for name, values in turns.items():
        round_ms = statistics.median(values["round_ms"])
        token_ms = statistics.median(values["token_ms"])
        rows[name] = {
            "round_ms": round_ms,
            "token_ms": token_ms,
            "round_over_token": round_ms / token_ms,
            "turns": values,
        }
    result["settings"] = rows
    result["token_ms_all_turns_median"] = statistics.median(v for t in turns.values() for v in t["token_ms"])
    result["total_seconds"] = time.perf_counter() - start
    write()
    token = result["token_ms_all_turns_median"]
    print(f"| setting | round (ms, median of {args.turns} turns) | its turns' tokens (ms) | round / all tokens |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['round_ms']:.2f} | {row['token_ms']:.2f} | {row['round_ms'] / token:.2f}x |")
    print(f"token over all turns: {token:.2f} ms", flush=True)
    if args.fp32_check:
        apply(args.fp32_check, drafts)  # module switches: the tiny target's fast path reads them too
        check = gpu_long_running.fp32_equality_rows((40, 300, 601, 900, 1500), args.new_tokens)
        apply("shipped", drafts)
        result["fp32_check"] = {"setting": args.fp32_check, **check}
        write()
        print(f"fp32 check ({args.fp32_check}): {sum(r['equal'] for r in check['rows'])}/{len(check['rows'])} equal")


if __name__ == "__main__":
    main()
