"""The fast-path round under several variants at once: which change brings the round to a compiled token (issue 13).

LLaVA-1.5-7B shape (random bf16, sdpa, batch 1, default tree). Each variant runs in its own process, so each compiles
its own round functions; the processes compile at the same time (a cold 7B round compile takes 1.5-3 minutes, so one
device call could not compile them one after another), then wait for each other, then take turns measuring under a
file lock, so no measurement shares the GPU with another process's work. Each measures, at two prompts (601 and 2137
tokens: buckets 768 and 2304), a compiled static-cache token of plain `generate` (transformers' own) and the
fast-path round, each call run once before it is timed with the same shapes.

Variants (`--variants`, comma-separated; default `default,separate,vocab8k`):
- `default`: the fast path as shipped (its compiles merge repeated computations, `round.MERGE_REPEATED`, and join
  the products of q/k/v and of gate/up, `round.JOIN_PROJECTIONS`, on since 2026-12-06); a variant sets only the
  switches it names, the others keep their shipped values;
- `torch_topk`: tree levels on torch's `topk` (`kernels.FUSED = False`: the shipped round before 2026-12-06
  afternoon);
- `separate`: without joined products (the shipped round before 2026-12-06; joined: `round.JOIN_PROJECTIONS`, q/k/v
  and gate/up weights laid out in one storage each, the modules staying, and their products joined into one GEMM by
  the round's inductor pass; the variants `joined` and `joined_vocab8k` of the 2026-12-06 results are today's
  `default` and `vocab8k`);
- `autotune_gemms`: `round.AUTOTUNE_GEMMS`, without joined products: the round's compiles (only they) time each GEMM
  against inductor's Triton templates (not with joined projections: the round refuses the pair, see
  `round.AUTOTUNE_GEMMS`);
- `no_merge`: without that pass (the fast path before 2026-12-05 afternoon);
- `vocab8k`: a draft scoring 8192 token ids (a reduced draft vocabulary: an 8x smaller `lm_head` and top-k per level);
- `fused`: q/k/v and gate/up weights laid out as one tensor each (`fused_projections.fuse_projections`, target text
  model and draft), which the merging pass turns into one GEMM each;
- `fused_vocab8k`: both;
- `autotune`: inductor's `max_autotune` for every compile of the process (plain `generate`'s token included);
- `split_kv`: the verify forward's attention on `verify_attention.SPLIT_KV`;
- `fp8_draft`: the draft's layer projections and `lm_head` rows on e4m3 weights (`fp8_draft.use_fp8_products`,
  benchmark only: `torch._scaled_mm`, the input quantized per call); `fp8_draft_vocab8k`: with an 8192-id vocabulary
  (the fp32 check does not apply these two: it runs the package's settings);
- `fp8_head`: the package's e4m3 draft head (`draft.use_fp8_head`: only the `lm_head` rows, every product joined as
  shipped); `fp8_head_vocab8k`: with an 8192-id vocabulary (the fp32 check applies the fp8 head);
- `own_attention`: the verify and draft forwards on the models' own attention (`kernels.ATTENTION = False`; the
  package's attention kernels are the default where they run);
- `combined`: fused + vocab8k + split_kv.

Usage (about 8 minutes on an H200, which runs 6 variants at once; fewer at once on a smaller GPU):

    python benchmarks/gpu_round_variants.py --out $OUT/variants

`--smoke` runs the plumbing on the CPU (a tiny LLaVA, eager rounds: no compile, no CUDA graphs, no timing worth
reading).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {  # in the order they run (a GPU too small for all at once runs them in waves)
    "default": {},
    "torch_topk": {"fused_top_k": False},
    "separate": {"join": False},
    "autotune_gemms": {"join": False, "autotune_gemms": True},
    "fp8_draft": {"fp8_draft": True},
    "fp8_draft_vocab8k": {"fp8_draft": True, "draft_vocab": 8192},
    "fp8_head": {"fp8_head": True},
    "fp8_head_vocab8k": {"fp8_head": True, "draft_vocab": 8192},
    "own_attention": {"attention": False},
    "no_merge": {"merge": False, "join": False},
    "fused_vocab8k": {"fuse": True, "join": False, "draft_vocab": 8192},
    "vocab8k": {"draft_vocab": 8192},
    "fused": {"fuse": True, "join": False},
    "autotune": {"max_autotune": True},
    "split_kv": {"verify_attention": "specvlm_split_kv"},
    "combined": {"fuse": True, "join": False, "verify_attention": "specvlm_split_kv", "draft_vocab": 8192},
}
LENGTHS = (601, 2137)
SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TINY"] = "1"  # read by the benchmark helpers at import
    LENGTHS = (40, 700)
GB_PER_VARIANT = 18  # a 7B target (14 GB), its draft, both methods' caches at the longer prompt, compile workspace
GB_PER_AUTOTUNING_VARIANT = 26  # GEMM autotuning's benchmark buffers: such processes held 23.6 GB on an H100
GB_FP32_CHECK = 2  # the tiny LLaVA


def gigabytes(name: str) -> float:
    """GPU memory a variant's process may hold at its peak."""
    if name == FP32_CHECK:
        return GB_FP32_CHECK
    spec = VARIANTS[name]
    return GB_PER_AUTOTUNING_VARIANT if spec.get("autotune_gemms") or spec.get("max_autotune") else GB_PER_VARIANT


