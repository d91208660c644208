"""Target adapters: everything the speculative loop needs to know about one family of target VLMs.

The loop never tests a model type itself; it asks the target's adapter:

- the text model to run over a tree and the head that turns its hidden states into logits (`logits`, with any
  final processing the VLM's own forward applies);
- the position ids of tree nodes (`node_positions`: the sequence index plus the family's offset, e.g. Qwen-VL's
  M-RoPE `rope_deltas` after an image, or PaliGemma's count from 1);
- the attention mask a verify forward takes (`verify_mask`);
- the static cache the fast path verifies on, and which caches it can rewind;
- how a prompt's images are counted (`check_images`) and laid out for the visual compressor (`visual_layouts`).

Tree and static decoding run only on families whose adapter is tested token for token against plain
`generate` (`tree_verified`); any other target is refused with `UnsupportedTargetError`, never run. Chain mode
(transformers' own assisted loop verifies) runs on any target through the generic adapter.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn
from transformers import DynamicCache, StaticCache

from .configuration_specvlm_draft import full_attention_only
from .compressor import GridSegment, VisualLayout, image_layout, image_spans
from .hf_internals import cache_argument_name, mrope_deltas
from .kv_cache import cache_layers
from .target import text_model_of, unwrap_target
from .tree import additive_mask

ISSUES_URL = "https://github.com/specvlm-hf/specvlm-hf/issues"


class UnsupportedTargetError(ValueError):
    """Tree (or static) decoding was asked of a target family that is not verified exact."""


def image_token_of(config) -> int | None:
    token = getattr(config, "image_token_id", None)
    return getattr(config, "image_token_index", None) if token is None else token


def video_token_of(config) -> int | None:
    token = getattr(config, "video_token_id", None)
    return getattr(config, "video_token_index", None) if token is None else token


def run_tokens(input_ids: torch.Tensor | None, spans: list[tuple[int, int]]) -> list[int | None]:
    """The placeholder token of each run of `spans` over a prompt's pairs (pair t reads token t + 1), from the
    prompt's ids `(n,)` (None without them): tells image runs from video runs."""
    if input_ids is None:
        return [None] * len(spans)
    return [int(input_ids[start + 1]) if start + 1 < input_ids.shape[0] else None for start, _ in spans]


ADAPTERS: dict[str, type] = {}  # model_type -> adapter class, filled by `register`

# inputs describing a call's images; from transformers 5.23 `generate` drops them from the model inputs before
# the decoding method runs, so the call's own are kept for the compressor's layouts
IMAGE_GEOMETRY_KEYS = (
    "pixel_values",
    "image_sizes",
    "image_grid_thw",
    "video_grid_thw",
    "batch_num_images",
    "vision_aspect_ratio",
    "image_hidden_states",
    "pixel_values_videos",
)
_CALL_IMAGE_INPUTS: ContextVar[dict] = ContextVar("specvlm_call_image_inputs", default={})


@contextmanager
def keeping_image_inputs(kwargs: dict):
    """While active, `call_image_inputs` sees the image inputs of `kwargs` (a `generate` call's arguments)."""
    token = _CALL_IMAGE_INPUTS.set({key: kwargs[key] for key in IMAGE_GEOMETRY_KEYS if kwargs.get(key) is not None})
    try:
        yield
    finally:
        _CALL_IMAGE_INPUTS.reset(token)


def call_image_inputs(model_kwargs: dict) -> dict:
    """`model_kwargs` completed with the image inputs of the `generate` call in progress that it lacks."""
    kept = _CALL_IMAGE_INPUTS.get()
    missing = {key: value for key, value in kept.items() if model_kwargs.get(key) is None}
    return {**model_kwargs, **missing} if missing else model_kwargs


def register(cls):
    """Class decorator: `cls` serves the targets whose `config.model_type` is in `cls.model_types`."""
    for model_type in cls.model_types:
        ADAPTERS[model_type] = cls
    return cls


def adapter_for(target: nn.Module, tree: bool = True) -> TargetAdapter:
    """The adapter of `target`'s family.

    Args:
        tree: the caller verifies trees itself (tree or static mode): refuse a family not verified exact.
    Raises:
        UnsupportedTargetError: naming the model class and what to do instead.
    """
    model = unwrap_target(target)
    cls = ADAPTERS.get(getattr(model.config, "model_type", None), TargetAdapter)
    if tree and not cls.tree_verified:
        raise UnsupportedTargetError(
            f"SpecVLM tree decoding is not verified for {type(model).__name__} (model_type "
            f"{model.config.model_type!r}): its positions, masks or caches may differ from what the tree verifier "
            f"assumes, and a wrong answer would be silent. Supported in tree mode: {', '.join(sorted(ADAPTERS))}. "
            "Use chain mode, which transformers' own loop verifies (`draft.config.decoding_mode = 'chain'`), or "
            f"open an issue at {ISSUES_URL}."
        )
    return cls(model)


