"""Round functions compiled ahead of time and kept on disk (`precompile`, issue 13): a new process loads them instead
of tracing them, and a file that no longer fits is compiled again, never run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from contextlib import contextmanager

import pytest
import torch
from test_lossless_greedy import build_draft, build_target
from tiny_models import random_inputs

HERE = os.path.dirname(os.path.abspath(__file__))

# builds the same target and draft as `run_calls` in a fresh interpreter, runs the calls and prints what it saw
CHILD = """
import json, sys, torch
torch.set_num_threads(1)  # as conftest sets it: torch's thread count is among a compiled function's guards
sys.path.insert(0, {here!r})
import test_precompile
print("RESULT " + json.dumps(test_precompile.run_calls({store!r})))
"""


def fast_path_settings():
    """The fast path compiled on the CPU (AOT autograd, no code generation, no CUDA graphs), 16-slot buckets."""
    from specvlm_hf import decoding, round as round_module

    round_module.COMPILE_OPTIONS = {"backend": "aot_eager"}
    round_module.LENGTH_BUCKET = 16
    decoding.fast_path_options = lambda *args: (False, True)


def run_calls(store_dir: str, calls=((3, 10), (30, 12), (60, 6))) -> dict:
    """Fast-path calls at several length buckets with a store in `store_dir`: whether each equals plain
    `generate`, the buckets, and what the store compiled and loaded."""
    from specvlm_hf import precompile

    fast_path_settings()
    store = precompile.use_store(store_dir)
    target = build_target("llava-gqa")
    draft = build_draft(target, "noisy", "tree")
    draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = 3, 3, 10
    generator = torch.Generator().manual_seed(21)
    equal, buckets = [], []
    with torch.inference_mode():  # as a server runs
        for case, (text_tokens, new_tokens) in enumerate(calls):
            inputs = random_inputs(target, generator, text_tokens=text_tokens, image=case == 0)
            kwargs = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
            fast = target.generate(**inputs, **kwargs, assistant_model=draft, cache_implementation="static")
            equal.append(fast.tolist() == target.generate(**inputs, **kwargs).tolist())
            buckets.append(draft._specvlm_static_round.length)
    return {
        "equal": equal,
        "buckets": buckets,
        "compiled": store.compiled,
        "loaded": store.loaded,
        "files": compiled_files(store_dir),
    }


def compiled_files(store_dir) -> list[str]:
    """The compiled functions' files in a store folder (each has its description, `.json`, next to it)."""
    return sorted(name for name in os.listdir(store_dir) if name.endswith(".pt2"))


@pytest.fixture
def compiled_on_cpu(monkeypatch):
    import torch._dynamo

    from specvlm_hf import decoding, round as round_module

    for module, name in (
        (round_module, "COMPILE_OPTIONS"),
        (round_module, "LENGTH_BUCKET"),
        (decoding, "fast_path_options"),
    ):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_a_new_process_loads_the_rounds_instead_of_tracing_them(compiled_on_cpu, tmp_path):
    store = str(tmp_path / "rounds")
    first = run_calls(store)
    assert all(first["equal"]) and len(set(first["buckets"])) == 3, first
    assert (first["compiled"], first["loaded"]) == (3, 0), first  # one compile per function for every bucket
    assert [name.split("-")[0] for name in first["files"]] == ["commit", "draft", "verify"], first
    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(here=HERE, store=store)], capture_output=True, text=True, timeout=600
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-2000:] + done.stderr[-4000:]
    second = json.loads(lines[-1][len("RESULT ") :])
    assert all(second["equal"]) and second["buckets"] == first["buckets"], second
    assert (second["compiled"], second["loaded"]) == (0, 3), second  # nothing traced
    assert second["files"] == first["files"]
    described = precompile_module().stored_rounds(store)
    assert [(r.function, r.usable) for r in described] == [
        (f"SpeculativeRound.{name}", True) for name in ("_commit", "_draft", "_verify")
    ], described
    assert all(r.model.startswith("llava float32 on cpu, tree (3, 3, 10)") for r in described), described


