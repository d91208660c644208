"""Draft-training throughput at 7B scale on one GPU: steady-state tokens/s, where a step's time goes, peak memory
and MFU, through `DistillTrainer.train` itself.

    python benchmarks/train_throughput.py --out /tmp/tp                          # one GPU, about 4 minutes
    python benchmarks/train_throughput.py --out /tmp/tp --baseline-src OLD       # also the trainer of another checkout
    python benchmarks/train_throughput.py --out /tmp/tp --tiny                   # CPU, tiny shapes: every path runs

Targets are built from configs with random bf16 weights, straight on the GPU (no checkpoint needed):

- `llava15-7b`: LLaVA-1.5-7B (Llama-2-7B language model: hidden 4096, 32 layers, MLP 11008, vocabulary 32064;
  CLIP ViT-L/14-336 vision tower, features of its second-to-last layer; two-layer GELU projector);
- `qwen25vl-7b-text`: the language model of Qwen2.5-VL-7B (Qwen2: hidden 3584, 28 layers, MLP 18944, 28 query /
  4 KV heads, vocabulary 152064) behind the same CLIP-L-336 tower in a LLaVA wrapper. Qwen2.5-VL's own ViT and
  M-RoPE are not modelled (the trainer takes LLaVA-style targets); what this shape adds is the 152k-token
  vocabulary, over which the soft cross-entropy runs for every answer token.

Synthetic conversations with LLaVA-1.5's layout: `<s> USER: <image>` (576 visual tokens) + a question + `ASSISTANT:`
+ an answer; 100-400 text tokens in all (uniform), 30% of the text after the prefix is question, the rest answer
(the loss rows); one random 640x480 picture per example goes through CLIP's image processor in the data loader.

Each configuration trains a fresh EagleVLM draft (one decoder layer) with `DistillTrainer.train` for
`--warmup-steps` + `--steps` optimizer steps; steady state is the steps after the warm-up. Reported: tokens/s
(every real token, visual ones included, as the trainer counts them), the step's time split (teacher forward,
draft forward + loss + backward, optimizer, data wait; `StepTimer`), peak GPU memory, and MFU: the model FLOPs of
the teacher's forward (vision tower, projector, language model) and of the draft's forward and backward (its
layer, `fc`, and the `lm_head` products of the soft cross-entropy) over the step's wall time, against 790 TFLOP/s
(the dense bf16 matrix rate measured on an H200; the run measures it again) and the 989 TFLOP/s datasheet peak.
Padding is not counted as work.

Writes `--out/train_throughput.json` after every process (machine, versions, every number) and
`--out/train_throughput.log` (every process's output), and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3
PEAK_MEASURED_H200 = 790e12  # dense bf16, 8192^3 products on random data, this workplace's H200s (2026-10/11)
PEAK_DATASHEET_H200 = 989e12

SHAPES = {
    "llava15-7b": dict(
        text="llama",
        hidden=4096,
        layers=32,
        intermediate=11008,
        heads=32,
        kv_heads=32,
        vocab=32064,
        image_token=32000,
        rope_theta=10000.0,
    ),
    "qwen25vl-7b-text": dict(
        text="qwen2",
        hidden=3584,
        layers=28,
        intermediate=18944,
        heads=28,
        kv_heads=4,
        vocab=152064,
        image_token=151655,
        rope_theta=1e6,
    ),
}
CLIP_L_336 = dict(hidden=1024, layers=24, intermediate=4096, heads=16, image=336, patch=14)
TINY_SHAPES = {
    "llava15-7b": dict(
        text="llama",
        hidden=64,
        layers=2,
        intermediate=128,
        heads=4,
        kv_heads=4,
        vocab=512,
        image_token=500,
        rope_theta=10000.0,
    ),
    "qwen25vl-7b-text": dict(
        text="qwen2",
        hidden=56,
        layers=2,
        intermediate=112,
        heads=4,
        kv_heads=2,
        vocab=1024,
        image_token=1000,
        rope_theta=1e6,
    ),
}
TINY_CLIP = dict(hidden=32, layers=2, intermediate=64, heads=2, image=56, patch=14)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ the target
def build_target(shape: dict, vision: dict, device, dtype):
    """A LLaVA-style target with the given sizes, random weights (std 0.02, norms 1), made on `device` in `dtype`
    without transformers' per-module initialisation (seconds, not minutes, at 7B)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config
    from transformers.initialization import no_init_weights

    common = dict(
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        intermediate_size=shape["intermediate"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        vocab_size=shape["vocab"],
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    common["rope_parameters"] = {"rope_type": "default", "rope_theta": shape["rope_theta"]}
    text = LlamaConfig(**common) if shape["text"] == "llama" else Qwen2Config(**common, use_sliding_window=False)
    vision_config = CLIPVisionConfig(
        hidden_size=vision["hidden"],
        intermediate_size=vision["intermediate"],
        num_hidden_layers=vision["layers"],
        num_attention_heads=vision["heads"],
        image_size=vision["image"],
        patch_size=vision["patch"],
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    visual_tokens = (vision["image"] // vision["patch"]) ** 2
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text,
        image_token_index=shape["image_token"],
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=visual_tokens,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init_weights():
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:  # norm weights (and CLIP's class embedding)
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model.eval(), visual_tokens


class StubTokenizer:
    pad_token_id = 0
    eos_token_id = 2


class StubProcessor:
    """What `DistillTrainer` reads from a processor when the examples come ready-made (pad and EOS ids)."""

    tokenizer = StubTokenizer()


# ------------------------------------------------------------------------------------------------ the data
class SyntheticConversations:
    """`encode_record`-shaped examples with LLaVA-1.5's layout (see the module docstring); deterministic per index."""

    PREFIX, ROLE = 5, 4  # "<s> USER: " before the image, " ASSISTANT:" before the answer

    def __init__(
        self, size: int, shape: dict, visual_tokens: int, image_size: int, text_range=(100, 400), seed: int = 0
    ):
        self.size, self.shape, self.visual_tokens = size, shape, visual_tokens
        self.image_size, self.text_range, self.seed = image_size, text_range, seed
        self._processor = None

    def __len__(self) -> int:
        return self.size

    def layout(self, index: int) -> tuple[int, int, int]:
        """(prompt tokens before the answer, answer tokens, total) of example `index`."""
        import numpy as np

        rng = np.random.default_rng([self.seed, index])
        text = int(rng.integers(self.text_range[0], self.text_range[1] + 1))
        question = max(1, round(0.3 * (text - self.PREFIX - self.ROLE)))
        answer = max(1, text - self.PREFIX - self.ROLE - question)
        prompt = self.PREFIX + self.visual_tokens + question + self.ROLE
        return prompt, answer, prompt + answer

    def image_processor(self):
        if self._processor is None:
            from transformers import CLIPImageProcessor

            side = self.image_size
            self._processor = CLIPImageProcessor(
                size={"shortest_edge": side}, crop_size={"height": side, "width": side}
            )
        return self._processor

    def __getitem__(self, index: int) -> dict:
        import numpy as np
        import torch
        from PIL import Image

        prompt, answer, total = self.layout(index)
        rng = np.random.default_rng([self.seed, index, 1])
        ids = rng.integers(3, self.shape["image_token"], size=total)
        ids[0] = 1
        ids[self.PREFIX : self.PREFIX + self.visual_tokens] = self.shape["image_token"]
        ids[-1] = 2  # the answer's EOS
        labels = np.zeros(total, dtype=bool)
        labels[prompt:] = True
        picture = Image.fromarray(rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8))
        pixels = self.image_processor()(images=picture, return_tensors="pt")["pixel_values"]
        return {
            "input_ids": torch.from_numpy(ids).long(),
            "labels": torch.from_numpy(labels),
            "pixel_values": pixels,
            "image_sizes": None,
        }


# ------------------------------------------------------------------------------------------------ FLOPs
def layer_params(shape: dict) -> int:
    d, head_dim = shape["hidden"], shape["hidden"] // shape["heads"]
    attention = d * (shape["heads"] + 2 * shape["kv_heads"]) * head_dim + shape["heads"] * head_dim * d
    return attention + 3 * d * shape["intermediate"]


def example_flops(shape: dict, vision: dict, total: int, answer: int) -> dict:
    """Model FLOPs of one example (one image): multiply-adds count 2; causal attention counts half of n^2."""
    d, layers = shape["hidden"], shape["layers"]
    lm = (
        2 * layer_params(shape) * layers * total + 2 * total * total * d * layers + 2 * shape["vocab"] * d
    )  # logits_to_keep=1
    v, v_layers = vision["hidden"], vision["layers"] - 1  # features of the second-to-last layer
    n_v = (vision["image"] // vision["patch"]) ** 2 + 1
    vision_layer = 4 * v * v + 2 * v * vision["intermediate"]
    visual = (2 * vision_layer * n_v + 4 * n_v * n_v * v) * v_layers + 2 * (n_v - 1) * 3 * vision["patch"] ** 2 * v
    visual += 2 * (n_v - 1) * (v * d + d * d)  # projector
    pairs = total - 1
    draft_layer = 2 * layer_params(shape) * pairs + 2 * pairs * pairs * d
    fc = 2 * (2 * d * d) * pairs
    head = 2 * shape["vocab"] * d * answer  # one (rows, d) x (d, V) product
    return {
        "teacher_forward": lm + visual,
        "draft_forward": draft_layer + fc + 2 * head,  # the draft's logits and the teacher's logits on the loss rows
        "draft_backward": 2 * draft_layer + fc + head,  # fc: weight gradient only; lm_head: input gradient only
    }


# ------------------------------------------------------------------------------------------------ one process
def peak_worker(args) -> dict:
    import torch

    n = 8192
    a, b = (
        torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
        torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
    )
    for _ in range(3):
        a @ b
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    times.sort()
    return {
        "bf16_matmul_8192_tflops_median": 2 * n**3 / times[len(times) // 2] / 1e12,
        "gpu": torch.cuda.get_device_name(),
    }


def train_worker(args) -> dict:
    """Builds one target and runs each configuration of `args.configs` on it with a fresh draft."""
    import dataclasses

    import torch

    from specvlm_hf.training import DistillConfig, DistillTrainer

    try:
        from specvlm_hf.training.step_timer import StepTimer
    except ImportError:  # a checkout from before the timer (--baseline-src)
        StepTimer = None
    import specvlm_hf

    tiny = args.tiny
    device = "cpu" if tiny else "cuda"
    shape = (TINY_SHAPES if tiny else SHAPES)[args.shape]
    vision = TINY_CLIP if tiny else CLIP_L_336
    if tiny:
        torch.set_num_threads(1)
    started = time.perf_counter()
    target, visual_tokens = build_target(shape, vision, device, torch.float32 if tiny else torch.bfloat16)
    if not tiny:
        torch.cuda.synchronize()
    built = time.perf_counter() - started
    log(
        f"{args.shape}: target built in {built:.1f} s "
        f"({sum(p.numel() for p in target.parameters()) / 1e9:.2f} B parameters)"
    )
    text_range = (10, 40) if tiny else (100, 400)
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    outcomes = []
    for run in json.loads(args.configs):
        outcome = {"run": run, "shape": args.shape, "code": specvlm_hf.__file__, "target_build_seconds": built}
        try:
            outcome |= train_one(
                run,
                target,
                shape,
                vision,
                visual_tokens,
                text_range,
                device,
                DistillConfig,
                DistillTrainer,
                StepTimer,
                fields,
                args,
            )
        except Exception:  # noqa: BLE001
            outcome["error"] = traceback.format_exc()
            print(outcome["error"], flush=True)
        outcomes.append(outcome)
        Path(args.result).write_text(json.dumps(outcomes, indent=1, default=str))
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return outcomes


def train_one(
    run,
    target,
    shape,
    vision,
    visual_tokens,
    text_range,
    device,
    DistillConfig,
    DistillTrainer,
    StepTimer,
    fields,
    args,
):
    import tempfile

    import torch

    batch, accum = run["batch"], run["accum"]
    warmup, steps = run.get("warmup", args.warmup_steps), run.get("steps", args.steps)
    global_batch = batch * accum
    size = (warmup + steps) * global_batch
    dataset = SyntheticConversations(size, shape, visual_tokens, vision["image"], text_range)
    data_start = time.perf_counter()
    for i in range(8):
        dataset[i]
    data_ms = (time.perf_counter() - data_start) / 8 * 1000
    settings = dict(
        data="synthetic",
        output_dir=tempfile.mkdtemp(prefix="tp-"),
        per_device_batch_size=batch,
        gradient_accumulation_steps=accum,
        max_steps=warmup + steps,
        learning_rate=8e-5,
        save_steps=0,
        log_steps=1,
        progress_bar=False,
        eval_each_epoch=False,
        num_workers=run.get("workers", 0),
        target_dtype="float32" if device == "cpu" else "bfloat16",
        max_length=4096,
        device=device,
        compressor=run.get("compressor", "none"),
        seed=0,
    )
    if "loss_chunk_rows" in run and "loss_chunk_rows" in fields:
        settings["loss_chunk_rows"] = run["loss_chunk_rows"]
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = DistillTrainer(
        DistillConfig(**settings),
        target=target,
        processor=StubProcessor(),
        train_records=[record] * size,
        eval_records=[record] * 2,
    )
    trainer.train_set = dataset  # ready-made examples (the records above only size the epoch)
    trainer.save = lambda: None  # no checkpoints: the optimizer state of a 7B-sized draft is GBs
    trainer.draft.save_pretrained = lambda *args, **kwargs: None  # nor the final draft (1 GB of random weights)
    trainer.timer = StepTimer(trainer.accelerator.device) if StepTimer is not None else None
    draft_parameters = sum(p.numel() for p in trainer.draft.parameters())
    log(
        f"  {run['name']}: batch {batch} x {accum}, {warmup} + {steps} steps, "
        f"{draft_parameters / 1e6:.0f} M draft parameters"
    )
    metrics = trainer.train()
    entries = metrics["train"]
    if not steps:  # a kernel warm-up pass (see `default_plan`): nothing to report but its time
        return {
            "kernel_warmup_only": True,
            "seconds": sum(1 / e["steps_per_second"] for e in entries),
            "step_seconds": [1 / e["steps_per_second"] for e in entries],
        }
    measured = entries[warmup:]
    seconds = sum(1 / e["steps_per_second"] for e in measured)
    tokens = sum(e["tokens_per_second"] / e["steps_per_second"] for e in measured)
    # the examples of the measured steps, from the trainer's own order
    micro = list(trainer._batches(0, 0))[warmup * accum : (warmup + steps) * accum]
    flops = {"teacher_forward": 0, "draft_forward": 0, "draft_backward": 0}
    real = padded = answer_rows = 0
    for indices in micro:
        layouts = [dataset.layout(i) for i in indices]
        padded += len(layouts) * max(t for _, _, t in layouts)
        for _, answer, total in layouts:
            real += total
            answer_rows += answer
            for key, value in example_flops(shape, vision, total, answer).items():
                flops[key] += value
    total_flops = sum(flops.values())
    result = {
        "steps_measured": len(measured),
        "global_batch": global_batch,
        "seconds_measured": seconds,
        "tokens_per_second": tokens / seconds,
        "seconds_per_step": seconds / max(len(measured), 1),
        "tokens_per_step": tokens / max(len(measured), 1),
        "answer_rows_per_step": answer_rows / max(len(measured), 1),
        "padding_fraction": 1 - real / max(padded, 1),
        "draft_parameters": draft_parameters,
        "data_ms_per_example_main_process": data_ms,
        "model_flops_per_step": {k: v / max(len(measured), 1) for k, v in flops.items()},
        "model_tflops_per_second": total_flops / seconds / 1e12,
        "mfu_vs_790": total_flops / seconds / PEAK_MEASURED_H200,
        "mfu_vs_989": total_flops / seconds / PEAK_DATASHEET_H200,
        "teacher_only_tflops_per_second_of_step": flops["teacher_forward"] / seconds / 1e12,
        "loss_curve": [(e["step"], e["loss"]) for e in entries],
        "step_seconds": [1 / e["steps_per_second"] for e in entries],
        "warmup_seconds": sum(1 / e["steps_per_second"] for e in entries[:warmup]),
    }
    if abs(real - tokens) > 0.5:
        result["warning"] = f"counted {real} real tokens in the measured steps, the trainer {tokens}"
    if trainer.timer is not None:
        phases = trainer.timer.summary(first_step=warmup)
        per_step = {k: v / max(phases["steps"], 1) for k, v in phases["seconds"].items()}
        result["phase_seconds_per_step"] = per_step
        result["phase_share_of_step"] = {k: v / result["seconds_per_step"] for k, v in per_step.items()}
        gpu = sum(v for k, v in per_step.items() if k != "data")
        result["gpu_phases_share_of_step"] = gpu / result["seconds_per_step"]
        if per_step.get("teacher"):
            result["teacher_forward_tflops_per_second"] = (
                flops["teacher_forward"] / len(measured) / per_step["teacher"] / 1e12
            )
        if per_step.get("draft"):
            draft_flops = (flops["draft_forward"] + flops["draft_backward"]) / len(measured)
            result["draft_tflops_per_second"] = draft_flops / per_step["draft"] / 1e12
    if device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / GiB
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
    if run.get("profile"):
        result["profile"] = profile_step(trainer, accum, device)
        print(result["profile"], flush=True)
    del trainer
    return result


def profile_step(trainer, accum: int, device: str) -> str:
    """torch.profiler's table of one more optimizer step (the first step's micro-batches), top kernels by GPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    trainer.timer = None
    micro = list(trainer._batches(0, 0))[:accum]
    batches = [trainer._to_device(batch) for batch in trainer._loader(trainer.train_set, micro)]
    trainer.train_step(batches)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        trainer.train_step(batches)
        if device == "cuda":
            torch.cuda.synchronize()
    averages = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            return averages.table(sort_by=key, row_limit=40, max_name_column_width=90)
        except Exception:  # noqa: BLE001  (the key's name differs between torch versions)
            continue
    return averages.table(row_limit=40)


# ------------------------------------------------------------------------------------------------ driver
def environment() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    for name in ("torch", "transformers", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except Exception as error:  # noqa: BLE001
            info[name] = f"unavailable: {error}"
    try:
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        info["gpus"] = [line.strip() for line in query.stdout.splitlines() if line.strip()]
    except Exception:  # noqa: BLE001
        info["gpus"] = []
    info["machine"] = f"{len(info['gpus'])} x {info['gpus'][0]}" if info["gpus"] else f"CPU ({os.cpu_count()} cores)"
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    info["git_commit"] = commit or "unknown (no git checkout)"
    return info


def default_plan(tiny: bool, baseline: bool) -> list[dict]:
    """(code, shape, configurations) in order of importance; one process builds one target for its configurations.

    Each process starts with a kernel warm-up pass over the micro-batches that its configurations will measure:
    PyTorch's cuDNN attention builds a kernel for every new sequence length (more slowly on a fresh machine). A
    real run pays that once per length in its first few hundred micro-batches; steady state is after it. Without
    the pass, the first configuration of the first process measured half the steady-state rate on an H200, and the
    first configuration of later processes about 80% of it.
    """
    b, accum = (2, 2) if tiny else (16, 4)
    workers = 0 if tiny else 4
    warm = {"name": "kernel-warmup", "batch": b, "accum": accum, "workers": workers, "warmup": 4, "steps": 0}
    plan = [
        (
            "new",
            "llava15-7b",
            [
                dict(warm, name="llava15-7b_kernel-warmup"),
                {"name": "llava15-7b", "batch": b, "accum": accum, "workers": workers},
                {"name": "llava15-7b_batch32", "batch": 2 * b, "accum": accum // 2, "workers": workers},
                {"name": "llava15-7b_no-workers", "batch": b, "accum": accum, "workers": 0},
            ],
        ),
        (
            "new",
            "qwen25vl-7b-text",
            [
                dict(warm, name="qwen25vl-7b-text_kernel-warmup"),
                {"name": "qwen25vl-7b-text", "batch": b, "accum": accum, "workers": workers},
            ],
        ),
    ]
    if baseline:
        plan.append(
            (
                "baseline",
                "llava15-7b",
                [
                    dict(warm, name="llava15-7b_before_kernel-warmup"),
                    {"name": "llava15-7b_before", "batch": b, "accum": accum, "workers": workers},
                ],
            )
        )
    plan.append(
        (
            "new",
            "llava15-7b",
            [
                dict(warm, name="llava15-7b_specvlm-select_kernel-warmup", compressor="select"),
                {
                    "name": "llava15-7b_specvlm-select",
                    "batch": b,
                    "accum": accum,
                    "workers": workers,
                    "compressor": "select",
                },
            ],
        )
    )
    if baseline:
        plan.append(
            (
                "baseline",
                "qwen25vl-7b-text",
                [
                    dict(warm, name="qwen25vl-7b-text_before_kernel-warmup"),
                    {"name": "qwen25vl-7b-text_before", "batch": b, "accum": accum, "workers": workers},
                ],
            )
        )
    return plan


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for train_throughput.json and the logs (required)")
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny shapes: checks that every path runs")
    parser.add_argument(
        "--baseline-src", help="a checkout (or folder holding specvlm_hf/) whose trainer to measure too"
    )
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps after the warm-up")
    parser.add_argument("--budget-minutes", type=float, default=5.0, help="no new process starts after this")
    parser.add_argument(
        "--only", default="", help="comma-separated configuration names to run (default: the whole plan)"
    )
    parser.add_argument("--plan", help="a JSON list of [code, shape, [configs]] instead of the default plan")
    parser.add_argument("--skip-peak", action="store_true", help="do not measure the bf16 matrix rate")
    parser.add_argument("--work", help="folder for each process's result file (default: a temporary folder)")
    parser.add_argument(
        "--code-commit", help="the commit of this code, when it runs from a copy without its git history"
    )
    # internal: one process
    parser.add_argument("--worker", choices=("train", "peak"), help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--configs", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "peak":
        Path(args.result).write_text(json.dumps(peak_worker(args)))
        return 0
    if args.worker == "train":
        train_worker(args)
        return 0
    if not args.out:
        parser.error("--out is required")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="train-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {"environment": environment(), "args": vars(args), "peak": None, "runs": {}, "errors": []}
    if args.code_commit:
        result["environment"]["git_commit"] = args.code_commit
    path = out / "train_throughput.json"

    def write():
        result["seconds"] = time.perf_counter() - started
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")

    def launch(code: str, extra: list[str], name: str, timeout: float) -> Path:
        source = ROOT if code == "new" else Path(args.baseline_src).resolve()
        env = dict(
            os.environ,
            PYTHONPATH=f"{source}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        if args.tiny:
            env["OMP_NUM_THREADS"] = "1"
        target = work / f"{name}.result.json"
        command = [sys.executable, str(Path(__file__).resolve())] + extra + ["--result", str(target)]
        log(f"{name}: {code} code from {source}")
        try:
            done = subprocess.run(
                command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
            )
            output = done.stdout + done.stderr
            if done.returncode:
                result["errors"].append(
                    f"{name}: exit {done.returncode}: {output.strip().splitlines()[-1] if output.strip() else ''}"
                )
        except subprocess.TimeoutExpired as expired:
            output = str(expired.stdout or "") + str(expired.stderr or "")
            result["errors"].append(f"{name}: timed out after {timeout:.0f} s")
        with open(out / "train_throughput.log", "a") as log_file:  # one log: few files come back from a lent GPU
            log_file.write(f"===== {name}\n{output}\n")
        print(output[-2000:], flush=True)
        return target

    if not args.tiny and not args.skip_peak:
        target = launch("new", ["--worker", "peak"], "peak", 120)
        if target.exists():
            result["peak"] = json.loads(target.read_text())
            log(f"bf16 matmul 8192^3: {result['peak']['bf16_matmul_8192_tflops_median']:.0f} TFLOP/s")
        write()
    plan = json.loads(args.plan) if args.plan else default_plan(args.tiny, bool(args.baseline_src))
    only = {name for name in args.only.split(",") if name}
    for k, (code, shape, configs) in enumerate(plan):
        configs = [c for c in configs if not only or c["name"] in only]
        if not configs:
            continue
        left = args.budget_minutes * 60 - (time.perf_counter() - started)
        if left < 30:
            for c in configs:
                result["runs"][c["name"]] = {"skipped": "out of the time budget"}
            write()
            continue
        extra = [
            "--worker",
            "train",
            "--shape",
            shape,
            "--configs",
            json.dumps(configs),
            "--warmup-steps",
            str(args.warmup_steps),
            "--steps",
            str(args.steps),
        ] + (["--tiny"] if args.tiny else [])
        target = launch(code, extra, f"process{k}_{code}_{shape}", timeout=left + 60)
        if target.exists():
            for outcome in json.loads(target.read_text()):
                result["runs"][outcome["run"]["name"]] = outcome
        write()
    print_table(result)
    log(f"wrote {path}")
    return 1 if result["errors"] else 0


def print_table(result: dict) -> None:
    print(
        f"{'run':>28} {'tok/s':>8} {'s/step':>7} {'MFU790':>7} {'TFLOP/s':>8} {'teacher':>8} {'draft':>7} "
        f"{'optim':>6} {'data':>6} {'peakGiB':>8} {'pad':>5}"
    )
    for name, run in result["runs"].items():
        if run.get("kernel_warmup_only"):
            continue
        if "tokens_per_second" not in run:
            error = (run.get("error") or "").strip().splitlines()
            print(f"{name:>28} {run.get('skipped') or (error[-1] if error else 'no result')}")
            continue
        phases = run.get("phase_seconds_per_step", {})
        print(
            f"{name:>28} {run['tokens_per_second']:>8.0f} {run['seconds_per_step']:>7.3f} {run['mfu_vs_790']:>7.3f} "
            f"{run['model_tflops_per_second']:>8.1f} {phases.get('teacher', float('nan')):>8.3f} "
            f"{phases.get('draft', float('nan')):>7.3f} "
            f"{phases.get('optimizer', float('nan')):>6.3f} {phases.get('data', float('nan')):>6.3f} "
            f"{run.get('peak_memory_gib', float('nan')):>8.1f} "
            f"{run['padding_fraction']:>5.2f}",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
