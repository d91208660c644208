"""A reduced draft vocabulary: the draft scores N target tokens; decoding stays lossless (greedy token for token,
sampling by chi-square), the vocabulary is saved with the draft, and bad settings are named."""

from __future__ import annotations

import pytest
import torch

import specvlm_hf
from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.draft_vocab import choose_draft_vocab, count_tokens
from specvlm_hf.tree import build_dynamic_tree
from test_lossless_sampling import P_THRESHOLD, SETTINGS, chi_square_p_value, sample_first_tokens
from tiny_families import family_inputs, tiny_qwen2_5_vl
from tiny_models import oracle_draft, random_inputs, tiny_llava


def test_choose_keeps_the_required_tokens_then_the_most_frequent():
    counts = count_tokens([torch.tensor([5, 5, 5, 7, 7, 1]), [9, 9, 9, 9]], vocab_size=12)
    assert counts[9] == 4 and counts[5] == 3 and counts.sum() == 10
    assert choose_draft_vocab(counts, 3, always=[2]).tolist() == [2, 5, 9]
    with pytest.raises(ValueError, match="does not fit"):
        choose_draft_vocab(counts, 13)


def test_tree_tokens_are_mapped_through_the_vocabulary():
    vocab_map = torch.tensor([3, 8, 11])
    root = torch.log_softmax(torch.tensor([0.0, 2.0, 1.0]), dim=-1)

    def step(tokens, hidden, level, mask):
        return hidden, torch.log_softmax(torch.tensor([[3.0, 0.0, 1.0]]).expand(tokens.shape[0], -1), dim=-1)

    tree = build_dynamic_tree(0, root, torch.zeros(4), step, top_k=2, depth=1, total_tokens=5, vocab_map=vocab_map)
    assert set(tree.tokens[1:].tolist()) <= {3, 8, 11}
    assert tree.tokens[1].item() == 8, "the root's best child is column 1, token 8"


def _reduced_oracle(target, inputs, size: int):
    """An oracle draft that scores `size` tokens: those of plain decoding's continuation first (as the target's own
    outputs on training data would give), then the rest by id."""
    reference = target.generate(**inputs, max_new_tokens=24, do_sample=False)
    vocab = target.config.get_text_config().vocab_size
    counts = count_tokens([reference[0, inputs["input_ids"].shape[1] :]], vocab)
    draft = oracle_draft(target, draft_vocab_size=size)
    return draft.set_draft_vocab(choose_draft_vocab(counts, size))


def greedy_cases(family: str, seed: int, cases: int = 3):
    """A peaked tiny target of `family` ("llava" or "qwen2_5_vl") and `cases` random inputs for it (one or two
    images each)."""
    target = specvlm_hf.enable(tiny_llava(scale=32.0) if family == "llava" else tiny_qwen2_5_vl(seed=1))
    generator = torch.Generator().manual_seed(seed)
    for case in range(cases):
        if family == "llava":
            yield target, case, random_inputs(target, generator, text_tokens=4 + case)
        else:
            yield target, case, family_inputs(target, generator, images=1 + case % 2)


def assert_greedy_equal(target, inputs, draft, mode: str) -> float:
    """Greedy decoding with `draft` in `mode` ("tree", "static": the tree's fast path, "chain") equals plain
    `generate`; returns the draft's sigma."""
    draft.config.decoding_mode = "chain" if mode == "chain" else "tree"
    kwargs = dict(
        do_sample=False, max_new_tokens=24, **({"cache_implementation": "static"} if mode == "static" else {})
    )
    assert (
        target.generate(**inputs, **kwargs, assistant_model=draft).tolist()
        == target.generate(**inputs, **kwargs).tolist()
    )
    return draft.stats.sigma


@pytest.mark.parametrize("mode", ["tree", "static", "chain"])
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_greedy_matches_plain_generate_with_a_reduced_vocabulary(family, mode):
    accepted = [
        assert_greedy_equal(target, inputs, _reduced_oracle(target, inputs, size=24), mode)
        for target, _, inputs in greedy_cases(family, seed=4)
    ]
    assert max(accepted) > 2, "the reduced vocabulary holds the continuation: the oracle should be accepted"


