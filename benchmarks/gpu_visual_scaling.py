"""How the draft's cost scales with the number of visual tokens, with and without the compressor, on one GPU.

Qwen2.5-VL-7B-shaped target (28 layers, hidden 3584, GQA 28/4, vocab 152064, random bf16, sdpa; a one-block
vision tower, since only the text side is measured), a video prompt of 1k, 4k, 16k and 32k visual tokens
(frames of 16 x 16 merged tokens, 40 text tokens), batch 1. For no compression and each compressor branch:

1. `draft_prefill_ms`: the draft's prefill over the prompt's pairs (compressor included), median of 5;
2. `draft_kv_MiB`: the bytes of the draft's KV cache after that prefill (text + compressed visual tokens);
3. `draft_level_ms`: one draft tree level (10 queries) attending to that cache, median of 20: the per-step
   attention cost the compression saves;
4. `round_ms` (branches in `--round-branches`): the fast path's median round time
   (`cache_implementation="static"`, CUDA graphs without `torch.compile`) in a `generate` call of
   `--new-tokens` tokens, and its split into draft and verify; with the fast path's static caches as allocated:
   `fast_draft_cache_slots` / `fast_draft_kv_MiB` (the draft's, sized by its compressed prompt + new tokens + a
   round's room, which is also the width every draft step attends over) against `fast_target_cache_slots` /
   `fast_target_kv_MiB` (the target's, every visual token).

`crossover` gives, per branch, the smallest visual count at which the branch's draft cost per round (prefill
spread over `--amortize-rounds` rounds + tree depth x level time) is below the uncompressed draft's by 5 %.
Random weights accept almost nothing (sigma ~ 1): round times are costs, not speed-ups.

    python benchmarks/gpu_visual_scaling.py --out results/visual_scaling      # one H200, ~5 minutes
    python benchmarks/gpu_visual_scaling.py --smoke --out /tmp/visual_scaling  # CPU miniature (dry run)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback

BRANCHES = ["none", "pool@4", "prune@4", "conv@3", "frame_norm@4", "tpool@2", "tpool@4", "frames@4", "text"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for visual_scaling.json and visual_scaling.png")
    parser.add_argument("--smoke", action="store_true", help="CPU miniature: tiny shapes, 2 counts, fp32")
    parser.add_argument("--counts", default="1024,4096,16384,32768", help="visual token counts")
    parser.add_argument("--branches", default=",".join(BRANCHES))
    parser.add_argument("--round-branches", default="none,pool@4,tpool@4,text")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--amortize-rounds", type=int, default=64, help="rounds the draft prefill is spread over")
    parser.add_argument("--budget-s", type=float, default=270.0, help="skip the remaining round runs past this")
    parser.add_argument(
        "--draft-vocab", type=int, default=32000, help="the drafts' reduced vocabulary (0: the target's full one)"
    )
    return parser.parse_args(argv)


ARGS = parse_args()
if ARGS.smoke:
    os.environ["TINY"] = "1"  # the shared 7B-shape builders read it at import

import torch  # noqa: E402
import transformers  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import specvlm_hf  # noqa: E402
from gpu_families import qwen2_5_vl_7b  # noqa: E402
from gpu_fast_path import DEVICE, DTYPE, median, sync, tree_round  # noqa: E402
from specvlm_hf import SpecVLMDraftModel  # noqa: E402
from specvlm_hf.compressor import VisualLayout  # noqa: E402
from specvlm_hf.hf_internals import layer_tensors  # noqa: E402

TEXT_TOKENS = 40
FRAME_SIDE = 4 if ARGS.smoke else 16  # merged tokens per frame side
LEVEL_QUERIES = 10


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of `fn()` over `repeats` runs after one warm-up, and its last result."""
    result = fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return median(times), result


def kv_bytes_per_token(config) -> int:
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * torch.finfo(DTYPE).bits // 8


