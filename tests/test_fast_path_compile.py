"""The fast path compiles its round functions once for every cache length (issue 13), traced on the CPU."""

from __future__ import annotations

import pytest
import torch
from test_lossless_greedy import build_draft, build_target
from tiny_models import random_inputs


@pytest.fixture
def counted_compile(monkeypatch):
    """The fast path compiled (AOT autograd, no code generation) without CUDA graphs, with a frame counter."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    from specvlm_hf import decoding, round as round_module

    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(round_module, "COMPILE_OPTIONS", {"backend": counter})
    monkeypatch.setattr(round_module, "LENGTH_BUCKET", 16)
    monkeypatch.setattr(decoding, "fast_path_options", lambda *args: (False, True))
    torch._dynamo.reset()
    yield counter
    torch._dynamo.reset()


@pytest.mark.parametrize("verify_attention", [None, "specvlm_split_kv"], ids=["sdpa", "split-kv"])
def test_round_functions_compile_once_for_every_length_bucket(counted_compile, verify_attention, monkeypatch):
    """Also with the split-KV verify kernel, whose chunk count follows the (dynamic) cache width: one compile, no
    graph break."""
    from specvlm_hf import round as round_module, verify_attention as kernels

    monkeypatch.setattr(round_module, "VERIFY_ATTENTION", verify_attention)
    monkeypatch.setattr(kernels, "CHUNK", 16)  # 2 to 5 chunks in these buckets
    torch._dynamo.utils.counters.clear()
    target = build_target("llava-gqa")
    draft = build_draft(target, "noisy", "tree")
    draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = 3, 3, 10  # quicker to trace
    generator = torch.Generator().manual_seed(13)
    lengths = set()
    for case, (text_tokens, new_tokens) in enumerate([(3, 12), (20, 30), (3, 12), (45, 20)]):
        inputs = random_inputs(target, generator, text_tokens=text_tokens, image=case != 2)
        kwargs = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
        fast = target.generate(**inputs, **kwargs, assistant_model=draft, cache_implementation="static")
        assert fast.tolist() == target.generate(**inputs, **kwargs).tolist()
        lengths.add(draft._specvlm_static_round.length)
        if case == 0:
            first = counted_compile.frame_count
    assert len(lengths) >= 3, lengths  # several buckets really ran
    assert first == 3 and counted_compile.frame_count == 3, (first, counted_compile.frame_count)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    # the verify graph (the second one traced) runs the chosen kernel: sdpa, or the split-KV kernel's GEMMs
    verify_code = counted_compile.graphs[1].code
    assert ("scaled_dot_product_attention" in verify_code) == (verify_attention is None), verify_code[:2000]
    assert ("_scaled_dot_product_flash_attention_for_cpu" in verify_code) == (verify_attention is not None)


def test_an_fp8_draft_head_compiles_into_the_draft_graph_without_breaks(counted_compile):
    """`draft.use_fp8_head()`: the draft's round function traces the row-scaled float8 product (no graph break),
    once for every length, and the output stays plain `generate`'s."""
    torch._dynamo.utils.counters.clear()
    target = build_target("llava-gqa")
    draft = build_draft(target, "noisy", "tree").use_fp8_head()
    draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = 3, 3, 10
    generator = torch.Generator().manual_seed(5)
    for text_tokens in (3, 30):
        inputs = random_inputs(target, generator, text_tokens=text_tokens)
        kwargs = {"do_sample": False, "max_new_tokens": 12, "min_new_tokens": 12}
        fast = target.generate(**inputs, **kwargs, assistant_model=draft, cache_implementation="static")
        assert fast.tolist() == target.generate(**inputs, **kwargs).tolist()
    assert counted_compile.frame_count == 3
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert "_scaled_mm" in counted_compile.graphs[0].code  # the draft's round function


def test_recompiles_past_torch_limit_warn():
    """torch stops compiling a function past its recompile limit (later shapes run uncompiled): the fast path's
    backend says so instead of slowing down silently."""
    import torch._dynamo

    from specvlm_hf.round import CountingBackend

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x * 2, backend=CountingBackend("_verify", "eager"))
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=2):
        compiled(torch.ones(2))
        with pytest.warns(UserWarning, match="compiled 2 times, torch's recompile limit"):
            compiled(torch.ones(3))
    torch._dynamo.reset()


