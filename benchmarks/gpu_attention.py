"""The tree verify's attention alone, kernel against kernel (issue 13: a round cheaper than a compiled token).

One layer's attention of a verify forward on the LLaVA-1.5-7B shape: `Q` tree queries (60, the default tree) over a
static cache of `W` slots (the length bucket) of which the first `length` hold the prefix and the next `Q` the tree
(its ancestor mask), 32 heads of 128, bf16. Each variant runs inside one CUDA graph (as in the fast path), timed
over many replays; its output is checked against an fp32 reference. Variants:

- `sdpa_default`: `scaled_dot_product_attention` with an additive mask and torch's own choice (cuDNN on Hopper),
  what the fast path runs today; `sdpa_efficient`: the memory-efficient kernel;
- `sdpa_math_compiled`: sdpa's math form compiled by inductor (two GEMMs, a fused masked softmax);
- `split_kv_compiled_N`: the product's `verify_attention.split_kv_attention` (`VERIFY_ATTENTION=SPLIT_KV`) with
  chunks of `N` slots: each chunk a batch entry of one fused kernel that returns its log-sum-exp (more thread blocks
  than the fused kernels' one per head), merged by log-sum-exp; `split_kv_eager_256` uncompiled;
  `split_kv_cudnn_compiled_256_dynamic` with cuDNN's kernel for the chunks instead of the memory-efficient one;
- `package_tree_rR_pP_M_wW` (GPU): the package's kernels (`kernels.tree_attention`, `verify_attention.TREE`):
  programs of R queries of one head over slices of the cache, lengthened until there are at most P programs, tiles
  no query sees skipped (M `b`: their arithmetic too, by a branch; `p`: only their reads), W warps a program, then
  one merge kernel; `package_tree` is the shipped setting;
- `transformers_flex_compiled`: transformers' `flex_attention` forward with the additive mask
  (`VERIFY_ATTENTION="flex_attention"`; torch's flex decoding kernel splits the cache across thread blocks);
- `flex_block_mask_compiled_128`: `flex_attention` with a block mask built inside the graph from the slot
  visibility, which also skips the blocks no query sees (the unused end of the bucket);
- `*_dynamic`: the same compiled with dynamic shapes, as the fast path compiles its rounds (the cache width varies
  by bucket, one compile serves all): inductor's kernels for a reduction of unknown length;
- `token_sdpa_default`: one query (a plain decode token's attention), for scale.

The floor is the K and V bytes of the `length + Q` slots in use read once at the measured copy bandwidth.

    python benchmarks/gpu_attention.py --out $OUT/attention.json [--widths 1024,2048] [--variants a,b] [--queries 10]

`--queries 10` is a draft level's attention (10 frontier nodes) instead of the verify's 60 tree nodes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from gpu_check_tree import copy_bandwidth  # noqa: E402
from specvlm_hf.bench import software_versions  # noqa: E402

HEADS, HEAD_DIM, QUERIES = 32, 128, 60


class Layer(torch.nn.Module):
    """What transformers' attention functions read of the attention layer calling them."""

    num_key_value_groups = 1
    is_causal = True


LAYER = Layer().eval()


def tree_visibility(queries: int, width: int, length: int, device) -> torch.Tensor:
    """`(Q, W)` bool: the prefix's `length` slots, and within the tree block each node's ancestors and itself (a
    random tree: each node's parent drawn among the nodes before it)."""
    ancestors = torch.eye(queries, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    for node in range(1, queries):
        parent = int(torch.randint(0, node, (1,), generator=generator))
        ancestors[node] |= ancestors[parent]
    visible = torch.zeros(queries, width, dtype=torch.bool)
    visible[:, :length] = True
    visible[:, length : length + queries] = ancestors
    return visible.to(device)


def reference(q, k, v, visible):
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def sdpa(q, k, v, additive):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=additive)


def math_attention(q, k, v, additive):
    scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1]) + additive.float()
    return scores.softmax(-1).to(q.dtype) @ v


