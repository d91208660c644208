"""The command line's answers to what users get wrong: one line naming the problem and the fix, the exit status,
and, where the problem used to be found late (or never), how soon it is found. `--debug` / SPECVLM_DEBUG show
the traceback. Plus `specvlm generate`'s sampling flags, its decoding-mode rule and what it says about exactness."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from specvlm_hf.cli import main
from specvlm_hf.commands.common import default_decoding_mode, exactness_note
from specvlm_hf.mini import EXAMPLE_IMAGE


def run(capsys, *argv):
    """`specvlm ARGV` in this process: (exit status, stdout, stderr)."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def error_line(err: str) -> str:
    """The command's error: exactly one line on stderr."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def run_process(*argv, env=None, timeout=120):
    """`specvlm ARGV` in a fresh process: (exit status, stdout, stderr, seconds)."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "specvlm_hf.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return result.returncode, result.stdout, result.stderr, time.perf_counter() - start


@pytest.fixture(scope="module")
def tiny_vlm_folder(tmp_path_factory):
    """A tiny random LLaVA saved with save_pretrained (weights and config only)."""
    from tiny_models import tiny_llava

    folder = tmp_path_factory.mktemp("tiny-vlm")
    tiny_llava().save_pretrained(folder)
    return folder


# ---- a text-only model is refused before anything is loaded (it used to build a 7B LLaVA and get OOM-killed)


def test_generate_refuses_a_text_only_model_folder_in_seconds_naming_its_class(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    status, out, err, seconds = run_process("generate", "--model", tmp_path / "llama")
    assert status == 2
    line = error_line(err)
    assert "LlamaForCausalLM (model_type 'llama'), not a vision-language model" in line
    assert "pass a LLaVA-style image-text-to-text model folder" in line
    assert seconds < 30, f"refused after {seconds:.0f} s"


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--target"],
        ["bench", "--target"],
        ["demo", "--draft", "x/y", "--target"],
        ["distill-data", "--data", "d.json", "--target"],
    ],
)
def test_every_command_refuses_a_text_only_model_before_loading_it(capsys, tmp_path, argv):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    capsys.readouterr()  # the saving's progress bar
    status, _, err = run(
        capsys, *argv, tmp_path / "llama", *(["--output-dir", tmp_path / "out"] if argv[0] == "train" else [])
    )
    assert status == 2
    assert "holds LlamaForCausalLM (model_type 'llama'), not a vision-language model" in error_line(err)


# ---- arguments


@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_max_new_tokens_below_one_is_refused_in_one_line(capsys, value):
    status, _, err = run(capsys, "generate", "--max-new-tokens", value)
    assert status == 2
    line = error_line(err)
    assert line.startswith("specvlm generate: error: argument --max-new-tokens: must be a whole number of at least 1")
    assert "see `specvlm generate --help`" in line


def test_an_unknown_option_is_one_line_not_the_usage_block(capsys):
    status, _, err = run(capsys, "generate", "--temprature", "0.5")
    assert status == 2
    assert "unrecognized arguments: --temprature" in error_line(err)


# ---- images


def test_a_folder_given_as_image_is_refused(capsys, tmp_path):
    status, _, err = run(capsys, "generate", "--image", tmp_path)
    assert status == 2
    assert (
        error_line(err)
        == f"specvlm generate: error: --image {tmp_path} is a folder; pass one image file (PNG or JPEG)."
    )


def test_a_truncated_image_is_refused_naming_the_file(capsys, tmp_path):
    data = EXAMPLE_IMAGE.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    status, _, err = run(capsys, "generate", "--image", tmp_path / "cut.png")
    assert status == 2
    line = error_line(err)
    assert f"{tmp_path / 'cut.png'} cannot be decoded" in line and "truncated or corrupted" in line


