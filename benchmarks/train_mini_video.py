"""Teach the mini-qwen target short clips, train an EagleVLM and a SpecVLM (compressing) draft for it, and measure
both on held-out clips, on one GPU.

    python benchmarks/train_mini_video.py --out /tmp/video            # one H200: about 7 minutes
    python benchmarks/train_mini_video.py --out /tmp/video --smoke    # CPU, end to end in about 2 minutes
    python benchmarks/train_mini_video.py --install /tmp/video        # put a run's files into the package

1. data: clips of the motion set (`specvlm_hf.mini.data.make_clip_example`: a shape moving past a still one,
   `--frames` frames of `--frame-size` px) and still images of the mini data, encoded with the mini-qwen processor
   (a clip: one temporal patch per two frames, `qwen_video_patches`);
2. the target: the shipped mini-qwen (`specvlm_hf/mini/weights_qwen`), trained further on clips and images (two
   clip batches per image batch, so that it keeps its image skills) within `--target-minutes`; saved in bfloat16;
3. two drafts for it on the same mix within `--draft-minutes` each, both warm-started from the shipped
   `qwen_eaglevlm` draft: EagleVLM (reads every visual token) and SpecVLM (a question-aware gate picks one branch
   per input among time and space branches, `cost_weight` on the kept visual fraction);
4. on held-out clips (seed 4, float32, greedy): plain `generate`, then each draft in tree mode (eager and, on a GPU,
   the static-cache fast path): tokens/s, sigma, whether every output equals plain `generate`, the draft's visual
   tokens and the branches the gate picked.

Files left under `--out` (at most 7): the target's weight shards, `eaglevlm.safetensors` and `specvlm.safetensors`
(bfloat16), `small_files.tar` (configs, processor, tokenizer, training summaries), `mini_video.json` and
`train_mini_video.log`. `--install` replaces `specvlm_hf/mini/weights_qwen` and `drafts/qwen_eaglevlm` and adds
`drafts/qwen_specvlm` (each draft about 1.9 MB in bfloat16).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import platform
import random
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHIPPED_TARGET = ROOT / "specvlm_hf" / "mini" / "weights_qwen"
DRAFTS = ROOT / "specvlm_hf" / "mini" / "drafts"
SPEC_BRANCHES = ["tpool@2", "tpool@4", "frames@2", "frames@4", "frame_norm@4", "pool@4", "text"]
LOG = None


def log(message: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    if LOG is not None:
        LOG.write(line + "\n")
        LOG.flush()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for the files to bring back (at most 7)")
    parser.add_argument("--smoke", action="store_true", help="tiny settings that run end to end on a CPU")
    parser.add_argument("--install", default=None, help="copy a finished run's --out folder into the package")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip (two per temporal patch)")
    parser.add_argument("--frame-size", type=int, default=128, help="clip frame side in pixels")
    parser.add_argument("--clips", type=int, default=6000, help="training clips (seed 0)")
    parser.add_argument("--images", type=int, default=6000, help="training images (seed 0)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--target-minutes", type=float, default=2.5)
    parser.add_argument(
        "--skip-target",
        action="store_true",
        help="keep the shipped mini-qwen as it is (train the drafts only; --install then leaves the target alone)",
    )
    parser.add_argument("--target-lr", type=float, default=3e-4)
    parser.add_argument("--draft-minutes", type=float, default=1.3, help="per draft")
    parser.add_argument("--draft-lr", type=float, default=1e-3)
    parser.add_argument("--cost-weight", type=float, default=0.3, help="SpecVLM gate: weight of the kept fraction")
    parser.add_argument("--eval-clips", type=int, default=16, help="held-out clips (seed 4)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.smoke:
        args.frames, args.frame_size, args.clips, args.images, args.batch_size = 4, 64, 24, 12, 4
        args.target_minutes, args.draft_minutes, args.eval_clips, args.max_new_tokens = 0.15, 0.15, 2, 12
    return parser, args


# ------------------------------------------------------------------------------------------------------- data
def clip_rows(processor, seed: int, start: int, count: int, frames: int, size: int) -> list[dict]:
    """Encoded clips `start..start + count - 1` of `seed`: ids, answer mask, uint8 frames, the record."""
    import numpy as np
    import torch

    from specvlm_hf.mini.data import make_clip_example
    from specvlm_hf.mini.tokenizer import IGNORE_INDEX, encode_clip_record, image_to_uint8

    rows = []
    for index in range(start, start + count):
        record, images = make_clip_example(seed, index, frames=frames, image_size=size)
        ids, labels = encode_clip_record(processor, record, frames, size)
        pixels = np.stack([image_to_uint8(image, size) for image in images])
        rows.append(
            {
                "input_ids": torch.tensor(ids),
                "labels": torch.tensor([label != IGNORE_INDEX for label in labels]),
                "frames": torch.from_numpy(pixels),
                "record": record,
            }
        )
    return rows


def image_rows(processor, seed: int, count: int) -> list[dict]:
    """Encoded still images (and text-only examples) of the mini data."""
    import torch

    from specvlm_hf.mini.data import make_example
    from specvlm_hf.mini.tokenizer import IGNORE_INDEX, encode_record, image_to_uint8

    size = 128  # the mini data's images, as the mini-qwen was trained on
    rows = []
    for index in range(count):
        record, image = make_example(seed, index, size)
        ids, labels = encode_record(processor, record, size)
        rows.append(
            {
                "input_ids": torch.tensor(ids),
                "labels": torch.tensor([label != IGNORE_INDEX for label in labels]),
                "image": None if image is None else torch.from_numpy(image_to_uint8(image, size)),
            }
        )
    return rows


def collate(rows: list[dict], processor, config, device) -> dict:
    """A right-padded batch of clip or image rows with the model inputs a Qwen2.5-VL forward takes: pixel rows,
    grids and `mm_token_type_ids` (M-RoPE positions come from `get_rope_index`, time index included)."""
    import torch

    from specvlm_hf.mini.tokenizer import normalize_pixels, qwen_grid, qwen_video_patches

    length = max(row["input_ids"].numel() for row in rows)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    answer = torch.zeros(len(rows), length, dtype=torch.bool)
    for b, row in enumerate(rows):
        n = row["input_ids"].numel()
        input_ids[b, :n], mask[b, :n], answer[b, :n] = row["input_ids"], 1, row["labels"]
    batch = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "answer": answer.to(device)}
    image = processor.image_processor
    if "frames" in rows[0]:
        patches = [qwen_video_patches(row["frames"].to(device), image) for row in rows]
        batch["pixel_values_videos"] = torch.cat([p for p, _ in patches])
        batch["video_grid_thw"] = torch.cat([g for _, g in patches])
    else:
        images = [row["image"] for row in rows if row["image"] is not None]
        if images:
            pixels = torch.stack(images).to(device)
            batch["pixel_values"] = normalize_pixels(pixels, image)
            batch["image_grid_thw"] = qwen_grid(len(images), pixels.shape[-1], image).to(device)
    types = (batch["input_ids"] == config.image_token_id).int() + 2 * (batch["input_ids"] == config.video_token_id)
    batch["mm_token_type_ids"] = types.int()
    return batch


def batches(rows: list[dict], size: int, rng: random.Random):
    """Endless shuffled batches of `rows`."""
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        for start in range(0, len(order) - size + 1, size):
            yield [rows[i] for i in order[start : start + size]]


# ----------------------------------------------------------------------------------------------------- target
def train_target(target, processor, clips, images, args, device) -> dict:
    """Trains the target further on two clip batches per image batch (answer tokens only) within its budget."""
    import torch

    config = target.config
    optimizer = torch.optim.AdamW(target.parameters(), lr=args.target_lr, weight_decay=0.0, betas=(0.9, 0.95))
    rng = random.Random(0)
    clip_batches, image_batches = batches(clips, args.batch_size, rng), batches(images, args.batch_size, rng)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    history, step, start = [], 0, time.perf_counter()
    target.train()
    while time.perf_counter() - start < 60 * args.target_minutes or step < 2:
        kind = "image" if step % 3 == 2 else "clip"
        batch = collate(next(image_batches if kind == "image" else clip_batches), processor, config, device)
        answer = batch.pop("answer")
        labels = torch.where(answer, batch["input_ids"], torch.full_like(batch["input_ids"], -100))
        progress = min((time.perf_counter() - start) / (60 * args.target_minutes), 1.0)
        for group in optimizer.param_groups:  # linear decay to a tenth
            group["lr"] = args.target_lr * (1 - 0.9 * progress)
        with autocast:
            loss = target(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(target.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % 25 == 1 or args.smoke:
            history.append({"step": step, "kind": kind, "loss": float(loss)})
            log(f"target step {step} ({kind}) loss {float(loss):.4f}")
    target.eval()
    return {"steps": step, "minutes": (time.perf_counter() - start) / 60, "history": history}


# ----------------------------------------------------------------------------------------------------- drafts
def clip_layouts(adapter, batch: dict) -> list[list]:
    """Each clip row's visual layouts (its video's `(t, h, w)` frames), as the draft sees them at inference."""
    layouts = []
    grids = batch["video_grid_thw"]
    for b in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][b]
        kwargs = {"video_grid_thw": grids[b : b + 1], "input_ids": ids}
        visual = adapter.visual_mask(ids, kwargs)
        layouts.append(adapter.visual_layouts(torch_cat_shift(visual), kwargs))
    return layouts


def torch_cat_shift(visual):
    """`(n,)` visual mask of tokens -> of pairs (pair t reads token t + 1)."""
    import torch

    return torch.cat([visual[1:], visual.new_zeros(1)])


def train_draft(name, target, processor, clips, images, args, device) -> tuple[object, dict]:
    """A draft warm-started from the shipped `qwen_eaglevlm` (decoder and fc), trained on clip and image batches
    with the distillation objective within `--draft-minutes`."""
    import torch

    from specvlm_hf import SpecVLMDraftModel
    from specvlm_hf.adapters import adapter_for
    from specvlm_hf.training.objective import DistillationObjective, teacher_forward

    compressor = {"mode": "none"}
    if name == "specvlm":
        compressor = {"mode": "select", "branches": SPEC_BRANCHES, "cost_weight": args.cost_weight, "gate_hidden": 64}
    torch.manual_seed(0)
    draft = SpecVLMDraftModel.from_target(target, compressor=compressor)
    shipped = SpecVLMDraftModel.from_pretrained(DRAFTS / "qwen_eaglevlm")
    missing = draft.load_state_dict(shipped.state_dict(), strict=False)
    draft = draft.to(device).bind_target(target)
    objective = DistillationObjective(draft, target.config)
    trainable = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.draft_lr, weight_decay=0.0)
    adapter = adapter_for(target, tree=False)
    rng = random.Random(1)
    clip_batches, image_batches = batches(clips, args.batch_size, rng), batches(images, args.batch_size, rng)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    history, fractions, step, start = [], [], 0, time.perf_counter()
    draft.train()
    while time.perf_counter() - start < 60 * args.draft_minutes or step < 2:
        kind = "image" if step % 3 == 2 else "clip"
        batch = collate(next(image_batches if kind == "image" else clip_batches), processor, target.config, device)
        batch["labels"] = batch.pop("answer")
        if kind == "clip":
            batch["layouts"] = clip_layouts(adapter, batch)
        progress = min((time.perf_counter() - start) / (60 * args.draft_minutes), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = args.draft_lr * (1 - 0.9 * progress)
        teacher = teacher_forward(target, batch)
        with autocast:
            out = objective(batch, teacher)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if out.visual_fraction is not None and kind == "clip":
            fractions.append(float(out.visual_fraction))
        if step % 25 == 1 or args.smoke:
            agree = float(out.agreement[0]) if out.agreement else 0.0
            history.append({"step": step, "kind": kind, "loss": float(out.loss), "top1": agree})
            log(f"{name} draft step {step} ({kind}) loss {float(out.loss):.4f} top-1 {agree:.3f}")
    draft.eval()
    draft.config.decoding_mode = "tree"
    summary = {
        "steps": step,
        "minutes": (time.perf_counter() - start) / 60,
        "history": history,
        "compressor": compressor,
        "not_warm_started": list(missing.missing_keys),
        "expected_visual_fraction_last": fractions[-20:],
    }
    return draft, summary


# ------------------------------------------------------------------------------------------------- evaluation
def evaluate(target, processor, drafts: dict, args, device) -> dict:
    """Held-out clips (seed 4), greedy, float32: plain `generate`, then each draft (tree, and the fast path on a
    GPU): tokens/s, sigma, outputs identical to plain, draft visual tokens, the branches the gate picked."""
    import torch

    rows = clip_rows(processor, 4, 0, args.eval_clips, args.frames, args.frame_size)
    kwargs = {"do_sample": False, "max_new_tokens": args.max_new_tokens}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    paths = {"tree": {}}
    if device.type == "cuda":  # the fast path's CUDA graphs over eager kernels (no compile time in the budget)
        paths["static"] = {"cache_implementation": "static", "disable_compile": True}
    inputs = []
    for row in rows:
        batch = collate([row], processor, target.config, device)
        batch.pop("answer")
        prompt = int(row["labels"].float().argmax())  # the first answer token: the prompt ends before it
        inputs.append({k: (v[:, :prompt] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
                       for k, v in batch.items()})  # fmt: skip
    runs = {}

    def timed(fn):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - start

    with torch.inference_mode():
        for one in inputs[:1]:  # warm-up (kernels, allocator)
            target.generate(**one, **kwargs)
        plain, seconds, new = [], 0.0, 0
        for one in inputs:
            out, spent = timed(lambda: target.generate(**one, **kwargs))
            plain.append(out[0, one["input_ids"].shape[1] :].tolist())
            seconds, new = seconds + spent, new + len(plain[-1])
        runs["plain"] = {"tokens_per_s": new / seconds, "new_tokens": new}
        for name, draft in drafts.items():
            for path, extra in paths.items():
                target.generate(**inputs[0], **kwargs, **extra, assistant_model=draft)  # warm-up / graph capture
                seconds, new, accepted, rounds, same = 0.0, 0, 0, 0, 0
                branches, draft_visual, target_visual = collections.Counter(), 0, 0
                for one, reference in zip(inputs, plain):
                    out, spent = timed(lambda: target.generate(**one, **kwargs, **extra, assistant_model=draft))
                    tokens = out[0, one["input_ids"].shape[1] :].tolist()
                    stats = draft.stats
                    seconds, new = seconds + spent, new + len(tokens)
                    accepted, rounds = accepted + sum(stats.accepted_per_round), rounds + stats.rounds
                    same += tokens == reference
                    branches[stats.visual_branch] += 1
                    draft_visual += stats.draft_visual_tokens
                    target_visual += stats.target_visual_tokens
                runs[f"{name}/{path}"] = {
                    "tokens_per_s": new / seconds,
                    "speedup_vs_plain": (new / seconds) / runs["plain"]["tokens_per_s"],
                    "sigma": accepted / max(rounds, 1),
                    "identical_to_plain": f"{same}/{len(inputs)}",
                    "draft_visual_tokens": draft_visual / len(inputs),
                    "target_visual_tokens": target_visual / len(inputs),
                    "branches": dict(branches),
                }
                log(f"{name}/{path}: {json.dumps(runs[f'{name}/{path}'])}")
    answers = sum(
        row["record"]["target"] in processor.tokenizer.decode(tokens) for row, tokens in zip(rows, plain)
    )  # the direction word ("right", "left", "up", "down") in the target's own answer
    return {"clips": len(rows), "max_new_tokens": args.max_new_tokens, "runs": runs, "direction_named": answers}


# ---------------------------------------------------------------------------------------------------- files
def save_draft_bf16(draft, folder: Path) -> None:
    """`save_pretrained` with the draft's own weights in bfloat16 (the draft itself is left as it is)."""
    import torch

    state = {key: value.detach().to(torch.bfloat16) for key, value in draft.state_dict().items()}
    draft.save_pretrained(folder, state_dict=state)


