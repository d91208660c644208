"""Training runs never lose work and fail early: a finished output folder is not replaced, an unwritable one is
refused before the first step, a resume with other settings is refused naming them, max_steps is the run's
length (as in Hugging Face's Trainer), checkpoints get ordinary permissions, malformed data files are named."""

from __future__ import annotations

import json
import os
import time

import pytest
from transformers import AutoProcessor

from specvlm_hf.cli import main
from specvlm_hf.errors import UserError
from specvlm_hf.mini import WEIGHTS_DIR
from specvlm_hf.training import DistillTrainer, trainer as trainer_module
from specvlm_hf.training.checkpoint import CONFIG_FILE, latest_checkpoint
from specvlm_hf.training.data import DataRecordError, load_records
from test_train_loop import _config, tiny_target


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(WEIGHTS_DIR)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from specvlm_hf.mini.data import write_dataset

    folder = tmp_path_factory.mktemp("train-runs")
    path = write_dataset(folder, 16, seed=5)
    return str(path), load_records(str(path))


def trainer(tmp_path, data, processor, **overrides):
    """A trainer on the tiny target: 12 records, batch 2 -> 6 steps per epoch."""
    path, records = data
    config = _config(tmp_path, path, **overrides)
    return DistillTrainer(
        config, target=tiny_target(), processor=processor, train_records=records[:12], eval_records=records[12:14]
    )


