"""Loading a model's own processor, also where transformers cannot: Qwen-VL processors need a video processor,
which transformers builds with torchvision; without torchvision `AutoProcessor.from_pretrained` fails even for
images, so the processor is then built from its image processor, tokenizer and chat template, with videos off."""

from __future__ import annotations

import json
from pathlib import Path


def torchvision_available() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def load_processor(name: str, **kwargs):
    """`AutoProcessor.from_pretrained(name)`, or, when that fails for want of torchvision on a processor that takes
    a video processor, the same processor for images and text (see `hf_internals.processor_without_video`)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name, **kwargs)
    except (OSError, ImportError, ValueError, TypeError):
        if torchvision_available():
            raise
        processor_class = _processor_class(name)
        if processor_class is None or "video_processor" not in _init_parameters(processor_class):
            raise
    import transformers
    from transformers import AutoTokenizer

    from .hf_internals import processor_without_video

    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    settings = dict(json.loads(Path(name, "processor_config.json").read_text()).get("image_processor") or {})
    if not settings:
        raise
    kind = settings.pop("image_processor_type", "")
    image_class = getattr(transformers, kind + "Pil", None) or getattr(
        transformers, kind
    )  # PIL backend: no torchvision
    image_processor = image_class(**settings)
    template = Path(name, "chat_template.jinja")
    chat_template = template.read_text() if template.is_file() else getattr(tokenizer, "chat_template", None)
    return processor_without_video(getattr(transformers, processor_class), image_processor, tokenizer, chat_template)


def _processor_class(name: str) -> str | None:
    for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = Path(name, file)
        if path.is_file():
            found = json.loads(path.read_text()).get("processor_class")
            if found:
                return found
    return None


def _init_parameters(class_name: str) -> tuple[str, ...]:
    import inspect

    import transformers

    cls = getattr(transformers, class_name, None)
    return tuple(inspect.signature(cls.__init__).parameters) if cls is not None else ()


def takes_video(processor) -> bool:
    """Whether `processor` can turn frames into video inputs: its own video processor, or (a Qwen-VL processor
    without torchvision) `qwen_video_inputs`."""
    from .hf_internals import NoVideoProcessor

    video = getattr(processor, "video_processor", None)
    return video is not None and (not isinstance(video, NoVideoProcessor) or _qwen_patches(processor))


def _qwen_patches(processor) -> bool:
    image = getattr(processor, "image_processor", None)
    return all(hasattr(image, name) for name in ("merge_size", "temporal_patch_size", "patch_size"))


def qwen_video_inputs(processor, frames, text: str):
    """Video inputs of a Qwen2-VL / Qwen2.5-VL processor built without its video processor (no torchvision): each
    `(T, H, W, 3)` uint8 frame resized to the size the image processor gives the first frame, patchified as Qwen's
    video processor does (`mini.tokenizer.qwen_video_patches`), and `text`'s `<|video_pad|>` expanded to the merged
    patch count (a `BatchFeature`). What the mini-qwen is trained on (`benchmarks/train_mini_video.py`)."""
    import numpy as np
    import torch
    from PIL import Image

    from .mini.tokenizer import QWEN_VIDEO_TOKEN, qwen_video_patches

    image = processor.image_processor
    pictures = [Image.fromarray(np.asarray(frame, dtype=np.uint8)) for frame in frames]
    _, rows, cols = image(images=pictures[:1], return_tensors="pt")["image_grid_thw"][0].tolist()
    size = (cols * image.patch_size, rows * image.patch_size)
    pixels = np.stack([np.asarray(p.convert("RGB").resize(size, Image.BICUBIC)) for p in pictures])
    values, grid = qwen_video_patches(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), image)
    count = int(grid.prod()) // image.merge_size**2
    inputs = processor.tokenizer(text.replace(QWEN_VIDEO_TOKEN, QWEN_VIDEO_TOKEN * count), return_tensors="pt")
    video_id = processor.tokenizer.convert_tokens_to_ids(QWEN_VIDEO_TOKEN)
    from transformers import BatchFeature

    return BatchFeature(
        {
            **inputs,
            "pixel_values_videos": values,
            "video_grid_thw": grid,
            "mm_token_type_ids": 2 * (inputs["input_ids"] == video_id).int(),
        }
    )
