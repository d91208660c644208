"""Tokenizer, chat template and processor of the mini VLM, and turning LLaVA records into training tensors.

The tokenizer is a byte-level BPE trained with `tokenizers` on the generated text, so every string can be
encoded. It is saved with a CLIP image processor as a standard `LlavaProcessor` folder:
`AutoProcessor.from_pretrained(folder)` and `processor.apply_chat_template(...)` work as for any LLaVA.
The image processor is the PIL/NumPy one (`CLIPImageProcessorPil`), which needs no torchvision.

Chat format (one message per block; `<image>` is expanded to one placeholder per visual token)::

    <|user|>
    <image>
    Describe this image.<|end|>
    <|assistant|>
    The image shows ...<|end|>
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
END_TOKEN = "<|end|>"  # ends every message; the end-of-sequence token for generation
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, END_TOKEN, IMAGE_TOKEN, *ROLE_TOKENS)

# `content` may be a string or a list of {"type": "image"} / {"type": "text", "text": ...} items.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)
IGNORE_INDEX = -100

# The Qwen2.5-VL-style mini target (`architecture="qwen2_5_vl"`): the same tokenizer plus Qwen's vision tokens
# (appended after the trained vocabulary); an image item renders as vision-start, one image pad, vision-end, and
# the processor expands the pad to one placeholder per merged patch of the image's own grid.
QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN_IMAGE_TOKEN = "<|image_pad|>"
QWEN_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ '<image>\\n' }}",
    "{{ '<|vision_start|><|image_pad|><|vision_end|>\\n' }}"
    "{%- elif item['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>\\n' }}",
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, qwen_vision_tokens: bool = False):
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a transformers fast tokenizer.

    Returns:
        `PreTrainedTokenizerFast` with `<pad>` (id 0), `<|end|>` (eos), `<image>` and the role tokens as
        special tokens; it adds no tokens of its own when encoding (the chat template places them). With
        `qwen_vision_tokens`, Qwen's vision tokens follow the trained vocabulary (ids `vocab_size`..) and
        `<|image_pad|>` is the tokenizer's image token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    extra = {"image_token": IMAGE_TOKEN}
    if qwen_vision_tokens:
        bpe.add_special_tokens(list(QWEN_VISION_TOKENS))
        extra = {
            "image_token": QWEN_IMAGE_TOKEN,
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        }
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD_TOKEN,
        eos_token=END_TOKEN,
        extra_special_tokens=extra,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=1024,
        padding_side="left",  # batched generation pads on the left
    )


def build_processor(tokenizer, image_size: int, patch_size: int):
    """A `LlavaProcessor` for square `image_size` images and a CLIP tower with `patch_size` (with CLS token).

    Images of any size are resized (bicubic) to `image_size` x `image_size`, rescaled and normalized with
    CLIP's mean and std; `<image>` expands to `(image_size // patch_size) ** 2` placeholders.
    """
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=False,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_qwen_processor(
    tokenizer, image_size: int, patch_size: int, merge_size: int = 2, max_image_tokens: int = 256
):
    """A `Qwen2_5_VLProcessor` for the Qwen2.5-VL-style mini target (dynamic resolution): `tokenizer` gains
    Qwen's vision tokens; an image is resized to the nearest multiple of `patch_size * merge_size` per side (at most
    `max_image_tokens` merged patches, at least 4) and becomes `(h / merge) * (w / merge)` `<|image_pad|>`
    placeholders. `tokenizer` comes from `train_tokenizer(..., qwen_vision_tokens=True)`. The image processor is
    the PIL/NumPy one (no torchvision), with CLIP's mean and std."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    factor = patch_size * merge_size
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=2,
        min_pixels=4 * factor * factor,
        max_pixels=max_image_tokens * factor * factor,
    )
    from ..processors import torchvision_available

    if torchvision_available():
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2)
        return Qwen2_5_VLProcessor(image_processor, tokenizer, video, chat_template=QWEN_CHAT_TEMPLATE)
    from ..hf_internals import processor_without_video

    return processor_without_video(Qwen2_5_VLProcessor, image_processor, tokenizer, QWEN_CHAT_TEMPLATE)


