"""Sampling with a SpecVLM draft keeps the target's distribution (statistical tests, fp32, CPU).

End to end: the joint distribution of the first three generated tokens with the draft is compared with
plain sampling by a chi-square test of homogeneity. The same test run with a deliberately broken
acceptance rule (no renormalisation after a rejection, rejected tokens not removed) must fail, which shows
the test has the power to catch a wrong rule. A verify-level test checks the rule alone against exact
probabilities.
"""

from __future__ import annotations

import collections

import pytest
import torch
from transformers import GenerationConfig

import specvlm_hf
from specvlm_hf import verify
from specvlm_hf.tree import tree_from_parents
from tiny_families import family_inputs, tiny_gemma3, tiny_qwen2_5_vl
from tiny_models import oracle_draft, random_inputs, tiny_llava, tiny_llava_next

# 800 draws a side: the broken rule below (no renormalisation after a rejection) scored p = 2e-19 (LLaVA), 1e-7
# (Qwen2.5-VL) and 2e-8 (Gemma 3) at 800 (6e-33, 2e-12, 2e-11 at 1200), far below the threshold; the exact
# verify-level test at the end checks the rule alone with 20,000 draws
SAMPLES = 800
P_THRESHOLD = 1e-3


def chi_square_p_value(a: list[tuple], b: list[tuple]) -> float:
    """p-value of a chi-square test that two samples of outcomes come from one distribution (cells with fewer
    than 10 observations in total are pooled)."""
    count_a, count_b = collections.Counter(a), collections.Counter(b)
    totals = {key: count_a[key] + count_b[key] for key in set(count_a) | set(count_b)}
    rare = [key for key, total in totals.items() if total < 10]
    rows = [(count_a[key], count_b[key]) for key, total in totals.items() if total >= 10]
    rows.append((sum(count_a[key] for key in rare), sum(count_b[key] for key in rare)))
    rows = [row for row in rows if sum(row) > 0]
    n_a, n_b = len(a), len(b)
    statistic = 0.0
    for x, y in rows:
        expected_a = (x + y) * n_a / (n_a + n_b)
        expected_b = (x + y) * n_b / (n_a + n_b)
        statistic += (x - expected_a) ** 2 / expected_a + (y - expected_b) ** 2 / expected_b
    dof = torch.tensor((len(rows) - 1) / 2.0, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, torch.tensor(statistic / 2.0, dtype=torch.float64)))


def broken_sibling_acceptance(tree, target_probs):
    probs = torch.ones(tree.num_nodes, dtype=target_probs.dtype)
    probs[1:] = target_probs[tree.parents[1:], tree.tokens[1:]]  # p(x), never renormalised
    return probs


def break_acceptance_rule(monkeypatch):
    monkeypatch.setattr(verify, "sibling_acceptance_probs", broken_sibling_acceptance)
    monkeypatch.setattr(verify, "residual_distribution", lambda probs, rejected: probs)


def _target_and_inputs(family: str):
    """A small-vocabulary target of `family` (peaked distributions, so that three tokens have few outcomes) and a
    prompt with one image."""
    generator = torch.Generator().manual_seed(0)
    if family in ("qwen2_5_vl", "gemma3"):
        target = (
            tiny_qwen2_5_vl(seed=0, scale=24.0)
            if family == "qwen2_5_vl"
            else tiny_gemma3(seed=0, scale=64.0, tied=False)
        )
        return target, family_inputs(target, generator, images=1, text_tokens=4)
    build = tiny_llava_next if family == "next" else tiny_llava
    target = build(seed=0, scale=8.0, vocab=12)
    return target, random_inputs(target, generator, text_tokens=4)


def _batch_of(inputs: dict, size: int) -> dict:
    """`size` copies of a batch-1 prompt as one batch (Qwen's image patch rows and grids are concatenated)."""
    batch = {}
    for key, value in inputs.items():
        if key in ("pixel_values", "image_grid_thw") and "image_grid_thw" in inputs:
            batch[key] = value.repeat(size, *([1] * (value.dim() - 1)))
        else:
            batch[key] = value.expand(size, *value.shape[1:])
    return batch