@pytest.fixture
def finished(tmp_path, data, processor):
    """A finished run in tmp_path/run: 4 steps, checkpoints at 2 and 4, the draft and metrics.json."""
    trainer(tmp_path, data, processor, max_steps=4, save_steps=2).train()
    run = tmp_path / "run"
    return run, {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def no_target_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the target was loaded before the check")

    monkeypatch.setattr(trainer_module, "load_target", refuse)


def cli(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    return status, out, lines


# ---- 2: a non-empty output folder is refused unless --resume or --overwrite-output-dir


def test_a_finished_run_is_not_replaced_by_a_new_one_without_resume_or_overwrite(finished, capsys, monkeypatch, data):
    run, before = finished
    no_target_loading(monkeypatch)
    start = time.perf_counter()
    status, _, lines = cli(
        capsys, "train", "--data", data[0], "--output-dir", run, "--max-steps", 2, "--no-progress-bar"
    )
    assert status == 2 and len(lines) == 1, lines
    assert (
        f"--output-dir {run} is not empty (checkpoint-2, checkpoint-4, draft, latest, ...); pass --resume" in lines[0]
    )
    assert "--overwrite-output-dir to start afresh there" in lines[0]
    assert time.perf_counter() - start < 20
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before, "nothing in the finished run changed"


def test_overwrite_output_dir_replaces_the_previous_runs_outputs_and_keeps_other_files(
    finished, tmp_path, data, processor
):
    run, _ = finished
    (run / "notes.txt").write_text("mine")
    trainer(tmp_path, data, processor, max_steps=1, save_steps=0, overwrite_output_dir=True).train()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"], "the old checkpoints are gone"
    assert json.loads((run / "metrics.json").read_text())["train"][-1]["step"] == 1
    assert (run / "notes.txt").read_text() == "mine"


# ---- 3: the run's settings live in the checkpoint; an incompatible resume is refused naming the fields


def test_a_checkpoint_keeps_the_runs_settings(finished):
    run, _ = finished
    saved = json.loads((latest_checkpoint(run) / CONFIG_FILE).read_text())
    assert saved["config"]["per_device_batch_size"] == 2 and saved["global_batch"] == 2 and saved["total_steps"] == 4


def test_resume_with_another_batch_size_or_seed_is_refused_naming_the_fields_before_loading(
    finished, capsys, monkeypatch, data, tmp_path
):
    run, _ = finished
    no_target_loading(monkeypatch)
    status, _, lines = cli(
        capsys,
        "train",
        "--data",
        data[0],
        "--output-dir",
        run,
        "--resume",
        "--max-steps",
        4,
        "--per-device-batch-size",
        4,
        "--seed",
        3,
        "--learning-rate",
        1e-3,
        "--max-length",
        256,
    )
    assert status == 2 and len(lines) == 1, lines
    assert f"--resume: {run / 'checkpoint-4'} was written with other settings" in lines[0]
    assert "per_device_batch_size: 2 -> 4" in lines[0] and "seed: 0 -> 3" in lines[0]
    assert "global batch" in lines[0]


def test_resume_that_changes_the_length_of_a_shaped_schedule_is_refused(tmp_path, data, processor):
    trainer(tmp_path, data, processor, max_steps=4, save_steps=2, lr_scheduler="cosine").train()
    with pytest.raises(UserError, match="total steps with the cosine schedule: 4 -> 6"):
        trainer(tmp_path, data, processor, max_steps=6, save_steps=2, resume=True, lr_scheduler="cosine")


def test_resume_with_more_epochs_on_the_constant_schedule_trains_the_extra_steps(
    finished, tmp_path, data, processor, capsys
):
    run, _ = finished
    resumed = trainer(tmp_path, data, processor, max_steps=None, num_epochs=2, save_steps=2, resume=True)
    assert "resumed from" in capsys.readouterr().out
    resumed.train()
    assert resumed.step == 12, "two epochs of 6 steps"
    assert json.loads((run / "metrics.json").read_text())["config"]["num_epochs"] == 2


def test_resume_of_a_finished_run_says_there_is_nothing_to_train(finished, tmp_path, data, processor, capsys):
    trainer(tmp_path, data, processor, max_steps=4, save_steps=2, resume=True)
    assert "there is nothing to train; raise --num-epochs or --max-steps" in capsys.readouterr().out


# ---- 4: an unwritable output folder is refused before the first step


def test_an_output_dir_that_cannot_be_created_is_refused_before_loading_anything(tmp_path, capsys, monkeypatch, data):
    no_target_loading(monkeypatch)
    (tmp_path / "file").write_text("a file, not a folder")
    start = time.perf_counter()
    status, _, lines = cli(capsys, "train", "--data", data[0], "--output-dir", tmp_path / "file" / "run")
    assert status == 1 and len(lines) == 1, lines
    assert f"--output-dir {tmp_path / 'file' / 'run'} is not writable (" in lines[0]
    assert "pass a folder you can write to" in lines[0]
    assert time.perf_counter() - start < 20


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write: a read-only tmpfs when running as root (root ignores permissions), else mode
    0555. Skipped where neither can be had."""
    import subprocess

    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        yield folder
        os.chmod(folder, 0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only filesystem here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_filesystem_is_refused_before_the_first_step(read_only_folder, capsys, monkeypatch, data):
    no_target_loading(monkeypatch)
    start = time.perf_counter()
    status, _, lines = cli(capsys, "train", "--data", data[0], "--output-dir", read_only_folder / "run")
    assert status == 1 and len(lines) == 1, lines
    assert f"--output-dir {read_only_folder / 'run'} is not writable (" in lines[0]
    assert time.perf_counter() - start < 20


def test_bench_out_on_a_read_only_filesystem_is_refused_before_the_run(read_only_folder, capsys, monkeypatch):
    from specvlm_hf.commands import bench as command

    monkeypatch.setattr(command, "_load_target", lambda *a, **k: pytest.fail("the target was loaded"))
    status, _, lines = cli(capsys, "bench", "--out", read_only_folder / "bench.json")
    assert status == 1 and len(lines) == 1, lines
    assert f"--out: the folder {read_only_folder} is not writable (" in lines[0]


# ---- max_steps is the run's length; checkpoint permissions


def test_max_steps_overrides_num_epochs_as_in_hugging_face_trainer(tmp_path, data, processor):
    run = trainer(tmp_path, data, processor, max_steps=8, num_epochs=1)
    assert run.steps_per_epoch == 6 and run.total_steps == 8
    metrics = run.train()
    assert run.step == 8 and metrics["train"][-1]["step"] == 8


def test_checkpoint_folders_get_the_usual_permissions_not_0700(finished):
    run, _ = finished
    umask = os.umask(0)
    os.umask(umask)
    for folder in run.glob("checkpoint-*"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, oct(folder.stat().st_mode)


# ---- malformed data files


def test_malformed_training_json_is_named_with_line_and_column(tmp_path):
    (tmp_path / "list.json").write_text('[\n {"id": 1,\n  "conversations": [}\n]\n')
    with pytest.raises(DataRecordError, match=r"list.json line 3 column 21: invalid JSON \(Expecting value\)"):
        load_records(str(tmp_path / "list.json"))
    (tmp_path / "lines.jsonl").write_text('{"id": 1}\n\n{"id": 2,,}\n')
    with pytest.raises(DataRecordError, match=r"lines.jsonl line 3 column 10: invalid JSON"):
        load_records(str(tmp_path / "lines.jsonl"))


def test_training_settings_out_of_range_are_one_line_errors(capsys, tmp_path):
    status, _, lines = cli(capsys, "train", "--max-steps", 0, "--output-dir", tmp_path / "run")
    assert status == 2 and lines == [
        "specvlm train: error: max_steps must be at least 1, got 0; pass --max-steps 1 or more."
    ]
    status, _, lines = cli(capsys, "train", "--resume", "--overwrite-output-dir", "--output-dir", tmp_path / "run")
    assert status == 2 and "pass one of them" in lines[0]
