"""The package's Triton kernels (`kernels.py`: the tree's top-k, the fp8 draft head's product), checked in Triton's CPU
interpreter (a subprocess with `TRITON_INTERPRET=1`, which must be set before Triton is imported): each kernel against
torch, the ops under `torch.compile`, and whole greedy decoding with the ops in every tree level."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from specvlm_hf import kernels
from specvlm_hf.adapters import adapter_for
from specvlm_hf.round import SpeculativeRound

TESTS = os.path.dirname(os.path.abspath(__file__))


def run_interpreted(code: str) -> str:
    """Runs `code` in a fresh interpreter with Triton's CPU interpreter on; returns its output (fails on error)."""
    # the kernels' loops have runtime bounds, which Triton's interpreter runs from 3.7 (3.5-3.6, with numpy 2, fail on
    # them; compiled on a GPU every version runs them)
    pytest.importorskip("triton", minversion="3.7", reason="the kernels' tests need Triton >= 3.7's CPU interpreter")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_a_round_registers_the_kernels_before_its_functions_are_compiled():
    """A round asks `kernels.choices` what it runs when it is built, which registers the custom ops then: a first
    registration inside a traced round function broke its graph (on an H100 the draft function could not be compiled
    ahead of time, and the first new length bucket took 18 s). A whole-graph compile of a function on the ops, in a
    fresh process, must not break."""
    out = run_interpreted(
        """
        import torch
        from specvlm_hf import kernels
        assert kernels._OPS is False  # a fresh process: nothing registered yet
        chosen = kernels.choices(torch.device("cpu"))  # what `SpeculativeRound.__init__` calls
        def level(x, q, mask):
            values, indices = kernels.top_k_rows(x, 3, fused=True)
            return values, indices, kernels.tree_attention(q, q, q, mask, 0.25)
        compiled = torch.compile(level, fullgraph=True, backend="eager")
        x, q = torch.randn(2, 50), torch.randn(1, 2, 4, 16)
        got, expected = compiled(x, q, torch.zeros(1, 1, 4, 4)), level(x, q, torch.zeros(1, 1, 4, 4))
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        print("chosen", chosen)
        """
    )
    assert "chosen (True, True, True)" in out, out


def test_rounds_on_the_kernels_are_compiled_ahead_of_time_and_stay_exact(tmp_path):
    """The fast path on the kernels (the tree's top-k, the attention) with a store of rounds compiled ahead of time,
    in a fresh process: all three round functions compile whole (none falls back to compiling in process, as the
    draft's did on an H100 while the ops' first registration sat inside its trace), at three length buckets, and
    every call equals plain `generate`."""
    out = run_interpreted(
        f"""
        import json, torch
        torch.set_num_threads(1)
        import test_precompile
        print("RESULT " + json.dumps(test_precompile.run_calls({str(tmp_path / "rounds")!r})))
        """
    )
    result = json.loads(out.split("RESULT ")[1].splitlines()[0])
    assert all(result["equal"]) and len(set(result["buckets"])) == 3, result
    assert (result["compiled"], result["loaded"]) == (3, 0), result


def test_the_kernels_equal_torch_topk_and_break_ties_to_the_smaller_index():
    out = run_interpreted(
        """
        import torch
        from specvlm_hf.kernels import chunk_width, top_k_rows
        generator = torch.Generator().manual_seed(0)
        shapes = [(10, 32064, 10), (1, 32064, 10), (1, 100, 10), (3, 700, 5), (2, 10, 10), (4, 8192, 10),
                  (2, 152064, 10), (5, 4097, 1)]
        for rows, width, k in shapes:
            chunks = -(-width // chunk_width(rows, width))
            x = torch.randn(rows, width, generator=generator)
            values, indices = top_k_rows(x, k, fused=True)
            expected = x.topk(k, dim=-1)
            assert values.dtype == torch.float32 and indices.dtype == torch.long
            assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices), (rows, width)
            print("shape", rows, width, k, chunks)
        x = (torch.randperm(256, generator=generator) - 128).reshape(2, 128).to(torch.bfloat16)  # distinct, exact
        values, indices = top_k_rows(x, 10, fused=True)
        assert values.dtype == torch.bfloat16 and torch.equal(values, x.topk(10).values)
        assert torch.equal(indices, x.topk(10).indices)
        x = torch.zeros(3, 3000)
        x[0, 5] = x[0, 2900] = 1.0  # ties, in two chunks
        x[1] = float("-inf")
        x[1, 2999] = 0.0  # one finite entry: the rest of the top 4 are -inf, smallest indices first
        x[2, 7] = float("nan")
        values, indices = top_k_rows(x, 4, fused=True)
        assert indices[0].tolist() == [5, 2900, 0, 1], indices[0]
        assert indices[1].tolist() == [2999, 0, 1, 2] and values[1, 1:].eq(float("-inf")).all(), indices[1]
        assert indices[2, 0] == 7 and values[2, 0] == float("inf"), (indices[2], values[2])
        batched = torch.randn(2, 3, 5000, generator=generator)
        values, indices = top_k_rows(batched, 10, fused=True)
        assert values.shape == (2, 3, 10) and torch.equal(indices, batched.topk(10, dim=-1).indices)
        print("special cases")
        """
    )
    assert out.count("shape ") == 8 and "special cases" in out
    assert "shape 10 32064 10 16" in out, "a tree level's block runs as several chunks, merged by the second kernel"
    assert "shape 1 100 10 1" in out, "a frontier's 100 candidates run as one chunk"


