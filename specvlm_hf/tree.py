"""The draft tree: its data structure and the EAGLE-2 dynamic construction.

A round of tree decoding drafts a tree of candidate continuations rooted at the last token the target
produced, then verifies every node in one target forward. This module owns the tree itself:

- `DraftTree`: tokens, parents, depths, scores, the ancestor mask and the root-to-node paths;
- `build_dynamic_tree`: EAGLE-2's expand-then-rerank construction, driven by a `draft_step` callable so
  that it does not depend on how the draft model is run (eager, compiled, on CPU or GPU);
- `additive_mask`: a bool visibility matrix as the additive mask attention layers take.

Node 0 is always the root. Nodes are ordered so that a parent precedes its children and siblings
appear in descending draft score (verification visits them in that order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class DraftTree:
    """A draft tree of `T` nodes (node 0 is the root, the token the target produced last).

    Attributes:
        tokens: `(T,)` token id of each node.
        parents: `(T,)` index of each node's parent; `-1` for the root.
        depths: `(T,)` depth of each node (root 0).
        scores: `(T,)` cumulative draft log-probability of the path to each node (root 0).
        ancestor_mask: `(T, T)` bool, `[i, j]` is True when node j is node i or one of its ancestors.
        paths: `(T, D + 1)` node indices of the path from the root to each node, right-padded with `-1`
            (`D` is an upper bound on the depth, fixed for trees of one configuration).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    scores: torch.Tensor
    ancestor_mask: torch.Tensor
    paths: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[-1]

    @property
    def max_depth(self) -> int:
        """Upper bound on the depth (the deepest node may be shallower)."""
        return self.paths.shape[-1] - 1

    def row(self, index: int) -> "DraftTree":
        """Row `index` of a batch of trees (`stack_trees`)."""
        return DraftTree(*(getattr(self, name)[index] for name in _FIELDS))

    def children(self, node: int) -> list[int]:
        """Indices of the children of `node`, in descending draft score."""
        return (self.parents == node).nonzero().flatten().tolist()


_FIELDS = ("tokens", "parents", "depths", "scores", "ancestor_mask", "paths")


def stack_trees(trees: list[DraftTree]) -> DraftTree:
    """A batch of `B` trees of one configuration (same node count and depth bound) as one `DraftTree` whose
    fields have a leading batch dimension (`tokens` `(B, T)`, `ancestor_mask` `(B, T, T)`...)."""
    return DraftTree(*(torch.stack([getattr(tree, name) for tree in trees]) for name in _FIELDS))


def tree_from_parents(
    tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor | None = None, max_depth: int | None = None
) -> DraftTree:
    """Builds a `DraftTree` from per-node tokens and parent indices, on their device without host syncs.

    Args:
        tokens: `(T,)` token ids; node 0 is the root.
        parents: `(T,)` parent indices, `parents[0] == -1` and `parents[i] < i` for every other node.
        scores: optional `(T,)` cumulative draft scores (zeros when omitted).
        max_depth: an upper bound on the tree's depth (default `T - 1`); `paths` gets `max_depth + 1` columns,
            so a fixed bound gives fixed shapes.
    """
    num_nodes = tokens.shape[0]
    device = tokens.device
    parents = parents.to(device)
    if max_depth is None:
        max_depth = num_nodes - 1
        if not (
            parents[0] == -1
            and bool((parents[1:] < torch.arange(1, num_nodes, device=device)).all())
            and bool((parents[1:] >= 0).all())
        ):
            raise ValueError("tree parents must satisfy parents[0] == -1 and 0 <= parents[i] < i")
    index = torch.arange(num_nodes, device=device)
    ancestors = torch.eye(num_nodes, dtype=torch.bool, device=device)
    depths = torch.zeros(num_nodes, dtype=torch.long, device=device)
    current = parents.clone()
    for _ in range(max_depth):  # walk every node up to the root at once
        valid = current >= 0
        ancestors |= (index[None, :] == current[:, None]) & valid[:, None]
        depths += valid.long()
        current = torch.where(valid, parents[current.clamp(min=0)], current)
    # path to every node: its ancestors in index order (= depth order), padded with -1
    ordered = torch.where(ancestors, index[None, :], num_nodes).sort(dim=1).values[:, : max_depth + 1]
    if ordered.shape[1] < max_depth + 1:  # fewer nodes than the depth bound: still `max_depth + 1` columns
        ordered = torch.cat([ordered, ordered.new_full((num_nodes, max_depth + 1 - num_nodes), num_nodes)], dim=1)
    paths = torch.where(ordered < num_nodes, ordered, -1)
    if scores is None:
        scores = torch.zeros(num_nodes, device=device)
    return DraftTree(
        tokens=tokens, parents=parents, depths=depths, scores=scores, ancestor_mask=ancestors, paths=paths
    )


