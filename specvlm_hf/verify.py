"""Verification of a draft tree against the target's scores: which nodes are accepted, and the next token.

Both rules keep the target's output exactly:

- `accept_greedy`: along every root-to-leaf path keep the longest prefix whose tokens equal the target's
  choice at their parent; take the best path; the next token is the target's choice after it. This is
  what plain greedy decoding would have produced, token for token.
- `accept_sampling`: the drafted tokens are deterministic (top-k), so each is a one-hot proposal. At each
  accepted node the children are tried in order: child x is accepted with probability
  p(x) / (remaining mass), where the remaining mass excludes the children already rejected; if none is
  accepted, the next token is drawn from p with every rejected child removed and renormalised. At a
  leaf the next token is drawn from p. This is recursive rejection sampling with one-hot proposals and
  samples exactly from the target's distribution.

The functions work on tensors of the tree's device and call `.tolist()` once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree import DraftTree


@dataclass
class Acceptance:
    """Result of verifying one tree.

    Attributes:
        nodes: accepted node indices, root first (the root is always accepted: it is the target's own
            token from the previous round).
        next_token: the token the target produces after the last accepted node (the "bonus" token when
            a whole path was accepted, the correction otherwise).
        tokens: the tokens the round adds: those of the accepted nodes after the root, then `next_token`.
    """

    nodes: list[int]
    next_token: int
    tokens: list[int]

    @property
    def num_accepted_drafts(self) -> int:
        """Accepted draft tokens, not counting the root."""
        return len(self.nodes) - 1


def accept_greedy(tree: DraftTree, target_scores: torch.Tensor) -> Acceptance:
    """Greedy verification (one device-to-host transfer).

    Args:
        tree: the draft tree, `T` nodes.
        target_scores: `(T, V)` target scores after the logits processors; row i scores the token that
            follows node i.
    """
    return to_host(tree, *greedy_path(tree, target_scores))


def greedy_path(tree: DraftTree, target_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The device half of `accept_greedy`: `(path (P,), length (), next_token ())`, where the first `length`
    entries of `path` are the accepted nodes (root first) and the rest padding (`P = tree.max_depth + 1`)."""
    choice = target_scores.argmax(dim=-1)  # (T,)
    matches = torch.ones_like(tree.tokens, dtype=torch.bool)
    matches[1:] = tree.tokens[1:] == choice[tree.parents[1:]]
    valid = tree.paths >= 0
    path_ok = matches[tree.paths.clamp(min=0)] & valid  # (T, D+1): path to each node
    accepted_len = path_ok.long().cumprod(dim=-1).sum(dim=-1)  # counts the root
    # index_select / gather with 1-element tensors: indexing with a 0-d tensor would read it on the host (a sync)
    best = accepted_len.argmax().reshape(1)
    path = tree.paths.index_select(0, best)[0].clamp(min=0)
    length = accepted_len.index_select(0, best)[0]
    return path, length, choice.index_select(0, path.gather(0, (length - 1).reshape(1)))[0]


def pack_acceptance(
    tree: DraftTree, path: torch.Tensor, length: torch.Tensor, next_token: torch.Tensor
) -> torch.Tensor:
    """One small device tensor holding an acceptance (length, next token, path, the path's tokens), so that a
    single transfer brings it to the host; `unpack_acceptance` reads it there. A batch of trees (`stack_trees`)
    with `(B, P)` paths and `(B,)` lengths and next tokens gives `(B, 2 + 2P)`."""
    path = path.clamp(min=0)
    return torch.cat([length[..., None], next_token[..., None], path, tree.tokens.gather(-1, path)], dim=-1)


def unpack_acceptance(packed: list) -> Acceptance | list[Acceptance]:
    """The `Acceptance` in a `pack_acceptance` result, as a host list (one per row for a batch)."""
    if packed and isinstance(packed[0], list):
        return [unpack_acceptance(row) for row in packed]
    length, next_token = packed[0], packed[1]
    width = (len(packed) - 2) // 2
    nodes = packed[2 : 2 + length]
    tokens = packed[2 + width + 1 : 2 + width + length] + [next_token]
    return Acceptance(nodes=nodes, next_token=next_token, tokens=tokens)


def to_host(tree: DraftTree, path: torch.Tensor, length: torch.Tensor, next_token: torch.Tensor) -> Acceptance:
    """Brings a device-side acceptance (`greedy_path` / `sampling_path`) to the host in one transfer."""
    return unpack_acceptance(pack_acceptance(tree, path, length, next_token).tolist())


