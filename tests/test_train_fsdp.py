"""`--shard-target` (FSDP2): two CPU processes (gloo) with the target's layers sharded train the same draft as one
process with a whole target; the sharded target teaches and decodes exactly as a whole one; clear errors."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_fsdp_common import TRAIN, config_settings, tiny_sharding_target
from transformers import AutoProcessor

from specvlm_hf.mini import WEIGHTS_DIR
from specvlm_hf.training import DistillConfig, DistillTrainer
from specvlm_hf.training.data import load_records

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from specvlm_hf.mini.data import write_dataset

    folder = tmp_path_factory.mktemp("fsdp-data")
    return str(write_dataset(folder, 24, seed=21))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_a_sharded_target_train_like_one_process_with_a_whole_target(tmp_path, data):
    pytest.importorskip("torch.distributed.fsdp")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE="2",
        PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    workers = [
        subprocess.Popen(
            [sys.executable, str(HERE / "train_fsdp_worker.py"), data, str(tmp_path)],
            env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    # meanwhile, the reference: one process, the whole target, the same global batch (2 x 2 accumulated)
    records = load_records(data)
    config = DistillConfig(**config_settings(data, str(tmp_path / "single"), gradient_accumulation_steps=2))
    single = DistillTrainer(
        config,
        target=tiny_sharding_target(),
        processor=AutoProcessor.from_pretrained(WEIGHTS_DIR),
        train_records=records[: TRAIN["train"]],
        eval_records=records[TRAIN["train"] : TRAIN["eval_end"]],
    )
    reference = single.train()
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
    main, other = (json.loads((tmp_path / f"report_{r}.json").read_text()) for r in (0, 1))

    # the target really is sharded: each process holds half of every layer weight, the rest whole
    assert main["world"] == 2 and main["sharded"] and other["sharded"]
    assert (main["q_proj_local_rows"], main["q_proj_rows"]) == (32, 64)
    memory = main["target_weight_bytes"]
    shard = (
        memory["per_process"] - memory["replicated"]
    )  # process 0 holds the larger half of uneven rows (99 = 50 + 49)
    assert memory["sharded"] // 2 <= shard < memory["sharded"] // 2 + memory["sharded"] // 100
    # its teacher pass (each process on its own batch) and greedy decoding equal a whole target's exactly
    for report in (main, other):
        assert report["teacher_features_equal"] and report["teacher_embeds_equal"]
    assert main["generate_equal"] and main["speculative_equal"]
    assert other["followed_forwards"] > 0  # process 1 joined the main process's forwards

    # the training itself: the same losses (mean over processes) and the same draft weights (on this CPU they
    # are bit-identical: DDP's mean of two gradients equals the accumulated sum of halves exactly)
    sharded = main["metrics"]
    assert [e["step"] for e in sharded["train"]] == [e["step"] for e in reference["train"]] == [1, 2, 3, 4]
    for mine, theirs in zip(sharded["train"], reference["train"]):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5)
    assert sharded["train"][-1]["loss"] < sharded["train"][0]["loss"]
    weights = torch.load(tmp_path / "draft_state.pt")
    for name, value in single.draft.state_dict().items():
        torch.testing.assert_close(weights[name], value, atol=1e-6, rtol=1e-5, msg=name)
    # evaluation ran on the main process with the sharded target (process 1 following): the same result
    (mine,), (theirs,) = sharded["eval"], reference["eval"]
    assert (
        mine["decoding"]["tree"]["accepted_length_histogram"]
        == theirs["decoding"]["tree"]["accepted_length_histogram"]
    )
    assert mine["sigma"] == theirs["sigma"]
    assert mine["depth_agreement"] == pytest.approx(theirs["depth_agreement"], abs=1e-6)


def test_shard_target_needs_several_processes(tmp_path, data):
    config = DistillConfig(**config_settings(data, str(tmp_path / "run"), shard_target=True))
    records = load_records(data)
    with pytest.raises(
        ValueError, match=r"--shard-target .* 1 process.*accelerate launch --multi_gpu --num_processes N"
    ):
        DistillTrainer(
            config,
            target=tiny_sharding_target(),
            processor=AutoProcessor.from_pretrained(WEIGHTS_DIR),
            train_records=records[:8],
            eval_records=records[8:10],
        )


def test_the_command_line_has_the_option():
    from specvlm_hf.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "--shard-target", "--data", "x.json"])
    assert args.shard_target is True
    assert parser.parse_args(["train"]).shard_target is False
    train = parser._subparsers._group_actions[0].choices["train"]
    assert "FSDP2" in train.format_help()
