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
