"""Train the mini VLM's default drafts (EagleVLM and SpecVLM with the compressor) and benchmark them.

    python benchmarks/train_mini_drafts.py --out /tmp/run                 # both drafts, the shipped EagleVLM recipe
    python benchmarks/train_mini_drafts.py --out /tmp/run --only specvlm --epochs 3 --minutes 5.8 --bench-prompts 16
                                                                          # the shipped SpecVLM recipe
    python benchmarks/train_mini_drafts.py --out /tmp/run --examples 400 --epochs 2 --batch 8 --device cpu  # dry run

1. writes generated training data (seed 3) and held-out data (seed 4) in LLaVA format;
2. runs `specvlm train` for both drafts at once (two processes on the same device), each evaluating sigma
   with the real decoder on held-out prompts after every epoch;
3. runs `train_bench_drafts.py` (plain greedy `generate` against both drafts in tree and chain mode) on
   other held-out prompts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--examples", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--minutes", type=float, default=4.0, help="wall-clock budget of each training run")
    parser.add_argument("--workers", type=int, default=6, help="data-loader workers per training run")
    parser.add_argument("--eval-prompts", type=int, default=12)
    parser.add_argument("--bench-prompts", type=int, default=24)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--extra", default="", help="extra `specvlm train` options for both runs")
    parser.add_argument(
        "--only",
        default=None,
        choices=["eaglevlm", "specvlm"],
        help="train this draft only; the bench then takes the other one from the shipped drafts",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")

    from specvlm_hf.mini.data import write_dataset

    start = time.perf_counter()
    write_dataset(out / "train", args.examples, seed=3, workers=os.cpu_count() or 1)
    write_dataset(out / "heldout", args.eval_prompts + args.bench_prompts, seed=4, workers=os.cpu_count() or 1)
    print(f"data written in {time.perf_counter() - start:.1f} s", flush=True)

    common = [
        "--data",
        str(out / "train" / "data.json"),
        "--eval-data",
        str(out / "heldout" / "data.json"),
        "--eval-examples",
        str(args.eval_prompts),
        "--eval-max-new-tokens",
        "64",
        "--eval-modes",
        "tree,chain",
        "--eval-before-training",
        "--num-epochs",
        str(args.epochs),
        "--per-device-batch-size",
        str(args.batch),
        "--learning-rate",
        str(args.lr),
        "--lr-scheduler",
        "cosine",
        "--warmup-steps",
        "50",
        "--max-grad-norm",
        "0.5",
        "--save-steps",
        "0",
        "--log-steps",
        "25",
        "--num-workers",
        str(args.workers),
        "--no-progress-bar",
        "--max-train-minutes",
        str(args.minutes),
        "--device",
        args.device,
    ] + args.extra.split()
    runs = {"eaglevlm": ["--compressor", "none"], "specvlm": ["--compressor", "select"]}
    if args.only:
        runs = {args.only: runs[args.only]}
    processes = {}
    for name, options in runs.items():
        log = open(out / f"{name}.log", "w")
        command = [sys.executable, "-m", "specvlm_hf.cli", "train", "--output-dir", str(out / name)] + common + options
        processes[name] = (subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    failed = False
    for name, (process, log) in processes.items():
        failed |= process.wait() != 0
        log.close()
        print(f"--- {name} (exit {process.returncode})\n" + (out / f"{name}.log").read_text()[-2500:], flush=True)
    print(f"training done in {time.perf_counter() - start:.1f} s", flush=True)
    if failed:
        sys.exit(1)
    from specvlm_hf.mini.drafts import draft_path

    drafts = {name: out / name / "draft" if name in runs else draft_path(name) for name in ("eaglevlm", "specvlm")}
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "train_bench_drafts.py"),
            "--drafts",
            f"eaglevlm={drafts['eaglevlm']}",
            f"specvlm={drafts['specvlm']}",
            "--data",
            str(out / "heldout" / "data.json"),
            "--skip",
            str(args.eval_prompts),
            "--prompts",
            str(args.bench_prompts),
            "--device",
            args.device,
            "--out",
            str(out / "bench.json"),
        ],
        env=env,
        check=True,
    )
    print(f"all done in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