def test_warmup_prepares_every_bucket_then_the_first_call_compiles_nothing(
    counted_compile, tmp_path, capsys, monkeypatch
):
    import specvlm_hf
    from specvlm_hf.startup import bucket_lengths

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # warmup points it at cache_dir; undone after
    target = build_target("llava-gqa")
    draft = build_draft(target, "noisy", "tree")
    report = specvlm_hf.warmup(
        target, draft, max_length=60, cache_dir=str(tmp_path), inference_mode=False, tree=(3, 3, 10)
    )
    assert report.tree == {"shape": [3, 3, 10]} and draft.config.tree_total_tokens == 10
    # + 14 slots of tree room; longest first, so that every bucket stays kept (their target caches share its memory)
    assert report.buckets == bucket_lengths(draft, 60)[::-1] == [80, 64, 48, 32], report
    kept = draft._specvlm_fast_paths.by_length()
    assert sorted(kept) == [32, 48, 64, 80] and not any(path.target_window.stale for path in kept.values())
    assert len(report.seconds) == 4 and report.total_seconds >= sum(report.seconds)
    progress = capsys.readouterr().err
    assert "specvlm warmup" in progress and "4/4" in progress, progress
    assert report.saved_to is None or (tmp_path / "specvlm_compile_artifacts.bin").exists()
    assert counted_compile.frame_count == 3  # one graph per round function, for every bucket
    # cache_dir keeps the round functions, compiled ahead of time (tests/test_precompile.py: a new process loads them)
    assert report.round_functions == {"loaded": 0, "compiled": 3}
    assert len(list((tmp_path / "rounds").glob("*.pt2"))) == 3
    generator = torch.Generator().manual_seed(2)
    for text_tokens, new_tokens in [(30, 10), (3, 8)]:  # the real calls: other buckets, nothing compiled
        inputs = random_inputs(target, generator, text_tokens=text_tokens)
        kwargs = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
        fast = target.generate(**inputs, **kwargs, assistant_model=draft, cache_implementation="static")
        assert fast.tolist() == target.generate(**inputs, **kwargs).tolist()
        assert draft._specvlm_fast_path is kept[draft._specvlm_fast_path.length]  # prepared by warmup, not rebuilt
    assert draft._specvlm_fast_paths.by_length() == kept
    assert counted_compile.frame_count == 3  # the calls at other buckets compiled nothing


def test_warmup_tree_auto_sets_the_chosen_shape(monkeypatch):
    from specvlm_hf import startup, tree_auto

    target = build_target("llava-gqa")
    draft = build_draft(target, "noisy", "tree")
    calls = []

    def fake_measure(target_, draft_, inputs, **kwargs):
        calls.append(inputs["input_ids"])
        return {16: 2.0, 60: 8.0}, 0.5, 0.7

    monkeypatch.setattr(tree_auto, "measure_costs", fake_measure)
    result = startup.set_tree(target, draft, "auto", torch.device("cpu"), {}, True)
    expected = tree_auto.choose_tree(lambda k, d, t: (d + 1) * 0.5 + tree_auto.interpolate({16: 2.0, 60: 8.0})(t), 0.7)
    assert (
        tuple(result["shape"])
        == expected
        == (
            draft.config.tree_top_k,
            draft.config.tree_depth,
            draft.config.tree_total_tokens,
        )
    )
    assert calls and not (calls[0] == target.config.image_token_id).any()  # a prompt with no placeholder
    assert startup.set_tree(target, draft, "paper", None, {}, True)["shape"] == [10, 7, 60]
    with pytest.raises(ValueError, match="tree must be"):
        startup.set_tree(target, draft, (1, 2), None, {}, True)


def test_measure_costs_times_each_width_and_restores_the_tree():
    from specvlm_hf import tree_auto

    target = build_target("llava-gqa")
    draft = build_draft(target, "oracle", "tree")
    draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = 3, 2, 9
    inputs = random_inputs(target, torch.Generator().manual_seed(6), text_tokens=4)
    verify, draft_step_ms, alpha = tree_auto.measure_costs(target, draft, inputs, widths=(4, 8), new_tokens=6)
    assert sorted(verify) == [4, 8] and all(ms > 0 for ms in verify.values()) and draft_step_ms > 0
    assert 0.5 < alpha <= 0.95  # an oracle draft: its guesses are accepted
    assert (draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens) == (3, 2, 9)


