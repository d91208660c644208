"""Evaluation during training: sigma measured with the real decoder, and the training-time scaling curve.

`measure_sigma` runs `target.generate(..., assistant_model=draft)` (the tree loop or the chain generator,
exactly as a user would) on held-out prompts and pools the accepted tokens per target forward.
`plot_scaling_curve` draws sigma against epoch from the trainer's `metrics.json`.
"""

from __future__ import annotations

import copy
import time

import torch

from ..integration import enable
from ..modeling_specvlm_draft import SpecVLMDraftModel


def decoding_copy(draft: SpecVLMDraftModel, target, mode: str = "tree") -> SpecVLMDraftModel:
    """A frozen copy of `draft` for decoding (bound to `target`, in its dtype), so that evaluation never
    changes the dtype or device of the weights being trained."""
    config = copy.deepcopy(draft.config)
    config.decoding_mode = mode
    twin = SpecVLMDraftModel(config)
    twin.load_state_dict(draft.state_dict())
    twin.bind_target(target)
    return twin.eval().requires_grad_(False)


def prompt_inputs(processor, prompt: str, images: list, device, dtype) -> dict:
    inputs = processor(text=prompt, images=images or None, return_tensors="pt").to(device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


@torch.no_grad()
def measure_sigma(
    target,
    draft: SpecVLMDraftModel,
    prompts: list[dict],
    mode: str = "tree",
    max_new_tokens: int = 64,
    baseline: bool = False,
) -> dict:
    """Sigma (accepted tokens per target forward, bonus included) of `draft` on `prompts`, greedy.

    Args:
        prompts: model inputs (`processor(...)` outputs on the target's device), one per prompt.
        mode: "tree" or "chain".
        baseline: also time plain `generate` on the same prompts and report the speedup.
    Returns:
        dict with `sigma` (pooled: all new tokens over all target forwards), `accepted_length_histogram`
        (rounds accepting 1, 2, ... tokens), `acceptance_by_depth` (fraction of rounds that accept at least
        d draft tokens, d = 1..), `new_tokens`, `seconds`, and with `baseline` `plain_seconds`, `speedup` and
        `identical` (greedy outputs equal to plain `generate`'s).
    """
    enable(target)
    runner = decoding_copy(draft, target, mode)
    accepted, new_tokens, seconds, plain_seconds, identical = [], 0, 0.0, 0.0, True
    cuda = next(runner.parameters()).device.type == "cuda"
    for inputs in prompts:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = target.generate(**inputs, assistant_model=runner, max_new_tokens=max_new_tokens, do_sample=False)
        if cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        accepted += runner.stats.accepted_per_round
        new_tokens += out.shape[1] - inputs["input_ids"].shape[1]
        if baseline:
            start = time.perf_counter()
            plain = target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            if cuda:
                torch.cuda.synchronize()
            plain_seconds += time.perf_counter() - start
            identical = identical and torch.equal(plain, out)
    # every prompt's first token comes from the prefill; the rounds produce the rest
    forwards = len(accepted) + len(prompts)
    longest = max(accepted, default=1)
    histogram = [sum(1 for a in accepted if a == k) for k in range(1, longest + 1)]
    result = {
        "mode": mode,
        "sigma": sum(accepted) / max(len(accepted), 1),
        "sigma_with_prefill": new_tokens / max(forwards, 1),
        "rounds": len(accepted),
        "new_tokens": new_tokens,
        "accepted_length_histogram": histogram,
        "acceptance_by_depth": [sum(1 for a in accepted if a > d) / max(len(accepted), 1) for d in range(1, longest)],
        "seconds": seconds,
    }
    if baseline:
        result.update(plain_seconds=plain_seconds, speedup=plain_seconds / max(seconds, 1e-9), identical=identical)
    return result


def plot_scaling_curve(metrics: dict, path) -> bool:
    """Draws sigma against epoch (one line per decoding mode) and per-depth top-1 agreement to `path` (PNG).
    Returns False when matplotlib is not installed (`pip install matplotlib`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    evals = metrics.get("eval", [])
    if not evals:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    modes = sorted({mode for e in evals for mode in e.get("sigma", {})})
    for mode in modes:
        points = [(e["epoch"], e["sigma"][mode]) for e in evals if mode in e.get("sigma", {})]
        left.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{mode}")
    left.set_xlabel("epoch")
    left.set_ylabel("sigma (accepted tokens per target forward)")
    left.set_title(metrics.get("title", "training-time scaling"))
    left.grid(alpha=0.3)
    left.legend()
    depths = max((len(e.get("depth_agreement", [])) for e in evals), default=0)
    for d in range(depths):
        points = [(e["epoch"], e["depth_agreement"][d]) for e in evals if len(e.get("depth_agreement", [])) > d]
        right.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"depth {d + 1}")
    right.set_xlabel("epoch")
    right.set_ylabel("top-1 agreement with the target")
    right.set_ylim(0, 1)
    right.grid(alpha=0.3)
    if depths:
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
