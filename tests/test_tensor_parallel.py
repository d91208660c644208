"""Tensor-parallel targets (transformers `tp_plan="auto"`, two CPU processes over gloo): SpecVLM decoding in tree,
chain and static mode gives the tokens of plain `generate` on the sharded target and on the whole target (tiny
LLaVA and Qwen2.5-VL, fp32, greedy); a column-sharded `lm_head` serves a reduced draft vocabulary; ranks that
diverge raise a clear error on every rank instead of hanging."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_families import tiny_qwen2_5_vl
from tiny_models import tiny_llava

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    folder = tmp_path_factory.mktemp("tp")
    tiny_llava(seed=0, scale=32.0, gqa=True).save_pretrained(folder / "llava")
    tiny_qwen2_5_vl(seed=0).save_pretrained(folder / "qwen2_5_vl")
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    workers = [
        subprocess.Popen(
            [sys.executable, str(HERE / "tp_worker.py"), str(folder)],
            env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    logs = []
    for worker in workers:
        try:
            output, _ = worker.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for w in workers:
                w.kill()
            pytest.fail("the two-process run did not finish in 180 s")
        logs.append(output)
    assert all(w.returncode == 0 for w in workers), "\n\n".join(log[-4000:] for log in logs)
    found = [json.loads((folder / f"report_{r}.json").read_text()) for r in (0, 1)]
    for report in found:
        assert "error" not in report, report["error"]
    return found


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_speculative_decoding_on_a_tensor_parallel_target_equals_plain_generate(reports, family):
    main, other = (report[family] for report in reports)
    for report in (main, other):
        # the target really is sharded over the two processes (transformers' DTensor shards)
        assert report["mesh_size"] == 2 and report["whole_mesh"]
        assert (report["q_proj_local_rows"], report["q_proj_rows"]) == (32, 64)
        assert report["unsharded_equal"]
        assert {c["mode"] for c in report["cases"]} == {"tree", "chain", "static"}
        for case in report["cases"]:
            # plain generate on the TP target equals the whole target's, and SpecVLM equals both
            assert case["plain_equal"] and case["speculative_equal"], case
    # both ranks decoded the same tokens with the same acceptance, and the oracle drafts accepted long paths
    assert [c["tokens"] for c in main["cases"]] == [c["tokens"] for c in other["cases"]]
    assert [c["accepted"] for c in main["cases"]] == [c["accepted"] for c in other["cases"]]
    assert max(max(c["accepted"]) for c in main["cases"]) >= 3


def test_a_column_sharded_lm_head_serves_full_and_reduced_draft_vocabularies(reports):
    for report in reports:
        assert report["sharded_head"] == {"head_sharded": True, "full": True, "reduced": True}


@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_diverging_ranks_raise_on_every_rank_naming_the_rank(reports, mode):
    for rank, report in enumerate(reports):
        message = report["divergence"][mode]
        assert message is not None, f"rank {rank} did not notice rank 1's different prompt in {mode} mode"
        assert f"SpecVLM {mode} decoding on a tensor-parallel target: rank 1 diverged from rank 0" in message
        assert f"this is rank {rank}" in message and "same draft weights" in message
