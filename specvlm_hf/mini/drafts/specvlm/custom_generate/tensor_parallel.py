"""Tensor-parallel targets (transformers `tp_plan` under `torchrun`): every rank keeps the same sequence.

Under tensor parallelism every rank runs the same `generate` call over its shard of the target's weights: the
draft is replicated (each rank holds the whole draft and drafts the same tree from the same inputs), the target
verifies with its shard (its layers' collectives give every rank the same logits), and every rank reaches the
same acceptance. Nothing in the loop needs to know, except that ranks which drift apart (a different draft on
one rank, a different sampling seed) would go on feeding the target's collectives different trees: the target
would then return silently mixed results, or hang once the ranks stop at different lengths.

`RankAgreement` is the cheap check that turns this into a clear error: every round, each rank all-gathers the
length of its sequence and a running checksum of its tokens (two integers) over the target's tensor-parallel
group, and all ranks raise `TensorParallelDivergenceError`, naming the ranks that differ from the group's first,
at the first round where they disagree.
"""

from __future__ import annotations

import torch

from .hf_internals import tensor_parallel_mesh
from .target import unwrap_target

_MODULUS = (1 << 61) - 1  # a Mersenne prime: the checksum stays a non-negative int64


class TensorParallelDivergenceError(RuntimeError):
    """The ranks of a tensor-parallel target no longer hold the same sequence."""


class RankAgreement:
    """A running checksum of the tokens a `generate` call appended, compared across the ranks of the target's
    tensor-parallel group after each round.

    Args:
        mesh: the target's tensor-parallel device mesh (`tensor_parallel_mesh`).
        what: the decoding mode, for the error message.
    """

    def __init__(self, mesh, what: str = "tree"):
        import torch.distributed as dist

        self.dist = dist
        self.group = mesh.get_group()
        cuda = mesh.device_type == "cuda"  # NCCL gathers CUDA tensors, gloo CPU ones
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device(mesh.device_type)
        self.world = dist.get_world_size(self.group)
        self.what = what
        self.checksum = 0
        self.length = 0
        self.rounds = -1  # round 0: the prompt and the prefill's token

    @classmethod
    def for_target(cls, target, what: str = "tree") -> "RankAgreement | None":
        """The check for a target sharded by transformers' tensor parallelism over several ranks, else None."""
        mesh = tensor_parallel_mesh(unwrap_target(target))
        if mesh is None or mesh.size() < 2:
            return None
        return cls(mesh, what)

    @staticmethod
    def _fold(checksum: int, tokens) -> int:
        for token in tokens:
            checksum = (checksum * 1_000_003 + int(token) + 1) % _MODULUS
        return checksum

    def add(self, tokens) -> None:
        """Folds tokens appended to the sequence (the prompt first) into the checksum; no communication."""
        self.checksum = self._fold(self.checksum, tokens)
        self.length += len(tokens)

    def check(self, where: str = "round", pending=()) -> None:
        """All-gathers `(length, checksum)` of the sequence (followed by `pending` tokens not yet appended, e.g.
        chain-mode candidates) over the group; raises on every rank when any rank differs."""
        self.rounds += 1
        length, checksum = self.length + len(pending), self._fold(self.checksum, pending)
        mine = torch.tensor([length, checksum], dtype=torch.long, device=self.device)
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        self.dist.all_gather(everyone, mine, group=self.group)
        values = [tuple(int(v) for v in t.tolist()) for t in everyone]
        if all(v == values[0] for v in values):
            return
        ranks = [self.dist.get_global_rank(self.group, i) for i in range(self.world)]
        diverged = [f"rank {ranks[i]}" for i, v in enumerate(values) if v != values[0]]
        lengths = ", ".join(f"rank {r}: {v[0]}" for r, v in zip(ranks, values))
        raise TensorParallelDivergenceError(
            f"SpecVLM {self.what} decoding on a tensor-parallel target: {', '.join(diverged)} diverged from rank "
            f"{ranks[0]} at {where} {self.rounds} (round 0: the prompt and the prefill's token; this is rank "
            f"{self.dist.get_rank()}; sequence lengths: {lengths}; their token checksums differ). Every rank must "
            "run the same call: the same draft weights "
            "(load the same draft folder on every rank, or seed a fresh draft identically), the same inputs and "
            "generation settings, and, when sampling, the same random seed (`torch.manual_seed(...)` on every rank "
            "before `generate`)."
        )
