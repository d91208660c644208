"""An experiment for issue 13 (benchmarks only, not used by the package): what one GEMM for q/k/v and one for
gate/up would give the fast-path round.

A 7B round's verify GEMMs run at 60 tree rows, where each 4096 x 4096 projection reads its weight at about 65 % of
the copy bandwidth (the H200 profile: 11.8 us each). One GEMM over the three projections' weights reads them in one
pass with more thread blocks. `fuse_projections(model)` lays each attention's q/k/v weights (and each MLP's gate/up
weights) out as one tensor, the old parameters' values copied into it and their memory released, and replaces the
projections with `SharedProjection`s that each compute the whole fused product and keep their own columns. In
eager mode that computes the product three times; in a compiled function `cse_pass` (an inductor post-grad pass)
merges the identical GEMMs into one, so the compiled round runs one GEMM and three views.

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


def _key(value):
    if isinstance(value, (list, tuple)):
        return tuple(_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _key(v)) for k, v in value.items()))
    if isinstance(value, torch.fx.Node):
        return ("node", value)
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return (type(value).__name__, value)


def cse_graph(graph: torch.fx.Graph) -> int:
    """Common-subexpression elimination on a functional graph, in place: a node computing what an earlier node
    computed (same op, same arguments) is replaced by it. Ops with side effects (mutable schemas), random ops, fresh
    buffers (`empty`) and values a later node writes in place are kept. Returns how many nodes were removed."""
    seen: dict = {}
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.is_impure():
            continue
        target = node.target
        tags = getattr(target, "tags", ())
        if torch.Tag.nondeterministic_seeded in tags or "empty" in str(target):
            continue  # random values, or a fresh buffer whose identity matters
        if any(user.is_impure() for user in node.users):
            continue  # written in place by a later node: two equal values are still two buffers
        key = (target, _key(node.args), _key(node.kwargs))
        earlier = seen.get(key)
        if earlier is None:
            seen[key] = node
            continue
        node.replace_all_uses_with(earlier)
        graph.erase_node(node)
        removed += 1
    return removed


try:
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class CSEPass(CustomGraphPass):
        removed = 0

        def __call__(self, graph: torch.fx.Graph) -> None:
            CSEPass.removed += cse_graph(graph)

        def uuid(self):
            import hashlib
            import inspect

            return hashlib.sha256(inspect.getsource(cse_graph).encode()).hexdigest()  # a changed pass recompiles

except ImportError:  # older torch: a plain callable (inductor then skips its FX graph cache)

    class CSEPass:  # type: ignore[no-redef]
        removed = 0

        def __call__(self, graph):
            CSEPass.removed += cse_graph(graph)


def install_cse_pass() -> None:
    """Runs `cse_graph` first in inductor's post-grad passes of every later compile in this process."""
    from torch._inductor import config

    config.post_grad_custom_pre_pass = CSEPass()
