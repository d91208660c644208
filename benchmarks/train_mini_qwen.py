"""Train the Qwen2.5-VL-style mini target ("mini-qwen") and its EagleVLM draft, and measure both, on one GPU.

    python benchmarks/train_mini_qwen.py --out /tmp/out                  # one H200: about 8.5 minutes
    python benchmarks/train_mini_qwen.py --out /tmp/out --smoke          # tiny settings, end to end on a CPU
    python benchmarks/train_mini_qwen.py --install /tmp/out              # put a run's files into the package

1. writes the draft's training data (generated, seed 3) and held-out prompts (seed 4) in LLaVA format;
2. trains the target with `specvlm_hf.mini.train` (`architecture="qwen2_5_vl"`: Qwen's windowed vision tower
   with 2x2 patch merging, M-RoPE text model; the mini tokenizer plus Qwen's vision tokens) on generated data of
   seed 0, as the mini LLaVA was, within `--target-minutes`, and saves it in bfloat16 shards of <= 14 MB;
3. trains its EagleVLM draft with `specvlm train --target <folder>` within `--draft-minutes`, while the target's
   held-out evidence is measured (`specvlm_hf.mini.evaluate`: loss, loss with mismatched images, entropy, greedy
   accuracy on count / colour / position questions, on seed 1 as for the first mini target);
4. measures the draft on other held-out prompts with `benchmarks/train_bench_drafts.py` (greedy; tree and
   chain; sigma, speed-up, how many outputs are identical to plain `generate`).

Files left under `--out` (at most 7): the target's weight shards (`model-0000k-of-0000n.safetensors`), the draft's
`draft.safetensors`, `small_files.tar` (configs, processor, tokenizer, chat template, training summaries),
`mini_qwen.json` (every figure, machine and versions) and `train_mini_qwen.log`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_TARGET = ROOT / "specvlm_hf" / "mini" / "weights_qwen"
SHIPPED_DRAFT = ROOT / "specvlm_hf" / "mini" / "drafts" / "qwen_eaglevlm"
DRAFT_FILES = ("config.json", "generation_config.json")


def log(message: str, handle=None) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    if handle is not None:
        handle.write(line + "\n")
        handle.flush()


def target_options(args) -> list[str]:
    """`specvlm_hf.mini.train` options of the run (the smoke run shrinks everything)."""
    options = ["--architecture", "qwen2_5_vl", "--patch_size", "8", "--max_minutes", str(args.target_minutes)]
    if args.smoke:
        options += [
            "--num_train_examples", "300", "--tokenizer_examples", "300", "--vocab_size", "1024",
            "--hidden_size", "64", "--intermediate_size", "128", "--num_layers", "2", "--num_heads", "4",
            "--num_kv_heads", "2", "--vision_hidden_size", "32", "--vision_layers", "2", "--vision_heads", "2",
            "--batch_size", "16", "--max_steps", "6", "--warmup_steps", "2", "--log_every", "2", "--workers", "2",
        ]  # fmt: skip
    else:
        options += ["--num_train_examples", str(args.examples), "--max_steps", "9000", "--log_every", "250"]
        options += ["--num_layers", str(args.target_layers)]
    return options


def run_logged(command: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    handle = open(log_path, "w")
    process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    process.log_handle = handle
    return process


def finish(process: subprocess.Popen, name: str, log_path: Path, main_log) -> None:
    process.wait()
    process.log_handle.close()
    text = log_path.read_text()
    main_log.write(f"----- {name} (exit {process.returncode})\n{text}\n")
    print(f"----- {name} (exit {process.returncode}), last lines:\n{text[-2000:]}", flush=True)
    if process.returncode != 0:
        raise SystemExit(f"{name} failed (exit {process.returncode})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for the files to bring back (at most 7)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new one under the temp folder)")
    parser.add_argument("--smoke", action="store_true", help="tiny settings that run end to end on a CPU")
    parser.add_argument("--examples", type=int, default=200_000, help="target training examples")
    parser.add_argument(
        "--target-layers",
        type=int,
        default=8,
        help="text layers of the target (8: about 17 MB in bf16, so that the repository stays under the 64 MiB a "
        "GPU call of the device tool carries; the mini LLaVA has 12)",
    )
    parser.add_argument("--target-minutes", type=float, default=4.0)
    parser.add_argument("--draft-minutes", type=float, default=2.2)
    parser.add_argument("--draft-examples", type=int, default=12_000)
    parser.add_argument("--eval-prompts", type=int, default=12, help="held-out prompts for sigma during training")
    parser.add_argument("--bench-prompts", type=int, default=16, help="other held-out prompts for the final bench")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--install", default=None, help="copy a finished run's --out folder into the package")
    args = parser.parse_args(argv)
    if args.install:
        install(Path(args.install))
        return
    if not args.out:
        parser.error("--out is required")
    if args.smoke:
        args.target_minutes, args.draft_minutes = min(args.target_minutes, 0.5), min(args.draft_minutes, 0.3)
        args.draft_examples, args.eval_prompts, args.bench_prompts = 48, 2, 2
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    out = Path(args.out)
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="mini_qwen_"))
    for folder in (out, work):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    print(f"scratch folder: {work}", flush=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")
    main_log = open(out / "train_mini_qwen.log", "w")
    start = time.perf_counter()
    workers = os.cpu_count() or 1
    timings = {}

    # 1. the draft's data (the target trains on seed 0, the draft on seed 3, all held-out prompts come from seed 4)
    from specvlm_hf.mini.data import write_dataset

    write_dataset(work / "train", args.draft_examples, seed=3, workers=min(workers, 8))
    write_dataset(work / "heldout", args.eval_prompts + args.bench_prompts, seed=4, workers=1)
    timings["draft_data_seconds"] = time.perf_counter() - start
    log(f"draft data written ({timings['draft_data_seconds']:.1f} s)", main_log)

    # 2. the target
    target_dir = work / "weights_qwen"
    command = [sys.executable, "-m", "specvlm_hf.mini.train", "--output_dir", str(target_dir), "--device", device]
    finish(
        run_logged(command + target_options(args), work / "target.log", env), "target", work / "target.log", main_log
    )
    timings["target_done_seconds"] = time.perf_counter() - start
    log(f"target trained ({timings['target_done_seconds']:.1f} s)", main_log)

    # 3. the draft, while the target's held-out evidence is measured
    draft_command = [
        sys.executable, "-m", "specvlm_hf.cli", "train", "--target", str(target_dir),
        "--output-dir", str(work / "draft"), "--compressor", "none",
        "--data", str(work / "train" / "data.json"), "--eval-data", str(work / "heldout" / "data.json"),
        "--eval-examples", str(args.eval_prompts), "--eval-max-new-tokens", "64", "--eval-modes", "tree",
        "--num-epochs", "1" if args.smoke else "5", "--per-device-batch-size", "8" if args.smoke else "32",
        "--learning-rate", "3e-3", "--lr-scheduler", "cosine", "--warmup-steps", "2" if args.smoke else "50",
        "--max-grad-norm", "0.5", "--save-steps", "0", "--log-steps", "25",
        "--num-workers", "0" if args.smoke else "6", "--no-progress-bar",
        "--max-train-minutes", str(args.draft_minutes), "--device", device,
    ]  # fmt: skip
    draft_process = run_logged(draft_command, work / "draft.log", env)
    evaluate_command = [
        sys.executable, "-m", "specvlm_hf.mini.evaluate", "--model_dir", str(target_dir),
        "--out", str(work / "evaluation.json"), "--device", device,
    ] + (["--num_examples", "20", "--num_questions", "4"] if args.smoke else [])  # fmt: skip
    finish(run_logged(evaluate_command, work / "evaluate.log", env), "evaluate", work / "evaluate.log", main_log)
    timings["evaluation_done_seconds"] = time.perf_counter() - start
    finish(draft_process, "draft", work / "draft.log", main_log)
    timings["draft_done_seconds"] = time.perf_counter() - start
    log(f"draft trained ({timings['draft_done_seconds']:.1f} s)", main_log)

    # 4. the draft on other held-out prompts: sigma, speed-up, identical outputs (greedy, float32)
    bench_command = [
        sys.executable, str(ROOT / "benchmarks" / "train_bench_drafts.py"), "--target", str(target_dir),
        "--drafts", f"qwen_eaglevlm={work / 'draft' / 'draft'}", "--data", str(work / "heldout" / "data.json"),
        "--skip", str(args.eval_prompts), "--prompts", str(args.bench_prompts), "--modes", "tree,chain",
        "--max-new-tokens", "16" if args.smoke else "128", "--device", device, "--out", str(work / "bench.json"),
    ]  # fmt: skip
    finish(run_logged(bench_command, work / "bench.log", env), "bench", work / "bench.log", main_log)
    timings["total_seconds"] = time.perf_counter() - start

    # 5. the files to bring back
    import transformers

    train_summary = json.loads((target_dir / "train_config.json").read_text())
    bench = json.loads((work / "bench.json").read_text())
    draft_metrics = json.loads((work / "draft" / "metrics.json").read_text())
    results = {
        "what": "mini-qwen: a Qwen2.5-VL-style mini target trained from scratch on the mini data, its EagleVLM draft",
        "machine": torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "timings": timings,
        "target_training": train_summary,
        "target_heldout": json.loads((work / "evaluation.json").read_text()),
        "draft_training": {k: draft_metrics.get(k) for k in ("epochs", "sigma_by_epoch", "final", "steps", "config")},
        "draft_bench": bench,
    }
    (out / "mini_qwen.json").write_text(json.dumps(results, indent=1) + "\n")
    eval_results = {
        "sigma": bench["runs"]["qwen_eaglevlm/tree"]["sigma"],
        "speedup": bench["runs"]["qwen_eaglevlm/tree"]["speedup"],
        "device": results["machine"],
        "dataset": f"{bench['prompts']} held-out prompts of the mini data (seed 4, greedy)",
        "date": results["date"][:10],
        "dtype": bench["dtype"],
        "max_new_tokens": bench["max_new_tokens"],
        "temperature": 0.0,
        "modes": {key.split("/")[1]: run for key, run in bench["runs"].items()},
    }
    (work / "draft" / "draft" / "eval_results.json").write_text(json.dumps(eval_results, indent=1) + "\n")
    for shard in sorted(target_dir.glob("*.safetensors")):
        shutil.copy(shard, out / shard.name)
    shutil.copy(work / "draft" / "draft" / "model.safetensors", out / "draft.safetensors")
    with tarfile.open(out / "small_files.tar", "w") as tar:
        for path in sorted(target_dir.iterdir()):
            if path.suffix != ".safetensors":
                tar.add(path, arcname=f"weights_qwen/{path.name}")
        for name in (*DRAFT_FILES, "eval_results.json"):
            tar.add(work / "draft" / "draft" / name, arcname=f"qwen_eaglevlm/{name}")
        for name in ("metrics.json", "target.log", "draft.log", "evaluate.log", "bench.log"):
            source = work / "draft" / name if name == "metrics.json" else work / name
            if source.exists():
                tar.add(source, arcname=f"logs/{name}")
    main_log.close()
    files = sorted(p.name for p in out.iterdir())
    sizes = {name: (out / name).stat().st_size for name in files}
    print(json.dumps({"files": sizes, "timings": timings}, indent=1))
    print(
        f"tree sigma {eval_results['sigma']:.2f}, identical "
        f"{bench['runs']['qwen_eaglevlm/tree']['identical_to_plain']}; held-out loss "
        f"{results['target_heldout']['heldout_loss']['all']:.3f}; total {timings['total_seconds']:.0f} s"
    )
    if len(files) > 7 or max(sizes.values()) > 14_500_000:
        raise SystemExit(f"too many or too large files under {out}: {sizes}")


def install(run: Path) -> None:
    """Unpacks a run's `--out` folder into the package (`specvlm_hf/mini/weights_qwen`, `drafts/qwen_eaglevlm`)
    and `results/`, writing the draft folder as `save_pretrained` does (remote code, `custom_generate/`)."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        with tarfile.open(run / "small_files.tar") as tar:
            tar.extractall(scratch, filter="data")
        scratch = Path(scratch)
        shutil.rmtree(SHIPPED_TARGET, ignore_errors=True)
        shutil.copytree(scratch / "weights_qwen", SHIPPED_TARGET)
        for shard in run.glob("model*.safetensors"):
            shutil.copy(shard, SHIPPED_TARGET / shard.name)
        shutil.rmtree(SHIPPED_DRAFT, ignore_errors=True)
        shutil.copytree(scratch / "qwen_eaglevlm", SHIPPED_DRAFT)
        shutil.copy(run / "draft.safetensors", SHIPPED_DRAFT / "model.safetensors")
        config = json.loads((SHIPPED_DRAFT / "config.json").read_text())
        config["target"]["name_or_path"] = "specvlm_hf.mini (built-in mini-qwen)"
        (SHIPPED_DRAFT / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if (scratch / "logs" / "metrics.json").exists():
            shutil.copy(scratch / "logs" / "metrics.json", ROOT / "results" / "train_mini_qwen_draft_metrics.json")
    shutil.copy(run / "mini_qwen.json", ROOT / "results" / "mini_qwen.json")
    shutil.copy(run / "train_mini_qwen.log", ROOT / "results" / "train_mini_qwen.log")
    from specvlm_hf.mini.drafts import refresh_shipped_files

    refresh_shipped_files()
    total = sum(p.stat().st_size for p in SHIPPED_TARGET.iterdir()) + sum(
        p.stat().st_size for p in SHIPPED_DRAFT.rglob("*") if p.is_file()
    )
    print(f"installed into {SHIPPED_TARGET} and {SHIPPED_DRAFT} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
