"""What the draft needs from a target VLM: its text model, embedding, `lm_head`, and features.

The draft reads the target's **final hidden state after the last norm** (the input of `lm_head`) and the
target's **input embeddings** (with the projected image features already scattered in at the image
positions). Neither is returned by `LlavaForConditionalGeneration.forward`, so `FeatureTap` records
them with hooks on the target's text model, on every forward: our own tree loop and transformers'
assisted-decoding loop both go through it.
"""

from __future__ import annotations

import threading

import torch
from torch import nn


class DraftTargetMismatchError(ValueError):
    """A draft was used with a target it was not made for."""


def unwrap_target(target: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(target, "get_base_model", None)
    return get_base() if callable(get_base) else target


def text_model_of(target: nn.Module) -> nn.Module:
    """The target's decoder-only text model (e.g. `LlamaModel` inside a LLaVA)."""
    model = unwrap_target(target)
    inner = getattr(model, "model", None)
    for candidate in (getattr(inner, "language_model", None), getattr(model, "language_model", None)):
        if candidate is not None:
            return getattr(candidate, "model", candidate) if hasattr(candidate, "lm_head") else candidate
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        raise TypeError(f"cannot find the text model of {type(model).__name__}: expected `.model.language_model`")
    return decoder


def target_text_config(target: nn.Module):
    return unwrap_target(target).config.get_text_config(decoder=True)


def describe_target(target: nn.Module) -> dict:
    """What a draft records about the target it is made for."""
    model = unwrap_target(target)
    text = target_text_config(model)
    return {
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "text_model_type": text.model_type,
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "name_or_path": getattr(model.config, "_name_or_path", "") or "",
    }


def check_draft_fits(draft_config, target: nn.Module) -> None:
    """Raises `DraftTargetMismatchError`, naming both models, when the draft cannot serve this target."""
    have = describe_target(target)
    want = draft_config.target or {}
    draft_text = draft_config.text_config
    problems = []
    if draft_text.vocab_size != have["vocab_size"]:
        problems.append(f"vocab size {draft_text.vocab_size} (draft) vs {have['vocab_size']} (target)")
    if draft_text.hidden_size != have["hidden_size"]:
        problems.append(f"hidden size {draft_text.hidden_size} (draft) vs {have['hidden_size']} (target)")
    if draft_text.model_type != have["text_model_type"]:
        problems.append(f"text architecture {draft_text.model_type!r} (draft) vs {have['text_model_type']!r} (target)")
    if problems:
        draft_name = want.get("name_or_path") or want.get("architecture") or "this draft"
        raise DraftTargetMismatchError(
            f"The draft made for {draft_name!r} ({want.get('architecture', 'unknown architecture')}) does not fit the "
            f"target {have['name_or_path'] or have['architecture']!r} ({have['architecture']}): "
            + "; ".join(problems)
            + ". Use a draft trained for this target, or build a fresh one with "
            "`SpecVLMDraftModel.from_target(target)` and train it with `specvlm train`."
        )


class FeatureTap:
    """Records the input embeddings and the final (post-norm) hidden states of every forward of a target's
    text model, while active.

    Attributes (after a forward):
        inputs_embeds: `(1, q, d)` the embeddings the text model received (image features merged in).
        last_hidden_state: `(1, q, d)` its final hidden states after the last norm.
    """

    def __init__(self, target: nn.Module):
        self.owner = target
        self.text_model = text_model_of(target)
        self.inputs_embeds: torch.Tensor | None = None
        self.last_hidden_state: torch.Tensor | None = None
        self._handles: list = []
        self._thread = threading.get_ident()  # forwards that other threads run on the target are not this call's

    def _before(self, module, args, kwargs):
        if threading.get_ident() != self._thread:
            return
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            embeds = module.get_input_embeddings()(input_ids) if input_ids is not None else None
        self.inputs_embeds = embeds

    def _after(self, module, args, kwargs, output):
        if threading.get_ident() != self._thread:
            return
        hidden = getattr(output, "last_hidden_state", None)
        self.last_hidden_state = hidden if hidden is not None else output[0]

    def __enter__(self) -> "FeatureTap":
        self._handles = [
            self.text_model.register_forward_pre_hook(self._before, with_kwargs=True),
            self.text_model.register_forward_hook(self._after, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.inputs_embeds = self.last_hidden_state = None
