"""The shipped mini VLM: a stock LLaVA that loads offline, fits the size budget and sees its images."""

import pytest
import torch

from specvlm_hf.mini import EXAMPLE_IMAGE, WEIGHTS_DIR, load
from specvlm_hf.mini.data import make_example
from specvlm_hf.mini.evaluate import greedy_answers, parse_short_answer


@pytest.fixture(scope="module")
def mini():
    return load()


def test_weights_are_safetensors_shards_within_the_size_budget():
    shards = sorted(WEIGHTS_DIR.glob("*.safetensors"))
    assert shards and all(s.stat().st_size <= 15e6 for s in shards)
    assert sum(s.stat().st_size for s in shards) <= 40e6


def test_loads_offline_as_stock_llava_with_12_layer_llama(monkeypatch):
    from transformers import LlavaForConditionalGeneration

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = LlavaForConditionalGeneration.from_pretrained(WEIGHTS_DIR)
    assert model.config.text_config.model_type == "llama" and model.config.text_config.num_hidden_layers >= 12
    assert model.config.vision_config.model_type == "clip_vision_model"


def test_load_returns_float32_eval_model_and_processor(mini):
    model, processor = mini
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert type(processor).__name__ == "LlavaProcessor"


def test_answers_a_held_out_colour_question_correctly(mini):
    model, processor = mini
    record, image = make_example(77, 6, task="colour")  # held out: the model was trained on seed 0
    (reply,) = greedy_answers(model, processor, [record], [image])
    assert record["target"] == "yellow"
    assert parse_short_answer("colour", reply) == "yellow", reply


def test_answer_depends_on_the_image(mini):
    model, processor = mini
    record, image = make_example(77, 6, task="colour")
    other_record, other_image = make_example(77, 0, task="colour")
    (reply,) = greedy_answers(model, processor, [record], [other_image], max_new_tokens=12)
    (same,) = greedy_answers(model, processor, [record], [image], max_new_tokens=12)
    assert reply != same


def test_generate_command_describes_the_example_image(capsys):
    from specvlm_hf.cli import main

    assert EXAMPLE_IMAGE.exists()
    assert main(["generate", "--max-new-tokens", "24", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "shapes" in out and "tokens/s" in out


def test_generate_command_fast_path(capsys):
    """`--fast` alone runs the tree's fast path, also on the CPU (whose default mode is chain); `--mode chain` with
    it is refused before anything loads."""
    from specvlm_hf.cli import main

    assert main(["generate", "--max-new-tokens", "24", "--device", "cpu", "--fast", "--mode", "chain"]) == 2
    assert "--fast is the tree's fast path" in capsys.readouterr().err
    assert main(["generate", "--max-new-tokens", "24", "--device", "cpu", "--fast"]) == 0
    out = capsys.readouterr().out
    assert "(tree, fast path)" in out and "identical to plain" in out and "(static cache)" in out
    assert "[warm-up calls, not counted above" in out and "SpecVLM" in out.split("warm-up calls")[1]


def test_generate_command_answers_a_text_only_prompt(capsys):
    from specvlm_hf.cli import main

    assert (
        main(["generate", "--no-image", "--prompt", "Explain The for statement in Python.", "--max-new-tokens", "16"])
        == 0
    )
    assert "tokens/s" in capsys.readouterr().out


def test_generate_command_names_a_missing_image_file(capsys):
    from specvlm_hf.cli import main

    assert main(["generate", "--image", "/nonexistent/picture.png"]) == 2
    assert capsys.readouterr().err == (
        "specvlm generate: error: Image /nonexistent/picture.png does not exist; pass an existing file with --image.\n"
    )


def test_held_out_evaluation_shows_a_model_that_uses_its_images(mini):
    """The evaluation behind `results/mini_vlm.json`, rerun small on held-out seeds: the right image lowers the
    answer loss a lot, and the answers beat the majority baseline on every image task."""
    from specvlm_hf.mini.evaluate import evaluate

    model, _ = mini
    results = evaluate(model, str(WEIGHTS_DIR), eval_seed=17, num_examples=48, num_questions=24, batch_size=24)
    dependence = results["image_dependence"]
    assert dependence["loss_mismatched_image"]["all"] > 2 * dependence["loss_right_image"]["all"]
    for task in ("count", "colour", "position"):
        assert results["accuracy"][task]["accuracy"] > results["accuracy"][task]["majority_baseline"] + 0.2, task