def make_draft(target, compressor: dict):
    """A one-layer draft for `target` with the compressor `compressor`, over `--draft-vocab` tokens (Qwen2.5-VL's
    152k vocabulary read 8 times a round would dominate the draft's cost otherwise)."""
    size = ARGS.draft_vocab or None
    if ARGS.smoke and size:
        size = min(size, target.config.get_text_config().vocab_size // 2)
    return SpecVLMDraftModel.from_target(target, compressor=compressor, draft_vocab_size=size).to(DEVICE, DTYPE)


def draft_costs(target, count: int, branch: str) -> dict:
    """Draft prefill, KV bytes and one tree level's time for a video of `count` visual tokens."""
    hidden = target.config.text_config.hidden_size
    settings = {"mode": "none"} if branch == "none" else {"mode": "fixed", "fixed": branch}
    draft = make_draft(target, settings).eval()
    frames = count // FRAME_SIDE**2
    layout = VisualLayout.frames(frames, FRAME_SIDE, FRAME_SIDE)
    n = layout.num_tokens + TEXT_TOKENS
    fused_in = torch.randn(n, hidden, device=DEVICE, dtype=DTYPE)
    visual = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    visual[5 : 5 + layout.num_tokens] = True
    positions = torch.arange(n, device=DEVICE)
    real = torch.ones(n, dtype=torch.bool, device=DEVICE)

    def prefill():
        fused, pos, keep, info = draft.compress_prompt(fused_in, positions, real, visual, [layout], None)
        cache = transformers.DynamicCache(config=draft.config.text_config)
        draft.decode(fused[None], attention_mask=None, position_ids=pos[None], past_key_values=cache, use_cache=True)
        return cache, info

    with torch.inference_mode():
        prefill_s, (cache, info) = timed(prefill, 5)
        cached = cache.get_seq_length()
        queries = torch.randn(1, LEVEL_QUERIES, hidden, device=DEVICE, dtype=DTYPE)
        level_positions = torch.full((1, LEVEL_QUERIES), n, device=DEVICE)
        mask = torch.zeros(1, 1, LEVEL_QUERIES, cached + LEVEL_QUERIES, device=DEVICE, dtype=DTYPE)

        def level():
            out = draft.decode(queries, attention_mask=mask, position_ids=level_positions, past_key_values=cache)
            cache.crop(cached)  # drop the level again
            return out

        level_s, _ = timed(level, 20)
    return {
        "visual_tokens": layout.num_tokens,
        "branch": branch,
        "draft_visual_tokens": info["draft_visual_tokens"],
        "draft_kv_entries": cached,
        "draft_kv_MiB": cached * kv_bytes_per_token(draft.config) / 2**20,
        "draft_prefill_ms": 1000 * prefill_s,
        "draft_level_ms": 1000 * level_s,
    }


def cache_bytes(cache) -> int:
    """Bytes of a static cache's key and value tensors, as allocated."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in layer_tensors(layer) if t is not None)


def static_cache_sizes(round) -> dict:
    """The fast path's static caches of the call just made: slots and MiB of the draft's and the target's."""
    return {
        "fast_draft_cache_slots": round.draft_length,
        "fast_draft_kv_MiB": cache_bytes(round.runner.window.cache) / 2**20,
        "fast_target_cache_slots": round.length,
        "fast_target_kv_MiB": cache_bytes(round.target_window.cache) / 2**20,
    }


def video_prompt(target, count: int) -> dict:
    """A Qwen2.5-VL video prompt of `count` merged tokens (frames of FRAME_SIDE x FRAME_SIDE tokens)."""
    config = target.config
    vision = config.vision_config
    frames, side = count // FRAME_SIDE**2, 2 * FRAME_SIDE
    patch_dim = 3 * vision.temporal_patch_size * vision.patch_size**2
    words = torch.randint(10, 30000, (TEXT_TOKENS,), generator=torch.Generator().manual_seed(0))
    video = torch.full((frames * FRAME_SIDE**2,), config.video_token_id)
    ids = torch.cat(
        [words[:4], torch.tensor([config.vision_start_token_id]), video, torch.tensor([config.vision_end_token_id])]
    )
    ids = torch.cat([ids, words[4 : TEXT_TOKENS - 2]])[None].to(DEVICE)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == config.video_token_id).int() * 2,
        "pixel_values_videos": torch.randn(frames * side * side, patch_dim, device=DEVICE, dtype=DTYPE),
        "video_grid_thw": torch.tensor([[frames, side, side]], device=DEVICE),
        "second_per_grid_ts": torch.tensor([1.0], device=DEVICE),
    }


