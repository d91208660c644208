"""Round costs of the tree loop against the baselines, and the compressor's draft prefill, on one GPU.

LLaVA-1.5-7B shape (random bf16 weights, sdpa, batch 1), default tree (top-k 10, depth 7, 60 tokens), all
measured in one process:

1. plain `generate`, eager: median ms per token;
2. plain `generate` with `cache_implementation="static"` (transformers compiles the decode step with CUDA
   graphs): median ms per token;
3. the tree loop, eager (dynamic caches): ms per round (mean over the call, and the median between rounds),
   split into draft and verify;
4. the tree loop's fast path (`cache_implementation="static"`, `specvlm_hf.static_round`: static caches, each
   round three CUDA graphs), over eager kernels (`disable_compile=True`, "fast_graphs") and over kernels fused
   by `torch.compile` ("fast"): ms per round, split; the weights-read bandwidth each round achieves and the
   speed-up projected at a given sigma; a profiler table of the faster variant with `--profile-out`;
5. the draft's prefill time and the KV bytes of the visual part, per compressor branch, for a LLaVA-1.5
   image (576 tokens) and a LLaVA-NeXT AnyRes image (576 + 48 x (48 + 1) = 2928 tokens).

Random weights accept almost nothing (sigma ~ 1), so speed-ups are projections from the measured round cost
(labelled as such). `TINY=1` runs a CPU miniature as a dry run.

    python benchmarks/gpu_fast_path.py --out results/gpu_fast_path.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import specvlm_hf  # noqa: E402
from gpu_check_tree import TINY, TokenClock, llava_7b_shaped  # noqa: E402
from specvlm_hf.bench import software_versions  # noqa: E402
from specvlm_hf import SpecVLMDraftModel  # noqa: E402
from specvlm_hf.compressor import GridSegment, VisualLayout  # noqa: E402
from specvlm_hf.round import release_fast_path  # noqa: E402

DEVICE = "cpu" if TINY else "cuda"
DTYPE = torch.float32 if TINY else torch.bfloat16


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def plain_ms_per_token(target, inputs, new_tokens, **kwargs):
    clock = TokenClock()
    with torch.inference_mode():
        target.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock, **kwargs
        )
    sync()
    return 1000 * median([b - a for a, b in zip(clock.times[2:-1], clock.times[3:])])


def tree_round(target, draft, inputs, new_tokens, **kwargs):
    """Time per round of the tree loop: the mean over the call (the first rounds, which warm up and capture the
    fast path's graphs, included) and the median between streamed rounds (the steady state)."""
    clock = TokenClock()
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        output = target.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            assistant_model=draft,
            streamer=clock,
            **kwargs,
        )
    sync()
    wall = time.perf_counter() - start
    stats = draft.stats
    rounds = max(stats.rounds, 1)
    return {
        "ms_per_round": 1000 * (wall - stats.prefill_seconds) / rounds,
        "median_ms_per_round": 1000 * median([b - a for a, b in zip(clock.times[2:-1], clock.times[3:])]),
        "draft_ms_per_round": 1000 * stats.draft_seconds / rounds,
        "verify_ms_per_round": 1000 * stats.verify_seconds / rounds,
        "rounds": stats.rounds,
        "sigma": stats.sigma,
        "tokens": output[0, inputs["input_ids"].shape[1] :].tolist(),
    }


def count_host_syncs(target, draft, inputs, new_tokens, **kwargs):
    """Implicit host-device synchronisations (`.item()`, indexing with a device scalar, copies to pageable memory)
    of one fast-path call, counted with `torch.cuda.set_sync_debug_mode`; the round's intended wait on its
    acceptance (an event) is not one of them, so the loop's own count should be zero per round."""
    import warnings

    if DEVICE != "cuda":
        return {"skipped": "CPU"}
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            target.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                assistant_model=draft,
                cache_implementation="static",
                **kwargs,
            )
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0][:120] for w in caught if "synchroniz" in str(w.message)]
    return {
        "implicit_syncs": len(syncs),
        "rounds": draft.stats.rounds,
        "implicit_syncs_per_round": len(syncs) / max(draft.stats.rounds, 1),
        "first": syncs[:3],
    }


