"""`specvlm bench` runs end to end on tiny models, and its equality check catches a corrupted draft path."""

from __future__ import annotations

import json

import torch

import specvlm_hf
from specvlm_hf import bench, verify
from tiny_models import oracle_draft, random_inputs, tiny_llava


def setup_models():
    target = specvlm_hf.enable(tiny_llava(scale=32.0))
    drafts = {"eaglevlm": oracle_draft(target), "specvlm": oracle_draft(target, compressor={"mode": "fixed", "fixed": "pool@4"})}
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
    assert rows["specvlm-tree"]["draft_kv_mb"] < rows["eaglevlm-tree"]["draft_kv_mb"], "compression shrinks the draft KV"
    assert rows["plain"]["sigma"] == 1.0
    table = bench.format_table(report)
    assert "eaglevlm-tree" in table and "projection at sigma 3.0" in table
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
    assert "NO" in bench.format_table(report)