def crossover(rows: list[dict], depth: int, rounds: int) -> dict:
    """Per branch: the smallest visual count where its draft cost per round beats no compression by 5 %."""

    def per_round(row):
        return row["draft_prefill_ms"] / rounds + depth * row["draft_level_ms"]

    base = {row["visual_tokens"]: per_round(row) for row in rows if row["branch"] == "none"}
    out = {}
    for branch in sorted({row["branch"] for row in rows} - {"none"}):
        pays = [
            row["visual_tokens"]
            for row in sorted(rows, key=lambda r: r["visual_tokens"])
            if row["branch"] == branch and row["visual_tokens"] in base
            if per_round(row) < 0.95 * base[row["visual_tokens"]]
        ]
        out[branch] = pays[0] if pays else None
    return out


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in results["draft"] if "error" not in row]
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for branch in dict.fromkeys(row["branch"] for row in rows):
        mine = sorted((row for row in rows if row["branch"] == branch), key=lambda r: r["visual_tokens"])
        counts = [row["visual_tokens"] for row in mine]
        for axis, key in zip(axes, ("draft_prefill_ms", "draft_kv_MiB", "draft_level_ms")):
            axis.plot(counts, [row[key] for row in mine], marker="o", label=branch)
    rounds = [row for row in results["rounds"] if "median_ms_per_round" in row]
    # the round runs, dashed: median round time, and the fast path's static draft cache where reported
    for axis, key, name in (
        (axes[2], "median_ms_per_round", "round"),
        (axes[1], "fast_draft_kv_MiB", "fast-path static cache"),
    ):
        for branch in dict.fromkeys(row["branch"] for row in rounds if key in row):
            mine = sorted((row for row in rounds if row["branch"] == branch), key=lambda r: r["visual_tokens"])
            axis.plot(
                [row["visual_tokens"] for row in mine],
                [row[key] for row in mine],
                linestyle="--",
                marker="s",
                label=f"{name}, {branch}",
            )
    axes[1].legend(fontsize=7)
    titles = (
        "draft prefill (ms)",
        "draft KV (MiB); dashed: fast path's static draft cache",
        "draft tree level (ms); dashed: fast-path round (ms)",
    )
    for axis, title in zip(axes, titles):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("visual tokens (video)")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    axes[2].legend(fontsize=7, ncol=2)
    figure.suptitle(f"{results['shape']} on {results['machine']['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    started = time.perf_counter()
    os.makedirs(ARGS.out, exist_ok=True)
    counts = [64, 256] if ARGS.smoke else [int(c) for c in ARGS.counts.split(",")]
    target = specvlm_hf.enable(qwen2_5_vl_7b())
    results = {
        "shape": "Qwen2.5-VL-7B-shaped (random weights)" if not ARGS.smoke else "tiny Qwen2.5-VL (smoke)",
        "machine": {
            "host": platform.node(),
            "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "dtype": str(DTYPE),
        "text_tokens": TEXT_TOKENS,
        "frame_tokens": FRAME_SIDE**2,
        "draft_vocab": ARGS.draft_vocab or "full",
        "draft": [],
        "rounds": [],
    }
    for count in counts:
        for branch in ARGS.branches.split(","):
            try:
                row = draft_costs(target, count, branch)
            except Exception as error:  # keep the other measurements
                row = {"visual_tokens": count, "branch": branch, "error": repr(error)[:500]}
                traceback.print_exc()
            results["draft"].append(row)
            print(json.dumps(row), flush=True)
    depth = SpecVLMDraftModel.from_target(target).config.tree_depth
    results["crossover_visual_tokens"] = crossover(
        [row for row in results["draft"] if "error" not in row], depth, ARGS.amortize_rounds
    )
    print("crossover", json.dumps(results["crossover_visual_tokens"]), flush=True)
    for count in counts:
        inputs = video_prompt(target, count)
        for branch in ARGS.round_branches.split(","):
            row = {"visual_tokens": count, "branch": branch}
            if time.perf_counter() - started > ARGS.budget_s:
                row["skipped"] = "time budget"
            else:
                try:
                    settings = {"mode": "none"} if branch == "none" else {"mode": "fixed", "fixed": branch}
                    draft = make_draft(target, settings)
                    row.update(
                        tree_round(
                            target,
                            draft,
                            inputs,
                            ARGS.new_tokens,
                            cache_implementation="static",
                            disable_compile=True,
                        )
                    )
                    row.pop("tokens")
                    row["draft_visual_tokens"] = draft.stats.draft_visual_tokens
                    row.update(static_cache_sizes(draft._specvlm_static_round))
                    del draft
                except Exception as error:
                    row["error"] = repr(error)[:500]
                    traceback.print_exc()
            results["rounds"].append(row)
            print(json.dumps(row), flush=True)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    results["wall_s"] = time.perf_counter() - started
    with open(os.path.join(ARGS.out, "visual_scaling.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    try:
        plot(results, os.path.join(ARGS.out, "visual_scaling.png"))
    except Exception:
        traceback.print_exc()
    print(f"wrote {ARGS.out}/visual_scaling.json and .png in {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
