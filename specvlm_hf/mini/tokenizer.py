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


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a transformers fast tokenizer.

    Returns:
        `PreTrainedTokenizerFast` with `<pad>` (id 0), `<|end|>` (eos), `<image>` and the role tokens as
        special tokens; it adds no tokens of its own when encoding (the chat template places them).
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
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD_TOKEN,
        eos_token=END_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
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


def num_image_tokens(processor) -> int:
    """How many `<image>` placeholders one image becomes (the vision tower's patches, CLS dropped)."""
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
        if IMAGE_TOKEN in value:
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


def encode_record(processor, record: dict) -> tuple[list[int], list[int]]:
    """Token ids and labels of a single-turn LLaVA record, exactly as the processor would tokenize it.

    Returns:
        `(input_ids, labels)`, two lists of equal length: the prompt (with `<image>` expanded to
        `num_image_tokens` placeholders) followed by the answer and `<|end|>`; labels are `IGNORE_INDEX`
        on the prompt and the token ids on the answer, so the loss is on what the assistant says.
    """
    prompt = prompt_text(processor, record).replace(IMAGE_TOKEN, IMAGE_TOKEN * num_image_tokens(processor))
    answer = record["conversations"][1]["value"] + END_TOKEN
    prompt_ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


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
    """uint8 `(batch, 3, H, W)` tensor -> float pixel values normalized like the image processor."""
    import torch

    mean = torch.tensor(image_processor.image_mean, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() * image_processor.rescale_factor - mean) / std
