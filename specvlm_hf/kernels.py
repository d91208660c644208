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
- `tree_attention(query, key, value, mask, scale)`: softmax attention of a forward's few queries (a verify's tree
  nodes, a draft level's frontier) over a static cache through an additive mask, as the op `specvlm::tree_attention`
  (`verify_attention.TREE`; the fast path's default where the kernels run, `round.verify_attention_for`). sdpa's
  fused kernels give each head one thread block over every query and the whole cache (a 7B shape's 32 heads busy 32
  of an H100's 132 SMs: 27 us a layer at 1024 slots, 5x its bytes' read time). Here each program takes a block of
  up to 32 queries of one head over one slice of the cache, does not read the tiles its queries do not see (the
  unused end of a length bucket), and a second kernel merges the slices by their log-sum-exps into the `(B, q, H, d)`
  layout the attention layers reshape. The cache's width and the slicing are runtime arguments: a process compiles
  the kernels once for each query block size (16, 32), never at a new length bucket. On an H100 at 1024 / 2048 slots
  (`benchmarks/gpu_attention.py`): a verify's 60 queries 19.9 / 31.4 us against cuDNN's 27.5 / 51.2, a draft level's
  10 queries 14.0 / 18.3 against 26.4 / 47.0 (loops unrolled per tiling, which compiled at every new power of two of
  the width: 17.0 / 31.5 and 12.6 / 17.8).

Each op is opaque to `torch.compile` (traced by a fake implementation) and CUDA graphs capture its kernels like any
others. They run on NVIDIA GPUs of compute capability 8.0 or newer with Triton installed (torch's CUDA wheels bring
it; a round elsewhere takes torch's top-k and the model's attention: `kernels_fit`); tests run them on the CPU in
Triton's interpreter (`TRITON_INTERPRET=1`, set before Triton is imported). The switches below are read when a round
is built, and a round's compiled functions are keyed on what they chose (`choices`, which also registers the ops:
never for the first time inside a traced function, whose graph that would break).
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
# whether the fast path's verify and draft forwards run attention on `specvlm::tree_attention` where it runs
# (`round.verify_attention_for`: sdpa models without softcapping), else the models' own
ATTENTION = True


# looked up once: a lookup inside a function torch traces would break its graph
_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON


def _runs_kernels(device: torch.device) -> bool:
    """CUDA; or the CPU under Triton's interpreter (`TRITON_INTERPRET=1`, set before Triton is imported: tests)."""
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def kernels_fit(device: torch.device) -> bool:
    """Whether `device` is one the kernels are built for: an NVIDIA GPU of compute capability 8.0 or newer (their bf16
    products need it; they were measured on Hopper), or the CPU's interpreter. On older GPUs and on ROCm (untried) a
    round takes torch's top-k and the model's own attention instead of failing to compile. Asked when a round is
    built, not inside a function torch traces."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    return torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 0)


def fused_top_k_usable(device: torch.device) -> bool:
    """Whether a round on `device` takes its tree levels' top k with the custom op (else `torch.topk`)."""
    return FUSED and _runs_kernels(device) and triton_available() and kernels_fit(device)


def fp8_kernel_usable(device: torch.device) -> bool:
    """Whether the fp8 draft head runs `fp8_product` on `device` (else `torch._scaled_mm`)."""
    return FP8_KERNEL and _runs_kernels(device) and triton_available()


def attention_usable(device: torch.device) -> bool:
    """Whether `tree_attention` runs the custom op on `device` and the fast path uses it (`ATTENTION`)."""
    return ATTENTION and _runs_kernels(device) and triton_available() and kernels_fit(device)


def choices(device: torch.device) -> tuple[bool, bool, bool]:
    """What a round built now on `device` runs (part of its fast path's key): the fused top-k, the fp8 head kernel,
    the tree attention. Registers the custom ops it will call, now: registering them inside a function torch traces
    (the round's, compiled on its first call) would break its graph, and compiling it ahead of time would fail."""
    chosen = fused_top_k_usable(device), fp8_kernel_usable(device), attention_usable(device)
    if any(chosen):
        _ops()
    return chosen


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


