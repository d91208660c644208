"""Which attention kernel the fast path's verify forward runs: the target's own, or one chosen for tree queries.

A verify forward asks attention of its `T` tree nodes (60 by default) over the target's whole static cache. The
fused kernels sdpa picks for a masked call (cuDNN on Hopper) give each head one thread block over all `T` queries,
so on an H200 a 7B shape's 32 heads keep 32 of 132 SMs busy while a round's attention reads the cache: the
profile put it at 1.07 ms a round, about 7x its bytes' read time (issue 13). The kernels here spread the cache over
more thread blocks instead:

- `SPLIT_KV` (`"specvlm_split_kv"`, registered with transformers' `AttentionInterface` on import): the cache in
  chunks of `CHUNK` slots, each chunk a batch entry of one fused kernel call that also returns the log-sum-exp of
  its scores (`hf_internals.attention_with_lse`; for batch 1 the chunks are views of the cache), the chunks merged
  by their log-sum-exps (the flash-decoding merge). On an H100 (7B shape) it beat cuDNN alone by 20-37 % at 1024-2048
  slots, but the compiled round around it was 0.3-1.2 ms slower (results/README.md), so it is not the default;
- `TREE` (`"specvlm_tree"`, registered on import): the package's Triton kernels (`kernels.tree_attention`): each
  program a block of up to 32 queries of one head over one slice of the cache, tiles no query of the block sees not
  read, and one merge kernel; two launches a layer, no copies around them (the op is opaque to the compiler). The
  fast path's default for the verify and the draft wherever the kernels run (CUDA), on sdpa models without logit
  softcapping whose heads are a power of two from 16 to 256 (`round.verify_attention_for`); on an H100 it took a
  LLaVA-1.5-7B-shaped round from 10.30 to 9.79 ms (results/README.md). Where the kernels do not run (a CPU without
  Triton's interpreter), the same through sdpa;
- `"flex_attention"`: transformers' own `flex_attention` forward with the same additive mask, whose compiled form
  for fewer than 128 queries is torch's flex *decoding* kernel (which splits the cache across thread blocks).

Any other name registered with transformers' `AttentionInterface` can be chosen too. Set `round.VERIFY_ATTENTION`
and `round.DRAFT_ATTENTION` (None: `TREE` where it runs, else the model's own attention, as every other forward;
`kernels.ATTENTION = False` keeps the models' own everywhere). Every choice computes the same attention; they differ
in rounding (fp32: ~1e-6), as sdpa's kernels differ from each other. `benchmarks/gpu_attention.py` times them
against each other on the 7B shape, `gpu_long_running.py --verify-attention NAME` a whole round.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from . import kernels
from .errors import UserError
from .hf_internals import attention_implementations, attention_with_lse, check_same_size

SPLIT_KV = "specvlm_split_kv"
TREE = "specvlm_tree"
# cache slots per chunk of `split_kv_attention`: fast-path widths (multiples of `round.LENGTH_BUCKET`) divide by it
CHUNK = 256


def additive_mask_of(name: str, module, query, attention_mask, dropout: float, kwargs: dict) -> torch.Tensor:
    """What the package's attention functions share: they compute plain softmax attention (refused for a layer with
    dropout, softcapping or sinks) through a `(B or 1, 1, q, W)` mask, returned additive (a bool mask, True: attend,
    becomes 0 / the query dtype's minimum)."""
    if dropout or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(
            f"{name} computes plain softmax attention without dropout, softcapping or sinks, which this layer "
            f"({type(module).__name__}) uses; set `specvlm_hf.round.VERIFY_ATTENTION = None`."
        )
    if attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
        raise ValueError(f"{name} needs the verify forward's 4-D attention mask, one for every head")
    if attention_mask.dtype == torch.bool:
        return torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min
        )
    return attention_mask


