"""The package's own GPU kernels (Triton), each behind a custom op with a plain-torch fallback.

- `top_k_rows(x, k, fused=...)`: `x.topk(k, dim=-1)` (values in descending order, with their indices), as the draft
  tree takes it at every level (`tree.build_dynamic_trees`). Fused, it is the op `specvlm::top_k_rows`: one kernel
  whose programs each take the k largest of one chunk of a row (k rounds of a max and an arg-max in registers), and a
  second that merges a row's chunk candidates the same way. A round of the LLaVA-1.5-7B-shaped fast path takes the top
  10 of a (10, 32064) block of log-probabilities at 7 tree levels, of (1, 32064) at the root and of (1, 100) for each
  next frontier; torch's radix select spends 6-8 kernels on each, 47-52 us at the vocabulary's width on an H100, the
  op 9-11 us (`benchmarks/gpu_topk.py`, results/README.md). Ties go to the smaller index (torch leaves their order
  unspecified; no tree changes an output, since every tree is verified exactly); NaN ranks first, as in torch, and
  is returned as `inf`.
- `fp8_product(hidden, weight, scale, count)`: the fp8 draft head's logits (`draft.use_fp8_head`): the
  op `specvlm::fp8_product`, one kernel that reads the head's e4m3 rows once, converts them in registers and
  multiplies them with the hidden states as they are (bf16), then applies each row's scale. Against torch's
  row-scaled float8 GEMM, which needs the hidden states quantized first (a reduction and a cast), on an H100 at a
  tree level's 10 rows: 52 against 73 us at LLaVA's head, 203 against 232 at Qwen2.5-VL's, 367 against 408 at
  Gemma 3's (`benchmarks/fp8_head_triton.py`), and closer to the bf16 head (the hidden states are not rounded).

Each op is opaque to `torch.compile` (traced by a fake implementation) and CUDA graphs capture its kernels like any
others. They run on CUDA with Triton installed (torch's CUDA wheels bring it); tests run them on the CPU in Triton's
interpreter (`TRITON_INTERPRET=1`, set before Triton is imported). The switches below are read when a round is built,
and a round's compiled functions are keyed on what they chose (`choices`).
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import torch

# whether tree levels take their top k with `specvlm::top_k_rows` where it runs (else `torch.topk`)
FUSED = True
# whether the fp8 draft head multiplies with `specvlm::fp8_product` where it runs (else `torch._scaled_mm` with
# the hidden states quantized to e4m3 per row, `modeling_specvlm_draft.fp8_logits`)
FP8_KERNEL = True


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _runs_kernels(device: torch.device) -> bool:
    """CUDA; or the CPU under Triton's interpreter (`TRITON_INTERPRET=1`, set before Triton is imported: tests)."""
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def fused_top_k_usable(device: torch.device) -> bool:
    """Whether `top_k_rows(..., fused=True)` runs the custom op on `device` (else it falls back to `torch.topk`)."""
    return FUSED and _runs_kernels(device) and triton_available()


def fp8_kernel_usable(device: torch.device) -> bool:
    """Whether the fp8 draft head runs `fp8_product` on `device` (else `torch._scaled_mm`)."""
    return FP8_KERNEL and _runs_kernels(device) and triton_available()


def choices(device: torch.device) -> tuple[bool, bool]:
    """What a round built now on `device` runs (part of its fast path's key): the fused top-k, the fp8 head kernel."""
    return fused_top_k_usable(device), fp8_kernel_usable(device)


