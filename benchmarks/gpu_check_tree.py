"""GPU check of the tree loop on a LLaVA-1.5-7B-shaped target (random bf16 weights, sdpa).

For several random prompts (576 image tokens + text) it generates `--new-tokens` tokens greedily with plain
`generate` and with the SpecVLM tree loop (a freshly initialised one-layer draft, so acceptance is low:
this measures cost and exactness, not speed-up), and reports:

- whether the outputs are token-identical, and where they first differ, with the target's top-2 logit gap
  at that step (bf16 kernels for a 60-token tree and for a 1-token step round differently; with random
  weights near-ties are common, and a tie broken differently changes the rest of the sequence);
- the time per round (draft / verify split) and per plain token.

`TINY=1` runs a CPU miniature for a dry run. Usage:
    python benchmarks/gpu_check_tree.py --out results/gpu_check_tree.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import specvlm_hf  # noqa: E402
from specvlm_hf.bench import software_versions  # noqa: E402
from specvlm_hf import SpecVLMDraftModel  # noqa: E402

TINY = os.environ.get("TINY") == "1"


def llava_7b_shaped(device, dtype, seed=0):
    """LLaVA-1.5-7B shapes (CLIP-L/14-336, 576 image tokens, Llama-7B, vocab 32064) with random weights."""
    hidden = 256 if TINY else 4096
    vision = CLIPVisionConfig(
        hidden_size=64 if TINY else 1024,
        intermediate_size=128 if TINY else 4096,
        num_hidden_layers=2 if TINY else 24,
        num_attention_heads=4 if TINY else 16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=512 if TINY else 11008,
        num_hidden_layers=2 if TINY else 32,
        num_attention_heads=4 if TINY else 32,
        num_key_value_heads=4 if TINY else 32,
        vocab_size=32064,
        max_position_embeddings=4096,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000)
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    model.set_attn_implementation("sdpa")
    return model.to(dtype).eval()


class TokenClock(BaseStreamer):
    """Timestamps of every `put` (the prompt, then each token or group of accepted tokens)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def first_difference(a: list, b: list):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second): the rate weight-read floors divide by;
    3 TB/s stands in on the CPU (smoke runs)."""
    if device != "cuda":
        return 3.0e12
    source = torch.empty(2**29, dtype=torch.uint8, device=device)  # 512 MiB
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        target.copy_(source)
    torch.cuda.synchronize()
    return 2 * source.numel() * 20 / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--static", action="store_true", help="run the fast path (cache_implementation='static')")
    parser.add_argument("--out", default="results/gpu_check_tree.json")
    args = parser.parse_args()
    device = "cpu" if TINY else "cuda"
    dtype = torch.float32 if TINY else getattr(torch, args.dtype)

    target = specvlm_hf.enable(llava_7b_shaped(device, dtype))
    draft = SpecVLMDraftModel.from_target(target)
    torch.manual_seed(1)
    generator = torch.Generator().manual_seed(2)
    rows = []
    for prompt in range(args.prompts + 1):  # prompt 0 warms up
        text = torch.randint(2, 32000, (40,), generator=generator)
        input_ids = torch.cat([text[:5], torch.full((576,), 32000), text[5:]])[None].to(device)
        pixel_values = torch.randn(1, 3, 336, 336, generator=generator).to(device, dtype)
        inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values)
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        with torch.inference_mode():
            clock = TokenClock()
            sync()
            start = time.perf_counter()
            plain = target.generate(
                **inputs, **kwargs, streamer=clock, return_dict_in_generate=True, output_logits=True
            )
            sync()
            plain_seconds = time.perf_counter() - start
            steps = sorted(b - a for a, b in zip(clock.times[2:-1], clock.times[3:]))
            start = time.perf_counter()
            spec = target.generate(
                **inputs,
                **kwargs,
                assistant_model=draft,
                **({"cache_implementation": "static"} if args.static else {}),
            )
            sync()
            spec_seconds = time.perf_counter() - start
            # the same computation at batch 2 (other kernels, same maths): how stable is plain decoding itself?
            pair = {k: torch.cat([v, v]) for k, v in inputs.items()}
            plain_batch2 = target.generate(**pair, **kwargs)[0]
        stats = draft.stats
        start_new = input_ids.shape[1]
        new_plain = plain.sequences[0, start_new:].tolist()
        new_spec = spec[0, start_new:].tolist()
        first_diff = first_difference(new_plain, new_spec)
        gap = spec_is_plain_runner_up = None
        if first_diff is not None:
            top2 = plain.logits[first_diff][0].float().topk(2)
            gap = float(top2.values[0] - top2.values[1])
            spec_is_plain_runner_up = new_spec[first_diff] == int(top2.indices[1])
        if prompt == 0:
            continue
        rows.append(
            {
                "prompt": prompt,
                "identical": first_diff is None,
                "first_difference_at": first_diff,
                "plain_top2_logit_gap_there": gap,
                "spec_token_is_plain_runner_up": spec_is_plain_runner_up,
                "plain_batch1_vs_batch2_first_difference_at": first_difference(
                    new_plain, plain_batch2[start_new:].tolist()
                ),
                "plain_ms_per_token_median": 1000 * steps[len(steps) // 2],
                "plain_seconds": plain_seconds,
                "spec_seconds": spec_seconds,
                "rounds": stats.rounds,
                "sigma": stats.sigma,
                "ms_per_round": 1000 * (stats.draft_seconds + stats.verify_seconds) / max(stats.rounds, 1),
                "draft_ms_per_round": 1000 * stats.draft_seconds / max(stats.rounds, 1),
                "verify_ms_per_round": 1000 * stats.verify_seconds / max(stats.rounds, 1),
                "prefill_ms": 1000 * stats.prefill_seconds,
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    result = {
        "what": f"tree loop on a LLaVA-1.5-7B-shaped target, random {args.dtype} weights, fresh 1-layer draft, greedy",
        "dtype": args.dtype,
        **software_versions(),
        "new_tokens": args.new_tokens,
        "tree": {
            "top_k": draft.config.tree_top_k,
            "depth": draft.config.tree_depth,
            "total_tokens": draft.config.tree_total_tokens,
        },
        "identical_outputs": f"{sum(r['identical'] for r in rows)}/{len(rows)}",
        "rows": rows,
    }
    write_result(result, args.out)


def write_result(result: dict, path: str) -> None:
    """Writes a benchmark's JSON and prints its summary (everything but the per-prompt rows)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
    print("SUMMARY", json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
