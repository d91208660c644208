"""Publishing drafts: the model card (metadata header, usage, measured numbers read from eval_results.json)
and the upload to a Hub-compatible server on 127.0.0.1, downloaded again with `from_pretrained(repo_id)`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.cli import main as cli_main
from specvlm_hf.hub import DraftFolderError, load_eval_results, publish_draft, render_model_card
from test_hub_server import card_metadata, hub  # noqa: F401  (the `hub` fixture)
from tiny_models import oracle_draft, tiny_llava

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

EVAL_RESULTS = {
    "sigma": 3.217,
    "speedup": 2.481,
    "device": "test device 9000",
    "dataset": "tiny prompts (8)",
    "date": "2026-01-02",
    "dtype": "float32",
    "max_new_tokens": 64,
    "temperature": 0.0,
    "modes": {
        "tree": {"sigma": 3.217, "speedup": 2.481, "tokens_per_second": 41.5, "baseline_tokens_per_second": 16.7},
        "chain": {"sigma": 2.113, "speedup": 1.374},
    },
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny target folder and a draft folder for it, with eval_results.json."""
    root = tmp_path_factory.mktemp("hub")
    target = tiny_llava(scale=32.0)
    target.save_pretrained(root / "target")
    draft = oracle_draft(target, noise=0.001)
    draft.save_pretrained(root / "draft")
    (root / "draft" / "eval_results.json").write_text(json.dumps(EVAL_RESULTS))
    return root / "target", root / "draft"


def test_card_header_has_the_hub_metadata(saved):
    _, draft = saved
    card = render_model_card(draft, "me/tiny-draft", base_model="tiny/llava", license="mit")
    metadata = card_metadata(card.encode())
    assert metadata["license"] == "mit"
    assert metadata["library_name"] == "transformers"
    assert metadata["base_model"] == "tiny/llava"
    assert metadata["pipeline_tag"] == "image-text-to-text"
    assert {"specvlm", "speculative-decoding", "custom_generate"} <= set(metadata["tags"])


def test_card_shows_usage_for_the_three_ways_with_the_repo_id(saved):
    card = render_model_card(saved[1], "me/tiny-draft", base_model="tiny/llava")
    assert 'SpecVLMDraftModel.from_pretrained("me/tiny-draft")' in card
    assert 'AutoModel.from_pretrained("me/tiny-draft", trust_remote_code=True)' in card
    assert 'custom_generate="me/tiny-draft", trust_remote_code=True' in card
    assert 'from_pretrained("tiny/llava"' in card


def test_card_numbers_are_read_from_eval_results(saved, tmp_path):
    card = render_model_card(saved[1], "me/tiny-draft", base_model="tiny/llava")
    assert "| tree (default) | 3.22 | 2.48x | 41.5 / 16.7 |" in card
    assert "| chain | 2.11 | 1.37x | n/a |" in card
    assert "test device 9000" in card and "tiny prompts (8)" in card and "2026-01-02" in card
    assert "not measured" not in card

    changed = {**EVAL_RESULTS, "device": "another device", "modes": {"tree": {"sigma": 1.5, "speedup": 0.9}}}
    draft = shutil.copytree(saved[1], tmp_path / "draft")
    (draft / "eval_results.json").write_text(json.dumps(changed))
    card = render_model_card(draft, "me/tiny-draft")
    assert "| tree (default) | 1.50 | 0.90x |" in card and "another device" in card
    assert "3.22" not in card


def test_card_says_not_measured_without_eval_results(tmp_path):
    target = tiny_llava()
    SpecVLMDraftModel.from_target(target).save_pretrained(tmp_path)
    card = render_model_card(tmp_path, "me/unmeasured")
    assert "**not measured**" in card
    assert "base_model" not in card_metadata(card.encode()), "no Hub id for a target built from a config"


