"""What the family test files share: the decoding modes, the drafts they try and the greedy comparison loop."""

from __future__ import annotations

import torch

from specvlm_hf import SpecVLMDraftModel
from tiny_models import oracle_draft

MODES = {"tree": {}, "static": {"cache_implementation": "static"}, "chain": {}}


def make_draft(target, kind: str, mode: str, **overrides):
    """An `oracle` draft (copies the target's last layer: long accepted runs), a `noisy` one (the oracle with
    perturbed weights: rejections at every depth) or a `fresh` one (random: mostly rejections)."""
    if kind == "oracle":
        draft = oracle_draft(target, **overrides)
    elif kind == "noisy":
        draft = oracle_draft(target, noise=0.003, seed=1, **overrides)
    else:
        torch.manual_seed(1)
        draft = SpecVLMDraftModel.from_target(target, **overrides)
    draft.config.decoding_mode = "chain" if mode == "chain" else "tree"
    return draft


def assert_greedy_matches_plain(target, make_inputs, cases, mode: str, generator, base_tokens: int, step: int):
    """For each `(draft kind, image count)` case, greedy decoding with the draft equals plain `generate` token for
    token (every other case forced to its full length with `min_new_tokens`); some round accepts >= 3 tokens."""
    accepted = []
    for case, (kind, images) in enumerate(cases):
        inputs = make_inputs(target, generator, images=images, text_tokens=3 + case)
        kwargs = {"do_sample": False, "max_new_tokens": base_tokens + step * case, **MODES[mode]}
        if case % 2:
            kwargs["min_new_tokens"] = kwargs["max_new_tokens"]
        draft = make_draft(target, kind, mode)
        reference = target.generate(**inputs, **kwargs)
        speculative = target.generate(**inputs, **kwargs, assistant_model=draft)
        assert speculative.tolist() == reference.tolist(), (type(target).__name__, mode, case)
        accepted.append(max(draft.stats.accepted_per_round, default=0))
    assert max(accepted) >= 3, "the oracle draft should have accepted several tokens in one round"


def assert_logits_match_plain(target, inputs, atol: float = 5e-5, **generate_kwargs):
    """Greedy decoding with a slightly noisy oracle draft returns the same tokens and, at every step, the same
    logits as plain `generate`, within `atol` (a position off by one changes them by ~2e-4 and may leave the tokens
    alone)."""
    kwargs = dict(
        do_sample=False,
        max_new_tokens=12,
        min_new_tokens=12,
        return_dict_in_generate=True,
        output_logits=True,
        **generate_kwargs,
    )
    reference = target.generate(**inputs, **kwargs)
    speculative = target.generate(**inputs, **kwargs, assistant_model=oracle_draft(target, noise=0.002))
    assert speculative.sequences.tolist() == reference.sequences.tolist()
    for mine, theirs in zip(speculative.logits, reference.logits):
        torch.testing.assert_close(mine, theirs, atol=atol, rtol=1e-5)