def test_sampling_keeps_the_distribution_with_a_reduced_vocabulary():
    plain, speculative, sigma = sample_first_tokens(SETTINGS["temperature"], "tree", draft_vocab=list(range(0, 12, 2)))
    assert sigma > 1.1
    assert chi_square_p_value(plain, speculative) > P_THRESHOLD


@pytest.mark.parametrize("mode", ["chain", "tree", "tree-static"])
def test_a_processor_that_turns_an_unscored_column_into_nan_is_no_error(mode):
    """The length penalty adds |score| to EOS, which a reduced draft vocabulary scores -inf: NaN in the draft's
    processed scores (chain mode samples from them). Such a column is one the draft does not propose; with `top_k=1`
    the sampled output is the greedy one (before: `multinomial` raised in chain mode)."""
    target = specvlm_hf.enable(tiny_llava(scale=16.0))
    inputs = random_inputs(target, torch.Generator().manual_seed(3), text_tokens=4)
    draft = oracle_draft(target, noise=0.003, draft_vocab_size=24).set_draft_vocab(range(20, 44))  # EOS (2) left out
    draft.config.decoding_mode = mode.split("-")[0]
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=1, exponential_decay_length_penalty=(2, 1.3))
    fast = {"cache_implementation": "static"} if mode.endswith("static") else {}
    reference = target.generate(**inputs, **kwargs)
    assert target.generate(**inputs, **kwargs, **fast, assistant_model=draft).tolist() == reference.tolist()


def test_reduced_vocabulary_is_saved_and_bad_settings_are_named(tmp_path):
    target = specvlm_hf.enable(tiny_llava())
    draft = SpecVLMDraftModel.from_target(target, draft_vocab_size=10).set_draft_vocab(range(20, 30))
    draft.save_pretrained(tmp_path)
    loaded = SpecVLMDraftModel.from_pretrained(tmp_path).bind_target(target)
    assert loaded.draft_vocab.tolist() == list(range(20, 30))
    hidden = torch.randn(3, target.config.text_config.hidden_size)
    torch.testing.assert_close(loaded.lm_head(hidden), target.lm_head(hidden)[:, 20:30])
    with pytest.raises(ValueError, match="draft_vocab_size must be in 1..96"):
        SpecVLMDraftModel.from_target(target, draft_vocab_size=500)
    with pytest.raises(ValueError, match="10 distinct token ids"):
        draft.set_draft_vocab([1] * 10)


def _fast_path_vocab(draft) -> int:
    """Columns of the draft log-probs the fast path built for `draft` holds (its round state's)."""
    (fast_round,) = draft._specvlm_fast_path.rounds.values()
    return fast_round.state.root_log_probs.shape[-1]


