"""The built-in mini VLM: a small LLaVA (CLIP vision tower + 12-layer Llama) trained from scratch by
`specvlm_hf.mini.train` on synthetic data from `specvlm_hf.mini.data`, shipped in `weights/`.

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


def load(dtype=None, device="cpu"):
    """Load the shipped mini VLM and its processor.

    Args:
        dtype: torch dtype of the weights (default `torch.float32`; they are stored in bfloat16).
        device: where to put the model.

    Returns:
        `(model, processor)`: a `LlavaForConditionalGeneration` in eval mode and a `LlavaProcessor`.
    """
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if not (WEIGHTS_DIR / "config.json").exists():
        raise FileNotFoundError(
            f"The mini VLM weights are missing from {WEIGHTS_DIR}; reinstall specvlm-hf, or retrain them with "
            f"`python -m specvlm_hf.mini.train --output_dir {WEIGHTS_DIR}`."
        )
    model = LlavaForConditionalGeneration.from_pretrained(WEIGHTS_DIR, dtype=dtype or torch.float32).to(device).eval()
    processor = AutoProcessor.from_pretrained(WEIGHTS_DIR)
    return model, processor
