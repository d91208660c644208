"""Synthetic instruction data for the mini VLM, in LLaVA's format.

Every example is a pure function of `(seed, index)`: `make_example(seed, index)` draws the image and
writes the conversation, so a dataset of any size can be rebuilt, split across processes or streamed
without storing it. Task families (weights in `TASK_WEIGHTS`):

- `scene`: describe a procedurally drawn scene of shapes (shape, colour, size, position, counts).
- `count`, `colour`, `position`: visual questions answered first, then explained from the image.
- `read`: transcribe a sentence of the Python documentation rendered in the image.
- `text`: text-only instructions answered from the Python documentation (no image).

Short clips for video models come from `make_clip_example(seed, index)`: a shape moving in a straight line past a
still one, with questions about the motion (kept apart from `TASK_WEIGHTS`, so image datasets are unchanged).

`write_dataset` writes the LLaVA layout: a JSON list of
`{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}]}`
(text-only records have no `"image"` key) plus one PNG per image. Records also carry `"task"` and
`"target"` (the short answer of `count` / `colour` / `position` questions), which LLaVA loaders ignore.

Run `python -m specvlm_hf.mini.data --out DIR --num-examples N --seed S` to write a dataset.
"""

from __future__ import annotations

import argparse
import json
import random
import textwrap
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .corpus import load_corpus

IMAGE_SIZE = 128
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (240, 205, 30),
    "purple": (140, 60, 190),
    "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.27, "large": 0.42}  # radius as a fraction of a grid cell's side
SIZE_WORDS = {"small": ("small", "small", "little"), "large": ("large", "large", "big")}
BACKGROUNDS = {"white": (245, 245, 245), "light grey": (195, 195, 195), "dark grey": (60, 60, 60)}
PAPERS = {"white": (250, 248, 240), "pale yellow": (250, 240, 190), "pale blue": (215, 230, 250)}
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TASK_WEIGHTS = {"scene": 0.25, "count": 0.22, "colour": 0.15, "position": 0.12, "read": 0.12, "text": 0.14}
MAX_SHAPES = 6
MAX_ANSWER_CHARS = 700  # about 200 tokens of the mini tokenizer


@dataclass(frozen=True)
class Shape:
    """One shape of a scene, placed in cell (row, column) of a 3x3 grid."""

    kind: str
    colour: str
    size: str
    row: int
    column: int

    @property
    def position(self) -> str:
        """Where the shape is, e.g. "top left", "centre", "bottom"."""
        if self.row == 1 and self.column == 1:
            return "centre"
        if self.row == 1:
            return COLUMNS[self.column]
        if self.column == 1:
            return ROWS[self.row]
        return f"{ROWS[self.row]} {COLUMNS[self.column]}"

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """Shapes in reading order (top to bottom, left to right) on a background colour."""

    shapes: tuple[Shape, ...]
    background: str


# ----------------------------------------------------------------------------- wording helpers


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def join_words(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def where(shape: Shape, rng: random.Random) -> str:
    """A location phrase: "in the top left corner", "in the centre", "on the right", ..."""
    pos = shape.position
    if pos == "centre":
        return rng.choice(["in the centre", "in the middle", "at the centre of the image"])
    if pos in ("left", "right"):
        return rng.choice([f"on the {pos}", f"on the {pos} side", f"at the {pos} edge"])
    if pos in ("top", "bottom"):
        return rng.choice([f"at the {pos}", f"at the {pos} in the middle", f"in the {pos} centre"])
    return rng.choice([f"in the {pos} corner", f"in the {pos}", f"at the {pos}"])


def capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


# ----------------------------------------------------------------------------- scenes


def random_scene(rng: random.Random, min_shapes: int = 1, max_shapes: int = MAX_SHAPES) -> Scene:
    """Draw 1-6 shapes into distinct cells of the 3x3 grid, with random kind, colour and size."""
    n = rng.randint(min_shapes, max_shapes)
    cells = sorted(rng.sample(range(9), n))
    shapes = tuple(
        Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), cell // 3, cell % 3)
        for cell in cells
    )
    return Scene(shapes, rng.choice(list(BACKGROUNDS)))


