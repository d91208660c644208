"""An experiment for issue 13 (benchmarks only, not used by the package): what one GEMM for q/k/v and one for
gate/up would give the fast-path round.

A 7B round's verify GEMMs run at 60 tree rows, where each 4096 x 4096 projection reads its weight at about 65 % of
the copy bandwidth (the H200 profile: 11.8 us each). One GEMM over the three projections' weights reads them in one
pass with more thread blocks. `fuse_projections(model)` lays each attention's q/k/v weights (and each MLP's gate/up
weights) out as one tensor, the old parameters' values copied into it and their memory released, and replaces the
projections with `SharedProjection`s that each compute the whole fused product and keep their own columns. In
eager mode (and in any compile without the pass) that computes the product three times; the fast path's compiles
merge the identical GEMMs into one (`specvlm_hf.hf_internals.merge_repeated`, `round.MERGE_REPEATED`), so the
compiled round runs one GEMM and three views.

This changes the model in place (its parameters become views of one tensor each), so it is for benchmark processes
only; the package's fast path does not do it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SharedProjection(nn.Module):
    """Columns `[start, stop)` of `x @ weight.T (+ bias)`, where `weight` is shared by several projections."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, start: int, stop: int):
        super().__init__()
        self.weight, self.bias, self.start, self.stop = weight, bias, start, stop

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)[..., self.start : self.stop]


def _fuse(owner: nn.Module, names: tuple[str, ...]) -> bool:
    parts = [getattr(owner, name, None) for name in names]
    if not all(isinstance(p, nn.Linear) for p in parts):
        return False
    if len({p.in_features for p in parts}) != 1 or len({p.bias is None for p in parts}) != 1:
        return False
    weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
    bias = None
    if parts[0].bias is not None:
        bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
    start = 0
    for name, part in zip(names, parts):
        setattr(owner, name, SharedProjection(weight, bias, start, start + part.out_features))
        start += part.out_features
    return True


def fuse_projections(model: nn.Module) -> int:
    """Fuses every module's `q_proj`/`k_proj`/`v_proj` and `gate_proj`/`up_proj`; returns how many groups."""
    fused = 0
    for module in list(model.modules()):
        fused += _fuse(module, ("q_proj", "k_proj", "v_proj"))
        fused += _fuse(module, ("gate_proj", "up_proj"))
    return fused