def main(argv=None):
    global LOG
    parser, args = parse_args(argv)
    if args.install:
        install(Path(args.install))
        return
    if not args.out:
        parser.error("--out is required")
    import torch
    import transformers

    import specvlm_hf
    from specvlm_hf.mini import load

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    work = Path(tempfile.mkdtemp(prefix="mini_video_"))
    LOG = open(out / "train_mini_video.log", "w")
    started = time.perf_counter()
    timings = {}
    torch.manual_seed(0)
    target, processor = load(name="mini-qwen", device=device)
    specvlm_hf.enable(target)
    log(f"loaded mini-qwen on {device}; scratch {work}")

    clips = clip_rows(processor, 0, 0, args.clips, args.frames, args.frame_size)
    images = image_rows(processor, 0, args.images)
    timings["data_s"] = time.perf_counter() - started
    log(f"data: {len(clips)} clips ({clips[0]['input_ids'].numel()} tokens each), {len(images)} images")

    target_dir = work / "weights_qwen"
    if args.skip_target:
        target_summary = {"skipped": "the shipped mini-qwen, unchanged"}
        target_dir.mkdir()
    else:
        target_summary = train_target(target, processor, clips, images, args, device)
        shutil.copytree(SHIPPED_TARGET, target_dir, ignore=shutil.ignore_patterns("*.safetensors*"))
        target.to(torch.bfloat16).save_pretrained(target_dir, max_shard_size="14MB")
        target.to(torch.float32)
        (target_dir / "video_training.json").write_text(
            json.dumps({"args": vars(args), "summary": target_summary}, indent=1) + "\n"
        )
    timings["target_done_s"] = time.perf_counter() - started
    for param in target.parameters():
        param.requires_grad_(False)

    drafts, draft_summaries = {}, {}
    for name in ("eaglevlm", "specvlm"):
        drafts[name], draft_summaries[name] = train_draft(name, target, processor, clips, images, args, device)
        timings[f"{name}_done_s"] = time.perf_counter() - started
    evaluation = evaluate(target, processor, drafts, args, device)
    timings["total_s"] = time.perf_counter() - started

    results = {
        "what": "mini-qwen trained further on synthetic clips; EagleVLM vs SpecVLM drafts on held-out clips",
        "machine": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "args": vars(args),
        "timings": timings,
        "target_training": target_summary,
        "draft_training": draft_summaries,
        "heldout": evaluation,
    }
    (out / "mini_video.json").write_text(json.dumps(results, indent=1) + "\n")
    for shard in sorted(target_dir.glob("*.safetensors")):
        shutil.copy(shard, out / shard.name)
    with tarfile.open(out / "small_files.tar", "w") as tar:
        for path in sorted(target_dir.iterdir()):
            if path.suffix != ".safetensors":
                tar.add(path, arcname=f"weights_qwen/{path.name}")
        for name, draft in drafts.items():
            save_draft_bf16(draft, work / name)
            shutil.copy(work / name / "model.safetensors", out / f"{name}.safetensors")
            for file in ("config.json", "generation_config.json"):
                if (work / name / file).exists():
                    tar.add(work / name / file, arcname=f"{name}/{file}")
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    log(json.dumps({"files": files, "timings": timings}))
    for key, run in evaluation["runs"].items():
        log(f"{key}: {run['tokens_per_s']:.1f} tok/s" + (f", sigma {run['sigma']:.2f}" if "sigma" in run else ""))
    LOG.close()
    if len(files) > 7 or max(files.values()) > 14_500_000:
        raise SystemExit(f"too many or too large files under {out}: {files}")


