"""`custom_generate/generate.py` of a saved SpecVLM draft.

`target.generate(**inputs, custom_generate="<draft folder or Hub id>", trust_remote_code=True)` runs this
`generate` in place of transformers' own, with no install of specvlm-hf: it loads the draft from the folder
that carries this file, enables SpecVLM decoding on the target for the call, and runs the target's
`generate` with the draft as `assistant_model`. Passing `assistant_model=` yourself skips the loading.
"""

from __future__ import annotations

import inspect
import os

from .integration import disable, enable, is_specvlm_draft
from .modeling_specvlm_draft import SpecVLMDraftModel

_LOADED_DRAFTS: dict = {}


def _draft_location() -> str:
    """The `custom_generate` argument of the enclosing `GenerationMixin.generate` call.

    transformers does not pass it on to this function, so it is read from the caller's frame.
    """
    frame = inspect.currentframe()
    while frame is not None:
        value = frame.f_locals.get("custom_generate")
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        frame = frame.f_back
    raise RuntimeError(
        "Could not find which draft this custom_generate belongs to; pass the draft explicitly: "
        "`target.generate(..., custom_generate=<folder>, trust_remote_code=True, assistant_model=draft)`."
    )


def _load_draft(location: str, model) -> SpecVLMDraftModel:
    key = (location, id(model))
    draft = _LOADED_DRAFTS.get(key)
    if draft is None:
        draft = SpecVLMDraftModel.from_pretrained(location)
        _LOADED_DRAFTS.clear()  # keep one draft alive at a time
        _LOADED_DRAFTS[key] = draft
    return draft.bind_target(model)


def generate(model, *args, **kwargs):
    """Runs `model.generate(*args, **kwargs)` with SpecVLM speculative decoding (see the module docstring)."""
    draft = kwargs.pop("assistant_model", None)
    if draft is None:
        draft = _load_draft(_draft_location(), model)
    elif not is_specvlm_draft(draft):
        raise TypeError("this custom_generate needs a SpecVLM draft as assistant_model")
    was_enabled = hasattr(type(model), "_specvlm_base_class")
    enable(model)
    try:
        return model.generate(*args, assistant_model=draft, **kwargs)
    finally:
        if not was_enabled:
            disable(model)