def test_large_batches_run_graphs_over_eager_kernels():
    """Above `COMPILE_MAX_BATCH` rows the fast path keeps its CUDA graphs, uncompiled (as measured when the round
    traced one draft pass per row); `disable_compile` turns it off at any size."""
    from types import SimpleNamespace

    from specvlm_hf.round import COMPILE_MAX_BATCH, fast_path_options

    target = build_target("llava-gqa")
    draft = build_draft(target, "noisy", "tree")
    cuda, config = torch.device("cuda"), SimpleNamespace()  # the options only read the device type
    assert fast_path_options(target, draft, cuda, config) == (True, True)
    assert fast_path_options(target, draft, cuda, config, COMPILE_MAX_BATCH) == (True, True)
    assert fast_path_options(target, draft, cuda, config, COMPILE_MAX_BATCH + 1) == (True, False)
    assert fast_path_options(target, draft, cuda, SimpleNamespace(disable_compile=True)) == (True, False)
    assert fast_path_options(target, draft, torch.device("cpu"), config) == (False, False)


def test_the_batched_round_compiles_to_graphs_that_do_not_grow_with_the_batch(counted_compile):
    """The batched round's three functions each trace whole (one graph each, no graph breaks) and, the draft running
    one forward per tree level for every row, to as many operations for 4 rows as for 2 (the first three graphs:
    the call's batch; rows that finish first move to a smaller batch, compiled after)."""
    import torch._dynamo

    from test_batched import left_pad

    target = build_target("llava-gqa")
    draft = build_draft(target, "noisy", "tree")
    draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = 3, 3, 10  # quicker to trace
    draft.config.max_speculative_batch = 4
    generator = torch.Generator().manual_seed(3)
    rows = [random_inputs(target, generator, text_tokens=3 + 2 * row, image=row % 2 == 0) for row in range(4)]
    kwargs = {"do_sample": False, "max_new_tokens": 8, "min_new_tokens": 8, "eos_token_id": None}
    ops = {}
    for size in (2, 4):
        torch._dynamo.reset()
        counted_compile.clear()
        batch = left_pad(rows[:size], [0, 3, 1, 0][:size])
        fast = target.generate(**batch, **kwargs, assistant_model=draft, cache_implementation="static")
        assert fast.tolist() == target.generate(**batch, **kwargs).tolist()
        assert draft.stats.rows_per_round[0] == size and draft.stats.rounds > 2
        moves = len(set(draft.stats.rows_per_round)) - 1  # smaller batches the rows moved to: 3 graphs each
        assert counted_compile.frame_count == 3 * (1 + moves), (counted_compile.frame_count, moves)
        ops[size] = [sum("call" in node.op for node in graph.graph.nodes) for graph in counted_compile.graphs[:3]]
    assert ops[2] == ops[4], ops


def _symbolic_guards(monkeypatch, layers: int) -> int:
    """Symbolic-shape guards dynamo adds while tracing the fast path's round functions for a target of `layers`
    layers (counted from torch's `dynamic` log, whose guard records begin with "eval ")."""
    import logging

    import torch._dynamo
    import torch._logging

    import specvlm_hf
    import tiny_models
    from specvlm_hf import decoding, round as round_module

    monkeypatch.setattr(round_module, "COMPILE_OPTIONS", {"backend": "eager"})
    monkeypatch.setattr(decoding, "fast_path_options", lambda *args: (False, True))
    text_config = tiny_models.text_config
    with monkeypatch.context() as patch:
        patch.setattr(tiny_models, "text_config", lambda *a, **k: text_config(*a, **{**k, "layers": layers}))
        target = specvlm_hf.enable(tiny_models.tiny_llava(seed=0, scale=32.0))
    draft = build_draft(target, "noisy", "tree")
    draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = 3, 3, 10  # quicker to trace
    inputs = random_inputs(target, torch.Generator().manual_seed(5), text_tokens=6)
    kwargs = {"do_sample": False, "max_new_tokens": 8}

    class Count(logging.Handler):
        guards = 0

        def emit(self, record):
            self.guards += record.getMessage().startswith("eval ")

    handler = Count()
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    torch._dynamo.reset()
    torch._logging.set_logs(dynamic=logging.INFO)
    logger.addHandler(handler)
    try:
        with torch.inference_mode():  # as a server runs
            fast = target.generate(**inputs, **kwargs, assistant_model=draft, cache_implementation="static")
            assert fast.tolist() == target.generate(**inputs, **kwargs).tolist()
    finally:
        logger.removeHandler(handler)
        torch._logging.set_logs()
        torch._dynamo.reset()
    return handler.guards


