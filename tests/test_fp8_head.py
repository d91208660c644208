"""A draft that reads its `lm_head` rows as float8 (`draft.use_fp8_head`): logits near the head's, decoding still
lossless (greedy token for token in every mode, sampling by chi-square), the fast path rebuilt when it is turned on
or off, not saved, and a device without the product refused with the draft left as it was."""

from __future__ import annotations

import pytest
import torch

import specvlm_hf
from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.draft_vocab import choose_draft_vocab, count_tokens
from specvlm_hf.errors import UserError
from test_draft_vocab import assert_greedy_equal, greedy_cases
from test_lossless_sampling import P_THRESHOLD, SETTINGS, chi_square_p_value, sample_first_tokens
from tiny_models import oracle_draft, random_inputs, text_config, tiny_llava


def _relative_error(values: torch.Tensor, reference: torch.Tensor) -> float:
    return ((values - reference).norm() / reference.norm()).item()


def test_fp8_logits_follow_the_head_for_full_and_reduced_vocabularies_and_off_restores_it():
    target = specvlm_hf.enable(tiny_llava(scale=32.0))
    draft = oracle_draft(target)
    hidden = torch.randn(2, 7, target.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    reference = target.lm_head(hidden)
    with pytest.warns(UserWarning, match="fp8 draft head runs on the CPU, where torch's float8 product is slower"):
        assert draft.use_fp8_head() is draft and draft.fp8_head
    weight, scale, count = draft._fp8_head
    assert weight.dtype == torch.float8_e4m3fn and count == target.config.text_config.vocab_size
    assert weight.shape[0] % 16 == 0 and scale.shape == (1, weight.shape[0])
    logits = draft.lm_head(hidden)
    assert logits.shape == reference.shape and logits.dtype == reference.dtype
    # e4m3 keeps 3 mantissa bits: a few percent, as on the GPU (3.7%, results/README.md); never the same values
    assert 0 < _relative_error(logits, reference) < 0.08
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.8
    ids = [5, 90, 17, 3, 44, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 2]
    draft.restrict_vocab(ids)  # 25 ids: padded to 32 rows, the padding cut from the logits
    weight, _, count = draft._fp8_head
    assert (weight.shape[0], count) == (32, 25) and draft._head_rows is None
    reduced = draft.lm_head(hidden)
    assert reduced.shape == (2, 7, 25)
    assert 0 < _relative_error(reduced, reference[..., ids]) < 0.08
    draft.restrict_vocab(None)
    assert draft.use_fp8_head(False) is draft and not draft.fp8_head and draft._fp8_head is None
    torch.testing.assert_close(draft.lm_head(hidden), reference, rtol=0, atol=0)


def _plain_continuation_ids(target, inputs, size: int):
    reference = target.generate(**inputs, max_new_tokens=24, do_sample=False)
    vocab = target.config.get_text_config().vocab_size
    return choose_draft_vocab(count_tokens([reference[0, inputs["input_ids"].shape[1] :]], vocab), size)


@pytest.mark.parametrize("vocab", ["full", "reduced"])
@pytest.mark.parametrize("mode", ["tree", "static", "chain"])
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_greedy_matches_plain_generate_with_an_fp8_head(family, mode, vocab):
    accepted = []
    for target, case, inputs in greedy_cases(family, seed=8):
        draft = oracle_draft(target, noise=0.002 * case)
        if vocab == "reduced":
            draft.restrict_vocab(_plain_continuation_ids(target, inputs, 20))
        accepted.append(assert_greedy_equal(target, inputs, draft.use_fp8_head(), mode))
    assert max(accepted) > 2, "an oracle draft on an fp8 head should still be accepted"


@pytest.mark.parametrize("mode", ["tree", "tree-static"])
def test_sampling_keeps_the_distribution_with_an_fp8_head(mode):
    plain, speculative, sigma = sample_first_tokens(SETTINGS["temperature"], mode, fp8_head=True)
    assert sigma > 1.1
    assert chi_square_p_value(plain, speculative) > P_THRESHOLD


def test_the_fast_path_is_rebuilt_when_the_fp8_head_is_turned_on_and_off(monkeypatch):
    checks = []
    check = SpecVLMDraftModel._check_fp8_head
    monkeypatch.setattr(SpecVLMDraftModel, "_check_fp8_head", lambda draft: checks.append(1) or check(draft))
    target = specvlm_hf.enable(tiny_llava(scale=32.0))
    inputs = random_inputs(target, torch.Generator().manual_seed(2), text_tokens=5)
    kwargs = dict(do_sample=False, max_new_tokens=16, cache_implementation="static")
    reference = target.generate(**inputs, max_new_tokens=16, do_sample=False).tolist()
    draft = oracle_draft(target)
    rounds = []
    for fp8 in (False, True, True, False):
        draft.use_fp8_head(fp8)
        assert target.generate(**inputs, **kwargs, assistant_model=draft).tolist() == reference
        (fast_round,) = draft._specvlm_fast_path.rounds.values()
        rounds.append(fast_round)
        assert (draft._fp8_head is not None) == fp8 and draft.fp8_head == fp8
    assert rounds[1] is not rounds[0] and rounds[3] is not rounds[1]
    assert rounds[2] is rounds[1], "turning it on again changes nothing: the fast path built for it stays"
    assert len(checks) == 1, "the device is checked once per copy of the rows, not at every call"


def test_the_fp8_head_is_not_saved(tmp_path):
    target = specvlm_hf.enable(tiny_llava())
    draft = SpecVLMDraftModel.from_target(target).use_fp8_head()
    draft.save_pretrained(tmp_path)
    loaded = SpecVLMDraftModel.from_pretrained(tmp_path).bind_target(target)
    assert not loaded.fp8_head
    hidden = torch.randn(2, target.config.text_config.hidden_size)
    torch.testing.assert_close(loaded.lm_head(hidden), target.lm_head(hidden), rtol=0, atol=0)


def test_a_device_without_the_fp8_product_is_refused_and_the_draft_left_on_its_head(monkeypatch):
    from specvlm_hf import modeling_specvlm_draft

    target = specvlm_hf.enable(tiny_llava())
    draft = SpecVLMDraftModel.from_target(target).restrict_vocab([4, 9, 30])

    def unsupported(*args, **kwargs):
        raise RuntimeError("torch._scaled_mm is only supported on CUDA devices with compute capability >= 9.0")

    monkeypatch.setattr(modeling_specvlm_draft, "scaled_product_rows", unsupported)
    with pytest.raises(UserError, match="cannot run the fp8 draft head.*compute capability 8.9 or newer"):
        draft.use_fp8_head()
    assert not draft.fp8_head and draft._fp8_head is None
    hidden = torch.randn(2, target.config.text_config.hidden_size)
    rows = target.lm_head.weight[[4, 9, 30]]  # the head's own rows, as a reduced vocabulary reads them (not fp8)
    torch.testing.assert_close(draft.lm_head(hidden), torch.nn.functional.linear(hidden, rows), rtol=0, atol=0)
    # an unbound draft is checked when it is bound
    unbound = SpecVLMDraftModel(draft.config)
    unbound.use_fp8_head()
    with pytest.raises(UserError, match="cannot run the fp8 draft head"):
        unbound.bind_target(target)
    assert not unbound.fp8_head


def test_a_head_with_a_bias_is_refused_and_the_draft_left_on_it():
    target = specvlm_hf.enable(tiny_llava())
    target.lm_head.bias = torch.nn.Parameter(torch.randn(target.config.text_config.vocab_size))
    draft = SpecVLMDraftModel.from_target(target)
    with pytest.raises(UserError, match="needs an lm_head without bias"):
        draft.use_fp8_head()
    assert not draft.fp8_head and draft._fp8_head is None
    hidden = torch.randn(2, target.config.text_config.hidden_size)
    torch.testing.assert_close(draft.lm_head(hidden), target.lm_head(hidden), rtol=0, atol=0)


def test_a_hidden_size_the_fp8_product_cannot_take_is_refused():
    from specvlm_hf import SpecVLMDraftConfig

    draft = SpecVLMDraftModel(SpecVLMDraftConfig(text_config=text_config(hidden=72).to_dict()))
    with pytest.raises(UserError, match="multiple of 16, and this draft's is 72"):
        draft.use_fp8_head()
    assert not draft.fp8_head


@pytest.mark.parametrize("path", ["eager", "static"])
def test_batched_greedy_with_an_fp8_head_equals_plain_batched_generate(path):
    """Rows of a batch (one draft forward over all rows, its head product over every row's frontier at once)."""
    from test_batched import PATHS, greedy_case, llava_row, make_draft

    target = specvlm_hf.enable(tiny_llava(scale=32.0))
    generator = torch.Generator().manual_seed(5)
    rows = [llava_row(target, generator, count, 3 + 2 * index) for index, count in enumerate((1, 0, 2))]
    draft = make_draft(target, noise=0.0).use_fp8_head()
    kwargs = dict(do_sample=False, max_new_tokens=16, **PATHS[path])
    _, stats = greedy_case(target, draft, rows, [0, 11, 4], kwargs, steps=[None, 5, None])
    assert draft._fp8_head is not None and max(stats.accepted_per_round) >= 2
