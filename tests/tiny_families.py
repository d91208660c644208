"""Tiny random targets of the modern VLM families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, PaliGemma), fp32 CPU, with
prompt builders that lay out image placeholders the way each model's processor does."""

from __future__ import annotations

import torch
from transformers import (
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    SiglipVisionConfig,
)

QWEN_VOCAB = 128
QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 120, 121, 122, 123
PATCH, MERGE, TEMPORAL = 4, 2, 2
QWEN_TEXT = dict(
    vocab_size=QWEN_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
MROPE = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
PALI_VOCAB = 96
PALI_IMAGE = PALI_VOCAB - 1
PALI_IMAGE_SIZE, PALI_PATCH = 32, 8


def _finish(model, scale: float, eos: int = 2, pad: int = 0):
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    return model.eval()


QWEN_SPECIAL_TOKENS = dict(
    image_token_id=QWEN_IMAGE,
    video_token_id=QWEN_VIDEO,
    vision_start_token_id=QWEN_START,
    vision_end_token_id=QWEN_END,
)


def tiny_qwen2_vl(seed: int = 0, scale: float = 8.0):
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config=dict(QWEN_TEXT, rope_parameters=dict(MROPE)),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            mlp_ratio=2,
            num_heads=2,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=TEMPORAL,
        ),
        **QWEN_SPECIAL_TOKENS,
    )
    return _finish(Qwen2VLForConditionalGeneration(config), scale)


def tiny_qwen2_5_vl(seed: int = 0, scale: float = 8.0):
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(QWEN_TEXT, rope_parameters=dict(MROPE)),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=TEMPORAL,
            window_size=16,
            out_hidden_size=64,
            fullatt_block_indexes=[1],
        ),
        **QWEN_SPECIAL_TOKENS,
    )
    return _finish(Qwen2_5_VLForConditionalGeneration(config), scale)


QWEN3_VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=PATCH,
    spatial_merge_size=MERGE,
    temporal_patch_size=TEMPORAL,
    out_hidden_size=64,
    num_position_embeddings=64,
    deepstack_visual_indexes=[0],
)


def _qwen3_text(**extra) -> dict:
    """Qwen3-VL's text settings: head_dim 16 and interleaved M-RoPE sections."""
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    return dict(QWEN_TEXT, head_dim=16, rope_parameters=rope, **extra)


def tiny_qwen3_vl(seed: int = 0, scale: float = 8.0):
    torch.manual_seed(seed)
    config = Qwen3VLConfig(text_config=_qwen3_text(), vision_config=QWEN3_VISION, **QWEN_SPECIAL_TOKENS)
    return _finish(Qwen3VLForConditionalGeneration(config), scale)