# draft_step(tokens (n,), parent_hidden (n, d), position (int), ancestor_mask (n, m))
#     -> (hidden (n, d), log_probs (n, V))
DraftStep = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def build_dynamic_tree(
    root_token: int | torch.Tensor,
    root_log_probs: torch.Tensor,
    root_hidden: torch.Tensor,
    draft_step: DraftStep,
    top_k: int = 10,
    depth: int = 7,
    total_tokens: int = 60,
    vocab_map: torch.Tensor | None = None,
) -> DraftTree:
    """EAGLE-2 dynamic draft tree.

    1. The root's `top_k` most likely next tokens become depth-1 candidates, scored by log-probability.
    2. `depth` times: the current frontier (at most `top_k` nodes) is run through the draft together;
       each proposes its `top_k` children, scored by the path's summed log-probability; every child is
       kept as a candidate and the global `top_k` children become the next frontier.
    3. The `total_tokens - 1` best candidates (score descending, earlier candidate first on ties, so a
       node never outranks its parent) are kept, re-sorted into creation order, and the root prepended.

    Args:
        root_token: the token the target produced last (node 0).
        root_log_probs: `(V,)` draft log-probabilities of the token after the root.
        root_hidden: `(d,)` draft hidden state that produced `root_log_probs`; it is the feature input
            paired with each depth-1 token when those are expanded.
        draft_step: runs the draft on `n` frontier nodes at once (see `DraftStep`). `ancestor_mask[i, j]`
            says whether frontier node i may attend to the j-th tree entry the draft has cached in this
            round (entries are appended in call order, `n` per call; the last `n` are the nodes
            themselves). The callable owns the draft's KV cache and positions; `position` is the tree
            depth of the nodes being run (1 for the depth-1 nodes).
        top_k, depth, total_tokens: EAGLE-2 hyper-parameters (paper: 10, 7, 60).
        vocab_map: for a draft with a reduced vocabulary, `(N,)` the token id of each of its `N` log-probability
            columns (`draft.draft_vocab`); None when the columns are the token ids.
    Returns:
        A `DraftTree` with at most `total_tokens` nodes.
    """
    if top_k < 1 or depth < 0 or total_tokens < 2:
        raise ValueError(f"need top_k >= 1, depth >= 0, total_tokens >= 2; got {top_k}, {depth}, {total_tokens}")
    device = root_log_probs.device
    vocab = root_log_probs.shape[-1]
    k = min(top_k, vocab)

    # candidate buffers (creation order); parent index -1 means "the root"
    first_scores, first_tokens = root_log_probs.float().topk(k)
    if vocab_map is not None:
        first_tokens = vocab_map[first_tokens]
    cand_tokens = [first_tokens]
    cand_scores = [first_scores]
    cand_parents = [torch.full((k,), -1, dtype=torch.long, device=device)]

    frontier_tokens = first_tokens  # (k,)
    frontier_scores = first_scores  # (k,)
    frontier_ids = torch.arange(k, device=device)  # candidate index of each frontier node
    frontier_hidden = root_hidden.unsqueeze(0).expand(k, -1)  # feature input paired with each node
    frontier_ancestors = torch.zeros(k, 0, dtype=torch.bool, device=device)
    num_candidates = k

    for level in range(1, depth + 1):
        n = frontier_tokens.shape[0]
        ancestor_mask = torch.cat([frontier_ancestors, torch.eye(n, dtype=torch.bool, device=device)], dim=1)
        hidden, log_probs = draft_step(frontier_tokens, frontier_hidden, level, ancestor_mask)
        child_logp, child_tokens = log_probs.float().topk(k, dim=-1)  # (n, k)
        if vocab_map is not None:
            child_tokens = vocab_map[child_tokens]
        child_scores = frontier_scores[:, None] + child_logp  # (n, k)
        child_parents = frontier_ids[:, None].expand(n, k)

        cand_tokens.append(child_tokens.flatten())
        cand_scores.append(child_scores.flatten())
        cand_parents.append(child_parents.flatten())

        best = child_scores.flatten().topk(min(k, n * k)).indices  # next frontier, best first
        parent_row = best // k
        frontier_tokens = child_tokens.flatten()[best]
        frontier_scores = child_scores.flatten()[best]
        frontier_ids = num_candidates + best
        frontier_hidden = hidden[parent_row]
        frontier_ancestors = ancestor_mask[parent_row]
        num_candidates += n * k

    tokens = torch.cat(cand_tokens)
    scores = torch.cat(cand_scores)
    parents = torch.cat(cand_parents)

    keep_count = min(total_tokens - 1, tokens.shape[0])
    order = torch.sort(scores, descending=True, stable=True).indices[:keep_count]
    keep = order.sort().values  # creation order: parents before children

    # remap candidate parent indices to node indices (root = node 0, kept candidate i -> node i + 1)
    node_of_candidate = torch.full((tokens.shape[0] + 1,), -2, dtype=torch.long, device=device)
    node_of_candidate[keep] = torch.arange(1, keep_count + 1, device=device)
    node_of_candidate[-1:].zero_()  # parent -1 (the root) indexes the last slot (no host value: graph-safe)
    node_parents = node_of_candidate[parents[keep]]  # a node never outranks its parent, so all are kept

    root = torch.as_tensor(root_token, dtype=torch.long, device=device).reshape(1)
    node_tokens = torch.cat([root, tokens[keep]])
    node_scores = torch.cat([torch.zeros(1, device=device), scores[keep]])
    node_parents = torch.cat([torch.full((1,), -1, dtype=torch.long, device=device), node_parents])
    return tree_from_parents(node_tokens, node_parents, node_scores, max_depth=depth + 1)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turns a bool visibility matrix into an additive mask (0 visible, dtype minimum hidden)."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)
