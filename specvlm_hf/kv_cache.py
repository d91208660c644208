"""KV-cache bookkeeping for tree decoding: which cached slots are real, keeping accepted tree nodes, rewinding.

After the target scores a tree of `T` nodes appended after `L` cached entries, its cache holds `L + T` entries,
of which only the root and the accepted nodes (scattered in the tree block) belong to the sequence. They are
moved to the slots right after the prefix and the rest is dropped; transformers' `Cache.crop` only drops a
suffix, so this is a gather per layer (one gather over all layers when a static cache's layers are stacked).

A cache window holds a cache (`.cache`), which of its slots hold real tokens (`.real`, False on left padding) and
how many entries it holds, and answers what a round asks of it:

- `visible(block_mask)`: `(q, width)` bool, the slots each of `q` new queries sees; their own block is written
  after the cached entries and `block_mask` `(q, m)` says which of the block's `m` entries each query sees;
- `keep(nodes, count)`: of the tree block just written, keep the entries `nodes[:count]` (`nodes` `(P,)`);
- `extend(block_real, count)`: of the `P` entries just written (`block_real` `(P,)`: which are real tokens),
  keep the first `count` (an int, or a device scalar);
- `rewind()`: drop every entry written after the cached ones (a round's draft tree levels).

Two kinds, one interface:

- `GrowingWindow`: a `DynamicCache` (eager loop, CPU, targets split over devices); lengths are host ints.
- `FixedWindow`: a `StaticCache` (the fast path); the length is a device scalar and masks are as wide as the
  cache, so every shape is fixed and a round can be captured as a CUDA graph.

The fast path keeps one target cache per length bucket (and batch shape); the layers of one shape's caches live in
one `SharedBuffers` (views), so a process that has met many buckets holds the memory of the largest one per shape.
"""

from __future__ import annotations

import torch

from .hf_internals import (
    initialize_static_layer,
    is_initialized,
    is_static_layer,
    layer_tensors,
    mark_static_address,
    set_layer_tensors,
    set_static_write_position,
    static_write_position,
)


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


def compact_kv(cache, prefix_length: int, kept_nodes: torch.Tensor | list[int]) -> None:
    """Keeps `prefix_length` cached entries plus the tree entries `kept_nodes`, in that order.

    Args:
        cache: a transformers `DynamicCache` holding `prefix_length + T` entries, the last `T` being the tree
            nodes in node order (static caches: `compact_static_kv`).
        prefix_length: entries cached before the tree.
        kept_nodes: node indices to keep (root first, then the accepted path).
    """
    layers = cache_layers(cache)
    src = torch.as_tensor(kept_nodes, dtype=torch.long) + prefix_length
    for layer in layers:
        keys, values = layer_tensors(layer)
        src = src.to(keys.device)  # layers split over several GPUs
        set_layer_tensors(
            layer,
            torch.cat([keys[..., :prefix_length, :], keys.index_select(-2, src)], dim=-2),
            torch.cat([values[..., :prefix_length, :], values.index_select(-2, src)], dim=-2),
        )


def stack_static_layers(cache) -> torch.Tensor | None:
    """Moves the initialised layers of a `StaticCache` into one `(layers, 2, batch, heads, W, head_dim)` tensor
    (each layer's keys and values become views of it) so that compaction is one gather for all layers; returns
    it, or None when the layers differ in shape, dtype or device (then they stay as they are)."""
    layers = cache_layers(cache)
    if not layers or not all(is_static_layer(layer) and is_initialized(layer) for layer in layers):
        return None
    tensors = [layer_tensors(layer) for layer in layers]
    first = tensors[0][0]
    if any(t.shape != first.shape or t.dtype != first.dtype or t.device != first.device for kv in tensors for t in kv):
        return None
    stacked = torch.stack([torch.stack(kv) for kv in tensors])
    point_at_stacked(layers, stacked)
    return stacked


def point_at_stacked(layers, stacked: torch.Tensor) -> None:
    """Makes each layer's keys and values the views of a `(layers, 2, ...)` tensor holding them."""
    for index, layer in enumerate(layers):
        set_layer_tensors(layer, stacked[index, 0], stacked[index, 1])


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
            keys, values = layer_tensors(layer)
            src = (nodes + start).to(keys.device)
            dst = start.to(keys.device) + torch.arange(nodes.shape[0], device=keys.device)
            keys.index_copy_(2, dst, keys.index_select(2, src))
            values.index_copy_(2, dst, values.index_select(2, src))
        set_static_write_position(layer, start + count)


