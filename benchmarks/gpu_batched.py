"""Batched tree decoding on one GPU: measured throughput on the mini VLM, round cost on the LLaVA-1.5-7B shape.

1. Mini VLM (shipped SpecVLM draft, measured sigma), batch sizes 1, 2, 4, 8, 16: tokens/s of plain batched
   `generate` (eager, and `cache_implementation="static"`, which transformers compiles), of the tree loop
   (eager, dynamic caches) and of its fast path (static caches, CUDA graphs), through `specvlm bench`'s
   `run_bench(batch_size=B)`, with the greedy equality check against plain batched `generate`.
2. LLaVA-1.5-7B shape (random bf16 weights, sdpa): ms per round of the fast path against batch size and tree size
   (total tokens per row 60, 32, 16, 8; the batch rule off, so each size is measured), ms per token of plain
   batched `generate` (eager and compiled static), and the throughput projected at the paper's sigma (3.67):
   `B * sigma / round` against `B / token`. Random weights accept nothing, so these are projections, labelled.
   The script also prints which tree size the rule in `specvlm_hf.decoding.tree_tokens_for_batch` picks.
3. `throughput_vs_batch.png`: both against batch size.

    python benchmarks/gpu_batched.py --out $OUT/batched          # about 5 minutes on one H200
    python benchmarks/gpu_batched.py --smoke --out /tmp/batched  # CPU dry run of every section, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
if "--smoke" in sys.argv:
    os.environ["TINY"] = "1"  # gpu_check_tree's tiny 7B-shaped miniature

import torch  # noqa: E402

import specvlm_hf  # noqa: E402
from specvlm_hf.bench import software_versions  # noqa: E402
from specvlm_hf import SpecVLMDraftModel  # noqa: E402
from specvlm_hf.bench import run_bench  # noqa: E402
from specvlm_hf.decoding import tree_tokens_for_batch  # noqa: E402


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def mini_section(device, dtype, batches, prompts, new_tokens, compile_tree):
    """tokens/s per method and batch size on the mini VLM with its shipped drafts."""
    from specvlm_hf import bench
    from specvlm_hf.commands.bench import _load_target, _mini_cases, _mini_drafts

    target, processor = _load_target("mini", device, dtype)
    cases = _mini_cases(processor, prompts, device, dtype, target.config, new_tokens)
    drafts = {"specvlm": _mini_drafts(target)["specvlm"]}
    drafts["specvlm"].config.max_speculative_batch = max(batches)  # measure every batch: the default stops above 4
    methods = ("plain", "plain-static", "specvlm-tree", "specvlm-tree-static")
    original = bench.method_kwargs

    def method_kwargs(method, drafts, assistant_lm=None):  # the tree fast path over eager kernels unless asked
        kwargs = original(method, drafts, assistant_lm)
        if method.endswith("tree-static") and isinstance(kwargs, dict) and not compile_tree:
            kwargs["disable_compile"] = True
        return kwargs

    bench.method_kwargs = method_kwargs
    out = {}
    try:
        for batch in batches:
            start = time.perf_counter()
            report = run_bench(target, cases, drafts, methods, new_tokens, batch_size=batch)
            rows = {
                row["method"]: {
                    key: row[key]
                    for key in (
                        "status",
                        "tokens_per_second",
                        "sigma",
                        "round_ms",
                        "matches_plain",
                        "speedup",
                        "rows_per_round",
                    )
                }
                for row in report["methods"]
            }
            out[str(batch)] = {"methods": rows, "seconds": time.perf_counter() - start}
            print("mini", batch, json.dumps(rows), flush=True)
    finally:
        bench.method_kwargs = original
    return out


def seven_b_section(device, dtype, batches, trees, new_tokens, sigma, out, save=None, compile_tree=False):
    """Fast-path ms per round against batch and tree size, plain batched ms per token, projected throughput; fills
    `out` as it goes (a timeout keeps what was measured)."""
    from gpu_check_tree import TokenClock, llava_7b_shaped

    target = specvlm_hf.enable(llava_7b_shaped(device, dtype))
    draft = SpecVLMDraftModel.from_target(target)
    draft.config.batch_verify_tokens = 10**9  # measure every tree size: the batch rule off
    draft.config.max_speculative_batch = 10**9
    generator = torch.Generator().manual_seed(0)

    def inputs_for(batch):
        rows = []
        for _ in range(batch):
            text = torch.randint(2, 32000, (40,), generator=generator)
            rows.append(torch.cat([text[:5], torch.full((576,), 32000), text[5:]]))
        ids = torch.stack(rows).to(device)
        pixels = torch.randn(batch, 3, 336, 336, generator=generator).to(device, dtype)
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)

    def timed(fn):
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            result = fn()
        sync(device)
        return time.perf_counter() - start, result

    out.update({"plain_ms_per_token": {}, "static_ms_per_token": {}, "round_ms": {}, "projected_tokens_per_s": {}})
    fixed = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    for batch in batches:
        inputs = inputs_for(batch)
        for name, extra in (("plain_ms_per_token", {}), ("static_ms_per_token", {"cache_implementation": "static"})):
            try:
                timed(lambda: target.generate(**inputs, **fixed, **extra))  # warm up (compile / capture)
                clock = TokenClock()
                timed(lambda: target.generate(**inputs, **fixed, **extra, streamer=clock))
                steps = sorted(b - a for a, b in zip(clock.times[2:-1], clock.times[3:]))  # after the prefill
                out[name][str(batch)] = 1000 * steps[len(steps) // 2]  # median ms per decoding step
            except Exception as error:
                out[name][str(batch)] = repr(error)[:300]
                traceback.print_exc()
        for tree in trees:
            key = f"{batch}x{tree}"
            draft.config.tree_total_tokens = tree
            try:
                kwargs = dict(assistant_model=draft, cache_implementation="static", **fixed)
                if not compile_tree:
                    kwargs["disable_compile"] = True
                timed(lambda: target.generate(**inputs, **kwargs))  # capture this (batch, tree) shape's graphs
                wall, _ = timed(lambda: target.generate(**inputs, **kwargs))
                stats = draft.stats
                out["round_ms"][key] = 1000 * (wall - stats.prefill_seconds) / max(stats.rounds, 1)
            except Exception as error:
                out["round_ms"][key] = repr(error)[:300]
                traceback.print_exc()
        print("7b", batch, {k: v for k, v in out["round_ms"].items() if k.startswith(f"{batch}x")}, flush=True)
        if save is not None:
            save()
    # projections: tokens/s of the batch at the paper's sigma, per tree size, against plain batched decoding
    rule = {}
    for batch in batches:
        plain = out["static_ms_per_token"].get(str(batch))
        row = {"plain_static": 1000 * batch / plain if isinstance(plain, float) else None}
        for tree in trees:
            ms = out["round_ms"].get(f"{batch}x{tree}")
            row[f"tree{tree}"] = 1000 * batch * sigma / ms if isinstance(ms, float) else None
        out["projected_tokens_per_s"][str(batch)] = row
        draft.config.batch_verify_tokens = 256
        draft.config.max_speculative_batch = specvlm_hf.decoding.MAX_SPECULATIVE_BATCH
        draft.config.tree_total_tokens = max(trees)
        rule[str(batch)] = tree_tokens_for_batch(draft.config, batch)
    out["rule_tree_tokens"] = rule
    out["projection"] = {"sigma": sigma, "label": "projection: measured round cost at the paper's sigma"}
    return out


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    mini = results.get("mini", {})
    if isinstance(mini, dict) and "error" not in mini:
        batches = sorted(int(b) for b in mini)
        for method in ("plain", "plain-static", "specvlm-tree", "specvlm-tree-static"):
            values = [
                mini[str(b)]["methods"].get(method, {}).get("tokens_per_second") or float("nan") for b in batches
            ]
            axes[0].plot(batches, values, marker="o", label=method)
        axes[0].set(xscale="log", xlabel="batch size", ylabel="tokens/s (all rows)", title="mini VLM (measured)")
        axes[0].set_xticks(batches, [str(b) for b in batches])
        axes[0].legend()
    seven = results.get("llava7b", {})
    projected = seven.get("projected_tokens_per_s", {}) if isinstance(seven, dict) else {}
    if projected:
        batches = sorted(int(b) for b in projected)
        for series in projected[str(batches[0])]:
            values = [projected[str(b)].get(series) or float("nan") for b in batches]
            axes[1].plot(batches, values, marker="o", label=series)
        sigma = seven["projection"]["sigma"]
        axes[1].set(
            xscale="log",
            xlabel="batch size",
            ylabel="tokens/s",
            title=f"LLaVA-1.5-7B shape (projected, sigma {sigma})",
        )
        axes[1].set_xticks(batches, [str(b) for b in batches])
        axes[1].legend()
    fig.suptitle(f"{results['machine']}: batched tree decoding against plain batched generate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/batched", help="folder for the JSON and the PNG")
    parser.add_argument("--smoke", action="store_true", help="CPU dry run: tiny shapes, batches 1 and 2")
    parser.add_argument("--sigma", type=float, default=3.67, help="acceptance length of the projection")
    parser.add_argument("--compile-tree", action="store_true", help="torch.compile the batched fast path too")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: mini,llava7b")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,2,4,8,16)")
    parser.add_argument("--trees", default=None, help="comma-separated 7B tree sizes (default 60,32,16,8)")
    parser.add_argument(
        "--mini-dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="the mini section's dtype (float32: the equality with plain batched generate is exact, not bf16 noise)",
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    device = "cpu" if args.smoke else "cuda"
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        settings = dict(batches=[1, 2], prompts=2, mini_tokens=8, trees=[16, 8], tokens_7b=6)
    else:
        settings = dict(batches=[1, 2, 4, 8, 16], prompts=16, mini_tokens=64, trees=[60, 32, 16, 8], tokens_7b=24)
    if args.batches:
        settings["batches"] = [int(b) for b in args.batches.split(",")]
    if args.trees:
        settings["trees"] = [int(t) for t in args.trees.split(",")]
    results = {
        **software_versions(),
        "settings": settings,
        "mini_dtype": "float32" if args.smoke else args.mini_dtype,
        "tree_fast_path": "CUDA graphs over torch.compile kernels"
        if args.compile_tree
        else "CUDA graphs, eager kernels",
    }
    json_path = os.path.join(args.out, "gpu_batched.json")

    def save():
        with open(json_path, "w") as handle:
            json.dump(results, handle, indent=1)

    def section(name, fn):
        if name in skip:
            return
        start = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as error:  # keep the other section
            results[name] = {"error": repr(error)[:800]}
            traceback.print_exc()
        results[f"{name}_seconds"] = time.perf_counter() - start
        save()  # after each section: a timeout keeps what was measured

    dtype = torch.float32 if args.smoke else torch.bfloat16
    section(
        "mini",
        lambda: mini_section(
            device,
            torch.float32 if args.smoke else getattr(torch, args.mini_dtype),
            settings["batches"],
            settings["prompts"],
            settings["mini_tokens"],
            args.compile_tree,
        ),
    )
    results["llava7b"] = {}
    section(
        "llava7b",
        lambda: seven_b_section(
            device,
            dtype,
            settings["batches"],
            settings["trees"],
            settings["tokens_7b"],
            args.sigma,
            results["llava7b"],
            save,
            args.compile_tree,
        ),
    )
    plot(results, os.path.join(args.out, "throughput_vs_batch.png"))
    print(f"wrote {json_path} and throughput_vs_batch.png")


if __name__ == "__main__":
    main()
