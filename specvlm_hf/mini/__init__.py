"""The built-in mini VLMs: a small LLaVA (CLIP vision tower + 12-layer Llama) trained from scratch by
`specvlm_hf.mini.train` on synthetic data from `specvlm_hf.mini.data`, shipped in `weights/` (name "mini"), and
a small Qwen2.5-VL (M-RoPE, dynamic resolution) trained on the same data, in `weights_qwen/` ("mini-qwen").

It is the package's default target: tests, the demo, benchmarks and draft training use it because no
pretrained weights can be downloaded here, and random weights make acceptance lengths meaningless.

    >>> from specvlm_hf.mini import load, EXAMPLE_IMAGE
    >>> model, processor = load()          # float32 on CPU
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
"""Folder of the shipped model and processor (loadable with `from_pretrained`, offline)."""

EXAMPLE_IMAGE = Path(__file__).parent / "assets" / "example.png"
"""A bundled scene of shapes, described by `specvlm generate` when no image is given."""

DRAFT_DIR = Path(__file__).parent / "drafts" / "eaglevlm"
"""The default shipped draft for the mini VLM (see `specvlm_hf.mini.drafts`)."""

QWEN_WEIGHTS_DIR = Path(__file__).parent / "weights_qwen"
"""Folder of the shipped Qwen2.5-VL-style mini target ("mini-qwen") and its processor."""

QWEN_DRAFT_DIR = Path(__file__).parent / "drafts" / "qwen_eaglevlm"
"""The shipped EagleVLM draft of the mini-qwen target."""

BUILTIN_MODELS = ("mini", "mini-qwen")
"""Names `--model` / `--target` take for the built-in mini targets."""


def builtin_dirs(name: str) -> tuple[Path, Path]:
    """`(weights folder, default draft folder)` of a built-in mini target ("mini" or "mini-qwen")."""
    import sys

    module = sys.modules[__name__]  # read at call time, so that tests can point them at a tiny stand-in
    if name == "mini":
        return module.WEIGHTS_DIR, module.DRAFT_DIR
    if name == "mini-qwen":
        return module.QWEN_WEIGHTS_DIR, module.QWEN_DRAFT_DIR
    raise ValueError(f"unknown built-in model {name!r}; choose one of {BUILTIN_MODELS}")


def load(dtype=None, device="cpu", name: str = "mini"):
    """Load a shipped mini VLM and its processor.

    Args:
        dtype: torch dtype of the weights (default `torch.float32`; they are stored in bfloat16).
        device: where to put the model.
        name: "mini" (the LLaVA) or "mini-qwen" (the Qwen2.5-VL).

    Returns:
        `(model, processor)`: a `LlavaForConditionalGeneration` and `LlavaProcessor` ("mini"), or a
        `Qwen2_5_VLForConditionalGeneration` and `Qwen2_5_VLProcessor` ("mini-qwen"), the model in eval mode.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from ..processors import load_processor

    folder, _ = builtin_dirs(name)
    if not (folder / "config.json").exists():
        recipe = "" if name == "mini" else " --architecture qwen2_5_vl --patch_size 8"
        raise FileNotFoundError(
            f"The {name} weights are missing from {folder}; reinstall specvlm-hf, or retrain them with "
            f"`python -m specvlm_hf.mini.train{recipe} --output_dir {folder}`."
        )
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype or torch.float32).to(device).eval()
    return model, load_processor(str(folder))
