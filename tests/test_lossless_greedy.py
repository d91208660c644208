"""Greedy SpecVLM decoding is token-identical to plain `generate` (fp32, CPU), over many random cases.

Targets: tiny random LLaVA and LLaVA-NeXT, with and without GQA, tied and untied embeddings, sdpa and eager.
Drafts: an oracle that copies the target's layers (long accepted paths), a perturbed oracle (short ones)
and a freshly initialised draft (almost nothing accepted), so every acceptance length is exercised.
Paths: `enable` + `assistant_model=`, and `custom_generate=<saved draft folder>`; tree and chain mode.
"""

from __future__ import annotations

import sys

import pytest
import torch

import specvlm_hf
from specvlm_hf import SpecVLMDraftModel
from tiny_models import oracle_draft, random_inputs, tiny_llava, tiny_llava_next

TARGETS = {
    "llava": dict(kind="llava"),
    "llava-gqa": dict(kind="llava", gqa=True),
    "llava-tied": dict(kind="llava", tied=True),
    "llava-eager-gqa-tied": dict(kind="llava", gqa=True, tied=True, attn="eager"),
    "next": dict(kind="next"),
    "next-gqa": dict(kind="next", gqa=True),
    "next-tied": dict(kind="next", tied=True),
    "next-gqa-tied": dict(kind="next", gqa=True, tied=True),
}
DRAFTS = ("oracle", "noisy", "fresh")


def build_target(name: str, seed: int = 0):
    spec = dict(TARGETS[name])
    factory = tiny_llava_next if spec.pop("kind") == "next" else tiny_llava
    return specvlm_hf.enable(factory(seed=seed, scale=32.0, **spec))


def build_draft(target, kind: str, mode: str):
    if kind == "oracle":
        draft = oracle_draft(target)
    elif kind == "noisy":
        draft = oracle_draft(target, noise=0.003)
    else:
        torch.manual_seed(1)
        draft = SpecVLMDraftModel.from_target(target)
    draft.config.decoding_mode = mode
    return draft


def generation_kwargs(case: int) -> dict:
    """Vary the budget, and whether EOS may end a case early (min_new_tokens adds a logits processor)."""
    kwargs = {"do_sample": False, "max_new_tokens": 20 + 4 * (case % 3)}
    if case % 2 == 0:
        kwargs["min_new_tokens"] = kwargs["max_new_tokens"]
    return kwargs


def assert_same(target, inputs, kwargs, **spec_kwargs):
    reference = target.generate(**inputs, **kwargs)
    speculative = target.generate(**inputs, **kwargs, **spec_kwargs)
    assert speculative.tolist() == reference.tolist()


@pytest.mark.parametrize("target_name", list(TARGETS))
@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_greedy_matches_plain_generate_through_enable(target_name, mode):
    target = build_target(target_name)
    generator = torch.Generator().manual_seed(list(TARGETS).index(target_name))
    accepted = []
    for case, draft_kind in enumerate(DRAFTS + DRAFTS[:1]):  # 4 cases per target and mode
        draft = build_draft(target, draft_kind, mode)
        inputs = random_inputs(target, generator, text_tokens=3 + case, image=case != 3)
        assert_same(target, inputs, generation_kwargs(case), assistant_model=draft)
        assert draft.stats.mode == mode
        accepted.append(max(draft.stats.accepted_per_round, default=0))
    assert max(accepted) >= 3, "the oracle draft should have accepted several tokens in one round"


