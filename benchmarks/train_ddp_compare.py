"""One GPU against two (DDP through `accelerate launch`) with the same global batch: loss curves and throughput.

    python benchmarks/train_ddp_compare.py --out /tmp/ddp                  # a host with 2 GPUs, ~3 minutes

Both runs train the SpecVLM draft (compressor on) of the mini VLM on the same generated data, seed and
global batch (1 GPU: `--batch` sequences per step; 2 GPUs: `--batch / 2` per GPU). Prints the two loss
curves side by side and the throughput (answer+prompt tokens per second over all GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--minutes", type=float, default=1.25, help="wall-clock budget of each run")
    parser.add_argument("--compressor", default="select")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    out = Path(args.out)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")
    from specvlm_hf.mini.data import write_dataset

    write_dataset(out / "train", args.examples, seed=3, workers=os.cpu_count() or 1)
    common = [
        "train",
        "--data",
        str(out / "train" / "data.json"),
        "--eval-examples",
        "8",
        "--no-eval-each-epoch",
        "--max-steps",
        str(args.steps),
        "--max-train-minutes",
        str(args.minutes),
        "--learning-rate",
        "3e-3",
        "--lr-scheduler",
        "constant",
        "--compressor",
        args.compressor,
        "--save-steps",
        "0",
        "--log-steps",
        "10",
        "--num-workers",
        "6",
        "--no-progress-bar",
        "--device",
        args.device,
    ]
    launches = {
        "1gpu": [sys.executable, "-m", "specvlm_hf.cli"] + common + ["--per-device-batch-size", str(args.batch)],
        "2gpu": [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "2",
            "--multi_gpu",
            "--num_machines",
            "1",
            "--mixed_precision",
            "bf16",
            "--dynamo_backend",
            "no",
            "-m",
            "specvlm_hf.cli",
        ]
        + common
        + ["--per-device-batch-size", str(args.batch // 2)],
    }
    metrics = {}
    for name, command in launches.items():
        command = command + ["--output-dir", str(out / name)]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        print(f"--- {name} (exit {result.returncode})\n{result.stdout[-1500:]}\n{result.stderr[-3000:]}", flush=True)
        metrics[name] = json.loads((out / name / "metrics.json").read_text())
    one, two = metrics["1gpu"]["train"], metrics["2gpu"]["train"]
    print(f"{'step':>5} {'loss 1 GPU':>11} {'loss 2 GPUs':>11} {'agree 1':>8} {'agree 2':>8}")
    for a, b in zip(one, two):
        print(f"{a['step']:>5} {a['loss']:>11.4f} {b['loss']:>11.4f} {a['agreement']:>8.3f} {b['agreement']:>8.3f}")
    summary = {}
    for name, entries in (("1gpu", one), ("2gpu", two)):
        steady = entries[1:] or entries  # the first window includes start-up
        summary[name] = {
            "processes": metrics[name]["processes"],
            "global_batch": metrics[name]["global_batch"],
            "steps": entries[-1]["step"],
            "tokens_per_second": sum(e["tokens_per_second"] for e in steady) / len(steady),
            "steps_per_second": sum(e["steps_per_second"] for e in steady) / len(steady),
            "loss_curve": [(e["step"], e["loss"]) for e in entries],
        }
    common_steps = min(len(one), len(two))
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(one[:common_steps], two[:common_steps])]
    summary["mean_abs_loss_difference"] = sum(diffs) / max(len(diffs), 1)
    summary["throughput_ratio_2gpu_over_1gpu"] = (
        summary["2gpu"]["tokens_per_second"] / summary["1gpu"]["tokens_per_second"]
    )
    try:
        import torch

        summary["machine"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    except Exception:
        pass
    (out / "ddp_compare.json").write_text(json.dumps(summary, indent=1))
    print(
        json.dumps(
            {k: v for k, v in summary.items() if k not in ("1gpu", "2gpu")}
            | {k: {kk: vv for kk, vv in summary[k].items() if kk != "loss_curve"} for k in ("1gpu", "2gpu")},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
