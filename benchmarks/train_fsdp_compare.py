"""The target sharded over two GPUs (`--shard-target`, FSDP2) against a whole target on one GPU: loss curves,
throughput, sigma, peak memory per GPU and the target's share of it.

    python benchmarks/train_fsdp_compare.py --out /tmp/fsdp              # a host with 2 GPUs, about 4 minutes
    python benchmarks/train_fsdp_compare.py --out /tmp/fsdp --dry-run    # CPU: 2 gloo processes (torchrun), tiny sizes

Sections (each runs in its own processes; a failure is recorded in the JSON and the next section still runs;
the JSON is rewritten after every run, so a cut-off run keeps what it finished):

1. `mini`: the built-in mini VLM (12.6 M-parameter target) and a fresh EagleVLM draft, the same generated data,
   seed and global batch in three runs: `1gpu_whole` (one process), `2gpu_sharded` (`accelerate launch`,
   2 processes, `--shard-target`) and `2gpu_replicated` (2 processes, DDP, a whole target on each). Loss curve
   (mean over processes), tokens/s, sigma after training (evaluated on the main process; with the sharded
   target the other process follows its forwards), peak memory per GPU, the target's bytes per GPU.
2. `scale`: a LLaVA-shaped target whose language model has LLaVA-1.5-7B's sizes (hidden 4096, 32 layers, MLP
   11008, bf16; deterministic stand-in weights: a draft trained on them learns nothing useful, what is measured
   is memory and speed) with the mini VLM's vision tower, tokenizer and data: `1gpu_whole` against
   `2gpu_sharded`, the same global batch, a short run without evaluation. The per-GPU share of the target's
   weights, memory after setup, peak memory per GPU, tokens/s.

Writes `--out/fsdp_compare.json` (machine, versions, date, every run's numbers), each run's log and `metrics.json`
under `--out`; the data, checkpoints and drafts (about 1 GB for the 7B-sized run's draft) go to `--work` (default: a
temporary folder), so that `--out` stays small.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
    }
    for name in ("torch", "transformers", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except Exception as error:  # noqa: BLE001
            info[name] = f"unavailable: {error}"
    try:  # nvidia-smi rather than torch.cuda: this parent process should not hold a CUDA context on GPU 0
        import torch

        info["cuda"] = torch.version.cuda
        try:
            query = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            info["gpus"] = [line.strip() for line in query.stdout.splitlines() if line.strip()]
        except Exception:  # noqa: BLE001
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        count = len(info["gpus"])
        info["machine"] = f"{count} x {info['gpus'][0]}" if count else f"CPU ({os.cpu_count()} cores)"
    except Exception as error:  # noqa: BLE001
        info["machine"] = f"unknown: {error}"
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
        info["git_dirty"] = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
        )
    except Exception as error:  # noqa: BLE001
        info["git_commit"] = f"unknown: {error}"
    return info


# ------------------------------------------------------------------------------------------------ launching
class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        if not args.work:
            import tempfile

            args.work = tempfile.mkdtemp(prefix="fsdp-compare-")
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.env = dict(
            os.environ,
            PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        if args.dry_run:
            self.env["OMP_NUM_THREADS"] = "1"  # several CPU processes on few cores
        self.result = {"environment": environment(), "args": vars(args), "sections": {}, "errors": []}

    def remaining(self) -> float:
        return self.args.budget_minutes * 60 - (time.perf_counter() - self.started)

    def write(self) -> None:
        path = self.out / "fsdp_compare.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        os.replace(tmp, path)

    def launch(self, processes: int, target: list[str]) -> list[str]:
        """The command running `target` (`-m module ...` or `script ...`) in `processes` processes."""
        if processes == 1:
            return [sys.executable] + target
        if self.args.dry_run:  # `accelerate launch --cpu` runs one process (several need mpirun): torchrun
            return [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(processes),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(free_port()),
            ] + target
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "bf16",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
        ] + target

    def run(self, name: str, command: list[str], timeout: float) -> dict:
        """Runs `command`, keeping its output in `out/name.log`; returns exit code, seconds and the output's tail."""
        log(f"{name}: {' '.join(command[:12])} ... (timeout {timeout:.0f} s)")
        start = time.perf_counter()
        try:
            done = subprocess.run(
                command, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 10), check=False
            )
            code, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as expired:
            code = "timeout"
            output = (
                (expired.stdout or b"").decode(errors="replace")
                if isinstance(expired.stdout, bytes)
                else (expired.stdout or "")
            )
            output += (
                (expired.stderr or b"").decode(errors="replace")
                if isinstance(expired.stderr, bytes)
                else (expired.stderr or "")
            )
        seconds = time.perf_counter() - start
        (self.out / f"{name}.log").write_text(output)
        log(f"{name}: exit {code} after {seconds:.1f} s")
        if code != 0:
            print(output[-3000:], flush=True)
        return {"exit": code, "seconds": seconds, "log_tail": output[-2500:]}

    def section(self, name: str, fn) -> None:
        log(f"=== section {name} ({self.remaining():.0f} s of the budget left)")
        try:
            self.result["sections"][name] = fn()
        except Exception:  # noqa: BLE001
            error = traceback.format_exc()
            print(error, flush=True)
            self.result["sections"].setdefault(name, {})["error"] = error
            self.result["errors"].append(f"{name}: {error.strip().splitlines()[-1]}")
        self.write()