# ------------------------------------------------------------------------------------------------------- top-k
def top_k_rows(x: torch.Tensor, k: int, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`(values, indices)` of the `k` largest entries along the last dimension, values in descending order; ties
    to the smaller index when `fused`. `fused` takes effect where the kernels run (`fused_top_k_usable`)."""
    if not (fused and k <= x.shape[-1] and _runs_kernels(x.device) and _ops() is not None):
        return x.topk(k, dim=-1)
    rows = x.reshape(-1, x.shape[-1])
    values, indices = torch.ops.specvlm.top_k_rows(rows.contiguous(), k)
    return values.reshape(*x.shape[:-1], k), indices.reshape(*x.shape[:-1], k)


def chunk_width(rows: int, width: int) -> int:
    """Entries a program of the first kernel takes: about 256 programs in all, 256 to 4096 entries each."""
    per_program = max(1, -(-rows * width // 256))
    return min(4096, max(256, 1 << (per_program - 1).bit_length()))


def launch_top_k(x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor) -> None:
    """Runs the two kernels on a contiguous `(R, W)` `x` into `values` `(R, k)` (x's dtype) and `indices` `(R, k)`
    (int64): the custom op's body."""
    kernels = _kernels()
    rows, width = x.shape
    block = chunk_width(rows, width)
    chunks = -(-width // block)
    if chunks == 1:  # the chunk's picks are the row's
        kernels.chunk_top_k[(rows, 1)](x, values, indices, width, x.stride(0), K=k, BLOCK=block, FINAL=True)
        return
    cand_values = torch.empty(rows, chunks * k, dtype=torch.float32, device=x.device)
    cand_indices = torch.empty(rows, chunks * k, dtype=torch.int32, device=x.device)
    kernels.chunk_top_k[(rows, chunks)](
        x, cand_values, cand_indices, width, x.stride(0), K=k, BLOCK=block, FINAL=False
    )
    padded = 1 << (chunks * k - 1).bit_length()
    kernels.merge_top_k[(rows,)](cand_values, cand_indices, values, indices, width, N=chunks * k, NP=padded, K=k)


# ------------------------------------------------------------------------------------------------- fp8 head
FP8_ROWS = 16  # hidden-state rows a program multiplies (`tl.dot`'s smallest tile); more rows: more programs
FP8_COLUMNS = 32  # head rows a program reads (32, 64, 128 timed on an H100: 32 was fastest at every shape)


def fp8_product(hidden: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, count: int) -> torch.Tensor:
    """`hidden (m, d) @ (weight * scale.T)[:count].T` in float32, for `weight (n, d)` e4m3 rows with float32 scales
    `(1, n)`, `n >= count` (`modeling_specvlm_draft.fp8_rows_padded`); the hidden states in their own dtype."""
    _ops()
    return torch.ops.specvlm.fp8_product(hidden.contiguous(), weight, scale, count)


def launch_fp8(hidden, weight, scale, count: int, out: torch.Tensor) -> None:
    """The fp8 head kernel into `out` `(m, count)` float32: the custom op's body."""
    rows, width = hidden.shape
    grid = (-(-count // FP8_COLUMNS), -(-rows // FP8_ROWS))
    _kernels().fp8_head[grid](
        hidden, weight, scale, out, rows, count, hidden.stride(0), weight.stride(0), out.stride(0),
        HIDDEN=width, BLOCK_M=FP8_ROWS, BLOCK_N=FP8_COLUMNS, BLOCK_K=128,
        # the interpreter multiplies bf16 `tl.dot` operands as their raw bits; float32 hidden states stay float32
        FP32=os.environ.get("TRITON_INTERPRET") == "1" or hidden.dtype == torch.float32,
    )  # fmt: skip


# ------------------------------------------------------------------------------------- kernels and custom ops
_KERNELS = None
_OPS = False  # not yet registered; None: unavailable


def _kernels():
    """The Triton kernels, defined on first use (importing Triton is slow, and CPU installs may not have it)."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def chunk_top_k(x_ptr, values_ptr, indices_ptr, width, row_stride, K: tl.constexpr, BLOCK: tl.constexpr,
                    FINAL: tl.constexpr):  # fmt: skip
        row = tl.program_id(0)
        part = tl.program_id(1)
        parts = tl.num_programs(1)
        offs = part * BLOCK + tl.arange(0, BLOCK)
        inside = offs < width
        v = tl.load(x_ptr + row.to(tl.int64) * row_stride + offs, mask=inside, other=float("-inf")).to(tl.float32)
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
    def merge_top_k(cand_values_ptr, cand_indices_ptr, values_ptr, indices_ptr, width, N: tl.constexpr,
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

    @triton.jit
    def fp8_head(x_ptr, w_ptr, scale_ptr, out_ptr, rows, count, x_stride, w_stride, out_stride,
                 HIDDEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 FP32: tl.constexpr):  # fmt: skip
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # head rows
        m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # hidden-state rows
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for start in range(0, HIDDEN, BLOCK_K):  # the hidden size is a constant of the model: one compile a model
            k = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m[:, None] * x_stride + k[None, :], mask=(m[:, None] < rows) & (k[None, :] < HIDDEN))
            w_rows = n.to(tl.int64)[:, None] * w_stride  # (a 262k x 5376 head passes 2**31 bytes)
            w = tl.load(w_ptr + w_rows + k[None, :], mask=(n[:, None] < count) & (k[None, :] < HIDDEN))
            if FP32:
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
        scale = tl.load(scale_ptr + n, mask=n < count, other=0.0)
        acc = acc * scale[None, :]
        tl.store(out_ptr + m[:, None] * out_stride + n[None, :], acc, mask=(m[:, None] < rows) & (n[None, :] < count))

    _KERNELS = SimpleNamespace(chunk_top_k=chunk_top_k, merge_top_k=merge_top_k, fp8_head=fp8_head)
    return _KERNELS


def _ops():
    """Registers `torch.ops.specvlm.top_k_rows` and `.fp8_product` on first use (None without Triton)."""
    global _OPS
    if _OPS is not False:
        return _OPS
    if not triton_available():
        _OPS = None
        return _OPS

    @torch.library.custom_op("specvlm::top_k_rows", mutates_args=())
    def top_k_rows_op(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.empty(x.shape[0], k, dtype=x.dtype, device=x.device)
        indices = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
        launch_top_k(x, k, values, indices)
        return values, indices

    @top_k_rows_op.register_fake
    def _(x, k):
        return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.long)

    @torch.library.custom_op("specvlm::fp8_product", mutates_args=())
    def fp8_product_op(hidden: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, count: int) -> torch.Tensor:
        out = torch.empty(hidden.shape[0], count, dtype=torch.float32, device=hidden.device)
        launch_fp8(hidden, weight, scale, count, out)
        return out

    @fp8_product_op.register_fake
    def _(hidden, weight, scale, count):
        return hidden.new_empty(hidden.shape[0], count, dtype=torch.float32)

    _OPS = True
    return _OPS
