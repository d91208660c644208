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

from .kernels import top_k_rows


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
        tokens: `(T,)` token ids; node 0 is the root. A batch of trees: `(B, T)` (every field gets a leading batch
            dimension, as `stack_trees` gives).
        parents: `(T,)` (or `(B, T)`) parent indices, `parents[0] == -1` and `parents[i] < i` for every other node.
        scores: optional `(T,)` (or `(B, T)`) cumulative draft scores (zeros when omitted).
        max_depth: an upper bound on the tree's depth (default `T - 1`); `paths` gets `max_depth + 1` columns,
            so a fixed bound gives fixed shapes.
    """
    num_nodes = tokens.shape[-1]
    device = tokens.device
    parents = parents.to(device)
    if max_depth is None:
        max_depth = num_nodes - 1
        later = parents[..., 1:] < torch.arange(1, num_nodes, device=device)
        if not (bool((parents[..., 0] == -1).all()) and bool(later.all()) and bool((parents[..., 1:] >= 0).all())):
            raise ValueError("tree parents must satisfy parents[0] == -1 and 0 <= parents[i] < i")
    batched = tokens.dim() == 2
    if not batched:
        tokens, parents = tokens[None], parents[None]
        scores = None if scores is None else scores[None]
    batch = tokens.shape[0]
    index = torch.arange(num_nodes, device=device)
    ancestors = torch.eye(num_nodes, dtype=torch.bool, device=device).expand(batch, -1, -1).clone()
    depths = torch.zeros(batch, num_nodes, dtype=torch.long, device=device)
    current = parents.clone()
    for _ in range(max_depth):  # walk every node up to the root at once
        valid = current >= 0
        ancestors |= (index[None, None, :] == current[:, :, None]) & valid[:, :, None]
        depths += valid.long()
        current = torch.where(valid, parents.gather(1, current.clamp(min=0)), current)
    # path to every node: its ancestors in index order (= depth order), padded with -1
    ordered = torch.where(ancestors, index, num_nodes).sort(dim=-1).values[..., : max_depth + 1]
    if ordered.shape[-1] < max_depth + 1:  # fewer nodes than the depth bound: still `max_depth + 1` columns
        ordered = torch.cat([ordered, ordered.new_full((batch, num_nodes, max_depth + 1 - num_nodes), num_nodes)], -1)
    paths = torch.where(ordered < num_nodes, ordered, -1)
    if scores is None:
        scores = torch.zeros(batch, num_nodes, device=device)
    tree = DraftTree(
        tokens=tokens, parents=parents, depths=depths, scores=scores, ancestor_mask=ancestors, paths=paths
    )
    return tree if batched else tree.row(0)


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
    fused_top_k: bool = False,
) -> DraftTree:
    """EAGLE-2 dynamic draft tree.

    1. The root's `top_k` most likely next tokens become depth-1 candidates, scored by log-probability.
    2. `depth` times: the current frontier (at most `top_k` nodes) is run through the draft together;
       each proposes its `top_k` children, scored by the path's summed log-probability; every child is
       kept as a candidate and the global `top_k` children become the next frontier.
    3. The `total_tokens - 1` best candidates (score descending, earlier candidate first on ties, so a
       node never outranks its parent) are kept, re-sorted into creation order, and the root prepended.

    One tree: the one-row case of `build_dynamic_trees` (the same construction).

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
        fused_top_k: take each level's top-k with `kernels.top_k_rows`' custom op (CUDA; ties to the smaller index).
    Returns:
        A `DraftTree` with at most `total_tokens` nodes.
    """

    def one_row(tokens, parent_hidden, level, ancestor_mask):
        hidden, log_probs = draft_step(tokens[0], parent_hidden[0], level, ancestor_mask[0])
        return hidden[None], log_probs[None]

    root = torch.as_tensor(root_token, dtype=torch.long, device=root_log_probs.device).reshape(1)
    trees = build_dynamic_trees(
        root, root_log_probs[None], root_hidden[None], one_row, top_k, depth, total_tokens, vocab_map, fused_top_k
    )
    return trees.row(0)


@torch.no_grad()
def build_dynamic_trees(
    root_tokens: torch.Tensor,
    root_log_probs: torch.Tensor,
    root_hidden: torch.Tensor,
    draft_step,
    top_k: int = 10,
    depth: int = 7,
    total_tokens: int = 60,
    vocab_map: torch.Tensor | None = None,
    fused_top_k: bool = False,
) -> DraftTree:
    """`build_dynamic_tree` for `B` rows at once: each row's tree is built from its own root as one tree is, and
    every level runs the draft once over all rows' frontiers (`draft_step` on `(B, n)` tokens, `(B, n, d)` features
    and a `(B, n, m)` ancestor mask, returning `(B, n, d)` hidden states and `(B, n, V)` log-probabilities).

    Args:
        root_tokens: `(B,)` each row's root token; root_log_probs: `(B, V)`; root_hidden: `(B, d)`.
        draft_step, top_k, depth, total_tokens, vocab_map, fused_top_k: as for `build_dynamic_tree`.
    Returns:
        A batch of `B` trees (`stack_trees` layout: fields with a leading batch dimension).
    """
    if top_k < 1 or depth < 0 or total_tokens < 2:
        raise ValueError(f"need top_k >= 1, depth >= 0, total_tokens >= 2; got {top_k}, {depth}, {total_tokens}")
    device = root_log_probs.device
    batch, vocab = root_log_probs.shape
    k = min(top_k, vocab)

    # candidate buffers (creation order); parent index -1 means "the root"
    first_scores, first_tokens = top_k_rows(root_log_probs.float(), k, fused_top_k)  # (B, k)
    if vocab_map is not None:
        first_tokens = vocab_map[first_tokens]
    cand_tokens = [first_tokens]
    cand_scores = [first_scores]
    cand_parents = [torch.full((batch, k), -1, dtype=torch.long, device=device)]

    frontier_tokens = first_tokens  # (B, k)
    frontier_scores = first_scores  # (B, k)
    frontier_ids = torch.arange(k, device=device).expand(batch, k)  # candidate index of each frontier node
    frontier_hidden = root_hidden.unsqueeze(1).expand(-1, k, -1)  # feature input paired with each node
    frontier_ancestors = torch.zeros(batch, k, 0, dtype=torch.bool, device=device)
    num_candidates = k

    for level in range(1, depth + 1):
        n = frontier_tokens.shape[1]
        eye = torch.eye(n, dtype=torch.bool, device=device).expand(batch, -1, -1)
        ancestor_mask = torch.cat([frontier_ancestors, eye], dim=2)
        hidden, log_probs = draft_step(frontier_tokens, frontier_hidden, level, ancestor_mask)
        child_logp, child_tokens = top_k_rows(log_probs.float(), k, fused_top_k)  # (B, n, k)
        if vocab_map is not None:
            child_tokens = vocab_map[child_tokens]
        child_scores = frontier_scores[:, :, None] + child_logp  # (B, n, k)
        child_parents = frontier_ids[:, :, None].expand(batch, n, k)

        cand_tokens.append(child_tokens.flatten(1))
        cand_scores.append(child_scores.flatten(1))
        cand_parents.append(child_parents.flatten(1))

        best = top_k_rows(child_scores.flatten(1), min(k, n * k), fused_top_k)[1]  # next frontier, best first
        parent_row = best // k
        frontier_tokens = child_tokens.flatten(1).gather(1, best)
        frontier_scores = child_scores.flatten(1).gather(1, best)
        frontier_ids = num_candidates + best
        frontier_hidden = hidden.gather(1, parent_row[:, :, None].expand(-1, -1, hidden.shape[-1]))
        frontier_ancestors = ancestor_mask.gather(1, parent_row[:, :, None].expand(-1, -1, ancestor_mask.shape[-1]))
        num_candidates += n * k

    tokens = torch.cat(cand_tokens, dim=1)
    scores = torch.cat(cand_scores, dim=1)
    parents = torch.cat(cand_parents, dim=1)
    candidates = tokens.shape[1]

    keep_count = min(total_tokens - 1, candidates)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :keep_count]
    keep = order.sort(dim=-1).values  # creation order: parents before children

    # remap candidate parent indices to node indices (root = node 0, kept candidate i -> node i + 1)
    node_of_candidate = torch.full((batch, candidates + 1), -2, dtype=torch.long, device=device)
    nodes = torch.arange(1, keep_count + 1, device=device).expand(batch, -1)
    node_of_candidate.scatter_(1, keep, nodes)
    node_of_candidate[:, -1:].zero_()  # parent -1 (the root) indexes the last slot (no host value: graph-safe)
    kept_parents = parents.gather(1, keep).remainder(candidates + 1)  # -1 -> the last slot
    node_parents = node_of_candidate.gather(1, kept_parents)  # a node never outranks its parent, so all are kept

    root = root_tokens.to(device=device, dtype=torch.long).reshape(batch, 1)
    node_tokens = torch.cat([root, tokens.gather(1, keep)], dim=1)
    node_scores = torch.cat([torch.zeros(batch, 1, device=device), scores.gather(1, keep)], dim=1)
    node_parents = torch.cat([torch.full((batch, 1), -1, dtype=torch.long, device=device), node_parents], dim=1)
    return tree_from_parents(node_tokens, node_parents, node_scores, max_depth=depth + 1)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turns a bool visibility matrix into an additive mask (0 visible, dtype minimum hidden)."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)