def test_a_file_that_is_no_image_is_refused(capsys, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    status, _, err = run(capsys, "generate", "--image", tmp_path / "notes.png")
    assert status == 2
    assert "is not an image PIL can read; pass a PNG or JPEG file with --image" in error_line(err)


# ---- model files


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_safetensors_file_is_named(capsys, tmp_path, tiny_vlm_folder, damage):
    folder = shutil.copytree(tiny_vlm_folder, tmp_path / "model")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    status, _, err = run(capsys, "generate", "--model", folder)
    assert status == 2
    line = error_line(err)
    assert f"{weights} is {'empty' if damage == 'empty' else 'corrupted or truncated'}" in line
    assert "download or save the model again" in line


def test_malformed_json_is_named_with_line_and_column(capsys, tmp_path, tiny_vlm_folder):
    folder = shutil.copytree(tiny_vlm_folder, tmp_path / "model")
    (folder / "config.json").write_text('{\n  "model_type": "llava",\n  "text_config": {,\n}\n')
    status, _, err = run(capsys, "generate", "--model", folder)
    assert status == 2
    assert f"{folder / 'config.json'} line 3 column 19: invalid JSON (Expecting property name" in error_line(err)


def test_a_broken_draft_folder_is_named_before_the_model_loads(capsys, tmp_path):
    (tmp_path / "draft").mkdir()
    (tmp_path / "draft" / "config.json").write_text("")
    status, _, err = run(capsys, "generate", "--draft", tmp_path / "draft")
    assert status == 2
    assert f"{tmp_path / 'draft' / 'config.json'} is empty, not JSON" in error_line(err)


# ---- requests longer than the model's positions are refused before any decoding


@pytest.mark.parametrize("draft", ["none", "default"])
def test_a_prompt_plus_new_tokens_past_the_models_positions_is_refused_before_decoding(capsys, monkeypatch, draft):
    from specvlm_hf.commands import generate

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoding started")

    monkeypatch.setattr(generate, "run_generate", no_decoding)
    status, _, err = run(
        capsys, "generate", "--no-image", "--prompt", "word " * 600, "--max-new-tokens", 600, "--draft", draft
    )
    assert status == 2
    line = error_line(err)
    assert "more than the model's 1024 positions; pass --max-new-tokens" in line


# ---- --debug


def test_debug_flag_and_environment_variable_show_the_traceback(capsys, monkeypatch, tmp_path):
    status, _, err = run(capsys, "generate", "--image", tmp_path, "--debug")
    assert status == 2 and "Traceback (most recent call last)" in err and err.rstrip().endswith("(PNG or JPEG).")
    monkeypatch.setenv("SPECVLM_DEBUG", "1")
    status, _, err = run(capsys, "generate", "--image", tmp_path)
    assert status == 2 and "Traceback (most recent call last)" in err


# ---- sampling flags, the decoding-mode rule, exactness


def test_generate_samples_with_seed_temperature_and_top_p(capsys):
    argv = ["generate", "--do-sample", "--temperature", "0.8", "--top-p", "0.9", "--max-new-tokens", "12"]
    status, first, _ = run(capsys, *argv, "--seed", "3")
    assert status == 0
    assert "sampled at temperature 0.8, top-p 0.9, seed 3: the output follows plain sampling's distribution" in first
    status, again, _ = run(capsys, *argv, "--seed", "3")
    assert first.split("\n[")[0] == again.split("\n[")[0], "the same seed samples the same text"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--temperature", "0"], "argument --temperature: must be a number above 0"),
        (["--top-p", "1.5"], "argument --top-p: must be a number in (0, 1]"),
    ],
)
def test_bad_sampling_settings_are_refused(capsys, argv, message):
    status, _, err = run(capsys, "generate", "--do-sample", *argv)
    assert status == 2 and message in error_line(err)


def test_one_rule_picks_chain_on_the_cpu_and_tree_on_a_gpu(capsys):
    assert default_decoding_mode("cpu") == "chain"
    assert default_decoding_mode("cuda") == default_decoding_mode("cuda:1") == "tree"
    status, out, _ = run(capsys, "generate", "--max-new-tokens", "8", "--device", "cpu")
    assert status == 0 and "draft (chain) on cpu" in out
    assert "output identical to plain greedy decoding (float32: exact, token for token)" in out


def test_generate_with_an_fp8_draft_head_stays_exact_and_says_so(capsys):
    argv = ["generate", "--max-new-tokens", "12", "--device", "cpu", "--mode", "tree", "--fp8-head"]
    status, out, _ = run(capsys, *argv)
    assert status == 0 and "draft (tree, fp8 head) on cpu" in out
    assert "output identical to plain greedy decoding (float32: exact, token for token)" in out
    status, _, err = run(capsys, "generate", "--draft", "none", "--fp8-head")
    assert status == 2 and "--fp8-head changes the draft's head, and --draft none runs no draft" in error_line(err)


def test_a_different_output_is_explained_by_the_precision():
    assert "this is a bug; please report it" in exactness_note("float32", identical=False)
    note = exactness_note("bfloat16", identical=False)
    assert "near-tie" in note and "a batch of 1 token and a tree of many tokens" in note and "float32 is exact" in note
    assert "near-ties may differ" in exactness_note("float16", identical=True)


def test_cuda_without_cuda_is_refused(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    status, _, err = run(capsys, "generate", "--device", "cuda")
    assert status == 2
    assert (
        error_line(err)
        == "specvlm generate: error: --device cuda was asked for but CUDA is not available; use --device cpu."
    )
