"""Contracts of every private transformers / torch internal that `specvlm_hf.hf_internals` borrows.

Each test names the symbol it checks, so an upgrade that changes one fails here, loudly, rather than as a wrong
answer somewhere in the loop.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaModel, StaticCache
from transformers.generation.logits_process import MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList

from specvlm_hf import hf_internals
from tiny_families import family_inputs, tiny_qwen2_vl
from tiny_models import random_inputs, tiny_llava, tiny_llava_next

PACKAGE = pathlib.Path(hf_internals.__file__).parent


def test_generate_hooks_exist_with_the_arguments_we_pass():
    """GenerationMixin._assisted_decoding / _get_candidate_generator / _validate_generation_mode."""
    hf_internals.check_overridable()


def test_prefill_runs_generates_own_prompt_forward():
    """GenerationMixin._prefill: fills the cache with the prompt and returns the last position's logits."""
    model = tiny_llava()
    inputs = random_inputs(model, torch.Generator().manual_seed(0))
    captured = {}

    def decoding(model_, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        out = hf_internals.prefill(model_, input_ids, generation_config, kwargs)
        captured.update(length=cache.get_seq_length(), logits=out.logits[:, -1])
        return input_ids

    model.generate(**inputs, max_new_tokens=2, do_sample=False, custom_generate=decoding)
    assert captured["length"] == inputs["input_ids"].shape[1]
    plain = model(**inputs).logits[:, -1]
    torch.testing.assert_close(captured["logits"], plain, atol=1e-5, rtol=1e-5)


def test_the_assisted_loop_asks_whether_its_candidates_are_done_before_verifying_them():
    """GenerationMixin._assisted_decoding calls `stopping_criteria(candidate_input_ids, None)` before each verify
    forward. In 5.17 the first call holds the prompt itself (the first round is the prefill, with no candidates) and a
    prompt ending in EOS then keeps no token, which `hf_internals.CandidateStopCheck` answers for chain mode; 5.25
    prefills first and never asks about the bare prompt, and the wrapper is inert. Anything else fails here."""
    from transformers.generation.stopping_criteria import StoppingCriteria

    model = tiny_llava()
    ids = torch.arange(5, 15)[None]
    seen = []

    class Recording(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            seen.append((input_ids.shape[1], scores is None))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    kwargs = dict(max_new_tokens=3, do_sample=False, prompt_lookup_num_tokens=2)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), stopping_criteria=[Recording()], **kwargs)
    assert seen and seen[0][1], f"no candidate check with scores=None: {seen}"
    asks_about_the_prompt = seen[0][0] == ids.shape[1]
    assert seen[0][0] in (ids.shape[1], ids.shape[1] + 1), seen
    ends = [ids.shape[1] + 100, int(ids[0, -1])]  # the prompt's last token is an end-of-sequence token
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), eos_token_id=ends, **kwargs)
    assert (out.shape[1] == ids.shape[1]) == asks_about_the_prompt, (seen, out.shape)


def test_mrope_deltas_are_left_on_the_model_by_generate():
    """Qwen-VL: `model.model.rope_deltas` after `generate` prepared a prompt with an image."""
    model = tiny_qwen2_vl()
    inputs = family_inputs(model, torch.Generator().manual_seed(1), images=2)
    model.generate(**inputs, max_new_tokens=1, do_sample=False)
    deltas = hf_internals.mrope_deltas(model)
    assert deltas is not None and deltas.shape == (1, 1) and int(deltas) < 0


def _tiny_llama_cache(static: bool):
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaModel(config).eval()
    cache = StaticCache(config=config, max_cache_len=16) if static else DynamicCache(config=config)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 50, (1, 5)), past_key_values=cache, use_cache=True)
    return cache


def test_dynamic_cache_layers_expose_keys_and_values():
    """DynamicLayer.keys / .values (reassigned after a reorder) and .crop(negative)."""
    cache = _tiny_llama_cache(static=False)
    layer = cache.layers[0]
    keys, values = hf_internals.layer_tensors(layer)
    assert keys.shape[-2] == 5 and values.shape == keys.shape
    assert not hf_internals.is_static_layer(layer)
    hf_internals.set_layer_tensors(layer, keys[..., :3, :], values[..., :3, :])
    assert cache.layers[0].get_seq_length() == 3
    layer.crop(-1)
    assert cache.layers[0].get_seq_length() == 2