def split_kv(chunk: int):
    """The product's kernel (`verify_attention.split_kv_attention`) in chunks of `chunk` slots."""
    from specvlm_hf import verify_attention

    def attend(q, k, v, additive):
        verify_attention.CHUNK = chunk  # read when traced
        return verify_attention.split_kv_attention(LAYER, q, k, v, additive)[0].transpose(1, 2)

    return attend


def split_kv_on(kernel: str, chunk: int):
    """The product's kernel with the chunks' attention on another fused kernel than `hf_internals.attention_with_lse`
    picks (the memory-efficient one on CUDA): `"cudnn"`."""
    from specvlm_hf import verify_attention

    def cudnn_with_lse(query, key, value, bias, scale):
        output, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, key, value, bias, True, 0.0, False, False, scale=scale
        )[:2]
        return output, lse.flatten(2)[..., : query.shape[-2]]

    kernels = {"cudnn": cudnn_with_lse}
    inner = split_kv(chunk)

    def attend(q, k, v, additive):
        saved = verify_attention.attention_with_lse
        verify_attention.attention_with_lse = kernels[kernel]
        try:
            return inner(q, k, v, additive)
        finally:
            verify_attention.attention_with_lse = saved

    return attend


def transformers_flex(q, k, v, additive):
    """transformers' `flex_attention` forward with the verify's additive mask (`VERIFY_ATTENTION="flex_attention"`):
    no block is skipped, the mask is added to every score."""
    from transformers.integrations.flex_attention import flex_attention_forward

    return flex_attention_forward(LAYER, q, k, v, additive)[0].transpose(1, 2)


