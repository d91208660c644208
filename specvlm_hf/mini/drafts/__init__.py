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

from pathlib import Path

DRAFTS_DIR = Path(__file__).parent
DRAFT_NAMES = ("eaglevlm", "specvlm")
DEFAULT_DRAFT = "eaglevlm"
QWEN_DRAFT_NAMES = ("qwen_eaglevlm",)  # the mini-qwen target's draft (`benchmarks/train_mini_qwen.py`)


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
    `custom_generate/`, which finds the draft inside the installed package). Run after changing the package's
    remote-code modules: `python -c "from specvlm_hf.mini.drafts import refresh_shipped_files as r; r()"`."""
    from ...modeling_specvlm_draft import SpecVLMDraftModel
    from ...packaging import write_custom_generate

    shipped_qwen = [name for name in QWEN_DRAFT_NAMES if (DRAFTS_DIR / name / "model.safetensors").exists()]
    for name in DRAFT_NAMES + tuple(shipped_qwen):
        folder = draft_path(name)
        SpecVLMDraftModel.from_pretrained(folder).save_pretrained(folder)
        write_custom_generate(str(folder), location=f"package:specvlm_hf/mini/drafts/{name}")


def load_draft(target=None, name: str = DEFAULT_DRAFT):
    """Loads a shipped draft (bound to `target` when given: on its device and dtype)."""
    from ...modeling_specvlm_draft import SpecVLMDraftModel

    draft = SpecVLMDraftModel.from_pretrained(draft_path(name)).eval()
    return draft.bind_target(target) if target is not None else draft