def split_kv_attention(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs
):
    """A transformers attention function (`AttentionInterface`): `query` `(B, H, q, d)`, `key` / `value`
    `(B, Hkv, W, d)` (grouped heads share a key head), `attention_mask` an additive `(B or 1, 1, q, W)` mask.
    Returns `((B, q, H, d), None)`. When `W` is not a multiple of `CHUNK`, one chunk covers the whole cache."""
    attention_mask = additive_mask_of(SPLIT_KV, module, query, attention_mask, dropout, kwargs)
    if attention_mask.dtype != query.dtype:  # the kernels add a bias of the query's dtype; keep "hidden" finite
        attention_mask = attention_mask.clamp(min=torch.finfo(query.dtype).min).to(query.dtype)
    batch, heads, queries, dim = query.shape
    key_heads, width = key.shape[1], key.shape[2]
    # key, value and mask share one width. Compiled with the cache width dynamic, each layer's cache and the mask carry
    # a size symbol of their own; sdpa's shape checks tie them into one, but the reshapes below relate them only
    # through nested floor divisions the shape solver cannot solve, so each layer added dozens of guards over
    # unrelated symbols, and tracing grew with the square of the layers (a 32-layer verify did not compile in 340 s
    # on an H100; on the CPU, 240 s against 78 s with these checks)
    check_same_size(value.shape[2], width, f"{SPLIT_KV}: the value's width differs from the key's")
    check_same_size(attention_mask.shape[-1], width, f"{SPLIT_KV}: the mask's width differs from the key's")
    group = heads // key_heads
    chunks = width // CHUNK if width % CHUNK == 0 else 1
    size = width // chunks
    scale = dim**-0.5 if scaling is None else scaling
    # a key head's query heads one after the other as rows (grouped heads read their key head once), and each chunk
    # of the cache a batch entry of its own: (B * chunks, Hkv, rows, d) queries over (B * chunks, Hkv, size, d)
    # keys. For batch 1 all of it is views of the cache (no copy): the chunks are its slot ranges.
    rows = group * queries
    chunked = (batch * chunks, key_heads, rows, dim)
    queries_by_chunk = query.reshape(batch, 1, key_heads, rows, dim).expand(batch, chunks, -1, -1, -1)

    def by_chunk(tensor):  # (B, Hkv, W, d) -> (B * chunks, Hkv, size, d), a view for batch 1
        return (
            tensor.reshape(batch, key_heads, chunks, size, dim)
            .transpose(1, 2)
            .reshape(chunked[0], key_heads, size, dim)
        )

    keys, values = by_chunk(key), by_chunk(value)
    mask = attention_mask[:, :, None].expand(-1, -1, group, -1, -1).reshape(-1, 1, rows, chunks, size)
    mask = mask.permute(0, 3, 1, 2, 4).expand(batch, chunks, key_heads, rows, size).reshape(*chunked[:3], size)
    partial, lse = attention_with_lse(queries_by_chunk.reshape(chunked), keys, values, mask, scale)
    # the chunks merged by their log-sum-exps (the flash-decoding merge); a chunk a row does not see (every score near
    # the mask's minimum) gets weight exp(its lse - the largest) = 0
    lse = lse.reshape(batch, chunks, key_heads, rows, 1)
    weights = torch.exp(lse - lse.amax(1, keepdim=True))
    output = (partial.reshape(batch, chunks, key_heads, rows, dim).float() * weights).sum(1) / weights.sum(1)
    output = output.to(query.dtype).reshape(batch, heads, queries, dim)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(SPLIT_KV, split_kv_attention)


def tree_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                   **kwargs):  # fmt: skip
    """A transformers attention function (`AttentionInterface`) over the package's kernels (`kernels.tree_attention`):
    `query` `(B, H, q, d)`, `key` / `value` `(B, Hkv, W, d)`, `attention_mask` an additive `(B or 1, 1, q, W)` mask
    (or a bool one, True: attend). Returns `((B, q, H, d), None)`."""
    attention_mask = additive_mask_of(TREE, module, query, attention_mask, dropout, kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    return kernels.tree_attention(query, key, value, attention_mask, scale), None


AttentionInterface.register(TREE, tree_attention)


def check_name(name: str | None, switch: str = "VERIFY_ATTENTION") -> None:
    """Refuses a `VERIFY_ATTENTION` (or `DRAFT_ATTENTION`) that no attention function is registered under."""
    if name is None:
        return
    known = attention_implementations()
    if name not in known:
        raise UserError(
            f"{switch}={name!r} is not an attention implementation registered with transformers' "
            f"AttentionInterface; use None (the target's own), {TREE!r}, {SPLIT_KV!r}, or one of {sorted(known)}."
        )
