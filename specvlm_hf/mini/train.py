"""Train the mini VLM from scratch on generated data: tokenizer, processor and a stock LLaVA (or Qwen2.5-VL).

    python -m specvlm_hf.mini.train --output_dir mini-vlm            # the shipped recipe (one H100, ~7 min)
    python -m specvlm_hf.mini.train --architecture qwen2_5_vl --patch_size 8 --output_dir mini-qwen
                                                                     # the Qwen2.5-VL-style mini target
    python -m specvlm_hf.mini.train --help                           # every option of `MiniTrainConfig`

Steps: (1) train the tokenizer on generated text and save the processor folder; (2) generate and encode
`num_train_examples` examples of `seed` in worker processes; (3) train `LlavaForConditionalGeneration`
(CLIP vision tower + Llama text model, both from scratch) with the loss on answer tokens only, or with
`architecture="qwen2_5_vl"` a `Qwen2_5_VLForConditionalGeneration` (Qwen's windowed vision tower with 2x2 patch
merging, M-RoPE text model, dynamic-resolution processor; the same tokenizer plus Qwen's vision tokens); (4) save
it in `save_dtype` as safetensors shards next to the processor, with `train_config.json`.

Everything is a function of the config: with the same config (and hardware that finishes `max_steps`
before `max_minutes`), the run is reproduced from the seed. The learning-rate schedule follows training
progress `max(step / max_steps, elapsed / max_minutes)`, so a slower machine still ends with a fully
decayed learning rate, just after fewer steps.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from .corpus import load_corpus
from .data import make_example
from .tokenizer import (
    IGNORE_INDEX,
    build_processor,
    build_qwen_processor,
    encode_record,
    image_to_uint8,
    normalize_pixels,
    qwen_grid,
    save_processor,
    train_tokenizer,
)


@dataclass
class MiniTrainConfig:
    """Every option of a mini VLM training run (the command line is generated from this class)."""

    output_dir: str = field(default="mini-vlm", metadata={"help": "Folder for the model and processor."})
    architecture: str = field(
        default="llava",
        metadata={
            "help": "'llava' (CLIP tower + Llama) or 'qwen2_5_vl' (Qwen2.5-VL vision tower, patch merging and M-RoPE; "
            "use a patch_size that divides image_size / 2, e.g. 8)."
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the training data, the initialisation and the batch order."}
    )
    num_train_examples: int = field(
        default=350_000, metadata={"help": "Generated training examples (indices 0..N-1 of `seed`)."}
    )
    tokenizer_examples: int = field(default=20_000, metadata={"help": "Examples whose text trains the tokenizer."})
    vocab_size: int = field(default=4096, metadata={"help": "BPE vocabulary size, special tokens included."})
    image_size: int = field(default=128, metadata={"help": "Side of the square input images, in pixels."})
    patch_size: int = field(
        default=16, metadata={"help": "Vision patch side; (image_size / patch_size)**2 visual tokens."}
    )
    vision_hidden_size: int = field(default=192, metadata={"help": "Width of the CLIP vision tower."})
    vision_layers: int = field(default=4, metadata={"help": "Layers of the CLIP vision tower."})
    vision_heads: int = field(default=3, metadata={"help": "Attention heads of the CLIP vision tower."})
    hidden_size: int = field(default=256, metadata={"help": "Width of the Llama text model."})
    intermediate_size: int = field(default=768, metadata={"help": "MLP width of the Llama text model."})
    num_layers: int = field(default=12, metadata={"help": "Layers of the Llama text model."})
    num_heads: int = field(default=8, metadata={"help": "Query heads of the Llama text model."})
    num_kv_heads: int = field(default=4, metadata={"help": "Key/value heads of the Llama text model (GQA)."})
    max_position_embeddings: int = field(default=1024, metadata={"help": "Longest sequence the text model supports."})
    max_length: int = field(default=384, metadata={"help": "Training sequences are cut to this many tokens."})
    batch_size: int = field(default=256, metadata={"help": "Examples per optimizer step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    min_lr_ratio: float = field(
        default=0.05, metadata={"help": "Final learning rate as a fraction of the peak (cosine decay)."}
    )
    warmup_steps: int = field(default=300, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay on matrices."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    max_steps: int = field(
        default=3200, metadata={"help": "Optimizer steps (the run ends earlier if max_minutes is reached)."}
    )
    max_minutes: float = field(default=10.0, metadata={"help": "Wall-clock budget of the training loop, in minutes."})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda if available), 'cuda' or 'cpu'."})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA (ignored on CPU)."})
    save_dtype: str = field(default="bfloat16", metadata={"help": "dtype of the saved weights: bfloat16 or float32."})
    max_shard_size: str = field(default="14MB", metadata={"help": "Largest safetensors shard."})
    workers: int = field(default=0, metadata={"help": "Data processes; 0 means one per CPU core."})
    log_every: int = field(default=100, metadata={"help": "Print the loss every this many steps."})


QWEN_MERGE = 2  # Qwen's spatial merge: 2x2 patches make one visual token


def model_config(config: MiniTrainConfig, tokenizer):
    """The `LlavaConfig` of the mini VLM: CLIP vision tower + 2-layer projector + Llama text model (or, for
    `architecture="qwen2_5_vl"`, `qwen_model_config`)."""
    if config.architecture == "qwen2_5_vl":
        return qwen_model_config(config, tokenizer)
    if config.architecture != "llava":
        raise ValueError(f"architecture={config.architecture!r}: choose 'llava' or 'qwen2_5_vl'")
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden_size,
        intermediate_size=4 * config.vision_hidden_size,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        projection_dim=config.hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=(config.image_size // config.patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # the tower is trained with the model, so its last layer is the useful one
        tie_word_embeddings=True,
    )


def qwen_model_config(config: MiniTrainConfig, tokenizer):
    """The `Qwen2_5_VLConfig` of the Qwen-style mini target: a Qwen2.5-VL vision tower (window attention with two
    full-attention blocks, 2x2 merger) and a Qwen2.5-VL text model with M-RoPE (sections 1/4, 3/8, 3/8 of the
    rotary half), tied embeddings."""
    from transformers import Qwen2_5_VLConfig

    head_dim = config.hidden_size // config.num_heads
    half = head_dim // 2
    sections = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    ids = {
        name: tokenizer.convert_tokens_to_ids(name)
        for name in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    }
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    window = config.image_size  # one attention window per training image (larger images get several)
    vision = dict(
        depth=config.vision_layers,
        hidden_size=config.vision_hidden_size,
        intermediate_size=4 * config.vision_hidden_size,
        num_heads=config.vision_heads,
        patch_size=config.patch_size,
        spatial_merge_size=QWEN_MERGE,
        temporal_patch_size=2,
        window_size=window,
        out_hidden_size=config.hidden_size,
        fullatt_block_indexes=[i for i in range(config.vision_layers) if i % 2 == 1],
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def model_class(config: MiniTrainConfig):
    from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration if config.architecture == "qwen2_5_vl" else LlavaForConditionalGeneration


# ----------------------------------------------------------------------------- data


def tokenizer_texts(config: MiniTrainConfig):
    """Text the tokenizer is trained on: generated conversations plus the whole documentation corpus."""
    for index in range(config.tokenizer_examples):
        record, _ = make_example(config.seed, index, config.image_size)
        for turn in record["conversations"]:
            yield turn["value"].replace("<image>\n", "")
    for topic in load_corpus():
        yield topic["title"]
        for paragraph in topic["paragraphs"]:
            yield " ".join(paragraph)


_WORKER_PROCESSOR = None


def _init_worker(processor_dir: str) -> None:
    global _WORKER_PROCESSOR
    from ..processors import load_processor

    torch.set_num_threads(1)
    _WORKER_PROCESSOR = load_processor(processor_dir)


def _encode_range(job: tuple[int, int, int, int]):
    seed, start, stop, image_size = job
    rows = []
    for index in range(start, stop):
        record, image = make_example(seed, index, image_size)
        input_ids, labels = encode_record(_WORKER_PROCESSOR, record, image_size)
        prompt_length = labels.count(IGNORE_INDEX)
        pixels = image_to_uint8(image, image_size) if image is not None else None
        rows.append((np.asarray(input_ids, dtype=np.int16), prompt_length, pixels))
    return rows


@dataclass
class EncodedData:
    """A dataset encoded into tensors.

    input_ids: `(num_examples, max_length)` int64, right-padded with `pad_id`.
    lengths: `(num_examples,)` real lengths; prompt_lengths: `(num_examples,)` tokens before the answer.
    pixels: `(num_images, 3, H, W)` uint8; image_index: `(num_examples,)` row in `pixels`, -1 if no image.
    """

    input_ids: torch.Tensor
    lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    pixels: torch.Tensor
    image_index: torch.Tensor

    def to(self, device) -> "EncodedData":
        return EncodedData(
            *(t.to(device) for t in (self.input_ids, self.lengths, self.prompt_lengths, self.pixels, self.image_index))
        )


def encode_dataset(
    processor_dir: str, seed: int, num_examples: int, image_size: int, max_length: int, pad_id: int, workers: int
) -> EncodedData:
    """Generate examples `0..num_examples-1` of `seed` and encode them with the saved processor, in parallel."""
    chunk = 500
    jobs = [(seed, start, min(start + chunk, num_examples), image_size) for start in range(0, num_examples, chunk)]
    if workers > 1:
        with Pool(workers, initializer=_init_worker, initargs=(processor_dir,)) as pool:
            chunks = pool.map(_encode_range, jobs)
    else:
        _init_worker(processor_dir)
        chunks = [_encode_range(job) for job in jobs]
    rows = [row for rows in chunks for row in rows]
    input_ids = torch.full((len(rows), max_length), pad_id, dtype=torch.long)
    lengths = torch.zeros(len(rows), dtype=torch.long)
    prompt_lengths = torch.zeros(len(rows), dtype=torch.long)
    image_index = torch.full((len(rows),), -1, dtype=torch.long)
    images = []
    for i, (ids, prompt_length, pixels) in enumerate(rows):
        n = min(len(ids), max_length)
        input_ids[i, :n] = torch.from_numpy(ids[:n].astype(np.int64))
        lengths[i], prompt_lengths[i] = n, prompt_length
        if pixels is not None:
            image_index[i] = len(images)
            images.append(pixels)
    pixels = (
        torch.from_numpy(np.stack(images)) if images else torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)
    )
    return EncodedData(input_ids, lengths, prompt_lengths, pixels, image_index)


def make_batch(
    data: EncodedData,
    indices: torch.Tensor,
    image_processor,
    image_order: torch.Tensor | None = None,
    image_token_id: int | None = None,
) -> dict:
    """Model inputs for examples `indices`: `input_ids`, `attention_mask`, `labels` `(batch, longest)`,
    and `pixel_values` `(images in the batch, 3, H, W)` or None. For a Qwen image processor: `pixel_values` are
    patch rows, with `image_grid_thw` `(images, 3)` and `mm_token_type_ids` `(batch, longest)` (1 on image
    placeholders), as the Qwen processor gives them (M-RoPE positions need both).

    `image_order` (optional, `(num_images,)`) replaces each example's image row by `image_order[row]`,
    which is how evaluation pairs questions with mismatched images.
    """
    lengths = data.lengths[indices]
    longest = int(lengths.max())
    input_ids = data.input_ids[indices, :longest]
    positions = torch.arange(longest, device=input_ids.device)
    attention_mask = (positions[None, :] < lengths[:, None]).long()
    is_answer = (positions[None, :] >= data.prompt_lengths[indices][:, None]) & attention_mask.bool()
    labels = torch.where(is_answer, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    rows = data.image_index[indices]
    rows = rows[rows >= 0]
    if image_order is not None:
        rows = image_order[rows]
    pixel_values = normalize_pixels(data.pixels[rows], image_processor) if len(rows) else None
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": pixel_values}
    if hasattr(image_processor, "merge_size"):
        if image_token_id is None:
            raise ValueError("make_batch needs image_token_id for a Qwen image processor (mm_token_type_ids)")
        grid = qwen_grid(len(rows), data.pixels.shape[-1], image_processor).to(input_ids.device)
        batch["image_grid_thw"] = grid if len(rows) else None
        batch["mm_token_type_ids"] = (input_ids == image_token_id).int()
        side = data.pixels.shape[-1] // image_processor.patch_size // image_processor.merge_size
        batch["position_ids"] = qwen_position_ids(input_ids, attention_mask, image_token_id, side, side)
    return batch


def qwen_position_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, rows: int, cols: int
) -> torch.Tensor:
    """M-RoPE position ids `(3, B, L)` of right-padded rows with at most one image each, of `rows x cols` merged
    patches, one frame: what Qwen2.5-VL's `get_rope_index` computes (checked in tests/test_mini_qwen.py), without
    its per-row Python loop. Text before the image counts 0..s-1 on all three axes; the image's token
    `k` sits at `(s, s + k // cols, s + k % cols)`; text after it continues from `s + max(rows, cols)`."""
    b, length = input_ids.shape
    index = torch.arange(length, device=input_ids.device).expand(b, length)
    is_image = (input_ids == image_token_id) & attention_mask.bool()
    count = is_image.sum(-1, keepdim=True)
    has_image = count > 0
    start = torch.where(has_image, is_image.long().argmax(-1, keepdim=True), torch.full_like(count, length))
    k = (index - start).clamp(min=0)
    after = index - count + max(rows, cols)
    inside = is_image
    text = torch.where(index < start, index, after)
    t = torch.where(inside, start.expand(b, length), text)
    h = torch.where(inside, start + k // cols, text)
    w = torch.where(inside, start + k % cols, text)
    return torch.stack([t, h, w]).masked_fill(~attention_mask.bool()[None], 1)


def length_grouped_batches(lengths: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of batches: shuffle, sort by length inside windows of 64 batches, shuffle the batches.

    Grouping similar lengths cuts padding several-fold while keeping batches random.
    """
    order = torch.randperm(len(lengths), generator=generator)
    window = batch_size * 64
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[torch.argsort(lengths[chunk], descending=True, stable=True)]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size))
    permutation = torch.randperm(len(batches), generator=generator)
    return [batches[i] for i in permutation]