def sibling_acceptance_probs(tree: DraftTree, target_probs: torch.Tensor) -> torch.Tensor:
    """Probability that each node is accepted, given that it is reached and its earlier siblings failed.

    For a child x of node p with earlier siblings S: p_p(x) / (1 - sum_{s in S} p_p(s)).

    Args:
        tree: the draft tree, `T` nodes (siblings ordered as they are tried).
        target_probs: `(T, V)` target probabilities; row i is the distribution after node i.
    Returns:
        `(T,)` acceptance probabilities (1 for the root).
    """
    num_nodes = tree.num_nodes
    probs = torch.ones(num_nodes, dtype=target_probs.dtype, device=target_probs.device)
    if num_nodes == 1:
        return probs
    parents = tree.parents[1:]
    own = target_probs[parents, tree.tokens[1:]]  # p_parent(x) for each non-root node
    # mass of the earlier siblings: a cumulative sum over nodes of the same parent, in node order
    same_parent = parents[:, None] == parents[None, :]
    earlier = torch.tril(same_parent, diagonal=-1)
    prior = (earlier.to(own.dtype) * own[None, :]).sum(dim=-1)
    remaining = (1.0 - prior).clamp(min=0.0)
    probs[1:] = torch.where(
        remaining > 0, (own / remaining.clamp(min=torch.finfo(own.dtype).tiny)).clamp(max=1.0), 0.0
    )
    return probs


def residual_distribution(probs: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """The target distribution with the rejected draft tokens removed and the rest renormalised.

    Args:
        probs: `(V,)` target probabilities at a node.
        rejected: `(V,)` bool, the tokens of the children rejected there.
    """
    residual = probs.masked_fill(rejected, 0.0)
    total = residual.sum()
    # only through rounding can every token have been drafted and rejected: fall back to p itself
    return torch.where(total > 0, residual / total.clamp(min=torch.finfo(probs.dtype).tiny), probs)


def accept_sampling(
    tree: DraftTree, target_probs: torch.Tensor, generator: torch.Generator | None = None
) -> Acceptance:
    """Lossless sampling verification of a deterministic (top-k) draft tree (one device-to-host transfer).

    Args:
        tree: the draft tree, `T` nodes, siblings in the order they are tried.
        target_probs: `(T, V)` target probabilities after the logits processors (temperature, top-k,
            top-p...); row i is the distribution of the token after node i.
        generator: optional torch generator for the uniforms and the final draw.
    """
    return to_host(tree, *sampling_path(tree, target_probs, generator))


def sampling_path(
    tree: DraftTree, target_probs: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The device half of `accept_sampling`: `(path (P,), length (), next_token ())` as in `greedy_path`."""
    device = target_probs.device
    num_nodes = tree.num_nodes
    accept_prob = sibling_acceptance_probs(tree, target_probs)
    uniforms = torch.rand(num_nodes, device=device, generator=generator, dtype=target_probs.dtype)
    accepted = uniforms < accept_prob  # (the root's entry is never read)

    # first accepted child of every node (num_nodes where none), then walk down from the root; 1-element index
    # tensors throughout (indexing with a 0-d tensor would read it on the host)
    candidate = torch.where(accepted[1:], torch.arange(1, num_nodes, device=device), num_nodes)
    first_child = torch.full((num_nodes + 1,), num_nodes, dtype=torch.long, device=device)
    if num_nodes > 1:
        first_child.scatter_reduce_(0, tree.parents[1:], candidate, reduce="amin")
    node = torch.zeros(1, dtype=torch.long, device=device)
    walk = [node]
    for _ in range(tree.max_depth):
        node = torch.where(node < num_nodes, first_child.index_select(0, node.clamp(max=num_nodes)), node)
        walk.append(node)
    walk = torch.cat(walk)
    length = (walk < num_nodes).sum()
    last = walk.gather(0, (length - 1).reshape(1))

    # every child of the last accepted node was rejected: draw from p there without them
    is_child = (tree.parents == last).long()
    rejected = torch.zeros(target_probs.shape[-1], dtype=torch.long, device=device)
    rejected = rejected.scatter_reduce(0, tree.tokens, is_child, reduce="amax").bool()
    distribution = residual_distribution(target_probs.index_select(0, last)[0], rejected)
    next_token = torch.multinomial(distribution, 1, generator=generator)[0]
    return walk.clamp(max=num_nodes - 1), length, next_token