def test_static_cache_write_position_is_a_device_tensor():
    """StaticLayer.cumulative_length (its write position) and .is_initialized."""
    cache = _tiny_llama_cache(static=True)
    layer = cache.layers[0]
    assert hf_internals.is_static_layer(layer) and hf_internals.is_initialized(layer)
    assert int(layer.cumulative_length) == 5
    hf_internals.set_static_write_position(layer, torch.tensor(3))
    assert int(cache.get_seq_length()) == 3
    hf_internals.set_static_write_position(layer, 4)
    assert int(layer.cumulative_length) == 4
    assert hf_internals.static_write_position(layer) is layer.cumulative_length


def test_a_static_layer_is_initialised_from_example_entries():
    """StaticLayer.lazy_initialization(keys, values): zero buffers of the examples' batch, heads, head size, dtype and
    device, as wide as the cache, the write position unchanged; `update` writes into them afterwards."""
    source = _tiny_llama_cache(static=True).layers[0]
    cache = StaticCache(
        config=LlamaConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=8), max_cache_len=16
    )
    layer = cache.layers[0]
    keys = source.keys[:1, :, :3].double()
    hf_internals.initialize_static_layer(layer, keys, keys)
    assert hf_internals.is_initialized(layer) and layer.keys.dtype == torch.float64
    assert layer.keys.shape == (1, keys.shape[1], 16, keys.shape[3]) and not layer.keys.any()
    assert int(hf_internals.static_write_position(layer)) == 0
    layer.update(keys, keys)
    assert int(hf_internals.static_write_position(layer)) == 3 and torch.equal(layer.keys[:, :, :3], keys)


def test_length_rules_read_the_processors_fields():
    """MinLengthLogitsProcessor.min_length;
    MinNewTokensLengthLogitsProcessor.prompt_length_to_skip, .min_new_tokens."""
    assert hf_internals.length_rule_active(MinLengthLogitsProcessor(9, 2), 8) is True
    assert hf_internals.length_rule_active(MinLengthLogitsProcessor(9, 2), 9) is False
    rule = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=4, min_new_tokens=3, eos_token_id=2)
    assert [hf_internals.length_rule_active(rule, n) for n in (6, 7)] == [True, False]
    assert hf_internals.length_rule_active(torch.nn.Identity(), 3) is None


def test_host_stop_rule_reads_the_criteria_fields():
    """MaxLengthCriteria.max_length; EosTokenCriteria.eos_token_id."""
    criteria = StoppingCriteriaList([MaxLengthCriteria(max_length=30), EosTokenCriteria(eos_token_id=[2, 7])])
    assert hf_internals.host_stop_rule(criteria) == (30, {2, 7})
    assert hf_internals.host_stop_rule(StoppingCriteriaList([lambda ids, scores: False])) is None


def test_anyres_grid_matches_llava_next_feature_count():
    """llava_next's get_anyres_image_grid_shape / unpad_image."""
    model = tiny_llava_next()
    inputs = random_inputs(model, torch.Generator().manual_seed(0))
    rows, cols = hf_internals.anyres_grid(model.config, inputs["image_sizes"][0].tolist())
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        )
    features = getattr(features, "pooler_output", features)
    assert features[0].shape[0] == side * side + rows * (cols + 1)


def test_dynamo_error_type_is_what_a_failing_compile_raises():
    """torch._dynamo.exc.TorchDynamoException."""
    assert issubclass(hf_internals.dynamo_error_types()[0], Exception)


def test_cublas_workspaces_are_cleared_around_a_capture_and_a_missing_clear_is_named(monkeypatch):
    """torch._C._cuda_clearCublasWorkspaces exists in every CUDA build of torch (CUDA graph trees call it); the fast
    path clears the workspaces before and after each capture, also when the capture fails, and refuses to capture,
    naming the symbol, on a torch without it."""
    calls = []
    if torch.backends.cuda.is_built():
        assert callable(getattr(torch._C, hf_internals.CLEAR_CUBLAS_WORKSPACES))
    monkeypatch.setattr(torch._C, hf_internals.CLEAR_CUBLAS_WORKSPACES, lambda: calls.append("clear"), raising=False)
    with hf_internals.cublas_workspace_of_its_own():
        calls.append("capture")
    with pytest.raises(ValueError), hf_internals.cublas_workspace_of_its_own():
        raise ValueError
    assert calls == ["clear", "capture", "clear", "clear", "clear"]
    monkeypatch.delattr(torch._C, hf_internals.CLEAR_CUBLAS_WORKSPACES)
    with pytest.raises(RuntimeError, match="_cuda_clearCublasWorkspaces"), hf_internals.cublas_workspace_of_its_own():
        calls.append("captured without a workspace of its own")
    assert calls[-1] == "clear"


