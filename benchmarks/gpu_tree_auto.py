"""`tree="auto"` on one GPU: the verify cost against tree width, the draft step, and the shapes chosen.

LLaVA-1.5-7B shape (random bf16 weights, sdpa, batch 1), one prompt of 700 tokens (an image and text). Times the
fast path's rounds at tree widths 16-80 (CUDA graphs over eager kernels, as `warmup(tree="auto")` measures), then
picks, for several draft acceptance rates `alpha`, the shape with the most modelled accepted tokens per
millisecond (`tree_auto.choose_tree`) and reports its modelled tokens per round, round milliseconds and tokens per
millisecond against EAGLE-2's (10, 7, 60). Random weights accept nothing, so `alpha` is given, not measured.

    python benchmarks/gpu_tree_auto.py --out results/tree_auto.json      # one H200, ~2 minutes
    python benchmarks/gpu_tree_auto.py --smoke --out /tmp/tree_auto.json # CPU miniature
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--smoke" in sys.argv:
    os.environ["TINY"] = "1"  # read by the helpers' module at import

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import specvlm_hf  # noqa: E402
from gpu_check_tree import llava_7b_shaped  # noqa: E402
from gpu_fast_path import DEVICE, DTYPE  # noqa: E402
from gpu_long_running import make_inputs  # noqa: E402
from specvlm_hf.bench import software_versions  # noqa: E402
from specvlm_hf import SpecVLMDraftModel  # noqa: E402
from specvlm_hf.tree_auto import PAPER_TREE, choose_tree, expected_accepted, interpolate, measure_costs  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--widths", default="16,32,48,60,80")
    parser.add_argument("--alphas", default="0.4,0.5,0.6,0.7,0.8")
    args = parser.parse_args()
    started = time.perf_counter()
    target = specvlm_hf.enable(llava_7b_shaped(DEVICE, DTYPE))
    draft = SpecVLMDraftModel.from_target(target)
    inputs = make_inputs(120 if args.smoke else 700, torch.Generator().manual_seed(0))
    widths = tuple(int(w) for w in args.widths.split(","))
    verify, draft_step_ms, _ = measure_costs(target, draft, inputs, widths=widths, disable_compile=True)
    verify_ms = interpolate(verify)

    def round_ms(top_k, depth, total):
        return (depth + 1) * draft_step_ms + verify_ms(total)

    choices = []
    for alpha in (float(a) for a in args.alphas.split(",")):
        shape = choose_tree(round_ms, alpha)
        row = {"alpha": alpha}
        for name, tree in (("chosen", shape), ("paper", PAPER_TREE)):
            tokens, ms = expected_accepted(tree, alpha), round_ms(*tree)
            row[name] = {"shape": list(tree), "tokens_per_round": tokens, "round_ms": ms, "tokens_per_ms": tokens / ms}
        row["gain_over_paper"] = row["chosen"]["tokens_per_ms"] / row["paper"]["tokens_per_ms"]
        choices.append(row)
        print(json.dumps(row), flush=True)
    results = {
        **software_versions(),
        "shape": "LLaVA-1.5-7B (random weights, bf16, sdpa, batch 1)" if not args.smoke else "tiny LLaVA (smoke)",
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "verify_ms_by_width": verify,
        "draft_ms_per_step": draft_step_ms,
        "choices": choices,
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps({k: results[k] for k in ("verify_ms_by_width", "draft_ms_per_step")}))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
