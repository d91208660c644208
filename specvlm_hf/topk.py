"""The k largest entries of each row, as the draft tree takes them at every level (`tree.build_dynamic_trees`).

`top_k_rows(x, k, fused=...)` is `x.topk(k, dim=-1)` (values sorted in descending order, with their indices). With
`fused` on a CUDA tensor (and Triton installed) it runs as one custom op, `specvlm::top_k_rows`, two Triton
kernels: each program takes the k largest of one chunk of a row (k rounds of a max and an arg-max in registers), and
a second kernel merges a row's chunk candidates the same way. A round of the LLaVA-1.5-7B-shaped fast path takes the
top 10 of a (10, 32064) block of log-probabilities at 7 tree levels, of (1, 32064) at the root and of (1, 100) for
each next frontier; torch's radix select spends 6-8 kernels and about 50 us on each (an H100 profile, 0.4 ms of a
9-10 ms round). The custom op is traceable by `torch.compile` (an opaque call with a fake implementation) and CUDA
graphs capture its kernels like any others.

Ties go to the smaller index (torch leaves their order unspecified; the tree does not depend on it for correctness:
any drafted tree is verified exactly). NaN counts as the largest value, as in torch, but is returned as `inf`.
"""

from __future__ import annotations

import importlib.util
import os

import torch

# whether the fast path takes each tree level's top k with the custom op (CUDA only; `SpeculativeRound` reads it
# when it is built, and the choice is part of what its compiled functions are keyed on)
FUSED = True


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _runs_kernels(device: torch.device) -> bool:
    """CUDA; or the CPU under Triton's interpreter (`TRITON_INTERPRET=1`, set before Triton is imported: tests)."""
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def fused_top_k_usable(device: torch.device) -> bool:
    """Whether `top_k_rows(..., fused=True)` runs the custom op on `device` (else it falls back to `torch.topk`)."""
    return FUSED and _runs_kernels(device) and triton_available()


def top_k_rows(x: torch.Tensor, k: int, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`(values, indices)` of the `k` largest entries along the last dimension, values in descending order; ties
    to the smaller index when `fused`. `fused` takes effect on CUDA tensors with Triton installed."""
    if not (fused and k <= x.shape[-1] and _runs_kernels(x.device) and _op() is not None):
        return x.topk(k, dim=-1)
    rows = x.reshape(-1, x.shape[-1])
    values, indices = _op()(rows.contiguous(), k)
    return values.reshape(*x.shape[:-1], k), indices.reshape(*x.shape[:-1], k)


def chunk_width(rows: int, width: int) -> int:
    """Entries a program of the first kernel takes: about 256 programs in all, 256 to 4096 entries each."""
    per_program = max(1, -(-rows * width // 256))
    return min(4096, max(256, 1 << (per_program - 1).bit_length()))


def launch(x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor) -> None:
    """Runs the two kernels on a contiguous `(R, W)` `x` into `values` `(R, k)` (x's dtype) and `indices` `(R, k)`
    (int64); the custom op's body (tests run it in Triton's CPU interpreter)."""
    kernels = _kernels()
    rows, width = x.shape
    block = chunk_width(rows, width)
    chunks = -(-width // block)
    if chunks == 1:  # the chunk's picks are the row's
        kernels.chunk[(rows, 1)](x, values, indices, width, x.stride(0), K=k, BLOCK=block, FINAL=True)
        return
    cand_values = torch.empty(rows, chunks * k, dtype=torch.float32, device=x.device)
    cand_indices = torch.empty(rows, chunks * k, dtype=torch.int32, device=x.device)
    kernels.chunk[(rows, chunks)](x, cand_values, cand_indices, width, x.stride(0), K=k, BLOCK=block, FINAL=False)
    padded = 1 << (chunks * k - 1).bit_length()
    kernels.merge[(rows,)](cand_values, cand_indices, values, indices, width, N=chunks * k, NP=padded, K=k)


_KERNELS = None
_OP = False  # not yet built; None: unavailable


def _kernels():
    """The Triton kernels, defined on first use (importing Triton is slow, and CPU installs may not have it)."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def chunk(x_ptr, values_ptr, indices_ptr, width, row_stride, K: tl.constexpr, BLOCK: tl.constexpr,
              FINAL: tl.constexpr):  # fmt: skip
        row = tl.program_id(0)
        part = tl.program_id(1)
        parts = tl.num_programs(1)
        offs = part * BLOCK + tl.arange(0, BLOCK)
        inside = offs < width
        v = tl.load(x_ptr + row * row_stride + offs, mask=inside, other=float("-inf")).to(tl.float32)
        v = tl.where(v == v, v, float("inf"))  # NaN ranks first, as in torch.topk
        alive = inside  # (2147483647 below: an index past every row, a pick when none is left)
        out = (row * parts + part) * K
        for i in tl.static_range(K):
            top = tl.max(tl.where(alive, v, float("-inf")), 0)
            pick = tl.min(tl.where(alive & (v == top), offs, 2147483647), 0)
            if FINAL:
                tl.store(values_ptr + out + i, top.to(values_ptr.dtype.element_ty))
                tl.store(indices_ptr + out + i, tl.minimum(pick, width - 1).to(tl.int64))
            else:
                tl.store(values_ptr + out + i, top)
                tl.store(indices_ptr + out + i, pick)
            alive = alive & (offs != pick)

    @triton.jit
    def merge(cand_values_ptr, cand_indices_ptr, values_ptr, indices_ptr, width, N: tl.constexpr,
              NP: tl.constexpr, K: tl.constexpr):  # fmt: skip
        row = tl.program_id(0)
        j = tl.arange(0, NP)
        inside = j < N
        v = tl.load(cand_values_ptr + row * N + j, mask=inside, other=float("-inf"))
        index = tl.load(cand_indices_ptr + row * N + j, mask=inside, other=2147483647)
        alive = inside & (index < width)  # a chunk's pick past its entries is no candidate
        for i in tl.static_range(K):
            top = tl.max(tl.where(alive, v, float("-inf")), 0)
            pick = tl.min(tl.where(alive & (v == top), index, 2147483647), 0)
            tl.store(values_ptr + row * K + i, top.to(values_ptr.dtype.element_ty))
            tl.store(indices_ptr + row * K + i, tl.minimum(pick, width - 1).to(tl.int64))
            alive = alive & (index != pick)

    class Kernels:
        pass

    Kernels.chunk, Kernels.merge = chunk, merge
    _KERNELS = Kernels
    return _KERNELS


def _op():
    """`torch.ops.specvlm.top_k_rows`, registered on first use; None without Triton. An opaque custom op with a
    fake implementation: `torch.compile` traces it by its shapes and calls it, and CUDA graphs capture its two
    kernels like any other."""
    global _OP
    if _OP is not False:
        return _OP
    if not triton_available():
        _OP = None
        return _OP

    @torch.library.custom_op("specvlm::top_k_rows", mutates_args=())
    def top_k_rows_op(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.empty(x.shape[0], k, dtype=x.dtype, device=x.device)
        indices = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
        launch(x, k, values, indices)
        return values, indices

    @top_k_rows_op.register_fake
    def _(x, k):
        return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.long)

    _OP = torch.ops.specvlm.top_k_rows
    return _OP
