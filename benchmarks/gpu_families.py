"""Fast-path round cost on modern-family targets, with the full and a reduced draft vocabulary, on one GPU.

Shapes (random bf16 weights, sdpa, batch 1; a small vision tower, since a text prompt's round does not read it):

- Qwen2.5-VL-7B text: 28 layers, hidden 3584, GQA 28/4, vocab 152064, M-RoPE;
- Gemma-3-12B text: 48 layers, hidden 3840, GQA 16/8, head_dim 256, vocab 262208, 5 sliding-window layers
  (window 1024) per global one.

For each: plain `generate` with `cache_implementation="static"` (transformers compiles the decode step with CUDA
graphs), median ms per token; the SpecVLM fast path (default tree: top-k 10, depth 7, 60 tokens) with a fresh
one-layer draft over the full vocabulary and with a reduced vocabulary of `--draft-vocab` tokens, each also on an
e4m3 head (`draft.use_fp8_head`; `--labels` picks which of the four run): median ms per round, split into draft and
verify, and the round over the compiled token. A fresh draft accepts almost nothing,
so speed-ups are projections at `--sigma` (labelled as such).

    python benchmarks/gpu_families.py --out results/gpu_families_h200.json
    python benchmarks/gpu_families.py --shapes qwen2.5-vl-7b --labels full_vocab,full_vocab_fp8_head --out ...
    TINY=1 python benchmarks/gpu_families.py --out /tmp/families.json    # CPU miniature (dry run)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import specvlm_hf  # noqa: E402
from gpu_fast_path import DEVICE, DTYPE, TINY, plain_ms_per_token, tree_round, weight_bytes  # noqa: E402
from specvlm_hf.bench import software_versions  # noqa: E402
from specvlm_hf import SpecVLMDraftModel  # noqa: E402


def build(config_class, model_class, text: dict, vision: dict, **extra):
    config = config_class(text_config=text, vision_config=vision, **extra)
    torch.manual_seed(0)
    torch.set_default_dtype(DTYPE)
    with torch.device(DEVICE):
        model = model_class(config)
    torch.set_default_dtype(torch.float32)
    model.set_attn_implementation("sdpa")
    return model.eval()


def qwen2_5_vl_7b():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    hidden = 256 if TINY else 3584
    text = dict(
        vocab_size=152064,
        hidden_size=hidden,
        intermediate_size=512 if TINY else 18944,
        num_hidden_layers=2 if TINY else 28,
        num_attention_heads=4 if TINY else 28,
        num_key_value_heads=2 if TINY else 4,
        max_position_embeddings=128000,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": [8, 12, 12] if TINY else [16, 24, 24],
        },
    )
    vision = dict(
        depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden, fullatt_block_indexes=[0]
    )
    return build(
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        text,
        vision,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
    )


def gemma3_12b():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    layers = 6 if TINY else 48
    text = dict(
        vocab_size=262208,
        hidden_size=256 if TINY else 3840,
        intermediate_size=512 if TINY else 15360,
        num_hidden_layers=layers,
        num_attention_heads=4 if TINY else 16,
        num_key_value_heads=2 if TINY else 8,
        head_dim=64 if TINY else 256,
        sliding_window=1024,
        max_position_embeddings=32768,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
    )
    vision = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16
    )
    return build(
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        text,
        vision,
        mm_tokens_per_image=4,
        image_token_index=262144,
        boi_token_index=255999,
        eoi_token_index=256000,
    )


SHAPES = {"qwen2.5-vl-7b": qwen2_5_vl_7b, "gemma-3-12b": gemma3_12b}
LABELS = {  # draft settings: (reduced vocabulary, fp8 head)
    "full_vocab": (False, False),
    "full_vocab_fp8_head": (False, True),
    "reduced_vocab": (True, False),
    "reduced_vocab_fp8_head": (True, True),
}


def measure(name, args) -> dict:
    target = specvlm_hf.enable(SHAPES[name]())
    vocab = target.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 30000, (1, args.prompt_tokens), generator=generator).to(DEVICE)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    result = {
        "vocab_size": vocab,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "target_weights_GB": weight_bytes(target) / 1e9,
    }
    result["static_ms_per_token"] = [
        plain_ms_per_token(target, inputs, args.new_tokens, cache_implementation="static") for _ in range(2)
    ][-1]
    print(name, "static", result["static_ms_per_token"], flush=True)
    for label in args.labels.split(","):
        reduced, fp8_head = LABELS[label]
        size = args.draft_vocab if reduced else None
        try:
            draft = SpecVLMDraftModel.from_target(target, draft_vocab_size=size)
            if size:
                draft.set_draft_vocab(torch.arange(size))  # which ids does not change the cost
            draft.use_fp8_head(fp8_head)
            runs = [
                tree_round(target, draft, inputs, args.new_tokens, cache_implementation="static") for _ in range(3)
            ]
            row = {key: value for key, value in runs[-1].items() if key != "tokens"}
            row["draft_vocab_size"] = size or vocab
            row["fp8_head"] = fp8_head
            row["draft_weights_GB"] = weight_bytes(draft) / 1e9
            row["round_over_static_token"] = row["median_ms_per_round"] / result["static_ms_per_token"]
            row[f"projected_speedup_over_static_at_sigma_{args.sigma}"] = (
                args.sigma * result["static_ms_per_token"] / row["median_ms_per_round"]
            )
            result[label] = row
            print(name, label, json.dumps(row), flush=True)
            del draft
        except Exception as error:  # keep the other measurements
            result[label] = {"error": repr(error)[:800]}
            traceback.print_exc()
    del target
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--draft-vocab", type=int, default=32768)
    parser.add_argument("--labels", default="full_vocab,reduced_vocab", help=f"draft settings among {list(LABELS)}")
    parser.add_argument("--sigma", type=float, default=3.67)
    parser.add_argument("--out", default="results/gpu_families.json")
    args = parser.parse_args()
    unknown = [label for label in args.labels.split(",") if label not in LABELS]
    if unknown:
        parser.error(f"unknown --labels {unknown}: choose from {list(LABELS)}")
    results = {
        **software_versions(),
        "what": "random bf16 weights, sdpa, batch 1, text prompt, default tree (10, 7, 60), fresh 1-layer draft",
    }
    for name in args.shapes.split(","):
        start = time.perf_counter()
        try:
            results[name] = measure(name, args)
        except Exception as error:
            results[name] = {"error": repr(error)[:800]}
            traceback.print_exc()
        results[name]["section_seconds"] = time.perf_counter() - start
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as handle:  # after every shape: a time-out keeps what was measured
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
