"""The tree loop with a target split over two GPUs (`device_map`), against plain `generate` on the same split.

LLaVA-1.5-7B shape with random weights; the split is forced (GPU 0 gets the vision tower and the first
decoder layers, GPU 1 the rest and the `lm_head`, where the draft is placed). Reports whether greedy outputs
are identical and the time per token / per round. `TINY=1` runs a CPU miniature (no split) as a dry run.

    python benchmarks/gpu_device_map.py --dtype float32 --out results/gpu_device_map.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import specvlm_hf  # noqa: E402
from gpu_check_tree import TINY, first_difference, llava_7b_shaped, write_result  # noqa: E402
from specvlm_hf.bench import software_versions  # noqa: E402
from specvlm_hf import SpecVLMDraftModel  # noqa: E402


def split_over_two_gpus(model):
    from accelerate import dispatch_model

    layers = len(model.model.language_model.layers)
    device_map = {
        "model.vision_tower": 0,
        "model.multi_modal_projector": 0,
        "model.language_model.embed_tokens": 0,
        "model.language_model.rotary_emb": 0,
        "model.language_model.norm": 1,
        "lm_head": 1,
    }
    for index in range(layers):
        device_map[f"model.language_model.layers.{index}"] = 0 if index < layers // 2 else 1
    return dispatch_model(model, device_map=device_map)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--out", default="results/gpu_device_map.json")
    args = parser.parse_args()
    dtype = torch.float32 if TINY else getattr(torch, args.dtype)
    target = llava_7b_shaped("cpu", dtype)
    if not TINY:
        target = split_over_two_gpus(target)
    specvlm_hf.enable(target)
    draft = SpecVLMDraftModel.from_target(target)  # bound: placed with the lm_head (GPU 1)
    first_device = "cpu" if TINY else "cuda:0"
    generator = torch.Generator().manual_seed(3)
    rows = []
    for prompt in range(args.prompts):
        text = torch.randint(2, 32000, (40,), generator=generator)
        input_ids = torch.cat([text[:5], torch.full((576,), 32000), text[5:]])[None].to(first_device)
        inputs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=torch.randn(1, 3, 336, 336, generator=generator).to(first_device, dtype),
        )
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        with torch.inference_mode():
            start = time.perf_counter()
            plain = target.generate(**inputs, **kwargs)
            plain_s = time.perf_counter() - start
            start = time.perf_counter()
            spec = target.generate(**inputs, **kwargs, assistant_model=draft)
            spec_s = time.perf_counter() - start
            spec_stats = draft.stats
            # the fast path's loop on a split target (static caches; no CUDA graphs across devices)
            start = time.perf_counter()
            static = target.generate(**inputs, **kwargs, assistant_model=draft, cache_implementation="static")
            static_s = time.perf_counter() - start
        new = input_ids.shape[1]
        rows.append(
            {
                "prompt": prompt,
                "identical": plain.tolist() == spec.tolist(),
                "first_difference_at": first_difference(plain[0, new:].tolist(), spec[0, new:].tolist()),
                "plain_ms_per_token": 1000 * plain_s / args.new_tokens,
                "tree_ms_per_round": 1000 * (spec_s - spec_stats.prefill_seconds) / max(spec_stats.rounds, 1),
                "sigma": spec_stats.sigma,
                "static_loop_identical": plain.tolist() == static.tolist(),
                "static_loop_ms_per_round": 1000
                * (static_s - draft.stats.prefill_seconds)
                / max(draft.stats.rounds, 1),
                "draft_device": str(draft.fc.weight.device),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "what": f"LLaVA-1.5-7B shape split over two GPUs with device_map, random {args.dtype} weights, greedy",
        **software_versions(),
        "machine": " + ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "cpu",
        "identical_outputs": f"{sum(r['identical'] for r in rows)}/{len(rows)}",
        "rows": rows,
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