@pytest.mark.parametrize("target_name", ["llava", "llava-gqa", "next", "next-gqa-tied"])
@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_greedy_matches_plain_generate_through_custom_generate(target_name, mode, tmp_path):
    target = build_target(target_name)
    specvlm_hf.disable(target)  # custom_generate needs no prior enable
    draft = build_draft(target, "noisy", mode)
    draft.save_pretrained(tmp_path / "draft")
    generator = torch.Generator().manual_seed(7)
    for case in range(2):
        inputs = random_inputs(target, generator, text_tokens=4 + case)
        assert_same(
            target, inputs, generation_kwargs(case), custom_generate=str(tmp_path / "draft"), trust_remote_code=True
        )
    assert not hasattr(type(target), "_specvlm_base_class"), "custom_generate leaves the target as it found it"
    loaded = [
        draft
        for name, module in sys.modules.items()
        if name.endswith("custom_generate.generate")
        for draft in getattr(module, "_LOADED_DRAFTS", {}).values()
    ]
    assert loaded and loaded[-1].stats.mode == mode and loaded[-1].stats.rounds > 0, "the remote loop really ran"


def test_tree_settings_change_the_tree_not_the_output():
    target = build_target("llava")
    generator = torch.Generator().manual_seed(3)
    inputs = random_inputs(target, generator)
    for top_k, depth, total in [(1, 0, 2), (2, 3, 8), (4, 5, 30), (10, 7, 60), (12, 9, 100)]:
        draft = build_draft(target, "oracle", "tree")
        draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = top_k, depth, total
        assert_same(
            target, inputs, {"do_sample": False, "max_new_tokens": 24, "min_new_tokens": 24}, assistant_model=draft
        )
        assert max(draft.stats.accepted_per_round) <= depth + 2


@pytest.mark.parametrize("target_name", ["llava", "llava-eager-gqa-tied", "next-gqa"])
def test_static_cache_fast_path_matches_plain_generate(target_name):
    """`cache_implementation="static"` selects the fast path (static caches; CUDA graphs on a GPU)."""
    target = build_target(target_name)
    generator = torch.Generator().manual_seed(21)
    for case, draft_kind in enumerate(DRAFTS + ("oracle",)):
        draft = build_draft(target, draft_kind, "tree")
        inputs = random_inputs(target, generator, text_tokens=3 + case)
        kwargs = generation_kwargs(case)
        reference = target.generate(**inputs, **kwargs)
        fast = target.generate(**inputs, **kwargs, assistant_model=draft, cache_implementation="static")
        assert fast.tolist() == reference.tolist()
        assert draft._specvlm_static_round.length >= kwargs["max_new_tokens"] + inputs["input_ids"].shape[1]
    assert max(draft.stats.accepted_per_round) >= 3


def test_fast_path_state_is_reused_across_calls_and_lengths():
    """The fast path keeps its buffers (and, on a GPU, its graphs) on the draft: later calls of one length reuse
    them, with other prompts and other drafts' acceptance lengths; a longer budget builds a new one."""
    target = build_target("llava-gqa")
    generator = torch.Generator().manual_seed(5)
    draft = build_draft(target, "oracle", "tree")
    kwargs = {"do_sample": False, "max_new_tokens": 30, "min_new_tokens": 30}
    rounds = []
    for case in range(4):
        inputs = random_inputs(target, generator, text_tokens=2 + 3 * case, image=case != 2)
        if case == 3:
            kwargs = {"do_sample": False, "max_new_tokens": 200, "min_new_tokens": 200}
        reference = target.generate(**inputs, **kwargs)
        fast = target.generate(**inputs, **kwargs, assistant_model=draft, cache_implementation="static")
        assert fast.tolist() == reference.tolist()
        rounds.append(draft._specvlm_static_round)
        draft.load_state_dict(build_draft(target, "noisy" if case % 2 == 0 else "oracle", "tree").state_dict())
    assert rounds[0] is rounds[1] is rounds[2] and rounds[3] is not rounds[0]
    assert rounds[3].length >= 200 + inputs["input_ids"].shape[1]

    # other tree settings, or a parameter in new memory (graphs read the old addresses): a new one, still exact
    kwargs = {"do_sample": False, "max_new_tokens": 30, "min_new_tokens": 30}
    reference = target.generate(**inputs, **kwargs)
    for change in ("tree", "weights"):
        before = draft._specvlm_static_round
        if change == "tree":
            draft.config.tree_top_k, draft.config.tree_total_tokens = 4, 20
        else:
            draft.fc.weight = torch.nn.Parameter(draft.fc.weight.detach().clone())
        fast = target.generate(**inputs, **kwargs, assistant_model=draft, cache_implementation="static")
        assert fast.tolist() == reference.tolist() and draft._specvlm_static_round is not before


