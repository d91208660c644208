"""Training data for draft distillation: LLaVA-format conversations rendered with the target's chat template.

Two sources, one record format (LLaVA's, as its mix665k is distributed):

- a JSON file: a list of `{"id", "image": "relative/path.jpg", "conversations": [{"from": "human", "value":
  "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}` plus an image folder (`"images": [...]`
  for several images; no key for text-only records);
- a Hugging Face `datasets` folder (`save_to_disk`, or data files `load_dataset` reads) with the same
  columns, where `image` may also hold the image itself.

Each conversation is rendered with the processor's chat template; the non-assistant text goes through the
processor (which expands `<image>` into the image's placeholder tokens and makes `pixel_values`) and each
assistant answer is tokenized on its own, as the target produces it when generating. The labels mark the
answer tokens up to and including the end-of-turn (EOS) token. Errors name the record.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError, json_error_message

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataRecordError(UserError):
    """A training record that cannot be used; the message names the record and the fix."""


def record_name(record: dict, index: int) -> str:
    return f"record {index} (id {record['id']!r})" if "id" in record else f"record {index}"


def record_images(record: dict) -> list:
    """The record's images (paths, PIL images or `datasets` image dicts), in placeholder order."""
    if record.get("images") is not None:
        return list(record["images"])
    image = record.get("image")
    return [] if image is None else [image]


def check_record(record: dict, index: int) -> None:
    """Raises `DataRecordError` for a record without an answer, or whose `<image>` tokens and images disagree."""
    name = record_name(record, index)
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataRecordError(f"{name} has no 'conversations' list; each record needs human/gpt turns.")
    answers = 0
    for turn in turns:
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise DataRecordError(f"{name}: unknown speaker {turn.get('from')!r}; use 'human', 'gpt' or 'system'.")
        if role == "assistant":
            if not str(turn.get("value") or "").strip():
                raise DataRecordError(f"{name} has an empty answer; remove the record or fill in the 'gpt' turn.")
            answers += 1
    if answers == 0:
        raise DataRecordError(f"{name} has no answer ('gpt' turn) to train on.")
    placeholders = sum(str(turn.get("value", "")).count(IMAGE_PLACEHOLDER) for turn in turns)
    images = record_images(record)
    if images and placeholders == 0:
        raise DataRecordError(
            f"{name} has an image but no {IMAGE_PLACEHOLDER} token in its conversation; put '{IMAGE_PLACEHOLDER}\\n' "
            "where the image goes (LLaVA puts it before the first question)."
        )
    if placeholders != len(images):
        raise DataRecordError(
            f"{name} has {placeholders} {IMAGE_PLACEHOLDER} token(s) but {len(images)} image(s); give one image per "
            f"{IMAGE_PLACEHOLDER}."
        )


def conversation_messages(record: dict) -> list[dict]:
    """Chat messages (`{"role", "content": [{"type": "image"} | {"type": "text", "text"}]}`) of a record;
    each `<image>` (and the newline after it) becomes an image item at its place."""
    messages = []
    for turn in record["conversations"]:
        role = ROLES[turn["from"]]
        content = []
        for k, piece in enumerate(re.split(re.escape(IMAGE_PLACEHOLDER) + r"\n?", str(turn["value"]))):
            if k > 0:
                content.append({"type": "image"})
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    return messages


