"""The mini VLM's data generator: deterministic, LLaVA-formatted, and answers that follow the image."""

import json
import random

import numpy as np
import pytest

from specvlm_hf.mini.data import (
    COLOURS,
    TASK_WEIGHTS,
    Scene,
    Shape,
    count_question,
    make_example,
    write_dataset,
)
from specvlm_hf.mini.evaluate import parse_short_answer


def test_same_seed_and_index_give_identical_record_and_pixels():
    for index in range(30):
        record_a, image_a = make_example(3, index)
        record_b, image_b = make_example(3, index)
        assert record_a == record_b
        if image_a is None:
            assert image_b is None
        else:
            assert np.array_equal(np.asarray(image_a), np.asarray(image_b))


def test_different_seeds_give_different_examples():
    def answers(seed):
        return [make_example(seed, i)[0]["conversations"][1]["value"] for i in range(20)]

    assert answers(0) != answers(1)


def test_every_task_family_is_generated():
    tasks = {make_example(0, i)[0]["task"] for i in range(300)}
    assert tasks == set(TASK_WEIGHTS)


def test_written_dataset_is_valid_llava_json_with_images(tmp_path):
    path = write_dataset(tmp_path, num_examples=40, seed=5)
    records = json.loads(path.read_text())
    assert len(records) == 40 and len({r["id"] for r in records}) == 40
    for record in records:
        human, gpt = record["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt" and gpt["value"].strip()
        if record["task"] == "text":
            assert "image" not in record and "<image>" not in human["value"]
        else:
            assert human["value"].startswith("<image>\n")
            assert (tmp_path / "images" / record["image"]).stat().st_size > 0


def test_written_dataset_does_not_depend_on_worker_count(tmp_path):
    one = write_dataset(tmp_path / "one", num_examples=24, seed=2, workers=1)
    two = write_dataset(tmp_path / "two", num_examples=24, seed=2, workers=2)
    assert one.read_text() == two.read_text()
    for image in (tmp_path / "one" / "images").iterdir():
        assert image.read_bytes() == (tmp_path / "two" / "images" / image.name).read_bytes()


def test_count_answer_states_the_number_of_matching_shapes_drawn():
    scene = Scene(
        (
            Shape("circle", "red", "large", 0, 0),
            Shape("circle", "blue", "small", 1, 1),
            Shape("square", "red", "small", 2, 2),
        ),
        "white",
    )
    for seed in range(30):
        question, answer, target = count_question(scene, random.Random(seed))
        if "circles" in question or "red" in question:
            expected = "2"
        elif any(k in question for k in ("squares", "triangles", "diamonds")):
            expected = "1" if "squares" in question else "0"
        elif any(c in question for c in COLOURS):
            expected = "1" if "blue" in question else "0"
        else:
            expected = "3"
        assert target == expected and parse_short_answer("count", answer) == expected, (question, answer)


def test_scene_pixels_show_the_described_colours():
    record, image = make_example(11, 0, task="colour")
    pixels = {tuple(p) for p in np.asarray(image).reshape(-1, 3)}
    assert COLOURS[record["target"]] in pixels


@pytest.mark.parametrize("task", ["count", "colour", "position"])
def test_question_records_carry_their_short_answer(task):
    for index in range(10):
        record, image = make_example(4, index, task=task)
        assert record["task"] == task and record["target"] and image is not None


def test_motion_clips_show_the_motion_their_answers_state():
    """The moving shape's pixels travel the way the answer says (centroid of its colour, over half the frame), and
    a clip is a pure function of (seed, index)."""
    import numpy as np

    from specvlm_hf.mini.data import COLOURS, DIRECTION_WORDS, DIRECTIONS, make_clip_example

    directions = set()
    for index in range(8):
        record, frames = make_clip_example(3, index)
        again, frames_again = make_clip_example(3, index)
        assert record == again and all(a.tobytes() == b.tobytes() for a, b in zip(frames, frames_again))
        direction = record["target"]
        directions.add(direction)
        question, answer = (turn["value"] for turn in record["conversations"])
        assert question.startswith("<video>\n") and DIRECTION_WORDS[direction] in answer
        mover = answer.split(" moves")[0].split()[-2]  # the mover's colour: "... red circle moves ..."
        pixels = [np.asarray(frame).astype(int) for frame in frames]
        centroids = []
        for image in pixels:
            ys, xs = np.nonzero((np.abs(image - np.array(COLOURS[mover])).sum(-1) < 10))
            centroids.append((xs.mean(), ys.mean()))
        dx, dy = DIRECTIONS[direction]
        moved = np.array(centroids[-1]) - np.array(centroids[0])
        assert moved @ np.array([dx, dy]) > 0.5 * frames[0].width, (record, moved)
    assert len(directions) >= 3