def draw_scene(scene: Scene, rng: random.Random, image_size: int = IMAGE_SIZE) -> Image.Image:
    """Render a scene as an RGB image of `image_size` x `image_size` pixels (shapes jitter inside their cell)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cell = image_size / 3
    for shape in scene.shapes:
        radius = SIZES[shape.size] * cell
        slack = cell / 2 - radius - 1
        cx = (shape.column + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (shape.row + 0.5) * cell + rng.uniform(-slack, slack)
        draw_shape(draw, shape.kind, cx, cy, radius, COLOURS[shape.colour])
    return image


def describe_shape(shape: Shape, rng: random.Random) -> str:
    """One sentence about one shape, in one of several wordings."""
    thing = f"{rng.choice(SIZE_WORDS[shape.size])} {shape.colour} {shape.kind}"
    place = where(shape, rng)
    template = rng.randrange(6)
    if template == 0:
        return f"{capitalise(place)} there is {with_article(thing)}."
    if template == 1:
        return f"{capitalise(with_article(thing))} {rng.choice(['sits', 'is placed', 'appears'])} {place}."
    if template == 2:
        return f"{capitalise(place)} {rng.choice(['we see', 'you can see', 'I can see'])} {with_article(thing)}."
    if template == 3:
        return f"There is {with_article(thing)} {place}."
    if template == 4:
        return f"{capitalise(place)} is {with_article(thing)}."
    return f"The {shape.kind} {place} is {shape.colour} and {shape.size}."


def count_summary(scene: Scene) -> str:
    """'two circles, one square and one triangle' in order of first appearance."""
    counts: dict[str, int] = {}
    for shape in scene.shapes:
        counts[shape.kind] = counts.get(shape.kind, 0) + 1
    return join_words([f"{number_word(n)} {plural(kind, n)}" for kind, n in counts.items()])


def describe_scene(scene: Scene, rng: random.Random) -> str:
    """A paragraph describing every shape of the scene in reading order, with counts."""
    n = len(scene.shapes)
    opener = rng.choice(
        [
            f"The image shows {number_word(n)} {plural('shape', n)} on a {scene.background} background.",
            f"This picture contains {number_word(n)} {plural('shape', n)} drawn on a {scene.background} background.",
            f"There {'is' if n == 1 else 'are'} {number_word(n)} {plural('shape', n)} in this image, "
            f"set against a {scene.background} background.",
            f"I can see {number_word(n)} {plural('shape', n)} on a plain {scene.background} background.",
            f"On a {scene.background} background, the image has {number_word(n)} simple {plural('shape', n)}.",
            f"This is a simple drawing of {number_word(n)} {plural('shape', n)} over a {scene.background} background.",
        ]
    )
    # Shapes are described in a random order: which one comes next is a genuine choice (not a template).
    order = list(scene.shapes)
    if rng.random() < 0.7:
        rng.shuffle(order)
    body = [describe_shape(shape, rng) for shape in order]
    closers = [
        f"In total there {'is' if n == 1 else 'are'} {count_summary(scene)}.",
        f"Altogether the picture has {count_summary(scene)}.",
        "",
    ]
    colours = sorted({s.colour for s in scene.shapes})
    if n > 1:
        closers.append(f"The colours used are {join_words(colours)}.")
    return " ".join([opener, *body, rng.choice(closers)]).strip()


# ----------------------------------------------------------------------------- visual questions


def count_question(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    """(question, answer, target) for "how many X": all shapes, one kind or one colour."""
    mode = rng.choice(["all", "kind", "kind", "colour"])
    if mode == "all":
        matches, noun = list(scene.shapes), "shape"
        question = rng.choice(
            ["How many shapes are in the image?", "How many shapes can you see?", "Count the shapes in this picture."]
        )
    elif mode == "kind":
        kind = rng.choice(SHAPES)
        matches, noun = [s for s in scene.shapes if s.kind == kind], kind
        question = rng.choice(
            [
                f"How many {kind}s are there in the image?",
                f"How many {kind}s can you see?",
                f"Count the {kind}s in this picture.",
            ]
        )
    else:
        colour = rng.choice(list(COLOURS))
        matches, noun = [s for s in scene.shapes if s.colour == colour], f"{colour} shape"
        question = rng.choice(
            [
                f"How many {colour} shapes are there?",
                f"How many shapes are {colour}?",
                f"Count the {colour} shapes in the image.",
            ]
        )
    k = len(matches)
    if k == 0:
        shuffled = list(scene.shapes)
        rng.shuffle(shuffled)
        others = join_words([with_article(f"{s.name} {where(s, rng)}") for s in shuffled])
        answer = rng.choice(
            [
                f"There are zero {noun}s in the image. The picture only contains {others}.",
                f"None: there are no {noun}s here. What the image does show is {others}.",
            ]
        )
        return question, answer, "0"
    first = rng.choice(
        [
            f"There {'is' if k == 1 else 'are'} {number_word(k)} {plural(noun, k)}.",
            f"I count {number_word(k)} {plural(noun, k)}.",
            f"The answer is {number_word(k)}.",
        ]
    )
    details = [
        f"{with_article(f'{rng.choice(SIZE_WORDS[s.size])} {s.colour} {s.kind}')} {where(s, rng)}" for s in matches
    ]
    rng.shuffle(details)
    explanation = rng.choice(
        [f"Looking at the image, I can see {join_words(details)}.", f"Specifically, there is {join_words(details)}."]
    )
    rest = [s for s in scene.shapes if s not in matches]
    if rest:
        rng.shuffle(rest)
        names = join_words([with_article(s.name) for s in rest])
        explanation += rng.choice(
            [f" The rest of the picture, {names}, is not counted.", f" I did not count {names}."]
        )
    return question, f"{first} {explanation}", str(k)


def colour_question(scene: Scene, rng: random.Random) -> tuple[str, str, str] | None:
    """(question, answer, target) for "what colour is ..."; None if no shape can be named uniquely."""
    unique_kinds = [s for s in scene.shapes if sum(t.kind == s.kind for t in scene.shapes) == 1]
    if unique_kinds and rng.random() < 0.6:
        shape = rng.choice(unique_kinds)
        question = rng.choice(
            [
                f"What colour is the {shape.kind}?",
                f"What is the colour of the {shape.kind}?",
                f"Which colour does the {shape.kind} have?",
            ]
        )
        subject = f"The {shape.kind}"
    else:
        shape = rng.choice(scene.shapes)
        question = rng.choice(
            [
                f"What colour is the shape in the {shape.position}?",
                f"Which colour is the shape at the {shape.position} position?",
            ]
        )
        subject = f"The shape in the {shape.position}"
    answer = rng.choice(
        [
            f"{subject} is {shape.colour}. It is {with_article(f'{shape.size} {shape.colour} {shape.kind}')} "
            f"{where(shape, rng)}, drawn on a {scene.background} background.",
            f"It is {shape.colour}. {subject} is {with_article(f'{shape.size} {shape.kind}')} "
            f"filled with {shape.colour}, located {where(shape, rng)}.",
        ]
    )
    others = [s for s in scene.shapes if s != shape]
    rng.shuffle(others)
    if others:
        answer += f" The image also contains {join_words([with_article(s.name) for s in others])}."
    return question, answer, shape.colour


def position_question(scene: Scene, rng: random.Random) -> tuple[str, str, str] | None:
    """(question, answer, target) for "is A left or right of / above or below B"; None if not askable."""
    named = [s for s in scene.shapes if sum(t.name == s.name for t in scene.shapes) == 1]
    pairs = [(a, b) for a in named for b in named if a != b and (a.column != b.column or a.row != b.row)]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    if a.column != b.column and (a.row == b.row or rng.random() < 0.5):
        relation = "to the left of" if a.column < b.column else "to the right of"
        question = f"Is the {a.name} to the left or to the right of the {b.name}?"
        target = "left" if a.column < b.column else "right"
    else:
        relation = "above" if a.row < b.row else "below"
        question = f"Is the {a.name} above or below the {b.name}?"
        target = "above" if a.row < b.row else "below"
    answer = rng.choice(
        [
            f"The {a.name} is {relation} the {b.name}. The {a.name} is {where(a, rng)}, "
            f"while the {b.name} is {where(b, rng)}.",
            f"It is {relation} it. I can see the {a.name} {where(a, rng)} and the {b.name} {where(b, rng)}, "
            f"so the {a.name} is {relation} the {b.name}.",
        ]
    )
    return question, answer, target


# ----------------------------------------------------------------------------- text tasks


def _font() -> ImageFont.ImageFont:
    # Pillow's built-in bitmap font (6 px per character) renders identically everywhere without font files.
    loader = getattr(ImageFont, "load_default_imagefont", None)
    return loader() if loader is not None else ImageFont.load_default()


def draw_text(sentence: str, paper: str, image_size: int = IMAGE_SIZE) -> Image.Image:
    """Render `sentence` wrapped in dark text on a paper-coloured image."""
    image = Image.new("RGB", (image_size, image_size), PAPERS[paper])
    draw = ImageDraw.Draw(image)
    line_chars = (image_size - 8) // 6
    for i, line in enumerate(textwrap.wrap(sentence, line_chars)):
        draw.text((4, 4 + 12 * i), line, fill=(20, 20, 20), font=_font())
    return image


def readable_sentences(image_size: int = IMAGE_SIZE) -> list[tuple[str, str]]:
    """(topic title, sentence) pairs whose wrapped text fits in the image."""
    line_chars, max_lines = (image_size - 8) // 6, (image_size - 8) // 12
    return [
        (topic["title"], sentence)
        for topic in load_corpus()
        for paragraph in topic["paragraphs"]
        for sentence in paragraph
        if len(textwrap.wrap(sentence, line_chars)) <= max_lines
    ]


def read_task(rng: random.Random, image_size: int) -> tuple[str, str, Image.Image]:
    title, sentence = rng.choice(_readable(image_size))
    image = draw_text(sentence, rng.choice(list(PAPERS)), image_size)
    question = rng.choice(
        [
            "What does the text in this image say?",
            "Read the text in the picture.",
            "Please transcribe the text shown in the image.",
            "What is written in this image?",
        ]
    )
    answer = rng.choice(
        [
            f'The text in the image reads: "{sentence}"',
            f'The image shows a short passage of text. It says: "{sentence}"',
            f'It says "{sentence}" This sentence comes from the Python documentation section "{title}".',
        ]
    )
    return question, answer, image


def _truncate_sentences(sentences: list[str], max_chars: int = MAX_ANSWER_CHARS) -> str:
    text = sentences[0]
    for sentence in sentences[1:]:
        if len(text) + 1 + len(sentence) > max_chars:
            break
        text += " " + sentence
    return text[:max_chars]


def text_task(rng: random.Random) -> tuple[str, str]:
    """A text-only instruction answered from the documentation corpus."""
    topic = rng.choice(load_corpus())
    paragraphs = topic["paragraphs"]
    mode = rng.choice(["explain", "quote", "continue", "continue", "source"])
    if mode == "explain":
        question = rng.choice(
            [
                f"What does the Python documentation say about {topic['title']}?",
                f"Explain {topic['title']} in Python.",
                f"Give me a short explanation of {topic['title']} from the Python reference.",
            ]
        )
        first = rng.randrange(min(3, len(paragraphs)))  # one of the opening paragraphs
        return question, _truncate_sentences([s for p in paragraphs[first:] for s in p], MAX_ANSWER_CHARS // 2)
    flat = [s for p in paragraphs for s in p]
    if mode == "quote":
        question = rng.choice(
            [
                f"Quote a sentence from the Python documentation about {topic['title']}.",
                f"Give me one line of the Python reference on {topic['title']}.",
            ]
        )
        return question, f'Here is one: "{rng.choice(flat)}" It comes from the section "{topic["title"]}".'

    i = rng.randrange(len(flat))
    if mode == "source" or i == len(flat) - 1:
        question = f'Which part of the Python documentation does this sentence come from? "{flat[i]}"'
        answer = f'It comes from the section "{topic["title"]}". ' + _truncate_sentences(
            flat[i : i + 3], MAX_ANSWER_CHARS // 2
        )
        return question, answer
    question = rng.choice(
        [
            f'Continue this passage from the Python documentation: "{flat[i]}"',
            f'What comes after this sentence in the Python reference? "{flat[i]}"',
        ]
    )
    return question, _truncate_sentences(flat[i + 1 : i + 6])


_READABLE_CACHE: dict[int, list[tuple[str, str]]] = {}


def _readable(image_size: int) -> list[tuple[str, str]]:
    if image_size not in _READABLE_CACHE:
        _READABLE_CACHE[image_size] = readable_sentences(image_size)
    return _READABLE_CACHE[image_size]


# ----------------------------------------------------------------------------- examples and datasets


def make_example(
    seed: int, index: int, image_size: int = IMAGE_SIZE, task: str | None = None
) -> tuple[dict, Image.Image | None]:
    """Example `index` of the dataset with `seed`, as (LLaVA record, image or None for text-only tasks).

    The same `(seed, index, image_size, task)` always gives the same record and pixels. `task` forces one
    family of `TASK_WEIGHTS` (used for evaluation sets); by default it is drawn by weight.
    """
    rng = random.Random(f"specvlm-mini:{seed}:{index}")
    if task is None:
        task = rng.choices(list(TASK_WEIGHTS), weights=list(TASK_WEIGHTS.values()))[0]
    elif task not in TASK_WEIGHTS:
        raise ValueError(f"Unknown task {task!r}; choose one of {list(TASK_WEIGHTS)}.")
    record: dict = {"id": f"{seed}-{index}", "task": task}
    image = None
    if task == "text":
        question, answer = text_task(rng)
    elif task == "read":
        question, answer, image = read_task(rng, image_size)
    else:
        qa = None
        while qa is None:  # a scene may not allow the question (e.g. no uniquely named pair): draw another
            scene = random_scene(rng, min_shapes=2 if task == "position" else 1)
            if task == "scene":
                qa = (
                    rng.choice(
                        [
                            "Describe this image.",
                            "What do you see in this picture?",
                            "Describe the shapes in the image in detail.",
                            "Give a detailed description of the image.",
                        ]
                    ),
                    describe_scene(scene, rng),
                    None,
                )
            elif task == "count":
                qa = count_question(scene, rng)
            elif task == "colour":
                qa = colour_question(scene, rng)
            else:
                qa = position_question(scene, rng)
        question, answer, target = qa
        if target is not None:
            record["target"] = target
        image = draw_scene(scene, rng, image_size)
    if image is not None:
        record["image"] = f"{record['id']}.png"
        question = "<image>\n" + question
    record["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return record, image


# ----------------------------------------------------------------------------- clips (video)
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
DIRECTION_WORDS = {"right": "to the right", "left": "to the left", "down": "downwards", "up": "upwards"}
CLIP_FRAMES = 8


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, radius: float, fill) -> None:
    """One shape centred at (cx, cy) (scenes and clips draw with it)."""
    if kind == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif kind == "square":
        side = radius * 0.85
        draw.rectangle([cx - side, cy - side, cx + side, cy + side], fill=fill)
    elif kind == "triangle":
        draw.polygon(
            [(cx, cy - radius), (cx + radius, cy + radius * 0.8), (cx - radius, cy + radius * 0.8)], fill=fill
        )
    else:  # diamond
        draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=fill)


def make_clip_example(
    seed: int, index: int, frames: int = CLIP_FRAMES, image_size: int = 64
) -> tuple[dict, list[Image.Image]]:
    """Clip `index` of the motion set with `seed`: `frames` RGB frames in which one shape moves in a straight line
    (right, left, up or down) across the frame while another, of a different colour, stays still; with a question
    about the motion and its answer (`record["target"]` the direction). A pure function of its arguments.

    Returns `(record, frames)`; the record is LLaVA-style with a `"<video>"` placeholder and `"task": "motion"`.
    """
    rng = random.Random(f"specvlm-mini-clip:{seed}:{index}")
    direction = rng.choice(list(DIRECTIONS))
    mover_colour, still_colour = rng.sample(list(COLOURS), 2)
    mover_kind, still_kind = rng.choice(SHAPES), rng.choice(SHAPES)
    background = rng.choice(list(BACKGROUNDS))
    radius = image_size * 0.09
    dx, dy = DIRECTIONS[direction]
    lane = rng.uniform(0.25, 0.75) * image_size  # the coordinate across the motion
    start, end = 0.15 * image_size, 0.85 * image_size
    still = (rng.choice([0.2, 0.8]) * image_size, rng.choice([0.2, 0.8]) * image_size)
    images = []
    for frame in range(frames):
        along = start + (end - start) * frame / max(frames - 1, 1)
        along = along if dx + dy > 0 else image_size - along
        centre = (along, lane) if dx else (lane, along)
        image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])
        draw = ImageDraw.Draw(image)
        draw_shape(draw, still_kind, *still, radius, COLOURS[still_colour])
        draw_shape(draw, mover_kind, *centre, radius, COLOURS[mover_colour])
        images.append(image)
    mover, other = f"{mover_colour} {mover_kind}", f"{still_colour} {still_kind}"
    question, answer = rng.choice(
        [
            (f"Which way does the {mover} move?", f"The {mover} moves {DIRECTION_WORDS[direction]}."),
            (
                "Describe the motion in this video.",
                f"{capitalise(with_article(mover))} moves {DIRECTION_WORDS[direction]} across the frame, while "
                f"{with_article(other)} stays still.",
            ),
            ("Which shape moves, and which way?", f"The {mover} moves {DIRECTION_WORDS[direction]}."),
            (
                f"Does the {other} move?",
                f"No, the {other} stays still; the {mover} moves {DIRECTION_WORDS[direction]}.",
            ),
        ]
    )
    record = {
        "id": f"clip-{seed}-{index}",
        "task": "motion",
        "target": direction,
        "video": f"clip-{seed}-{index}",
        "conversations": [{"from": "human", "value": "<video>\n" + question}, {"from": "gpt", "value": answer}],
    }
    return record, images


def _write_one(job: tuple[int, int, int, str, str | None]) -> dict:
    seed, index, image_size, image_dir, task = job
    record, image = make_example(seed, index, image_size, task)
    if image is not None:
        image.save(Path(image_dir) / record["image"])
    return record


def write_dataset(
    out_dir: str | Path,
    num_examples: int,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
    task: str | None = None,
    workers: int = 1,
) -> Path:
    """Write examples `0..num_examples-1` of `seed` to `out_dir/data.json` and `out_dir/images/*.png`.

    Returns the path of the JSON file. The output is identical for any number of `workers`.
    """
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, i, image_size, str(image_dir), task) for i in range(num_examples)]
    if workers > 1:
        with Pool(workers) as pool:
            records = pool.map(_write_one, jobs, chunksize=256)
    else:
        records = [_write_one(job) for job in jobs]
    path = out_dir / "data.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the mini VLM's synthetic dataset in LLaVA's format.")
    parser.add_argument("--out", type=Path, required=True, help="Output folder (data.json and images/).")
    parser.add_argument("--num-examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    parser.add_argument("--task", choices=list(TASK_WEIGHTS), default=None, help="Only this task family.")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    path = write_dataset(args.out, args.num_examples, args.seed, args.image_size, args.task, args.workers)
    print(f"wrote {args.num_examples} examples to {path}")


if __name__ == "__main__":
    main()