def precompile_module():
    from specvlm_hf import precompile

    return precompile


def test_a_damaged_or_stale_file_is_compiled_again(compiled_on_cpu, tmp_path, monkeypatch):
    """A file that cannot be read (damaged) and one whose traced sources changed (stale: e.g. transformers upgraded)
    are each compiled again and replaced in place; the function whose file is sound is loaded."""
    from specvlm_hf import precompile

    store = str(tmp_path / "rounds")
    files = run_calls(store, calls=((3, 8),))["files"]
    with open(os.path.join(store, files[1]), "wb") as handle:  # the draft function's file
        handle.write(b"not a compiled function")
    checked = []  # the first readable file found stale, the other sound

    def first_is_stale(compiled):
        checked.append(compiled)
        return len(checked) > 1

    monkeypatch.setattr(precompile, "ahead_sources_unchanged", first_is_stale)
    with pytest.warns(UserWarning, match="could not load .*draft"):
        again = run_calls(store, calls=((3, 8),))
    assert len(checked) == 2, "the two readable files are checked"
    assert again["equal"] == [True] and (again["compiled"], again["loaded"]) == (2, 1), again
    assert again["files"] == files  # replaced in place


def test_rounds_of_one_key_that_guards_tell_apart_each_get_a_function(compiled_on_cpu, tmp_path, monkeypatch):
    """Should two rounds share a key and still differ in what the compiled code assumes (here: two tree shapes under
    a key made blind to them), the guards tell them apart: each gets its own function and file, and both stay
    exact."""
    from specvlm_hf import precompile

    monkeypatch.setattr(precompile, "round_key", lambda owner, function, backend: "one-key")
    store = precompile.use_store(str(tmp_path / "rounds"))
    fast_path_settings()
    target = build_target("llava-gqa")
    draft = build_draft(target, "noisy", "tree")
    inputs = random_inputs(target, torch.Generator().manual_seed(4), text_tokens=5)
    kwargs = {"do_sample": False, "max_new_tokens": 8, "min_new_tokens": 8}
    with torch.inference_mode():
        reference = target.generate(**inputs, **kwargs).tolist()
        for shape in ((3, 3, 10), (2, 2, 8), (3, 3, 10)):
            draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = shape
            fast = target.generate(**inputs, **kwargs, assistant_model=draft, cache_implementation="static")
            assert fast.tolist() == reference, shape
    assert store.compiled == 6, store.compiled  # 3 functions x 2 shapes; the third call reused the first's
    assert sorted(name.rsplit("-", 1)[1] for name in compiled_files(store.directory)) == ["0.pt2"] * 3 + ["1.pt2"] * 3


def test_a_round_that_cannot_be_written_is_compiled_in_process(compiled_on_cpu, tmp_path, monkeypatch):
    """Should torch refuse to compile a round ahead of time (the error it raises when a guard cannot be written),
    the fast path says so (once) and compiles that function in this process, as without a store."""
    import torch._dynamo.exc

    from specvlm_hf import precompile

    def refuse(function, args, backend, options=None):
        if function.__name__ == "_verify":
            raise torch._dynamo.exc.PackageError("ID_MATCH guard cannot be serialized.")
        return compile_ahead(function, args, backend, options)

    compile_ahead = precompile.compile_ahead
    monkeypatch.setattr(precompile, "compile_ahead", refuse)
    store = precompile.use_store(str(tmp_path / "rounds"))
    fast_path_settings()
    target = build_target("llava-gqa")
    draft = build_draft(target, "noisy", "tree")
    draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = 3, 3, 10
    kwargs = {"do_sample": False, "max_new_tokens": 8, "min_new_tokens": 8}
    generator = torch.Generator().manual_seed(8)
    with torch.inference_mode():
        for call, text_tokens in enumerate((5, 40)):  # the second call: another bucket
            inputs = random_inputs(target, generator, text_tokens=text_tokens, image=call == 0)
            with (
                pytest.warns(UserWarning, match="`_verify` cannot be compiled ahead of time") if call == 0 else once()
            ):
                fast = target.generate(**inputs, **kwargs, assistant_model=draft, cache_implementation="static")
            assert fast.tolist() == target.generate(**inputs, **kwargs).tolist()
    assert (
        store.failed
        and store.compiled == 2
        and sorted(name.split("-")[0] for name in compiled_files(store.directory))
        == [
            "commit",
            "draft",
        ]
    )


