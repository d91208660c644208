"""`tree="auto"`: the tree shape `(top_k, depth, total_tokens)` with the most accepted tokens per millisecond.

A round costs `depth + 1` draft steps plus one verification of `total_tokens` nodes; on a GPU the verification is
launch- or weight-bound, nearly flat in width up to some size and then growing. `measure_costs` times the fast
path's round at a few widths once; `choose_tree` then picks, among `CANDIDATES`, the shape maximising

    expected_accepted(shape, alpha) / round_ms(shape)

where `expected_accepted` is a model of a tree's acceptance from the draft's top-1 acceptance rate `alpha`:
the `total_tokens - 1` nodes spread evenly over the `depth + 1` levels (at most `top_k` children per accepted
node), a level accepting when the target's token is among its candidates, each candidate accepting independently
with a probability that halves down the ranks (`alpha`, `alpha / 2`, ...). It is a model for ranking shapes, not a
prediction; `PAPER_TREE` (EAGLE-2's 10, 7, 60) stays the default everywhere else.
"""

from __future__ import annotations

import itertools
import time

PAPER_TREE = (10, 7, 60)
CANDIDATES = [
    (top_k, depth, total)
    for top_k, depth, total in itertools.product((4, 6, 8, 10), (2, 3, 4, 5, 6, 7, 8), (8, 16, 24, 32, 48, 60, 80))
    if depth + 2 <= total <= 1 + top_k * (depth + 1)
] + [PAPER_TREE]


def expected_accepted(shape: tuple[int, int, int], alpha: float) -> float:
    """Modelled tokens per round (the target's own token included) of a tree `shape` for a draft whose top-1
    guess is accepted with probability `alpha`."""
    top_k, depth, total = shape
    per_level = (total - 1) / (depth + 1)
    expected, reach = 1.0, 1.0
    for _ in range(depth + 1):
        candidates = max(1, min(top_k, int(round(per_level))))
        miss = 1.0
        for rank in range(candidates):
            miss *= 1.0 - alpha / 2**rank
        reach *= 1.0 - miss
        expected += reach
    return expected


def choose_tree(cost_ms, alpha: float = 0.6, candidates=None) -> tuple[int, int, int]:
    """The shape with the most modelled accepted tokens per millisecond.

    Args:
        cost_ms: `cost_ms(top_k, depth, total)` -> milliseconds of one round of that shape.
        alpha: the draft's top-1 acceptance rate (e.g. from `acceptance_rate(draft.stats)`).
        candidates: shapes to choose from (default `CANDIDATES`).
    """
    candidates = CANDIDATES if candidates is None else candidates
    return max(candidates, key=lambda shape: (expected_accepted(shape, alpha) / cost_ms(*shape), -shape[2]))


def acceptance_rate(stats, default: float = 0.6) -> float:
    """A top-1 acceptance rate from a call's `SpecVLMStats` (a chain accepting each token with probability `a`
    accepts `a / (1 - a)` draft tokens per round; inverted from the mean accepted draft tokens)."""
    rounds = getattr(stats, "rounds", 0)
    if not rounds:
        return default
    drafted = max(sum(stats.accepted_per_round) / rounds - 1.0, 0.0)
    return min(max(drafted / (1.0 + drafted), 0.05), 0.95)


def interpolate(points: dict[int, float]):
    """A piecewise-linear function of width through measured `{width: ms}` (flat beyond the ends' slope)."""
    widths = sorted(points)

    def at(width: float) -> float:
        if width <= widths[0] or len(widths) == 1:
            low, high = widths[0], widths[min(1, len(widths) - 1)]
        elif width >= widths[-1]:
            low, high = widths[-2], widths[-1]
        else:
            high = next(w for w in widths if w >= width)
            low = widths[widths.index(high) - 1]
        if high == low:
            return points[low]
        return points[low] + (points[high] - points[low]) * (width - low) / (high - low)

    return at


def measure_costs(target, draft, inputs: dict, widths=(16, 32, 60, 80), new_tokens: int = 24, **generate_kwargs):
    """Times fast-path rounds with trees of each width in `widths` (the draft's top-k and depth): returns
    `(verify_ms_by_width, draft_ms_per_step, alpha)`, `alpha` from the calls' acceptance. Restores the draft's
    tree settings."""
    import torch

    config = draft.config
    saved = (config.tree_top_k, config.tree_depth, config.tree_total_tokens)
    verify, draft_step, alphas = {}, [], []
    try:
        for width in widths:
            config.tree_total_tokens = width
            for _ in range(2):  # the first call of a width builds its buffers and graphs
                with torch.inference_mode():
                    target.generate(
                        **inputs,
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                        assistant_model=draft,
                        cache_implementation="static",
                        **generate_kwargs,
                    )
            stats = draft.stats
            rounds = max(stats.rounds, 1)
            verify[width] = 1000 * stats.verify_seconds / rounds
            draft_step.append(1000 * stats.draft_seconds / rounds / (config.tree_depth + 1))
            alphas.append(acceptance_rate(stats))
    finally:
        config.tree_top_k, config.tree_depth, config.tree_total_tokens = saved
    return verify, sorted(draft_step)[len(draft_step) // 2], sum(alphas) / len(alphas)


def auto_tree(target, draft, inputs: dict, alpha: float | None = None, **measure_kwargs) -> dict:
    """Measures round costs once (`measure_costs`), chooses a shape (`choose_tree`) and sets it on `draft.config`.
    Returns what it measured and chose."""
    start = time.perf_counter()
    verify, draft_step_ms, measured_alpha = measure_costs(target, draft, inputs, **measure_kwargs)
    alpha = measured_alpha if alpha is None else alpha
    verify_ms = interpolate(verify)
    shape = choose_tree(lambda top_k, depth, total: (depth + 1) * draft_step_ms + verify_ms(total), alpha)
    config = draft.config
    config.tree_top_k, config.tree_depth, config.tree_total_tokens = shape
    return {
        "shape": shape,
        "alpha": alpha,
        "verify_ms_by_width": verify,
        "draft_ms_per_step": draft_step_ms,
        "seconds": time.perf_counter() - start,
    }
