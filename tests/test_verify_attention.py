"""The fast path's verify forward can run another attention kernel than the target's own (`round.VERIFY_ATTENTION`,
issue 13): the split-KV kernel computes sdpa's attention, and with it the fast path still equals plain `generate`
(tokens and logits) on GQA, M-RoPE and sliding-window families; only the verify forward uses it."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import specvlm_hf
from family_checks import assert_greedy_matches_plain, assert_logits_match_plain
from specvlm_hf import verify_attention
from specvlm_hf.errors import UserError
from specvlm_hf.verify_attention import SPLIT_KV, TREE, split_kv_attention, tree_attention
from tiny_families import FAMILIES, family_inputs
from tiny_models import random_inputs, tiny_llava


class Layer(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def random_case(generator, batch, heads, key_heads, queries, width, dim=8):
    query = torch.randn(batch, heads, queries, dim, generator=generator)
    key = torch.randn(batch, key_heads, width, dim, generator=generator)
    value = torch.randn(batch, key_heads, width, dim, generator=generator)
    visible = torch.rand(batch, 1, queries, width, generator=generator) < 0.3
    visible[..., : width // 3] = False  # whole chunks that no query sees
    visible[..., -1] = True  # every query sees something
    additive = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    return query, key, value, visible, additive


@pytest.mark.parametrize("key_heads", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("width", [64, 48, 20], ids=["4-chunks", "3-chunks", "one-chunk"])
def test_split_kv_attention_equals_sdpa(monkeypatch, key_heads, width):
    monkeypatch.setattr(verify_attention, "CHUNK", 16)
    generator = torch.Generator().manual_seed(width + key_heads)
    for batch, queries in ((1, 7), (3, 1), (2, 12)):
        query, key, value, visible, additive = random_case(generator, batch, 4, key_heads, queries, width)
        layer = Layer(4 // key_heads)
        for mask in (additive, visible, additive[:1]):  # additive, boolean, one mask for every row
            reference, _ = sdpa_attention_forward(layer, query, key, value, mask, scaling=0.3)
            output, weights = split_kv_attention(layer, query, key, value, mask, scaling=0.3)
            assert weights is None and output.shape == (batch, queries, 4, 8)
            torch.testing.assert_close(output, reference, atol=2e-6, rtol=1e-5)


def test_split_kv_attention_refuses_what_it_does_not_compute():
    query, key, value, _, additive = random_case(torch.Generator().manual_seed(0), 1, 2, 2, 3, 16)
    with pytest.raises(ValueError, match="softcapping.*VERIFY_ATTENTION = None"):
        split_kv_attention(Layer(1), query, key, value, additive, softcap=30.0)
    with pytest.raises(ValueError, match="4-D attention mask"):
        split_kv_attention(Layer(1), query, key, value, None)
    with pytest.raises(RuntimeError, match="the mask's width differs from the key's"):
        split_kv_attention(Layer(1), query, key, value, additive[..., :-1])


def test_compiled_with_dynamic_widths_every_layers_width_is_one_symbol(monkeypatch):
    """Compiled with each layer's cache width marked dynamic (as the fast path compiles its verify), the kernel ties
    every layer's key, value and mask width to one symbol, as sdpa's shape checks do. Untied, the reshapes related
    them only through floor divisions the shape solver cannot solve: every layer added dozens of guards over symbols
    of its own, and a 32-layer verify did not compile within minutes (issue 13)."""
    import torch._dynamo
    from torch._guards import detect_fake_mode

    monkeypatch.setattr(verify_attention, "CHUNK", 16)
    layers, seen = 3, {}

    def backend(graph_module, example_inputs):
        fakes = [node.meta.get("example_value") for node in graph_module.graph.find_nodes(op="placeholder")]
        fakes = [t for t in fakes if isinstance(t, torch.Tensor)]
        shape_env = detect_fake_mode(fakes).shape_env
        sizes = [size for t in fakes for size in t.shape]
        seen["symbols"] = {shape_env.replace(size.node.expr) for size in sizes if isinstance(size, torch.SymInt)}
        return graph_module.forward

    def forward(query, mask, caches):  # one mask for every layer, as in a verify forward
        out = 0
        for key, value in caches:
            out = out + split_kv_attention(Layer(1), query, key, value, mask)[0].sum()
        return out

    generator = torch.Generator().manual_seed(0)
    query, _, _, _, mask = random_case(generator, 1, 2, 2, 5, 48)
    torch._dynamo.mark_dynamic(mask, 3)
    caches = []
    for _ in range(layers):
        _, key, value, _, _ = random_case(generator, 1, 2, 2, 5, 48)
        torch._dynamo.mark_dynamic(key, 2)
        torch._dynamo.mark_dynamic(value, 2)
        caches.append((key, value))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(forward, backend=backend, fullgraph=True)
        torch.testing.assert_close(compiled(query, mask, caches), forward(query, mask, caches))
    finally:
        torch._dynamo.reset()
    assert len(seen["symbols"]) == 1, seen["symbols"]


def count_calls(monkeypatch, function, switches: tuple[str, ...]) -> list[int]:
    """Makes the fast path's forwards of `switches` (`round.VERIFY_ATTENTION`, `DRAFT_ATTENTION`) run `function`,
    registered under a test-only name (a package copy loaded as `custom_generate` registers the package's own names
    again in this process), with 16-slot buckets; returns the query lengths of its calls, as they come."""
    from transformers import AttentionInterface

    from specvlm_hf import round as round_module

    seen = []

    def counted(module, query, *args, **kwargs):
        seen.append(query.shape[2])
        return function(module, query, *args, **kwargs)

    name = f"specvlm_test_{function.__name__}"
    AttentionInterface.register(name, counted)
    for switch in switches:
        monkeypatch.setattr(round_module, switch, name)
    monkeypatch.setattr(round_module, "LENGTH_BUCKET", 16)
    return seen


@pytest.fixture
def split_kv(monkeypatch):
    """The fast path's verify forwards on the split-KV kernel in chunks of 16 slots (several per 16-slot bucket's
    cache), counting its calls and the query lengths it saw."""
    monkeypatch.setattr(verify_attention, "CHUNK", 16)
    return count_calls(monkeypatch, split_kv_attention, ("VERIFY_ATTENTION",))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_fast_path_on_the_split_kv_kernel_equals_plain_generate(split_kv, family):
    """Tokens over many cases, and every logit; M-RoPE positions (Qwen2.5-VL) and a sliding-window layer's own
    mask (Gemma 3) go through the kernel too. Only the tree's verify forwards run it (not the prefill, not plain
    `generate`), and the target's configuration is as before after each call."""
    target = specvlm_hf.enable(FAMILIES[family](seed=0))
    cases = [("oracle", 1), ("noisy", 2), ("fresh", 1), ("oracle", 0), ("noisy", 1)]
    generator = torch.Generator().manual_seed(3)
    assert_greedy_matches_plain(target, family_inputs, cases, "static", generator, base_tokens=18, step=3)
    assert split_kv and all(q > 1 for q in split_kv), split_kv  # tree queries only
    assert target.config.get_text_config()._attn_implementation == "sdpa"
    inputs = family_inputs(target, torch.Generator().manual_seed(5), images=1)
    assert_logits_match_plain(target, inputs, cache_implementation="static")