def test_the_custom_op_compiles_whole_and_gives_the_same_values():
    out = run_interpreted(
        """
        import torch
        from specvlm_hf.kernels import top_k_rows

        def level(logits):
            return top_k_rows(torch.log_softmax(logits.float(), dim=-1), 10, fused=True)

        compiled = torch.compile(level, backend="aot_eager", fullgraph=True)
        logits = torch.randn(10, 32064, generator=torch.Generator().manual_seed(1))
        expected = torch.log_softmax(logits, dim=-1).topk(10, dim=-1)
        for result in (level(logits), compiled(logits)):
            assert torch.equal(result[0], expected.values) and torch.equal(result[1], expected.indices)
        print("compiled ok")
        """
    )
    assert "compiled ok" in out


def test_greedy_decoding_with_the_op_in_every_tree_level_equals_plain_generate():
    out = run_interpreted(
        """
        import torch
        import specvlm_hf
        from specvlm_hf import kernels
        from tiny_models import oracle_draft, random_inputs, tiny_llava

        calls = []
        launch = kernels.launch_top_k
        kernels.launch_top_k = lambda x, k, *out: calls.append(tuple(x.shape)) or launch(x, k, *out)
        kernels.ATTENTION = False  # the models' own attention: this test is the top-k op's (the interpreter is slow)
        generator = torch.Generator().manual_seed(3)
        rounds = 0
        for factory in (tiny_llava,):  # the op sees log-probabilities only: one family is enough
            target = specvlm_hf.enable(factory(scale=32.0))
            for case, noise in enumerate((0.0, 0.003)):
                draft = oracle_draft(target, noise=noise)
                inputs = random_inputs(target, generator, text_tokens=3 + case)
                kwargs = dict(do_sample=False, max_new_tokens=14)
                plain = target.generate(**inputs, **kwargs).tolist()
                for fast in ({}, {"cache_implementation": "static"})[case:]:
                    assert target.generate(**inputs, **kwargs, **fast, assistant_model=draft).tolist() == plain
                    rounds += draft.stats.rounds
        print("rounds", rounds, "calls", len(calls), "shapes", sorted(set(calls)))
        """
    )
    rounds = int(out.split("rounds ")[1].split()[0])
    calls = int(out.split("calls ")[1].split()[0])
    assert rounds > 5 and calls >= 9 * rounds, out  # per round: the root, 7 levels and 7 frontiers at least


def test_on_the_cpu_without_the_interpreter_the_tree_takes_torch_topk():
    assert not kernels.fused_top_k_usable(torch.device("cpu")) or os.environ.get("TRITON_INTERPRET") == "1"
    x = torch.randn(4, 300)
    values, indices = kernels.top_k_rows(x, 6, fused=True)
    expected = x.topk(6, dim=-1)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)


