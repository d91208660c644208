"""Writes each shipped mini-VLM draft's `eval_results.json` (the file its model card reads) from the speed
measurement of the training run, so that no card number is typed by hand.

    python benchmarks/train_write_eval_results.py results/train_mini_drafts_bench_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from specvlm_hf.hub import EVAL_RESULTS_FILE, EvalResults  # noqa: E402
from specvlm_hf.mini.drafts import DRAFT_NAMES, draft_path  # noqa: E402


def eval_results(bench: dict, name: str, date: str, default_mode: str = "tree") -> dict:
    """`eval_results.json` contents for draft `name` from a `train_bench_drafts.py` report."""
    modes = {}
    for mode in ("tree", "chain"):
        run = bench["runs"][f"{name}/{mode}"]
        modes[mode] = {
            "sigma": run["sigma"],
            "speedup": run["speedup"],
            "tokens_per_second": run["tokens_per_second"],
            "baseline_tokens_per_second": bench["plain_tokens_per_second"],
        }
    return {
        "sigma": modes[default_mode]["sigma"],
        "speedup": modes[default_mode]["speedup"],
        "device": bench["machine"],
        "dataset": f"{bench['prompts']} held-out prompts of the mini VLM's generated data (greedy)",
        "date": bench.get("date") or date,
        "dtype": bench["dtype"],
        "max_new_tokens": bench["max_new_tokens"],
        "temperature": 0.0,
        "modes": modes,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("bench", help="the JSON written by benchmarks/train_bench_drafts.py")
    parser.add_argument("--date", default=None, help="date of the measurement, when the report does not record it")
    args = parser.parse_args()
    with open(args.bench) as handle:
        bench = json.load(handle)
    if not (bench.get("date") or args.date):
        raise SystemExit(f"{args.bench} records no date: pass --date YYYY-MM-DD (the day it was measured)")
    for name in DRAFT_NAMES:
        results = eval_results(bench, name, args.date)
        EvalResults.from_dict(results)  # validate against the card's schema
        path = draft_path(name) / EVAL_RESULTS_FILE
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {path}: sigma {results['sigma']:.2f}, speedup {results['speedup']:.2f}x")


if __name__ == "__main__":
    main()