def copy_static_rows(source, target, rows: torch.Tensor | None = None) -> None:
    """Copies the batch rows `rows` (`(B',)` indices; None: all) of a `StaticCache` into another one of `B'` rows
    and the same width, in place (the target's buffers keep their addresses; uninitialised ones are allocated), with
    the source's write positions."""
    for from_layer, to_layer in zip(cache_layers(source), cache_layers(target)):
        if not is_initialized(from_layer):
            continue
        keys, values = layer_tensors(from_layer)
        if rows is not None:
            index = rows.to(keys.device)
            keys, values = keys.index_select(0, index), values.index_select(0, index)
        if not is_initialized(to_layer):
            initialize_static_layer(to_layer, keys, values)
        to_keys, to_values = layer_tensors(to_layer)
        to_keys.copy_(keys)
        to_values.copy_(values)
        set_static_write_position(to_layer, static_write_position(from_layer))


def crop_kv(cache, length: int | torch.Tensor) -> None:
    """Drops every cached entry after the first `length` (an int, or a device scalar for static caches)."""
    for layer in cache_layers(cache):
        if is_static_layer(layer):
            if is_initialized(layer):
                set_static_write_position(layer, length)
            continue
        keys = layer_tensors(layer)[0]
        extra = (keys.shape[-2] if keys is not None and keys.dim() > 1 else 0) - int(length)
        if extra > 0:
            layer.crop(-extra)  # a negative count drops a suffix on every transformers 5.x release


# ----------------------------------------------------------------------------------------------------------------
class GrowingWindow:
    """A `DynamicCache` whose length is a host int (`real.numel()`)."""

    def __init__(self, cache, real: torch.Tensor):
        self.cache = cache
        self.real = real.bool()

    @property
    def length(self) -> int:
        return self.real.numel()

    def visible(self, block_mask):
        prefix = self.real.to(block_mask.device)[None, :].expand(block_mask.shape[0], -1)
        return torch.cat([prefix, block_mask], dim=1)

    def extend(self, block_real, count):
        self.real = torch.cat([self.real, block_real[: int(count)].to(self.real.device).bool()])
        crop_kv(self.cache, self.length)

    def keep(self, nodes, count, stacked=None):
        count = int(count)
        compact_kv(self.cache, self.length, nodes[:count])
        self.real = torch.cat([self.real, self.real.new_ones(count)])

    def rewind(self):
        crop_kv(self.cache, self.length)