def waves(names: list[str], memory: float, parallel: int | None) -> list[list[str]]:
    """`names` in order, cut into waves that fit `memory` GB together (at most `parallel` a wave when given; one
    variant a wave at least)."""
    result, wave, used = [], [], 0.0
    for name in names:
        need = gigabytes(name)
        if wave and (used + need > memory or (parallel and len(wave) >= parallel)):
            result.append(wave)
            wave, used = [], 0.0
        wave.append(name)
        used += need
    return result + ([wave] if wave else [])


FP32_CHECK = "fp32_equality"


def apply_round_settings(spec: dict) -> None:
    """The package's switches as variant `spec` sets them; what it does not name keeps its shipped value."""
    from specvlm_hf import round as round_module

    round_module.MERGE_REPEATED = spec.get("merge", round_module.MERGE_REPEATED)
    round_module.JOIN_PROJECTIONS = spec.get("join", round_module.JOIN_PROJECTIONS)
    round_module.AUTOTUNE_GEMMS = spec.get("autotune_gemms", round_module.AUTOTUNE_GEMMS)
    import gpu_long_running

    gpu_long_running.FP8_HEAD = spec.get("fp8_head", False)  # a draft setting, applied where drafts are built
    from specvlm_hf import kernels

    kernels.FUSED = spec.get("fused_top_k", kernels.FUSED)
    kernels.ATTENTION = spec.get("attention", kernels.ATTENTION)
    if spec.get("verify_attention"):
        round_module.VERIFY_ATTENTION = spec["verify_attention"]


def fp32_child(sync_dir: str, new_tokens: int, variant: str) -> dict:
    """Greedy fp32 equality of the fast path (compiled by inductor with the package's passes, CUDA graphs) with plain
    `generate` at 5 prompt lengths, on the tiny LLaVA shape on the GPU; run while the variants compile. `variant`'s
    round settings apply (its merging pass, joined projections, GEMM autotuning, verify attention and fp8 draft head;
    the 7B-only knobs do not)."""
    import gpu_long_running

    apply_round_settings(VARIANTS[variant])

    result = gpu_long_running.fp32_equality_rows((40, 300, 601, 900, 1500), new_tokens)
    open(os.path.join(sync_dir, f"ready_{FP32_CHECK}"), "w").close()
    from specvlm_hf.hf_internals import MergeRepeatedCounts

    return {
        "variant": FP32_CHECK,
        "settings_of": variant,
        **result,
        "merged_nodes": MergeRepeatedCounts.removed,
        "joined_products": MergeRepeatedCounts.joined,
    }


