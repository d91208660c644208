"""`tree="auto"`: the chooser of the tree shape, with fake cost functions (no model)."""

from __future__ import annotations

import pytest

from specvlm_hf import tree_auto
from specvlm_hf.tree_auto import CANDIDATES, PAPER_TREE, choose_tree, expected_accepted


def test_expected_accepted_of_a_chain_is_the_geometric_sum_and_grows_with_alpha_and_width():
    for alpha in (0.3, 0.8):
        for depth in (0, 3, 7):  # top_k 1: one candidate per level
            assert expected_accepted((1, depth, depth + 2), alpha) == pytest.approx(
                sum(alpha**level for level in range(depth + 2))
            )
    assert expected_accepted(PAPER_TREE, 0.4) < expected_accepted(PAPER_TREE, 0.7)
    assert expected_accepted((10, 7, 24), 0.6) < expected_accepted((10, 7, 60), 0.6) <= 9


def test_choose_tree_maximises_accepted_tokens_per_ms():
    draft_step = 0.4

    def flat(top_k, depth, total):  # verification launch-bound: as cheap at 80 nodes as at 8
        return (depth + 1) * draft_step + 6.0

    def steep(top_k, depth, total):  # verification grows 0.2 ms per node
        return (depth + 1) * draft_step + 2.0 + 0.2 * total

    chosen = {}
    for name, cost in (("flat", flat), ("steep", steep)):
        shape = choose_tree(cost, alpha=0.6)
        best = max(expected_accepted(s, 0.6) / cost(*s) for s in CANDIDATES)
        assert expected_accepted(shape, 0.6) / cost(*shape) == pytest.approx(best)
        chosen[name] = shape
    assert chosen["steep"][2] < chosen["flat"][2], chosen  # wide trees only where width is cheap
    # a draft step as costly as the verification: shallower trees
    assert choose_tree(lambda k, d, t: (d + 1) * 6.0 + 6.0, alpha=0.6)[1] < chosen["flat"][1]
    assert choose_tree(flat, candidates=[PAPER_TREE]) == PAPER_TREE


def test_measured_costs_become_a_cost_function(monkeypatch):
    """`auto_tree` interpolates the measured verify cost over width and sets the chosen shape on the draft."""

    class Config:
        tree_top_k, tree_depth, tree_total_tokens = PAPER_TREE

    class Draft:
        config = Config()

    verify = {16: 5.0, 32: 5.0, 60: 9.0, 80: 13.0}
    monkeypatch.setattr(tree_auto, "measure_costs", lambda *args, **kwargs: (verify, 0.5, 0.6))
    at = tree_auto.interpolate(verify)
    assert at(24) == 5.0 and at(46) == pytest.approx(7.0) and at(100) == pytest.approx(17.0)
    draft = Draft()
    result = tree_auto.auto_tree(None, draft, {})
    expected = choose_tree(lambda k, d, t: (d + 1) * 0.5 + at(t), 0.6)
    assert result["shape"] == expected
    assert (draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens) == expected


def test_acceptance_rate_inverts_a_chain():
    class Stats:
        rounds = 4
        accepted_per_round = [3, 3, 3, 3]  # two draft tokens per round: a / (1 - a) = 2

    assert tree_auto.acceptance_rate(Stats()) == pytest.approx(2 / 3)
