"""Lossless decoding on the modern VLM families (fp32, CPU): Qwen2-VL, Qwen2.5-VL, Qwen3-VL (M-RoPE positions with
`rope_deltas` after images) and PaliGemma (positions counted from 1), token for token against plain `generate` in
tree, static and chain mode; untested families refused in tree mode with a message that names them."""

from __future__ import annotations

import pytest
import torch

import specvlm_hf
from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.adapters import UnsupportedTargetError, adapter_for
from family_checks import MODES, assert_greedy_matches_plain, assert_logits_match_plain, make_draft
from tiny_families import FAMILIES, family_inputs

# transformers 5.17's own `generate` fails on PaliGemma 2 with a static cache (its forward gets the per-layer-type
# mask dict where it expects a tensor), so there is no plain static run to compare with
CASES = [(family, mode) for family in FAMILIES for mode in MODES if (family, mode) != ("paligemma2", "static")]


@pytest.mark.parametrize("family,mode", CASES)
def test_greedy_matches_plain_generate(family, mode):
    target = specvlm_hf.enable(FAMILIES[family](seed=0))
    generator = torch.Generator().manual_seed(len(family) + 7 * list(MODES).index(mode))
    cases = [("oracle", 1), ("noisy", 2), ("fresh", 1), ("oracle", 0), ("noisy", 1)]
    assert_greedy_matches_plain(target, family_inputs, cases, mode, generator, base_tokens=18, step=3)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "paligemma", "qwen3_vl", "gemma3", "paligemma2"])
def test_logits_match_plain_generate(family):
    """Not only the argmax: every returned logit equals plain decoding's (the position offset is exact)."""
    target = specvlm_hf.enable(FAMILIES[family](seed=2))
    inputs = family_inputs(target, torch.Generator().manual_seed(5), images=1)
    assert_logits_match_plain(target, inputs)


def test_paligemma2_refuses_the_static_cache_path_with_the_fix():
    """PaliGemma 2 has no fast path because transformers' own static-cache `generate` fails on it: a static-cache
    request (and `warmup`) raises our error naming the fix, not transformers' AttributeError from inside the prefill.
    Should a transformers release mend its own static `generate` on PaliGemma 2, the first assertion fails: then
    verify the fast path on it and drop the refusal."""
    target = specvlm_hf.enable(FAMILIES["paligemma2"](seed=0))
    inputs = family_inputs(target, torch.Generator().manual_seed(3), images=1)
    kwargs = dict(do_sample=False, max_new_tokens=4, cache_implementation="static")
    with pytest.raises(AttributeError):
        target.generate(**inputs, **kwargs)  # transformers' own, no draft
    draft = make_draft(target, "oracle", "static")
    with pytest.raises(UnsupportedTargetError, match="no static-cache fast path.*Drop `cache_implementation="):
        target.generate(**inputs, **kwargs, assistant_model=draft)
    with pytest.raises(UnsupportedTargetError, match="PaliGemma 2"):
        specvlm_hf.warmup(target, draft, max_length=64, progress=False)
    dynamic = {key: value for key, value in kwargs.items() if key != "cache_implementation"}
    assert target.generate(**inputs, **dynamic, assistant_model=draft).tolist() == (
        target.generate(**inputs, **dynamic).tolist()
    )
    adapter_for(FAMILIES["paligemma"](seed=0)).check_static_cache()  # PaliGemma 1 keeps its fast path


def test_position_offset_is_a_device_buffer_reused_across_images():
    """The fast path keeps the M-RoPE offset in its state, so one set of buffers serves images of other sizes."""
    target = specvlm_hf.enable(FAMILIES["qwen2_vl"](seed=3))
    draft = make_draft(target, "oracle", "static")
    generator = torch.Generator().manual_seed(11)
    rounds, offsets = set(), set()
    for images in (1, 2, 1, 0):
        inputs = family_inputs(target, generator, images=images)
        kwargs = dict(do_sample=False, max_new_tokens=16, min_new_tokens=16, cache_implementation="static")
        assert (
            target.generate(**inputs, **kwargs, assistant_model=draft).tolist()
            == target.generate(**inputs, **kwargs).tolist()
        )
        rounds.add(id(draft._specvlm_static_round))
        offsets.add(int(draft._specvlm_static_round.state.position_offset))
    assert len(rounds) == 1 and len(offsets) >= 2


def tiny_unverified():
    """A VLM family without a verified adapter: VipLLaVA (its adapter is not written)."""
    from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration

    from tiny_models import text_config, vision_config

    torch.manual_seed(0)
    config = VipLlavaConfig(
        vision_config=vision_config(), text_config=text_config(), image_token_index=95, vision_feature_layers=[-1]
    )
    return VipLlavaForConditionalGeneration(config).eval()


def test_unverified_family_is_refused_in_tree_mode_with_what_to_do():
    target = specvlm_hf.enable(tiny_unverified())
    draft = SpecVLMDraftModel.from_target(target)
    ids = torch.randint(3, 90, (1, 9))
    with pytest.raises(UnsupportedTargetError) as error:
        target.generate(input_ids=ids, max_new_tokens=4, do_sample=False, assistant_model=draft)
    message = str(error.value)
    assert "VipLlavaForConditionalGeneration" in message and "decoding_mode = 'chain'" in message
    assert adapter_for(target, tree=False).tree_verified is False


def test_unverified_family_runs_exact_in_chain_mode():
    target = specvlm_hf.enable(tiny_unverified())
    draft = SpecVLMDraftModel.from_target(target, decoding_mode="chain")
    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=16, do_sample=False)
    reference = target.generate(input_ids=ids, **kwargs)
    assert target.generate(input_ids=ids, **kwargs, assistant_model=draft).tolist() == reference.tolist()


def test_sliding_window_target_gets_a_full_attention_draft():
    """The draft of a hybrid (sliding-window) target is full attention in every layer, with no window."""
    target = specvlm_hf.enable(FAMILIES["gemma3"]())
    draft = SpecVLMDraftModel.from_target(target, decoding_mode="chain")
    assert set(draft.config.text_config.layer_types) == {"full_attention"}
    assert draft.config.text_config.sliding_window is None
    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=16, do_sample=False)
    reference = target.generate(input_ids=ids, **kwargs)
    assert target.generate(input_ids=ids, **kwargs, assistant_model=draft).tolist() == reference.tolist()


def test_qwen_image_count_comes_from_the_grid():
    target = specvlm_hf.enable(FAMILIES["qwen2_5_vl"](seed=0))
    draft = make_draft(target, "fresh", "tree")
    inputs = family_inputs(target, torch.Generator().manual_seed(0), images=2)
    inputs["image_grid_thw"] = inputs["image_grid_thw"][:1]
    with pytest.raises(ValueError, match="2 image placeholder run"):
        target.generate(**inputs, max_new_tokens=4, assistant_model=draft)