@pytest.mark.parametrize("path", sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "hf_internals.py"))
def test_no_other_module_touches_private_internals(path):
    """Private attributes of transformers or torch objects are reached only through `hf_internals`."""
    tree = ast.parse((PACKAGE / path).read_text())
    private = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(("transformers", "torch")):
            private |= {alias.name for alias in node.names if alias.name.startswith("_")}
            if any(part.startswith("_") for part in node.module.split(".")):
                private.add(node.module)
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
            if name in ("torch", "transformers", "model", "target", "layer", "cache"):
                private.add(f"{name}.{node.attr}")
    assert not private, f"{path} uses private internals {sorted(private)}; move them into hf_internals.py"


@pytest.mark.parametrize("size", [[64, 64], [90, 30], [30, 90], [20, 70], [100, 100]])
def test_onevision_grid_matches_llava_onevision_feature_count(size):
    """llava_onevision's get_anyres_image_grid_shape / unpad_image, and pack_image_features' anyres_max shrink."""
    from tiny_families_more import tiny_llava_onevision

    model = tiny_llava_onevision(aspect="anyres_max_2")
    rows, cols = hf_internals.onevision_grid(model.config, size)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    pixel_values = torch.randn(1, 17, 3, 32, 32)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values, image_sizes=torch.tensor([size]))
    assert features.pooler_output[0].shape[0] == side * side + rows * (cols + 1)


def test_an_unsharded_model_has_no_tensor_parallel_mesh():
    """`tensor_parallel_mesh` / `unsharded` on a model transformers did not shard; on a `tp_plan="auto"` target
    (DTensor shards on a 1-D mesh) they are checked by `test_tensor_parallel.py` with two processes."""
    model = tiny_llava()
    assert hf_internals.tensor_parallel_mesh(model) is None
    weight = model.lm_head.weight
    assert hf_internals.unsharded(weight) is weight


def test_hub_client_factory_is_the_one_in_use():
    """huggingface_hub.utils._http._GLOBAL_CLIENT_FACTORY / default_client_factory: what `set_client_factory` set."""
    from huggingface_hub import set_client_factory

    previous = hf_internals.hub_client_factory()
    assert callable(previous) and hasattr(previous(), "timeout")

    def mine():
        return previous()

    set_client_factory(mine)
    try:
        assert hf_internals.hub_client_factory() is mine
    finally:
        set_client_factory(previous)


def test_a_qwen_processor_is_built_without_a_video_processor():
    """`ProcessorMixin.__init__` checks each argument with `self.check_argument_for_proper_class` and
    `Qwen2_5_VLProcessor.__init__` takes `video_processor`: the processor built around the stand-in expands images
    like the real one and refuses videos."""
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vocab = {"<pad>": 0, "<|image_pad|>": 1, "<|video_pad|>": 2, "a": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", additional_special_tokens=["<|image_pad|>", "<|video_pad|>"]
    )
    image_processor = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, min_pixels=256, max_pixels=64 * 64)
    processor = hf_internals.processor_without_video(Qwen2_5_VLProcessor, image_processor, tokenizer)
    assert type(processor) is Qwen2_5_VLProcessor and processor.image_token_id == 1
    out = processor(images=[Image.new("RGB", (32, 48))], text=["a <|image_pad|> a"], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 6, 4]] and int((out["input_ids"] == 1).sum()) == 6
    with pytest.raises(ImportError, match="torchvision"):
        processor.video_processor([])


def test_torch_compile_helpers():
    """`mark_dynamic_dim` records the dimension where torch.compile reads it, the recompile limit is a positive
    int, a backend name resolves to a callable."""
    tensor = torch.zeros(2, 5)
    hf_internals.mark_dynamic_dim(tensor, 1)
    assert 1 in getattr(tensor, "_dynamo_weak_dynamic_indices", set())
    assert hf_internals.recompile_limit() >= 1
    assert callable(hf_internals.compile_backend("eager"))


