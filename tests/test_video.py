"""Video and many-visual prompts (fp32, CPU): Qwen2-VL, Qwen2.5-VL, Qwen3-VL (M-RoPE time positions, Qwen3-VL's
per-frame timestamps), LLaVA-OneVision and LLaVA-NeXT-Video, token for token against plain `generate` in tree,
static and chain mode, with plain and compressing drafts; the compressor's time layouts and branches; the draft's
KV cache holding the compressed count."""

from __future__ import annotations

import pytest
import torch

import specvlm_hf
from specvlm_hf.adapters import adapter_for
from specvlm_hf.compressor import GridSegment, VisualLayout, build_branch, frame_groups, visual_units
from specvlm_hf.draft_runner import DraftRunner
from specvlm_hf.hf_internals import layer_tensors
from family_checks import MODES, assert_logits_match_plain, make_draft
from tiny_models import oracle_draft
from tiny_video import VIDEO_FAMILIES, video_inputs

TEMPORAL = {"mode": "select", "branches": ["tpool@2", "frames@2", "frame_norm@2", "pool@4", "text"]}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", list(VIDEO_FAMILIES))
def test_video_greedy_matches_plain_generate(family, mode):
    """A video alone, an image then a video, each with an oracle, a noisy and a fresh compressing draft."""
    target = specvlm_hf.enable(VIDEO_FAMILIES[family](seed=0))
    generator = torch.Generator().manual_seed(len(family) + 7 * list(MODES).index(mode))
    tpool = {"mode": "fixed", "fixed": "tpool@2"}
    cases = [("oracle", False, None), ("noisy", True, TEMPORAL), ("fresh", True, tpool)]
    accepted = []
    for case, (kind, image, compressor) in enumerate(cases):
        inputs = video_inputs(target, generator, frames=2 + case, image=image, text_tokens=3 + case)
        kwargs = {"do_sample": False, "max_new_tokens": 14 + 2 * case, "min_new_tokens": 14, **MODES[mode]}
        draft = make_draft(target, kind, mode, **({"compressor": compressor} if compressor else {}))
        reference = target.generate(**inputs, **kwargs)
        speculative = target.generate(**inputs, **kwargs, assistant_model=draft)
        assert speculative.tolist() == reference.tolist(), (family, mode, case)
        accepted.append(max(draft.stats.accepted_per_round, default=0))
    assert max(accepted) >= 3, "the oracle draft should have accepted several tokens in one round"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_next_video"])
def test_video_logits_match_plain_generate(family):
    target = specvlm_hf.enable(VIDEO_FAMILIES[family](seed=2))
    inputs = video_inputs(target, torch.Generator().manual_seed(5), frames=3, image=True)
    assert_logits_match_plain(target, inputs)


def _layouts(family: str, image: bool, frames: int = 3):
    target = VIDEO_FAMILIES[family](seed=0)
    inputs = video_inputs(target, torch.Generator().manual_seed(1), frames=frames, image=image)
    adapter = adapter_for(target)
    ids = inputs["input_ids"][0]
    visual = adapter.visual_mask(ids, inputs)
    pairs = torch.cat([visual[1:], visual.new_zeros(1)])
    return adapter.visual_layouts(pairs, {**inputs, "input_ids": ids}), inputs


