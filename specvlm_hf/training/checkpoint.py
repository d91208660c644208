"""Checkpoints that survive a kill at any moment: written to a temporary folder, then renamed into place.

A checkpoint folder `checkpoint-{step}/` holds the draft (`draft/`, loadable with `from_pretrained`),
`trainer_state.pt` (optimizer, scheduler, step, data position, metrics, the run's settings),
`training_config.json` (the run's settings, readable without torch) and `rng_state_{rank}.pt` (python, numpy,
torch and CUDA generators of each process). `latest` names the newest complete checkpoint. Folders get the
usual permissions (0777 less the umask), not the 0700 of a temporary folder.

`prepare_output_dir` runs before anything else of a training run: it refuses an output folder that cannot be
written, or that holds an earlier run unless the run resumes it or was told to overwrite it.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError, check_writable_folder, read_json, write_atomic

LATEST = "latest"
CONFIG_FILE = "training_config.json"
# what a run writes into its output folder (deleted by overwrite_output_dir)
RUN_OUTPUTS = (
    "checkpoint-*",
    ".checkpoint-*",
    LATEST,
    "draft",
    "metrics.json",
    ".metrics.json.*.tmp",
    "scaling_curve.png",
)


def prepare_output_dir(output_dir, resume: bool = False, overwrite: bool = False, main_process: bool = True) -> None:
    """Refuses an unwritable `output_dir`, and a non-empty one unless `resume` (continue it) or `overwrite` (whose
    earlier run outputs, `RUN_OUTPUTS`, are deleted here by the main process)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir} is a file; pass a folder.")
    entries = (
        sorted(p.name for p in output_dir.iterdir() if not p.name.startswith(".write-check-"))
        if output_dir.is_dir()
        else []
    )
    if entries and not resume and not overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise UserError(
            f"--output-dir {output_dir} is not empty ({shown}); pass --resume to continue the run in it, "
            "--overwrite-output-dir to start afresh there (deletes its checkpoints, draft and metrics), "
            "or another folder."
        )
    if overwrite and entries and main_process:
        for pattern in RUN_OUTPUTS:
            for path in output_dir.glob(pattern):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    check_writable_folder(output_dir)


def saved_run(checkpoint) -> dict:
    """What a checkpoint says about its run: `config` (the settings), and `global_batch` and `total_steps` when
    it recorded them (checkpoints written before these were kept give only the settings, from the metrics)."""
    checkpoint = Path(checkpoint)
    if (checkpoint / CONFIG_FILE).is_file():
        return read_json(
            checkpoint / CONFIG_FILE, "the checkpoint is damaged: resume from another one or start afresh"
        )
    state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False)
    return {
        "config": state.get("config") or state.get("metrics", {}).get("config", {}),
        "global_batch": state.get("global_batch"),
        "total_steps": state.get("total_steps"),
    }


def _usual_permissions(path: Path) -> None:
    """mkdtemp makes 0700 folders; a checkpoint should be readable as any folder the user creates."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir, step: int, draft, state: dict, rng_states: list[dict], keep: int = 2, run: dict | None = None
) -> Path:
    """Writes `checkpoint-{step}` atomically, points `latest` at it and deletes all but the `keep` newest.
    `run` (the settings, global batch and total steps) goes to `training_config.json`."""
    import json

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix=f".checkpoint-{step}.tmp-"))
    _usual_permissions(tmp)
    draft.save_pretrained(tmp / "draft")
    torch.save(state, tmp / "trainer_state.pt")
    if run is not None:
        (tmp / CONFIG_FILE).write_text(json.dumps(run, indent=1, default=str) + "\n")
    for rank, rng in enumerate(rng_states):
        torch.save(rng, tmp / f"rng_state_{rank}.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_atomic(output_dir / LATEST, final.name + "\n")
    checkpoints = sorted(list_checkpoints(output_dir), key=lambda p: int(p.name.split("-")[1]))
    for old in checkpoints[: max(len(checkpoints) - keep, 0)]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir) -> list[Path]:
    return [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.pt").exists()]


def latest_checkpoint(output_dir) -> Path | None:
    """The newest complete checkpoint in `output_dir`, or None."""
    output_dir = Path(output_dir)
    pointer = output_dir / LATEST
    if pointer.exists():
        candidate = output_dir / pointer.read_text().strip()
        if (candidate / "trainer_state.pt").exists():
            return candidate
    checkpoints = list_checkpoints(output_dir)
    return max(checkpoints, key=lambda p: int(p.name.split("-")[1])) if checkpoints else None


def load_draft_weights(draft, folder) -> None:
    """Loads `folder/model.safetensors` into `draft` (strict)."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(folder) / "model.safetensors"), device=str(draft.fc.weight.device))
    draft.load_state_dict({k: v.to(draft.fc.weight.dtype) for k, v in weights.items()}, strict=True)
