"""The mini VLM's trained drafts, shipped with the package (trained by `benchmarks/train_mini_drafts.py`).

- `eaglevlm/` (the default): EagleVLM draft, reads every visual token; 5 epochs on 12k generated examples;
- `specvlm/`: SpecVLM draft with the elastic visual compressor (the gate selects one branch per image);
  3 epochs on the same data (its per-example compression is slower to train).

The default is the one measured faster (`results/train_mini_drafts_bench_h100.json`): the mini VLM's images
have only 64 visual tokens, so compressing them saves little.

    >>> from specvlm_hf.mini import load
    >>> from specvlm_hf.mini.drafts import load_draft
    >>> target, processor = load()
    >>> draft = load_draft(target)               # the default draft, bound to the target
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DRAFTS_DIR = Path(__file__).parent
DRAFT_NAMES = ("eaglevlm", "specvlm")
DEFAULT_DRAFT = "eaglevlm"
# the mini-qwen target's drafts (`benchmarks/train_mini_qwen.py`; `benchmarks/train_mini_video.py` retrains
# `qwen_eaglevlm` and adds `qwen_specvlm`, a compressing draft for clips, once it has run on a GPU)
QWEN_DRAFT_NAMES = ("qwen_eaglevlm", "qwen_specvlm")


def draft_path(name: str = DEFAULT_DRAFT) -> Path:
    """Folder of a shipped draft (`from_pretrained`-loadable)."""
    if name not in DRAFT_NAMES + QWEN_DRAFT_NAMES:
        raise ValueError(f"unknown mini draft {name!r}; choose one of {DRAFT_NAMES + QWEN_DRAFT_NAMES}")
    path = DRAFTS_DIR / name
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(
            f"The mini draft {name!r} is missing from {path}; reinstall specvlm-hf, or train one with "
            "`python benchmarks/train_mini_drafts.py --out DIR`."
        )
    return path


def refresh_shipped_files() -> None:
    """Rewrites each shipped draft folder as `save_pretrained` writes it (weights, config, remote code and
    `custom_generate/`, which finds the draft inside the installed package), its code files as relative links to
    the package's own modules, so that the checkout holds one copy of the code (a wheel stores the linked files'
    contents). Run after adding a draft or a remote-code module:
    `python -c "from specvlm_hf.mini.drafts import refresh_shipped_files as r; r()"`."""
    import tempfile

    from ...modeling_specvlm_draft import SpecVLMDraftModel
    from ...packaging import write_custom_generate

    package = DRAFTS_DIR.parent.parent
    shipped_qwen = [name for name in QWEN_DRAFT_NAMES if (DRAFTS_DIR / name / "model.safetensors").exists()]
    for name in DRAFT_NAMES + tuple(shipped_qwen):
        folder = draft_path(name)
        with tempfile.TemporaryDirectory() as scratch:
            SpecVLMDraftModel.from_pretrained(folder).save_pretrained(scratch)
            write_custom_generate(scratch, location=f"package:specvlm_hf/mini/drafts/{name}")
            for written in sorted(Path(scratch).rglob("*")):
                if written.is_dir():
                    continue
                destination = folder / written.relative_to(scratch)
                destination.parent.mkdir(exist_ok=True)
                if destination.is_symlink() or destination.exists():
                    destination.unlink()
                source = package / ("custom_generate_entry.py" if written.name == "generate.py" else written.name)
                if written.suffix == ".py" and source.exists() and source.read_bytes() == written.read_bytes():
                    destination.symlink_to(os.path.relpath(source, destination.parent))
                else:  # weights, config, and the generated `draft_location.py`
                    shutil.copyfile(written, destination)


def load_draft(target=None, name: str = DEFAULT_DRAFT):
    """Loads a shipped draft (bound to `target` when given: on its device and dtype)."""
    from ...modeling_specvlm_draft import SpecVLMDraftModel

    draft = SpecVLMDraftModel.from_pretrained(draft_path(name)).eval()
    return draft.bind_target(target) if target is not None else draft
