"""The elastic visual compressor: branch shapes and costs, the gate, and lossless decoding with every mode."""

from __future__ import annotations

import math

import pytest
import torch

import specvlm_hf
from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.compressor import (
    GridSegment,
    VisualCompressor,
    VisualLayout,
    build_branch,
    image_layout,
    image_spans,
    pooled_count,
)
from tiny_models import IMAGE_SIZE, oracle_draft, random_inputs, tiny_llava, tiny_llava_next

HIDDEN = 32
LLAVA15 = VisualLayout.grid(576)  # 24 x 24
ANYRES = VisualLayout([GridSegment(0, 24, 24), GridSegment(576, 36, 47, newline=True)])  # base + tiles + newlines
MINI = VisualLayout.grid(64)


@pytest.mark.parametrize(
    "layout", [LLAVA15, ANYRES, MINI, VisualLayout.sequence(50)], ids=["1.5", "anyres", "mini", "1d"]
)
@pytest.mark.parametrize(
    "spec",
    [
        "prune@2",
        "prune@4",
        "prune_norm@9",
        "pool@2",
        "pool@4",
        "pool@9",
        "pool@20",
        "pool@36",
        "conv@3",
        "conv@4",
        "resampler@2",
        "resampler@8",
        "text",
    ],
)
def test_branch_output_matches_its_reported_count(layout, spec):
    branch = build_branch(spec, HIDDEN, heads=4).eval()
    tokens = torch.randn(layout.num_tokens, HIDDEN)
    out = branch(tokens, layout)
    assert out.shape == (branch.num_tokens(layout), HIDDEN)


@pytest.mark.parametrize("layout", [LLAVA15, ANYRES, VisualLayout.sequence(50)], ids=["1.5", "anyres", "1d"])
@pytest.mark.parametrize("spec", ["prune@4", "pool@4", "conv@3", "conv@9", "resampler@2", "resampler@8", "text"])
def test_reported_cost_matches_the_counted_computation(layout, spec):
    """The FLOPs a branch reports (used for the gate's cost penalty and the bench) are those torch counts when it
    runs; only the learned branches have parameters."""
    from torch.utils.flop_counter import FlopCounterMode

    branch = build_branch(spec, HIDDEN, heads=4).eval()
    with FlopCounterMode(display=False) as counter:
        branch(torch.randn(layout.num_tokens, HIDDEN), layout)
    counted, reported = counter.get_total_flops(), branch.flops(layout, HIDDEN)
    learned = spec.split("@")[0] in ("conv", "resampler")
    assert (branch.num_parameters > 0) == learned
    if learned:
        assert 0.5 * counted <= reported <= 2 * counted, (counted, reported)
    else:  # parameter-free: at most a few operations per visual token
        assert reported <= 4 * layout.num_tokens * HIDDEN


def test_pooling_ratios_shrink_the_llava15_grid_as_advertised():
    for ratio, expected in [(2, 288), (4, 144), (9, 64), (16, 36), (20, 30), (36, 16)]:
        assert pooled_count(LLAVA15, ratio) == expected, ratio
    assert build_branch("resampler@2", HIDDEN, 4).num_tokens(LLAVA15) == 2
    assert build_branch("text", HIDDEN, 4).num_tokens(ANYRES) == 0


def test_pool_averages_each_window_and_skips_newline_tokens():
    layout = VisualLayout([GridSegment(0, 2, 2, newline=True)])  # tokens: a b NL c d NL
    tokens = torch.tensor([[1.0], [3.0], [100.0], [5.0], [7.0], [100.0]])
    assert build_branch("pool@4", 1, 1)(tokens, layout).flatten().tolist() == [4.0]


def test_saliency_pruning_keeps_the_largest_tokens_in_order():
    tokens = torch.tensor([[0.1], [5.0], [0.2], [4.0]])
    out = build_branch("prune_norm@2", 1, 1)(tokens, VisualLayout.sequence(4))
    assert out.flatten().tolist() == [5.0, 4.0]


def test_random_pruning_is_reproducible_at_inference():
    branch = build_branch("prune@4", HIDDEN, 4).eval()
    tokens = torch.randn(576, HIDDEN)
    assert torch.equal(branch(tokens, LLAVA15), branch(tokens, LLAVA15))


def test_anyres_layout_comes_from_transformers_own_geometry():
    model = tiny_llava_next()
    for size in ([IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]):
        inputs = random_inputs(model, torch.Generator().manual_seed(0))
        count = int((inputs["input_ids"] == model.config.image_token_index).sum())
        layout = image_layout(model.config, count, inputs["image_sizes"][0].tolist())
        assert layout.num_tokens == count
        assert len(layout.segments) == 2 and layout.segments[1].newline


def test_image_spans():
    mask = torch.tensor([False, True, True, False, True, False, False, True])
    assert image_spans(mask) == [(1, 3), (4, 5), (7, 8)]


def test_gumbel_straight_through_sends_gradients_to_the_gate():
    compressor = VisualCompressor({"mode": "select", "branches": ["pool@4", "prune@4", "resampler@2"]}, HIDDEN, 4)
    compressor.train()
    question = torch.randn(HIDDEN)
    tokens = torch.randn(64, HIDDEN)
    result = compressor(tokens, MINI, question)
    assert result.branch in compressor.specs
    (result.tokens.sum() + result.expected_fraction).backward()
    gate_grad = sum(p.grad.abs().sum() for p in compressor.gate.parameters())
    assert gate_grad > 0