class TargetAdapter:
    """The generic adapter: a decoder-only text model with 1-D positions counted from 0, full attention, one
    `lm_head`, one placeholder run per image. Families subclass it and override what differs.

    Attributes:
        model: the transformers VLM (PEFT wrappers removed); config / text_config: its configurations.
        text_model: its decoder-only text model; lm_head: its output head; dtype: the head's dtype.
        cache_kw: the keyword the text model takes its cache under.
    """

    model_types: tuple[str, ...] = ()
    tree_verified = False  # set only on families whose tree and static paths are tested exact

    def __init__(self, target: nn.Module):
        self.model = unwrap_target(target)
        self.config = self.model.config
        self.text_config = self.config.get_text_config(decoder=True)
        self.text_model = text_model_of(self.model)
        self.lm_head = self.model.get_output_embeddings()
        self.cache_kw = cache_argument_name(self.text_model.forward)
        self.dtype = self.lm_head.weight.dtype
        self.image_token = image_token_of(self.config)
        self.video_token = video_token_of(self.config)

    @property
    def name(self) -> str:
        return type(self.model).__name__

    def check_static_cache(self) -> None:
        """Raises `UnsupportedTargetError` if this target has no static-cache fast path (most families have one)."""

    # ---------------------------------------------------------------------------------------------- verify
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`(T, V)` float32 logits of the VLM's forward from the text model's final hidden states `(T, d)`."""
        return self.lm_head(hidden).float()

    def position_offset(self, model_kwargs: dict | None = None, row: int = 0) -> int:
        """What the family adds to a text token's sequence index to get its position id, in batch row `row`, read
        after `generate` prepared the call (valid for the generated tokens; `model_kwargs`: the call's model
        inputs)."""
        return 0

    def verify_mask(self, visible: torch.Tensor, depths: torch.Tensor, cache_length):
        """The attention mask of a verify forward: a `(1, 1, q, W)` additive mask from `(q, W)` bool slot visibility,
        or `(B, 1, q, W)` from `(B, q, W)` (hybrid text models take a dict keyed by layer type, which needs each
        query's `depths` `(q,)` in the tree and the `cache_length` (entries cached before the tree, an int or a
        device scalar; for a batch, each row's own length `(B,)`))."""
        mask = additive_mask(visible, self.dtype)
        return mask[:, None] if visible.dim() == 3 else mask[None, None]

    def verify(self, tokens, depths, visible, positions, cache_length, cache) -> torch.Tensor:
        """One text-model forward over tree nodes after the cached prefix.

        Args:
            tokens / depths: `(T,)` node tokens and depths; visible: `(T, W)` bool slot visibility;
            positions: `(T,)` position ids; cache_length: entries cached before the tree; cache: the target cache.
            A batch of trees (one per row) has a leading batch dimension on each: `(B, T)`, `(B, T, W)`, and
            `cache_length` is each row's own length `(B,)` (the trees are written after the longest).
        Returns:
            `(T, d)` final hidden states (the draft's true features), `(B, T, d)` for a batch.
        """
        batched = tokens.dim() == 2
        hidden = self.text_model(
            input_ids=tokens if batched else tokens[None],
            attention_mask=self.verify_mask(visible, depths, cache_length),
            position_ids=positions if batched else positions[None],
            use_cache=True,
            **{self.cache_kw: cache},
        ).last_hidden_state
        return hidden if batched else hidden[0]

    # ---------------------------------------------------------------------------------------------- caches
    def rewindable_cache(self, cache):
        """The cache the loop verifies on, given the one `generate` made for the call (before the prefill): the
        same one, unless the family's layers keep only a window (see `HybridAttentionAdapter`). Raises when the
        loop could not rewind it (sliding-window or chunked layers)."""
        cache_layers(cache)
        return cache

    def static_cache(self, length: int) -> StaticCache:
        """The fast path's target cache of `length` slots (refused when it could not be rewound)."""
        cache = StaticCache(config=self.text_config, max_cache_len=length)
        cache_layers(cache)
        return cache

    # ---------------------------------------------------------------------------------------------- images
    def check_images(self, input_ids: torch.Tensor, model_kwargs: dict) -> None:
        """Raises, naming the fix, when a batch-1 prompt's image placeholders do not match the images given."""
        if self.image_token is None or input_ids.shape[0] != 1:
            return
        is_image = input_ids[0] == self.image_token
        placeholders = int(is_image.sum())
        pixel_values = model_kwargs.get("pixel_values")
        if placeholders and pixel_values is None and model_kwargs.get("inputs_embeds") is None:
            raise ValueError(
                f"The prompt has {placeholders} image tokens but no image was given. Pass the image (`pixel_values`, "
                "e.g. `processor(images=image, text=prompt, return_tensors='pt')`), or remove the image placeholder "
                "from the prompt."
            )
        if pixel_values is None:
            return
        num_images = self.num_images(model_kwargs)
        if not placeholders:
            raise ValueError(
                f"{num_images} image(s) were given but the prompt has no image token. Put the image placeholder in "
                "the prompt (the processor's chat template does this for you), or do not pass `pixel_values`."
            )
        runs = len(image_spans(is_image))
        if self.placeholders_mismatch(runs, placeholders, num_images, model_kwargs):
            raise ValueError(
                f"The prompt has {runs} image placeholder run(s) ({placeholders} image tokens) but {num_images} "
                "image(s) were given. Give exactly one image per placeholder in the prompt, and build the prompt "
                "with the model's processor so that each placeholder is expanded to the right number of tokens."
            )

    def num_images(self, model_kwargs: dict) -> int:
        return int(model_kwargs["pixel_values"].shape[0])

    def placeholders_mismatch(self, runs: int, placeholders: int, num_images: int, model_kwargs: dict) -> bool:
        return runs > num_images

    def visual_layouts(self, is_image: torch.Tensor, model_kwargs: dict) -> list[VisualLayout]:
        """One `VisualLayout` per run of visual tokens in a prompt's pairs (`is_image` `(n,)` bool; the prompt's
        ids are `model_kwargs["input_ids"]` `(n,)` when known)."""
        return [VisualLayout.grid(end - start) for start, end in image_spans(is_image)]

    def row_image_inputs(self, input_ids: torch.Tensor, model_kwargs: dict, row: int) -> dict:
        """`model_kwargs` as batch row `row` of `input_ids` `(B, n)` alone would have them: the per-image geometry
        (`image_sizes`, `image_grid_thw`: one entry per image, rows in order) cut to that row's images, and
        `batch_num_images` to its own count."""
        if input_ids.shape[0] == 1:
            return model_kwargs
        runs = [len(image_spans(self.visual_mask(ids, model_kwargs))) for ids in input_ids[: row + 1]]
        start = sum(runs[:row])
        out = dict(model_kwargs)
        for key in ("image_sizes", "image_grid_thw"):
            if out.get(key) is not None:
                out[key] = out[key][start : start + runs[row]]
        if out.get("batch_num_images") is not None:
            out["batch_num_images"] = out["batch_num_images"][row : row + 1]
        return out

    def forward_inputs(self, input_ids: torch.Tensor) -> dict:
        """Inputs the family's forward needs beside `input_ids`, `attention_mask` and the image tensors, as its
        processor makes them from the token ids (the training teacher pass calls the VLM forward directly)."""
        return {}

    def visual_mask(self, input_ids: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        """`(n,)` bool over a prompt's tokens `(n,)`: the tokens the draft's compressor may replace, in runs that
        `visual_layouts` lays out. Default: the image and video tokens. (Mistral 3 adds each row's `[IMG_BREAK]` /
        `[IMG_END]`, so that an image is one run and pools as a 2-D grid.)"""
        visual = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        for token in (self.image_token, self.video_token):
            if token is not None:
                visual |= input_ids == token
        return visual


@register
class LlavaAdapter(TargetAdapter):
    """LLaVA-1.5: one square grid of `image_seq_length` tokens per image, one run per image."""

    model_types = ("llava",)
    tree_verified = True

    def placeholders_mismatch(self, runs, placeholders, num_images, model_kwargs):
        per_image = getattr(self.config, "image_seq_length", None)
        wrong_count = per_image and placeholders != num_images * per_image and placeholders % per_image == 0
        return runs > num_images or bool(wrong_count)


@register
class LlavaNextAdapter(TargetAdapter):
    """LLaVA-NeXT (AnyRes): the base grid, then the unpadded tiles with a newline token after each row."""

    model_types = ("llava_next",)
    tree_verified = True

    def visual_layouts(self, is_image, model_kwargs):
        sizes = model_kwargs.get("image_sizes")
        return [
            image_layout(
                self.config, end - start, sizes[index].tolist() if sizes is not None and index < len(sizes) else None
            )
            for index, (start, end) in enumerate(image_spans(is_image))
        ]


@register
class LlavaNextVideoAdapter(LlavaNextAdapter):
    """LLaVA-NeXT-Video: images as LLaVA-NeXT's (AnyRes); a video is one run of its frames' grids after the
    vision resampler pools each frame by `spatial_pool_stride`, frame after frame (no newline tokens)."""

    model_types = ("llava_next_video",)
    tree_verified = True

    def visual_layouts(self, is_image, model_kwargs):
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size // self.config.spatial_pool_stride
        sizes = model_kwargs.get("image_sizes")
        images = None if sizes is None else [image_layout(self.config, None, size) for size in sizes.tolist()]
        return video_and_image_layouts(self, is_image, model_kwargs, images, side, 0)


@register
class QwenVLAdapter(TargetAdapter):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and MoE): M-RoPE positions (text after an image sits at
    `index + rope_deltas`); images counted from `image_grid_thw` (`pixel_values` are patch rows); each image's tokens
    are its merged `(t, h / m, w / m)` grid, row-major, one run per image between vision-start and vision-end
    tokens."""

    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
    tree_verified = True

    def position_offset(self, model_kwargs=None, row: int = 0) -> int:
        """Plain decoding continues from the prompt's last position id (`generate` steps the ids it prepared), which
        is not always `rope_deltas`: after a video whose time index outruns its height and width (Qwen2.5-VL spaces
        frames by `tokens_per_second`), `rope_deltas` counts from the largest time index but the text after the
        video from the largest spatial one. So the offset comes from the prepared ids when there are any (row
        `row`'s last id; left padding keeps the last token real), else from `rope_deltas`."""
        ids = None if model_kwargs is None else model_kwargs.get("position_ids")
        if ids is not None and ids.dim() == 3 and ids.shape[1] > row:  # (rows, batch, n): the M-RoPE rows last
            mask = model_kwargs.get("attention_mask")
            real = ids.shape[-1] if mask is None else int(mask[row].sum())  # sequence indices count real tokens
            return int(ids[-1, row, -1]) + 1 - real
        deltas = mrope_deltas(self.model)
        if deltas is None:
            return 0
        deltas = deltas.reshape(-1)
        return int(deltas[row if deltas.numel() > row else 0])

    def num_images(self, model_kwargs):
        grid = model_kwargs.get("image_grid_thw")
        return 0 if grid is None else int(grid.shape[0])

    def forward_inputs(self, input_ids):
        """`mm_token_type_ids` (1 on image, 2 on video placeholders): without them transformers 5.17 computes no
        M-RoPE positions and silently falls back to 1-D ones."""
        types = torch.zeros_like(input_ids, dtype=torch.int)
        types[input_ids == self.config.image_token_id] = 1
        video = getattr(self.config, "video_token_id", None)
        if video is not None:
            types[input_ids == video] = 2
        return {"mm_token_type_ids": types}

    def placeholders_mismatch(self, runs, placeholders, num_images, model_kwargs):
        grid = model_kwargs.get("image_grid_thw")
        if grid is None:
            return True
        merge = self.config.vision_config.spatial_merge_size
        return runs != num_images or placeholders != int(grid.prod(dim=-1).sum()) // (merge * merge)

    def visual_layouts(self, is_image, model_kwargs):
        """Images: their merged `(t, h / m, w / m)` grids. Videos (`video_grid_thw`): Qwen2-VL and Qwen2.5-VL put a
        video in one run of `t` frames (temporal layout); Qwen3-VL puts each frame in its own run after its
        timestamp, so each run is one frame, numbered with its video's `clip` (the compressor pools over the
        video's frames across the timestamps). A run whose count disagrees with its grid (and every run after it)
        falls back to `VisualLayout.grid`."""
        merge = self.config.vision_config.spatial_merge_size
        per_frame_runs = self.config.model_type.startswith("qwen3")
        pending = {"image": self._grids(model_kwargs, "image_grid_thw", False, merge)}
        pending["video"] = self._grids(model_kwargs, "video_grid_thw", per_frame_runs, merge)
        spans = image_spans(is_image)
        layouts, aligned = [], True
        for (start, end), token in zip(spans, run_tokens(model_kwargs.get("input_ids"), spans)):
            queue = pending["video" if token is not None and token == self.video_token else "image"]
            layout = queue.pop(0) if aligned and queue else None
            aligned = layout is not None and layout.num_tokens == end - start
            layouts.append(layout if aligned else VisualLayout.grid(end - start))
        return layouts

    @staticmethod
    def _grids(model_kwargs, key: str, per_frame: bool, merge: int) -> list[VisualLayout]:
        """The layout of each grid of `model_kwargs[key]` in order (each frame its own layout with `per_frame`)."""
        grids = model_kwargs.get(key)
        layouts = []
        for clip, (frames, rows, cols) in enumerate([] if grids is None else grids.tolist()):
            rows, cols = rows // merge, cols // merge
            if per_frame:
                layouts += [VisualLayout([GridSegment(0, rows, cols)], True, clip) for _ in range(frames)]
            else:
                layouts.append(VisualLayout.frames(frames, rows, cols))
                layouts[-1].temporal = key == "video_grid_thw"
        return layouts


class HybridAttentionAdapter(TargetAdapter):
    """Text models mixing full-attention and sliding-window layers (`config.layer_types`): the loop verifies on a
    cache whose layers are all full attention (so it can be rewound; the sliding layers then keep all their keys,
    which costs memory, not exactness), and passes the mask as a dict keyed by layer type, the sliding layers'
    mask adding the window: a query at sequence slot `q` sees slot `k` only if `k > q - window`. A tree node of
    depth `d` sits at slot `cache_length + d`; its ancestors lie within the window whenever the tree is shallower
    than the window, so only prefix slots are cut."""

    def __init__(self, target):
        super().__init__(target)
        self.hybrid = "sliding_attention" in (getattr(self.text_config, "layer_types", None) or [])
        self.window = getattr(self.text_config, "sliding_window", None)
        self.full_config = full_attention_only(copy.deepcopy(self.text_config))

    def verify_mask(self, visible, depths, cache_length):
        """As `TargetAdapter.verify_mask`, as a dict keyed by layer type. A batch (`visible` `(B, q, W)`, `depths`
        `(B, q)`) passes each row's own length as `cache_length` `(B,)`: a row's node of depth `d` stands for
        sequence slot `length + d` (its tree is written at the shared offset, but its tokens are kept at its own
        length, the slots plain batched `generate` gives them), and the window counts from there."""
        if not self.hybrid:
            return super().verify_mask(visible, depths, cache_length)
        batched = visible.dim() == 3
        if not batched:
            visible, depths = visible[None], depths[None]
        lengths = torch.as_tensor(cache_length, device=visible.device).reshape(-1, 1, 1)
        slots = torch.arange(visible.shape[-1], device=visible.device)[None, None, :]
        in_window = (slots >= lengths) | (slots > lengths + depths[:, :, None].to(visible.device) - self.window)
        return {
            "full_attention": additive_mask(visible, self.dtype)[:, None],
            "sliding_attention": additive_mask(visible & in_window, self.dtype)[:, None],
        }

    def rewindable_cache(self, cache):
        if not self.hybrid:
            return super().rewindable_cache(cache)
        if cache.get_seq_length() != 0:
            raise ValueError(f"{self.name}: SpecVLM tree decoding cannot continue from a filled cache; pass none.")
        return DynamicCache(config=self.full_config)

    def static_cache(self, length: int) -> StaticCache:
        return StaticCache(config=self.full_config, max_cache_len=length)


@register
class Gemma3Adapter(HybridAttentionAdapter):
    """Gemma 3: 5 sliding-window layers per global one; image tokens attend bidirectionally only in the prefill
    (transformers' own prefill does that); no final logit softcap in the VLM forward; one square grid of
    `mm_tokens_per_image` tokens per image, between begin- and end-of-image tokens."""

    model_types = ("gemma3",)
    tree_verified = True

    def visual_layouts(self, is_image, model_kwargs):
        per_image = getattr(self.config, "mm_tokens_per_image", 0)
        side = math.isqrt(per_image) if per_image else 0
        return [
            VisualLayout([GridSegment(0, side, side)])
            if side * side == end - start
            else VisualLayout.grid(end - start)
            for start, end in image_spans(is_image)
        ]


@register
class PaliGemmaAdapter(HybridAttentionAdapter):
    """PaliGemma 1 (Gemma text model, full attention) and 2 (Gemma 2: sliding-window layers, attention softcap;
    the VLM forward applies no final softcap): positions counted from 1; all images first, in one run of
    `num_image_tokens` per image."""

    model_types = ("paligemma",)
    tree_verified = True

    def position_offset(self, model_kwargs=None, row: int = 0) -> int:
        return 1

    def check_static_cache(self) -> None:
        if self.hybrid:
            raise UnsupportedTargetError(
                f"{self.name} with a Gemma 2 text model (PaliGemma 2) has no static-cache fast path: transformers' "
                "PaliGemma forward cannot take the per-layer-type attention masks `generate` builds for a static "
                "cache (its own `generate(cache_implementation='static')` fails the same way). Drop "
                "`cache_implementation='static'`: tree decoding on dynamic caches is exact for PaliGemma 2."
            )

    def visual_layouts(self, is_image, model_kwargs):
        per_image = getattr(self.text_config, "num_image_tokens", None) or getattr(self.config, "image_seq_length", 0)
        layouts = []
        for start, end in image_spans(is_image):
            count = end - start
            side = math.isqrt(per_image) if per_image else 0
            if per_image and side * side == per_image and count % per_image == 0:
                layouts.append(
                    VisualLayout([GridSegment(i * per_image, side, side) for i in range(count // per_image)])
                )
            else:
                layouts.append(VisualLayout.grid(count))
        return layouts


# ------------------------------------------------------------------------------------------ more families
def layouts_per_run(spans: list[tuple[int, int]], layouts: list[VisualLayout] | None) -> list[VisualLayout]:
    """One layout per placeholder run from per-image (or per-tile) `layouts` in prompt order: a run holding
    several adjacent images gets their segments one after the other. Where the token counts disagree (a prompt
    not laid out by the processor), that run and the ones after it fall back to `VisualLayout.grid`."""
    out, queue, aligned = [], list(layouts or []), layouts is not None
    for start, end in spans:
        length, segments, covered = end - start, [], 0
        while aligned and queue and covered < length:
            layout = queue.pop(0)
            segments += [GridSegment(covered + s.start, s.rows, s.cols, s.newline) for s in layout.segments]
            covered += layout.num_tokens
        aligned = aligned and bool(segments) and covered == length
        out.append(VisualLayout(segments) if aligned else VisualLayout.grid(length))
    return out


def tile_layout(tiles: int, side: int) -> VisualLayout:
    """`tiles` square grids of `side x side` tokens, one after the other."""
    return VisualLayout([GridSegment(i * side * side, side, side) for i in range(tiles)])


@register
class LlavaOnevisionAdapter(TargetAdapter):
    """LLaVA-OneVision (Qwen2 text model, 1-D positions): an image alone in its prompt is AnyRes (the base grid,
    then the unpadded tiles with a newline token after each row, shrunk past `anyres_max_N`); with several images
    in a prompt (`batch_num_images`) each is its base grid and one newline token. Images counted from
    `image_sizes`."""

    model_types = ("llava_onevision",)
    tree_verified = True

    def num_images(self, model_kwargs):
        sizes = model_kwargs.get("image_sizes")
        return int(model_kwargs["pixel_values"].shape[0] if sizes is None else sizes.shape[0])

    def image_layouts(self, model_kwargs) -> list[VisualLayout] | None:
        """One layout per image, as `LlavaOnevisionModel.get_image_features` packs them (None without sizes)."""
        from .hf_internals import onevision_grid  # imported here: this section only appends to the module

        sizes = model_kwargs.get("image_sizes")
        if sizes is None:
            return None
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        per_sample = model_kwargs.get("batch_num_images")
        patched = (
            [True] * len(sizes) if per_sample is None else [int(n) == 1 for n in per_sample for _ in range(int(n))]
        )
        base = GridSegment(0, side, side)
        layouts = []
        for size, anyres in zip(sizes.tolist(), patched):
            if anyres:
                rows, cols = onevision_grid(self.config, size, model_kwargs.get("vision_aspect_ratio"))
                layouts.append(VisualLayout([base, GridSegment(base.length, rows, cols, newline=True)]))
            else:  # the base grid and one newline token
                layouts.append(VisualLayout([base, GridSegment(base.length, 1, 1)]))
        return layouts

    def placeholders_mismatch(self, runs, placeholders, num_images, model_kwargs):
        layouts = self.image_layouts(model_kwargs)
        expected = None if layouts is None else sum(layout.num_tokens for layout in layouts)
        return runs > num_images or (expected is not None and placeholders != expected)

    def visual_layouts(self, is_image, model_kwargs):
        """Image runs as `image_layouts`; each video run is its frames' `ceil(s / 2)` square grids (the model pools
        every frame 2 x 2) and one newline token."""
        vision = self.config.vision_config
        side = math.ceil(vision.image_size // vision.patch_size / 2)
        return video_and_image_layouts(self, is_image, model_kwargs, self.image_layouts(model_kwargs), side, 1)


def video_and_image_layouts(adapter, is_image, model_kwargs, image_layouts, side: int, trailing: int):
    """Layouts of a prompt whose runs are images (laid out from `image_layouts`, see `layouts_per_run`) or videos
    (one run per video: frames of `side x side` tokens, then `trailing` extra tokens)."""
    spans = image_spans(is_image)
    kinds = run_tokens(model_kwargs.get("input_ids"), spans)
    is_video = [kind is not None and kind == adapter.video_token for kind in kinds]
    images = iter(layouts_per_run([span for span, video in zip(spans, is_video) if not video], image_layouts))
    layouts = []
    for (start, end), video in zip(spans, is_video):
        if not video:
            layouts.append(next(images))
            continue
        frames, extra = divmod(end - start - trailing, side * side)
        if frames < 1 or extra:
            layouts.append(VisualLayout.grid(end - start))
            continue
        layout = VisualLayout.frames(frames, side, side)
        layout.segments += [GridSegment(frames * side * side, 1, trailing)] if trailing else []
        layouts.append(layout)
    return layouts


@register
class InternVLAdapter(TargetAdapter):
    """InternVL (Qwen2 / Llama text model, 1-D positions): an image is 1 to 12 tiles and a thumbnail, each a
    square grid of `image_seq_length` tokens (16 x 16 after the pixel shuffle), in one run between `<img>` and
    `</img>`. `pixel_values` holds the tiles of every image, `(tiles, 3, H, W)`."""

    model_types = ("internvl",)
    tree_verified = True

    @property
    def tile_side(self) -> int:
        vision = self.config.vision_config
        size, patch = vision.image_size, vision.patch_size
        size, patch = (size[0], patch[0]) if isinstance(size, (list, tuple)) else (size, patch)
        return int(size // patch * self.config.downsample_ratio)

    def num_images(self, model_kwargs):
        return int(model_kwargs["pixel_values"].shape[0])  # tiles: an image is one run of one or more tiles

    def check_images(self, input_ids, model_kwargs):
        super().check_images(input_ids, model_kwargs)
        pixel_values = model_kwargs.get("pixel_values")
        if self.image_token is None or input_ids.shape[0] != 1 or pixel_values is None:
            return
        per_tile = self.tile_side**2
        tiles = int(pixel_values.shape[0])
        runs = [end - start for start, end in image_spans(input_ids[0] == self.image_token)]
        if sum(runs) != tiles * per_tile or any(run % per_tile for run in runs):
            raise ValueError(
                f"The prompt's image placeholder runs hold {runs} image tokens but `pixel_values` holds {tiles} "
                f"tile(s) of {per_tile} tokens each: each image needs {per_tile} tokens per tile (thumbnail "
                "included) in one run. Build the prompt with the model's processor, which expands each image "
                "placeholder to its tiles' tokens."
            )

    def visual_layouts(self, is_image, model_kwargs):
        side = self.tile_side
        return [
            tile_layout((end - start) // side**2, side)
            if (end - start) % side**2 == 0
            else VisualLayout.grid(end - start)
            for start, end in image_spans(is_image)
        ]


@register
class Idefics3Adapter(TargetAdapter):
    """Idefics3 and SmolVLM (Llama text model under `.text_model`, 1-D positions): an image is split into
    rows x cols crops and a global image, each a square grid of `image_seq_len` tokens (after the pixel
    shuffle) in its own placeholder run, the runs separated by text tokens (`<fake_token_around_image>`,
    `<row_i_col_j>`, `<global-img>`). `pixel_values` `(batch, crops, 3, H, W)` holds every crop of every image
    (all-zero crops are padding), and each run takes one crop: images are counted in crops, not runs."""

    model_types = ("idefics3", "smolvlm")
    tree_verified = True

    @property
    def crop_side(self) -> int:
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size // self.config.scale_factor

    def num_images(self, model_kwargs):
        pixel_values = model_kwargs["pixel_values"]
        if pixel_values.dim() != 5:
            return int(pixel_values.shape[0])
        return int((pixel_values[0].flatten(1) != 0).any(dim=-1).sum())  # real crops of the (batch-1) prompt

    def placeholders_mismatch(self, runs, placeholders, num_images, model_kwargs):
        return runs != num_images or placeholders != num_images * self.crop_side**2

    def check_images(self, input_ids, model_kwargs):
        hidden = model_kwargs.get("image_hidden_states")  # a previous call's encoded crops, instead of pixels
        if hidden is None or model_kwargs.get("pixel_values") is not None:
            return super().check_images(input_ids, model_kwargs)
        if self.image_token is None or input_ids.shape[0] != 1:
            return
        is_image = input_ids[0] == self.image_token
        runs, placeholders, crops = len(image_spans(is_image)), int(is_image.sum()), len(hidden)
        if self.placeholders_mismatch(runs, placeholders, crops, model_kwargs):
            raise ValueError(
                f"The prompt has {runs} image placeholder run(s) ({placeholders} image tokens) but "
                f"`image_hidden_states` holds {crops} encoded crop(s): give the states of exactly the prompt's "
                "images, and build the prompt with the model's processor."
            )

    def visual_layouts(self, is_image, model_kwargs):
        side = self.crop_side
        spans = image_spans(is_image)
        return layouts_per_run(spans, [tile_layout(1, side)] * len(spans))


@register
class Mistral3Adapter(TargetAdapter):
    """Mistral 3 (Pixtral vision, Mistral text model, 1-D positions): an image of `image_sizes[i]` (h, w) pixels
    is `h // (patch * merge)` rows of `w // (patch * merge)` `[IMG]` tokens, each row ended by `[IMG_BREAK]` (the
    last by `[IMG_END]`), so each row is its own run of image tokens. Images are counted from `image_sizes`. For
    the compressor, `visual_mask` makes each image one run (its tokens and row ends), laid out as its
    `(rows, cols)` grid; over runs of image tokens alone, each run is laid out as its row."""

    model_types = ("mistral3",)
    tree_verified = True

    def image_grids(self, model_kwargs) -> list[tuple[int, int]] | None:
        """`(rows, cols)` of tokens of every image (None without `image_sizes`)."""
        sizes = model_kwargs.get("image_sizes")
        if sizes is None:
            return None
        step = self.config.vision_config.patch_size * self.config.spatial_merge_size
        return [(int(h) // step, int(w) // step) for h, w in torch.as_tensor(sizes).tolist()]

    def num_images(self, model_kwargs):
        grids = self.image_grids(model_kwargs)
        return int(model_kwargs["pixel_values"].shape[0]) if grids is None else len(grids)

    def placeholders_mismatch(self, runs, placeholders, num_images, model_kwargs):
        grids = self.image_grids(model_kwargs)
        if grids is None:
            return True
        return runs != sum(rows for rows, _ in grids) or placeholders != sum(rows * cols for rows, cols in grids)

    def visual_mask(self, input_ids, model_kwargs):
        """The image tokens and the token ending each row (`[IMG_BREAK]`, or `[IMG_END]` after the last row): one
        run of `rows x (cols + 1)` tokens per image."""
        is_image = super().visual_mask(input_ids, model_kwargs)
        row_end = torch.zeros_like(is_image)
        row_end[1:] = is_image[:-1] & ~is_image[1:]
        return is_image | row_end

    def visual_layouts(self, is_image, model_kwargs):
        """Per run: whole images (`visual_mask`'s runs; adjacent images share one) are their `(rows, cols)` grids
        with the row-ending token after each row; a row of image tokens alone (runs of image tokens) is a
        `1 x cols` grid. Pooling never mixes rows of different images."""
        grids = self.image_grids(model_kwargs)
        if grids is None:  # no geometry (transformers 5.23+ encodes the images before the loop): rows stay rows
            return [VisualLayout.sequence(end - start) for start, end in image_spans(is_image)]
        pending = [[rows, cols] for rows, cols in grids]
        layouts = []
        for start, end in image_spans(is_image):
            length, segments, covered = end - start, [], 0
            while pending and covered < length and pending[0][0] * (pending[0][1] + 1) <= length - covered:
                rows, cols = pending.pop(0)  # a whole image
                segments.append(GridSegment(covered, rows, cols, newline=True))
                covered += segments[-1].length
            if not segments and pending and length == pending[0][1]:  # one row
                segments, covered = [GridSegment(0, 1, length)], length
                pending[0][0] -= 1
                if not pending[0][0]:
                    pending.pop(0)
            if covered != length:  # not laid out by the processor: this run and the rest fall back
                pending, segments = [], []
            layouts.append(VisualLayout(segments) if segments else VisualLayout.grid(length))
        return layouts