def test_the_choices_are_part_of_the_fast_paths_key(monkeypatch):
    """Rounds built with and without each op must not share compiled functions or graphs."""
    from test_lossless_greedy import build_draft, build_target

    target = build_target("llava")
    draft = build_draft(target, "oracle", "tree")
    adapter = adapter_for(target)
    monkeypatch.setattr(kernels, "_runs_kernels", lambda device: True)
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    keys = {SpeculativeRound.static_key(adapter, draft, 256, graphs=True, compile=True)}
    monkeypatch.setattr(kernels, "FUSED", False)
    keys.add(SpeculativeRound.static_key(adapter, draft, 256, graphs=True, compile=True))
    monkeypatch.setattr(kernels, "FP8_KERNEL", False)
    keys.add(SpeculativeRound.static_key(adapter, draft, 256, graphs=True, compile=True))
    monkeypatch.setattr(kernels, "ATTENTION", False)
    keys.add(SpeculativeRound.static_key(adapter, draft, 256, graphs=True, compile=True))
    assert len(keys) == 4


def test_the_fp8_head_kernel_equals_the_dequantized_head_product():
    out = run_interpreted(
        """
        import torch
        from specvlm_hf.kernels import fp8_product
        from specvlm_hf.modeling_specvlm_draft import fp8_rows_padded

        generator = torch.Generator().manual_seed(0)
        for rows, hidden, vocab in [(10, 256, 1000), (1, 384, 77), (17, 200, 300), (9, 4096, 640)]:
            head = torch.randn(vocab, hidden, generator=generator) / 16
            weight, scale, count = fp8_rows_padded(head, "cpu")
            dequantized = (weight.float() * scale.t())[:count]
            states = torch.randn(rows, hidden, generator=generator)
            for dtype in (torch.float32, torch.bfloat16):
                x = states.to(dtype)
                got = fp8_product(x, weight, scale, count)
                assert got.shape == (rows, count) and got.dtype == torch.float32
                torch.testing.assert_close(got, x.float() @ dequantized.t(), rtol=1e-4, atol=1e-4)
            print("shape", rows, hidden, vocab)
        product = lambda x: fp8_product(x, weight, scale, count)  # noqa: E731
        compiled = torch.compile(product, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(states), states @ dequantized.t(), rtol=1e-4, atol=1e-4)
        print("compiled ok")
        """
    )
    assert out.count("shape ") == 4 and "compiled ok" in out


def test_greedy_decoding_with_the_fp8_head_kernel_equals_plain_generate():
    out = run_interpreted(
        """
        import torch
        import specvlm_hf
        from specvlm_hf import kernels
        from tiny_models import oracle_draft, random_inputs, tiny_llava

        calls = []
        launch = kernels.launch_fp8
        kernels.launch_fp8 = lambda *args: calls.append(args[0].shape) or launch(*args)
        kernels.ATTENTION = False  # the models' own attention: this test is the fp8 head's (the interpreter is slow)
        target = specvlm_hf.enable(tiny_llava(scale=32.0))
        generator = torch.Generator().manual_seed(6)
        rounds = 0
        for case, noise in enumerate((0.0, 0.003)):
            draft = oracle_draft(target, noise=noise).use_fp8_head()
            inputs = random_inputs(target, generator, text_tokens=3 + case)
            kwargs = dict(do_sample=False, max_new_tokens=14)
            plain = target.generate(**inputs, **kwargs).tolist()
            fast = {"cache_implementation": "static"} if case else {}
            assert target.generate(**inputs, **kwargs, **fast, assistant_model=draft).tolist() == plain
            rounds += draft.stats.rounds
        print("rounds", rounds, "calls", len(calls))
        """
    )
    rounds = int(out.split("rounds ")[1].split()[0])
    calls = int(out.split("calls ")[1].split()[0])
    assert rounds >= 2 and calls >= 8 * rounds, out  # the head at every draft forward (7 tree levels, the catch-up)