def summarize(metrics: dict) -> dict:
    """Numbers of one run from its `metrics.json`."""
    entries = metrics.get("train", [])
    steady = entries[1:] or entries  # the first window includes start-up (compilation of kernels, data workers)
    summary = {
        "processes": metrics.get("processes"),
        "global_batch": metrics.get("global_batch"),
        "steps": entries[-1]["step"] if entries else 0,
        "tokens_per_second": sum(e["tokens_per_second"] for e in steady) / max(len(steady), 1),
        "steps_per_second": sum(e["steps_per_second"] for e in steady) / max(len(steady), 1),
        "loss_curve": [(e["step"], e["loss"]) for e in entries],
        "agreement_curve": [(e["step"], e["agreement"]) for e in entries],
        "target_weight_bytes": metrics.get("target_weight_bytes"),
        "peak_memory_bytes_per_process": metrics.get("peak_memory_bytes"),
    }
    if summary["target_weight_bytes"]:
        summary["target_weight_gib_per_process"] = summary["target_weight_bytes"]["per_process"] / GiB
    if summary["peak_memory_bytes_per_process"]:
        summary["peak_memory_gib_per_process"] = [b / GiB for b in summary["peak_memory_bytes_per_process"]]
    if metrics.get("eval"):
        last = metrics["eval"][-1]
        summary["sigma"] = last["sigma"]
        summary["depth_agreement"] = last["depth_agreement"]
        summary["eval_seconds"] = last["seconds"]
    return summary


def compare(runs: dict, base: str) -> dict:
    """Mean |loss difference| over common logged steps and the throughput ratio of each run against `base`."""
    out = {}
    reference = runs.get(base, {})
    for name, run in runs.items():
        if name == base or "loss_curve" not in run or "loss_curve" not in reference:
            continue
        theirs = dict(reference["loss_curve"])
        diffs = [abs(loss - theirs[step]) for step, loss in run["loss_curve"] if step in theirs]
        out[f"{name}_vs_{base}"] = {
            "mean_abs_loss_difference": sum(diffs) / max(len(diffs), 1),
            "common_points": len(diffs),
            "throughput_ratio": run["tokens_per_second"] / max(reference["tokens_per_second"], 1e-9),
        }
    return out