@pytest.mark.parametrize(
    "broken, message",
    [
        ({"speedup": 2.0, "device": "d", "dataset": "x", "date": "2026-01-01"}, "missing required keys ['sigma']"),
        ({**EVAL_RESULTS, "sigma": "3.2"}, "sigma must be a non-negative number"),
        ({**EVAL_RESULTS, "modes": {"tree": {"sigma": 3.0}}}, "modes.tree must be an object with sigma and speedup"),
    ],
)
def test_malformed_eval_results_are_refused_naming_the_problem(tmp_path, broken, message):
    (tmp_path / "eval_results.json").write_text(json.dumps(broken))
    with pytest.raises(DraftFolderError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_eval_results(tmp_path)


def test_publishing_a_folder_that_is_not_a_saved_draft_says_how_to_save_one(tmp_path, saved):
    with pytest.raises(DraftFolderError, match="save_pretrained"):
        publish_draft(saved[0], "me/target", endpoint="http://127.0.0.1:9", token="x")  # a target, not a draft
    for name in (
        "model.safetensors",
        "modeling_specvlm_draft.py",
        "configuration_specvlm_draft.py",
        "custom_generate/generate.py",
    ):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(DraftFolderError, match="not 'specvlm_draft'"):
        publish_draft(tmp_path, "me/target", endpoint="http://127.0.0.1:9", token="x")


def test_dry_run_writes_the_card_and_uploads_nothing(saved, tmp_path, capsys):
    draft = shutil.copytree(saved[1], tmp_path / "draft")
    assert cli_main(["push", str(draft), "me/tiny-draft", "--base-model", "tiny/llava", "--dry-run"]) == 0
    assert "| tree (default) | 3.22 |" in (draft / "README.md").read_text()
    out = capsys.readouterr().out
    assert "custom_generate/generate.py" in out and "model.safetensors" in out and "README.md" in out


def test_push_uploads_to_a_local_hub_and_from_pretrained_generates_from_it(hub, saved, tmp_path):  # noqa: F811
    """`specvlm push` to a Hub-compatible server on 127.0.0.1; a fresh process points HF_ENDPOINT at it and loads
    the draft by repo id in the three ways (remote code and custom_generate without the package installed)."""
    from huggingface_hub import HfApi

    target_dir, draft_dir = saved
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo("tiny/llava")
    api.upload_folder(repo_id="tiny/llava", folder_path=str(target_dir))
    assert (
        cli_main(
            [
                "push",
                str(draft_dir),
                "me/tiny-draft",
                "--base-model",
                "tiny/llava",
                "--endpoint",
                hub.url,
                "--token",
                hub.token,
            ]
        )
        == 0
    )

    files = hub.files("me/tiny-draft")
    for name in (
        "model.safetensors",
        "config.json",
        "configuration_specvlm_draft.py",
        "modeling_specvlm_draft.py",
        "custom_generate/generate.py",
        "eval_results.json",
        "README.md",
    ):
        assert name in files, name
    assert json.loads(files["config.json"])["auto_map"]["AutoModel"] == "modeling_specvlm_draft.SpecVLMDraftModel"
    assert files["model.safetensors"] == (draft_dir / "model.safetensors").read_bytes()
    info = api.model_info("me/tiny-draft")
    assert info.card_data["base_model"] == "tiny/llava" and info.pipeline_tag == "image-text-to-text"
    assert "| tree (default) | 3.22 | 2.48x |" in files["README.md"].decode()

    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {TESTS_DIR!r})
        sys.modules["specvlm_hf"] = None  # ways 2 and 3 need no install
        import torch
        torch.set_num_threads(1)
        from transformers import AutoModel, AutoModelForImageTextToText
        from tiny_models import random_inputs

        target = AutoModelForImageTextToText.from_pretrained("tiny/llava").eval()
        inputs = random_inputs(target, torch.Generator().manual_seed(3))
        plain = target.generate(**inputs, max_new_tokens=16, do_sample=False).tolist()

        remote = AutoModel.from_pretrained("me/tiny-draft", trust_remote_code=True)
        assert type(remote).__module__.startswith("transformers_modules"), type(remote).__module__
        way2 = target.generate(**inputs, max_new_tokens=16, do_sample=False, assistant_model=remote,
                               custom_generate="me/tiny-draft", trust_remote_code=True).tolist()
        way3 = target.generate(**inputs, max_new_tokens=16, do_sample=False,
                               custom_generate="me/tiny-draft", trust_remote_code=True).tolist()

        del sys.modules["specvlm_hf"]
        import specvlm_hf
        from specvlm_hf import SpecVLMDraftModel
        draft = SpecVLMDraftModel.from_pretrained("me/tiny-draft")
        specvlm_hf.enable(target)
        way1 = target.generate(**inputs, max_new_tokens=16, do_sample=False, assistant_model=draft).tolist()
        assert way1 == way2 == way3 == plain, (plain, way1, way2, way3)
        assert draft.stats.sigma > 1.5, draft.stats.sigma
        print("HUB-OK", draft.stats.sigma)
        """
    )
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": hub.token,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "HUB-OK" in result.stdout
    assert hub.unknown_requests == [], hub.unknown_requests
