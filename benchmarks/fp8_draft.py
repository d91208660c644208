"""An experiment for issue 13 (benchmarks only, not used by the package): a draft whose products read float8 weights.

A 7B-shaped round spends ~2.2 ms of its ~10 in the draft's products of ~10 rows (results/README.md, H100 profile),
each bound by reading its weight; e4m3 weights halve those bytes. `use_fp8_products(draft)` replaces the draft's
decoder-layer projections with `Fp8Linear`s (e4m3 weights with one scale per output row; each call quantizes its
input per row and runs `torch._scaled_mm`) and gives it an e4m3 copy of the `lm_head` rows it reads. The target is
untouched, so outputs stay exact; only the drafted tokens may change. `fc` stays as it is (the package reads the
draft's device and dtype from it). This changes the draft in place, for benchmark processes only.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def quantize_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and one float32 scale per row (`values ~= fp8 * scale`, the scales `(rows, 1)`)."""
    scale = values.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (values / scale).to(FP8), scale


def fp8_linear(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` for a 2-D `x` from e4m3 weights (`(out, in)`, scales `(1, out)`), `x` quantized per row here.
    On a GPU the row-wise scaled product gives bf16 (then cast to `x`'s dtype)."""
    x_fp8, x_scale = quantize_rows(x)
    out_dtype = torch.bfloat16 if x.is_cuda else x.dtype
    product = torch._scaled_mm(x_fp8, weight_fp8.t(), scale_a=x_scale, scale_b=weight_scale, out_dtype=out_dtype)
    return product.to(x.dtype)


class Fp8Linear(nn.Module):
    """An `nn.Linear`'s product from e4m3 weights (one scale per output row), bias added after."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", weight, persistent=False)
        self.register_buffer("weight_scale", scale.t().contiguous(), persistent=False)  # (1, out)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        product = fp8_linear(x.reshape(-1, self.in_features), self.weight_fp8, self.weight_scale)
        product = product.reshape(*x.shape[:-1], self.out_features)
        return product if self.bias is None else product + self.bias


def use_fp8_products(draft) -> int:
    """Makes a bound draft's layer projections and `lm_head` read e4m3 weights; returns how many products."""
    swapped = 0
    for owner in list(draft.model.modules()):
        for name, child in list(owner.named_children()):
            if type(child) is nn.Linear:
                if child.in_features % 16 or child.out_features % 16:
                    raise ValueError(f"{name}: fp8 products need widths that are multiples of 16")
                setattr(owner, name, Fp8Linear(child))
                swapped += 1
    head = draft._head_rows if draft._head_rows is not None else draft.get_output_embeddings().weight
    head_fp8, head_scale = quantize_rows(head.detach())
    head_scale = head_scale.t().contiguous()

    def lm_head(hidden_states: torch.Tensor) -> torch.Tensor:
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        return fp8_linear(rows, head_fp8, head_scale).reshape(*hidden_states.shape[:-1], -1)

    draft.lm_head = lm_head
    return swapped + 1