def profile_fast_path(target, draft, inputs, table_path, new_tokens, **fast_kwargs):
    """A torch.profiler table of fast-path rounds: where the round's time goes. Use the measured run's
    `new_tokens`, so that the static buffers and graphs are reused (another length recompiles)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof, torch.inference_mode():
        target.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            assistant_model=draft,
            cache_implementation="static",
            **fast_kwargs,
        )
    sync()
    averages = prof.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=40)
    if DEVICE == "cuda":
        table += "\n\n" + averages.table(sort_by="self_cuda_time_total", row_limit=150)
    if table_path:
        with open(table_path, "w") as handle:
            handle.write(table)
    gpu_us = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) for e in averages)
    cpu_us = sum(e.self_cpu_time_total for e in averages)
    rounds = max(draft.stats.rounds, 1)
    kernels = sum(e.count for e in averages if str(getattr(e, "device_type", "")).endswith("CUDA"))
    return {
        "gpu_kernels_per_round": kernels / rounds,
        "rounds": rounds,
        "gpu_kernel_ms_per_round": gpu_us / 1000 / rounds,
        "cpu_self_ms_per_round": cpu_us / 1000 / rounds,
        "table": table_path,
    }


def weight_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def compressor_prefill(target, hidden, results):
    """Draft prefill time and visual KV bytes for every branch, on 1.5 and AnyRes layouts."""
    text_config = target.config.text_config
    kv_bytes_per_token = 2 * text_config.num_key_value_heads * (hidden // text_config.num_attention_heads) * 2
    side = 4 if TINY else 24
    layouts = {
        "llava-1.5 (576)": VisualLayout.grid(side * side),
        "llava-next anyres (2928)": VisualLayout(
            [GridSegment(0, side, side), GridSegment(side * side, 2 * side, 2 * side, True)]
        ),
    }
    branches = ["none", "prune@4", "prune_norm@4", "pool@4", "pool@9", "pool@20", "conv@3", "resampler@2", "text"]
    rows = []
    for layout_name, layout in layouts.items():
        visual = layout.num_tokens
        text = 40
        n = visual + text
        for branch in branches:
            settings = {"mode": "none"} if branch == "none" else {"mode": "fixed", "fixed": branch}
            draft = SpecVLMDraftModel.from_target(target, compressor=settings).eval()
            fused_in = torch.randn(n, hidden, device=DEVICE, dtype=DTYPE)
            is_visual = torch.zeros(n, dtype=torch.bool, device=DEVICE)
            is_visual[5 : 5 + visual] = True
            positions = torch.arange(n, device=DEVICE)
            real = torch.ones(n, dtype=torch.bool, device=DEVICE)

            def prefill():
                fused, pos, keep, info = draft.compress_prompt(fused_in, positions, real, is_visual, [layout], None)
                cache = transformers.DynamicCache(config=draft.config.text_config)
                draft.decode(
                    fused[None],
                    attention_mask=keep[None].long(),
                    position_ids=pos[None],
                    past_key_values=cache,
                    use_cache=True,
                )
                return info

            with torch.inference_mode():
                for _ in range(3):
                    info = prefill()
                sync()
                times = []
                for _ in range(10):
                    start = time.perf_counter()
                    prefill()
                    sync()
                    times.append(time.perf_counter() - start)
            rows.append(
                {
                    "layout": layout_name,
                    "branch": branch,
                    "target_visual_tokens": visual,
                    "draft_visual_tokens": info["draft_visual_tokens"],
                    "draft_prefill_ms": 1000 * median(times),
                    "draft_visual_kv_MiB": info["draft_visual_tokens"] * kv_bytes_per_token / 2**20,
                    "branch_parameters": sum(p.numel() for p in draft.compressor.parameters())
                    if draft.compressor
                    else 0,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    results["compressor_prefill"] = rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--sigma", type=float, default=3.67, help="acceptance length for the projection")
    parser.add_argument("--copy-bandwidth", type=float, default=3.0e12, help="bytes/s (read + write) measured here")
    parser.add_argument(
        "--skip", default="", help="comma-separated sections to skip: plain,static,tree,fast,profile,compressor"
    )
    parser.add_argument("--out", default="results/gpu_fast_path.json")
    parser.add_argument("--profile-out", default=None, help="write the profiler tables of fast-path rounds here")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    target = specvlm_hf.enable(llava_7b_shaped(DEVICE, DTYPE))
    hidden = target.config.text_config.hidden_size
    draft = SpecVLMDraftModel.from_target(target)
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(2, 32000, (40,), generator=generator)
    input_ids = torch.cat([text[:5], torch.full((576,), 32000), text[5:]])[None].to(DEVICE)
    inputs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=torch.randn(1, 3, 336, 336, generator=generator).to(DEVICE, DTYPE),
    )
    results = {
        **software_versions(),
        "shape": "LLaVA-1.5-7B (random weights, bf16, sdpa, batch 1)",
        "new_tokens": args.new_tokens,
        "tree": {"top_k": 10, "depth": 7, "total_tokens": 60},
    }
    lm_bytes = weight_bytes(target.model.language_model) + weight_bytes(target.lm_head)
    results["weights_read_per_target_forward_GB"] = lm_bytes / 1e9
    results["draft_weights_GB"] = weight_bytes(draft) / 1e9

    def section(name, fn):
        if name in skip:
            return
        try:
            start = time.perf_counter()
            results[name] = fn()
            results[name]["section_seconds"] = time.perf_counter() - start
            print(name, json.dumps({k: v for k, v in results[name].items() if k != "tokens"}), flush=True)
        except Exception as error:  # keep the other measurements
            results[name] = {"error": repr(error)[:800]}
            traceback.print_exc()

    section(
        "plain", lambda: {"ms_per_token": min(plain_ms_per_token(target, inputs, args.new_tokens) for _ in range(2))}
    )
    section(
        "static",
        lambda: {
            "ms_per_token": [
                plain_ms_per_token(target, inputs, args.new_tokens, cache_implementation="static") for _ in range(3)
            ][-1]
        },
    )
    section("tree", lambda: [tree_round(target, draft, inputs, args.new_tokens) for _ in range(2)][-1])
    # the fast path: CUDA graphs over eager kernels, then over kernels fused by torch.compile
    section(
        "fast_graphs",
        lambda: [
            tree_round(target, draft, inputs, args.new_tokens, cache_implementation="static", disable_compile=True)
            for _ in range(3)
        ][-1],
    )

    def without_cudnn_attention():  # sdpa's other kernels for the masked tree attention (fresh graphs)
        previous = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)
        release_fast_path(draft)
        try:
            return [
                tree_round(target, draft, inputs, args.new_tokens, cache_implementation="static", disable_compile=True)
                for _ in range(3)
            ][-1]
        finally:
            torch.backends.cuda.enable_cudnn_sdp(previous)
            release_fast_path(draft)

    section("fast_graphs_no_cudnn", without_cudnn_attention)
    section(
        "fast",
        lambda: [tree_round(target, draft, inputs, args.new_tokens, cache_implementation="static") for _ in range(3)][
            -1
        ],
    )
    if "tokens" in results.get("tree", {}):  # same maths, other kernels: bf16 may differ only at near-ties
        for name in ("fast_graphs", "fast_graphs_no_cudnn", "fast"):
            if "tokens" in results.get(name, {}):
                a, b = results["tree"]["tokens"], results[name]["tokens"]
                results[name]["same_tokens_as_eager_tree"] = next(
                    (i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)
                )

    best = min(
        (name for name in ("fast_graphs", "fast") if "ms_per_round" in results.get(name, {})),
        key=lambda name: results[name]["median_ms_per_round"],
        default=None,
    )
    if best:
        section(
            "syncs",
            lambda: count_host_syncs(
                target, draft, inputs, args.new_tokens, **({"disable_compile": True} if best == "fast_graphs" else {})
            ),
        )
    if "profile" not in skip and best:
        try:
            options = {"disable_compile": True} if best == "fast_graphs" else {}
            results["profile"] = profile_fast_path(target, draft, inputs, args.profile_out, args.new_tokens, **options)
            results["profile"]["variant"] = best
        except Exception as error:
            results["profile"] = {"error": repr(error)[:800]}
            traceback.print_exc()

    for name in ("fast_graphs", "fast_graphs_no_cudnn", "fast"):
        fast = results.get(name, {})
        if "ms_per_round" in fast:
            round_s = fast["median_ms_per_round"] / 1000
            # one target forward + (depth + 1) draft forwards, each reading the draft and the borrowed lm_head
            round_bytes = lm_bytes + (7 + 1) * (weight_bytes(draft) + weight_bytes(target.lm_head))
            fast["weights_read_per_round_GB"] = round_bytes / 1e9
            fast["weights_read_bandwidth_TBps"] = round_bytes / round_s / 1e12
            fast["fraction_of_copy_bandwidth"] = round_bytes / round_s / args.copy_bandwidth
    projection = {"sigma": args.sigma, "label": "projection: measured round cost x assumed sigma"}
    for base in ("plain", "static"):
        for loop in ("tree", "fast_graphs", "fast_graphs_no_cudnn", "fast"):
            if "ms_per_token" in results.get(base, {}) and "ms_per_round" in results.get(loop, {}):
                round_ms = results[loop]["median_ms_per_round"]
                projection[f"{loop}_over_{base}"] = args.sigma * results[base]["ms_per_token"] / round_ms
                projection[f"{loop}_round_over_{base}_token"] = round_ms / results[base]["ms_per_token"]
    results["projection"] = projection
    print("projection", json.dumps(projection), flush=True)

    for name in ("tree", "fast_graphs", "fast_graphs_no_cudnn", "fast"):
        results.get(name, {}).pop("tokens", None)
    if "compressor" not in skip:
        try:
            compressor_prefill(target, hidden, results)
        except Exception as error:
            results["compressor_prefill"] = {"error": repr(error)[:800]}
            traceback.print_exc()

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