@pytest.mark.parametrize("stacked", [False, True])
def test_compiled_rounds_keep_the_target_layers_apart(monkeypatch, stacked):
    """A new process traces and guards the compiled round functions again (the disk cache saves code generation
    only). Target layers that were views of one dynamic-width tensor gave each layer symbolic storage offsets and
    guards relating them to the other layers' (5 guards a layer here); checking those in sympy took most of a new
    process's first call (39 s against 13 s on a 32-layer CPU miniature; 40-54 s on the 7B shape). Compiled
    rounds keep the layers in storages of their own (3 guards a layer); the stacked layout, still used by graphs
    over eager kernels, is checked to be the other one, so that this test tells them apart."""
    from specvlm_hf import round as round_module

    monkeypatch.setattr(round_module, "STACK_COMPILED_LAYERS", stacked)
    two, six = (_symbolic_guards(monkeypatch, layers) for layers in (2, 6))
    per_layer = (six - two) / 4
    assert (per_layer > 3) == stacked, (two, six)


def test_graph_capture_runs_without_cyclic_garbage_collection(monkeypatch):
    """An old round kept in a reference cycle is freed by Python's cyclic collector (rounds no longer refer to
    themselves, but a user's objects may hold one); freeing its CUDA graphs during another capture invalidates that
    capture (seen on an H200). `GraphedCall` captures with the collector off, and turns it back on after (also when
    the function raises)."""
    import contextlib
    import gc

    from specvlm_hf.round import GraphedCall

    seen = []

    @contextlib.contextmanager
    def fake_capture(graph):
        yield

    class FakeGraph:
        def replay(self):
            seen.append(("replay", gc.isenabled()))

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None, raising=False)  # CPU builds lack it

    def fn():
        seen.append(("run", gc.isenabled()))
        return 1

    call = GraphedCall(fn, graphs=True)
    assert gc.isenabled()
    assert [call(), call(), call()] == [1, 1, 1]
    assert seen == [("run", True), ("run", False), ("replay", True), ("replay", True)], seen

    def fails():
        raise ValueError("boom")

    failing = GraphedCall(fails, graphs=True)
    failing.calls = 1  # the next call captures
    with pytest.raises(ValueError, match="boom"):
        failing()
    assert gc.isenabled()


def test_each_captured_graph_gets_a_cublas_workspace_of_its_own(monkeypatch):
    """torch's cuBLAS workspaces are cleared right before each capture (a GEMM in it then allocates one in the graph's
    own memory pool) and right after (no later capture or eager GEMM shares it), also when the capture fails: graphs
    sharing a workspace lose it when anything else clears torch's workspaces (CUDA graph trees do, around each of
    their recordings), and their replays then write through a dangling pointer."""
    import contextlib

    from specvlm_hf.round import GraphedCall

    seen = []

    @contextlib.contextmanager
    def fake_capture(graph):
        seen.append("capture begins")
        yield
        seen.append("capture ends")

    class FakeGraph:
        def replay(self):
            seen.append("replay")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: seen.append("clear"), raising=False)
    call = GraphedCall(lambda: seen.append("run"), graphs=True)
    for _ in range(3):
        call()
    assert seen == ["run", "clear", "capture begins", "run", "capture ends", "clear", "replay", "replay"], seen

    def fails():
        raise ValueError("boom")

    seen.clear()
    failing = GraphedCall(fails, graphs=True)
    failing.calls = 1  # the next call captures
    with pytest.raises(ValueError, match="boom"):
        failing()
    assert seen == ["clear", "capture begins", "clear"], seen  # (a failed capture never reaches its end)
