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


ADAPTERS: dict[str, type] = {}  # model_type -> adapter class, filled by `register`


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

    @property
    def name(self) -> str:
        return type(self.model).__name__

    # ---------------------------------------------------------------------------------------------- verify
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`(T, V)` float32 logits of the VLM's forward from the text model's final hidden states `(T, d)`."""
        return self.lm_head(hidden).float()

    def position_offset(self) -> int:
        """What the family adds to a text token's sequence index to get its position id, read after `generate`
        prepared the call (valid for the generated tokens)."""
        return 0

    def verify_mask(self, visible: torch.Tensor, depths: torch.Tensor, cache_length):
        """The attention mask of a verify forward: a `(1, 1, q, W)` additive mask from `(q, W)` bool slot visibility
        (hybrid text models take a dict keyed by layer type, which needs each query's `depths` `(q,)` in the tree
        and the `cache_length` (entries cached before the tree, an int or a device scalar))."""
        return additive_mask(visible, self.dtype)[None, None]

    def verify(self, tokens, depths, visible, positions, cache_length, cache) -> torch.Tensor:
        """One text-model forward over tree nodes after the cached prefix.

        Args:
            tokens / depths: `(T,)` node tokens and depths; visible: `(T, W)` bool slot visibility;
            positions: `(T,)` position ids; cache_length: entries cached before the tree; cache: the target cache.
        Returns:
            `(T, d)` final hidden states (the draft's true features).
        """
        return self.text_model(
            input_ids=tokens[None],
            attention_mask=self.verify_mask(visible, depths, cache_length),
            position_ids=positions[None],
            use_cache=True,
            **{self.cache_kw: cache},
        ).last_hidden_state[0]

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
        """One `VisualLayout` per run of image tokens in a prompt (`is_image` `(n,)` bool)."""
        return [VisualLayout.grid(end - start) for start, end in image_spans(is_image)]


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
            image_layout(self.config, end - start, sizes[index].tolist() if sizes is not None and index < len(sizes) else None)
            for index, (start, end) in enumerate(image_spans(is_image))
        ]


@register
class QwenVLAdapter(TargetAdapter):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL: M-RoPE positions (text after an image sits at `index + rope_deltas`);
    images counted from `image_grid_thw` (`pixel_values` are patch rows); each image's tokens are its merged
    `(t, h / m, w / m)` grid, row-major, one run per image between vision-start and vision-end tokens."""

    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    tree_verified = True

    def position_offset(self) -> int:
        deltas = mrope_deltas(self.model)
        return 0 if deltas is None else int(deltas.reshape(-1)[0])

    def num_images(self, model_kwargs):
        grid = model_kwargs.get("image_grid_thw")
        return 0 if grid is None else int(grid.shape[0])

    def placeholders_mismatch(self, runs, placeholders, num_images, model_kwargs):
        grid = model_kwargs.get("image_grid_thw")
        if grid is None:
            return True
        merge = self.config.vision_config.spatial_merge_size
        return runs != num_images or placeholders != int(grid.prod(dim=-1).sum()) // (merge * merge)

    def visual_layouts(self, is_image, model_kwargs):
        grid = model_kwargs.get("image_grid_thw")
        merge = self.config.vision_config.spatial_merge_size
        layouts = []
        for index, (start, end) in enumerate(image_spans(is_image)):
            if grid is None or index >= grid.shape[0]:
                layouts.append(VisualLayout.grid(end - start))
                continue
            frames, rows, cols = (int(v) for v in grid[index])
            rows, cols = rows // merge, cols // merge
            layout = VisualLayout([GridSegment(f * rows * cols, rows, cols) for f in range(frames)])
            layouts.append(layout if layout.num_tokens == end - start else VisualLayout.grid(end - start))
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
        if not self.hybrid:
            return super().verify_mask(visible, depths, cache_length)
        slots = torch.arange(visible.shape[1], device=visible.device)
        in_window = (slots[None, :] >= cache_length) | (slots[None, :] > cache_length + depths[:, None] - self.window)
        return {
            "full_attention": additive_mask(visible, self.dtype)[None, None],
            "sliding_attention": additive_mask(visible & in_window, self.dtype)[None, None],
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
            VisualLayout([GridSegment(0, side, side)]) if side * side == end - start else VisualLayout.grid(end - start)
            for start, end in image_spans(is_image)
        ]


@register
class PaliGemmaAdapter(HybridAttentionAdapter):
    """PaliGemma 1 (Gemma text model, full attention) and 2 (Gemma 2: sliding-window layers, attention softcap;
    the VLM forward applies no final softcap): positions counted from 1; all images first, in one run of
    `num_image_tokens` per image."""

    model_types = ("paligemma",)
    tree_verified = True

    def position_offset(self) -> int:
        return 1

    def visual_layouts(self, is_image, model_kwargs):
        per_image = getattr(self.text_config, "num_image_tokens", None) or getattr(self.config, "image_seq_length", 0)
        layouts = []
        for start, end in image_spans(is_image):
            count = end - start
            side = math.isqrt(per_image) if per_image else 0
            if per_image and side * side == per_image and count % per_image == 0:
                layouts.append(VisualLayout([GridSegment(i * per_image, side, side) for i in range(count // per_image)]))
            else:
                layouts.append(VisualLayout.grid(count))
        return layouts