def tiny_qwen3_vl_moe(seed: int = 0, scale: float = 8.0):
    """Qwen3-VL-MoE: the Qwen3-VL layout with mixture-of-experts text layers (4 experts, 2 per token)."""
    torch.manual_seed(seed)
    text = _qwen3_text(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    config = Qwen3VLMoeConfig(text_config=text, vision_config=QWEN3_VISION, **QWEN_SPECIAL_TOKENS)
    return _finish(Qwen3VLMoeForConditionalGeneration(config), scale)


def _tiny_paligemma(text_model_type: str, seed: int, scale: float, **text_extra):
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=PALI_IMAGE_SIZE,
        patch_size=PALI_PATCH,
        projection_dim=64,
    )
    text = dict(
        model_type=text_model_type,
        vocab_size=PALI_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **text_extra,
    )
    config = PaliGemmaConfig(
        vision_config=vision.to_dict(), text_config=text, image_token_index=PALI_IMAGE, projection_dim=64
    )
    config.text_config.num_image_tokens = (PALI_IMAGE_SIZE // PALI_PATCH) ** 2
    return _finish(PaliGemmaForConditionalGeneration(config), scale)


def tiny_paligemma(seed: int = 0, scale: float = 1.0):
    """PaliGemma: a Gemma text model, positions counted from 1."""
    return _tiny_paligemma("gemma", seed, scale)


GEMMA_VOCAB, GEMMA_IMAGE, GEMMA_BOI, GEMMA_EOI = 96, 95, 93, 94
GEMMA_TOKENS_PER_IMAGE = 4


def tiny_gemma3(seed: int = 0, scale: float = 1.0, sliding_window: int = 8, tied: bool = True):
    """Gemma 3 with one sliding-window layer (window `sliding_window`, shorter than the test prompts plus their
    continuations) before one global layer; 4 tokens per image. `tied=False` unties the `lm_head` from the
    embeddings, so that `scale` sharpens the next-token distributions alone."""
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = Gemma3Config(
        text_config=dict(
            vocab_size=GEMMA_VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=sliding_window,
            max_position_embeddings=512,
            layer_types=["sliding_attention", "full_attention"],
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=GEMMA_TOKENS_PER_IMAGE,
        image_token_index=GEMMA_IMAGE,
        boi_token_index=GEMMA_BOI,
        eoi_token_index=GEMMA_EOI,
        tie_word_embeddings=tied,
    )
    config.text_config.tie_word_embeddings = tied
    return _finish(Gemma3ForConditionalGeneration(config), scale)


def tiny_paligemma2(seed: int = 0, scale: float = 1.0):
    """PaliGemma 2: a Gemma 2 text model (sliding window 8 on every other layer, attention softcap)."""
    return _tiny_paligemma(
        "gemma2", seed, scale, sliding_window=8, layer_types=["sliding_attention", "full_attention"]
    )


FAMILIES = {
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "qwen3_vl": tiny_qwen3_vl,
    "qwen3_vl_moe": tiny_qwen3_vl_moe,
    "paligemma": tiny_paligemma,
    "paligemma2": tiny_paligemma2,
    "gemma3": tiny_gemma3,
}


def _qwen_image(grid_h: int, grid_w: int, generator: torch.Generator):
    """`pixel_values` rows, `image_grid_thw` and the placeholder count of one image of `grid_h x grid_w` patches."""
    patch_dim = 3 * TEMPORAL * PATCH * PATCH
    pixels = torch.randn(grid_h * grid_w, patch_dim, generator=generator)
    return pixels, torch.tensor([[1, grid_h, grid_w]]), grid_h * grid_w // (MERGE * MERGE)


def family_inputs(model, generator: torch.Generator, images: int = 1, text_tokens: int = 6) -> dict:
    """A random prompt for a tiny target of `FAMILIES`: text, then `images` images (each in the model's own
    placeholder layout), more text. Qwen prompts carry `mm_token_type_ids` as the processor gives them."""
    kind = model.config.model_type
    words = torch.randint(3, 90 if kind in ("paligemma", "gemma3") else 100, (text_tokens,), generator=generator)
    if kind == "paligemma":  # PaliGemma 1 and 2
        count = (PALI_IMAGE_SIZE // PALI_PATCH) ** 2
        ids = torch.cat([torch.full((count * images,), PALI_IMAGE), torch.tensor([1]), words])[None]
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if images:
            inputs["pixel_values"] = torch.randn(images, 3, PALI_IMAGE_SIZE, PALI_IMAGE_SIZE, generator=generator)
        inputs["token_type_ids"] = torch.zeros_like(ids)
        return inputs
    if kind == "gemma3":
        split = int(torch.randint(0, text_tokens + 1, (1,), generator=generator))
        pieces = [torch.tensor([1]), words[:split]]
        for _ in range(images):
            pieces += [
                torch.tensor([GEMMA_BOI]),
                torch.full((GEMMA_TOKENS_PER_IMAGE,), GEMMA_IMAGE),
                torch.tensor([GEMMA_EOI]),
            ]
        pieces.append(words[split:])
        ids = torch.cat(pieces)[None]
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "token_type_ids": (ids == GEMMA_IMAGE).long(),
        }
        if images:
            inputs["pixel_values"] = torch.randn(images, 3, 32, 32, generator=generator)
        return inputs
    split = int(torch.randint(0, text_tokens + 1, (1,), generator=generator))
    pieces, pixel_rows, grids = [torch.tensor([1]), words[:split]], [], []
    for _ in range(images):
        side_h = 2 * int(torch.randint(1, 4, (1,), generator=generator))
        side_w = 2 * int(torch.randint(1, 4, (1,), generator=generator))
        pixels, grid, count = _qwen_image(side_h, side_w, generator)
        pixel_rows.append(pixels)
        grids.append(grid)
        pieces += [torch.tensor([QWEN_START]), torch.full((count,), QWEN_IMAGE), torch.tensor([QWEN_END])]
    pieces.append(words[split:])
    ids = torch.cat(pieces)[None]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == QWEN_IMAGE).int()}
    if images:
        inputs["pixel_values"] = torch.cat(pixel_rows)
        inputs["image_grid_thw"] = torch.cat(grids)
    return inputs
