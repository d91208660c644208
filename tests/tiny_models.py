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
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=32,
    )


def tiny_llava(
    seed: int = 0, gqa: bool = False, tied: bool = False, attn: str = "sdpa", scale: float = 1.0, vocab: int = VOCAB
):
    """A random `LlavaForConditionalGeneration` (16 image tokens per image, image token `vocab - 1`) in fp32
    eval mode; `scale` multiplies the lm_head so that next-token distributions are peaked like a trained
    model's rather than nearly uniform."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=vision_config(),
        text_config=text_config(gqa, tied, vocab=vocab),
        image_token_index=vocab - 1,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=tied,
    )
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn) if hasattr(model, "set_attn_implementation") else None
    _sharpen(model, scale)
    return model.eval()


def tiny_llava_next(
    seed: int = 0, gqa: bool = False, tied: bool = False, attn: str = "sdpa", scale: float = 1.0, vocab: int = VOCAB
):
    """A random `LlavaNextForConditionalGeneration` (AnyRes tiles) in fp32 eval mode."""
    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=vision_config(),
        text_config=text_config(gqa, tied, vocab=vocab),
        image_token_index=vocab - 1,
        image_grid_pinpoints=[[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=tied,
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


def oracle_draft(target, noise: float = 0.0, seed: int = 0, **overrides):
    """A draft that copies the target's decoder layers, so that it usually predicts the target's next token.

    `fc` passes the token embedding through and ignores the feature input; with `input_norm=False` the draft
    then runs the target's own layers (and, unlike a real draft, its final norm) on the token stream (shifted
    by one position, which RoPE ignores), missing only the first prompt token. `noise` perturbs every draft
    weight to lower the acceptance rate. A test double: its extra final norm is not part of the draft design.
    """
    import copy

    from specvlm_hf import SpecVLMDraftModel
    from specvlm_hf.target import text_model_of

    text = target.config.get_text_config()
    overrides.setdefault("num_draft_layers", text.num_hidden_layers)
    overrides.setdefault("input_norm", False)
    draft = SpecVLMDraftModel.from_target(target, **overrides)
    hidden = text.hidden_size
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        draft.fc.weight.zero_()
        draft.fc.weight[:, :hidden] = torch.eye(hidden)
        draft.fc.bias.zero_()
        for mine, theirs in zip(draft.model.layers, text_model_of(target).layers):
            mine.load_state_dict(theirs.state_dict())
        draft.model.norm = copy.deepcopy(text_model_of(target).norm)
        if noise:
            for parameter in draft.parameters():
                parameter.add_(noise * torch.randn(parameter.shape, generator=generator))
    return draft


def image_token_count(model, pixel_values, image_sizes=None) -> int:
    """Number of image tokens the model expects for one image (AnyRes layouts vary with the image size)."""
    if image_sizes is None:
        return (IMAGE_SIZE // PATCH) ** 2
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes)
    features = getattr(features, "pooler_output", features)
    return features[0].shape[0]


def random_inputs(model, generator: torch.Generator, text_tokens: int = 6, image: bool = True) -> dict:
    """A random prompt for a tiny target: BOS, some text, one image's placeholder tokens, more text."""
    config = model.config
    vocab = config.get_text_config().vocab_size
    image_token = config.image_token_index
    words = torch.randint(3, image_token, (text_tokens,), generator=generator)
    split = int(torch.randint(0, text_tokens + 1, (1,), generator=generator))
    inputs = {}
    pieces = [torch.tensor([1]), words[:split]]
    if image:
        if config.model_type == "llava_next":
            tall = bool(torch.randint(0, 2, (1,), generator=generator))
            sizes = torch.tensor([[2 * IMAGE_SIZE, IMAGE_SIZE] if tall else [IMAGE_SIZE, 2 * IMAGE_SIZE]])
            pixel_values = torch.randn(1, 3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
            inputs["image_sizes"] = sizes
        else:
            sizes = None
            pixel_values = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        inputs["pixel_values"] = pixel_values
        pieces.append(torch.full((image_token_count(model, pixel_values, sizes),), image_token))
    pieces.append(words[split:])
    input_ids = torch.cat(pieces)[None]
    assert int(input_ids.max()) < vocab
    inputs["input_ids"] = input_ids
    inputs["attention_mask"] = torch.ones_like(input_ids)
    return inputs


def mini_processor_llava(text: LlamaConfig, seed: int = 0):
    """A random LLaVA around `text` that takes the mini VLM's processor (128 px images -> 64 image tokens, image
    token 2, EOS 1, pad 0), with a scaled `lm_head` for peaked next-token distributions, like a trained model."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=128,
        patch_size=16,
        projection_dim=64,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=2,
        image_seq_length=64,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    return model.eval()