def test_the_attention_kernels_equal_sdpa():
    """`specvlm::tree_attention` against sdpa: GQA, batches with their own masks or one for every row, several query
    blocks, slice and step counts that are not powers of two (a last slice that passes the cache), tiles no query
    sees (their reads, and by the branch their arithmetic, skipped), bf16 and fp16, a query given as a transposed view,
    and a query that sees nothing (zeros)."""
    out = run_interpreted(
        """
        import torch
        from specvlm_hf import kernels
        generator = torch.Generator().manual_seed(0)
        cases = [  # batch, heads, key heads, queries, width, dtype
            (1, 4, 4, 60, 1024, torch.float32), (2, 4, 2, 12, 320, torch.float32), (1, 2, 1, 1, 40, torch.float32),
            (3, 4, 4, 20, 600, torch.float32), (1, 4, 4, 10, 512, torch.float32), (1, 2, 2, 7, 200, torch.bfloat16),
            (1, 2, 2, 7, 200, torch.float16),  # whose mask minimum, -65504, still hides a slot
        ]
        for rows, branch, programs in ((None, False, 256), (16, True, 12)):  # (few programs: slices of many steps)
            kernels.ATTENTION_ROWS, kernels.ATTENTION_BRANCH, kernels.ATTENTION_PROGRAMS = rows, branch, programs
            for batch, heads, key_heads, queries, width, dtype in cases:
                query = torch.randn(batch, queries, heads, 16, generator=generator).transpose(1, 2).to(dtype)
                key, value = (torch.randn(batch, key_heads, width, 16, generator=generator).to(dtype) for _ in "kv")
                visible = torch.rand(batch, 1, queries, width, generator=generator) < 0.4
                visible[..., width // 2 :] = False  # the unused end of a bucket: whole tiles no query sees
                visible[..., : width // 4] = True
                visible[0, 0, -1] = False  # this query sees nothing
                mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(dtype).min).to(dtype)
                for shared in (False, True):
                    m = mask[:1] if shared else mask
                    got = kernels.tree_attention(query, key, value, m, 0.25)
                    inputs = (t.float() for t in (query, key, value))
                    expected = kernels.reference_tree_attention(*inputs, m, 0.25)  # (the mask's dtype says what hides)
                    assert got.shape == (batch, queries, heads, 16) and got.dtype == dtype
                    assert got[0, -1].eq(0).all()
                    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
                    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance)
                    tiling = kernels.attention_tiling(batch * heads, queries, width)
                    print("case", rows, batch, heads, key_heads, queries, width, tiling)
        odd = torch.zeros(1, 1, 2, 80)  # heads of 80: not a tile width
        try:
            kernels.tree_attention(odd, odd, odd, torch.zeros(1, 1, 2, 2), 1.0)
        except ValueError as error:
            print("refused", "16, 32, 64, 128 or 256" in str(error))
        """
    )
    assert "refused True" in out, out
    assert out.count("case ") == 28, out
    assert "case None 1 4 4 60 1024 (32, 1)" in out, "60 queries run as two blocks of 32"
    assert "case 16 1 4 4 60 1024 (16, 16)" in out, "or four of 16, each over one slice of 16 steps"
    assert "case 16 1 4 4 10 512 (16, 3)" in out, "three slices of three steps (the last one's third step outside)"
    assert "case 16 3 4 4 20 600 (16, 10)" in out, "one slice of ten steps (the last one partly outside)"


def test_greedy_decoding_with_the_attention_kernels_equals_plain_generate():
    """The fast path's verify and draft forwards on `specvlm::tree_attention` (the default where the kernels run):
    tokens and every logit equal plain `generate`; the eager tree loop keeps the models' own attention."""
    out = run_interpreted(
        """
        import torch
        from family_checks import assert_logits_match_plain
        from test_lossless_greedy import build_draft, build_target
        from tiny_models import random_inputs
        from specvlm_hf import kernels, round as round_module

        round_module.LENGTH_BUCKET = 16  # caches of several slices
        calls = []
        launch = kernels.launch_tree_attention
        kernels.launch_tree_attention = lambda q, *args: calls.append(q.shape[2]) or launch(q, *args)
        target = build_target("llava-gqa")
        inputs = random_inputs(target, torch.Generator().manual_seed(4), text_tokens=3, image=True)
        assert_logits_match_plain(target, inputs, cache_implementation="static")  # tokens and every logit
        print("static calls", len(calls), "queries", sorted(set(calls)))
        before = len(calls)
        kwargs = dict(do_sample=False, max_new_tokens=10)
        draft = build_draft(target, "noisy", "tree")
        plain = target.generate(**inputs, **kwargs).tolist()
        assert target.generate(**inputs, **kwargs, assistant_model=draft).tolist() == plain
        print("eager calls", len(calls) - before)
        """
    )
    queries = out.split("queries ")[1].split("\n")[0]
    assert "60" in queries and "10" in queries, out  # the verify's tree, a draft level's frontier
    assert int(out.split("static calls ")[1].split()[0]) > 20 and "eager calls 0" in out, out
