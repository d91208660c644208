"""Tiny random targets of more VLM families (LLaVA-OneVision, InternVL, Idefics3, SmolVLM, Mistral 3 / Pixtral),
fp32 CPU, with prompt builders that lay out image placeholders the way each model's processor does:

- LLaVA-OneVision (`LlavaOnevisionProcessor.replace_image_token`): one image alone is AnyRes (base grid, then the
  unpadded tiles with a newline token after each row, shrunk past `anyres_max_N`); with several images in a
  prompt (`batch_num_images`) each is its base grid and one newline token;
- InternVL (`InternVLProcessor.replace_image_token`): `<img>` + `image_seq_length` tokens per tile (1 tile, or
  several tiles and a thumbnail) + `</img>`, one run per image;
- Idefics3 / SmolVLM (`replace_image_token` / `_prompt_split_image`): per tile `<fake><row_i_col_j>` +
  `image_seq_len` tokens, `\\n` after each tile row, then `\\n<fake><global-img>` + `image_seq_len` tokens +
  `<fake>`; an image that is not split is only the global part;
- Mistral 3 (`PixtralProcessor.replace_image_token`): rows of `[IMG]` tokens, each ended by `[IMG_BREAK]`, the
  last by `[IMG_END]`.
"""

from __future__ import annotations

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

VOCAB = 128
IMAGE, VIDEO = 120, 121
# text tokens of the processors' layouts (any ids: the models see them as text)
START, END = 122, 123  # InternVL <img> </img>; Idefics3 <fake_token_around_image> = START, <global-img> = END
NEWLINE = 124  # "\n" (Idefics3) ; [IMG_BREAK] (Mistral 3)
IMG_END = 125  # [IMG_END] (Mistral 3)
ROW_COL = 100  # Idefics3 <row_i_col_j> = ROW_COL + 6 * (i - 1) + (j - 1)
TEXT_IDS = (3, 100)  # random text tokens come from [3, 100)

TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)
ONEVISION_SIZE, ONEVISION_PATCH = 32, 8  # 4 x 4 patch tokens per tile
ONEVISION_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [96, 32], [32, 96], [96, 64], [64, 96]]
INTERNVL_SIZE, INTERNVL_PATCH = 32, 4  # 8 x 8 patches -> 4 x 4 tokens per tile after the pixel shuffle
IDEFICS_SIZE, IDEFICS_PATCH = 32, 4  # 8 x 8 patches -> 4 x 4 tokens per crop (scale factor 2)
PIXTRAL_PATCH, PIXTRAL_MERGE = 4, 2  # 8 px per token


def _finish(model, scale: float):
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = 1
    return model.eval()


def _siglip(image_size: int, patch_size: int) -> dict:
    return dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )


def tiny_llava_onevision(seed: int = 0, scale: float = 8.0, aspect: str = "anyres_max_2"):
    """Qwen2 text model; 4 x 4 tokens per 32-px tile; `anyres_max_2` so that 2 x 2 tiles and more are shrunk."""
    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(
        vision_config=_siglip(ONEVISION_SIZE, ONEVISION_PATCH),
        text_config=dict(TEXT, model_type="qwen2"),
        image_token_index=IMAGE,
        video_token_index=VIDEO,
        image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio=aspect,
        tie_word_embeddings=False,
    )
    return _finish(LlavaOnevisionForConditionalGeneration(config), scale)