def test_qwen_video_is_laid_out_as_its_time_grid():
    (image, video), inputs = _layouts("qwen2_5_vl", image=True)
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert not image.temporal and len(image.segments) == 1
    assert video.temporal and len(video.segments) == t
    assert all((s.rows, s.cols, s.start) == (h // 2, w // 2, f * h * w // 4) for f, s in enumerate(video.segments))


def test_qwen3_video_frames_are_runs_after_their_timestamps():
    layouts, inputs = _layouts("qwen3_vl", image=True)
    t, h, w = inputs["video_grid_thw"][0].tolist()
    image, frames = layouts[0], layouts[1:]
    assert len(frames) == t and all(layout.num_tokens == h * w // 4 for layout in frames)
    assert image.clip is None and {layout.clip for layout in frames} == {0}, "one video's frames share a clip"
    assert visual_units(layouts) == [[0], list(range(1, t + 1))]


def _qwen3_clip_prompt(frames: int = 4, per_frame: int = 2, text: int = 2):
    """A Qwen3-VL-like prompt of `frames` frame spans of `per_frame` tokens, each after `text` timestamp tokens,
    then 3 text tokens: fused rows labelled with their index; the frame layouts of one clip."""
    visual = torch.zeros(frames * (text + per_frame) + 3, dtype=torch.bool)
    for frame in range(frames):
        start = frame * (text + per_frame) + text
        visual[start : start + per_frame] = True
    layouts = [VisualLayout([GridSegment(0, 1, per_frame)], temporal=True, clip=0) for _ in range(frames)]
    n = visual.shape[0]
    fused = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 64)
    return fused, torch.arange(n), torch.ones(n, dtype=torch.bool), visual, layouts


@pytest.mark.parametrize("spec", ["frames@2", "tpool@2", "frame_norm@2", "pool@2", "prune@2", "text"])
def test_qwen3_time_branches_pool_across_timestamps_with_frames_in_their_own_place(spec):
    """Qwen3-VL puts each frame after its timestamp text: the compressor sees the video's frames as one clip and
    each compressed frame keeps positions inside its own frame's span (`frames@2`: frames 0 and 2 stay; `tpool@2`:
    a pooled pair sits in its second frame's place); text keeps every position; outputs that mix frames
    (`prune@2`) take the video's last visual positions."""
    target = VIDEO_FAMILIES["qwen3_vl"](seed=0)
    draft = make_draft(target, "fresh", "tree", compressor={"mode": "fixed", "fixed": spec}).eval()
    fused, positions, real, visual, layouts = _qwen3_clip_prompt()
    out, out_positions, _, info = draft.compress_prompt(fused, positions, real, visual, layouts, None)
    frame_positions = [[2, 3], [6, 7], [10, 11], [14, 15]]
    text_positions = [p for p in range(fused.shape[0]) if not visual[p]]
    kept = [int(p) for p, value in zip(out_positions, out[:, 0]) if visual[p]]
    assert [int(p) for p in out_positions if not visual[p]] == text_positions
    assert out_positions.tolist() == sorted(out_positions.tolist()), "the draft's sequence stays in order"
    values = {int(p): float(v) for p, v in zip(out_positions, out[:, 0])}
    expected = {
        "frames@2": {2: 2.0, 3: 3.0, 10: 10.0, 11: 11.0},  # frames 0 and 2, in their own places
        "tpool@2": {6: 4.0, 7: 5.0, 14: 12.0, 15: 13.0},  # mean of frames (0, 1) at frame 1, (2, 3) at frame 3
        "frame_norm@2": {3: 3.0, 7: 7.0, 11: 11.0, 15: 15.0},  # each frame's larger-norm token, in place
        "pool@2": {3: 2.5, 7: 6.5, 11: 10.5, 15: 14.5},  # each frame pooled in its own span
        "text": {},
    }
    if spec in expected:
        assert {p: values[p] for p in kept} == expected[spec]
    else:  # prune's draw mixes frames: the video's last visual positions
        assert kept == [p for frame in frame_positions for p in frame][-len(kept) :] and len(kept) == 4
    assert info["draft_visual_tokens"] == len(kept) and info["target_visual_tokens"] == 8


@pytest.mark.parametrize("mode", list(MODES))
def test_qwen3_video_pooled_over_time_matches_plain_generate(mode):
    """`tpool@2` and `frames@2` halve a Qwen3-VL video's frames in the draft (across the timestamp text), and the
    output is still plain `generate`'s."""
    target = specvlm_hf.enable(VIDEO_FAMILIES["qwen3_vl"](seed=0))
    generator = torch.Generator().manual_seed(31)
    for spec in ("tpool@2", "frames@2"):
        inputs = video_inputs(target, generator, frames=4, image=True, text_tokens=4)
        t, h, w = inputs["video_grid_thw"][0].tolist()
        draft = make_draft(target, "noisy", mode, compressor={"mode": "fixed", "fixed": spec})
        kwargs = {"do_sample": False, "max_new_tokens": 14, "min_new_tokens": 14, **MODES[mode]}
        reference = target.generate(**inputs, **kwargs)
        assert target.generate(**inputs, **kwargs, assistant_model=draft).tolist() == reference.tolist(), spec
        stats = draft.stats
        assert stats.target_visual_tokens - stats.draft_visual_tokens == (t // 2) * h * w // 4, spec


@pytest.mark.parametrize("family,trailing", [("llava_onevision", 1), ("llava_next_video", 0)])
def test_llava_video_is_frames_then_its_newline(family, trailing):
    (image, video), _ = _layouts(family, image=True, frames=3)
    assert not image.temporal
    frames = [s for s in video.segments if s.rows > 1]
    assert len(frames) == 3 and video.num_tokens == sum(s.length for s in frames) + trailing
    assert [len(group) for group in frame_groups(video)] == [3] + [1] * bool(trailing)


def _labelled(layout: VisualLayout, width: int = 4) -> torch.Tensor:
    """Tokens whose every entry is 100 * segment index + 1: pooling within a segment keeps the label."""
    tokens = torch.empty(layout.num_tokens, width)
    for index, segment in enumerate(layout.segments):
        tokens[segment.start : segment.start + segment.length] = 100 * index + 1
    return tokens


def test_time_branches_pool_frames_of_one_video_only():
    video = VisualLayout.frames(5, 2, 3)
    tiles = VisualLayout([*VisualLayout.frames(2, 2, 2).segments])  # two tiles of one image: not frames
    tokens = torch.randn(video.num_tokens, 8)
    frames = tokens.view(5, 6, 8)
    torch.testing.assert_close(build_branch("frames@2", 8, 2)(tokens, video), frames[::2].reshape(-1, 8))
    pooled = build_branch("tpool@2", 8, 2)(tokens, video)
    expected = torch.cat([frames[0:2].mean(0), frames[2:4].mean(0), frames[4]])
    torch.testing.assert_close(pooled, expected)
    for spec in ("frames@2", "tpool@2"):
        branch = build_branch(spec, 8, 2)
        assert branch(tokens, video).shape[0] == branch.num_tokens(video)
        assert torch.equal(branch(_labelled(tiles), tiles), _labelled(tiles))  # an image's tiles pass unchanged
    saliency = build_branch("frame_norm@3", 4, 2)
    labelled = _labelled(video)
    kept = saliency(labelled, video)
    assert kept.shape[0] == saliency.num_tokens(video) == 5 * 2
    assert kept[:, 0].tolist() == [1.0, 1.0, 101.0, 101.0, 201.0, 201.0, 301.0, 301.0, 401.0, 401.0]


def test_draft_kv_holds_the_compressed_video_and_the_text(monkeypatch):
    """The draft's prefill writes exactly (text pairs + compressed visual tokens) KV entries."""
    lengths = []
    prefill = DraftRunner.prefill

    def spy(self, prompt):
        out = prefill(self, prompt)
        lengths.append((self.window.cache.get_seq_length(), out[2]))
        return out

    monkeypatch.setattr(DraftRunner, "prefill", spy)
    target = specvlm_hf.enable(VIDEO_FAMILIES["qwen2_vl"](seed=0))
    inputs = video_inputs(target, torch.Generator().manual_seed(3), frames=4, image=True)
    n = inputs["input_ids"].shape[1]
    visual = int(adapter_for(target).visual_mask(inputs["input_ids"][0], inputs).sum())
    for spec in ("tpool@2", "frames@4", "text"):
        draft = make_draft(target, "fresh", "tree", compressor={"mode": "fixed", "fixed": spec})
        target.generate(**inputs, max_new_tokens=3, do_sample=False, assistant_model=draft)
        cached, info = lengths[-1]
        assert info["target_visual_tokens"] == visual and info["draft_visual_tokens"] < visual
        assert cached == n - visual + info["draft_visual_tokens"], spec


VIDEO_SAMPLES = 500


def _sample_video_first_tokens():
    """(plain, speculative) samples of the first 3 new tokens after a video whose time index outruns its height and
    width (Qwen2.5-VL, peaked distributions), tree mode with an oracle draft."""
    from test_lossless_sampling import SETTINGS

    target = specvlm_hf.enable(VIDEO_FAMILIES["qwen2_5_vl"](seed=0, scale=24.0))
    inputs = video_inputs(target, torch.Generator().manual_seed(4), frames=4, image=False, text_tokens=4)
    inputs["second_per_grid_ts"] = torch.tensor([1.0])  # one per video: the batch of copies needs its own
    draft = oracle_draft(target)
    draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = 4, 3, 20
    start = inputs["input_ids"].shape[1]
    kwargs = dict(do_sample=True, max_new_tokens=3, min_new_tokens=3, **SETTINGS["temperature"])
    batch = {
        key: value.repeat(VIDEO_SAMPLES, *([1] * (value.dim() - 1)))
        if key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
        else value.expand(VIDEO_SAMPLES, *value.shape[1:])
        for key, value in inputs.items()
    }
    torch.manual_seed(0)
    plain = target.generate(**batch, **kwargs)[:, start:]
    speculative, sigmas = [], []
    for _ in range(VIDEO_SAMPLES):
        speculative.append(tuple(target.generate(**inputs, **kwargs, assistant_model=draft)[0, start:].tolist()))
        sigmas.append(draft.stats.sigma)
    return [tuple(row) for row in plain.tolist()], speculative, sum(sigmas) / len(sigmas)


def test_video_sampling_matches_plain_sampling():
    from test_lossless_sampling import P_THRESHOLD, chi_square_p_value

    plain, speculative, sigma = _sample_video_first_tokens()
    assert sigma > 1.2, "the draft must get tokens accepted for the test to mean anything"
    assert chi_square_p_value(plain, speculative) > P_THRESHOLD


def test_the_video_sampling_test_catches_a_broken_acceptance_rule(monkeypatch):
    from test_lossless_sampling import P_THRESHOLD, break_acceptance_rule, chi_square_p_value

    break_acceptance_rule(monkeypatch)
    plain, speculative, _ = _sample_video_first_tokens()
    assert chi_square_p_value(plain, speculative) < P_THRESHOLD


def _llava_many_images(target, generator, images: int) -> dict:
    """LLaVA-1.5 / LLaVA-NeXT prompt: `images` images, each after some text (several images in one turn)."""
    from tiny_models import IMAGE_SIZE, image_token_count

    config = target.config
    pieces, inputs, pixels, sizes = [torch.tensor([1])], {}, [], []
    for _ in range(images):
        pieces.append(
            torch.randint(3, 90, (int(torch.randint(1, 4, (1,), generator=generator)),), generator=generator)
        )
        if config.model_type == "llava_next":
            size = [IMAGE_SIZE, 2 * IMAGE_SIZE] if bool(torch.randint(0, 2, (1,), generator=generator)) else [64, 32]
            pixel_values = torch.randn(1, 3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
            count = image_token_count(target, pixel_values, torch.tensor([size]))
            sizes.append(size)
        else:
            pixel_values = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
            count = image_token_count(target, pixel_values)
        pixels.append(pixel_values)
        pieces.append(torch.full((count,), config.image_token_index))
    pieces.append(torch.randint(3, 90, (4,), generator=generator))
    ids = torch.cat(pieces)[None]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.cat(pixels)}
    if sizes:
        inputs["image_sizes"] = torch.tensor(sizes)
    return inputs


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", ["llava", "llava_next"])
def test_many_images_in_one_turn_match_plain_generate(name, mode):
    """LLaVA-1.5 and LLaVA-NeXT with 2 and 3 images interleaved with text, plain and compressing drafts (the other
    families' many-image prompts are in test_families*.py)."""
    from tiny_models import tiny_llava, tiny_llava_next

    target = specvlm_hf.enable((tiny_llava if name == "llava" else tiny_llava_next)(seed=0, scale=8.0))
    generator = torch.Generator().manual_seed(list(MODES).index(mode))
    for case, (kind, images, compressor) in enumerate(
        [("oracle", 2, None), ("noisy", 3, {"mode": "fixed", "fixed": "pool@4"}), ("fresh", 2, TEMPORAL)]
    ):
        inputs = _llava_many_images(target, generator, images)
        kwargs = {"do_sample": False, "max_new_tokens": 12, "min_new_tokens": 12, **MODES[mode]}
        draft = make_draft(target, kind, mode, **({"compressor": compressor} if compressor else {}))
        reference = target.generate(**inputs, **kwargs)
        assert target.generate(**inputs, **kwargs, assistant_model=draft).tolist() == reference.tolist(), case
        if compressor and compressor["mode"] == "fixed":  # pool@4 on every image
            assert draft.stats.draft_visual_tokens < draft.stats.target_visual_tokens


# ---------------------------------------------------------------------------------------------------------------
# the fast path's draft cache follows the compressed count (static caches, the shapes CUDA graphs capture)
SMALL_TREE = dict(tree_top_k=4, tree_depth=3, tree_total_tokens=12)  # a round's room: 17 slots


def _static_draft(target, spec: str, kind: str = "noisy"):
    compressor = {"mode": "none"} if spec == "none" else {"mode": "fixed", "fixed": spec}
    draft = make_draft(target, kind, "static", compressor=compressor)
    for key, value in SMALL_TREE.items():
        setattr(draft.config, key, value)
    return draft


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in layer_tensors(layer) if t is not None)


def test_fast_path_draft_cache_is_sized_by_the_compressed_video(monkeypatch):
    """On the fast path the draft's static cache holds its compressed prompt, the new tokens and a round's room
    (bucketed), not the target's visual count: its KV bytes and every draft step's attention width shrink with the
    branch, the target's cache stays whole, and the output is still plain `generate`'s."""
    from specvlm_hf import round as round_module

    monkeypatch.setattr(round_module, "LENGTH_BUCKET", 8)
    target = specvlm_hf.enable(VIDEO_FAMILIES["qwen2_5_vl"](seed=0))
    inputs = video_inputs(target, torch.Generator().manual_seed(11), frames=16, text_tokens=4)
    n = inputs["input_ids"].shape[1]
    visual = int(adapter_for(target).visual_mask(inputs["input_ids"][0], inputs).sum())
    assert visual >= 64
    new = 12
    kwargs = {"do_sample": False, "max_new_tokens": new, "min_new_tokens": new, "cache_implementation": "static"}
    reference = target.generate(**{k: v for k, v in inputs.items()}, **{**kwargs, "cache_implementation": None})
    draft_bytes = {}
    for spec in ("none", "tpool@4", "frames@4", "text"):
        draft = _static_draft(target, spec)
        widths = []
        decode = draft.decode

        def spy(fused, attention_mask=None, **rest):
            widths.append(attention_mask.shape[-1])
            return decode(fused, attention_mask=attention_mask, **rest)

        draft.decode = spy
        out = target.generate(**inputs, **kwargs, assistant_model=draft)
        assert out.tolist() == reference.tolist(), spec
        round, stats = draft._specvlm_static_round, draft.stats
        assert stats.target_visual_tokens == visual and stats.rounds > 0
        held = n - visual + stats.draft_visual_tokens  # the draft prefill's entries
        room = round_module.tree_room(draft.config)
        assert round.draft_length == round_module.bucketed(held + new + room), spec
        assert round.length == round_module.bucketed(n + new + room)  # the target's: every visual token
        assert set(widths) == {round.draft_length}, "every draft step attends over the draft cache's width"
        cache = round.runner.window.cache
        per_slot = _cache_bytes(cache) // round.draft_length
        text = draft.config.text_config
        head_dim = text.hidden_size // text.num_attention_heads
        assert per_slot == text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * 4  # keys + values, fp32
        draft_bytes[spec] = _cache_bytes(cache)
    assert draft_bytes["text"] < draft_bytes["frames@4"] == draft_bytes["tpool@4"] < draft_bytes["none"]
    assert draft_bytes["tpool@4"] <= draft_bytes["none"] * (n - visual + visual // 4 + new + 17 + 8) // (n + new + 17)


def test_fast_path_rounds_of_other_draft_widths_share_the_target_cache(monkeypatch):
    """Two prompts of one length, one a compressed video and one text only, need two draft cache widths: the fast
    path keeps one round per width over one target cache (each with its own graphs on a GPU), and reuses both."""
    from specvlm_hf import round as round_module

    monkeypatch.setattr(round_module, "LENGTH_BUCKET", 8)
    target = specvlm_hf.enable(VIDEO_FAMILIES["qwen2_5_vl"](seed=0))
    video = video_inputs(target, torch.Generator().manual_seed(12), frames=16, text_tokens=4)
    words = torch.randint(3, 60, video["input_ids"].shape, generator=torch.Generator().manual_seed(1))
    text = {"input_ids": words, "attention_mask": torch.ones_like(words)}
    draft = _static_draft(target, "tpool@4", kind="oracle")
    kwargs = {"do_sample": False, "max_new_tokens": 10, "min_new_tokens": 10}
    seen = []
    for inputs in (video, text, video, text):
        out = target.generate(**inputs, **kwargs, assistant_model=draft, cache_implementation="static")
        assert out.tolist() == target.generate(**inputs, **kwargs).tolist()
        seen.append((draft._specvlm_fast_path, draft._specvlm_static_round))
    fast = seen[0][0]
    assert all(path is fast for path, _ in seen) and len(fast.rounds) == 2
    video_round, text_round = seen[0][1], seen[1][1]
    assert video_round.draft_length < text_round.draft_length == text_round.length
    assert video_round.target_window is text_round.target_window is fast.target_window
    assert seen[2][1] is video_round and seen[3][1] is text_round


def test_batched_fast_path_draft_caches_follow_the_longest_compressed_row(monkeypatch):
    """Batched fast path: every row's draft cache is as wide as the longest row's compressed prompt needs (its real
    tokens: left padding is not kept in the draft's cache)."""
    from specvlm_hf import round as round_module
    from tiny_models import random_inputs, tiny_llava

    monkeypatch.setattr(round_module, "LENGTH_BUCKET", 4)
    target = specvlm_hf.enable(tiny_llava(seed=0, scale=16.0))
    generator = torch.Generator().manual_seed(3)
    rows = [random_inputs(target, generator, text_tokens=3 + 4 * i, image=i != 1) for i in range(3)]
    width = max(row["input_ids"].shape[1] for row in rows)
    batch = {"input_ids": [], "attention_mask": []}
    for row in rows:
        pad = width - row["input_ids"].shape[1]
        batch["input_ids"].append(torch.cat([row["input_ids"].new_zeros(1, pad), row["input_ids"]], dim=1))
        batch["attention_mask"].append(torch.cat([torch.zeros(1, pad, dtype=torch.long), row["attention_mask"]], 1))
    batch = {key: torch.cat(value) for key, value in batch.items()}
    batch["pixel_values"] = torch.cat([row["pixel_values"] for row in rows if "pixel_values" in row])
    draft = _static_draft(target, "pool@4", kind="oracle")
    kwargs = {"do_sample": False, "max_new_tokens": 10, "min_new_tokens": 10}
    out = target.generate(**batch, **kwargs, assistant_model=draft, cache_implementation="static")
    assert out.tolist() == target.generate(**batch, **kwargs).tolist()
    round = draft._specvlm_static_rows_round
    per_image = target.config.vision_config.image_size // target.config.vision_config.patch_size
    saved = per_image**2 - (per_image // 2) ** 2  # pool@4 on one image: a row with an image holds this many fewer
    room = 10 + round_module.tree_room(draft.config)
    assert round.length == round_module.bucketed(width + room)
    assert round.draft_length == round_module.bucketed(width - saved + room) < round.length
    assert all(runner.window.width == round.draft_length for runner in round.runners)
