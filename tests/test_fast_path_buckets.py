"""The fast path keeps every length bucket it met (issue 13): a call at a length seen before replays its graphs
instead of building buffers and capturing again, and the buckets' target caches share one memory, as large as the
longest bucket's."""

from __future__ import annotations

import pytest
import torch
from test_lossless_greedy import build_draft, build_target
from tiny_models import random_inputs


@pytest.fixture
def small_buckets(monkeypatch):
    from specvlm_hf import round as round_module

    monkeypatch.setattr(round_module, "LENGTH_BUCKET", 16)
    return round_module


def layer_storages(path) -> list[int]:
    from specvlm_hf.hf_internals import layer_tensors
    from specvlm_hf.kv_cache import cache_layers

    return [t.untyped_storage().data_ptr() for layer in cache_layers(path.target_cache) for t in layer_tensors(layer)]


def draft_storages(path) -> set[int]:
    """The storages of the draft caches of every round of a fast path."""
    from specvlm_hf.hf_internals import layer_tensors
    from specvlm_hf.kv_cache import cache_layers

    caches = [round.runner.window.cache for round in path.rounds.values()]
    return {
        t.untyped_storage().data_ptr()
        for cache in caches
        for layer in cache_layers(cache)
        for t in layer_tensors(layer)
    }


def call(target, draft, text_tokens: int, seed: int, image: bool = False) -> None:
    inputs = random_inputs(target, torch.Generator().manual_seed(seed), text_tokens=text_tokens, image=image)
    kwargs = {"do_sample": False, "max_new_tokens": 6, "min_new_tokens": 6}
    fast = target.generate(**inputs, **kwargs, assistant_model=draft, cache_implementation="static")
    assert fast.tolist() == target.generate(**inputs, **kwargs).tolist()
    return draft._specvlm_fast_path


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked-layers", "layer-buffers"])
def test_buckets_seen_before_are_reused_and_share_the_longest_ones_memory(small_buckets, stacked, monkeypatch):
    """Uncompiled rounds stack the target's layers into one tensor, compiled ones keep a buffer per layer
    (`STACK_COMPILED_LAYERS`): both layouts are shared. A longer bucket replaces the shared memory, so the buckets kept
    before it are dropped; after that, every bucket met is kept and reused (its rounds too), exact at every call."""
    from specvlm_hf.kv_cache import FixedWindow

    if not stacked:  # the layout of compiled rounds, without compiling
        place = FixedWindow.place
        monkeypatch.setattr(FixedWindow, "place", lambda self, stack: place(self, stack=False))
    target = build_target("llava-gqa")
    draft = build_draft(target, "noisy", "tree")
    draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = 3, 3, 10
    short = call(target, draft, 4, seed=1)
    long = call(target, draft, 60, seed=2)
    assert long.length > short.length
    kept = draft._specvlm_fast_paths
    assert list(kept.by_length()) == [long.length], "the longer bucket replaced the memory the shorter one lived in"
    short_again = call(target, draft, 5, seed=3)
    assert short_again is not short and short_again.length == short.length
    assert list(kept.by_length()) == [long.length, short.length]
    rounds = {path: dict(path.rounds) for path in (long, short_again)}
    for seed, tokens in enumerate((61, 3, 62, 6), start=4):  # lengths seen before: nothing is built again
        path = call(target, draft, tokens, seed=seed)
        assert path in rounds and path is kept.by_length()[path.length] and path.rounds == rounds[path]
    shared = kept.shared[None]
    assert layer_storages(long) == layer_storages(short_again)
    assert set(layer_storages(long)) == {buffer.data_ptr() for buffer in shared.buffers}
    assert len(shared.buffers) == (1 if stacked else 2 * target.config.text_config.num_hidden_layers)
    assert (long.target_window.stacked is not None) == stacked
    assert not long.target_window.stale and not short_again.target_window.stale
    # the draft caches of every kept round share one memory too, sized for the longest bucket
    draft_shared = kept.draft_shared[None]
    assert draft_storages(long) == draft_storages(short_again) == {b.data_ptr() for b in draft_shared.buffers}
    assert draft_shared.reserve == long.length and len(draft_shared.buffers) == 2 * draft.config.num_draft_layers
    # were the draft's memory replaced under kept rounds (not met in calls: it is sized for the longest bucket), they
    # would be built again, not replayed over the old addresses
    before = dict(long.rounds)
    draft_shared.views([torch.zeros(1, 1, 2, 1)], length=2)
    assert all(round.runner.window.stale for round in before.values())
    assert call(target, draft, 61, seed=9) is long
    used = draft._specvlm_static_round
    assert used.draft_length in before and used is not before[used.draft_length]
    assert not any(round.runner.window.stale for round in long.rounds.values())