def child(name: str, sync_dir: str, new_tokens: int, fp32_variant: str = "default") -> dict:
    """One variant: build, warm both methods at both prompts, wait for the others, measure under the lock."""
    sys.path.insert(0, os.path.join(HERE, ".."))
    sys.path.insert(0, HERE)
    if name == FP32_CHECK:
        return fp32_child(sync_dir, new_tokens, fp32_variant)
    spec = VARIANTS[name]
    import torch

    import gpu_long_running
    from fused_projections import fuse_projections
    from gpu_fast_path import plain_ms_per_token, tree_round
    from specvlm_hf.hf_internals import MergeRepeatedCounts

    if spec.get("max_autotune"):
        from torch._inductor import config as inductor_config

        inductor_config.max_autotune = True
    apply_round_settings(spec)
    gpu_long_running.DRAFT_VOCAB = spec.get("draft_vocab")
    result = {"variant": name, "spec": spec}
    start = time.perf_counter()
    target, draft = gpu_long_running.build()
    if spec.get("fp8_draft"):
        from fp8_draft import use_fp8_products

        result["fp8_products"] = use_fp8_products(draft)
    if spec.get("fuse"):
        result["fused_groups"] = fuse_projections(target.model.language_model) + fuse_projections(draft)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    prompts = [gpu_long_running.make_inputs(n, torch.Generator().manual_seed(i)) for i, n in enumerate(LENGTHS)]

    def measure() -> list[dict]:
        rows = []
        for length, inputs in zip(LENGTHS, prompts):
            token = plain_ms_per_token(target, inputs, new_tokens, cache_implementation="static")
            fast = tree_round(target, draft, inputs, new_tokens, cache_implementation="static")
            rows.append(
                {
                    "prompt_length": length,
                    "static_ms_per_token": token,
                    "median_ms_per_round": fast["median_ms_per_round"],
                    "draft_ms_per_round": fast["draft_ms_per_round"],
                    "verify_ms_per_round": fast["verify_ms_per_round"],
                    "round_over_static_token": fast["median_ms_per_round"] / token,
                    "rounds": fast["rounds"],
                    "tokens": fast["tokens"],
                }
            )
        return rows

    measure()  # compiles both methods, captures both buckets' graphs
    result["warm_seconds"] = time.perf_counter() - start
    result["merged_nodes"] = MergeRepeatedCounts.removed
    result["joined_products"] = MergeRepeatedCounts.joined
    result["memory_allocated_GB"] = torch.cuda.memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0
    open(os.path.join(sync_dir, f"ready_{name}"), "w").close()
    while not os.path.exists(os.path.join(sync_dir, "go")):
        time.sleep(0.5)
    with open(os.path.join(sync_dir, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            result["measured_at"] = time.strftime("%H:%M:%S")
            result["rows"] = measure()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return result


def gpu_memory_gb() -> float:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
        )
        return float(out.stdout.split()[0]) / 1024
    except Exception:
        return 80.0


def run_wave(names, args, sync_dir, deadline, results, out_path) -> None:
    """Starts the wave's children, says `go` once all are warm (or dead, or at the compile deadline), collects."""
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS=str(args.compile_threads), PYTHONUNBUFFERED="1")
    children = {}
    for name in names:
        log = open(os.path.join(args.out, f"{name}.log"), "w")
        command = [sys.executable, os.path.abspath(__file__), "--child", name, "--sync-dir", sync_dir]
        command += ["--new-tokens", str(args.new_tokens), "--fp32-variant", args.fp32_variant]
        command += ["--smoke"] if SMOKE else []
        children[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log)
    compile_deadline = min(deadline, time.time() + args.compile_seconds)
    while time.time() < compile_deadline:
        waiting = [
            n
            for n, (p, _) in children.items()
            if p.poll() is None and not os.path.exists(os.path.join(sync_dir, f"ready_{n}"))
        ]
        if not waiting:
            break
        time.sleep(1)
    ready = [n for n in names if os.path.exists(os.path.join(sync_dir, f"ready_{n}"))]
    print(f"go: {len(ready)} of {len(names)} warm ({', '.join(ready)}) at {time.strftime('%H:%M:%S')}", flush=True)
    for name, (process, _) in children.items():
        if name not in ready and process.poll() is None:
            process.kill()  # still compiling: it would share the GPU with the measurements
            results[name] = {"variant": name, "error": "not warm by the compile deadline"}
    open(os.path.join(sync_dir, "go"), "w").close()
    for name, (process, log) in children.items():
        try:
            process.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            process.kill()
            results.setdefault(name, {"variant": name, "error": "over the run's deadline"})
        log.close()
        with open(os.path.join(args.out, f"{name}.log")) as handle:
            lines = [line for line in handle.read().splitlines() if line.startswith("CHILD ")]
        if lines:
            results[name] = json.loads(lines[-1][len("CHILD ") :])
        else:
            results.setdefault(name, {"variant": name, "error": f"exit {process.returncode}: see {name}.log"})
        write(results, out_path)
    os.remove(os.path.join(sync_dir, "go"))


def write(results: dict, path: str) -> None:
    with open(path, "w") as handle:
        json.dump(results, handle, indent=1)


