"""Checkpoints that survive a kill at any moment: written to a temporary folder, then renamed into place.

A checkpoint folder `checkpoint-{step}/` holds the draft (`draft/`, loadable with `from_pretrained`),
`trainer_state.pt` (optimizer, scheduler, step, data position, metrics) and `rng_state_{rank}.pt` (python,
numpy, torch and CUDA generators of each process). `latest` names the newest complete checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

LATEST = "latest"


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


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(output_dir, step: int, draft, state: dict, rng_states: list[dict], keep: int = 2) -> Path:
    """Writes `checkpoint-{step}` atomically, points `latest` at it and deletes all but the `keep` newest."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix=f".checkpoint-{step}.tmp-"))
    draft.save_pretrained(tmp / "draft")
    torch.save(state, tmp / "trainer_state.pt")
    for rank, rng in enumerate(rng_states):
        torch.save(rng, tmp / f"rng_state_{rank}.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text_atomic(output_dir / LATEST, final.name + "\n")
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
