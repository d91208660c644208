"""Drafting ahead (`decoding.DRAFT_AHEAD`): the next round's tree is queued before the host waits for the round's
acceptance. On by default on CUDA only; here it is turned on for the CPU, where the order of calls is the same, and
the outputs must stay those of plain `generate` (tokens, scores, logits; batches whose rows stop at different
rounds; sampling's distribution). (Which tree a round verifies never changes the output, only how much is accepted:
what drafting ahead must keep is the order, the next tree drafted after the commit that loads its root.)"""

from __future__ import annotations

import pytest
import torch

import specvlm_hf.decoding as decoding_module
import specvlm_hf.round as round_module
from test_batched import CASES, PATHS, greedy_case, llava_row, make_draft
from test_lossless_greedy import DRAFTS, build_draft, build_target, generation_kwargs
from test_lossless_sampling import P_THRESHOLD, SETTINGS, chi_square_p_value, sample_first_tokens
from tiny_models import random_inputs


@pytest.fixture
def ahead(monkeypatch):
    """Drafting ahead on the CPU; counts the trees drafted."""
    monkeypatch.setattr(decoding_module, "DRAFT_AHEAD", ("cpu",))
    counts = {"trees": 0}
    original = round_module.SpeculativeRound.draft_tree

    def draft_tree(self):
        counts["trees"] += 1
        return original(self)

    monkeypatch.setattr(round_module.SpeculativeRound, "draft_tree", draft_tree)
    return counts


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("target_name", ["llava", "next-gqa"])
def test_drafting_ahead_keeps_greedy_outputs_scores_and_logits(ahead, target_name, path):
    target = build_target(target_name)
    generator = torch.Generator().manual_seed(5)
    rounds = 0
    for case, draft_kind in enumerate(DRAFTS + ("oracle",)):
        draft = build_draft(target, draft_kind, "tree")
        inputs = random_inputs(target, generator, text_tokens=3 + case)
        kwargs = dict(generation_kwargs(case), return_dict_in_generate=True, output_scores=True, output_logits=True)
        kwargs.update(PATHS[path])
        plain = target.generate(**inputs, **kwargs)
        before = ahead["trees"]
        spec = target.generate(**inputs, **kwargs, assistant_model=draft)
        assert spec.sequences.tolist() == plain.sequences.tolist()
        for ours, theirs in ((spec.scores, plain.scores), (spec.logits, plain.logits)):
            assert len(ours) == len(theirs)
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert ahead["trees"] - before == draft.stats.rounds + 1, "one tree a round, and one drafted past the last"
        rounds += draft.stats.rounds
    assert rounds > 8


def test_without_drafting_ahead_a_call_drafts_one_tree_a_round(monkeypatch):
    monkeypatch.setattr(decoding_module, "DRAFT_AHEAD", ())
    counts = {"trees": 0}
    original = round_module.SpeculativeRound.draft_tree
    monkeypatch.setattr(
        round_module.SpeculativeRound,
        "draft_tree",
        lambda self: counts.update(trees=counts["trees"] + 1) or original(self),
    )
    target = round_module_target()
    draft = build_draft(target, "noisy", "tree")
    inputs = random_inputs(target, torch.Generator().manual_seed(2))
    target.generate(**inputs, do_sample=False, max_new_tokens=12, assistant_model=draft)
    assert counts["trees"] == draft.stats.rounds > 1


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("size", [3, 8])
def test_drafting_ahead_in_batches_whose_rows_stop_at_different_rounds(ahead, path, size):
    target = round_module_target()
    images, extra, steps = CASES[size]
    generator = torch.Generator().manual_seed(size)
    rows = [llava_row(target, generator, count, 2 + 3 * index) for index, count in enumerate(images)]
    draft = make_draft(target, noise=0.003 if size % 2 else 0.0)
    kwargs = dict(do_sample=False, max_new_tokens=18, **PATHS[path])
    _, stats = greedy_case(target, draft, rows, extra, kwargs, steps)
    assert stats.rounds > 2 and max(stats.accepted_per_round) >= 2


def test_drafting_ahead_when_the_fast_path_moves_rows_to_a_smaller_batch(ahead):
    target = round_module_target()
    generator = torch.Generator().manual_seed(12)
    rows = [llava_row(target, generator, index % 3, 2 + index) for index in range(8)]
    extra, steps = [0, 3, 0, 7, 1, 0, 20, 2], [1, 3, 5, 7, 10, 14, 18, None]
    draft = make_draft(target)
    draft.config.batch_verify_tokens = 64
    kwargs = dict(do_sample=False, max_new_tokens=24, cache_implementation="static")
    _, stats = greedy_case(target, draft, rows, extra, kwargs, steps, alone=False)
    assert {8, 4, 2, 1} <= set(stats.rows_per_round)


def test_drafting_ahead_keeps_the_sampling_distribution(ahead):
    plain, speculative, sigma = sample_first_tokens(SETTINGS["temperature"], "tree-static")
    assert sigma > 1.1
    assert chi_square_p_value(plain, speculative) > P_THRESHOLD


_TARGET = {}


def round_module_target():
    """The peaked tiny LLaVA of the batch tests, built once for this module."""
    if "llava" not in _TARGET:
        import specvlm_hf
        from tiny_models import tiny_llava

        _TARGET["llava"] = specvlm_hf.enable(tiny_llava(scale=32.0))
    return _TARGET["llava"]