@contextmanager
def once():
    """Fails on a second "cannot be compiled ahead of time" warning (the store remembers what failed)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cannot be compiled ahead of time")
        yield


def test_round_keys_name_what_shapes_the_code_and_not_where_a_model_came_from(compiled_on_cpu):
    from specvlm_hf import decoding, precompile
    from specvlm_hf.round import SpeculativeRound

    decoding.fast_path_options = lambda *args: (False, False)

    def key_of(target, draft):
        inputs = random_inputs(target, torch.Generator().manual_seed(1), text_tokens=4)
        with torch.inference_mode():
            target.generate(**inputs, max_new_tokens=3, assistant_model=draft, cache_implementation="static")
            return precompile.round_key(draft._specvlm_static_round, SpeculativeRound._draft, "inductor")

    target = build_target("llava-gqa")
    draft = build_draft(target, "noisy", "tree")
    key = key_of(target, draft)
    other = build_target("llava-gqa", seed=3)  # other weights, another path: the same code
    other.config._name_or_path = "/somewhere/else"
    assert key_of(other, build_draft(other, "noisy", "tree")) == key
    draft.config.tree_top_k += 1
    assert key_of(target, draft) != key
    draft.config.tree_top_k -= 1
    with pytest.warns(UserWarning, match="fp8 draft head runs on the CPU"):
        draft.use_fp8_head()  # the draft's code reads an e4m3 head: a function of its own
    assert key_of(target, draft) != key
    draft.use_fp8_head(False)
    assert key_of(target, draft) == key
    assert key_of(target.to(torch.float64), build_draft(target, "noisy", "tree").to(torch.float64)) != key
    assert key_of(build_target("llava"), build_draft(build_target("llava"), "noisy", "tree")) != key
    eager = build_target("llava-gqa")
    eager.set_attn_implementation("eager")  # the same configuration values, other attention kernels
    assert key_of(eager, build_draft(eager, "noisy", "tree")) != key


def test_the_source_check_sees_a_changed_function(compiled_on_cpu):
    from specvlm_hf import hf_internals

    compiled = hf_internals.compile_ahead(_traced, (torch.ones(3),), "eager")
    assert compiled(torch.ones(3)).tolist() == [3.0, 3.0, 3.0]
    assert hf_internals.ahead_sources_unchanged(compiled)
    sources = compiled.source_info().inlined_sources
    mine = next(s for s in sources if s.module == __name__)
    sources.discard(mine)
    sources.add(dataclasses.replace(mine, checksum="0" * len(mine.checksum)))  # as if `_traced` had been edited
    assert not hf_internals.ahead_sources_unchanged(compiled)


def _helper(x):
    return x + 1


def _traced(x):
    return _helper(x) * 1.5


def test_compiling_ahead_does_not_need_torch_flag_set(compiled_on_cpu):
    """torch 2.11 (the GPU machines') offers `aot_compile` only under `torch._dynamo.config.enable_aot_compile`, off
    by default there: `compile_ahead` sets it for its own call."""
    import torch._dynamo

    from specvlm_hf import hf_internals

    before = torch._dynamo.config.enable_aot_compile
    # (torch's own patch: monkeypatch's undo of a config entry leaves `torch._dynamo.config` without it)
    with torch._dynamo.config.patch(enable_aot_compile=False):
        compiled = hf_internals.compile_ahead(_traced, (torch.ones(2),), "eager")
        assert compiled(torch.ones(2)).tolist() == [3.0, 3.0] and not torch._dynamo.config.enable_aot_compile
    assert torch._dynamo.config.enable_aot_compile == before


def test_batched_rounds_are_compiled_ahead_per_batch_shape_and_loaded(compiled_on_cpu, tmp_path):
    """The batched round (`RowsRound`) goes through the store too: one function set per batch shape (rows that
    finish move to a smaller one), exact against plain `generate`; a fresh store on the same folder (as a new process
    has) loads every one of them and compiles none."""
    import torch._dynamo

    from specvlm_hf import precompile
    from test_batched import left_pad

    fast_path_settings()
    target = build_target("llava-gqa")
    draft = build_draft(target, "noisy", "tree")
    draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = 3, 3, 10
    draft.config.max_speculative_batch = 4
    generator = torch.Generator().manual_seed(3)
    rows = [random_inputs(target, generator, text_tokens=3 + 2 * row, image=row % 2 == 0) for row in range(3)]
    batch = left_pad(rows, [0, 2, 1])
    kwargs = {"do_sample": False, "max_new_tokens": 8, "min_new_tokens": 8, "eos_token_id": None}
    counts = []
    for _ in range(2):
        torch._dynamo.reset()
        for name in ("_specvlm_fast_path", "_specvlm_fast_rows"):  # the rounds a call keeps on the draft
            draft.__dict__.pop(name, None)
        store = precompile.use_store(str(tmp_path / "rounds"))
        with torch.inference_mode():
            fast = target.generate(**batch, **kwargs, assistant_model=draft, cache_implementation="static")
            assert fast.tolist() == target.generate(**batch, **kwargs).tolist()
        assert draft.stats.rows_per_round[0] == 3 and draft.stats.rounds > 2
        counts.append((store.compiled, store.loaded))
    shapes = len(set(draft.stats.rows_per_round))  # batch shapes the rows ran in
    assert counts == [(3 * shapes, 0), (0, 3 * shapes)], (counts, shapes)
    assert len(compiled_files(tmp_path / "rounds")) == 3 * shapes


def test_the_environment_variable_sets_a_store_unless_one_was_chosen(monkeypatch, tmp_path):
    from specvlm_hf import precompile

    monkeypatch.setenv(precompile.ENVIRONMENT_VARIABLE, str(tmp_path / "from-env"))
    store = precompile.active_store()
    assert store is not None and store.directory == str(tmp_path / "from-env") and (tmp_path / "from-env").is_dir()
    assert precompile.active_store() is store
    assert precompile.use_store(None) is None and precompile.active_store() is None  # an explicit "no store"
    assert precompile.use_store(str(tmp_path / "chosen")).directory == str(tmp_path / "chosen")


# ------------------------------------------------------------------------------------------- listing and pruning
def fake_store(folder, current_days_old=(0.0, 40.0)) -> None:
    """A store folder of stand-in files: two usable (used 0 and 40 days ago), one written by another torch, one without
    its description, and a description left without its file."""
    import time

    from specvlm_hf import precompile

    folder.mkdir(parents=True)
    current = precompile.current_versions()

    def write(name, versions, days=0.0, describe=True):
        path = folder / f"{name}.pt2"
        path.write_bytes(b"x" * 1000)
        if describe:
            description = {
                "format": precompile.FORMAT,
                "function": "SpeculativeRound._draft",
                "target": {"model_type": "llava"},
                "dtypes": ["torch.bfloat16", "torch.bfloat16"],
                "device": "cuda:0",
                "tree": [10, 7, 60],
                "versions": versions,
            }
            precompile.write_description(str(path), description)
            when = time.time() - days * 86400
            os.utime(precompile.description_path(str(path)), (when, when))

    write("draft-aaa-0", current, current_days_old[0])
    write("draft-aaa-1", current, current_days_old[1])
    write("verify-bbb-0", ["2.9.0", *current[1:]])
    write("commit-ccc-0", current, describe=False)
    (folder / "verify-ddd-0.json").write_text("{}")


def test_the_store_lists_its_files_and_prunes_what_this_install_cannot_use(tmp_path):
    from specvlm_hf import precompile

    folder = tmp_path / "rounds"
    fake_store(folder)
    listed = {os.path.basename(r.path): r for r in precompile.stored_rounds(str(folder))}
    assert {name: r.usable for name, r in listed.items()} == {
        "commit-ccc-0.pt2": False,
        "draft-aaa-0.pt2": True,
        "draft-aaa-1.pt2": True,
        "verify-bbb-0.pt2": False,
    }
    assert listed["verify-bbb-0.pt2"].reason.startswith("written by torch 2.9.0, transformers ")
    assert "no description" in listed["commit-ccc-0.pt2"].reason
    assert listed["draft-aaa-0.pt2"].model == "llava bfloat16 on cuda:0, tree (10, 7, 60)"
    assert listed["draft-aaa-0.pt2"].size_bytes == 1000

    everything = sorted(os.listdir(folder))
    would = precompile.prune(str(folder), dry_run=True)
    assert sorted(os.path.basename(r.path) for r in would) == ["commit-ccc-0.pt2", "verify-bbb-0.pt2"]
    assert sorted(os.listdir(folder)) == everything  # a dry run removes nothing
    assert [os.path.basename(r.path) for r in precompile.prune(str(folder))] == [r.path.split("/")[-1] for r in would]
    assert sorted(os.listdir(folder)) == ["draft-aaa-0.json", "draft-aaa-0.pt2", "draft-aaa-1.json", "draft-aaa-1.pt2"]
    (old,) = precompile.prune(str(folder), unused_days=30)
    assert os.path.basename(old.path) == "draft-aaa-1.pt2" and old.reason == "not used for 40.0 days"
    assert sorted(os.listdir(folder)) == ["draft-aaa-0.json", "draft-aaa-0.pt2"]


def test_the_store_finds_its_files_by_number_whatever_was_removed(tmp_path):
    """After pruning a key's first file its later ones are still found (they are listed, not counted up from 0)."""
    from specvlm_hf import precompile

    store = precompile.PrecompiledRounds(str(tmp_path))
    for number in (10, 2):
        (tmp_path / f"draft-abc-{number}.pt2").write_bytes(b"")
    (tmp_path / "draft-abcd-1.pt2").write_bytes(b"")  # another key that starts the same way
    (tmp_path / "draft-abc-x.pt2").write_bytes(b"")
    assert [os.path.basename(p) for p in store._files("draft-abc")] == ["draft-abc-2.pt2", "draft-abc-10.pt2"]
    assert precompile.file_index([[p, None] for p in store._files("draft-abc")]) == 10


def test_compile_cache_command_lists_and_prunes(tmp_path, capsys, monkeypatch):
    from specvlm_hf import precompile
    from specvlm_hf.cli import main

    fake_store(tmp_path / "cache" / "rounds")
    cache = str(tmp_path / "cache")
    assert main(["compile-cache", cache]) == 0
    out = capsys.readouterr().out
    assert f"{cache}/rounds: 4 compiled round functions, 0.0 MB" in out
    assert "verify-bbb-0.pt2  SpeculativeRound._draft  llava bfloat16 on cuda:0, tree (10, 7, 60)" in out
    assert "not usable: written by torch 2.9.0" in out and out.count("  usable") == 2
    assert main(["compile-cache", cache, "--prune", "--dry-run"]) == 0
    assert "would remove 2 compiled round functions" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "cache" / "rounds")) == 8
    monkeypatch.setenv(precompile.ENVIRONMENT_VARIABLE, cache)  # the folder from the environment
    assert main(["compile-cache", "--prune", "--unused-days", "30"]) == 0
    out = capsys.readouterr().out
    assert "removed 3 compiled round functions" in out and "draft-aaa-1.pt2  SpeculativeRound._draft: not used" in out
    assert sorted(os.listdir(tmp_path / "cache" / "rounds")) == ["draft-aaa-0.json", "draft-aaa-0.pt2"]

    monkeypatch.delenv(precompile.ENVIRONMENT_VARIABLE)
    for argv, message in (
        (["compile-cache"], "no folder given; pass the compile cache folder, or set $SPECVLM_COMPILE_CACHE."),
        (["compile-cache", cache, "--dry-run"], "--unused-days and --dry-run go with --prune; add --prune."),
        (["compile-cache", str(tmp_path / "nowhere")], f"{tmp_path}/nowhere: no such folder"),
        (["generate", "--compile-cache", cache], "--compile-cache keeps the fast path's compiled code: add --fast"),
    ):
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_generate_command_keeps_compiled_rounds_for_a_later_run(compiled_on_cpu, tmp_path, capsys, monkeypatch):
    """`specvlm generate --fast --compile-cache DIR`: the first run compiles the round functions ahead of time into
    DIR, a second run (a new store on the folder, as a new process has) loads them and compiles none; both exact."""
    import torch._dynamo

    from specvlm_hf.cli import main
    from specvlm_hf.commands import generate as generate_command

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # `use_cache_dir` sets it otherwise
    fast_path_settings()
    load_draft = generate_command._load_draft

    def with_a_small_tree(*args):  # the mini draft's 8-level tree takes twice as long to trace
        draft = load_draft(*args)
        draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = 3, 3, 10
        return draft

    monkeypatch.setattr(generate_command, "_load_draft", with_a_small_tree)
    cache = str(tmp_path / "cache")
    argv = ["generate", "--max-new-tokens", "12", "--device", "cpu", "--fast", "--mode", "tree", "--compile-cache"]
    summaries = []
    for _ in range(2):
        torch._dynamo.reset()
        assert main([*argv, cache]) == 0
        out = capsys.readouterr().out
        assert "identical to plain" in out, out
        summaries.append(out.strip().splitlines()[-1])
    assert summaries[0].startswith(f"[compile cache {cache}: 0 round functions loaded, 3 compiled"), summaries
    assert summaries[1].startswith(f"[compile cache {cache}: 3 round functions loaded, 0 compiled"), summaries
    assert len(compiled_files(os.path.join(cache, "rounds"))) == 3


def test_rounds_compiled_ahead_with_joined_projections_key_their_pass_by_the_weights_layout(
    compiled_on_cpu, tmp_path, monkeypatch
):
    """With `round.JOIN_PROJECTIONS`, a round compiled ahead of time gets the joining pass of the weights' layout (its
    uuid, in inductor's cache key, carries it: the key drops storage offsets), and the calls stay exact."""
    from specvlm_hf import precompile, round as round_module
    from specvlm_hf.hf_internals import merge_repeated_pass

    passes = []

    def recording(function, args, backend, options=None):
        passes.append((options or {}).get("post_grad_custom_pre_pass"))
        return compile_ahead(function, args, backend, options)

    compile_ahead = precompile.compile_ahead
    monkeypatch.setattr(precompile, "compile_ahead", recording)
    monkeypatch.setattr(round_module, "JOIN_PROJECTIONS", True)
    result = run_calls(str(tmp_path / "rounds"), calls=((3, 10),))
    assert result["equal"] == [True] and len(passes) >= 3
    layout_free = merge_repeated_pass(True)
    assert all(p is not None and p is not layout_free and p.uuid() != layout_free.uuid() for p in passes), passes
