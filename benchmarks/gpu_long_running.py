"""A long-running process on one GPU: compile once for every length, restart from the disk cache, round cost.

LLaVA-1.5-7B shape (random bf16 weights, sdpa, batch 1, default tree), issue 13. In one process:

1. calls of `--new-tokens` new tokens at 9 prompt lengths, each in its own 256-slot bucket of the fast path (the
   first call, then 8 new buckets), then each length again (a seen bucket), for plain `generate` with
   `cache_implementation="static"` (transformers' compiled decode step) and for the SpecVLM fast path: each
   call's seconds, each new bucket's extra seconds (first call at a length minus the repeat), and the GPU memory
   held after them (the fast path keeps every bucket's graphs since 2026-12-04 night, their target caches sharing
   the longest bucket's memory, and since 2026-12-05 their draft caches sharing another: `kept_buckets`,
   `shared_cache_GB`, `draft_shared_cache_GB`);
2. the fast-path round against one compiled static-cache token at the same prompt, and against the weights-read
   floor (bytes a round reads / the device-to-device copy bandwidth measured here), and a profiler table of
   fast-path rounds (`profile_fast_round.txt` next to the JSON); with `--compare-verify-attention A,B`, the
   `kernel_rounds` section: the round on each verify attention kernel at the first and the longest prompt;
3. a second process with the first one's on-disk compile caches (`startup.use_cache_dir` in a fresh folder, set
   before the first process's first call: the round functions compiled ahead of time and saved (`precompile`), the
   inductor FX graph cache, `torch.compiler` artifacts): its first fast-path call's seconds, then
   `specvlm_hf.warmup` over every bucket (`--no-precompile`: without the saved round functions, as before
   2026-12-04 evening);
4. greedy equality of the fast path with plain `generate` in fp32 at every length, on a small LLaVA shape
   (the tiny one of `gpu_check_tree.py`, on the GPU).

`--smoke` runs a CPU miniature (no compilation, no CUDA graphs). Usage (about 6 minutes on an H200):

    python benchmarks/gpu_long_running.py --out $OUT/long_running
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

if "--smoke" in sys.argv:
    os.environ["TINY"] = "1"  # read by the helpers' module at import
if "--child" not in sys.argv and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="specvlm_inductor_")  # a cold start, honestly

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import gpu_check_tree  # noqa: E402
import specvlm_hf  # noqa: E402
from gpu_check_tree import TINY, copy_bandwidth, first_difference, llava_7b_shaped  # noqa: E402
from gpu_fast_path import (  # noqa: E402
    DEVICE,
    DTYPE,
    plain_ms_per_token,
    profile_fast_path,
    sync,
    tree_round,
    weight_bytes,
)
from specvlm_hf.bench import software_versions  # noqa: E402
from specvlm_hf import SpecVLMDraftModel  # noqa: E402
from specvlm_hf import precompile  # noqa: E402
from specvlm_hf.startup import save_compile_cache, tree_room, use_cache_dir  # noqa: E402

IMAGE_TOKENS = 576
BUCKET = 256


def prompt_lengths(new_tokens: int, room: int, smoke: bool) -> list[int]:
    """Prompt lengths whose fast-path calls fall in 9 different buckets: the first call's, then 8 new ones."""
    if smoke:
        return [300, 40, 620]
    buckets = [768, 256, 512, 1024, 1280, 1536, 1792, 2048, 2304]
    return [bucket - new_tokens - room - 40 for bucket in buckets]


def make_inputs(length: int, generator) -> dict:
    """A prompt of `length` tokens: one 336 px image (576 tokens) and text when it fits, else text only."""
    text = torch.randint(2, 32000, (length,), generator=generator)
    pixel_values = torch.randn(1, 3, 336, 336, generator=generator)
    if length >= IMAGE_TOKENS + 20:
        ids = torch.cat([text[:5], torch.full((IMAGE_TOKENS,), 32000), text[5 : length - IMAGE_TOKENS]])
        inputs = {"input_ids": ids[None].to(DEVICE), "pixel_values": pixel_values.to(DEVICE, DTYPE)}
    else:
        inputs = {"input_ids": text[None].to(DEVICE)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs


def timed_call(target, inputs, new_tokens, **kwargs) -> tuple[float, list[int]]:
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = target.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs
        )
    sync()
    return time.perf_counter() - start, out[0, inputs["input_ids"].shape[1] :].tolist()


