"""`specvlm bench` runs end to end on tiny models, and its equality check catches a corrupted draft path."""

from __future__ import annotations

import json
import time

import pytest
import torch

import specvlm_hf
from specvlm_hf import bench, verify
from specvlm_hf.cli import main
from specvlm_hf.errors import UserError
from tiny_models import oracle_draft, random_inputs, tiny_llava


def setup_models():
    target = specvlm_hf.enable(tiny_llava(scale=32.0))
    drafts = {
        "eaglevlm": oracle_draft(target),
        "specvlm": oracle_draft(target, compressor={"mode": "fixed", "fixed": "pool@4"}),
    }
    generator = torch.Generator().manual_seed(0)
    cases = [random_inputs(target, generator, text_tokens=4 + i) for i in range(2)]
    return target, drafts, cases


def test_bench_reports_every_method(tmp_path):
    target, drafts, cases = setup_models()
    report = bench.run_bench(target, cases, drafts, max_new_tokens=16, projected_sigma=3.0)
    rows = {row["method"]: row for row in report["methods"]}
    assert set(rows) == set(bench.METHODS)
    assert rows["assisted-lm"]["status"].startswith("skipped")
    for name in ("specvlm-chain", "eaglevlm-tree", "specvlm-tree", "eaglevlm-tree-static", "specvlm-tree-static"):
        row = rows[name]
        assert row["status"] == "ok" and row["matches_plain"] is True, (name, row["status"])
        assert row["sigma"] > 1.5 and row["round_ms"] > 0 and row["draft_kv_mb"] > 0
        assert row["speedup"]["plain"] > 0 and row["projected"]["label"] == "projection"
    assert rows["specvlm-tree"]["visual_branch"] == "pool@4"
    assert rows["specvlm-tree"]["draft_kv_mb"] < rows["eaglevlm-tree"]["draft_kv_mb"], (
        "compression shrinks the draft KV"
    )
    assert rows["plain"]["sigma"] == 1.0
    assert rows["specvlm-tree-static"]["warmup_seconds"] > 0 and rows["specvlm-tree-static"]["seconds"] > 0
    table = bench.format_table(report)
    assert "eaglevlm-tree" in table and "projection at sigma 3.0" in table and "warm-up s" in table
    bench.save_report(report, str(tmp_path / "bench.json"))
    assert json.loads((tmp_path / "bench.json").read_text())["cases"] == 2


def test_bench_flags_a_corrupted_draft_path(monkeypatch):
    target, drafts, cases = setup_models()
    real = verify.greedy_path

    def corrupted(tree, scores):  # accepts the draft's first child blindly: a lossy rule
        path, length, next_token = real(tree, scores)
        children = tree.children(0)
        if children and int(length) == 1:
            path = path.clone()
            path[1] = children[0]
            return path, length + 1, tree.tokens[children[0]]
        return path, length, next_token

    monkeypatch.setattr("specvlm_hf.decoding.greedy_path", corrupted)
    drafts["eaglevlm"] = oracle_draft(target, noise=0.003)  # short accepted paths, so the corruption triggers
    report = bench.run_bench(target, cases, drafts, methods=("plain", "eaglevlm-tree"), max_new_tokens=16)
    rows = {row["method"]: row for row in report["methods"]}
    assert rows["eaglevlm-tree"]["matches_plain"] is False
    table = bench.format_table(report)
    assert "NO" in table and "in float32 they must be equal token for token, so this is a bug" in table


# ---- one sigma, one decoding-mode rule, failures explained, bad requests refused before the run


def test_bench_sigma_of_a_tree_method_is_the_drafts_own_sigma():
    target, drafts, cases = setup_models()
    report = bench.run_bench(
        target, cases[:1], drafts, methods=("plain", "eaglevlm-tree"), max_new_tokens=16, warmup=False
    )
    row = {r["method"]: r for r in report["methods"]}["eaglevlm-tree"]
    draft = drafts["eaglevlm"]
    target.generate(**cases[0], assistant_model=draft, max_new_tokens=16, do_sample=False)
    assert row["sigma"] == pytest.approx(draft.stats.sigma) and row["rounds"] == draft.stats.rounds
    assert row["target_forwards"] == draft.stats.rounds + 1, "the prefill's forward is not a round"
    assert row["sigma"] != pytest.approx(row["new_tokens"] / row["target_forwards"])
    assert (
        "sigma: tokens accepted per target verification forward, the target's own token included"
        in bench.format_table(report)
    )


def test_the_table_marks_the_mode_generate_and_demo_use_on_this_device():
    target, drafts, cases = setup_models()
    report = bench.run_bench(
        target, cases[:1], drafts, methods=("plain", "specvlm-chain", "specvlm-tree"), max_new_tokens=8, warmup=False
    )
    table = bench.format_table(report)
    assert report["default_mode"] == "chain"
    # what the figures were measured on, as every benchmark records it
    assert report["device"].startswith("cpu (") and report["torch"] == torch.__version__
    assert report["cuda"] is None and report["cudnn"] is None and report["date"].endswith(" UTC")
    assert f"torch {torch.__version__}, transformers " in table.splitlines()[1]
    assert "specvlm-chain *" in table and "specvlm-tree *" not in table
    assert (
        "* the decoding mode `specvlm generate` and `specvlm demo` use here (chain: chain on the CPU, tree on a GPU)"
        in table
    )