def sample_first_tokens(
    settings: dict, mode: str = "tree", family: str = "llava", draft_vocab=None, fp8_head: bool = False
):
    """(plain samples, speculative samples, mean accepted tokens per round) of the first 3 new tokens;
    `draft_vocab`: token ids of a reduced draft vocabulary; `fp8_head`: the draft reads an e4m3 head."""
    target, inputs = _target_and_inputs(family)
    specvlm_hf.enable(target)
    draft = oracle_draft(target, **({"draft_vocab_size": len(draft_vocab)} if draft_vocab is not None else {}))
    if draft_vocab is not None:
        draft.set_draft_vocab(draft_vocab)
    draft.use_fp8_head(fp8_head)
    draft.config.decoding_mode = mode.split("-")[0]
    draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = 4, 3, 20
    start = inputs["input_ids"].shape[1]
    kwargs = dict(do_sample=True, max_new_tokens=3, min_new_tokens=3, **settings)
    torch.manual_seed(0)
    plain = target.generate(**_batch_of(inputs, SAMPLES), **kwargs)[:, start:]
    # The settings as one GenerationConfig: given none, transformers 5.17 builds a default model config at every
    # call (`_get_generation_parameters`), about a third of a tiny call's time; a given config skips that check only.
    fast = {"cache_implementation": "static"} if mode == "tree-static" else {}
    config = GenerationConfig(**target.generation_config.to_dict())
    config.update(**kwargs, **fast)
    speculative, sigmas = [], []
    for _ in range(SAMPLES):
        speculative.append(target.generate(**inputs, generation_config=config, assistant_model=draft)[0, start:])
        sigmas.append(draft.stats.sigma)
    return (
        [tuple(row) for row in plain.tolist()],
        [tuple(row.tolist()) for row in speculative],
        sum(sigmas) / len(sigmas),
    )


SETTINGS = {
    "temperature": dict(temperature=1.0),
    "top-k-top-p": dict(temperature=0.7, top_k=5, top_p=0.9),
}


@pytest.mark.parametrize(
    "name,mode",
    [("temperature", "tree"), ("top-k-top-p", "tree"), ("temperature", "chain"), ("top-k-top-p", "tree-static")],
)
def test_speculative_sampling_matches_plain_sampling(name, mode):
    plain, speculative, sigma = sample_first_tokens(SETTINGS[name], mode)
    assert sigma > 1.2, "the draft must get tokens accepted for the test to mean anything"
    assert chi_square_p_value(plain, speculative) > P_THRESHOLD


@pytest.mark.parametrize("family", ["next", "qwen2_5_vl", "gemma3"])
def test_speculative_sampling_matches_plain_sampling_on_other_families(family):
    """LLaVA-NeXT (AnyRes layout), Qwen2.5-VL (M-RoPE offsets after the image) and Gemma 3 (sliding-window layers)
    keep the distribution too."""
    plain, speculative, sigma = sample_first_tokens(SETTINGS["temperature"], "tree", family)
    assert sigma > 1.2, "the draft must get tokens accepted for the test to mean anything"
    assert chi_square_p_value(plain, speculative) > P_THRESHOLD


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "gemma3"])
def test_the_sampling_test_catches_a_broken_acceptance_rule(monkeypatch, family):
    break_acceptance_rule(monkeypatch)
    plain, speculative, _ = sample_first_tokens(SETTINGS["temperature"], "tree", family)
    assert chi_square_p_value(plain, speculative) < P_THRESHOLD


def _first_token_frequencies(tree, probs, draws: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(probs.shape[-1])
    for _ in range(draws):
        acceptance = verify.accept_sampling(tree, probs, generator=generator)
        first = tree.tokens[acceptance.nodes[1]] if len(acceptance.nodes) > 1 else acceptance.next_token
        counts[int(first)] += 1
    return counts / draws


def _two_level_tree():
    # root with children tokens 0, 1, 2 (tried in that order); node 1 (token 0) has children 1 and 3
    tokens = torch.tensor([5, 0, 1, 2, 1, 3])
    parents = torch.tensor([-1, 0, 0, 0, 1, 1])
    probs = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.05, 0.05]).repeat(6, 1)
    return tree_from_parents(tokens, parents), probs


def test_acceptance_rule_emits_the_target_distribution_exactly():
    tree, probs = _two_level_tree()
    frequencies = _first_token_frequencies(tree, probs, draws=20000, seed=0)
    assert torch.allclose(frequencies, probs[0], atol=0.012)


def test_acceptance_rule_without_renormalisation_is_biased(monkeypatch):
    break_acceptance_rule(monkeypatch)
    tree, probs = _two_level_tree()
    frequencies = _first_token_frequencies(tree, probs, draws=20000, seed=0)
    assert (frequencies - probs[0]).abs().max() > 0.05