def test_split_kv_kernel_on_a_gqa_llava_and_only_in_the_fast_path(split_kv):
    from test_lossless_greedy import build_draft, build_target

    target = build_target("llava-gqa")
    draft = build_draft(target, "noisy", "tree")
    generator = torch.Generator().manual_seed(8)
    for case in range(4):
        inputs = random_inputs(target, generator, text_tokens=3 + 5 * case, image=case % 2 == 0)
        kwargs = {"do_sample": False, "max_new_tokens": 14, "min_new_tokens": 14}
        fast = target.generate(**inputs, **kwargs, assistant_model=draft, cache_implementation="static")
        assert fast.tolist() == target.generate(**inputs, **kwargs).tolist()
    calls = len(split_kv)
    assert calls >= draft.stats.rounds * target.config.text_config.num_hidden_layers
    target.generate(**inputs, **kwargs, assistant_model=draft)  # the eager tree loop keeps the target's attention
    assert len(split_kv) == calls


@pytest.mark.parametrize("switch", ["VERIFY_ATTENTION", "DRAFT_ATTENTION"])
def test_an_unregistered_attention_is_refused_with_the_choices(monkeypatch, switch):
    from specvlm_hf import round as round_module
    from test_lossless_greedy import build_draft, build_target

    monkeypatch.setattr(round_module, switch, "split-kv")
    target = build_target("llava")
    draft = build_draft(target, "noisy", "tree")
    inputs = random_inputs(target, torch.Generator().manual_seed(0), text_tokens=4)
    with pytest.raises(
        ValueError, match=switch + r"='split-kv'.*None.*specvlm_tree.*specvlm_split_kv.*flex_attention"
    ):
        target.generate(**inputs, max_new_tokens=4, assistant_model=draft, cache_implementation="static")
    assert SPLIT_KV == "specvlm_split_kv" and TREE == "specvlm_tree"


def test_batched_fast_path_on_the_split_kv_kernel_equals_plain_batched_generate(split_kv):
    """Batched rows (each with its own masks, `(B, 1, q, W)`; left padding; rows leaving the batch) too."""
    from test_batched import CASES, greedy_case, llava_row, make_draft

    llava = specvlm_hf.enable(tiny_llava(scale=32.0))
    images, extra, steps = CASES[5]
    generator = torch.Generator().manual_seed(5)
    rows = [llava_row(llava, generator, count, 2 + 3 * index) for index, count in enumerate(images)]
    draft = make_draft(llava, noise=0.003)
    kwargs = dict(do_sample=False, max_new_tokens=18, cache_implementation="static")
    greedy_case(llava, draft, rows, extra, kwargs, steps, alone=False)
    assert split_kv and max(split_kv) > 1