def install(run: Path) -> None:
    """Puts a run's files into the package: the target into `specvlm_hf/mini/weights_qwen`, the drafts into
    `drafts/qwen_eaglevlm` and `drafts/qwen_specvlm` (bfloat16), the figures into `results/mini_video.json`."""
    with tempfile.TemporaryDirectory() as scratch:
        with tarfile.open(run / "small_files.tar") as tar:
            tar.extractall(scratch, filter="data")
        scratch = Path(scratch)
        if list(run.glob("model*.safetensors")):  # a run with --skip-target brings no target back
            for old in SHIPPED_TARGET.glob("model*.safetensors*"):
                old.unlink()
            for path in (scratch / "weights_qwen").iterdir():
                shutil.copy(path, SHIPPED_TARGET / path.name)
            for shard in run.glob("model*.safetensors"):
                shutil.copy(shard, SHIPPED_TARGET / shard.name)
        for name in ("eaglevlm", "specvlm"):
            folder = DRAFTS / f"qwen_{name}"
            folder.mkdir(exist_ok=True)
            for path in (scratch / name).iterdir():
                shutil.copy(path, folder / path.name)
            shutil.copy(run / f"{name}.safetensors", folder / "model.safetensors")
            run_figures = json.loads((run / "mini_video.json").read_text())
            tree = run_figures["heldout"]["runs"][f"{name}/tree"]
            (folder / "eval_results.json").write_text(
                json.dumps(
                    {
                        "sigma": tree["sigma"],
                        "speedup": tree["speedup_vs_plain"],
                        "device": run_figures["machine"],
                        "dataset": f"{run_figures['heldout']['clips']} held-out clips of the motion set (seed 4)",
                        "date": run_figures["date"][:10],
                        "dtype": "float32",
                        "max_new_tokens": run_figures["heldout"]["max_new_tokens"],
                        "temperature": 0.0,
                        "modes": {key.split("/")[1]: r for key, r in run_figures["heldout"]["runs"].items()
                                  if key.startswith(name + "/")},
                    },
                    indent=1,
                )
                + "\n"
            )  # fmt: skip
            config = json.loads((folder / "config.json").read_text())
            config["target"]["name_or_path"] = "specvlm_hf.mini (built-in mini-qwen)"
            (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(run / "mini_video.json", ROOT / "results" / "mini_video.json")
    shutil.copy(run / "train_mini_video.log", ROOT / "results" / "train_mini_video.log")
    from specvlm_hf.mini.drafts import refresh_shipped_files

    refresh_shipped_files()
    sizes = {p.name: p.stat().st_size for p in DRAFTS.glob("qwen_*/model.safetensors")}
    print(f"installed into {SHIPPED_TARGET} and {DRAFTS}/qwen_*: drafts {sizes}")


if __name__ == "__main__":
    main()
