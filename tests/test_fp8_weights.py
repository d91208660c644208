"""A draft whose own products read e4m3 copies of their weights (`draft.use_fp8_weights`): products near the
weights', decoding still lossless (greedy token for token in every mode, with and without the fp8 head; sampling by
chi-square), the parameters and what is saved untouched, the fast path rebuilt when it is turned on or off, and a
device without the product refused with the draft left as it was. (The GPU kernel itself: `test_kernels.py`.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import specvlm_hf
from specvlm_hf import SpecVLMDraftModel, modeling_specvlm_draft
from specvlm_hf.errors import UserError
from test_draft_vocab import assert_greedy_equal, greedy_cases
from test_lossless_sampling import P_THRESHOLD, SETTINGS, chi_square_p_value, sample_first_tokens
from tiny_models import oracle_draft, random_inputs, tiny_llava


def _linears(draft) -> list[nn.Linear]:
    return [draft.fc] + [m for m in draft.model.modules() if isinstance(m, nn.Linear)]


def test_every_product_of_the_draft_reads_its_fp8_copy_and_off_restores_the_weights():
    target = specvlm_hf.enable(tiny_llava(scale=32.0))
    torch.manual_seed(0)
    draft = SpecVLMDraftModel.from_target(target)  # random weights (an oracle's `fc` is exact in e4m3)
    before = {name: value.clone() for name, value in draft.state_dict().items()}
    fused = torch.randn(2, 5, 2 * target.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    reference = draft.fc(fused)
    hidden = draft.decode(reference)
    assert draft.use_fp8_weights() is draft and draft.fp8_weights
    linears = _linears(draft)
    assert len(linears) == 1 + 7 * draft.config.num_draft_layers  # fc, and q/k/v/o and gate/up/down a layer
    assert all(type(m) is modeling_specvlm_draft.Fp8Linear for m in linears)
    for module in linears:
        weight, scale, count = module._specvlm_fp8
        assert weight.dtype == torch.float8_e4m3fn and count == module.out_features and weight.shape[0] % 16 == 0
    fp8 = draft.fc(fused)
    error = ((fp8 - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.08, "e4m3 keeps 3 mantissa bits: a few percent, never the same values"
    assert 0 < ((draft.decode(fp8) - hidden).norm() / hidden.norm()).item() < 0.15
    after = draft.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert draft.use_fp8_weights(False) is draft and not draft.fp8_weights
    assert all(type(m) is nn.Linear and not hasattr(m, "_specvlm_fp8") for m in _linears(draft))
    torch.testing.assert_close(draft.fc(fused), reference, rtol=0, atol=0)


@pytest.mark.parametrize("head", [False, True], ids=["bf16-head", "fp8-head"])
@pytest.mark.parametrize("mode", ["tree", "static", "chain"])
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_greedy_matches_plain_generate_with_fp8_weights(family, mode, head):
    accepted = []
    for target, case, inputs in greedy_cases(family, seed=11):
        draft = oracle_draft(target, noise=0.002 * case).use_fp8_weights()
        if head:
            draft.use_fp8_head()
        accepted.append(assert_greedy_equal(target, inputs, draft, mode))
    assert max(accepted) > 2, "an oracle draft on fp8 weights should still be accepted"


def test_sampling_keeps_the_distribution_with_fp8_weights():
    plain, speculative, sigma = sample_first_tokens(SETTINGS["temperature"], "tree-static", fp8_weights=True)
    assert sigma > 1.1
    assert chi_square_p_value(plain, speculative) > P_THRESHOLD


def test_the_fast_path_is_rebuilt_when_fp8_weights_are_turned_on_and_off():
    target = specvlm_hf.enable(tiny_llava(scale=32.0))
    inputs = random_inputs(target, torch.Generator().manual_seed(2), text_tokens=5)
    kwargs = dict(do_sample=False, max_new_tokens=16, cache_implementation="static")
    reference = target.generate(**inputs, max_new_tokens=16, do_sample=False).tolist()
    draft = oracle_draft(target)
    rounds = []
    for fp8 in (False, True, True, False):
        draft.use_fp8_weights(fp8)
        assert target.generate(**inputs, **kwargs, assistant_model=draft).tolist() == reference
        (fast_round,) = draft._specvlm_fast_path.rounds.values()
        rounds.append(fast_round)
    assert rounds[1] is not rounds[0] and rounds[3] is not rounds[1]
    assert rounds[2] is rounds[1], "turning it on again changes nothing: the fast path built for it stays"


def test_fp8_weights_are_not_saved_and_a_loaded_draft_decodes_on_its_weights(tmp_path):
    target = specvlm_hf.enable(tiny_llava())
    draft = SpecVLMDraftModel.from_target(target)
    draft.use_fp8_weights().save_pretrained(tmp_path)
    loaded = SpecVLMDraftModel.from_pretrained(tmp_path).bind_target(target)
    assert not loaded.fp8_weights and all(type(m) is nn.Linear for m in _linears(loaded))
    for name, value in draft.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)


def test_a_device_without_the_fp8_product_is_refused_and_the_draft_left_on_its_weights(monkeypatch):
    target = specvlm_hf.enable(tiny_llava())
    draft = SpecVLMDraftModel.from_target(target)

    def unsupported(*args, **kwargs):
        raise RuntimeError("fp8e4nv data type is not supported on CUDA arch < 89")

    monkeypatch.setattr(modeling_specvlm_draft, "fp8_kernel_usable", lambda device: True)
    monkeypatch.setattr(modeling_specvlm_draft, "fp8_product", unsupported)
    with pytest.raises(UserError, match="cannot run fp8 draft weights.*compute capability 8.9 or newer"):
        draft.use_fp8_weights()
    assert not draft.fp8_weights and all(type(m) is nn.Linear for m in _linears(draft))


def test_moving_the_draft_makes_the_copies_again_on_its_new_device():
    target = specvlm_hf.enable(tiny_llava())
    draft = SpecVLMDraftModel.from_target(target).use_fp8_weights()
    first = draft.fp8_weights
    draft.bind_target(target)
    assert all(a is b for a, b in zip(draft.fp8_weights, first)), "bound again on one device: the copies stay"
    draft._fp8_weights_device = torch.device("meta")  # as if made on another device
    draft.bind_target(target)
    assert draft.fp8_weights and all(a is not b for a, b in zip(draft.fp8_weights, first))
    assert draft._fp8_weights_device == draft.fc.weight.device
