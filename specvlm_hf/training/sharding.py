"""`--shard-target`: the frozen target's language-model layers sharded over the processes of a run (FSDP2).

Under `accelerate launch --num_processes N ... --shard-target`, every process keeps 1/N of each decoder layer of
the target's language model (torch's `fully_shard`: one FSDP unit per decoder layer, one for the rest of the text
model). Just before a layer runs its weights are all-gathered, right after it they are freed again, so each
process runs the whole target on its own micro-batch, exactly as with a replicated target, while it holds only
its shard of the layers between them. Nothing of the target trains: there are no gradients to reduce.

Kept whole on every process (replicated, not sharded):

- the token embedding and the `lm_head`: the draft borrows both (it embeds tokens when it decodes, and the loss
  scores the draft's outputs and the teacher's features with the `lm_head`), so each process needs them whole;
- the vision tower and the projector: a process whose micro-batch has no image skips them, and a sharded module
  that one process runs and another skips leaves the collectives out of step (a hang). Vision towers are small
  next to the language model (CLIP ViT-L: 0.3 B parameters against LLaVA-1.5-7B's 6.7 B).

The draft is small and trains data-parallel (DDP), as without sharding.

Forwards of a sharded target are collective: every process has to run the same number of them. Training does
(one per micro-batch on every process, and all processes stop at the same step). Evaluation runs on the main
process only; `Lockstep` keeps the other processes in step with it: before each forward of the text model the
main process says so (an all-reduce of one number), and every other process runs a one-token forward alongside
it, which is all it takes to join the weight all-gathers.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from torch import nn

from ..target import target_text_config, text_model_of, unwrap_target


def _fully_shard():
    """torch's FSDP2 `fully_shard` (public since torch 2.6, `ignored_params` since 2.7), or a clear error."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            fully_shard = None
    if fully_shard is None or "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise RuntimeError(
            f"--shard-target needs FSDP2's `fully_shard` with `ignored_params` (torch >= 2.7); this is torch "
            f"{torch.__version__}. Upgrade torch, or train without --shard-target (the target is then replicated)."
        )
    return fully_shard


def decoder_layers(target: nn.Module) -> nn.ModuleList:
    """The decoder layers of the target's language model (what `shard_target` shards)."""
    text = text_model_of(target)
    layers = getattr(text, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(
            f"--shard-target: cannot find the decoder layers of {type(text).__name__} (expected a `.layers` "
            "ModuleList, as in transformers' Llama / Mistral / Qwen2 text models); train without --shard-target."
        )
    return layers


def is_sharded(target: nn.Module) -> bool:
    """True when `shard_target` has sharded `target`."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in text_model_of(target).parameters())


def shard_target(target: nn.Module, device: torch.device, world_size: int) -> dict:
    """Shards the decoder layers of `target`'s language model over the `world_size` processes of the default
    process group (in place), and moves everything else of the target, replicated, to `device`.

    `target` may sit on the CPU (each layer goes to `device` only when it is sharded, so a process never holds
    the whole target on the device). Returns `target_memory(target)`.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        raise RuntimeError(
            "--shard-target needs an initialised process group of several processes (accelerate launch)."
        )
    fully_shard = _fully_shard()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    if is_sharded(target):
        return target_memory(target)
    model = unwrap_target(target)
    text = text_model_of(target)
    layers = decoder_layers(target)
    borrowed = [
        m
        for m in (model.get_input_embeddings(), model.get_output_embeddings(), text.get_input_embeddings())
        if m is not None
    ]
    keep = {p for module in borrowed for p in module.parameters()}
    mesh = init_device_mesh(device.type, (world_size,))
    for layer in layers:
        # reshard_after_forward=True for every unit (the root included): the target never runs a backward
        fully_shard(
            layer, mesh=mesh, reshard_after_forward=True, ignored_params=keep & set(layer.parameters()) or None
        )
    fully_shard(text, mesh=mesh, reshard_after_forward=True, ignored_params=keep)
    # the rest (vision tower, projector, embedding, lm_head, their buffers) stays whole, on this process's device
    for module in target.modules():
        for name, param in module._parameters.items():
            if param is not None and not isinstance(param, DTensor) and param.device != device:
                param.data = param.data.to(device)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)
    return target_memory(target)


def target_memory(target: nn.Module) -> dict:
    """Bytes of the target's weights: `total` (the whole model), `sharded` (the sharded layers, whole),
    `replicated` (kept whole on every process) and `per_process` (what one process holds between layers:
    its shards + the replicated part). Without sharding, `per_process == total`."""
    from torch.distributed.tensor import DTensor

    sharded = local = replicated = 0
    for param in target.parameters():
        size = param.element_size()
        if isinstance(param, DTensor):
            sharded += param.numel() * size
            local += param.to_local().numel() * size
        else:
            replicated += param.numel() * size
    return {
        "total": sharded + replicated,
        "sharded": sharded,
        "replicated": replicated,
        "per_process": local + replicated,
    }


class Lockstep:
    """Keeps the processes' forwards of a sharded target in step while only one of them runs its own.

    The process with work runs it inside `lead()`; every other process calls `follow()`. Before each forward
    of the text model the leader adds 1 to an all-reduce that the followers join with 0; while the sum is
    positive the followers run a one-token forward (which joins the layers' all-gathers); when the leader is
    done it joins with 0 too and everyone returns. Any number of processes may lead at once.
    """

    def __init__(self, target: nn.Module, device: torch.device):
        self.text = text_model_of(target)
        self.device = device
        self.hidden_size = target_text_config(target).hidden_size
        self.dtype = unwrap_target(target).get_input_embeddings().weight.dtype
        self._leading = False
        self._dummy = False
        self.forwards = 0  # forwards this process ran for others (followed)

    def _vote(self, value: int) -> int:
        import torch.distributed as dist

        ballot = torch.tensor([float(value)], device=self.device)
        dist.all_reduce(ballot)
        return int(ballot.item())

    def _announce(self, module, args):
        if self._leading and not self._dummy:
            self._vote(1)

    @contextmanager
    def lead(self):
        """Run forwards of this process's own; the others follow. Returns once every process is done."""
        # prepend: before FSDP's own pre-forward hook (whose all-gather the followers must meet in step)
        handle = self.text.register_forward_pre_hook(self._announce, prepend=True)
        self._leading = True
        try:
            yield self
        finally:
            self._leading = False
            handle.remove()
            self.follow()

    @torch.no_grad()
    def follow(self) -> None:
        """Run a one-token forward each time a leading process runs one, until no process leads any more."""
        while self._vote(0) > 0:
            self._dummy = True
            try:
                embeds = torch.zeros(1, 1, self.hidden_size, dtype=self.dtype, device=self.device)
                self.text(inputs_embeds=embeds, use_cache=False)
            finally:
                self._dummy = False
            self.forwards += 1
