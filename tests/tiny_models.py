"""Tiny random VLM targets built from configs, for CPU tests (fp32)."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

VOCAB = 96
IMAGE_TOKEN = VOCAB - 1
IMAGE_SIZE = 32
PATCH = 8


def text_config(gqa: bool = False, tied: bool = False, vocab: int = VOCAB, layers: int = 2, hidden: int = 64):
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def vision_config():
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32,
    )


def tiny_llava(seed: int = 0, gqa: bool = False, tied: bool = False, attn: str = "sdpa", scale: float = 1.0):
    """A random `LlavaForConditionalGeneration` (16 image tokens per image) in fp32 eval mode."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=vision_config(), text_config=text_config(gqa, tied), image_token_index=IMAGE_TOKEN,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2, vision_feature_select_strategy="default", vision_feature_layer=-1,
        tie_word_embeddings=tied,
    )
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn) if hasattr(model, "set_attn_implementation") else None
    _sharpen(model, scale)
    return model.eval()


def tiny_llava_next(seed: int = 0, gqa: bool = False, tied: bool = False, attn: str = "sdpa", scale: float = 1.0):
    """A random `LlavaNextForConditionalGeneration` (AnyRes tiles) in fp32 eval mode."""
    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=vision_config(), text_config=text_config(gqa, tied), image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=[[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]],
        vision_feature_select_strategy="default", vision_feature_layer=-1, tie_word_embeddings=tied,
    )
    model = LlavaNextForConditionalGeneration(config)
    model.set_attn_implementation(attn) if hasattr(model, "set_attn_implementation") else None
    _sharpen(model, scale)
    return model.eval()


def _sharpen(model, scale):
    """Scales the lm_head so that the random model's next-token distributions are peaked (more acceptances)."""
    if scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(scale)
