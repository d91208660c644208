"""The shipped tokenizer and processor of the mini VLM."""

import numpy as np
import pytest
import torch

from specvlm_hf.mini import WEIGHTS_DIR
from specvlm_hf.mini.data import make_example
from specvlm_hf.mini.tokenizer import (
    END_TOKEN,
    IGNORE_INDEX,
    encode_record,
    image_to_uint8,
    normalize_pixels,
    num_image_tokens,
    prompt_text,
)


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(WEIGHTS_DIR)


@pytest.mark.parametrize(
    "text",
    [
        "The image shows four shapes on a light grey background.",
        'A "for" statement iterates over the items of any sequence (such as a list or a string).',
        "Unicode survives too: naïve café, 3 × 4 ≠ 13, 日本語.\n\tTabs and  double  spaces.",
    ],
)
def test_tokenizer_round_trips_text(processor, text):
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert processor.tokenizer.decode(ids) == text


def test_chat_template_formats_an_image_turn(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>\n<image>\nDescribe this image.<|end|>\n<|assistant|>\n"


def test_processor_expands_image_token_to_one_placeholder_per_patch(processor):
    record, image = make_example(1, 0, task="scene")
    inputs = processor(images=image, text=prompt_text(processor, record), return_tensors="pt")
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == image_token_id).sum()) == num_image_tokens(processor) == 64
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 128, 128)


def test_training_encoding_matches_processor_and_labels_only_the_answer(processor):
    record, image = make_example(1, 3, task="count")
    input_ids, labels = encode_record(processor, record)
    prompt_ids = processor(images=image, text=prompt_text(processor, record))["input_ids"][0]
    assert input_ids[: len(prompt_ids)] == list(prompt_ids)
    assert all(label == IGNORE_INDEX for label in labels[: len(prompt_ids)])
    answer = processor.tokenizer.decode(labels[len(prompt_ids) :])
    assert answer == record["conversations"][1]["value"] + END_TOKEN


def test_training_pixel_normalization_matches_image_processor(processor):
    _, image = make_example(1, 0, task="scene")
    expected = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    pixels = torch.from_numpy(image_to_uint8(image, 128))[None]
    assert torch.allclose(normalize_pixels(pixels, processor.image_processor), expected, atol=1e-5)


def test_image_processor_resizes_any_image_to_the_model_size(processor):
    from PIL import Image

    image = Image.fromarray(np.zeros((300, 200, 3), dtype=np.uint8))
    assert tuple(processor.image_processor(image, return_tensors="pt")["pixel_values"].shape) == (1, 3, 128, 128)