# ----------------------------------------------------------------------------- training


def learning_rate(config: MiniTrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_lr_ratio` as progress goes 0 -> 1."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.learning_rate * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was asked for but CUDA is not available; pass --device cpu.")
    return torch.device(device)


def build_tokenizer_and_processor(config: MiniTrainConfig):
    """Train the tokenizer, build the processor and save it to `config.output_dir`."""
    qwen = config.architecture == "qwen2_5_vl"
    tokenizer = train_tokenizer(tokenizer_texts(config), config.vocab_size, qwen_vision_tokens=qwen)
    if qwen:
        if config.image_size % (config.patch_size * QWEN_MERGE):
            raise ValueError(
                f"image_size {config.image_size} must be a multiple of patch_size * {QWEN_MERGE} for qwen2_5_vl; "
                "pass e.g. --patch_size 8"
            )
        processor = build_qwen_processor(tokenizer, config.image_size, config.patch_size, QWEN_MERGE)
    else:
        processor = build_processor(tokenizer, config.image_size, config.patch_size)
    save_processor(processor, config.output_dir)
    return processor


def train(config: MiniTrainConfig) -> dict:
    """Run the whole recipe (see module docstring) and return a summary with the loss history."""
    from transformers import GenerationConfig

    start_time = time.time()
    device = resolve_device(config.device)
    workers = config.workers or os.cpu_count() or 1
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)

    processor = build_tokenizer_and_processor(config)
    tokenizer = processor.tokenizer
    print(f"[mini] tokenizer: {len(tokenizer)} tokens ({time.time() - start_time:.0f}s)", flush=True)

    data = encode_dataset(
        config.output_dir,
        config.seed,
        config.num_train_examples,
        config.image_size,
        config.max_length,
        tokenizer.pad_token_id,
        workers,
    )
    answer_tokens = int((data.lengths - data.prompt_lengths).clamp(min=0).sum())
    print(
        f"[mini] data: {len(data.lengths)} examples, {len(data.pixels)} images, {int(data.lengths.sum())} tokens "
        f"({answer_tokens} answer tokens), mean length {data.lengths.float().mean():.0f} "
        f"({time.time() - start_time:.0f}s)",
        flush=True,
    )
    data = data.to(device)

    model = model_class(config)(model_config(config, tokenizer)).to(device)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=200, do_sample=False
    )
    num_parameters = sum(p.numel() for p in model.parameters())
    print(f"[mini] model: {num_parameters / 1e6:.2f}M parameters on {device}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    generator = torch.Generator().manual_seed(config.seed)
    image_token_id = model.config.image_token_id if config.architecture == "qwen2_5_vl" else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.bf16 and device.type == "cuda")

    history, batches, step = [], [], 0
    loop_start = time.time()
    model.train()
    while True:
        progress = max(step / config.max_steps, (time.time() - loop_start) / (60 * config.max_minutes))
        if progress >= 1.0:
            break
        if not batches:
            batches = length_grouped_batches(data.lengths.cpu(), config.batch_size, generator)
        batch = make_batch(data, batches.pop().to(device), processor.image_processor, image_token_id=image_token_id)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step, progress)
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % config.log_every == 0 or step == 1:
            value = loss.item()
            history.append({"step": step, "loss": value, "minutes": (time.time() - loop_start) / 60})
            print(
                f"[mini] step {step} loss {value:.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                f"({time.time() - loop_start:.0f}s)",
                flush=True,
            )

    train_minutes = (time.time() - loop_start) / 60
    model.eval()
    save_model(model, config)
    summary = {
        "steps": step,
        "train_minutes": train_minutes,
        "total_minutes": (time.time() - start_time) / 60,
        "num_parameters": num_parameters,
        "examples_seen": step * config.batch_size,
        "final_loss": history[-1]["loss"] if history else None,
        "history": history,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    Path(config.output_dir, "train_config.json").write_text(
        json.dumps({"config": asdict(config), "summary": summary}, indent=1) + "\n"
    )
    print(f"[mini] done: {step} steps in {train_minutes:.1f} min, saved to {config.output_dir}", flush=True)
    return {"model": model, "processor": processor, **summary}


def save_model(model, config: MiniTrainConfig) -> None:
    """Save the weights in `save_dtype` as safetensors shards of at most `max_shard_size`."""
    dtype = getattr(torch, config.save_dtype)
    original = next(model.parameters()).dtype
    model.to(dtype)
    model.save_pretrained(config.output_dir, max_shard_size=config.max_shard_size)
    model.to(original)


def main(argv: list[str] | None = None) -> None:
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(MiniTrainConfig).parse_args_into_dataclasses(args=argv)
    train(config)


if __name__ == "__main__":
    main()
