"""Lays out the weights (and biases) of projections that read one input (a layer's q/k/v, its gate/up) one after the
other in one storage, so that the fast path's compiles can read them as one matrix: one GEMM instead of three or two
(`hf_internals.join_adjacent_products`, on when `round.JOIN_PROJECTIONS` is set).

The modules stay what they are: each `nn.Linear` keeps its `Parameter` (the same object, so optimizers and hooks
still hold it), whose data becomes a view of the shared storage; values are unchanged, `state_dict` and
`save_pretrained` are too (transformers clones tensors that share a storage without overlapping when it saves).
Moving or casting the model (`.to(...)`) gives each weight a storage of its own again; the fast path lays them out
again before every call, and a compile that joined products is only ever run on weights laid out so.
"""

from __future__ import annotations

import torch
from torch import nn

# projections of one input, by the attribute names transformers' decoder layers give them
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def projection_groups(model: nn.Module) -> list[list[nn.Linear]]:
    """The groups of `GROUPS` in `model` whose weights (and biases) can share a storage: plain `nn.Linear`s of one
    input width, dtype and device, all with a bias or none, floating-point, contiguous, not on the meta device, not
    offloaded (accelerate hooks) and not sharded (DTensor)."""
    groups = []
    for module in model.modules():
        for names in GROUPS:
            members = [getattr(module, name, None) for name in names]
            if not all(_joinable(member) for member in members):
                continue
            if _compatible([m.weight for m in members]) and len({m.bias is None for m in members}) == 1:
                groups.append(members)
    return groups


def _joinable(module) -> bool:
    if type(module) is not nn.Linear or hasattr(module, "_hf_hook"):
        return False
    return all(
        type(tensor.data) is torch.Tensor
        and tensor.is_floating_point()
        and tensor.device.type != "meta"
        and tensor.is_contiguous()
        and tensor.dtype == module.weight.dtype
        and tensor.device == module.weight.device
        for tensor in (module.weight, module.bias)
        if tensor is not None
    )


def _compatible(weights: list[torch.Tensor]) -> bool:
    first = weights[0]
    return all(w.shape[1] == first.shape[1] and w.dtype == first.dtype and w.device == first.device for w in weights)


def adjacent(weights: list[torch.Tensor]) -> bool:
    """Whether the weights lie one after the other in one storage (as `join_projection_weights` leaves them)."""
    storage = weights[0].untyped_storage().data_ptr()
    offset = weights[0].storage_offset()
    for weight in weights:
        if weight.untyped_storage().data_ptr() != storage or weight.storage_offset() != offset:
            return False
        offset += weight.numel()
    return True


def join_projection_weights(model: nn.Module) -> int:
    """Lays out each group of `projection_groups(model)` in one storage (its biases, if any, in another; a no-op for
    groups already so). Returns how many groups were laid out anew."""
    laid_out = 0
    with torch.no_grad(), torch.inference_mode(False):  # plain tensors, usable outside inference mode
        for members in projection_groups(model):
            parts = [[member.weight for member in members]]
            parts += [[member.bias for member in members]] if members[0].bias is not None else []
            if all(adjacent(tensors) for tensors in parts):
                continue
            for tensors in parts:
                joined = torch.cat([tensor.data for tensor in tensors])
                start = 0
                for tensor in tensors:
                    tensor.data = joined[start : start + tensor.shape[0]]
                    start += tensor.shape[0]
            laid_out += 1
    return laid_out