# ------------------------------------------------------------------------------------------------ sections
def mini_section(bench: Bench, data: Path, names: tuple) -> dict:
    args = bench.args
    common = [
        "-m",
        "specvlm_hf.cli",
        "train",
        "--data",
        str(data),
        "--eval-examples",
        str(args.eval_examples),
        "--eval-max-new-tokens",
        str(args.eval_tokens),
        "--eval-modes",
        "tree",
        "--eval-depths",
        "2",
        "--max-steps",
        str(args.steps),
        "--max-train-minutes",
        str(args.minutes),
        "--learning-rate",
        "3e-3",
        "--lr-scheduler",
        "constant",
        "--compressor",
        "none",
        "--save-steps",
        "0",
        "--log-steps",
        str(args.log_steps),
        "--num-workers",
        str(args.num_workers),
        "--no-progress-bar",
        "--device",
        "cpu" if args.dry_run else "cuda",
    ]
    plans = {
        "1gpu_whole": (1, ["--per-device-batch-size", str(args.batch)]),
        "2gpu_sharded": (2, ["--per-device-batch-size", str(args.batch // 2), "--shard-target"]),
        "2gpu_replicated": (2, ["--per-device-batch-size", str(args.batch // 2)]),
    }
    runs = dict(bench.result["sections"].get("mini", {}).get("runs", {}))
    for name, (processes, extra) in plans.items():
        if name not in names or name in args.skip:
            continue
        if bench.remaining() < 30:
            runs[name] = {"skipped": "out of the time budget"}
            continue
        folder = bench.work / "mini" / name
        command = bench.launch(processes, common + extra + ["--output-dir", str(folder)])
        outcome = bench.run(f"mini_{name}", command, timeout=min(bench.remaining(), args.minutes * 60 + 150))
        try:
            metrics = (folder / "metrics.json").read_text()
            (bench.out / f"mini_{name}_metrics.json").write_text(metrics)
            runs[name] = summarize(json.loads(metrics)) | outcome
        except Exception as error:  # noqa: BLE001
            runs[name] = outcome | {"error": f"no metrics: {error}"}
        bench.result["sections"]["mini"] = {"runs": runs}
        bench.write()
    print_runs("mini", runs)
    # against one process with a whole target, and against DDP with a whole target per GPU (the same split of
    # every global batch as the sharded run: its loss curve should match within float noise)
    return {"runs": runs, "comparison": compare(runs, "1gpu_whole") | compare(runs, "2gpu_replicated")}


def scale_section(bench: Bench, data: Path) -> dict:
    args = bench.args
    runs = {}
    for name, processes in (("1gpu_whole", 1), ("2gpu_sharded", 2)):
        if f"scale_{name}" in args.skip:
            continue
        if bench.remaining() < 30:
            runs[name] = {"skipped": "out of the time budget"}
            continue
        folder = bench.work / "scale" / name
        worker = (
            [
                str(Path(__file__).resolve()),
                "--worker",
                "scale",
                "--out",
                str(folder),
                "--data",
                str(data),
                "--batch",
                str(args.scale_batch // processes),
                "--steps",
                str(args.scale_steps),
                "--minutes",
                str(args.scale_minutes),
                "--num-workers",
                str(args.num_workers),
            ]
            + scale_size_args(args)
            + (["--dry-run"] if args.dry_run else [])
        )
        if processes > 1:
            worker.append("--shard")
        outcome = bench.run(
            f"scale_{name}",
            bench.launch(processes, worker),
            timeout=min(bench.remaining(), args.scale_minutes * 60 + 180),
        )
        try:
            metrics = (folder / "metrics.json").read_text()
            (bench.out / f"scale_{name}_metrics.json").write_text(metrics)
            run = summarize(json.loads(metrics))
            run["setup"] = json.loads((folder / "setup.json").read_text())
            runs[name] = run | outcome
        except Exception as error:  # noqa: BLE001
            runs[name] = outcome | {"error": f"no metrics: {error}"}
        bench.result["sections"]["scale"] = {"runs": runs}
        bench.write()
    print_runs("scale", runs)
    return {"runs": runs, "comparison": compare(runs, "1gpu_whole"), "sizes": scale_size_args(args)}


def print_runs(title: str, runs: dict) -> None:
    print(f"--- {title}")
    print(
        f"{'run':>16} {'exit':>7} {'steps':>6} {'tok/s':>10} {'last loss':>10} {'sigma':>6} "
        f"{'target GiB/GPU':>15} {'peak GiB per GPU':>20}"
    )
    for name, run in runs.items():
        loss = run.get("loss_curve", [(0, float("nan"))])[-1][1] if run.get("loss_curve") else float("nan")
        peak = " ".join(f"{g:.2f}" for g in run.get("peak_memory_gib_per_process") or [])
        print(
            f"{name:>16} {run.get('exit', '-')!s:>7} {run.get('steps', 0):>6} "
            f"{run.get('tokens_per_second', 0):>10.0f} {loss:>10.4f} "
            f"{(run.get('sigma') or {}).get('tree', float('nan')):>6.2f} "
            f"{run.get('target_weight_gib_per_process', float('nan')):>15.3f} {peak:>20}",
            flush=True,
        )


# ------------------------------------------------------------------------------------------------ scale worker
def scale_size_args(args) -> list[str]:
    return [
        "--hidden",
        str(args.hidden),
        "--layers",
        str(args.layers),
        "--intermediate",
        str(args.intermediate),
        "--heads",
        str(args.heads),
        "--kv-heads",
        str(args.kv_heads),
        "--dtype",
        args.dtype,
    ]


def stand_in_target(args):
    """The mini VLM's vision tower, projector input and vocabulary around a language model of the given sizes,
    built on the CPU without random initialisation (fast at 7B scale) and filled with a deterministic pattern."""
    import copy

    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    from specvlm_hf.mini import WEIGHTS_DIR

    config = AutoConfig.from_pretrained(WEIGHTS_DIR)
    text = copy.deepcopy(config.text_config)
    text.hidden_size, text.num_hidden_layers, text.intermediate_size = args.hidden, args.layers, args.intermediate
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = (
        args.heads,
        args.kv_heads,
        args.hidden // args.heads,
    )
    text.tie_word_embeddings = False
    config.text_config = text
    config.tie_word_embeddings = False
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator().manual_seed(0)
    block = (0.02 * torch.randn(4_000_037, generator=generator)).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.view(-1)
            if name.endswith("bias"):
                flat.zero_()
            elif param.dim() == 1:  # norm weights
                flat.fill_(1.0)
            else:
                for start in range(0, flat.numel(), block.numel()):
                    piece = flat[start : start + block.numel()]
                    piece.copy_(block[: piece.numel()])
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    return model.eval()


def scale_worker(args) -> None:
    import torch
    from transformers import AutoProcessor

    from specvlm_hf.mini import WEIGHTS_DIR
    from specvlm_hf.training import DistillConfig, DistillTrainer
    from specvlm_hf.training.data import load_records

    if args.dry_run:
        torch.set_num_threads(1)
    out = Path(args.out)
    built = time.perf_counter()
    target = stand_in_target(args)
    built = time.perf_counter() - built
    records = load_records(args.data)
    config = DistillConfig(
        data=args.data,
        output_dir=str(out),
        per_device_batch_size=args.batch,
        max_steps=args.steps,
        max_train_minutes=args.minutes,
        learning_rate=1e-4,
        save_steps=0,
        log_steps=max(args.steps // 4, 1),
        progress_bar=False,
        eval_each_epoch=False,
        num_workers=args.num_workers,
        shard_target=args.shard,
        device="cpu" if args.dry_run else "auto",
        target_dtype=args.dtype,
        max_length=512,
    )
    setup = time.perf_counter()
    trainer = DistillTrainer(
        config,
        target=target,
        processor=AutoProcessor.from_pretrained(WEIGHTS_DIR),
        train_records=records[:-4],
        eval_records=records[-4:],
    )
    setup = time.perf_counter() - setup
    accelerator = trainer.accelerator
    device = accelerator.device
    numbers = (
        [float(torch.cuda.memory_allocated(device)), float(torch.cuda.max_memory_allocated(device))]
        if device.type == "cuda"
        else [0.0, 0.0]
    )
    from specvlm_hf.training.sharding import target_memory

    share = target_memory(trainer.target)["per_process"]
    gathered = accelerator.gather(
        torch.tensor([numbers + [float(share)]], dtype=torch.float64, device=device)
    ).tolist()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "setup.json").write_text(
            json.dumps(
                {
                    "build_target_seconds": built,
                    "trainer_setup_seconds": setup,
                    "draft_parameters": sum(p.numel() for p in trainer.draft.parameters()),
                    "target_weight_bytes": target_memory(trainer.target),
                    "per_process": [
                        {
                            "allocated_after_setup_gib": a / GiB,
                            "peak_during_setup_gib": p / GiB,
                            "target_share_gib": s / GiB,
                        }
                        for a, p, s in gathered
                    ],
                },
                indent=1,
            )
        )
    trainer.save = lambda: None  # no checkpoints (the optimizer state of a 7B-sized draft is GBs); the draft is saved
    trainer.train()


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the JSON, logs and metrics (small)")
    parser.add_argument("--work", help="folder for data, checkpoints and drafts (default: a temporary folder)")
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, 2 gloo processes, tiny sizes: checks that every path runs"
    )
    parser.add_argument(
        "--budget-minutes", type=float, default=4.0, help="sections that would start after this are skipped"
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated runs to skip, e.g. 2gpu_replicated,scale_1gpu_whole"
    )
    # mini section
    parser.add_argument(
        "--examples", type=int, default=7000, help="generated examples (more than steps x batch: one epoch)"
    )
    parser.add_argument("--batch", type=int, default=64, help="global batch (mini)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--minutes", type=float, default=0.35, help="training budget of each mini run")
    parser.add_argument("--log-steps", type=int, default=10)
    parser.add_argument("--eval-examples", type=int, default=6)
    parser.add_argument("--eval-tokens", type=int, default=48)
    parser.add_argument("--num-workers", type=int, default=4)
    # scale section
    parser.add_argument("--scale-batch", type=int, default=16, help="global batch (scale)")
    parser.add_argument("--scale-steps", type=int, default=24)
    parser.add_argument("--scale-minutes", type=float, default=0.35)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    # internal: one process of a scale run
    parser.add_argument("--worker", choices=("scale",), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--shard", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "scale":
        return scale_worker(args)
    if args.dry_run:
        args.examples, args.batch, args.steps, args.minutes, args.log_steps = 40, 4, 3, 2.0, 1
        args.eval_examples, args.eval_tokens, args.num_workers = 2, 8, 0
        args.scale_batch, args.scale_steps, args.scale_minutes = 4, 2, 2.0
        args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads, args.dtype = 64, 2, 99, 4, 2, "float32"
        args.budget_minutes = max(args.budget_minutes, 10.0)
    args.skip = [s for s in args.skip.split(",") if s]
    bench = Bench(args)
    log(
        f"{bench.result['environment'].get('machine')}; torch {bench.result['environment'].get('torch')}, "
        f"transformers {bench.result['environment'].get('transformers')}, "
        f"accelerate {bench.result['environment'].get('accelerate')}"
    )
    if not args.dry_run:
        import torch

        if torch.cuda.device_count() < 2:  # NVML: no CUDA context
            bench.result["errors"].append(
                f"needs 2 GPUs, found {torch.cuda.device_count()} (use --dry-run on a CPU machine)"
            )
            bench.write()
            raise SystemExit(bench.result["errors"][-1])
    data = bench.work / "train"

    def make_data():
        from specvlm_hf.mini.data import write_dataset

        start = time.perf_counter()
        path = write_dataset(data, args.examples, seed=3, workers=min(os.cpu_count() or 1, 16))
        return {"path": str(path), "examples": args.examples, "seconds": time.perf_counter() - start}

    bench.section("data", make_data)
    if "error" in bench.result["sections"]["data"]:
        raise SystemExit("no data")
    path = data / "data.json"
    # in order of importance, in case the budget runs out: the sharded run and its baseline, the 7B-sized layers,
    # then the replicated (DDP) run for reference
    bench.section("mini", lambda: mini_section(bench, path, ("1gpu_whole", "2gpu_sharded")))
    bench.section("scale", lambda: scale_section(bench, path))
    bench.section("mini", lambda: mini_section(bench, path, ("2gpu_replicated",)))
    bench.result["seconds"] = time.perf_counter() - bench.started
    bench.write()
    summary = {
        name: section.get("comparison")
        for name, section in bench.result["sections"].items()
        if isinstance(section, dict)
    }
    print(
        json.dumps(
            {"comparisons": summary, "errors": bench.result["errors"], "seconds": bench.result["seconds"]},
            indent=1,
            default=str,
        )
    )
    log(f"wrote {bench.out / 'fsdp_compare.json'}")
    return 1 if bench.result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
