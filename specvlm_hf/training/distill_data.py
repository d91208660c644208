"""Self-distillation data: the same prompts, answered by the target itself (greedy), in LLaVA format.

A draft trained on the target's own answers sees, during training, the text it will be asked to predict
at inference; peers report markedly higher acceptance with such data.

    specvlm distill-data --data data.json --out data_target.json           # with the built-in mini VLM
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import option
from .data import ImageResolver, conversation_messages, load_records, record_images, render


@dataclass
class DistillDataConfig:
    """Options of `specvlm distill-data` (the command line is generated from this class)."""

    data: str = option("", "Input records: a LLaVA-format JSON file or a Hugging Face `datasets` folder.")
    out: str = option("distilled.json", "Output LLaVA JSON with the target's answers (images keep their paths).")
    image_folder: str | None = option(
        None, "Folder the records' image paths are relative to (default: next to --data)."
    )
    target: str = option("mini", "Target VLM folder or Hub id, or 'mini' / 'mini-qwen' for a built-in mini VLM.")
    target_dtype: str = option("float32", "dtype the target is loaded in.", ("float32", "bfloat16", "float16"))
    adapter: str | None = option(None, "A PEFT adapter applied to the target.")
    attn_implementation: str = option("sdpa", "Attention backend of the target.", ("sdpa", "eager"))
    batch_size: int = option(16, "Prompts generated together (left-padded).")
    max_new_tokens: int = option(256, "Longest regenerated answer in tokens.")
    max_examples: int | None = option(None, "Regenerate only the first N records.")
    device: str = option("auto", "'auto' (cuda if available), 'cpu' or 'cuda'.")


@torch.no_grad()
def regenerate_answers(
    target, processor, records: list[dict], resolver: ImageResolver, batch_size: int = 16, max_new_tokens: int = 256
) -> tuple[list[dict], int]:
    """Replaces every assistant turn by the target's greedy answer given the conversation so far.

    Returns the new records and how many were dropped because the target answered with nothing.
    """
    from ..target import unwrap_target

    model = unwrap_target(target)
    device = next(model.parameters()).device
    tokenizer = getattr(processor, "tokenizer", processor)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out = [copy.deepcopy(r) for r in records]
    empty = set()
    turns = max(len(r["conversations"]) for r in records)
    try:
        for turn in range(turns):
            todo = [
                i
                for i, r in enumerate(out)
                if turn < len(r["conversations"])
                and r["conversations"][turn]["from"] in ("gpt", "assistant")
                and i not in empty
            ]
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                texts, images = [], []
                for i in chunk:
                    partial = dict(out[i], conversations=out[i]["conversations"][:turn])
                    texts.append(render(processor, conversation_messages(partial), add_generation_prompt=True))
                    shown = sum(t["value"].count("<image>") for t in partial["conversations"])
                    images += [resolver.open(image, out[i], i) for image in record_images(out[i])[:shown]]
                inputs = processor(text=texts, images=images or None, return_tensors="pt", padding=True).to(device)
                if "pixel_values" in inputs:
                    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
                generated = target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                for row, i in enumerate(chunk):
                    answer = processor.decode(
                        generated[row, inputs["input_ids"].shape[1] :], skip_special_tokens=True
                    ).strip()
                    if answer:
                        out[i]["conversations"][turn]["value"] = answer
                    else:
                        empty.add(i)
    finally:
        tokenizer.padding_side = side
    return [r for i, r in enumerate(out) if i not in empty], len(empty)


def distill_data(config: DistillDataConfig) -> Path:
    """Runs `regenerate_answers` over `config.data` and writes `config.out`; returns its path."""
    from .trainer import load_target

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target, processor = load_target(config, device)
    records = load_records(config.data, config.max_examples)
    resolver = ImageResolver(config.image_folder, config.data)
    resolver.check(records)
    new_records, dropped = regenerate_answers(
        target.eval(), processor, records, resolver, config.batch_size, config.max_new_tokens
    )
    path = Path(config.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(new_records, indent=1) + "\n")
    print(
        f"wrote {len(new_records)} records with the target's answers to {path}"
        + (f" ({dropped} dropped: empty answer)" if dropped else "")
    )
    return path
