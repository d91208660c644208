"""`custom_generate/generate.py` of a saved SpecVLM draft.

`target.generate(**inputs, custom_generate="<draft folder or Hub id>", trust_remote_code=True)` runs this
`generate` in place of transformers' own, with no install of specvlm-hf: it loads the draft from the folder
or Hub repo recorded next to this file (`draft_location.py`, written when the draft was saved or pushed),
enables SpecVLM decoding on the target for the call, and runs the target's `generate` with the draft as
`assistant_model`. Passing `assistant_model=` yourself skips the loading.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os

from .draft_location import CONFIG_SHA256, LOCATION
from .integration import disable, enable, exclusive_use, is_specvlm_draft
from .modeling_specvlm_draft import SpecVLMDraftModel

_LOADED_DRAFTS: dict = {}


def _draft_location() -> str:
    """The folder or Hub repo this file's draft lives in, as `save_pretrained` / `specvlm push` recorded it."""
    if LOCATION is not None and LOCATION.startswith("package:"):  # shipped inside an installed package
        package, _, folder = LOCATION[len("package:") :].partition("/")
        return str(importlib.resources.files(package).joinpath(folder))
    if LOCATION is not None and not os.path.isabs(LOCATION):
        return LOCATION  # a Hub repo id
    if LOCATION is not None and CONFIG_SHA256 is not None:
        config = os.path.join(LOCATION, "config.json")
        if os.path.isfile(config):
            with open(config, "rb") as handle:
                if hashlib.sha256(handle.read()).hexdigest() == CONFIG_SHA256:
                    return LOCATION
    raise RuntimeError(
        f"This custom_generate cannot find its draft (recorded at {LOCATION!r}, which has moved or changed). Pass "
        "the draft explicitly: `target.generate(..., custom_generate=<folder>, trust_remote_code=True, "
        "assistant_model=SpecVLMDraftModel.from_pretrained(<folder>))`, or save the draft again."
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
    with exclusive_use(model, draft, decoding=False):  # enabling and disabling too: another thread may call
        was_enabled = hasattr(type(model), "_specvlm_base_class")
        enable(model)
        try:
            return model.generate(*args, assistant_model=draft, **kwargs)
        finally:
            if not was_enabled:
                disable(model)