def flex(block: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def attend(q, k, v, visible):
        def mask_mod(b, h, q_index, kv_index):
            return visible[q_index, kv_index]

        block_mask = create_block_mask(mask_mod, None, None, q.shape[2], k.shape[2], device=q.device, BLOCK_SIZE=block)
        return flex_attention(q, k, v, block_mask=block_mask)

    return attend


KNOBS = ("ATTENTION_ROWS", "ATTENTION_PROGRAMS", "ATTENTION_STEPS", "ATTENTION_BRANCH", "ATTENTION_WARPS")


def package_tree(**knobs):
    """The package's kernels with some of its knobs (`kernels.ATTENTION_*`, by lower-case name without the prefix)
    set for the call; read when a call launches the kernels."""
    from specvlm_hf import kernels

    def attend(q, k, v, additive):
        saved = {name: getattr(kernels, name) for name in KNOBS}
        for name, value in knobs.items():
            setattr(kernels, "ATTENTION_" + name.upper(), value)
        try:
            return kernels.tree_attention(q, k, v, additive, q.shape[-1] ** -0.5).transpose(1, 2)
        finally:
            for name, value in saved.items():
                setattr(kernels, name, value)

    return attend


def timed(fn, args, device, replays: int) -> float:
    """Microseconds per call: in a CUDA graph on the GPU (replayed), directly on the CPU."""
    for _ in range(3):
        fn(*args)
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(replays):
            fn(*args)
        return 1e6 * (time.perf_counter() - start) / replays
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    for _ in range(10):
        graph.replay()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * begin.elapsed_time(end) / replays


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU miniature: small widths, few repeats")
    parser.add_argument("--widths", default="")
    parser.add_argument("--out", default="")
    parser.add_argument("--variants", default="", help="comma-separated names (default: all)")
    parser.add_argument("--queries", type=int, default=QUERIES, help="tree queries (60: a verify; 10: a draft level)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    heads = 4 if args.smoke else HEADS
    widths = [int(w) for w in args.widths.split(",") if w] or ([256, 512] if args.smoke else [1024, 2048, 4096])
    replays = 3 if args.smoke else 200
    bandwidth = copy_bandwidth(device.type)
    variants = {
        "sdpa_default": (sdpa, "additive", False),
        "sdpa_math_compiled": (math_attention, "additive", True),
        "split_kv_compiled_128": (split_kv(128), "additive", True),
        "split_kv_compiled_256": (split_kv(256), "additive", True),
        "split_kv_compiled_512": (split_kv(512), "additive", True),
        "transformers_flex_compiled": (transformers_flex, "additive", True),
        "flex_block_mask_compiled_128": (flex(128), "visible", True),
        # compiled as the fast path compiles its rounds: the cache width dynamic (one compile for every bucket)
        "sdpa_math_compiled_dynamic": (math_attention, "additive", "dynamic"),
        "split_kv_compiled_256_dynamic": (split_kv(256), "additive", "dynamic"),
        "split_kv_compiled_128_dynamic": (split_kv(128), "additive", "dynamic"),
        "split_kv_compiled_512_dynamic": (split_kv(512), "additive", "dynamic"),
        "split_kv_eager_256": (split_kv(256), "additive", False),
    }
    if device.type == "cuda":
        variants["split_kv_cudnn_compiled_256_dynamic"] = (split_kv_on("cudnn", 256), "additive", "dynamic")
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        variants["package_tree"] = (package_tree(), "additive", False)
        for rows in (16, 32, 64):
            for programs in (128, 256, 512):
                for branch in (True, False):
                    for warps in (4, 8):
                        name = f"package_tree_r{rows}_p{programs}_{'b' if branch else 'p'}_w{warps}"
                        knobs = dict(rows=rows, programs=programs, branch=branch, warps=warps)
                        variants[name] = (package_tree(**knobs), "additive", False)
    if device.type == "cuda":
        variants["sdpa_efficient"] = (sdpa, "additive", "efficient")
    else:  # inductor's CPU flex kernel with a bf16 additive mask crashes the process (torch 2.13, seen here)
        del variants["transformers_flex_compiled"]
    chosen = [name for name in args.variants.split(",") if name]
    unknown = sorted(set(chosen) - set(variants))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose among {sorted(variants)}")
    variants = {name: variants[name] for name in chosen} if chosen else variants
    results = {
        **software_versions(),
        "shape": f"{heads} heads x {HEAD_DIM}, {args.queries} tree queries, bf16",
        "copy_bandwidth_TBps": bandwidth / 1e12,
        "rows": [],
    }
    torch.manual_seed(0)
    queries = args.queries
    for width in widths:
        length = width - queries - 64
        q = torch.randn(1, heads, queries, HEAD_DIM, dtype=torch.bfloat16, device=device)
        k = torch.randn(1, heads, width, HEAD_DIM, dtype=torch.bfloat16, device=device)
        v = torch.randn(1, heads, width, HEAD_DIM, dtype=torch.bfloat16, device=device)
        k[:, :, length + queries :] = 1e4  # stale slots: garbage that must stay masked
        visible = tree_visibility(queries, width, length, device)
        additive = torch.zeros(1, 1, queries, width, dtype=torch.bfloat16, device=device)
        additive.masked_fill_(~visible, torch.finfo(torch.bfloat16).min)
        expected = reference(q, k, v, visible)
        floor_us = 1e6 * 2 * heads * (length + queries) * HEAD_DIM * 2 / bandwidth
        row = {"width": width, "length": length, "floor_us": floor_us, "us": {}, "max_error": {}}
        for name, (fn, mask_kind, mode) in variants.items():
            mask = additive if mask_kind == "additive" else visible
            try:
                torch._dynamo.reset()  # each variant and width compiles afresh (not against the recompile limit)
                call = torch.compile(fn, dynamic=mode == "dynamic") if mode in (True, "dynamic") else fn
                if mode == "efficient":
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    def call(*a, _fn=fn):
                        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                            return _fn(*a)

                output = call(q, k, v, mask)
                row["max_error"][name] = (output.float() - expected.float()).abs().max().item()
                row["us"][name] = timed(call, (q, k, v, mask), device, replays)
            except Exception as error:  # keep the other variants
                row["us"][name] = repr(error)[:300]
        token_q = q[:, :, :1]
        token_mask = additive[:, :, :1]
        row["us"]["token_sdpa_default"] = timed(sdpa, (token_q, k, v, token_mask), device, replays)
        print(json.dumps(row), flush=True)
        results["rows"].append(row)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