def test_the_least_recently_used_bucket_is_dropped_past_the_limit(small_buckets, monkeypatch):
    monkeypatch.setattr(small_buckets, "KEPT_LENGTHS", 2)
    target = build_target("llava-gqa")
    draft = build_draft(target, "noisy", "tree")
    draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = 3, 3, 10
    import gc
    import weakref

    paths = [call(target, draft, tokens, seed=tokens) for tokens in (60, 30, 60)]
    middle = [weakref.ref(round) for round in paths[1].rounds.values()]
    lengths = [path.length for path in paths]
    del paths
    gc.disable()  # freed by the call that goes past the limit itself, not by a later collection
    try:
        lengths.append(call(target, draft, 3, seed=3).length)
        assert len(middle) == 1 and middle[0]() is None, "the dropped bucket's round is still alive"
    finally:
        gc.enable()
    assert len(set(lengths)) == 3
    assert list(draft._specvlm_fast_paths.by_length()) == [lengths[0], lengths[3]]  # the middle one: least recent


def test_another_setting_drops_every_kept_bucket(small_buckets):
    """Another setting (here the tree; also a restricted vocabulary, moved weights, ...) drops every kept bucket,
    and frees them at once, by reference counting alone (the collector is off): no round refers to itself, so their
    graphs' memory does not wait for Python's collector."""
    import gc
    import weakref

    target = build_target("llava-gqa")
    draft = build_draft(target, "noisy", "tree")
    draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = 3, 3, 10
    old = [call(target, draft, 60, seed=1), call(target, draft, 3, seed=2)]
    assert len(draft._specvlm_fast_paths.by_length()) == 2
    old = [weakref.ref(round) for path in old for round in path.rounds.values()]  # what holds graphs and caches
    draft.config.tree_total_tokens = 8  # another tree: other shapes, other graphs
    gc.disable()
    try:
        path = call(target, draft, 3, seed=2)
        assert len(old) == 2 and [ref() for ref in old] == [None, None], "the dropped rounds are still alive"
    finally:
        gc.enable()
    assert list(draft._specvlm_fast_paths.by_length()) == [path.length]


def test_shared_buffers_grow_and_say_when_earlier_views_are_stale():
    from specvlm_hf.kv_cache import SharedBuffers

    shared = SharedBuffers()
    small = [torch.arange(6.0).view(1, 2, 3), torch.ones(1, 3)]
    views = shared.views(small, length=3)
    assert [v.tolist() for v in views] == [t.tolist() for t in small] and shared.generation == 1
    assert views[0].untyped_storage().data_ptr() != views[1].untyped_storage().data_ptr()  # no aliasing
    again = shared.views([torch.zeros(1, 2, 2), torch.zeros(1, 1)], length=2)  # fits: same memory, no new generation
    assert shared.generation == 1 and again[0].data_ptr() == views[0].data_ptr() and shared.length == 3
    assert views[0].flatten()[:4].tolist() == [0.0] * 4  # (the smaller cache wrote over the start of the memory)
    larger = shared.views([torch.ones(1, 2, 5), torch.ones(1, 5)], length=5)
    assert shared.generation == 2 and shared.length == 5 and larger[0].shape == (1, 2, 5)
    other_dtype = shared.views([torch.ones(1, 2, 5, dtype=torch.float64), torch.ones(1, 5)], length=5)
    assert shared.generation == 3 and other_dtype[0].dtype == torch.float64

    # `reserve`: new buffers hold caches of that many slots (the slot dimension is -2); a sliding-window layer's
    # tensor, narrower than the cache, keeps its size
    reserved = SharedBuffers(reserve=8)
    reserved.views([torch.ones(1, 2, 4, 3), torch.ones(1, 2, 2, 3)], length=4)
    assert [b.numel() for b in reserved.buffers] == [2 * 8 * 3, 2 * 2 * 3]
    wider = reserved.views([torch.ones(1, 2, 8, 3), torch.ones(1, 2, 2, 3)], length=8)
    assert reserved.generation == 1 and wider[0].shape == (1, 2, 8, 3)


