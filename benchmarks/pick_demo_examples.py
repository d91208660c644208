"""Pick the demo's example images: generated scenes that the mini VLM answers correctly, checked against the scene.

    python benchmarks/pick_demo_examples.py --out specvlm_hf/demo_examples

Draws scenes with the mini VLM's own data generator (a seed its training never used), asks the demo's questions
(greedy, float32, as the demo decodes) and keeps the first three-shape scene whose description names every shape
with its size, colour and place, the right count and the background, and the first three-shape scene whose count or
colour question is answered right without naming a shape it does not have. Writes the images and `examples.json`
(image, prompt, the model's answer, the scene).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict
from pathlib import Path

import torch

from specvlm_hf.mini import data

SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}
COLOURS = "|".join(data.COLOURS)
KINDS = "|".join(data.SHAPES)
PLACE_WORDS = ("top", "bottom", "left", "right")


def _expected_place_words(shape: data.Shape) -> tuple[set[str], set[str]]:
    """(words a sentence about the shape must hold, words it must not hold)."""
    position = shape.position
    required = set() if position == "centre" else set(position.split())
    return required, set(PLACE_WORDS) - required


def description_errors(text: str, scene: data.Scene) -> list[str]:
    """What a description gets wrong about `scene` (empty when everything it says is right and complete)."""
    errors = []
    n = len(scene.shapes)
    count = re.search(rf"\b({'|'.join(data.NUMBER_WORDS)}) (?:simple )?shapes?\b", text)
    if not count or data.NUMBER_WORDS.index(count.group(1)) != n:
        errors.append(f"count: {count.group(0) if count else 'none'} for {n}")
    background = re.search(r"(white|light grey|dark grey) background", text)
    if not background or background.group(1) != scene.background:
        errors.append(f"background: {background.group(1) if background else 'none'} for {scene.background}")
    described = []
    for sentence in re.split(r"(?<=\.) ", text):
        found = [
            (SIZE_WORDS[s], c, k)
            for s, c, k in re.findall(rf"\b(small|little|large|big) ({COLOURS}) ({KINDS})\b", sentence)
        ]
        found += [
            (s, c, k) for k, c, s in re.findall(rf"The ({KINDS}) .* is ({COLOURS}) and (small|large)\.", sentence)
        ]
        described += found
        if len(found) == 1:
            matches = [s for s in scene.shapes if (s.size, s.colour, s.kind) == found[0]]
            words = set(re.findall(r"\b(top|bottom|left|right)\b", sentence))
            if matches and not any(
                _expected_place_words(s)[0] <= words and not words & _expected_place_words(s)[1] for s in matches
            ):
                errors.append(f"place of {' '.join(found[0])}: {sentence!r}")
    if sorted(described) != sorted((s.size, s.colour, s.kind) for s in scene.shapes):
        errors.append(f"shapes: {sorted(described)}")
    total = re.search(r"(?:In total there (?:is|are)|Altogether the picture has) (.*?)\.", text)
    if total:
        said = {
            kind: data.NUMBER_WORDS.index(word) for word, kind in re.findall(rf"\b(\w+) ({KINDS})s?\b", total.group(1))
        }
        actual = {kind: sum(s.kind == kind for s in scene.shapes) for kind in {s.kind for s in scene.shapes}}
        if said != actual:
            errors.append(f"total: {total.group(1)}")
    colours = re.search(r"The colours used are (.*?)\.", text)
    if colours and set(re.findall(COLOURS, colours.group(1))) != {s.colour for s in scene.shapes}:
        errors.append(f"colours: {colours.group(1)}")
    return errors


def unknown_shapes(text: str, scene: data.Scene) -> list[str]:
    """Unless the text names every shape of the scene once ("colour kind", with the right size where it gives one)
    and nothing else: what it names instead."""
    named = re.findall(rf"\b(?:(small|little|large|big) )?({COLOURS}) ({KINDS})\b", text)
    sizes_right = all(
        not size or any((SIZE_WORDS[size], c, k) == (s.size, s.colour, s.kind) for s in scene.shapes)
        for size, c, k in named
    )
    if sorted((c, k) for _, c, k in named) == sorted((s.colour, s.kind) for s in scene.shapes) and sizes_right:
        return []
    return [f"names {[' '.join(filter(None, n)) for n in named]}"]


def count_errors(text: str, scene: data.Scene, target: str) -> list[str]:
    """What a count answer gets wrong: the number in its first sentence, or a shape the scene does not have."""
    first = text.split(".")[0]
    number = re.search(rf"\b({'|'.join(data.NUMBER_WORDS)})\b", first)
    wrong = not number or str(data.NUMBER_WORDS.index(number.group(1))) != target
    return ([f"number: {first!r} for {target}"] if wrong else []) + unknown_shapes(text, scene)


def colour_errors(text: str, scene: data.Scene, target: str) -> list[str]:
    """What a colour answer gets wrong: the colour in its first sentence, or a shape the scene does not have."""
    first = text.split(".")[0]
    return ([] if target in first else [f"colour: {first!r} for {target}"]) + unknown_shapes(text, scene)


CHECKS = {
    "scene": lambda text, scene, target: description_errors(text, scene),
    "count": count_errors,
    "colour": colour_errors,
}


def scene_example(seed: int, index: int, task: str):
    """(record, image, scene) of a generated example (the scene captured from the generator)."""
    captured = []
    original = data.random_scene

    def capture(*args, **kwargs):
        captured.append(original(*args, **kwargs))
        return captured[-1]

    data.random_scene = capture
    try:
        record, image = data.make_example(seed, index, task=task)
    finally:
        data.random_scene = original
    return record, image, captured[-1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=7070)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--tries", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    from specvlm_hf.commands.generate import build_inputs
    from specvlm_hf.mini import load

    model, processor = load()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = []
    # a description of three shapes, then a question (a count of two or more, or a colour) about another scene
    wanted = [(("scene",), "Describe this image.", 3), (("count", "colour"), None, 3)]
    for tasks, prompt, shapes in wanted:
        for index in range(args.tries):
            task = tasks[index % len(tasks)]
            record, image, scene = scene_example(args.seed, index, task)
            if len(scene.shapes) != shapes:
                continue
            question = prompt or record["conversations"][0]["value"].replace("<image>", "").strip()
            if task == "count" and (record["target"] in ("0", "1") or not question.startswith("How many")):
                continue
            inputs = build_inputs(processor, image, question)
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            answer = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            errors = CHECKS[task](answer, scene, record.get("target"))
            print(f"{task} {index}: {len(scene.shapes)} shapes, {'ok' if not errors else errors}", flush=True)
            if not errors:
                name = f"{task}-{args.seed}-{index}.png"
                image.save(out / name)
                chosen.append({"image": name, "prompt": question, "answer": answer, "scene": asdict(scene)})
                break
    (out / "examples.json").write_text(json.dumps(chosen, indent=1) + "\n")
    print(json.dumps(chosen, indent=1))


if __name__ == "__main__":
    main()