def test_tree_attention_function_takes_transformers_arguments_and_refuses_what_it_does_not_compute():
    """`verify_attention.tree_attention` (`TREE`): additive and boolean masks, the layer's scaling, `(B, q, H, d)`
    out; the kernels' numerics are checked in Triton's interpreter (test_kernels.py)."""
    generator = torch.Generator().manual_seed(1)
    query, key, value, visible, additive = random_case(generator, 2, 4, 2, 7, 40)
    reference, _ = sdpa_attention_forward(Layer(2), query, key, value, additive, scaling=0.3)
    for mask in (additive, visible):
        output, weights = tree_attention(Layer(2), query, key, value, mask, scaling=0.3)
        assert weights is None and output.shape == (2, 7, 4, 8)
        torch.testing.assert_close(output, reference, atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=r"softcapping.*VERIFY_ATTENTION = None"):
        tree_attention(Layer(2), query, key, value, additive, softcap=30.0)
    with pytest.raises(ValueError, match="4-D attention mask"):
        tree_attention(Layer(2), query, key, value, None)


def test_the_package_picks_its_attention_kernels_only_where_they_run_and_compute_the_models_attention(monkeypatch):
    from transformers import Gemma2Config, LlamaConfig

    from specvlm_hf import kernels
    from specvlm_hf.round import verify_attention_for

    cpu = torch.device("cpu")
    sdpa = LlamaConfig(attn_implementation="sdpa")
    monkeypatch.setattr(kernels, "_runs_kernels", lambda device: False)
    assert verify_attention_for(sdpa, None, cpu) is None  # the kernels do not run here: the model's own
    monkeypatch.setattr(kernels, "_runs_kernels", lambda device: True)
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    assert verify_attention_for(sdpa, None, cpu) == TREE
    assert verify_attention_for(LlamaConfig(attn_implementation="eager"), None, cpu) is None
    softcapped = Gemma2Config(attn_implementation="sdpa", attn_logit_softcapping=50.0)
    assert verify_attention_for(softcapped, None, cpu) is None  # the kernels do not softcap
    assert verify_attention_for(sdpa, SPLIT_KV, cpu) == SPLIT_KV  # a choice made is kept
    odd_heads = LlamaConfig(attn_implementation="sdpa", hidden_size=960, num_attention_heads=12)  # heads of 80
    assert verify_attention_for(odd_heads, None, cpu) is None  # the kernels' tiles take powers of two
    assert verify_attention_for(LlamaConfig(attn_implementation="sdpa", head_dim=64), None, cpu) == TREE
    monkeypatch.setattr(kernels, "ATTENTION", False)
    assert verify_attention_for(sdpa, None, cpu) is None
    monkeypatch.setattr(kernels, "ATTENTION", True)
    # on a GPU: an NVIDIA one of compute capability 8.0 or newer (older ones cannot run the kernels' bf16 products)
    gpu = torch.device("cuda")
    for capability, hip, expected in (((9, 0), None, TREE), ((8, 0), None, TREE), ((7, 5), None, None),
                                      ((9, 0), "6.2", None)):  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, got=capability: got)
        monkeypatch.setattr(torch.version, "hip", hip)
        assert verify_attention_for(sdpa, None, gpu) == expected, (capability, hip)
        assert kernels.choices(gpu)[0::2] == (expected is not None,) * 2  # the tree's top-k and the attention
        if expected is None:  # and chosen by name there, refused with the fix
            with pytest.raises(UserError, match="compute capability 8.0 or newer.*VERIFY_ATTENTION"):
                verify_attention_for(sdpa, TREE, gpu)


def test_fast_path_with_the_tree_attention_in_verify_and_draft_equals_plain_generate(monkeypatch):
    """`VERIFY_ATTENTION` and `DRAFT_ATTENTION` set to `TREE` (here on its sdpa fallback): the tree's verify forwards
    and the draft's tree levels and catch-up run it, with a sliding-window layer's own mask (Gemma 3); tokens and
    logits equal plain `generate`."""
    seen = count_calls(monkeypatch, tree_attention, ("VERIFY_ATTENTION", "DRAFT_ATTENTION"))
    target = specvlm_hf.enable(FAMILIES["gemma3"](seed=0))
    cases = [("oracle", 1), ("noisy", 2), ("fresh", 1)]
    assert_greedy_matches_plain(target, family_inputs, cases, "static", torch.Generator().manual_seed(3), 18, 3)
    levels = target.config.get_text_config().num_hidden_layers
    assert seen.count(60) >= levels and 10 in seen, sorted(set(seen))  # the verify's tree; a draft level
    assert_logits_match_plain(
        target, family_inputs(target, torch.Generator().manual_seed(5)), cache_implementation="static"
    )