def test_compiled_rounds_replay_kept_buckets_over_the_shared_memory(small_buckets, monkeypatch):
    """Compiled round functions (AOT autograd on the CPU) over target caches that are views of the shared buffers:
    calls alternating between kept buckets stay exact and reuse their rounds."""
    import torch._dynamo

    from specvlm_hf import decoding

    monkeypatch.setattr(small_buckets, "COMPILE_OPTIONS", {"backend": "aot_eager"})
    monkeypatch.setattr(decoding, "fast_path_options", lambda *args: (False, True))
    torch._dynamo.reset()
    target = build_target("llava-gqa")
    draft = build_draft(target, "noisy", "tree")
    draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = 3, 3, 10
    paths = [call(target, draft, tokens, seed=seed) for seed, tokens in enumerate((60, 3, 61, 4, 62))]
    assert [p.length for p in paths[:2]] == [p.length for p in paths[2:4]] and paths[0] is paths[2] is paths[4]
    assert paths[1] is paths[3] and paths[0].target_window.stacked is None  # compiled: a buffer per layer
    assert all(round.compiled for path in paths for round in path.rounds.values())
    torch._dynamo.reset()


def test_batched_calls_keep_every_length_and_each_batch_shape_shares_its_memory(small_buckets):
    """Batched fast path: one fast path per (length, batch shape) is kept; the caches of one shape at every length
    share one memory, while the shapes of one call (rows move between them) each have their own; alternating
    between lengths reuses them, exact against plain batched `generate`."""
    from test_batched import left_pad, ragged_eos

    target = build_target("llava-gqa")
    draft = build_draft(target, "noisy", "tree")
    draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = 3, 3, 10
    draft.config.max_speculative_batch = 4

    def batch_call(text_tokens: int, seed: int) -> dict:
        generator = torch.Generator().manual_seed(seed)
        rows = [random_inputs(target, generator, text_tokens=text_tokens + row) for row in range(3)]
        batch = left_pad(rows, [0, 2, 1])
        kwargs = {"do_sample": False, "max_new_tokens": 8}
        kwargs["eos_token_id"] = ragged_eos(target, batch, kwargs, [1, 2, None])  # rows stop: the live ones move
        fast = target.generate(**batch, **kwargs, assistant_model=draft, cache_implementation="static")
        assert fast.tolist() == target.generate(**batch, **kwargs).tolist()
        assert len(set(draft.stats.rows_per_round)) > 1, draft.stats.rows_per_round
        return dict(draft._specvlm_fast_rows.paths)

    long = batch_call(50, seed=1)
    short = batch_call(3, seed=2)
    assert {length for length, _ in long} != {length for length, _ in short}
    kept = draft._specvlm_fast_rows
    assert set(kept.paths) == set(long) | set(short)  # the shorter length fit in the longer one's memory
    again = [batch_call(52, seed=3), batch_call(4, seed=4)]
    assert all(kept.paths[entry] is path for entry, path in {**long, **short}.items())  # nothing built again
    assert again[-1] == kept.paths
    for shape, shared in kept.shared.items():
        paths = [path for (_, of), path in kept.paths.items() if of == shape]
        storages = [set(layer_storages(path)) for path in paths]
        assert all(s == {b.data_ptr() for b in shared.buffers} for s in storages), shape
        drafts = {b.data_ptr() for b in kept.draft_shared[shape].buffers}
        assert all(draft_storages(path) == drafts for path in paths), shape
    first, *rest = kept.shared.values()
    assert rest, kept.shared  # more than one shape
    assert all({b.data_ptr() for b in first.buffers}.isdisjoint(b.data_ptr() for b in other.buffers) for other in rest)
    draft_memories = [{b.data_ptr() for b in shared.buffers} for shared in kept.draft_shared.values()]
    assert all(a.isdisjoint(b) for i, a in enumerate(draft_memories) for b in draft_memories[i + 1 :])


