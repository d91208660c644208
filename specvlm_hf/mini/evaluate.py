"""Evidence that the mini VLM is a real model, measured on held-out generated data.

    python -m specvlm_hf.mini.evaluate --model_dir specvlm_hf/mini/weights --out results/mini_vlm.json

Held-out data is drawn from `eval_seed` (the model was trained on `seed`, a different random stream, so
every scene and image is new; the documentation sentences are shared, as the corpus is small). Reports:

- `heldout_loss`: mean cross-entropy (nats per answer token), overall and per task family.
- `image_dependence`: the same loss on image tasks with the right image and with a mismatched one (each
  question paired with another example's image); a model that ignores images scores the same on both.
- `entropy`: mean entropy (nats) of the next-token distribution at answer tokens, which bounds how
  predictable the target is for a draft model.
- `accuracy`: greedy-decoding accuracy on counting, colour and relative-position questions, parsed from the
  first number / colour / relation word of the answer, next to the majority-answer baseline.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from pathlib import Path

import torch

from .data import COLOURS, NUMBER_WORDS, TASK_WEIGHTS, make_example
from .tokenizer import prompt_text
from .train import encode_dataset, make_batch

QUESTION_TASKS = ("count", "colour", "position")


def parse_short_answer(task: str, answer: str) -> str | None:
    """The short answer a generated reply commits to first: a count ("3"), a colour or a relation."""
    words = re.findall(r"[a-z]+|\d+", answer.lower())
    for word in words:
        if task == "count":
            if word.isdigit():
                return word
            if word in NUMBER_WORDS:
                return str(NUMBER_WORDS.index(word))
            if word in ("no", "none"):
                return "0"
        elif task == "colour" and word in COLOURS:
            return word
        elif task == "position" and word in ("left", "right", "above", "below"):
            return word
    return None


@torch.no_grad()
def token_statistics(model, processor, data, tasks: list[str], batch_size: int = 64, image_order=None) -> dict:
    """Summed answer-token cross-entropy and entropy per task, and token counts.

    Returns:
        `{task: {"loss": float, "entropy": float, "tokens": int}}` with sums (not means) over answer tokens.
    """
    device = next(model.parameters()).device
    sums: dict[str, dict] = {}
    for start in range(0, len(tasks), batch_size):
        indices = torch.arange(start, min(start + batch_size, len(tasks)), device=device)
        batch = make_batch(data, indices, processor.image_processor, image_order, image_token_id(model))
        labels = batch.pop("labels")
        batch["pixel_values"] = None if batch["pixel_values"] is None else batch["pixel_values"].to(model.dtype)
        logits = model(**batch).logits[:, :-1].float()  # (batch, length - 1, vocab) predicts tokens 1..
        targets = labels[:, 1:]
        mask = targets != -100
        log_probs = torch.log_softmax(logits, dim=-1)
        nll = -log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        for row, index in enumerate(indices.tolist()):
            entry = sums.setdefault(tasks[index], {"loss": 0.0, "entropy": 0.0, "tokens": 0})
            entry["loss"] += float(nll[row][mask[row]].sum())
            entry["entropy"] += float(entropy[row][mask[row]].sum())
            entry["tokens"] += int(mask[row].sum())
    return sums


def image_token_id(model) -> int | None:
    """The image placeholder id of a Qwen-VL model (its batches need `mm_token_type_ids`), else None."""
    return getattr(model.config, "image_token_id", None) if hasattr(model.config, "vision_start_token_id") else None


def trained_image_size(model_dir: str, default: int = 128) -> int:
    """The image side the model was trained on (`train_config.json`), or `default`."""
    path = Path(model_dir, "train_config.json")
    return int(json.loads(path.read_text())["config"]["image_size"]) if path.is_file() else default


def _means(sums: dict, key: str, tasks=None) -> dict:
    tasks = [t for t in (tasks or sums) if t in sums]
    result = {t: sums[t][key] / max(sums[t]["tokens"], 1) for t in tasks}
    result["all"] = sum(sums[t][key] for t in tasks) / max(sum(sums[t]["tokens"] for t in tasks), 1)
    return result


@torch.no_grad()
def greedy_answers(
    model, processor, records: list[dict], images: list, max_new_tokens: int = 40, batch_size: int = 64
) -> list[str]:
    """Greedy replies to single-turn records (all with an image), decoded without special tokens."""
    device = next(model.parameters()).device
    replies = []
    for start in range(0, len(records), batch_size):
        prompts = [prompt_text(processor, r) for r in records[start : start + batch_size]]
        inputs = processor(
            images=images[start : start + batch_size], text=prompts, padding=True, return_tensors="pt"
        ).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        replies += processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return replies


def question_accuracy(
    model, processor, task: str, seed: int, num_questions: int, image_size: int, batch_size: int = 64
) -> dict:
    """Greedy accuracy on `num_questions` held-out questions of one task, with the majority baseline."""
    examples = [make_example(seed, i, image_size, task=task) for i in range(num_questions)]
    records, images = [e[0] for e in examples], [e[1] for e in examples]
    replies = greedy_answers(model, processor, records, images, batch_size=batch_size)
    predictions = [parse_short_answer(task, reply) for reply in replies]
    targets = [r["target"] for r in records]
    correct = sum(p == t for p, t in zip(predictions, targets))
    majority = Counter(targets).most_common(1)[0][1]
    return {
        "accuracy": correct / num_questions,
        "majority_baseline": majority / num_questions,
        "num_questions": num_questions,
        "examples": [
            {"question": r["conversations"][0]["value"], "target": t, "reply": reply}
            for r, t, reply in list(zip(records, targets, replies))[:3]
        ],
    }


def evaluate(
    model,
    processor_dir: str,
    eval_seed: int = 1,
    num_examples: int = 1000,
    num_questions: int = 200,
    batch_size: int = 64,
) -> dict:
    """All held-out metrics of the module docstring, as one JSON-ready dict."""
    from ..processors import load_processor

    start = time.time()
    model.eval()
    processor = load_processor(processor_dir)
    device = next(model.parameters()).device
    image_size = trained_image_size(processor_dir)
    data = encode_dataset(
        processor_dir, eval_seed, num_examples, image_size, 1024, processor.tokenizer.pad_token_id, workers=1
    ).to(device)
    tasks = [make_example(eval_seed, i, image_size)[0]["task"] for i in range(num_examples)]

    sums = token_statistics(model, processor, data, tasks, batch_size)
    # Mismatched images: every image question gets the image of the next image example (a derangement).
    num_images = len(data.pixels)
    mismatched = token_statistics(
        model, processor, data, tasks, batch_size, torch.roll(torch.arange(num_images, device=device), 1)
    )
    image_tasks = [t for t in TASK_WEIGHTS if t != "text"]
    results = {
        "eval_seed": eval_seed,
        "num_examples": num_examples,
        "answer_tokens": {t: s["tokens"] for t, s in sums.items()},
        "heldout_loss": _means(sums, "loss"),
        "image_dependence": {
            "loss_right_image": _means(sums, "loss", image_tasks),
            "loss_mismatched_image": _means(mismatched, "loss", image_tasks),
        },
        "entropy": _means(sums, "entropy"),
        "accuracy": {
            task: question_accuracy(
                model, processor, task, eval_seed + 1000 + i, num_questions, image_size, batch_size
            )
            for i, task in enumerate(QUESTION_TASKS)
        },
    }
    results["evaluation_seconds"] = time.time() - start
    return results


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForImageTextToText

    parser = argparse.ArgumentParser(description="Held-out metrics of a trained mini VLM.")
    parser.add_argument("--model_dir", default=None, help="Model + processor folder (default: the shipped mini VLM).")
    parser.add_argument("--out", type=Path, default=None, help="Write the results JSON here.")
    parser.add_argument("--eval_seed", type=int, default=1)
    parser.add_argument("--num_examples", type=int, default=1000)
    parser.add_argument("--num_questions", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)

    from . import WEIGHTS_DIR

    model_dir = args.model_dir or str(WEIGHTS_DIR)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).to(args.device)
    results = {"model_dir": str(model_dir), "dtype": args.dtype, "device": args.device}
    results.update(evaluate(model, model_dir, args.eval_seed, args.num_examples, args.num_questions))
    train_file = Path(model_dir, "train_config.json")
    if train_file.exists():
        results["training"] = json.loads(train_file.read_text())
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
