"""Tiny random video targets and prompts (fp32 CPU): Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision and
LLaVA-NeXT-Video, with video placeholders laid out the way each model's processor does:

- Qwen2-VL / Qwen2.5-VL: `<vision_start>` + `t * h * w / 4` video tokens + `<vision_end>` (`video_grid_thw`);
- Qwen3-VL: per frame, its timestamp text (`<1.0 seconds>`), then `<vision_start>` + `h * w / 4` tokens +
  `<vision_end>`;
- LLaVA-OneVision: `frames * ceil(s / 2)^2` tokens (each frame pooled 2 x 2) and one newline token;
- LLaVA-NeXT-Video: `frames * (s / stride)^2` tokens (the vision resampler pools each frame).

`video_inputs` optionally puts an image before the video (a many-visual prompt).
"""

from __future__ import annotations

import math

import torch
from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

import tiny_families as qwen
import tiny_families_more as more
from tiny_models import IMAGE_SIZE, _sharpen, text_config, vision_config

NEXT_VIDEO_IMAGE, NEXT_VIDEO_VIDEO = 95, 94


def tiny_llava_next_video(seed: int = 0, scale: float = 8.0):
    """LLaVA-NeXT-Video: a Llama text model, CLIP 32 px / patch 8 (4 x 4 tokens per image, 2 x 2 per video frame
    after the resampler's stride-2 average pooling)."""
    torch.manual_seed(seed)
    config = LlavaNextVideoConfig(
        vision_config=vision_config(),
        text_config=text_config(),
        image_token_index=NEXT_VIDEO_IMAGE,
        video_token_index=NEXT_VIDEO_VIDEO,
        image_grid_pinpoints=[[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    model = LlavaNextVideoForConditionalGeneration(config)
    _sharpen(model, scale)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model.eval()


VIDEO_FAMILIES = {
    "qwen2_vl": qwen.tiny_qwen2_vl,
    "qwen2_5_vl": qwen.tiny_qwen2_5_vl,
    "qwen3_vl": qwen.tiny_qwen3_vl,
    "llava_onevision": more.tiny_llava_onevision,
    "llava_next_video": tiny_llava_next_video,
}


def _randint(low: int, high: int, generator) -> int:
    return int(torch.randint(low, high, (1,), generator=generator))


def _qwen_visuals(model, frames: int, image: bool, generator):
    """Qwen runs (list of token tensors) and inputs: optionally one image, then a video of `frames` temporal
    patches of `h x w` patches."""
    runs, inputs = [], {}
    if image:
        pixels, grid, count = qwen._qwen_image(2 * _randint(1, 3, generator), 2, generator)
        runs.append(torch.cat([torch.tensor([qwen.QWEN_START]), torch.full((count,), qwen.QWEN_IMAGE)]))
        runs[-1] = torch.cat([runs[-1], torch.tensor([qwen.QWEN_END])])
        inputs.update(pixel_values=pixels, image_grid_thw=grid)
    h, w = 2 * _randint(1, 3, generator), 2 * _randint(1, 3, generator)
    patch_dim = 3 * qwen.TEMPORAL * qwen.PATCH * qwen.PATCH
    inputs["pixel_values_videos"] = torch.randn(frames * h * w, patch_dim, generator=generator)
    inputs["video_grid_thw"] = torch.tensor([[frames, h, w]])
    per_frame = h * w // (qwen.MERGE * qwen.MERGE)
    video = lambda n: torch.cat(  # noqa: E731
        [torch.tensor([qwen.QWEN_START]), torch.full((n,), qwen.QWEN_VIDEO), torch.tensor([qwen.QWEN_END])]
    )
    if model.config.model_type.startswith("qwen3"):  # each frame after its timestamp "<f.0 seconds>"
        runs += [torch.cat([torch.tensor([60, 61 + frame]), video(per_frame)]) for frame in range(frames)]
    else:
        runs.append(video(frames * per_frame))
    return runs, inputs


def _onevision_visuals(model, frames: int, image: bool, generator):
    runs, inputs = more._onevision_images(model, 1, generator) if image else ([], {})
    side = more.ONEVISION_SIZE // more.ONEVISION_PATCH
    per_frame = math.ceil(side / 2) ** 2
    inputs["pixel_values_videos"] = torch.randn(
        1, frames, 3, more.ONEVISION_SIZE, more.ONEVISION_SIZE, generator=generator
    )
    return runs + [torch.full((frames * per_frame + 1,), more.VIDEO)], inputs


def _next_video_visuals(model, frames: int, image: bool, generator):
    runs, inputs = [], {}
    if image:
        with torch.no_grad():
            pixel_values = torch.randn(1, 3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
            sizes = torch.tensor([[IMAGE_SIZE, 2 * IMAGE_SIZE]])
            count = model.model.get_image_features(pixel_values=pixel_values, image_sizes=sizes).pooler_output[0]
        runs.append(torch.full((count.shape[0],), NEXT_VIDEO_IMAGE))
        inputs.update(pixel_values=pixel_values, image_sizes=sizes)
    inputs["pixel_values_videos"] = torch.randn(1, frames, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    per_frame = (side // model.config.spatial_pool_stride) ** 2
    return runs + [torch.full((frames * per_frame,), NEXT_VIDEO_VIDEO)], inputs


def video_inputs(model, generator: torch.Generator, frames: int = 3, image: bool = False, text_tokens: int = 6):
    """A random prompt for a tiny target of `VIDEO_FAMILIES`: BOS, text, (an image,) a video of `frames` frames
    (Qwen: temporal patches, two frames each), more text."""
    kind = model.config.model_type
    builder = {"llava_onevision": _onevision_visuals, "llava_next_video": _next_video_visuals}.get(kind, _qwen_visuals)
    runs, inputs = builder(model, frames, image, generator)
    words = torch.randint(3, 90, (text_tokens,), generator=generator)
    split = _randint(0, text_tokens + 1, generator)
    pieces = [torch.tensor([1]), words[:split]]
    for run in runs:
        pieces += [run, torch.tensor([88])]
    ids = torch.cat(pieces + [words[split:]])[None]
    inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    if kind.startswith("qwen"):
        config = model.config
        inputs["mm_token_type_ids"] = (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()
    return inputs