def table(results: dict) -> str:
    lines = [
        "| variant | token 601 | round 601 (draft / verify) | round / token | token 2137 | round 2137 "
        "| round / token |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in results.get("variants", {}).items():
        if name == FP32_CHECK:
            continue
        rows = result.get("rows")
        if not rows:
            lines.append(f"| {name} | {result.get('error', 'no rows')} | | | | | |")
            continue
        if any("compile failed" in w for w in result.get("fast_path_warnings", ())):
            name += " (compile failed: eager kernels)"
        a, b = rows
        cells = [
            f"{a['static_ms_per_token']:.2f}",
            f"{a['median_ms_per_round']:.2f} ({a['draft_ms_per_round']:.2f} / {a['verify_ms_per_round']:.2f})",
            f"{a['round_over_static_token']:.2f}x",
            f"{b['static_ms_per_token']:.2f}",
            f"{b['median_ms_per_round']:.2f}",
            f"{b['round_over_static_token']:.2f}x",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def first_differences(results: dict) -> None:
    """Records, per variant, the first token at which its bf16 output differs from the default's at each prompt."""
    reference = results.get("variants", {}).get("default", {}).get("rows")
    for name, result in results.get("variants", {}).items():
        rows = result.get("rows")
        if reference and rows and name not in ("default", FP32_CHECK):
            result["bf16_first_difference_from_default"] = [
                next((i for i, (x, y) in enumerate(zip(r["tokens"], s["tokens"])) if x != y), None)
                for r, s in zip(reference, rows)
            ]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="default,separate,vocab8k")
    parser.add_argument("--out", default="results/round_variants")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--parallel", type=int, default=None, help="variants at once (default: by GPU memory)")
    parser.add_argument("--compile-seconds", type=float, default=330, help="a wave's time to warm up")
    parser.add_argument("--deadline", type=float, default=560, help="seconds after which everything stops")
    parser.add_argument("--compile-threads", type=int, default=4, help="inductor compile workers per variant")
    parser.add_argument(
        "--fp32-check",
        action="store_true",
        help="also check greedy fp32 equality of the compiled fast path on a tiny LLaVA, beside the first wave",
    )
    parser.add_argument("--fp32-variant", default="default", help="the variant whose round settings the check uses")
    parser.add_argument("--smoke", action="store_true", help="the plumbing on the CPU (see the module docstring)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sync-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = child(args.child, args.sync_dir, args.new_tokens, args.fp32_variant)
            except Exception as error:
                traceback.print_exc()
                result = {"variant": args.child, "error": repr(error)[:800]}
        for warning in caught:  # still in the log
            print(warnings.formatwarning(warning.message, warning.category, warning.filename, warning.lineno), end="")
        # a round function that failed to compile runs its graphs over eager kernels: its figures are not the variant's
        result["fast_path_warnings"] = [str(w.message)[:400] for w in caught if "SpecVLM fast path" in str(w.message)]
        print("CHILD " + json.dumps(result), flush=True)
        return
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS and n != FP32_CHECK]
    if unknown or args.fp32_variant not in VARIANTS:
        parser.error(f"unknown variants {unknown or [args.fp32_variant]}: choose from {sorted(VARIANTS)}")
    os.makedirs(args.out, exist_ok=True)
    memory = 3 * GB_PER_VARIANT if SMOKE else gpu_memory_gb()
    planned = waves(names, memory - (GB_FP32_CHECK if args.fp32_check else 0), args.parallel)
    deadline = time.time() + args.deadline
    sys.path.insert(0, os.path.join(HERE, ".."))
    from specvlm_hf.bench import software_versions

    results = {
        **software_versions(),
        "shape": "LLaVA-1.5-7B (random weights, bf16, sdpa, batch 1, default tree)",
        "new_tokens": args.new_tokens,
        "gpu_memory_GB": memory,
        "waves": planned,
        "variants": {},
    }
    out_path = os.path.join(args.out, "gpu_round_variants.json")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="specvlm_variants_"))
    for index, wave in enumerate(planned):
        if time.time() > deadline - 120:
            for name in [n for later in planned[index:] for n in later]:
                results["variants"][name] = {"variant": name, "error": "no time left for its wave"}
            break
        sync_dir = tempfile.mkdtemp(prefix="specvlm_sync_")
        wave = wave + ([FP32_CHECK] if args.fp32_check and index == 0 else [])
        run_wave(wave, args, sync_dir, deadline, results["variants"], out_path)
    first_differences(results)
    print(table(results), flush=True)
    if FP32_CHECK in results["variants"]:
        print(FP32_CHECK, json.dumps(results["variants"][FP32_CHECK]), flush=True)
    for result in results["variants"].values():
        for row in result.get("rows") or []:
            row.pop("tokens", None)
    write(results, out_path)
    print("SUMMARY", json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