def test_fast_path_works_inside_and_outside_inference_mode():
    """Buffers made under `torch.inference_mode` cannot be updated outside it: the fast path keeps one set per mode."""
    target = build_target("llava")
    draft = build_draft(target, "oracle", "tree")
    inputs = random_inputs(target, torch.Generator().manual_seed(8))
    kwargs = {"do_sample": False, "max_new_tokens": 12, "assistant_model": draft, "cache_implementation": "static"}
    with torch.inference_mode():
        inside = target.generate(**inputs, **kwargs)
    outside = target.generate(**inputs, **kwargs)
    with torch.inference_mode():
        again = target.generate(**inputs, **kwargs)
    assert (
        inside.tolist() == outside.tolist() == again.tolist() == target.generate(**inputs, max_new_tokens=12).tolist()
    )


@pytest.mark.parametrize(
    "merged", [False, True, "join"], ids=["aot_eager", "aot_eager_merging_repeated", "aot_eager_joining_projections"]
)
def test_fast_path_round_functions_compile_whole_and_stay_exact(monkeypatch, merged):
    """On a GPU the three round functions are compiled whole before capture. Traced here on the CPU (AOT
    autograd, no code generation): no graph breaks, and the outputs still equal plain `generate`; also after
    `merge_repeated`, the pass inductor runs first on the round's graphs, which must find repeats to merge; and with
    `round.JOIN_PROJECTIONS`, the q/k/v and gate/up weights laid out in one storage each and their products joined."""
    import torch._dynamo

    from specvlm_hf import decoding, round as round_module
    from specvlm_hf.hf_internals import aot_eager_merging_backend

    removed, joined = [], []
    backend = aot_eager_merging_backend(removed, joined if merged == "join" else None) if merged else "aot_eager"
    monkeypatch.setattr(round_module, "COMPILE_OPTIONS", {"dynamic": False, "backend": backend})
    monkeypatch.setattr(round_module, "JOIN_PROJECTIONS", merged == "join")
    monkeypatch.setattr(decoding, "fast_path_options", lambda *args: (False, True))  # compile, no CUDA graphs
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    target = build_target("llava-gqa")
    draft = build_draft(target, "noisy", "tree")
    generator = torch.Generator().manual_seed(4)
    for case in range(2):
        inputs = random_inputs(target, generator, text_tokens=3 + case)
        kwargs = {"do_sample": False, "max_new_tokens": 16, "min_new_tokens": 16}
        fast = target.generate(**inputs, **kwargs, assistant_model=draft, cache_implementation="static")
        assert fast.tolist() == target.generate(**inputs, **kwargs).tolist()
    assert draft._specvlm_static_round.compiled and draft.stats.rounds > 1
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    if merged:  # every round function's graph (draft, verify, commit) repeats per layer what the tree fixes
        assert len(removed) >= 3 and min(removed) > 0, removed
    if merged == "join":  # the draft's and the target's layers: q/k/v and gate/up, one product each
        layers = len(target.model.language_model.layers)
        assert sum(joined) >= 3 * layers + 3, joined
    torch._dynamo.reset()


def test_fast_path_falls_back_to_eager_kernels_when_compilation_fails(monkeypatch):
    import torch._dynamo

    from specvlm_hf import round as round_module

    def failing_compile(fn, **options):
        def compiled():
            raise torch._dynamo.exc.TorchDynamoException("the compiler gave up")

        return compiled

    monkeypatch.setattr(round_module.torch, "compile", failing_compile)
    call = round_module.GraphedCall(lambda: 7, graphs=False, compile=True)
    with pytest.warns(UserWarning, match="torch.compile failed on the SpecVLM fast path"):
        assert call() == 7
    assert call() == 7 and call.fn is call.eager_fn