def tiny_internvl(seed: int = 0, scale: float = 8.0):
    torch.manual_seed(seed)
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=[INTERNVL_SIZE, INTERNVL_SIZE],
        patch_size=[INTERNVL_PATCH, INTERNVL_PATCH],
    )
    per_tile = int((INTERNVL_SIZE // INTERNVL_PATCH * 0.5) ** 2)
    config = InternVLConfig(
        vision_config=vision,
        text_config=dict(TEXT, model_type="qwen2"),
        image_token_id=IMAGE,
        image_seq_length=per_tile,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    return _finish(InternVLForConditionalGeneration(config), scale)


def _idefics_kwargs() -> dict:
    return dict(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=IDEFICS_SIZE,
            patch_size=IDEFICS_PATCH,
        ),
        text_config=dict(TEXT, model_type="llama"),
        image_token_id=IMAGE,
        scale_factor=2,
        tie_word_embeddings=False,
        pad_token_id=0,
    )


def tiny_idefics3(seed: int = 0, scale: float = 8.0):
    torch.manual_seed(seed)
    return _finish(Idefics3ForConditionalGeneration(Idefics3Config(**_idefics_kwargs())), scale)


def tiny_smolvlm(seed: int = 0, scale: float = 8.0):
    torch.manual_seed(seed)
    return _finish(SmolVLMForConditionalGeneration(SmolVLMConfig(**_idefics_kwargs())), scale)


def tiny_mistral3(seed: int = 0, scale: float = 8.0):
    torch.manual_seed(seed)
    vision = dict(
        model_type="pixtral",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=16,
        image_size=64,
        patch_size=PIXTRAL_PATCH,
    )
    config = Mistral3Config(
        vision_config=vision,
        text_config=dict(TEXT, model_type="mistral", sliding_window=None, head_dim=16),
        image_token_index=IMAGE,
        spatial_merge_size=PIXTRAL_MERGE,
        tie_word_embeddings=False,
    )
    return _finish(Mistral3ForConditionalGeneration(config), scale)


FAMILIES_MORE = {
    "llava_onevision": tiny_llava_onevision,
    "internvl": tiny_internvl,
    "idefics3": tiny_idefics3,
    "smolvlm": tiny_smolvlm,
    "mistral3": tiny_mistral3,
}


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    return int(torch.randint(low, high, (1,), generator=generator))


# ------------------------------------------------------------------------------------------------- images
def _onevision_images(model, images: int, generator) -> tuple[list[torch.Tensor], dict]:
    """Placeholder runs and model inputs of `images` images, as `LlavaOnevisionProcessor` lays them out."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    config = model.config
    side = ONEVISION_SIZE // ONEVISION_PATCH
    sizes = [[_randint(12, 100, generator), _randint(12, 100, generator)] for _ in range(images)]
    patches = [image_size_to_num_patches(size, config.image_grid_pinpoints, ONEVISION_SIZE) for size in sizes]
    pixel_values = torch.randn(images, max(patches), 3, ONEVISION_SIZE, ONEVISION_SIZE, generator=generator)
    inputs = {
        "pixel_values": pixel_values,
        "image_sizes": torch.tensor(sizes),
        "batch_num_images": torch.tensor([images]),
    }
    if images == 1:
        with torch.no_grad():
            features = model.model.get_image_features(
                pixel_values=pixel_values,
                image_sizes=inputs["image_sizes"],
                batch_num_images=inputs["batch_num_images"],
            ).pooler_output
        counts = [int(features[0].shape[0])]
    else:
        counts = [side * side + 1] * images  # base grid + one newline token each
    return [torch.full((count,), IMAGE) for count in counts], inputs


def _internvl_images(model, images: int, generator):
    per_tile = model.config.image_seq_length
    tiles = []
    for _ in range(images):
        count = _randint(1, 5, generator)
        tiles.append(1 if count == 1 else count + 1)  # tiles + thumbnail
    runs = [torch.cat([torch.tensor([START]), torch.full((n * per_tile,), IMAGE), torch.tensor([END])]) for n in tiles]
    pixel_values = torch.randn(sum(tiles), 3, INTERNVL_SIZE, INTERNVL_SIZE, generator=generator)
    return runs, ({"pixel_values": pixel_values} if images else {})


def idefics_image_tokens(rows: int, cols: int, per_crop: int) -> torch.Tensor:
    """One image's tokens in an Idefics3 / SmolVLM prompt (`rows = cols = 0`: not split)."""
    pieces = []
    for row in range(rows):
        for col in range(cols):
            pieces += [torch.tensor([START, ROW_COL + 6 * row + col]), torch.full((per_crop,), IMAGE)]
        pieces.append(torch.tensor([NEWLINE]))
    pieces += [
        torch.tensor([NEWLINE] if rows else []).long(),
        torch.tensor([START, END]),
        torch.full((per_crop,), IMAGE),
        torch.tensor([START]),
    ]
    return torch.cat(pieces)


def _idefics_images(model, images: int, generator):
    per_crop = (IDEFICS_SIZE // IDEFICS_PATCH) ** 2 // model.config.scale_factor**2
    runs, crops = [], 0
    for _ in range(images):
        rows, cols = (
            (0, 0) if _randint(0, 3, generator) == 0 else (_randint(1, 3, generator), _randint(1, 3, generator))
        )
        runs.append(idefics_image_tokens(rows, cols, per_crop))
        crops += rows * cols + 1
    pixel_values = torch.randn(1, crops, 3, IDEFICS_SIZE, IDEFICS_SIZE, generator=generator)
    return runs, ({"pixel_values": pixel_values} if images else {})


def pixtral_image_tokens(rows: int, cols: int) -> torch.Tensor:
    row = torch.cat([torch.full((cols,), IMAGE), torch.tensor([NEWLINE])])
    tokens = row.repeat(rows)
    tokens[-1] = IMG_END
    return tokens


def _mistral3_images(model, images: int, generator):
    step = PIXTRAL_PATCH * PIXTRAL_MERGE
    sizes = [[step * _randint(1, 5, generator), step * _randint(1, 5, generator)] for _ in range(images)]
    sizes = [[h, max(w, 2 * step) if h == step else w] for h, w in sizes]  # 5.17 fails on a 1-token image
    runs = [pixtral_image_tokens(h // step, w // step) for h, w in sizes]
    if not images:
        return runs, {}
    pixel_values = torch.zeros(images, 3, max(h for h, _ in sizes), max(w for _, w in sizes))
    for index, (h, w) in enumerate(sizes):  # the processor pads every image to the batch's largest
        pixel_values[index, :, :h, :w] = torch.randn(3, h, w, generator=generator)
    return runs, {"pixel_values": pixel_values, "image_sizes": torch.tensor(sizes)}


IMAGE_BUILDERS = {
    "llava_onevision": _onevision_images,
    "internvl": _internvl_images,
    "idefics3": _idefics_images,
    "smolvlm": _idefics_images,
    "mistral3": _mistral3_images,
}


def family_inputs_more(model, generator: torch.Generator, images: int = 1, text_tokens: int = 6) -> dict:
    """A random prompt for a tiny target of `FAMILIES_MORE`: BOS, text, `images` images (each in the processor's
    placeholder layout, separated by a text token), more text."""
    words = torch.randint(*TEXT_IDS, (text_tokens,), generator=generator)
    split = _randint(0, text_tokens + 1, generator)
    runs, inputs = IMAGE_BUILDERS[model.config.model_type](model, images, generator) if images else ([], {})
    pieces = [torch.tensor([1]), words[:split]]
    for index, run in enumerate(runs):
        pieces += [run, torch.tensor([98 if index + 1 < len(runs) else 99])]  # text after each image
    pieces.append(words[split:])
    ids = torch.cat(pieces)[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **inputs}