def sweep(target, prompts, new_tokens, **kwargs) -> dict:
    """Each prompt once (first call, then new buckets), then each again (seen buckets: every call at another bucket
    than the one before it), and the GPU memory the method holds after them (the fast path keeps every bucket's
    graphs, their target caches in one memory)."""
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first = [timed_call(target, p, new_tokens, **kwargs) for p in prompts]
    again = [timed_call(target, p, new_tokens, **kwargs) for p in prompts]
    result = {
        "first_call_seconds": first[0][0],
        "new_bucket_seconds": [t for t, _ in first[1:]],
        "seen_bucket_seconds": [t for t, _ in again],
        "new_bucket_extra_seconds": [a[0] - b[0] for a, b in zip(first[1:], again[1:])],
        "tokens": [tokens for _, tokens in again],
    }
    if DEVICE == "cuda":
        result["memory_allocated_GB"] = torch.cuda.memory_allocated() / 1e9
        result["max_memory_allocated_GB"] = torch.cuda.max_memory_allocated() / 1e9
    draft = kwargs.get("assistant_model")
    kept = getattr(draft, "_specvlm_fast_paths", None)
    if kept is not None:
        result["kept_buckets"] = sorted(kept.by_length())
        for name, memories in (("shared_cache_GB", kept.shared), ("draft_shared_cache_GB", kept.draft_shared)):
            result[name] = sum(b.numel() * b.element_size() for b in memories[None].buffers) / 1e9
    return result


DRAFT_VOCAB = None  # `--draft-vocab`
FP8_HEAD = False  # the draft reads an e4m3 head (set by gpu_round_variants)


def build(dtype=None):
    """The target and a random draft (with `--draft-vocab N`, scoring the first N token ids only: a reduced draft
    vocabulary's cost; a trained one picks its ids with `draft_vocab.choose_draft_vocab`); with `FP8_HEAD`, the draft
    reads an e4m3 head (`draft.use_fp8_head`)."""
    target = specvlm_hf.enable(llava_7b_shaped(DEVICE, dtype or DTYPE))
    overrides = {"draft_vocab_size": DRAFT_VOCAB} if DRAFT_VOCAB else {}
    return target, SpecVLMDraftModel.from_target(target, **overrides).use_fp8_head(FP8_HEAD)


def fp32_equality_rows(lengths, new_tokens: int) -> dict:
    """Greedy fp32 equality of the fast path with plain `generate` at each prompt length, on the tiny LLaVA shape
    (hidden 256, 2 layers) on this device: the 7B in fp32 would compile again."""
    tiny = gpu_check_tree.TINY
    gpu_check_tree.TINY = True
    try:
        small, small_draft = build(torch.float32)
    finally:
        gpu_check_tree.TINY = tiny
    rows = []
    for index, n in enumerate(lengths):
        inputs = make_inputs(n, torch.Generator().manual_seed(100 + index))
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].float()
        _, plain = timed_call(small, inputs, new_tokens)
        _, fast = timed_call(small, inputs, new_tokens, assistant_model=small_draft, cache_implementation="static")
        rows.append(
            {
                "prompt_length": n,
                "equal": plain == fast,
                "first_difference": first_difference(plain, fast),
                "rounds": small_draft.stats.rounds,
            }
        )
    return {
        "shape": "tiny LLaVA (hidden 256, 2 layers), fp32",
        "rows": rows,
        "all_equal": all(r["equal"] for r in rows),
    }


