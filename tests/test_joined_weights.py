"""`joined_weights.join_projection_weights`: q/k/v and gate/up weights laid out one after the other in one storage,
for the fast path's joined products (`round.JOIN_PROJECTIONS`), without changing the model: the same parameters,
values, outputs and saved checkpoints."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from specvlm_hf.joined_weights import adjacent, join_projection_weights, projection_groups


def tiny_llama():
    config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    config.vocab_size = 64
    return LlamaForCausalLM(config).eval()


def test_joined_layout_keeps_parameters_values_outputs_and_checkpoints(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 9))
    before = {name: (parameter, parameter.detach().clone()) for name, parameter in model.named_parameters()}
    expected = model(ids).logits
    assert join_projection_weights(model) == 4  # 2 layers x (q/k/v, gate/up)
    groups = projection_groups(model)
    assert len(groups) == 4 and all(adjacent([member.weight for member in group]) for group in groups)
    for name, parameter in model.named_parameters():  # the same Parameter objects, the same values
        assert parameter is before[name][0] and torch.equal(parameter, before[name][1])
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.weight.untyped_storage().data_ptr() == attention.q_proj.weight.untyped_storage().data_ptr()
    torch.testing.assert_close(model(ids).logits, expected)
    assert join_projection_weights(model) == 0  # already laid out
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    for name, parameter in reloaded.named_parameters():
        assert torch.equal(parameter, before[name][1]), name
    model.to(torch.float64)  # each weight in a storage of its own again: laid out anew
    assert not adjacent([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    assert join_projection_weights(model) == 4


def test_biases_are_laid_out_beside_each_other_too(tmp_path):
    config = Qwen2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2
    )
    config.vocab_size = 64
    model = Qwen2ForCausalLM(config).eval()  # q/k/v with biases, gate/up without
    ids = torch.randint(0, 64, (1, 9))
    expected, before = model(ids).logits, {k: v.clone() for k, v in model.state_dict().items()}
    assert join_projection_weights(model) == 2
    attention = model.model.layers[0].self_attn
    assert adjacent([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias])
    torch.testing.assert_close(model(ids).logits, expected)
    model.save_pretrained(tmp_path)
    reloaded = Qwen2ForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(value, before[name]) for name, value in reloaded.state_dict().items())


def test_only_plain_projections_of_one_input_and_one_kind_are_joined():
    llama = tiny_llama()
    llama.model.layers[0].self_attn.k_proj.bias = torch.nn.Parameter(torch.zeros(16))  # biases on some members only
    assert len(projection_groups(llama)) == 3
    llama.model.layers[0].mlp.up_proj.weight.data = llama.model.layers[0].mlp.up_proj.weight.data.double()
    assert len(projection_groups(llama)) == 2  # dtypes differ in one group too
    with torch.inference_mode():  # laid out in plain tensors even so: the model trains afterwards
        join_projection_weights(llama)
    assert not llama.model.layers[1].mlp.gate_proj.weight.is_inference()


def test_the_fast_path_with_joined_projections_equals_plain_generate_on_qwen2_5_vl(monkeypatch):
    """Qwen2.5-VL (q/k/v with biases, M-RoPE) through the round functions compiled with the joining pass (AOT
    autograd on the CPU): tokens and every logit as plain `generate`, and products with biases were joined."""
    import torch._dynamo
    from torch._dynamo.backends.common import aot_autograd

    import specvlm_hf
    from family_checks import assert_greedy_matches_plain, assert_logits_match_plain
    from specvlm_hf import decoding, hf_internals, round as round_module
    from tiny_families import FAMILIES, family_inputs

    joined_with_bias = []

    def joining(graph_module, example_inputs):  # the round's pass, then: how many joined products add a bias
        hf_internals.merge_repeated(graph_module.graph)
        hf_internals.join_adjacent_products(graph_module.graph)
        addmm, as_strided = torch.ops.aten.addmm.default, torch.ops.aten.as_strided.default
        nodes = graph_module.graph.find_nodes(op="call_function", target=addmm)
        joined_with_bias.append(sum(node.args[0].target is as_strided for node in nodes))
        graph_module.recompile()
        return graph_module

    options = {"dynamic": False, "backend": aot_autograd(fw_compiler=joining)}
    monkeypatch.setattr(round_module, "COMPILE_OPTIONS", options)
    monkeypatch.setattr(round_module, "JOIN_PROJECTIONS", True)
    monkeypatch.setattr(decoding, "fast_path_options", lambda *args: (False, True))  # compile, no CUDA graphs
    torch._dynamo.reset()
    target = specvlm_hf.enable(FAMILIES["qwen2_5_vl"](seed=0))
    generator = torch.Generator().manual_seed(3)
    assert_greedy_matches_plain(target, family_inputs, [("oracle", 1), ("noisy", 0)], "static", generator, 12, 3)
    inputs = family_inputs(target, torch.Generator().manual_seed(5))
    assert_logits_match_plain(target, inputs, cache_implementation="static")
    attention = target.model.language_model.layers[0].self_attn
    assert attention.q_proj.bias is not None and adjacent([attention.q_proj.bias, attention.k_proj.bias])
    assert max(joined_with_bias) >= len(target.model.language_model.layers), joined_with_bias  # the verify's q/k/v
    torch._dynamo.reset()


def test_joined_projections_with_autotuned_gemms_are_refused(monkeypatch):
    """`round.JOIN_PROJECTIONS` with `round.AUTOTUNE_GEMMS`: inductor would time each joined product on a copy of its
    first weight alone, which the joined view reads past (on an H100: a storage error, then an illegal memory access).
    The fast path refuses the pair before anything compiles, naming both switches."""
    import pytest

    import specvlm_hf
    from family_checks import make_draft
    from specvlm_hf import decoding, round as round_module
    from tiny_families import FAMILIES, family_inputs

    monkeypatch.setattr(round_module, "JOIN_PROJECTIONS", True)
    monkeypatch.setattr(round_module, "AUTOTUNE_GEMMS", True)
    monkeypatch.setattr(decoding, "fast_path_options", lambda *args: (False, True))  # compile, no CUDA graphs
    target = specvlm_hf.enable(FAMILIES["qwen2_5_vl"](seed=0))
    inputs = family_inputs(target, torch.Generator().manual_seed(2))
    draft = make_draft(target, "oracle", "static")
    with pytest.raises(ValueError, match="JOIN_PROJECTIONS and AUTOTUNE_GEMMS cannot both be on"):
        target.generate(**inputs, max_new_tokens=4, cache_implementation="static", assistant_model=draft)
    monkeypatch.setattr(round_module, "AUTOTUNE_GEMMS", False)  # either one alone runs
    monkeypatch.setattr(decoding, "fast_path_options", lambda *args: (False, False))
    output = target.generate(**inputs, max_new_tokens=4, cache_implementation="static", assistant_model=draft)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 4