def test_kernels_function_wrappers_get_a_name_pickle_finds():
    """transformers >= 5.2x wraps LLaMA's `apply_rotary_pos_emb` with `kernels` in an instance of a class defined
    inside a function, which torch cannot write into a compiled function's guards (`precompile`): it is named in its
    module so that the class and a model's private instance of it pickle. Without `kernels` there is nothing to name:
    no model function is such an instance."""
    import importlib.util
    import pickle

    import transformers.models.llama.modeling_llama as llama

    wrapper = llama.apply_rotary_pos_emb
    hf_internals.name_kernel_func_types()
    assert hf_internals.name_kernel_func_types() == []  # idempotent
    if importlib.util.find_spec("kernels") is None:
        assert not isinstance(wrapper, torch.nn.Module)
        return
    cls = type(wrapper)
    assert cls.__qualname__ == cls.__name__ == "_SpecVLMKernelFunc_apply_rotary_pos_emb"
    assert getattr(llama, cls.__name__) is cls and pickle.loads(pickle.dumps(cls)) is cls
    from tiny_models import tiny_llava

    attention = tiny_llava().model.language_model.layers[0].self_attn
    (private,) = attention._kernel_funcs.values()  # what a round's guards see
    copy = pickle.loads(pickle.dumps(private))
    assert type(copy) is cls and copy is not private
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    cos, sin = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    assert all(torch.equal(a, b) for a, b in zip(copy(q, k, cos, sin), wrapper(q, k, cos, sin)))


def test_pad_token_is_the_one_generate_prepared():
    from tiny_models import tiny_llava

    model = tiny_llava()
    config = model.generation_config
    config.pad_token_id, config.eos_token_id = None, [2, 5]
    model._prepare_special_tokens(config, True, device="cpu")
    assert hf_internals.pad_token_of(config) == 2  # no pad token: generate pads with the first EOS
    config.pad_token_id = 0
    model._prepare_special_tokens(config, True, device="cpu")
    assert hf_internals.pad_token_of(config) == 0


