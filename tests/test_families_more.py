"""Lossless decoding on more VLM families (fp32, CPU): LLaVA-OneVision, InternVL, Idefics3, SmolVLM and Mistral 3
(Pixtral), token for token against plain `generate` in tree, static and chain mode, with prompts laid out as each
processor lays them out; their image counting (one image over several placeholder runs: crops, rows) and their
visual layouts for the draft's compressor."""

from __future__ import annotations

import pytest
import torch

import specvlm_hf
from specvlm_hf.adapters import adapter_for
from specvlm_hf.compressor import image_spans
from family_checks import MODES, assert_greedy_matches_plain, assert_logits_match_plain, make_draft
from tiny_families_more import (
    FAMILIES_MORE,
    IMAGE,
    family_inputs_more,
    idefics_image_tokens,
    pixtral_image_tokens,
    tiny_llava_onevision,
)
from tiny_models import oracle_draft

CASES = [("oracle", 1), ("noisy", 2), ("fresh", 1), ("oracle", 0), ("noisy", 1), ("oracle", 2)]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", list(FAMILIES_MORE))
def test_greedy_matches_plain_generate(family, mode):
    target = specvlm_hf.enable(FAMILIES_MORE[family](seed=0))
    assert adapter_for(target).tree_verified
    generator = torch.Generator().manual_seed(len(family) + 7 * list(MODES).index(mode))
    assert_greedy_matches_plain(target, family_inputs_more, CASES, mode, generator, base_tokens=16, step=2)


@pytest.mark.parametrize("mode", ["tree", "static"])
@pytest.mark.parametrize("family", list(FAMILIES_MORE))
def test_logits_match_plain_generate(family, mode):
    """Not only the argmax: every returned logit equals plain decoding's (positions and masks are exact; a
    position off by one changes them by ~7e-3 and may leave the greedy tokens alone)."""
    target = specvlm_hf.enable(FAMILIES_MORE[family](seed=2))
    inputs = family_inputs_more(target, torch.Generator().manual_seed(5), images=2)
    assert_logits_match_plain(target, inputs, atol=1e-5, **MODES[mode])


# ------------------------------------------------------------------------------------------ visual layouts
@pytest.mark.parametrize("family", list(FAMILIES_MORE))
def test_visual_layouts_cover_each_run_and_a_compressing_draft_stays_exact(family):
    target = specvlm_hf.enable(FAMILIES_MORE[family](seed=1))
    adapter = adapter_for(target)
    generator = torch.Generator().manual_seed(3)
    for images in (1, 2):
        inputs = family_inputs_more(target, generator, images=images)
        for is_image in (inputs["input_ids"][0] == IMAGE, adapter.visual_mask(inputs["input_ids"][0], inputs)):
            layouts = adapter.visual_layouts(is_image, inputs)
            assert [layout.num_tokens for layout in layouts] == [end - start for start, end in image_spans(is_image)]
        # the hook's runs get each model's own geometry, never the 1-D fallback
        assert all(s.rows > 1 or s.newline or s.cols == 1 for layout in layouts for s in layout.segments)
        draft = make_draft(target, "oracle", "tree", compressor={"mode": "fixed", "fixed": "pool@4"})
        kwargs = dict(do_sample=False, max_new_tokens=14, min_new_tokens=14)
        reference = target.generate(**inputs, **kwargs)
        assert target.generate(**inputs, **kwargs, assistant_model=draft).tolist() == reference.tolist()
        assert draft.stats.draft_visual_tokens < draft.stats.target_visual_tokens