def test_expected_fraction_penalty_prefers_cheap_branches():
    torch.manual_seed(0)
    compressor = VisualCompressor({"mode": "select", "branches": ["pool@2", "text"]}, HIDDEN, 4).train()
    optimizer = torch.optim.SGD(compressor.gate.parameters(), lr=0.5)
    question = torch.randn(HIDDEN)
    for _ in range(50):
        optimizer.zero_grad()
        compressor(torch.randn(64, HIDDEN), MINI, question).expected_fraction.backward()
        optimizer.step()
    assert compressor.eval()(torch.randn(64, HIDDEN), MINI, question).branch == "text"


def test_weighted_mode_mixes_same_sized_branches():
    compressor = VisualCompressor({"mode": "weighted", "ratio": 4}, HIDDEN, 4).eval()
    result = compressor(torch.randn(576, HIDDEN), LLAVA15, torch.randn(HIDDEN))
    assert result.tokens.shape == (144, HIDDEN) and result.gate_probs.shape == (3,)


MODES = {
    "fixed-pool": {"mode": "fixed", "fixed": "pool@4"},
    "fixed-text": {"mode": "fixed", "fixed": "text"},
    "fixed-prune": {"mode": "fixed", "fixed": "prune@2"},
    "select": {"mode": "select"},
    "weighted": {"mode": "weighted", "ratio": 4},
    "concat": {"mode": "concat", "branches": ["prune@8", "pool@8", "conv@3", "resampler@2"]},
}


def compressing_draft(target, settings, mode="tree"):
    """An oracle draft (long accepted paths) with a compressor in front of its layers."""
    draft = oracle_draft(target, compressor=settings)
    draft.config.decoding_mode = mode
    return draft


@pytest.mark.parametrize("name", list(MODES))
@pytest.mark.parametrize("kind", ["llava", "next"])
def test_greedy_output_with_every_compressor_mode_equals_plain_generate(name, kind):
    target = specvlm_hf.enable((tiny_llava if kind == "llava" else tiny_llava_next)(scale=32.0, gqa=True))
    generator = torch.Generator().manual_seed(len(name))
    for case, mode in enumerate(["tree", "chain", "tree", "tree-static"]):  # tree-static: the fast path
        draft = compressing_draft(target, MODES[name], mode.split("-")[0])
        inputs = random_inputs(target, generator, text_tokens=3 + case)
        kwargs = dict(max_new_tokens=16, min_new_tokens=16 if case != 1 else 0, do_sample=False)
        plain = target.generate(**inputs, **kwargs)
        fast = {"cache_implementation": "static"} if mode == "tree-static" else {}
        spec = target.generate(**inputs, **kwargs, assistant_model=draft, **fast)
        assert spec.tolist() == plain.tolist()
        image_tokens = int((inputs["input_ids"] == target.config.image_token_index).sum())
        assert draft.stats.target_visual_tokens == image_tokens
        assert draft.stats.visual_branch != "none"


@pytest.mark.parametrize("name,expected", [("fixed-pool", 4), ("fixed-text", 0), ("fixed-prune", 8), ("concat", None)])
def test_draft_cache_holds_the_reduced_visual_positions(name, expected):
    target = specvlm_hf.enable(tiny_llava(scale=32.0))
    draft = compressing_draft(target, MODES[name])
    inputs = random_inputs(target, torch.Generator().manual_seed(3), text_tokens=5)
    captured = {}
    from specvlm_hf import decoding, draft_runner

    original, compress = draft_runner.DraftRunner.prefill, decoding.compress_pairs

    def spy(self, prompt):
        out = original(self, prompt)
        captured["cache"] = self.window.cache.get_seq_length()
        return out

    def spy_compress(draft, prompt):  # the tree loop compresses the prompt's pairs before choosing the draft cache
        captured["prompt"] = prompt.token_embeds.shape[1]
        return compress(draft, prompt)

    draft_runner.DraftRunner.prefill, decoding.compress_pairs = spy, spy_compress
    try:
        target.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, assistant_model=draft)
    finally:
        draft_runner.DraftRunner.prefill, decoding.compress_pairs = original, compress
    visual = 16
    if expected is None:  # concat: the sum of its branches
        expected = sum(branch.num_tokens(VisualLayout.grid(visual)) for branch in draft.compressor.branches)
    assert draft.stats.draft_visual_tokens == expected
    assert captured["cache"] == captured["prompt"] - visual + expected


def test_compressing_draft_saves_and_reloads(tmp_path):
    target = tiny_llava()
    draft = SpecVLMDraftModel.from_target(target, compressor={"mode": "select"})
    draft.save_pretrained(tmp_path)
    loaded = SpecVLMDraftModel.from_pretrained(tmp_path)
    assert loaded.config.compressor["mode"] == "select"
    assert loaded.compressor.specs == draft.compressor.specs
    for name, tensor in draft.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_unknown_branch_and_mode_are_named():
    with pytest.raises(ValueError, match="unknown compressor branch 'blur@3'"):
        build_branch("blur@3", HIDDEN, 4)
    with pytest.raises(ValueError, match="compressor mode must be one of"):
        SpecVLMDraftModel.from_target(tiny_llava(), compressor={"mode": "zip"})
    assert math.isclose(pooled_count(VisualLayout.sequence(10), 3), 4)
