"""Saving and loading drafts: safetensors without the target's weights, Auto classes, remote code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

import specvlm_hf
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from tiny_models import oracle_draft, random_inputs, tiny_llava

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def test_draft_config_records_target_and_tree_defaults():
    target = tiny_llava()
    draft = SpecVLMDraftModel.from_target(target)
    config = draft.config
    assert (config.tree_top_k, config.tree_depth, config.tree_total_tokens) == (10, 7, 60)
    assert config.target["model_type"] == "llava"
    assert config.target["vocab_size"] == target.config.text_config.vocab_size
    assert config.target["num_hidden_layers"] == 2
    assert config.text_config.num_hidden_layers == 1, "one decoder layer by default"
    assert config.text_config.num_key_value_heads == target.config.text_config.num_key_value_heads


def test_save_and_load_round_trip(tmp_path):
    target = specvlm_hf.enable(tiny_llava(scale=32.0))
    draft = oracle_draft(target, noise=0.001)
    del draft.model.norm  # the oracle's extra final norm is not part of the draft design
    draft.model.norm = torch.nn.Identity()
    draft.save_pretrained(tmp_path)

    weights = load_file(tmp_path / "model.safetensors")
    assert not any("embed" in name or "lm_head" in name for name in weights), "target weights are not stored"
    assert "fc.weight" in weights and "input_norm" not in " ".join(weights)  # oracle has input_norm=False
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_specvlm_draft.SpecVLMDraftConfig",
        "AutoModel": "modeling_specvlm_draft.SpecVLMDraftModel",
    }
    # the model's remote code carries what loading the draft needs, and no decoding loop
    remote = {path.name for path in tmp_path.glob("*.py")}
    assert remote == {
        "modeling_specvlm_draft.py",
        "configuration_specvlm_draft.py",
        "compressor.py",
        "errors.py",
        "hf_internals.py",
        "kernels.py",
        "packaging.py",
        "stats.py",
        "target.py",
    }, remote
    for name in ("generate.py", "decoding.py", "round.py", "tree.py", "verify.py", "adapters.py", "draft_location.py"):
        assert (tmp_path / "custom_generate" / name).exists(), name

    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, SpecVLMDraftModel) and not loaded.is_bound
    for name, tensor in draft.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    inputs = random_inputs(target, torch.Generator().manual_seed(0))
    first = target.generate(**inputs, max_new_tokens=16, do_sample=False, assistant_model=draft)
    second = target.generate(**inputs, max_new_tokens=16, do_sample=False, assistant_model=loaded)
    assert first.tolist() == second.tolist()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), SpecVLMDraftConfig)


def test_remote_code_loads_and_generates_in_a_fresh_process_without_the_package(tmp_path):
    target = tiny_llava(scale=32.0)
    target.save_pretrained(tmp_path / "target")
    draft = SpecVLMDraftModel.from_target(target, compressor={"mode": "select"})  # the compressor travels too
    draft.save_pretrained(tmp_path / "draft")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["specvlm_hf"] = None  # the package is not importable in this process
        sys.path.insert(0, {TESTS_DIR!r})
        import torch
        from transformers import AutoModel, LlavaForConditionalGeneration
        from tiny_models import random_inputs
        try:
            import specvlm_hf
        except ImportError:
            pass
        else:
            raise SystemExit("specvlm_hf should not be importable here")
        try:
            AutoModel.from_pretrained({str(tmp_path / "draft")!r})
        except ValueError as error:
            assert "trust_remote_code" in str(error)
        else:
            raise SystemExit("loading remote code without trust_remote_code should fail")
        draft = AutoModel.from_pretrained({str(tmp_path / "draft")!r}, trust_remote_code=True)
        assert type(draft).__module__.startswith("transformers_modules"), type(draft).__module__
        assert draft.compressor is not None and draft.config.compressor["mode"] == "select"
        target = LlavaForConditionalGeneration.from_pretrained({str(tmp_path / "target")!r}).eval()
        inputs = random_inputs(target, torch.Generator().manual_seed(0))
        plain = target.generate(**inputs, max_new_tokens=12, do_sample=False)
        remote = target.generate(**inputs, max_new_tokens=12, do_sample=False,
                                 custom_generate={str(tmp_path / "draft")!r}, trust_remote_code=True)
        assert plain.tolist() == remote.tolist()
        print("REMOTE-OK", type(draft).__name__)
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "REMOTE-OK SpecVLMDraftModel" in result.stdout


def test_enable_is_idempotent_and_keeps_the_class_name(tmp_path):
    target = tiny_llava()
    original = type(target)
    assert specvlm_hf.enable(target) is target
    enabled = type(target)
    assert specvlm_hf.enable(target) is target and type(target) is enabled
    assert enabled.__name__ == original.__name__ and isinstance(target, original)
    target.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [original.__name__]
    specvlm_hf.disable(target)
    assert type(target) is original