def save_processor(processor, folder) -> None:
    """`processor.save_pretrained(folder)`; without torchvision (a Qwen processor without its video processor)
    the tokenizer, the image processor and the chat template are saved in the same files, plus the video
    processor's settings, so that `AutoProcessor` loads the folder wherever torchvision is installed."""
    import json
    from pathlib import Path

    from ..processors import torchvision_available

    if not is_qwen_processor(processor) or torchvision_available():
        processor.save_pretrained(folder)
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor.tokenizer.save_pretrained(folder)
    image = processor.image_processor.to_dict()
    (folder / "processor_config.json").write_text(
        json.dumps({"image_processor": image, "processor_class": type(processor).__name__}, indent=2) + "\n"
    )
    video = {key: image[key] for key in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")}
    video.update(video_processor_type="Qwen2VLVideoProcessor", size=image["size"])
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")
    (folder / "chat_template.jinja").write_text(processor.chat_template)


def is_qwen_processor(processor) -> bool:
    return hasattr(processor.image_processor, "merge_size")


def image_placeholder(processor) -> str:
    """The token one image item of the chat template renders to, before the processor expands it."""
    return QWEN_IMAGE_TOKEN if is_qwen_processor(processor) else IMAGE_TOKEN


def num_image_tokens(processor, image_size: int | None = None) -> int:
    """How many placeholders one (square, `image_size`) image becomes: the vision tower's patches, CLS dropped
    (LLaVA), or its merged patches (Qwen)."""
    if is_qwen_processor(processor):
        patches = processor.image_processor.get_number_of_image_patches(image_size, image_size, {})
        return patches // processor.image_processor.merge_size**2
    size = processor.image_processor.size
    return (size["height"] // processor.patch_size) * (size["width"] // processor.patch_size)


def record_to_messages(record: dict, with_answer: bool = True) -> list[dict]:
    """Chat messages of a LLaVA record (`{"conversations": [{"from": "human"|"gpt", "value"}...]}`)."""
    messages = []
    for turn in record["conversations"]:
        if not with_answer and turn["from"] == "gpt":
            break
        role = {"human": "user", "gpt": "assistant", "system": "system"}[turn["from"]]
        value = turn["value"]
        if VIDEO_TOKEN in value:  # a clip of the motion set (`data.make_clip_example`)
            text = value.replace(VIDEO_TOKEN + "\n", "").replace(VIDEO_TOKEN, "")
            content = [{"type": "video"}, {"type": "text", "text": text}]
        elif IMAGE_TOKEN in value:
            text = value.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")
            content = [{"type": "image"}, {"type": "text", "text": text}]
        else:
            content = [{"type": "text", "text": value}]
        messages.append({"role": role, "content": content})
    return messages


def prompt_text(processor, record: dict) -> str:
    """The chat-formatted prompt of a single-turn record, ending with the assistant header."""
    return processor.apply_chat_template(
        record_to_messages(record, with_answer=False), add_generation_prompt=True, tokenize=False
    )


def encode_record(processor, record: dict, image_size: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels of a single-turn LLaVA record, exactly as the processor would tokenize it.

    Returns:
        `(input_ids, labels)`, two lists of equal length: the prompt (with `<image>` expanded to
        `num_image_tokens` placeholders) followed by the answer and `<|end|>`; labels are `IGNORE_INDEX`
        on the prompt and the token ids on the answer, so the loss is on what the assistant says.
    """
    placeholder = image_placeholder(processor)
    prompt = prompt_text(processor, record)
    prompt = prompt.replace(placeholder, placeholder * num_image_tokens(processor, image_size))
    answer = record["conversations"][1]["value"] + END_TOKEN
    prompt_ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


VIDEO_TOKEN = "<video>"  # a clip record's placeholder (`data.make_clip_example`)
QWEN_VIDEO_TOKEN = "<|video_pad|>"


def num_video_tokens(processor, frames: int, image_size: int) -> int:
    """Placeholders of a clip of `frames` square `image_size` frames for a Qwen processor: one temporal patch per
    two frames (the last frame repeated when odd), `(image_size / patch / merge)^2` merged tokens each."""
    image = processor.image_processor
    temporal = image.temporal_patch_size
    return -(-frames // temporal) * num_image_tokens(processor, image_size)


def encode_clip_record(processor, record: dict, frames: int, image_size: int) -> tuple[list[int], list[int]]:
    """`encode_record` for a clip record (`"<video>"` placeholder) and a Qwen processor: the prompt with
    `<|video_pad|>` expanded to `num_video_tokens`, then the answer; labels on the answer only."""
    prompt = prompt_text(processor, record)
    prompt = prompt.replace(QWEN_VIDEO_TOKEN, QWEN_VIDEO_TOKEN * num_video_tokens(processor, frames, image_size))
    answer = record["conversations"][1]["value"] + END_TOKEN
    prompt_ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def qwen_video_patches(frames, image_processor):
    """uint8 frames `(T, 3, H, W)` (H, W multiples of patch * merge) -> Qwen2-VL video patch rows
    `(T' * (H / patch) * (W / patch), 3 * temporal * patch * patch)` and `video_grid_thw` `(1, 3)`, as Qwen's
    video processor lays them out (frames normalized with the image processor's mean and std; the last frame
    repeated up to a multiple of the temporal patch, `T'` temporal patches)."""
    import torch

    temporal, patch = image_processor.temporal_patch_size, image_processor.patch_size
    merge = image_processor.merge_size
    frames = torch.as_tensor(frames)
    if frames.shape[0] % temporal:
        frames = torch.cat([frames, frames[-1:].expand(temporal - frames.shape[0] % temporal, -1, -1, -1)])
    mean = torch.tensor(image_processor.image_mean, device=frames.device).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, device=frames.device).view(1, 3, 1, 1)
    values = (frames.float() * image_processor.rescale_factor - mean) / std
    t, c, h, w = values.shape
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = values.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (T', gh/m, gw/m, m, m, C, temporal, p, p)
    rows = x.reshape(gt * gh * gw, c * temporal * patch * patch)
    return rows, torch.tensor([[gt, gh, gw]], dtype=torch.long, device=frames.device)


def image_to_uint8(image: Image.Image, image_size: int) -> np.ndarray:
    """RGB pixels of `image` resized to the processor's size, as uint8 `(3, image_size, image_size)`.

    Together with `normalize_pixels` this equals `processor.image_processor(image)` for images that are
    already `image_size` square (as the generated ones are), while storing 4x less than float32.
    """
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


def normalize_pixels(pixels, image_processor):
    """uint8 `(batch, 3, H, W)` tensor -> float pixel values normalized like the image processor (for a Qwen
    image processor: its patch rows `(batch * h * w, 3 * temporal * patch * patch)`, as `qwen_patches` lays
    them out)."""
    import torch

    mean = torch.tensor(image_processor.image_mean, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, device=pixels.device).view(1, 3, 1, 1)
    values = (pixels.float() * image_processor.rescale_factor - mean) / std
    if hasattr(image_processor, "merge_size"):
        return qwen_patches(
            values, image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size
        )
    return values


def qwen_patches(values, patch: int, merge: int, temporal: int):
    """Normalized images `(B, C, H, W)` -> Qwen2-VL patch rows `(B * (H / patch) * (W / patch), C * temporal *
    patch * patch)`, merge-window order, each still image repeated over the temporal patch (as the Qwen image
    processor's `patchify` does)."""
    b, c, h, w = values.shape
    gh, gw = h // patch, w // patch
    x = values.reshape(b, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (B, gh/m, gw/m, m, m, C, p, p)
    x = x[:, :, :, :, :, :, None].expand(*x.shape[:6], temporal, patch, patch)
    return x.reshape(b * gh * gw, c * temporal * patch * patch)


def qwen_grid(num_images: int, image_size: int, image_processor):
    """`image_grid_thw` `(num_images, 3)` of square `image_size` images (already at a patch-multiple size)."""
    import torch

    side = image_size // image_processor.patch_size
    return torch.tensor([[1, side, side]] * num_images, dtype=torch.long)