# --------------------------------------------------------------------------------------------- tree attention
ATTENTION_ROWS = None  # queries a program takes; None: all of a forward's, up to 32 (16 at least: `tl.dot`'s tile)
ATTENTION_SLOTS = 64  # cache slots a program reads per step
ATTENTION_PROGRAMS = 256  # slices of the cache lengthen (2x at a time) until a call has at most this many programs
ATTENTION_STEPS = None  # steps a program takes (its slice is this many times ATTENTION_SLOTS); None: by the above
ATTENTION_BRANCH = False  # whether a tile no query sees skips its arithmetic too (else only its reads)
ATTENTION_WARPS = 4
# an additive mask entry at or below this hides its slot (transformers writes the dtype's minimum: -3.4e38 in
# bf16 / fp32); a tile of the cache whose every entry its queries hide is not read. Each hidden slot weighs exactly 0,
# as in sdpa. In fp16, whose minimum is -65504, half the minimum (`hidden_below`)
HIDDEN = -1.0e30


def hidden_below(dtype: torch.dtype) -> float:
    """The mask value at or below which a slot counts as hidden, for a mask of `dtype`."""
    return max(HIDDEN, torch.finfo(dtype).min / 2) if dtype.is_floating_point else HIDDEN


def attention_fits(head_dim: int) -> bool:
    """Whether the attention kernels take heads of `head_dim` (a power of two from 16 to 256: their tiles' width)."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def tree_attention(query, key, value, mask, scale: float) -> torch.Tensor:
    """Softmax attention `(B, q, H, d)` of `query` `(B, H, q, d)` over `key` / `value` `(B, Hkv, W, d)` (`H / Hkv`
    query heads share a key head), through an additive float `mask` `(B or 1, 1, q, W)`; scores scaled by `scale`.
    Equals sdpa up to rounding, except that a query that sees no slot at all gets zeros (sdpa: the mean of the
    values). Where the kernels do not run, the same through sdpa."""
    if not (_runs_kernels(query.device) and _ops() is not None):
        return reference_tree_attention(query, key, value, mask, scale)
    if not attention_fits(query.shape[-1]):
        raise ValueError(
            f"the package's attention kernels take heads of 16, 32, 64, 128 or 256, and this model's have "
            f"{query.shape[-1]}: set `specvlm_hf.round.VERIFY_ATTENTION` and `DRAFT_ATTENTION` to None (the default "
            f"picks the model's own attention for such heads)"
        )
    return torch.ops.specvlm.tree_attention(query, key, value, mask, float(scale))


def reference_tree_attention(query, key, value, mask, scale: float) -> torch.Tensor:
    """`tree_attention` through sdpa (torch's kernels): the fallback, and what tests compare the kernels with."""
    group = query.shape[1] // key.shape[1]
    if group > 1:
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    output = torch.nn.functional.scaled_dot_product_attention(query, key, value, mask.to(query.dtype), scale=scale)
    sees = (mask > hidden_below(mask.dtype)).any(-1, keepdim=True)  # (B or 1, 1, q, 1)
    return torch.where(sees, output, 0.0).transpose(1, 2).contiguous()


def attention_tiling(heads: int, queries: int, width: int) -> tuple[int, int]:
    """`(queries a program takes, steps of ATTENTION_SLOTS slots it reads)` for a call of `heads` (row, head) pairs:
    the cache splits into slices of `steps` tiles until a call has about ATTENTION_PROGRAMS programs (a slice reads at
    most 16 tiles). Only the queries a program takes are a compile-time constant of the kernels (16 or 32), so that a
    process compiles them once for every length bucket."""
    rows = ATTENTION_ROWS or min(32, max(16, 1 << (queries - 1).bit_length()))
    if ATTENTION_STEPS:
        return rows, ATTENTION_STEPS
    blocks, tiles = -(-queries // rows), -(-width // ATTENTION_SLOTS)
    slices = min(tiles, max(1, ATTENTION_PROGRAMS // (blocks * heads)))
    return rows, min(16, -(-tiles // slices))


def launch_tree_attention(query, key, value, mask, scale: float, out: torch.Tensor) -> None:
    """The two attention kernels into `out` `(B, q, H, d)` (the query's dtype): the custom op's body. The first
    kernel's programs are (query block, row and head, slice of the cache); the merge's are (query block, row and
    head), over every slice. The cache's width, the query count and the tiling are arguments, not constants: a new
    length bucket compiles nothing."""
    kernels = _kernels()
    batch, heads, queries, dim = query.shape
    key_heads, width = key.shape[1], key.shape[2]
    block_rows, steps = attention_tiling(batch * heads, queries, width)
    blocks = -(-queries // block_rows)
    slices = -(-width // (steps * ATTENTION_SLOTS))
    rows = blocks * block_rows
    # per slice: its output (unnormalized), its rows' largest score and their sum of exponentials
    partial = torch.empty(batch * heads, slices, rows, dim, dtype=torch.float32, device=query.device)
    stats = torch.empty(2, batch * heads, slices, rows, dtype=torch.float32, device=query.device)
    mask_batch = mask.stride(0) if mask.shape[0] > 1 else 0
    hidden_at, totals = hidden_below(mask.dtype), stats[1].numel()  # (`totals`: where the sums of exponentials start)
    kernels.attention_slices[(blocks, batch * heads, slices)](
        query, key, value, mask, partial, stats, totals, heads, heads // key_heads, queries, width, steps, scale,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), mask_batch, mask.stride(2),
        DIM=dim, BLOCK_M=block_rows, BLOCK_N=ATTENTION_SLOTS, HIDDEN_AT=hidden_at,
        BRANCH=ATTENTION_BRANCH, num_warps=ATTENTION_WARPS,
        # the interpreter multiplies bf16 `tl.dot` operands as their raw bits
        FP32=os.environ.get("TRITON_INTERPRET") == "1" or query.dtype == torch.float32,
    )  # fmt: skip
    kernels.merge_slices[(blocks, batch * heads)](
        partial, stats, out, heads, queries, slices, totals,
        DIM=dim, BLOCK_M=block_rows, HIDDEN_AT=hidden_at,
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

    # (the cache's width, the query count and the slicing vary between calls: not specialized on (Triton would compile
    # again for a value of 1), so that they compile nothing new)
    @triton.jit(do_not_specialize=["totals", "queries", "width", "steps"])
    def attention_slices(q_ptr, k_ptr, v_ptr, mask_ptr, partial_ptr, stats_ptr, totals, heads, group, queries, width,
                         steps, scale, q_sb, q_sh, q_sl, k_sb, k_sh, k_sw, v_sb, v_sh, v_sw, m_sb, m_sl,
                         DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HIDDEN_AT: tl.constexpr,
                         BRANCH: tl.constexpr, FP32: tl.constexpr):  # fmt: skip
        block, row, piece = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        batch, head = row // heads, row % heads
        key_head = head // group
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, DIM)
        live = rows < queries
        q = tl.load(q_ptr + batch.to(tl.int64) * q_sb + head * q_sh + rows[:, None] * q_sl + dims[None, :],
                    mask=live[:, None], other=0.0)  # fmt: skip
        if FP32:
            q = q.to(tl.float32)
        k_base = k_ptr + batch.to(tl.int64) * k_sb + key_head.to(tl.int64) * k_sh
        v_base = v_ptr + batch.to(tl.int64) * v_sb + key_head.to(tl.int64) * v_sh
        m_base = mask_ptr + batch.to(tl.int64) * m_sb + rows[:, None].to(tl.int64) * m_sl
        best = tl.full((BLOCK_M,), HIDDEN_AT, tl.float32)  # a hidden slot's score stays below it: weight 0
        total = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, DIM), tl.float32)
        for step in range(steps):  # (the last slice may pass the cache: those tiles are skipped)
            slots = (piece * steps + step) * BLOCK_N + tl.arange(0, BLOCK_N)
            inside = slots < width
            bias = tl.load(m_base + slots[None, :], mask=live[:, None] & inside[None, :], other=float("-inf"))
            bias = bias.to(tl.float32)
            seen = tl.max(tl.max(bias, 1), 0) > HIDDEN_AT  # some query of the block sees a slot of this tile
            k_ptrs = k_base + slots[:, None].to(tl.int64) * k_sw + dims[None, :]
            v_ptrs = v_base + slots[:, None].to(tl.int64) * v_sw + dims[None, :]
            # a tile no query sees is not read (its loads are masked off), and its update (weights 0, shrink 1)
            # changes nothing; BRANCH skips its arithmetic too, at the price of a branch between the mask's load and
            # the cache's
            if BRANCH:
                go = seen
            else:
                go = True
            if go:
                read = slots[:, None] < tl.where(seen, width, 0)  # inside the cache, and a tile some query sees
                keys = tl.load(k_ptrs, mask=read, other=0.0)
                values = tl.load(v_ptrs, mask=read, other=0.0)
                if FP32:
                    scores = tl.dot(q, tl.trans(keys.to(tl.float32)), input_precision="ieee")
                else:
                    scores = tl.dot(q, tl.trans(keys))
                scores = scores * scale + bias
                new_best = tl.maximum(best, tl.max(scores, 1))
                weights = tl.exp(scores - new_best[:, None])
                shrink = tl.exp(best - new_best)
                total = total * shrink + tl.sum(weights, 1)
                if FP32:
                    update = tl.dot(weights, values.to(tl.float32), input_precision="ieee")
                else:
                    update = tl.dot(weights.to(values.dtype), values)
                acc = acc * shrink[:, None] + update
                best = new_best
        line = (row * tl.num_programs(2) + piece) * (tl.num_programs(0) * BLOCK_M) + rows  # this slice's rows
        tl.store(partial_ptr + line.to(tl.int64)[:, None] * DIM + dims[None, :], acc)
        tl.store(stats_ptr + line, best)
        tl.store(stats_ptr + totals + line, total)

    @triton.jit(do_not_specialize=["queries", "slices", "totals"])
    def merge_slices(partial_ptr, stats_ptr, out_ptr, heads, queries, slices, totals, DIM: tl.constexpr,
                     BLOCK_M: tl.constexpr, HIDDEN_AT: tl.constexpr):  # fmt: skip
        block, row = tl.program_id(0), tl.program_id(1)
        padded = tl.num_programs(0) * BLOCK_M
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, DIM)
        first = row * slices * padded + rows
        best = tl.full((BLOCK_M,), HIDDEN_AT, tl.float32)
        for piece in range(slices):
            best = tl.maximum(best, tl.load(stats_ptr + first + piece * padded))
        total = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, DIM), tl.float32)
        for piece in range(slices):
            line = first + piece * padded
            weight = tl.exp(tl.load(stats_ptr + line) - best)
            total += tl.load(stats_ptr + totals + line) * weight
            acc += tl.load(partial_ptr + line.to(tl.int64)[:, None] * DIM + dims[None, :]) * weight[:, None]
        output = tl.where(total[:, None] > 0, acc / tl.where(total > 0, total, 1.0)[:, None], 0.0)
        batch, head = row // heads, row % heads
        out_rows = (batch.to(tl.int64) * queries + rows) * heads + head
        tl.store(out_ptr + out_rows[:, None] * DIM + dims[None, :], output.to(out_ptr.dtype.element_ty),
                 mask=(rows < queries)[:, None])  # fmt: skip

    _KERNELS = SimpleNamespace(chunk_top_k=chunk_top_k, merge_top_k=merge_top_k, fp8_head=fp8_head,
                               attention_slices=attention_slices, merge_slices=merge_slices)  # fmt: skip
    return _KERNELS


def _ops():
    """Registers `torch.ops.specvlm.top_k_rows`, `.fp8_product` and `.tree_attention` on first use (None without
    Triton)."""
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

    @torch.library.custom_op("specvlm::tree_attention", mutates_args=())
    def tree_attention_op(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
    ) -> torch.Tensor:
        batch, heads, queries, dim = query.shape
        out = torch.empty(batch, queries, heads, dim, dtype=query.dtype, device=query.device)
        # the kernels take any strides but the last (the static caches and the verify's mask already have it)
        query, key, value, mask = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value, mask))
        launch_tree_attention(query, key, value, mask, scale, out)
        return out

    @tree_attention_op.register_fake
    def _(query, key, value, mask, scale):
        batch, heads, queries, dim = query.shape
        return query.new_empty(batch, queries, heads, dim)

    _OPS = True
    return _OPS
