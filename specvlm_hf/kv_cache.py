"""KV-cache bookkeeping for tree decoding: keep the accepted tree nodes, drop the rest.

After the target scores a tree of `T` nodes appended after a prefix of `L` cached tokens, its cache
holds `L + T` entries, of which only the root and the accepted nodes (scattered in the tree block)
belong to the sequence. `compact_kv` moves them to the slots right after the prefix and cuts the rest.
transformers' `Cache.crop` only drops a suffix, so this is a gather per layer.

Works on the layers of a `DynamicCache` (tensors `keys` / `values`) and of a `StaticCache` (fixed
buffers whose write position is `cumulative_length`).
"""

from __future__ import annotations

import inspect

import torch


def cache_layers(cache) -> list:
    """The per-layer objects of a transformers cache, refusing the kinds tree decoding cannot rewind."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"unsupported cache type {type(cache).__name__}: expected a transformers Cache with `.layers`")
    for layer in layers:
        name = type(layer).__name__
        if "Sliding" in name or "Chunked" in name or "Indexed" in name or getattr(layer, "is_sliding", False):
            raise ValueError(
                f"tree decoding cannot rewind a {name} cache layer (sliding-window / chunked attention). Use a "
                "target whose text model has full attention, or set `text_config.sliding_window=None` when every "
                "prompt plus generation fits in the window."
            )
    return list(layers)


def is_static_layer(layer) -> bool:
    return hasattr(layer, "cumulative_length") and torch.is_tensor(layer.cumulative_length)


def compact_kv(cache, prefix_length: int, kept_nodes: torch.Tensor | list[int]) -> None:
    """Keeps `prefix_length` cached tokens plus the tree entries `kept_nodes`, in that order.

    Args:
        cache: a transformers `DynamicCache` or `StaticCache`, holding `prefix_length + T` tokens where
            the last `T` are the tree nodes in node order.
        prefix_length: tokens cached before the tree.
        kept_nodes: node indices to keep (root first, then the accepted path), ascending.
    """
    layers = cache_layers(cache)
    if not layers:
        return
    device = layers[0].keys.device
    kept = torch.as_tensor(kept_nodes, dtype=torch.long, device=device)
    if all(is_static_layer(layer) for layer in layers):
        # fixed buffers: rewritten in place, write position moved back (the fast path's function, host lengths)
        start = torch.tensor(prefix_length, device=device)
        compact_static_kv(cache, start, kept, torch.tensor(kept.numel(), device=device))
        return
    src = kept + prefix_length
    for layer in layers:
        if layer.keys.device != src.device:  # layers split over several GPUs
            src = src.to(layer.keys.device)
        kept_keys = layer.keys.index_select(-2, src)
        kept_values = layer.values.index_select(-2, src)
        layer.keys = torch.cat([layer.keys[..., :prefix_length, :], kept_keys], dim=-2)
        layer.values = torch.cat([layer.values[..., :prefix_length, :], kept_values], dim=-2)


def stack_static_layers(cache) -> torch.Tensor | None:
    """Moves the initialised layers of a `StaticCache` into one `(layers, 2, batch, heads, W, head_dim)` tensor
    (each layer's keys and values become views of it) so that compaction is one gather for all layers; returns
    it, or None when the layers differ in shape, dtype or device (then they stay as they are)."""
    layers = cache_layers(cache)
    if not layers or not all(is_static_layer(layer) and getattr(layer, "is_initialized", False) for layer in layers):
        return None
    first = layers[0].keys
    if any(t.shape != first.shape or t.dtype != first.dtype or t.device != first.device
           for layer in layers for t in (layer.keys, layer.values)):
        return None
    stacked = torch.stack([torch.stack([layer.keys, layer.values]) for layer in layers])
    for index, layer in enumerate(layers):
        layer.keys, layer.values = stacked[index, 0], stacked[index, 1]
    return stacked


def compact_static_kv(
    cache, start: torch.Tensor, nodes: torch.Tensor, count: torch.Tensor, stacked: torch.Tensor | None = None
) -> None:
    """`compact_kv` for static caches with the prefix length and the kept nodes on the device: no host sync and
    fixed shapes, so it can run inside a CUDA graph.

    Args:
        cache: a `StaticCache` holding `start + T` entries, the last `T` being tree nodes in node order.
        start: `()` long, entries cached before the tree.
        nodes: `(P,)` node indices to keep, root first; only the first `count` are kept, the rest (any valid
            node index) are copied after them and lie beyond the new length.
        count: `()` long, how many of `nodes` to keep.
        stacked: the `stack_static_layers` tensor of `cache`, if any: one gather instead of one per layer.
    """
    layers = cache_layers(cache)
    if stacked is not None:
        src = nodes + start
        dst = start + torch.arange(nodes.shape[0], device=start.device)
        stacked.index_copy_(4, dst, stacked.index_select(4, src))
    for layer in layers:
        if stacked is None:
            src = (nodes + start).to(layer.keys.device)
            dst = start.to(layer.keys.device) + torch.arange(nodes.shape[0], device=layer.keys.device)
            layer.keys.index_copy_(2, dst, layer.keys.index_select(2, src))
            layer.values.index_copy_(2, dst, layer.values.index_select(2, src))
        layer.cumulative_length.copy_(start + count)


def set_static_length(cache, length: torch.Tensor) -> None:
    """Moves every static layer's write position to `length` (a device scalar), dropping what lies after it."""
    for layer in cache_layers(cache):
        layer.cumulative_length.copy_(length)


def crop_kv(cache, length: int) -> None:
    """Drops every cached token after the first `length` (no-op when the cache is not longer)."""
    for layer in cache_layers(cache):
        if is_static_layer(layer):
            if layer.is_initialized:
                layer.cumulative_length.fill_(length)  # no device sync; 5.17 has no `crop` for static layers
            continue
        extra = (layer.keys.shape[-2] if getattr(layer, "keys", None) is not None and layer.keys.dim() > 1 else 0) - length
        if extra > 0:
            layer.crop(-extra)  # a negative count drops a suffix on every transformers 5.x release


def cache_argument_name(forward) -> str:
    """The keyword a model's forward takes its cache under: `cache` from transformers 5.24, else
    `past_key_values`."""
    parameters = inspect.signature(forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
