"""A Triton kernel for the verify forward's attention, as an experiment for `gpu_attention.py` (issue 13).

The tree's `L` queries (60 by default) of one head attend over a static cache of `W` slots through an additive mask
`(B or 1, 1, L, W)`. cuDNN gives each head one thread block (32 of an H100's 132 SMs for a 7B shape), and the
split-KV form built from torch's fused kernels lost in the round what it won alone (the views and the merge around
it). Here one launch computes every (head, slice of the cache) pair's partial softmax with the mask read in place,
skipping the tiles no query sees (the unused end of a length bucket), and one fused merge follows. Not in the
package: on an H100 (2026-12-06) it lost to cuDNN even launched alone (32.6-36.9 against 27.5 us at 1024 slots), and
inside a round compiled by inductor it did not compile ("initial value for `best` is of type fp32, but the then block
redefines it as fp64": the scale arrives as a 64-bit float there), so its round figures were eager kernels'.

    pip install -e ".[gpu-bench]"   # triton (torch's CUDA wheels already bring it)
    python benchmarks/tree_attention_triton.py   # checks the kernel against sdpa in Triton's CPU interpreter
"""

from __future__ import annotations

import os
import sys

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernel runs on the CPU

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _partial_attention(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, max_ptr, sum_ptr,
    heads, group, queries, width, scale,
    q_sb, q_sh, q_sl, k_sb, k_sh, k_sw, v_sb, v_sh, v_sw, m_sb, m_sl,
    DIM: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    piece, row = tl.program_id(0), tl.program_id(1)  # a slice of the cache; a (batch, head)
    batch, head = row // heads, row % heads
    key_head = head // group
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, DIM)
    q = tl.load(
        q_ptr + batch * q_sb + head * q_sh + rows[:, None] * q_sl + dims[None, :], mask=rows[:, None] < queries
    )
    best = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, DIM), tl.float32)
    start = piece * SPLIT
    for offset in range(0, SPLIT, BLOCK_N):  # slots past the cache: masked, so skipped
        slots = start + offset + tl.arange(0, BLOCK_N)
        inside = (rows[:, None] < queries) & (slots[None, :] < width)
        bias = tl.load(mask_ptr + batch * m_sb + rows[:, None] * m_sl + slots[None, :], mask=inside, other=-3.0e38)
        bias = bias.to(tl.float32)
        if tl.max(bias) > -1.0e30:  # some query sees a slot of this tile
            keys = tl.load(k_ptr + batch * k_sb + key_head * k_sh + slots[:, None] * k_sw + dims[None, :],
                           mask=slots[:, None] < width, other=0.0)  # fmt: skip
            if IEEE:
                scores = tl.dot(q, tl.trans(keys), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(keys))
            scores = scores * scale + bias
            new_best = tl.maximum(best, tl.max(scores, 1))
            weights = tl.exp(scores - new_best[:, None])
            shrink = tl.exp(best - new_best)
            total = total * shrink + tl.sum(weights, 1)
            values = tl.load(v_ptr + batch * v_sb + key_head * v_sh + slots[:, None] * v_sw + dims[None, :],
                             mask=slots[:, None] < width, other=0.0)  # fmt: skip
            if IEEE:
                acc = acc * shrink[:, None] + tl.dot(weights.to(values.dtype), values, input_precision="ieee")
            else:
                acc = acc * shrink[:, None] + tl.dot(weights.to(values.dtype), values)
            best = new_best
    pieces = tl.num_programs(0)
    base = (row * pieces + piece) * queries
    keep = rows < queries
    tl.store(max_ptr + base + rows, best, mask=keep)
    tl.store(sum_ptr + base + rows, total, mask=keep)
    tl.store(out_ptr + (base + rows[:, None]) * DIM + dims[None, :], acc, mask=keep[:, None])


def tree_attention(query, key, value, mask, scale: float | None = None, split: int = 256, block_n: int = 64):
    """`query` `(B, H, L, d)`, `key` / `value` `(B, Hkv, W, d)` (last dimension contiguous), `mask` additive
    `(B or 1, 1, L, W)`; returns `(B, H, L, d)` in the query's dtype."""
    batch, heads, queries, dim = query.shape
    key_heads, width = key.shape[1], key.shape[2]
    scale = dim**-0.5 if scale is None else scale
    pieces = triton.cdiv(width, split)
    partial = torch.empty(batch * heads, pieces, queries, dim, dtype=torch.float32, device=query.device)
    best = torch.empty(batch * heads, pieces, queries, dtype=torch.float32, device=query.device)
    total = torch.empty_like(best)
    mask_batch_stride = mask.stride(0) if mask.shape[0] > 1 else 0
    _partial_attention[(pieces, batch * heads)](
        query, key, value, mask, partial, best, total,
        heads, heads // key_heads, queries, width, scale,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        mask_batch_stride, mask.stride(2),
        DIM=dim, SPLIT=split, BLOCK_M=max(16, triton.next_power_of_2(queries)), BLOCK_N=block_n,
        IEEE=query.dtype == torch.float32,
    )  # fmt: skip
    weights = torch.exp(best - best.amax(1, keepdim=True))  # the slices merged by their maxima
    output = (partial * weights[..., None]).sum(1) / (total * weights).sum(1)[..., None]
    return output.reshape(batch, heads, queries, dim).to(query.dtype)


NAME = "specvlm_tree_triton"


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """`tree_attention` as a transformers attention function (`AttentionInterface`, registered as `NAME` by
    `register`), so that `round.VERIFY_ATTENTION = NAME` runs it in the fast path's verify forwards: returns
    `((B, L, H, d), None)`."""
    if dropout or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(f"{NAME} computes plain softmax attention (no dropout, softcapping or sinks)")
    if attention_mask.dtype == torch.bool:
        hidden = torch.finfo(query.dtype).min
        attention_mask = torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(~attention_mask, hidden)
    output = tree_attention(query, key, value, attention_mask, scaling)
    return output.transpose(1, 2).contiguous(), None


def register() -> str:
    """Registers `attention_forward` with transformers' `AttentionInterface` under `NAME` (returned)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
    return NAME


def check() -> int:
    """The kernel against sdpa on random cases (fp32; Triton's interpreter on the CPU): GQA, batches, whole
    slices no query sees, one mask for every row."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    failures = 0
    for batch, heads, key_heads, queries, width, split in [
        (1, 4, 4, 7, 96, 32),
        (2, 4, 2, 12, 64, 64),
        (1, 2, 1, 1, 40, 16),
        (3, 4, 4, 20, 128, 32),
    ]:
        q = torch.randn(batch, heads, queries, 16, generator=generator)
        k = torch.randn(batch, key_heads, width, 16, generator=generator)
        v = torch.randn(batch, key_heads, width, 16, generator=generator)
        visible = torch.rand(batch, 1, queries, width, generator=generator) < 0.4
        visible[..., : width // 3] = False  # slices no query sees
        visible[..., width // 2] = True
        mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
        for m in (mask, mask[:1]):
            expected = F.scaled_dot_product_attention(
                q, k.repeat_interleave(heads // key_heads, 1), v.repeat_interleave(heads // key_heads, 1), m
            )
            got = tree_attention(q, k, v, m, split=split, block_n=16)
            error = (got - expected).abs().max().item()
            ok = error < 1e-4
            failures += not ok
            print(f"B={batch} H={heads}/{key_heads} L={queries} W={width} split={split}: max error {error:.2e}")
    print("all equal" if not failures else f"{failures} failed")
    return failures


if __name__ == "__main__":
    sys.exit(1 if check() else 0)