def test_release_fast_path_drops_every_kept_bucket_and_the_next_call_builds_again(small_buckets):
    import gc
    import weakref

    import specvlm_hf

    target = build_target("llava-gqa")
    draft = build_draft(target, "noisy", "tree")
    paths = [call(target, draft, 3, 0, image=True), call(target, draft, 3, 1)]  # a shorter bucket (no image)
    assert len(draft._specvlm_fast_paths.by_length()) == 2  # both kept
    first = weakref.ref(paths[0])
    rounds = [weakref.ref(round) for path in paths for round in path.rounds.values()]
    del paths
    gc.disable()  # freed by the release itself, not by a later collection
    try:
        specvlm_hf.release_fast_path(draft)
        assert len(rounds) == 2 and [ref() for ref in rounds] == [None, None], "released rounds are still alive"
    finally:
        gc.enable()
    kept = (
        "_specvlm_fast_paths",
        "_specvlm_fast_path",
        "_specvlm_static_round",
        "_specvlm_fast_rows",
        "_specvlm_static_rows_round",
    )
    assert not any(hasattr(draft, name) for name in kept)
    again = call(target, draft, 3, 0, image=True)  # exact (checked in `call`), on new buffers
    assert first() is None and list(draft._specvlm_fast_paths.by_length()) == [again.length]


@pytest.mark.parametrize("ahead", [False, True], ids=["compiled-in-process", "compiled-ahead"])
def test_compiled_rounds_are_freed_without_the_cyclic_collector(small_buckets, monkeypatch, tmp_path, ahead):
    """A round holds its functions (`GraphedCall`) and they hold it only weakly, also once compiled, in this process
    (`torch.compile` of the round's function, called with the round) or ahead of time (`precompile`): a released
    round is freed by reference counting, with Python's cyclic collector off."""
    import gc
    import weakref

    import torch._dynamo

    import specvlm_hf
    from specvlm_hf import decoding, precompile

    monkeypatch.setattr(small_buckets, "COMPILE_OPTIONS", {"backend": "aot_eager"})
    monkeypatch.setattr(decoding, "fast_path_options", lambda *args: (False, True))
    monkeypatch.setattr(precompile, "_store", precompile._store)  # restored after the test
    monkeypatch.setattr(precompile, "_chosen", precompile._chosen)
    precompile.use_store(str(tmp_path / "rounds") if ahead else None)
    torch._dynamo.reset()
    try:
        target = build_target("llava-gqa")
        draft = build_draft(target, "noisy", "tree")
        draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = 3, 3, 10
        path = call(target, draft, 3, 0, image=True)
        assert path.rounds and all(r.compiled and r.compiled_ahead == ahead for r in path.rounds.values())
        rounds = [weakref.ref(round) for round in path.rounds.values()]
        del path
        gc.disable()
        try:
            specvlm_hf.release_fast_path(draft)
            assert [ref() for ref in rounds] == [None] * len(rounds), "released compiled rounds are still alive"
        finally:
            gc.enable()
    finally:
        torch._dynamo.reset()