# ----------------------------------------------------------------------------------------------- sources
def _is_datasets_folder(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def _read_json_records(source: Path) -> list[dict]:
    """The records of a JSON list file or a JSON-lines file; malformed JSON is named by file, line and column."""
    fix = "fix the file (a LLaVA JSON list, or one JSON record per line)"
    text = source.read_text(encoding="utf-8")
    if text.lstrip().startswith("[") or not text.strip():
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataRecordError(json_error_message(source, error, fix)) from None
    else:
        records = []
        for number, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataRecordError(json_error_message(source, error, fix, line_offset=number)) from None
    if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
        raise DataRecordError(f"{source} must hold a list of records (JSON objects); {fix}.")
    if not records:
        raise DataRecordError(f"{source} holds no records; pass a file with at least one conversation.")
    return records


def load_records(path: str, max_examples: int | None = None) -> list[dict]:
    """Records from a LLaVA JSON (or JSON-lines) file or a Hugging Face `datasets` folder, each checked."""
    source = Path(path)
    if not source.exists():
        raise DataRecordError(f"Training data {source} does not exist; pass a LLaVA JSON file or a datasets folder.")
    if source.is_dir():
        import datasets

        if _is_datasets_folder(source):
            loaded = datasets.load_from_disk(str(source))
        else:
            loaded = datasets.load_dataset(str(source))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        if max_examples is not None:
            loaded = loaded.select(range(min(max_examples, len(loaded))))
        records = [dict(row) for row in loaded]
    else:
        records = _read_json_records(source)
        if max_examples is not None:
            records = records[:max_examples]
    for index, record in enumerate(records):
        check_record(record, index)
    return records


class ImageResolver:
    """Opens a record's images: file paths relative to `image_folder` (or the data file's folder, then its
    `images/` subfolder), PIL images, or `datasets` image dicts."""

    def __init__(self, image_folder: str | None = None, data_path: str | None = None):
        roots = [Path(image_folder)] if image_folder else []
        if data_path:
            base = Path(data_path) if Path(data_path).is_dir() else Path(data_path).parent
            roots += [base, base / "images"]
        self.roots = roots or [Path(".")]

    def path(self, relative: str) -> Path | None:
        if os.path.isabs(relative):
            return Path(relative) if os.path.exists(relative) else None
        for root in self.roots:
            candidate = root / relative
            if candidate.exists():
                return candidate
        return None

    def check(self, records: list[dict]) -> None:
        """Raises `DataRecordError` naming the first record whose image file is missing."""
        for index, record in enumerate(records):
            for image in record_images(record):
                if isinstance(image, str) and self.path(image) is None:
                    raise DataRecordError(
                        f"{record_name(record, index)}: image {image!r} not found under "
                        f"{', '.join(str(r) for r in self.roots)}; pass the folder holding it with --image-folder."
                    )

    def open(self, image, record: dict, index: int):
        from PIL import Image

        if isinstance(image, dict):
            if image.get("bytes"):
                import io

                return Image.open(io.BytesIO(image["bytes"])).convert("RGB")
            image = image.get("path")
        if isinstance(image, str):
            path = self.path(image)
            if path is None:
                raise DataRecordError(f"{record_name(record, index)}: image {image!r} not found under {self.roots}.")
            return Image.open(path).convert("RGB")
        return image.convert("RGB")


# ---------------------------------------------------------------------------------------------- encoding
def render(processor, messages: list[dict], add_generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def conversation_segments(processor, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as `(text, is_answer)` pieces: prompt text, answer, prompt text, answer...

    Uses only the chat template: the text between `render(messages[:i], generation prompt)` and
    `render(messages[:i+1])` is assistant turn i's answer (with its end-of-turn tokens).
    """
    segments, consumed = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(processor, messages[:i], add_generation_prompt=True)
        full = render(processor, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(consumed) or not full.startswith(prompt):
            raise ValueError(
                "The processor's chat template does not render conversations prefix by prefix (turn "
                f"{i}); training needs a template where each turn extends the text of the turns before it."
            )
        segments.append((prompt[len(consumed) :], False))
        segments.append((full[len(prompt) :], True))
        consumed = full
    return segments


def first_prompt(processor, record: dict) -> str:
    """The rendered first user turn with the generation prompt (what an evaluation prompt looks like)."""
    messages = conversation_messages(record)
    first_answer = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return render(processor, messages[:first_answer], add_generation_prompt=True)


def encode_record(
    processor, record: dict, images: list, eos_token_ids: set[int], max_length: int, index: int = 0
) -> dict:
    """Token ids, answer mask and image tensors of one record.

    Returns:
        dict with `input_ids` `(n,)`, `labels` `(n,)` bool (True on answer tokens up to the first EOS of each
        answer), `pixel_values` (images, or Qwen-VL patch rows, or None), `image_sizes` (LLaVA-NeXT, or None) and
        `image_grid_thw` (Qwen-VL, or None).
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    ids, labels, pixel_values, image_sizes, grids = [], [], [], [], []
    remaining = list(images)
    for k, (text, is_answer) in enumerate(conversation_segments(processor, conversation_messages(record))):
        if is_answer:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            mark = []
            ended = False
            for token in piece:
                mark.append(not ended)
                ended = ended or token in eos_token_ids
            ids += piece
            labels += mark
            continue
        count = text.count(getattr(processor, "image_token", IMAGE_PLACEHOLDER))
        chunk, remaining = remaining[:count], remaining[count:]
        kwargs = {"images": chunk} if chunk else {}
        encoded = processor(text=text, return_tensors="pt", add_special_tokens=k == 0, **kwargs)
        piece = encoded["input_ids"][0].tolist()
        ids += piece
        labels += [False] * len(piece)
        if chunk:
            pixel_values.append(encoded["pixel_values"])
            if "image_sizes" in encoded:
                image_sizes.append(encoded["image_sizes"])
            if "image_grid_thw" in encoded:
                grids.append(encoded["image_grid_thw"])
    if len(ids) > max_length:
        image_token = getattr(processor, "image_token_id", None)
        if image_token is not None and image_token in ids[max_length:]:
            raise DataRecordError(
                f"{record_name(record, index)} is {len(ids)} tokens long and its image tokens reach past max_length "
                f"({max_length}); raise --max-length or drop the record."
            )
        ids, labels = ids[:max_length], labels[:max_length]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.bool),
        "pixel_values": torch.cat(pixel_values) if pixel_values else None,
        "image_sizes": torch.cat(image_sizes) if image_sizes else None,
        "image_grid_thw": torch.cat(grids) if grids else None,
    }


class ConversationDataset(torch.utils.data.Dataset):
    """Records encoded on the fly (images opened in data-loader workers)."""

    def __init__(self, records: list[dict], processor, resolver: ImageResolver, eos_token_ids, max_length: int):
        self.records, self.processor, self.resolver = records, processor, resolver
        self.eos_token_ids = set(eos_token_ids)
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        images = [self.resolver.open(image, record, index) for image in record_images(record)]
        return encode_record(self.processor, record, images, self.eos_token_ids, self.max_length, index)


@dataclass
class Collator:
    """Right-pads examples into a batch: `input_ids`, `attention_mask`, `labels` `(B, L)`, `pixel_values` (all
    images of the batch, in order, or None; Qwen-VL: all their patch rows), `image_sizes`, `image_grid_thw`
    (Qwen-VL: one row per image) and `images_per_example` `(B,)`."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        length = max(e["input_ids"].numel() for e in examples)
        batch = len(examples)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        labels = torch.zeros(batch, length, dtype=torch.bool)
        for b, example in enumerate(examples):
            n = example["input_ids"].numel()
            input_ids[b, :n] = example["input_ids"]
            attention_mask[b, :n] = 1
            labels[b, :n] = example["labels"]
        pixels = [e["pixel_values"] for e in examples if e["pixel_values"] is not None]
        if pixels and pixels[0].dim() == 5:  # LLaVA-NeXT: (images, patches, 3, H, W), pad the patch count
            most = max(p.shape[1] for p in pixels)
            pixels = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixels]
        sizes = [e["image_sizes"] for e in examples if e["image_sizes"] is not None]
        grids = [e["image_grid_thw"] for e in examples if e.get("image_grid_thw") is not None]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.cat(pixels) if pixels else None,
            "image_sizes": torch.cat(sizes) if sizes else None,
            "image_grid_thw": torch.cat(grids) if grids else None,
            "images_per_example": torch.tensor([_image_count(e) for e in examples]),
        }


def _image_count(example: dict) -> int:
    if example["pixel_values"] is None:
        return 0
    grid = example.get("image_grid_thw")
    return int(grid.shape[0]) if grid is not None else int(example["pixel_values"].shape[0])


def answer_token_ids(records: list[dict], tokenizer) -> list[list[int]]:
    """The token ids of every answer (assistant turn) of `records`: what the target says, to choose a reduced
    draft vocabulary from (`specvlm_hf.draft_vocab`)."""
    answers = []
    for record in records:
        for turn in record.get("conversations", []):
            if ROLES.get(turn.get("from")) == "assistant" and turn.get("value"):
                answers.append(tokenizer(turn["value"], add_special_tokens=False)["input_ids"])
    return answers