def child(args) -> dict:
    """The second process: the disk caches of the first, its first call, then `warmup` over every bucket."""
    result = {}
    start = time.perf_counter()
    target, draft = build()
    sync()
    result["build_seconds"] = time.perf_counter() - start
    artifacts = use_cache_dir(args.cache_dir)
    if args.no_precompile:
        precompile.use_store(None)
    begin = time.perf_counter()
    from specvlm_hf.startup import load_compile_cache

    result["loaded_artifacts"] = load_compile_cache(artifacts)
    result["load_seconds"] = time.perf_counter() - begin
    prompts = [make_inputs(n, torch.Generator().manual_seed(i)) for i, n in enumerate(args.lengths)]
    result["first_call_seconds"], _ = timed_call(
        target, prompts[0], args.new_tokens, assistant_model=draft, cache_implementation="static"
    )
    # where the first call's time went: torch's compile phases (dynamo tracing, AOT, inductor / cache loads) and
    # the call's own phases
    stats = draft.stats
    result["first_call_phases"] = {
        "prefill_seconds": stats.prefill_seconds,
        "draft_seconds": stats.draft_seconds,
        "verify_seconds": stats.verify_seconds,
        "rounds": stats.rounds,
    }
    try:
        from torch._dynamo.utils import compile_times

        result["first_call_compile_times"] = compile_times(repr="str", aggregate=True)
    except Exception as error:  # a private helper: report, do not fail the run
        result["first_call_compile_times"] = repr(error)
    store = precompile.active_store()
    if store is not None:
        result["round_functions"] = {"loaded": store.loaded, "compiled": store.compiled}
    result["second_bucket_first_call_seconds"], _ = timed_call(
        target, prompts[1], args.new_tokens, assistant_model=draft, cache_implementation="static"
    )
    report = specvlm_hf.warmup(target, draft, max_length=max(args.lengths) + args.new_tokens, progress=False)
    result["warmup"] = {"buckets": report.buckets, "seconds": report.seconds, "total_seconds": report.total_seconds}
    result["after_warmup_call_seconds"] = [
        timed_call(target, p, args.new_tokens, assistant_model=draft, cache_implementation="static")[0]
        for p in prompts
    ]
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="a CPU miniature (no compile, no CUDA graphs)")
    parser.add_argument("--new-tokens", type=int, default=None, help="48 (8 with --smoke)")
    parser.add_argument("--out", default="results/long_running")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument(
        "--stack-compiled-layers",
        action="store_true",
        help="compiled rounds move the target's layers into one tensor (round.STACK_COMPILED_LAYERS, the layout "
        "before 2026-12-04): for comparing round cost and a new process's start",
    )
    parser.add_argument(
        "--no-precompile",
        action="store_true",
        help="no store of round functions compiled ahead of time (`precompile`): each process traces them",
    )
    parser.add_argument(
        "--draft-vocab",
        type=int,
        default=None,
        help="a draft scoring this many token ids (reduced draft vocabulary): its round cost against the full one's",
    )
    parser.add_argument(
        "--max-autotune",
        action="store_true",
        help="inductor autotunes its GEMMs (`torch._inductor.config.max_autotune`) for every compile of the run, "
        "plain `generate`'s static-cache step included: whether tuned kernels for the round's skinny GEMMs "
        "(60 tree rows, 10 draft rows) cut the round more than the token",
    )
    parser.add_argument(
        "--verify-attention",
        default=None,
        help="the fast path's verify attention (`round.VERIFY_ATTENTION`): specvlm_split_kv, flex_attention, or any "
        "name registered with transformers' AttentionInterface; default: the target's own (sdpa)",
    )
    parser.add_argument(
        "--compare-verify-attention",
        default="",
        help="comma-separated verify attention kernels (`round.VERIFY_ATTENTION`) whose whole fast-path round the "
        "`kernel_rounds` section times in this process, at the first and the longest prompt, beside the chosen "
        "kernel's round and a compiled static-cache token there (each kernel compiles its own round functions)",
    )
    parser.add_argument("--budget", type=float, default=420, help="seconds after which optional sections skip")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated sections to run (plain_static, fast, round_cost, profile, second_process, "
        "fp32_equality, kernel_rounds; second_process needs fast before it); default: all",
    )
    args = parser.parse_args()
    args.new_tokens = args.new_tokens or (8 if TINY else 48)
    global DRAFT_VOCAB
    DRAFT_VOCAB = args.draft_vocab
    if args.stack_compiled_layers:
        from specvlm_hf import round as round_module

        round_module.STACK_COMPILED_LAYERS = True
    if args.verify_attention:
        from specvlm_hf import round as round_module

        round_module.VERIFY_ATTENTION = args.verify_attention
    if args.max_autotune:
        from torch._inductor import config as inductor_config

        inductor_config.max_autotune = True
    if args.child:
        print("CHILD " + json.dumps(child(args)), flush=True)
        return

    begin = time.perf_counter()
    results = {
        **software_versions(),
        "shape": "LLaVA-1.5-7B (random weights, bf16, sdpa, batch 1)" if not TINY else "tiny LLaVA (smoke)",
        "new_tokens": args.new_tokens,
        "stack_compiled_layers": args.stack_compiled_layers,
        "draft_vocab": args.draft_vocab,
        "max_autotune": args.max_autotune,
        "verify_attention": args.verify_attention,
        "precompile": not args.no_precompile,
    }
    # the on-disk caches the second process starts from, in use from the first call on
    cache_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR") + "_specvlm"
    use_cache_dir(cache_dir)
    if args.no_precompile:
        precompile.use_store(None)

    only = set(filter(None, args.only.split(",")))

    def section(name, fn):
        if only and name not in only:
            return
        if time.perf_counter() - begin > args.budget and name not in ("plain_static", "fast"):
            results[name] = {"skipped": "over the time budget"}
            return
        try:
            start = time.perf_counter()
            results[name] = fn()
            results[name]["section_seconds"] = time.perf_counter() - start
            print(name, json.dumps({k: v for k, v in results[name].items() if k != "tokens"}), flush=True)
        except Exception as error:  # keep the other measurements
            results[name] = {"error": repr(error)[:800]}
            traceback.print_exc()

    target, draft = build()
    room = tree_room(draft)
    lengths = args.lengths or prompt_lengths(args.new_tokens, room, TINY)
    results["prompt_lengths"] = lengths
    results["fast_path_buckets"] = [-(-(n + args.new_tokens + room) // BUCKET) * BUCKET for n in lengths]
    prompts = [make_inputs(n, torch.Generator().manual_seed(i)) for i, n in enumerate(lengths)]

    section("plain_static", lambda: sweep(target, prompts, args.new_tokens, cache_implementation="static"))
    section(
        "fast", lambda: sweep(target, prompts, args.new_tokens, assistant_model=draft, cache_implementation="static")
    )
    if "fast" in results:  # where the first process's compile went (tracing, guards, AOT, code generation)
        try:
            from torch._dynamo.utils import compile_times

            results["fast"]["compile_times"] = compile_times(repr="str", aggregate=True)
        except Exception as error:  # a private helper: report, do not fail the run
            results["fast"]["compile_times"] = repr(error)
    if "tokens" in results.get("plain_static", {}) and "tokens" in results.get("fast", {}):
        results["bf16_first_difference_per_length"] = [
            first_difference(a, b) for a, b in zip(results["plain_static"]["tokens"], results["fast"]["tokens"])
        ]

    # 2. round cost at the first prompt, against a compiled static-cache token and the weights-read floor
    def round_cost():
        static_ms = plain_ms_per_token(target, prompts[0], 2 * args.new_tokens, cache_implementation="static")
        # a first call compiles and captures when no sweep ran before (`--only round_cost`): its draft and verify
        # means would hold that time, so they are taken from a second call
        tree_round(target, draft, prompts[0], 8, cache_implementation="static")
        fast = tree_round(target, draft, prompts[0], 2 * args.new_tokens, cache_implementation="static")
        bandwidth = copy_bandwidth(DEVICE)
        target_bytes = weight_bytes(target.model.language_model) + weight_bytes(target.lm_head)
        depth = draft.config.tree_depth
        rows = draft._head_rows  # a reduced draft vocabulary reads only its rows of the head
        head_bytes = weight_bytes(target.lm_head) if rows is None else rows.numel() * rows.element_size()
        round_bytes = target_bytes + (depth + 1) * (weight_bytes(draft) + head_bytes)
        round_ms = fast["median_ms_per_round"]
        return {
            "static_ms_per_token": static_ms,
            "fast_median_ms_per_round": round_ms,
            "fast_draft_ms_per_round": fast["draft_ms_per_round"],
            "fast_verify_ms_per_round": fast["verify_ms_per_round"],
            "round_over_static_token": round_ms / static_ms,
            "copy_bandwidth_TBps": bandwidth / 1e12,
            "target_forward_floor_ms": 1000 * target_bytes / bandwidth,
            "round_weights_GB": round_bytes / 1e9,
            "round_floor_ms": 1000 * round_bytes / bandwidth,
            "round_over_target_floor": round_ms / (1000 * target_bytes / bandwidth),
            "round_over_round_floor": round_ms / (1000 * round_bytes / bandwidth),
        }

    section("round_cost", round_cost)

    # 2b. the same round on other verify attention kernels, at the first and the longest prompt
    def kernel_rounds():
        from specvlm_hf import round as round_module

        chosen = round_module.VERIFY_ATTENTION
        names = [chosen] + [n for n in args.compare_verify_attention.split(",") if n]
        at = {"first": prompts[0], "longest": prompts[max(range(len(lengths)), key=lengths.__getitem__)]}
        rows = []
        static = {
            key: plain_ms_per_token(target, inputs, 2 * args.new_tokens, cache_implementation="static")
            for key, inputs in at.items()
        }
        reference = {}
        try:
            for name in names:
                round_module.VERIFY_ATTENTION = name
                for key, inputs in at.items():
                    if time.perf_counter() - begin > args.budget:
                        rows.append({"verify_attention": name, "prompt": key, "skipped": "over the time budget"})
                        continue
                    start = time.perf_counter()
                    try:
                        tree_round(target, draft, inputs, 2 * args.new_tokens, cache_implementation="static")
                    except Exception as error:  # one kernel failing keeps the others' rows
                        traceback.print_exc()
                        rows.append({"verify_attention": name, "prompt": key, "error": repr(error)[:600]})
                        break
                    first_seconds = time.perf_counter() - start  # compile (a new kernel) and capture
                    fast = tree_round(target, draft, inputs, 2 * args.new_tokens, cache_implementation="static")
                    reference.setdefault(key, fast["tokens"])
                    rows.append(
                        {
                            "verify_attention": name or "target's own",
                            "prompt": key,
                            "prompt_length": inputs["input_ids"].shape[1],
                            "first_call_seconds": first_seconds,
                            "median_ms_per_round": fast["median_ms_per_round"],
                            "verify_ms_per_round": fast["verify_ms_per_round"],
                            "draft_ms_per_round": fast["draft_ms_per_round"],
                            "static_ms_per_token": static[key],
                            "round_over_static_token": fast["median_ms_per_round"] / static[key],
                            "bf16_first_difference_from_first_kernel": first_difference(
                                reference[key], fast["tokens"]
                            ),
                        }
                    )
                    print("kernel_rounds", json.dumps(rows[-1]), flush=True)
        finally:
            round_module.VERIFY_ATTENTION = chosen
        return {"rows": rows}

    if args.compare_verify_attention:
        section("kernel_rounds", kernel_rounds)
    os.makedirs(args.out, exist_ok=True)
    section(
        "profile",
        lambda: profile_fast_path(
            target, draft, prompts[0], os.path.join(args.out, "profile_fast_round.txt"), 2 * args.new_tokens
        ),
    )

    # 3. a second process on the disk caches
    store = precompile.active_store()
    if store is not None:
        results["round_functions"] = {"loaded": store.loaded, "compiled": store.compiled}
    saved = False
    try:
        artifacts = use_cache_dir(cache_dir)
        saved = save_compile_cache(artifacts)
    except Exception:
        traceback.print_exc()
    results["saved_compile_artifacts"] = saved

    def second_process():
        command = [sys.executable, os.path.abspath(__file__), "--child", "--cache-dir", cache_dir]
        command += ["--new-tokens", str(args.new_tokens), "--lengths", ",".join(map(str, lengths))]
        command += ["--smoke"] if TINY else []
        command += ["--stack-compiled-layers"] if args.stack_compiled_layers else []
        command += ["--draft-vocab", str(args.draft_vocab)] if args.draft_vocab else []
        command += ["--max-autotune"] if args.max_autotune else []
        command += ["--verify-attention", args.verify_attention] if args.verify_attention else []
        command += ["--no-precompile"] if args.no_precompile else []
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ))
        lines = [line for line in done.stdout.splitlines() if line.startswith("CHILD ")]
        if not lines:
            return {"error": (done.stdout + done.stderr)[-3000:]}
        result = json.loads(lines[-1][len("CHILD ") :])
        result["process_seconds"] = time.perf_counter() - start
        return result

    section("second_process", second_process)

    # 4. greedy fp32 equality at every length, on a small LLaVA shape (the 7B in fp32 would compile again)
    def fp32_equality():
        return fp32_equality_rows(lengths, args.new_tokens)

    section("fp32_equality", fp32_equality)

    for name in ("plain_static", "fast"):
        results.get(name, {}).pop("tokens", None)
    results["total_seconds"] = time.perf_counter() - begin
    table = []
    for name in ("plain_static", "fast"):
        r = results.get(name, {})
        if "first_call_seconds" in r:
            extra = r["new_bucket_extra_seconds"]
            table.append(
                f"| {name} | {r['first_call_seconds']:.1f} s | {min(extra):.2f}-{max(extra):.2f} s extra "
                f"| {sorted(r['seen_bucket_seconds'])[len(r['seen_bucket_seconds']) // 2]:.2f} s |"
            )
    print("| call | first call | new bucket (8) | seen bucket (median) |\n|---|---|---|---|\n" + "\n".join(table))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_long_running.json")
    with open(path, "w") as handle:
        json.dump(results, handle, indent=1)
    print("SUMMARY", json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