def test_a_text_configs_attention_implementation_picks_the_layers_function():
    """`ALL_ATTENTION_FUNCTIONS.valid_keys()` lists the registered names, and the layers built from a config read
    `config._attn_implementation` (over `_attn_implementation_internal`) at every forward: swapping the private
    attribute for a while routes their attention, and nothing else, to another function."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    names = hf_internals.attention_implementations()
    assert {"sdpa", "eager", "flex_attention"} <= names
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    AttentionInterface.register("specvlm_test_spy", spy)
    assert "specvlm_test_spy" in hf_internals.attention_implementations()
    config = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaModel(config).eval()
    tokens = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        expected = model(tokens).last_hidden_state
        with hf_internals.use_attention_implementation(model.config, "specvlm_test_spy"):
            assert model.config._attn_implementation == "specvlm_test_spy"
            routed = model(tokens).last_hidden_state
        assert len(calls) == 2 and model.config._attn_implementation == "sdpa"
        model(tokens)
        with hf_internals.use_attention_implementation(model.config, None):
            model(tokens)
    assert len(calls) == 2
    torch.testing.assert_close(routed, expected)


def test_merge_repeated_merges_repeats_and_keeps_random_and_written_values_apart():
    """`merge_repeated` (the round's inductor pass) on an aten graph: a repeated product becomes one; random draws,
    and a value a later node writes in place, stay separate; the graph computes what the function computes."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, w):
        first, second = x @ w, x @ w
        draws = torch.rand(3) - torch.rand(3)
        kept, written = torch.zeros(3), torch.zeros(3)
        written.add_(1)
        return first + second, draws, kept + written

    x, w = torch.randn(4, 5), torch.randn(5, 6)
    graph_module = make_fx(f)(x, w)

    def count(name):
        return sum(name in str(node.target) for node in graph_module.graph.nodes)

    assert (count("mm"), count("rand"), count("zeros")) == (2, 2, 2)
    assert hf_internals.merge_repeated(graph_module.graph) == 1
    graph_module.recompile()
    assert (count("mm"), count("rand"), count("zeros")) == (1, 2, 2)
    torch.manual_seed(0)
    expected = f(x, w)
    torch.manual_seed(0)
    got = graph_module(x, w)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert got[1].abs().sum() > 0 and got[2].tolist() == [1.0, 1.0, 1.0]


def test_merge_repeated_runs_as_an_inductor_pass():
    """inductor's `post_grad_custom_pre_pass` hook, patched for one compile (`compile_fx(config_patches=)`), runs the
    pass: the repeated product is computed once in the compiled code, with the same result."""
    import torch._dynamo
    from torch._inductor.utils import run_and_get_code

    before = hf_internals.MergeRepeatedCounts.removed

    def f(x, w):
        return (x @ w).sin() + (x @ w).cos()

    x, w = torch.randn(8, 16), torch.randn(16, 16)
    backend = hf_internals.inductor_backend(hf_internals.inductor_options(True))
    torch._dynamo.reset()
    got, code = run_and_get_code(torch.compile(f, backend=backend), x, w)
    torch._dynamo.reset()
    torch.testing.assert_close(got, f(x, w))
    assert (
        hf_internals.MergeRepeatedCounts.removed > before or "".join(code).count("mm(") == 1
    )  # merged now, or code cached merged
    assert "".join(code).count("mm(") == 1
    assert hf_internals.inductor_options(False) == {}


def test_check_same_size_raises_with_the_message_and_passes_equal_sizes():
    hf_internals.check_same_size(torch.zeros(3).shape[0], 3, "never raised")
    with pytest.raises(RuntimeError, match="the widths differ"):
        hf_internals.check_same_size(torch.zeros(3).shape[0], 4, "the widths differ")


def test_attention_with_lse_returns_sdpa_and_each_rows_log_sum_exp():
    """The private fused kernel the split-KV verify uses returns sdpa's attention and the log-sum-exp of each row's
    biased scores, also over strided views (chunks of a cache as batch entries, a bias broadcast over heads)."""
    from specvlm_hf.hf_internals import attention_with_lse

    generator = torch.Generator().manual_seed(5)
    query = torch.randn(1, 3, 5, 8, generator=generator).expand(2, -1, -1, -1)  # stride 0 over the batch
    cache = torch.randn(1, 3, 2 * 16, 8, generator=generator)
    key = cache.reshape(1, 3, 2, 16, 8).transpose(1, 2).reshape(2, 3, 16, 8)  # two chunks of the cache, as views
    value = torch.randn(2, 3, 16, 8, generator=generator)
    bias = torch.randn(2, 1, 5, 16, generator=generator).masked_fill(
        torch.rand(2, 1, 5, 16, generator=generator) < 0.3, -1e9
    )
    output, lse = attention_with_lse(query, key, value, bias.expand(-1, 3, -1, -1), 0.25)
    scores = query @ key.transpose(-1, -2) * 0.25 + bias
    torch.testing.assert_close(output, torch.softmax(scores, -1) @ value, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, scores.logsumexp(-1), atol=1e-5, rtol=1e-5)
    assert lse.shape == (2, 3, 5) and lse.dtype == torch.float32


def _projections(join: bool, bias: bool = False):
    """`f(x)`: three products of one input (q/k/v-like: 16, 8 and 8 rows; with `bias`, biases too), their weights
    (and biases) laid out in one storage (`join`) or each in its own."""
    generator = torch.Generator().manual_seed(3)
    rows = (16, 8, 8)
    modules = torch.nn.ModuleList(torch.nn.Linear(16, n, bias=bias) for n in rows)
    for name in ("weight", "bias") if bias else ("weight",):
        tensors = [
            torch.randn(n, 16, generator=generator)[:, : 16 if name == "weight" else 1].squeeze(-1) for n in rows
        ]
        if join:
            storage, start = torch.cat(tensors), 0
            tensors = []
            for n in rows:
                tensors.append(storage[start : start + n])
                start += n
        for module, tensor in zip(modules, tensors):
            setattr(module, name, torch.nn.Parameter(tensor, requires_grad=False))

    def f(x):
        q, k, v = (module(x) for module in modules)
        return (q.view(*x.shape[:-1], 2, 8) * k.view(*x.shape[:-1], 1, 8)).sum(-1) + v[..., :2]

    return f


def test_join_adjacent_products_joins_weights_that_follow_each_other():
    """`join_adjacent_products` (with `merge_repeated`, the round's inductor pass): products of one input by weights
    (and biases) lying one after the other in one storage become one product, sliced, with the same result; weights
    in storages of their own are left alone. Traced by AOT autograd and run eagerly, then compiled by inductor on the
    CPU, the joined layouts first: inductor's cache, whose key drops storage offsets, must not hand their code on."""
    import torch._dynamo
    from torch._inductor.utils import run_and_get_code

    for join, bias in ((True, False), (True, True), (False, False), (False, True)):
        f, x = _projections(join, bias), torch.randn(2, 5, 16)
        removed, joined = [], []
        torch._dynamo.reset()
        got = torch.compile(f, backend=hf_internals.aot_eager_merging_backend(removed, joined))(x)
        # one joined product rounds its sums apart from three (BLAS blocks them by the output's width)
        torch.testing.assert_close(got, f(x), rtol=1e-5, atol=1e-5)
        assert joined == ([2] if join else [0])
        backend = hf_internals.inductor_backend(hf_internals.inductor_options(True, join=True))
        torch._dynamo.reset()
        got, code = run_and_get_code(torch.compile(f, backend=backend), x)
        torch._dynamo.reset()
        torch.testing.assert_close(got, f(x), rtol=1e-5, atol=1e-5)
        assert "".join(code).count("mm(") == (1 if join else 3), (join, bias)
    assert hf_internals.merge_repeated_pass(True) is not hf_internals.merge_repeated_pass()
    assert hf_internals.inductor_options(False, join=True)["post_grad_custom_pre_pass"] is (
        hf_internals.merge_repeated_pass(True)
    )


def test_autotuned_gemms_are_an_inductor_option_it_knows():
    """`inductor_options(autotune_gemms=True)` patches inductor's `max_autotune_gemm` for one compile: a config key
    inductor knows (it refuses unknown ones), and the compiled product is still the product."""
    import torch._dynamo
    import torch._inductor.config

    options = hf_internals.inductor_options(False, autotune_gemms=True)
    assert options == {"max_autotune_gemm": True} and hasattr(torch._inductor.config, "max_autotune_gemm")
    assert "max_autotune_gemm" not in hf_internals.inductor_options(True)
    x, w = torch.randn(10, 32), torch.randn(32, 48)
    torch._dynamo.reset()
    got = torch.compile(lambda a, b: a @ b, backend=hf_internals.inductor_backend(options))(x, w)
    torch._dynamo.reset()
    torch.testing.assert_close(got, x @ w)
    assert not torch._inductor.config.max_autotune_gemm  # patched for that compile only


def test_joined_products_are_never_autotuned_even_when_the_process_asks():
    """With joined products, the round's compiles turn GEMM autotuning off even under a process-wide
    `torch._inductor.config.max_autotune` (a user's setting): inductor would time a joined product on a copy of its
    first weight alone, which the joined view reads past. The config inductor sees while it compiles is checked."""
    import torch._dynamo
    import torch._inductor.config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    seen = []

    class Recorder(CustomGraphPass):
        def __call__(self, graph):
            seen.append((torch._inductor.config.max_autotune, torch._inductor.config.max_autotune_gemm))

        def uuid(self):
            return None  # not cached: the pass runs on every compile

    options = hf_internals.inductor_options(True, join=True)
    assert options["max_autotune"] is False and options["max_autotune_gemm"] is False
    x, w = torch.randn(10, 32), torch.randn(32, 48)
    for join in (True, False):
        patches = {**hf_internals.inductor_options(True, join=join), "post_grad_custom_pre_pass": Recorder()}
        torch._dynamo.reset()
        with torch._inductor.config.patch(max_autotune=True, max_autotune_gemm=True, fx_graph_cache=False):
            got = torch.compile(lambda a, b: a @ b + 1, backend=hf_internals.inductor_backend(patches))(x, w)
        torch._dynamo.reset()
        torch.testing.assert_close(got, x @ w + 1)
    assert seen == [(False, False), (True, True)]


def test_scaled_product_rows_multiplies_the_dequantized_float8_operands():
    """`torch._scaled_mm` with one scale per row of each operand (the fp8 draft head's product)."""
    from specvlm_hf.hf_internals import scaled_product_rows

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(5, 32, generator=generator).to(torch.float8_e4m3fn)
    weight = torch.randn(48, 32, generator=generator).to(torch.float8_e4m3fn)
    inputs_scale = torch.rand(5, 1, generator=generator) + 0.5
    weight_scale = torch.rand(1, 48, generator=generator) + 0.5
    product = scaled_product_rows(inputs, inputs_scale, weight, weight_scale, torch.float32)
    expected = (inputs.float() * inputs_scale) @ (weight.float() * weight_scale.t()).t()
    assert product.shape == (5, 48) and product.dtype == torch.float32
    torch.testing.assert_close(product, expected, rtol=1e-5, atol=1e-5)


def test_version_of_counts_in_place_changes_but_not_writes_through_data():
    weight = torch.nn.Linear(3, 3).weight
    before = hf_internals.version_of(weight)
    with torch.no_grad():
        weight.mul_(2)
    assert hf_internals.version_of(weight) == before + 1
    weight.data.mul_(2)  # not counted (documented)
    assert hf_internals.version_of(weight) == before + 1
    with torch.inference_mode():
        made_there = torch.ones(2)
    assert hf_internals.version_of(made_there) is None
