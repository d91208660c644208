"""A fixed-seed slice of the random exactness campaign (`tests/exactness_campaign.py`): random combinations of
family, mode, draft, tree, prompt, batch and logits processors, each equal to plain `generate` in tokens and logits.
Longer campaigns: `python tests/exactness_campaign.py --seconds 600 --seed N`."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

import exactness_campaign
from exactness_campaign import Case, campaign, draw_case, run_case

CASES_PER_SEED = 120


@pytest.mark.parametrize("seed", [0, 1])
def test_random_cases_equal_plain_generate(seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fresh drafts accept little and say so
        failures = campaign(seed, cases=CASES_PER_SEED, log=lambda line: None)
    assert not failures, "\n\n".join(f"{case}\n{problem}" for case, problem in failures[:3])


def test_the_draws_cover_every_family_mode_and_option():
    rng = random.Random(0)
    cases = [draw_case(rng) for _ in range(2000)]
    assert {case.family for case in cases} == set(exactness_campaign.BUILDERS)
    assert {case.mode for case in cases} == {"tree", "static", "chain"}
    assert {case.rows for case in cases} == {1, 2, 3}
    assert any(case.split_kv for case in cases) and any(case.draft_vocab for case in cases)
    assert any("compressor" in case.draft_overrides for case in cases)
    assert not any(case.family in exactness_campaign.NO_STATIC and case.mode == "static" for case in cases)


@pytest.mark.parametrize("shift", [1e-3, 50.0], ids=["logits-only", "tokens"])
def test_a_wrong_logit_or_token_is_reported(monkeypatch, shift):
    """The campaign's comparison is live: the verify's logits shifted a little (the tokens stay) or a lot (another
    token wins) make the same case fail."""
    from specvlm_hf.adapters import TargetAdapter

    case = Case(
        family="llava",
        seed=0,
        mode="tree",
        draft_kind="noisy",
        tree=(3, 3, 10),
        rows=1,
        images=[1],
        generate_kwargs={"max_new_tokens": 12, "min_new_tokens": 12},
        prompt_seed=5,
    )
    targets = {}
    assert run_case(case, targets) is None
    logits = TargetAdapter.logits

    def shifted(self, hidden):
        out = logits(self, hidden)
        return out + shift * (torch.arange(out.shape[-1], device=out.device) == 7)

    monkeypatch.setattr(TargetAdapter, "logits", shifted)
    problem = run_case(case, targets)
    assert problem is not None and problem.startswith("logits differ" if shift < 1 else "tokens differ"), problem