class SharedBuffers:
    """Memory the fast path's static caches of every length bucket share (the target's in one, the draft's in
    another): only one call runs at a time and each call's prefill writes its caches afresh, so buckets need not
    keep caches of their own (each keeps its CUDA graphs, which read the caches' fixed addresses).

    One flat buffer per tensor of a cache (each layer's keys and values; or one stacked tensor), as large as the
    largest such tensor so far, or as a cache of `reserve` slots. A cache's tensors become views of the buffers'
    first elements: contiguous, each in a buffer of its own (compiled rounds must not see layers that alias: see
    `round.STACK_COMPILED_LAYERS`). A cache a buffer cannot hold (longer, or of another layout) makes new buffers:
    `generation` goes up, and caches placed before must not be used again (`FixedWindow.stale`).

    Attributes:
        buffers: the flat buffers; length: the longest cache (slots) placed in the current generation.
        reserve: new buffers hold caches of at least this many slots (the draft's memory is sized for the longest
            target bucket, which no draft cache of its calls outgrows).
    """

    def __init__(self, reserve: int = 0):
        self.buffers: list[torch.Tensor] = []
        self.generation = 0
        self.length = 0
        self.reserve = reserve

    def fits(self, tensors: list[torch.Tensor]) -> bool:
        return len(tensors) == len(self.buffers) and all(
            buffer.dtype == tensor.dtype and buffer.device == tensor.device and buffer.numel() >= tensor.numel()
            for buffer, tensor in zip(self.buffers, tensors)
        )

    def views(self, tensors: list[torch.Tensor], length: int) -> list[torch.Tensor]:
        """Views of the shared memory shaped, typed and placed as `tensors` (of a cache of `length` slots), holding
        their values."""
        if not self.fits(tensors):
            self.buffers = []  # (the old buffers live on only in the caches placed in them)
            slots = max(length, self.reserve)
            # room for `slots` along the slot dimension (-2) of tensors as wide as the cache (sliding-window layers
            # are narrower, and keep their size)
            sizes = [t.numel() // length * slots if t.shape[-2] == length else t.numel() for t in tensors]
            self.buffers = [torch.empty(size, dtype=t.dtype, device=t.device) for size, t in zip(sizes, tensors)]
            self.generation += 1
            self.length = 0
        self.length = max(self.length, length)
        views = [buffer[: t.numel()].view(t.shape) for buffer, t in zip(self.buffers, tensors)]
        for view, tensor in zip(views, tensors):
            view.copy_(tensor)
        return views


def share_layers(layers, shared: SharedBuffers, width: int) -> None:
    """Moves initialised static cache layers (of a cache of `width` slots) into `shared`, a buffer per tensor."""
    tensors = [tensor for layer in layers for tensor in layer_tensors(layer)]
    views = shared.views(tensors, width)
    for index, layer in enumerate(layers):
        set_layer_tensors(layer, views[2 * index], views[2 * index + 1])
        for view in views[2 * index : 2 * index + 2]:
            mark_static_address(view)  # as transformers marks the tensors it allocates


def placeable(cache) -> list | None:
    """The layers of a static cache once all are initialised (by a first prefill or copy), else None."""
    layers = cache_layers(cache)
    if layers and all(is_static_layer(layer) and is_initialized(layer) for layer in layers):
        return layers
    return None


class FixedWindow:
    """A `StaticCache` of `W` slots whose length is a device scalar; masks span all `W` slots.

    Args:
        cache, width, device: the cache, its slots, the device of the window's bookkeeping.
        shared: a `SharedBuffers` the cache's layers move into (`place`), or None to keep their own memory.
    """

    def __init__(self, cache, width: int, device: torch.device, shared: SharedBuffers | None = None):
        self.cache = cache
        self.real = torch.zeros(width, dtype=torch.bool, device=device)
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.stacked: torch.Tensor | None = None  # `place(stack=True)`
        self.shared = shared
        self.placed_in: int | None = None  # the `shared` generation its layers were placed in

    @property
    def width(self) -> int:
        """Slots of the cache."""
        return self.real.shape[0]

    @property
    def stale(self) -> bool:
        """Whether its layers are views of shared buffers that have since been replaced (it must not be used)."""
        return self.placed_in is not None and self.placed_in != self.shared.generation

    def place(self, stack: bool) -> None:
        """Once, after a first prefill initialised the cache's layers: with `stack`, moves them into one tensor
        (`stack_static_layers`) so that `keep` compacts with one gather; with `shared`, into the shared buffers.
        Every round over this window then reads the same addresses (moving the layers again would move them under
        graphs captured before)."""
        if self.placed_in is not None or (self.shared is None and (self.stacked is not None or not stack)):
            return
        layers = placeable(self.cache)
        if layers is None:
            return
        if stack:
            self.stacked = stack_static_layers(self.cache)
        if self.shared is None:
            return
        if self.stacked is not None:
            (self.stacked,) = self.shared.views([self.stacked], self.width)
            point_at_stacked(layers, self.stacked)
        else:
            share_layers(layers, self.shared, self.width)
        self.placed_in = self.shared.generation

    def load(self, real: torch.Tensor) -> None:
        """Starts a call: the cache holds `real.numel()` entries (the prompt), `real` marking the real ones."""
        self.real.zero_()
        self.real[: real.numel()] = real.to(self.real.device)
        self.length.fill_(real.numel())

    def visible(self, block_mask):
        width, block = self.real.shape[0], block_mask.shape[1]
        slots = torch.arange(width, device=self.real.device)
        offset = slots - self.length
        inside = (offset >= 0) & (offset < block)
        from_block = block_mask[:, offset.clamp(0, block - 1)] & inside[None, :]
        return (self.real & (slots < self.length))[None, :] | from_block

    def extend(self, block_real, count):
        rows = torch.arange(block_real.shape[0], device=self.real.device)
        self.real.index_copy_(0, self.length + rows, block_real.to(self.real.device).bool())
        self.length.add_(count)
        crop_kv(self.cache, self.length)

    def take(self, source: "FixedWindow") -> None:
        """Copies another window of the same width (cache entries, real slots, length) into this one's buffers."""
        copy_static_rows(source.cache, self.cache)
        self.real.copy_(source.real)
        self.length.copy_(source.length)

    def keep(self, nodes, count, stacked=None):
        compact_static_kv(self.cache, self.length, nodes, count, self.stacked if stacked is None else stacked)
        self.real.index_fill_(0, self.length + torch.arange(nodes.shape[0], device=self.real.device), True)
        self.length.add_(count)

    def rewind(self):
        crop_kv(self.cache, self.length)


class RowsWindow:
    """A `DynamicCache` of `B` rows, each with its own length (batched tree decoding, eager loop).

    Every round's tree is written at one shared offset, the cache's length `c = max(lengths)`; a row's slot `s` is
    visible to its own queries when it is real for that row (`real[b, s]`, False on left padding) and before the
    row's length, or when it is an ancestor in the row's tree. `keep` gathers each row's accepted tree entries to
    that row's own length. Slots at or past a row's length hold stale entries, masked by both checks.

    Args:
        cache: the target's `DynamicCache` holding the (left-padded) prompts, `n` entries per row.
        real: `(B, n)` bool, the prompts' real tokens.
    """

    def __init__(self, cache, real: torch.Tensor):
        self.cache = cache
        self.real = real.bool()
        self.lengths = torch.full((real.shape[0],), real.shape[1], dtype=torch.long, device=real.device)

    @property
    def length(self) -> int:
        """Entries the cache holds per row: the shared offset at which a round's tree is written."""
        return self.real.shape[1]

    def visible(self, block_mask):
        """`(B, q, length + m)` bool from `(B, q, m)` block masks."""
        slots = torch.arange(self.length, device=self.real.device)
        prefix = self.real & (slots[None, :] < self.lengths[:, None])
        prefix = prefix.to(block_mask.device)[:, None, :].expand(-1, block_mask.shape[1], -1)
        return torch.cat([prefix, block_mask], dim=2)

    def keep(self, nodes, count, stacked=None):
        """Of the tree block just written (at `length`), keeps row `b`'s entries `nodes[b, :count[b]]` at that row's
        own length (`nodes` `(B, P)`, `count` `(B,)`; a count of 0 keeps nothing)."""
        start, width = self.length, nodes.shape[1]
        old = self.lengths
        new = old + count.to(old.device)
        for layer in cache_layers(self.cache):
            keys, values = layer_tensors(layer)
            device = keys.device
            src = (nodes.to(device) + start)[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
            dst = (old.to(device)[:, None] + torch.arange(width, device=device))[:, None, :, None]
            dst = dst.expand(-1, keys.shape[1], -1, keys.shape[3])
            room = int(dst.max()) + 1 - keys.shape[2]
            if room > 0:  # a row's kept block may reach past the tree block (trees smaller than a path)
                pad = keys.new_zeros(*keys.shape[:2], room, keys.shape[3])
                keys, values = torch.cat([keys, pad], dim=2), torch.cat([values, pad], dim=2)
            kept_keys, kept_values = keys.gather(2, src), values.gather(2, src)
            set_layer_tensors(layer, keys.scatter(2, dst, kept_keys), values.scatter(2, dst, kept_values))
        width = int(new.max())
        slots = torch.arange(width, device=self.real.device)
        real = torch.zeros(self.real.shape[0], width, dtype=torch.bool, device=self.real.device)
        kept = min(width, self.length)
        real[:, :kept] = self.real[:, :kept] & (slots[None, :kept] < old[:, None])
        self.real = real | ((slots[None, :] >= old[:, None]) & (slots[None, :] < new[:, None]))
        self.lengths = new
        crop_kv(self.cache, width)

    def extend(self, block_real: torch.Tensor) -> None:
        """Keeps the `(B, q)` block just written at the shared offset for every row (a left-padded prefill block,
        `block_real` marking each row's real entries): every row's length becomes the offset plus `q` (the slots
        between a row's old length and the offset are not real for it, so they stay hidden)."""
        self.real = torch.cat([self.real, block_real.to(self.real.device).bool()], dim=1)
        self.lengths = torch.full_like(self.lengths, self.length)
        crop_kv(self.cache, self.length)

    def select(self, rows: torch.Tensor) -> None:
        """Keeps only the cache rows `rows` (`(B',)` indices), e.g. dropping finished rows."""
        for layer in cache_layers(self.cache):
            keys, values = layer_tensors(layer)
            index = rows.to(keys.device)
            set_layer_tensors(layer, keys.index_select(0, index), values.index_select(0, index))
        self.real = self.real.index_select(0, rows.to(self.real.device))
        self.lengths = self.lengths.index_select(0, rows.to(self.lengths.device))
        width = int(self.lengths.max())
        self.real = self.real[:, :width]
        crop_kv(self.cache, width)

    def rewind(self):
        crop_kv(self.cache, self.length)


class FixedRowsWindow:
    """`RowsWindow` over a `StaticCache` of `B` rows and `W` slots (the batched fast path): the lengths `(B,)` and
    the shared tree offset `()` (the longest row's length, where the static layers write) live on the device, masks
    span all `W` slots, so every shape is fixed and no step reads a device value on the host."""

    def __init__(self, cache, batch: int, width: int, device: torch.device, shared: SharedBuffers | None = None):
        self.cache = cache
        self.real = torch.zeros(batch, width, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.shared = shared  # as `FixedWindow`'s (a buffer per layer tensor: rows windows never stack)
        self.placed_in: int | None = None

    stacked = None
    stale = FixedWindow.stale

    def place(self) -> None:
        """Once its layers are initialised (a prefill, or rows moved in), moves them into `shared` (if any)."""
        FixedWindow.place(self, stack=False)

    def load(self, real: torch.Tensor) -> None:
        """Starts a call: the cache holds the `(B, n)` prompts, `real` marking their real tokens."""
        self.real.zero_()
        self.real[:, : real.shape[1]] = real.to(self.real.device)
        self.lengths.fill_(real.shape[1])
        self.length.fill_(real.shape[1])
        self.place()

    @property
    def width(self) -> int:
        """Slots of the cache (per row)."""
        return self.real.shape[1]

    def extend(self, block_real: torch.Tensor) -> None:
        """As `RowsWindow.extend`, in place on the static buffers (no host sync)."""
        slots = self.length + torch.arange(block_real.shape[1], device=self.real.device)
        self.real.index_copy_(1, slots, block_real.to(self.real.device).bool())
        self.length.add_(block_real.shape[1])
        self.lengths.copy_(self.length.expand_as(self.lengths))
        for layer in cache_layers(self.cache):
            set_static_write_position(layer, self.length)

    def take(self, source: "FixedRowsWindow", rows: torch.Tensor) -> None:
        """Copies the rows `rows` (`(B',)` indices) of another window of the same width into this one of `B'` rows:
        their cache entries, real slots and lengths; the shared offset becomes the longest of them."""
        copy_static_rows(source.cache, self.cache, rows)
        rows = rows.to(self.real.device)
        self.real.copy_(source.real.index_select(0, rows))
        self.lengths.copy_(source.lengths.index_select(0, rows))
        self.length.copy_(self.lengths.max())
        for layer in cache_layers(self.cache):
            set_static_write_position(layer, self.length)
        self.place()

    def visible(self, block_mask):
        """`(B, q, W)` bool from `(B, q, m)` block masks (the block written at the shared offset)."""
        width, block = self.real.shape[1], block_mask.shape[2]
        slots = torch.arange(width, device=self.real.device)
        offset = slots - self.length
        inside = (offset >= 0) & (offset < block)
        from_block = block_mask[:, :, offset.clamp(0, block - 1)] & inside[None, None, :]
        prefix = self.real & (slots[None, :] < self.lengths[:, None])
        return prefix[:, None, :] | from_block

    def keep(self, nodes, count, stacked=None):
        """As `RowsWindow.keep`, in place on the static buffers (no host sync)."""
        width = nodes.shape[1]
        old = self.lengths.clone()
        for layer in cache_layers(self.cache):
            keys, values = layer_tensors(layer)
            src = (nodes + self.length)[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
            dst = (old[:, None] + torch.arange(width, device=old.device))[:, None, :, None]
            dst = dst.clamp(max=keys.shape[2] - 1).expand(-1, keys.shape[1], -1, keys.shape[3])
            kept_keys, kept_values = keys.gather(2, src.to(keys.device)), values.gather(2, src.to(keys.device))
            keys.scatter_(2, dst.to(keys.device), kept_keys)
            values.scatter_(2, dst.to(keys.device), kept_values)
        self.lengths.add_(count)
        slots = torch.arange(self.real.shape[1], device=self.real.device)
        self.real |= (slots[None, :] >= old[:, None]) & (slots[None, :] < self.lengths[:, None])
        self.length.copy_(self.lengths.max())
        for layer in cache_layers(self.cache):
            set_static_write_position(layer, self.length)

    def rewind(self):
        crop_kv(self.cache, self.length)