def test_onevision_layout_is_base_grid_then_tiles_with_newlines_shrunk_past_anyres_max():
    target = tiny_llava_onevision(aspect="anyres_max_2")
    adapter = adapter_for(target)
    side = 4
    for size, batch_num_images in (([64, 64], [1]), ([90, 30], [1]), ([30, 90], [1]), ([40, 50], [2])):
        sizes = torch.tensor([size] * batch_num_images[0])
        kwargs = {"image_sizes": sizes, "batch_num_images": torch.tensor(batch_num_images)}
        layouts = adapter.image_layouts(kwargs)
        base = layouts[0].segments[0]
        assert (base.start, base.rows, base.cols, base.newline) == (0, side, side, False)
        patches = 1 if batch_num_images[0] > 1 else 1 + 4 * 4  # enough padded tiles for any pinpoint
        pixel_values = torch.randn(len(sizes), patches, 3, 32, 32)
        with torch.no_grad():
            features = target.model.get_image_features(pixel_values=pixel_values, **kwargs).pooler_output
        assert [layout.num_tokens for layout in layouts] == [int(f.shape[0]) for f in features]
        tiles = layouts[0].segments[1]
        if batch_num_images[0] == 1:
            assert tiles.newline and tiles.start == side * side
            if size == [64, 64]:  # 2 x 2 tiles = 8 x 8 patches > 2 tiles x 1.1^2: shrunk to 5 x 5
                assert (tiles.rows, tiles.cols) == (5, 5)
        else:
            assert (tiles.rows, tiles.cols, tiles.newline) == (1, 1, False)  # the one newline token


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_idefics3_image_spans_several_runs_and_is_not_refused(family):
    target = specvlm_hf.enable(FAMILIES_MORE[family](seed=0))
    adapter = adapter_for(target)
    tokens = idefics_image_tokens(2, 3, 16)
    ids = torch.cat([torch.tensor([1, 5]), tokens, torch.tensor([7])])[None]
    inputs = {"input_ids": ids, "pixel_values": torch.randn(1, 7, 3, 32, 32)}
    assert len(image_spans(ids[0] == IMAGE)) == 7
    adapter.check_images(ids, inputs)  # one image, 6 crops + the global image: accepted
    assert adapter.num_images(inputs) == 7
    # padding crops (all zero, from a batch with more crops) are not counted
    padded = {"input_ids": ids, "pixel_values": torch.cat([inputs["pixel_values"], torch.zeros(1, 2, 3, 32, 32)], 1)}
    adapter.check_images(ids, padded)
    with pytest.raises(ValueError, match="7 image placeholder run"):
        adapter.check_images(ids, {"pixel_values": inputs["pixel_values"][:, :5]})


def test_mistral3_rows_are_runs_of_one_image_counted_from_image_sizes():
    target = specvlm_hf.enable(FAMILIES_MORE["mistral3"](seed=0))
    adapter = adapter_for(target)
    ids = torch.cat([torch.tensor([1, 5]), pixtral_image_tokens(3, 2), torch.tensor([9]), pixtral_image_tokens(1, 4)])
    ids = ids[None]
    inputs = {"pixel_values": torch.randn(2, 3, 24, 32), "image_sizes": torch.tensor([[24, 16], [8, 32]])}
    adapter.check_images(ids, inputs)
    assert adapter.num_images(inputs) == 2 and len(image_spans(ids[0] == IMAGE)) == 4
    layouts = adapter.visual_layouts(ids[0] == IMAGE, inputs)
    assert [(s.rows, s.cols) for layout in layouts for s in layout.segments] == [(1, 2)] * 3 + [(1, 4)]
    no_sizes = adapter.visual_layouts(ids[0] == IMAGE, {})  # e.g. transformers 5.23+: rows stay rows
    assert [(s.rows, s.cols) for layout in no_sizes for s in layout.segments] == [(1, 2)] * 3 + [(1, 4)]
    whole = adapter.visual_mask(ids[0], inputs)  # each image one run: its tokens and its rows' ends
    assert image_spans(whole) == [(2, 11), (12, 17)]
    layouts = adapter.visual_layouts(whole, inputs)
    assert [(s.start, s.rows, s.cols, s.newline) for layout in layouts for s in layout.segments] == [
        (0, 3, 2, True),
        (0, 1, 4, True),
    ]
    adjacent = torch.cat([ids[0, :11], ids[0, 12:]])  # no text between the images: one run, two grids
    (layout,) = adapter.visual_layouts(adapter.visual_mask(adjacent, inputs), inputs)
    assert [(s.start, s.rows, s.cols) for s in layout.segments] == [(0, 3, 2), (9, 1, 4)]
    with pytest.raises(ValueError, match="2 image\\(s\\) were given"):  # one image's rows short
        adapter.check_images(ids[:, :-3], inputs)
    with pytest.raises(ValueError, match="1 image\\(s\\) were given"):
        adapter.check_images(
            ids, {"pixel_values": inputs["pixel_values"][:1], "image_sizes": inputs["image_sizes"][:1]}
        )