@pytest.mark.parametrize("mode", ["tree", "static", "chain"])
def test_restricting_a_full_vocabulary_draft_equals_one_built_reduced(mode):
    """`restrict_vocab` on a (trained) full-vocabulary draft gives the draft one built with `draft_vocab_size` and
    the same ids: the same tokens and acceptance, greedy and sampled with one seed (so the chi-square test of drafts
    built reduced covers it), and greedy output still equals plain `generate`. With None it scores every id again."""
    target = specvlm_hf.enable(tiny_llava(scale=32.0))
    inputs = random_inputs(target, torch.Generator().manual_seed(6), text_tokens=5)
    reference = target.generate(**inputs, max_new_tokens=24, do_sample=False)
    vocab = target.config.text_config.vocab_size
    ids = choose_draft_vocab(count_tokens([reference[0, inputs["input_ids"].shape[1] :]], vocab), 24)
    built = oracle_draft(target, draft_vocab_size=24).set_draft_vocab(ids)
    restricted = oracle_draft(target)
    kwargs = dict(max_new_tokens=24, **({"cache_implementation": "static"} if mode == "static" else {}))
    for draft in (built, restricted):
        draft.config.decoding_mode = "chain" if mode == "chain" else "tree"
    full_output = target.generate(**inputs, **kwargs, do_sample=False, assistant_model=restricted)
    assert restricted.restrict_vocab(ids) is restricted
    assert restricted.config.draft_vocab_size == 24 and restricted.draft_vocab.tolist() == ids.tolist()
    hidden = torch.randn(3, target.config.text_config.hidden_size)
    torch.testing.assert_close(restricted.lm_head(hidden), target.lm_head(hidden)[:, ids])
    outputs = {}
    for name, draft in (("built", built), ("restricted", restricted)):
        greedy = target.generate(**inputs, **kwargs, do_sample=False, assistant_model=draft)
        sigma = draft.stats.sigma
        torch.manual_seed(11)
        sampled = target.generate(**inputs, **kwargs, do_sample=True, temperature=0.8, assistant_model=draft)
        outputs[name] = (greedy.tolist(), sigma, sampled.tolist())
    assert outputs["restricted"] == outputs["built"]
    assert outputs["restricted"][0] == reference.tolist() == full_output.tolist()
    assert outputs["restricted"][1] > 2, "the kept ids hold the continuation: the draft should still be accepted"
    if mode == "static":  # the fast path built for the full vocabulary was rebuilt for the restricted one
        assert _fast_path_vocab(restricted) == 24
    restricted.restrict_vocab(None)
    assert restricted.draft_vocab is None and restricted.config.draft_vocab_size is None
    torch.testing.assert_close(restricted.lm_head(hidden), target.lm_head(hidden))
    assert (
        target.generate(**inputs, **kwargs, do_sample=False, assistant_model=restricted).tolist() == reference.tolist()
    )
    if mode == "static":
        assert _fast_path_vocab(restricted) == vocab


def test_a_restricted_draft_is_saved_with_its_vocabulary_and_bad_ids_are_named(tmp_path):
    target = specvlm_hf.enable(tiny_llava())
    draft = SpecVLMDraftModel.from_target(target).restrict_vocab([7, 3, 50])
    draft.save_pretrained(tmp_path)
    loaded = SpecVLMDraftModel.from_pretrained(tmp_path).bind_target(target)
    assert loaded.config.draft_vocab_size == 3 and loaded.draft_vocab.tolist() == [7, 3, 50]
    hidden = torch.randn(2, target.config.text_config.hidden_size)
    torch.testing.assert_close(loaded.lm_head(hidden), target.lm_head(hidden)[:, [7, 3, 50]])
    with pytest.raises(ValueError, match="distinct token ids, but some repeat"):
        draft.restrict_vocab([4, 4, 5])
    with pytest.raises(ValueError, match="must lie in 0..95"):
        draft.restrict_vocab([1, 96])
    with pytest.raises(ValueError, match="1-D list of distinct token ids"):
        draft.restrict_vocab([])
    assert draft.draft_vocab.tolist() == [7, 3, 50], "a refused setting leaves the draft as it was"


def test_a_restricted_draft_reads_the_targets_head_again_after_it_changes_in_place():
    """The draft's copy of the kept `lm_head` rows follows weights loaded into the target in place (its next bind,
    as at each `generate` call); an unchanged head keeps the copy (and its address, which fast-path graphs read)."""
    target = specvlm_hf.enable(tiny_llava())
    draft = SpecVLMDraftModel.from_target(target).restrict_vocab([7, 3, 50])
    rows = draft._head_rows
    draft.bind_target(target)
    assert draft._head_rows is rows, "nothing changed: the same copy"
    state = {
        name: value * 2 if name.endswith("lm_head.weight") else value for name, value in target.state_dict().items()
    }
    target.load_state_dict(state)  # copies into the parameters in place: the same addresses
    draft.bind_target(target)
    hidden = torch.randn(2, target.config.text_config.hidden_size)
    torch.testing.assert_close(draft.lm_head(hidden), target.lm_head(hidden)[:, [7, 3, 50]])
    with torch.no_grad():
        draft.draft_vocab.copy_(torch.tensor([1, 2, 3]))  # the ids themselves, in place
    draft.bind_target(target)
    torch.testing.assert_close(draft.lm_head(hidden), target.lm_head(hidden)[:, [1, 2, 3]])