def test_a_failing_prompt_lookup_is_explained_in_the_table_not_as_a_raw_error():
    target, drafts, cases = setup_models()
    report = bench.run_bench(
        target, cases[:1], drafts, methods=("plain", "prompt-lookup"), max_new_tokens=8, warmup=False
    )
    status = {r["method"]: r for r in report["methods"]}["prompt-lookup"]["status"]
    assert status == "ok" or (
        "prompt lookup copies the prompt's image placeholder tokens into its candidates" in status
        and "ValueError" not in status
    ), status
    reason = bench.failure_reason(
        "prompt-lookup", ValueError("Image features and image tokens do not match, tokens: 74")
    )
    assert reason.startswith("failed: transformers ") and "a transformers limitation with image inputs" in reason


def test_bench_without_prompts_is_refused():
    target, drafts, _ = setup_models()
    with pytest.raises(UserError, match="No prompts to benchmark"):
        bench.run_bench(target, [], drafts)


def _cli(capsys, *argv):
    status = main(["bench", *map(str, argv)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return status, lines[0]


@pytest.fixture
def no_loading(monkeypatch):
    from specvlm_hf.commands import bench as command

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the check")

    monkeypatch.setattr(command, "_load_target", refuse)


def test_bench_num_prompts_zero_is_refused_in_one_line(capsys, no_loading):
    status, line = _cli(capsys, "--num-prompts", 0)
    assert status == 2
    assert line.startswith("specvlm bench: error: argument --num-prompts: must be a whole number of at least 1, got 0")


def test_bench_out_that_cannot_be_written_is_refused_before_the_run(capsys, no_loading, tmp_path):
    (tmp_path / "file").write_text("")
    start = time.perf_counter()
    status, line = _cli(capsys, "--out", tmp_path / "file" / "bench.json")
    assert status == 1
    assert line.startswith(f"specvlm bench: error: --out: the folder {tmp_path / 'file'} is not writable (")
    assert time.perf_counter() - start < 10
    status, line = _cli(capsys, "--out", tmp_path)
    assert status == 2 and f"--out {tmp_path} is a folder; pass a file path such as" in line


def test_bench_unknown_methods_and_drafts_are_refused(capsys, no_loading, tmp_path):
    status, line = _cli(capsys, "--methods", "plain,speculative")
    assert status == 2 and "--methods: unknown speculative; choose from plain, plain-static" in line
    status, line = _cli(capsys, "--draft", f"eaglevlm={tmp_path / 'missing'}")
    assert status == 2 and f"--draft {tmp_path / 'missing'}: no such folder" in line


def test_bench_decodes_batches_and_skips_the_methods_that_cannot():
    target, drafts, cases = setup_models()
    methods = ("plain", "plain-static", "specvlm-chain", "eaglevlm-tree", "specvlm-tree-static")
    report = bench.run_bench(target, cases + cases[:1], drafts, methods, max_new_tokens=12, batch_size=2)
    rows = {row["method"]: row for row in report["methods"]}
    assert rows["specvlm-chain"]["status"].startswith("skipped: batch size 2")
    for name in ("eaglevlm-tree", "specvlm-tree-static"):
        assert rows[name]["status"] == "ok" and rows[name]["matches_plain"] is True, rows[name]["status"]
        assert rows[name]["sigma"] > 1.5 and rows[name]["new_tokens"] == rows["plain"]["new_tokens"]
    assert report["batch_size"] == 2 and report["cases"] == 4  # 3 prompts, the last batch filled up
    assert 0 < rows["plain"]["sigma"] <= 1.0


def test_bench_batches_rows_with_and_without_an_image():
    """A text-only case batched with image cases (the mini VLM's held-out prompts mix them): the batch carries the
    images of the rows that have one, and the tree methods still equal plain batched `generate`."""
    target, drafts, cases = setup_models()
    generator = torch.Generator().manual_seed(1)
    text_only = random_inputs(target, generator, text_tokens=7, image=False)
    batches = bench.batch_cases([text_only, cases[0], cases[1]], 3, pad_token=0)
    assert len(batches) == 1 and batches[0]["pixel_values"].shape[0] == 2
    assert batches[0]["input_ids"].shape == (3, max(case["input_ids"].shape[1] for case in cases + [text_only]))
    methods = ("plain", "eaglevlm-tree", "specvlm-tree-static")
    report = bench.run_bench(target, [text_only, *cases], drafts, methods, max_new_tokens=10, batch_size=3)
    rows = {row["method"]: row for row in report["methods"]}
    for name in methods[1:]:
        assert rows[name]["status"] == "ok" and rows[name]["matches_plain"] is True, rows[name]["status"]


def test_bench_says_when_the_batch_rule_turned_speculation_off():
    """Above `MAX_SPECULATIVE_BATCH` rows a draft method runs generate's own loop: the report and the table say so
    (its tokens/s is plain decoding's, not a tree's), and `max_speculative_batch` brings the trees back."""
    from specvlm_hf.decoding import MAX_SPECULATIVE_BATCH

    target, drafts, cases = setup_models()
    batch = MAX_SPECULATIVE_BATCH + 1
    cases = (cases * batch)[:batch]
    report = bench.run_bench(target, cases, drafts, ("plain", "eaglevlm-tree"), max_new_tokens=6, batch_size=batch)
    row = {r["method"]: r for r in report["methods"]}["eaglevlm-tree"]
    assert row["speculation_off"] and row["matches_plain"] is True and row["rounds"] == 0
    assert f"speculation off at batch size {batch}" in bench.format_table(report)
    drafts["eaglevlm"].config.max_speculative_batch = batch
    report = bench.run_bench(target, cases, drafts, ("plain", "eaglevlm-tree"), max_new_tokens=6, batch_size=batch)
    row = {r["method"]: r for r in report["methods"]}["eaglevlm-tree"]
    assert not row["speculation_off"] and row["rounds"] > 0 and row["matches_plain"] is True
    assert "speculation off" not in bench.format_table(report)


def test_bench_restricts_the_drafts_vocabulary_and_refuses_more_ids_than_the_target_has(capsys, tmp_path):
    """`--restrict-vocab N`: the shipped drafts score the N ids the mini VLM's answers on calibration prompts use
    most (plus EOS); the report says so, outputs still equal plain decoding, and each draft holds N or N + 1 ids."""
    from specvlm_hf.commands import bench as command

    restricted = []
    real = command._restrict_drafts

    def spy(target, processor, drafts, *args):
        result = real(target, processor, drafts, *args)
        restricted.extend(draft.draft_vocab.numel() for draft in drafts.values())
        return result

    out = tmp_path / "bench.json"
    argv = ["--num-prompts", 1, "--max-new-tokens", 8, "--methods", "plain,eaglevlm-tree", "--out", out]
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(command, "_restrict_drafts", spy)
    try:
        assert main(["bench", *map(str, argv), "--restrict-vocab", "256", "--calibration-prompts", "3"]) == 0
    finally:
        monkeypatch.undo()
    report = json.loads(out.read_text())
    assert report["restricted_vocab"] == {"ids": 256, "calibration_prompts": 3, "calibration_seed": 31337}
    assert "drafts: 256-id vocabulary (--restrict-vocab)" in capsys.readouterr().out
    rows = {row["method"]: row for row in report["methods"]}
    assert rows["eaglevlm-tree"]["status"] == "ok" and rows["eaglevlm-tree"]["matches_plain"] is True
    assert restricted and all(size in (256, 257) for size in restricted), restricted
    capsys.readouterr()
    status, line = _cli(capsys, *argv, "--restrict-vocab", 5000)
    assert status == 2 and "--restrict-vocab 5000: the target's vocabulary has only 4096 ids" in line


def test_bench_runs_the_drafts_on_fp8_heads_with_outputs_still_exact(capsys, tmp_path):
    """`--fp8-head`: every draft reads an e4m3 head (a spy counts them), the report says so, and outputs still
    equal plain decoding."""
    from specvlm_hf import SpecVLMDraftModel

    turned_on = []
    real = SpecVLMDraftModel.use_fp8_head

    def spy(draft, enabled=True):
        turned_on.append(enabled)
        return real(draft, enabled)

    out = tmp_path / "bench.json"
    argv = ["--num-prompts", 1, "--max-new-tokens", 8, "--methods", "plain,eaglevlm-tree,specvlm-tree", "--out", out]
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(SpecVLMDraftModel, "use_fp8_head", spy)
    try:
        assert main(["bench", *map(str, argv), "--fp8-head"]) == 0
    finally:
        monkeypatch.undo()
    report = json.loads(out.read_text())
    assert report["fp8_head"] is True and turned_on and all(turned_on)
    assert "drafts: fp8 lm_head (--fp8-head)" in capsys.readouterr().out
    rows = {row["method"]: row for row in report["methods"]}
    for method in ("eaglevlm-tree", "specvlm-tree"):
        assert rows[method]["status"] == "ok" and rows[method]["matches_plain"] is True


def test_bench_restrict_vocab_without_a_draft_is_refused_before_loading(capsys, no_loading, tmp_path):
    from tiny_models import tiny_llava

    tiny_llava().save_pretrained(tmp_path / "vlm")
    capsys.readouterr()
    status, line = _cli(capsys, "--target", tmp_path / "vlm", "--restrict-vocab", 16)
    assert status == 2 and "--restrict-vocab restricts drafts, and none is given: pass --draft NAME=PATH" in line
