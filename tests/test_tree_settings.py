"""Tree settings are bounded by the draft config's own validation, which every `generate` call runs: a top-k above
the vocabulary or a tree of more than 2**20 candidates per round is refused at once (it used to take minutes and
gigabytes, or hang), a merely slow one warns."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

import specvlm_hf
from specvlm_hf.configuration_specvlm_draft import MAX_TREE_CANDIDATES
from tiny_models import oracle_draft, random_inputs, tiny_llava


@pytest.fixture(scope="module")
def mini():
    from PIL import Image

    from specvlm_hf.commands.generate import build_inputs
    from specvlm_hf.mini import EXAMPLE_IMAGE, load
    from specvlm_hf.mini.drafts import load_draft

    target, processor = load()
    specvlm_hf.enable(target)
    inputs = build_inputs(processor, Image.open(EXAMPLE_IMAGE).convert("RGB"), "Describe this image.")
    return target, load_draft(target), inputs


@pytest.mark.parametrize(
    "top_k, message",
    [
        (
            4096,
            r"tree_top_k=4096 and tree_depth=7 score tree_top_k\^2 x tree_depth = "
            r"117,440,512 candidate tokens per round, "
            r"more than the 1,048,576 allowed; lower tree_top_k \(EAGLE-2 uses 10\) or tree_depth",
        ),
        (5000, r"tree_top_k=5000 is more than the vocabulary \(4096 tokens\); use at most 4096"),
    ],
)
def test_a_huge_tree_on_the_mini_vlm_is_refused_at_once(mini, top_k, message):
    target, draft, inputs = mini
    draft.config.tree_top_k = top_k
    try:
        start = time.perf_counter()
        with pytest.raises(ValueError, match=message):
            target.generate(**inputs, assistant_model=draft, max_new_tokens=20, do_sample=False)
        assert time.perf_counter() - start < 5
    finally:
        draft.config.tree_top_k = 10


def test_a_slow_tree_warns_and_still_decodes_losslessly():
    target = specvlm_hf.enable(tiny_llava(scale=32.0))
    draft = oracle_draft(target)
    draft.config.tree_top_k, draft.config.tree_depth = 96, 8  # 73,728 candidates per round
    inputs = random_inputs(target, torch.Generator().manual_seed(0))
    plain = target.generate(**inputs, max_new_tokens=8, do_sample=False)
    with pytest.warns(UserWarning, match="73,728 candidate tokens per round: drafting will cost more than it saves"):
        out = target.generate(**inputs, assistant_model=draft, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, plain)


def test_the_default_tree_is_well_inside_the_bounds():
    from specvlm_hf import SpecVLMDraftConfig

    config = SpecVLMDraftConfig()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config.validate_decoding_settings()
    assert config.tree_top_k**2 * config.tree_depth < MAX_TREE_CANDIDATES