def test_internvl_tiles_of_one_image_are_one_run_and_counted_in_tiles():
    target = specvlm_hf.enable(FAMILIES_MORE["internvl"](seed=0))
    adapter = adapter_for(target)
    ids = torch.cat([torch.tensor([1, 122]), torch.full((5 * 16,), IMAGE), torch.tensor([123, 7])])[None]
    inputs = {"pixel_values": torch.randn(5, 3, 32, 32)}
    adapter.check_images(ids, inputs)  # 4 tiles + thumbnail in one run
    (layout,) = adapter.visual_layouts(ids[0] == IMAGE, inputs)
    assert [(s.start, s.rows, s.cols) for s in layout.segments] == [(16 * i, 4, 4) for i in range(5)]
    with pytest.raises(ValueError, match="4 tile\\(s\\) of 16 tokens"):
        adapter.check_images(ids, {"pixel_values": inputs["pixel_values"][:4]})


def test_onevision_counts_images_from_image_sizes():
    target = specvlm_hf.enable(tiny_llava_onevision())
    draft = make_draft(target, "fresh", "tree")
    inputs = family_inputs_more(target, torch.Generator().manual_seed(0), images=2)
    inputs["image_sizes"] = inputs["image_sizes"][:1]
    inputs["batch_num_images"] = torch.tensor([1])
    with pytest.raises(ValueError, match="1 image\\(s\\) were given"):
        target.generate(**inputs, max_new_tokens=4, assistant_model=draft)


def test_mistral3_whole_image_grids_through_the_visual_mask_hook(monkeypatch):
    """The loop reads `adapter.visual_mask` and the call's image sizes (which transformers 5.23+ drops before the
    loop): each image is compressed as its 2-D grid, and decoding stays exact."""
    import specvlm_hf.decoding as decoding
    from specvlm_hf import draft_runner

    original = draft_runner.prompt_pairs
    seen = []

    def spy(*args):
        pairs = original(*args)
        seen.append(pairs.layouts)
        return pairs

    monkeypatch.setattr(decoding, "prompt_pairs", spy)
    target = specvlm_hf.enable(FAMILIES_MORE["mistral3"](seed=1))
    inputs = family_inputs_more(target, torch.Generator().manual_seed(4), images=2)
    draft = make_draft(target, "noisy", "tree", compressor={"mode": "fixed", "fixed": "pool@4"})
    kwargs = dict(do_sample=False, max_new_tokens=14, min_new_tokens=14)
    assert (
        target.generate(**inputs, **kwargs, assistant_model=draft).tolist()
        == target.generate(**inputs, **kwargs).tolist()
    )
    grids = [(s.rows, s.cols) for layout in seen[0] for s in layout.segments]
    sizes = (inputs["image_sizes"] // 8).tolist()
    assert grids == [tuple(size) for size in sizes] and all(s.newline for layout in seen[0] for s in layout.segments)
    image_tokens = sum(rows * cols for rows, cols in sizes)
    assert draft.stats.draft_visual_tokens < image_tokens


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_idefics3_reused_image_hidden_states_are_counted_in_crops(family):
    target = specvlm_hf.enable(FAMILIES_MORE[family](seed=0))
    inputs = family_inputs_more(target, torch.Generator().manual_seed(6), images=2)
    pixel_values = inputs.pop("pixel_values")
    with torch.no_grad():
        inputs["image_hidden_states"] = target.model.get_image_features(pixel_values).pooler_output
    kwargs = dict(do_sample=False, max_new_tokens=12, min_new_tokens=12)
    try:
        reference = target.generate(**inputs, **kwargs)
    except ValueError as error:  # transformers 5.23+ takes encoded images as `mm_encoder_outputs` only
        assert "image_hidden_states" in str(error)
        with pytest.raises(ValueError, match="image_hidden_states"):  # the same answer, not ours
            target.generate(**inputs, **kwargs, assistant_model=oracle_draft(target))
        return
    assert target.generate(**inputs, **kwargs, assistant_model=oracle_draft(target)).tolist() == reference.tolist()
    inputs["image_hidden_states"] = inputs["image_hidden_states"][1:]
    with pytest.raises(ValueError, match="encoded crop"):
        target.generate(**inputs, **kwargs, assistant_model=oracle_draft(target))
