"""`enable(target)`: route `target.generate(..., assistant_model=draft)` to SpecVLM decoding.

transformers looks the decoding method up on the model's *class*, so `enable` gives the target instance
a subclass (same name and module, so saving and `isinstance` are unchanged) whose `_assisted_decoding`
runs the tree loop when the assistant is a SpecVLM draft in tree mode, and whose
`_get_candidate_generator` returns the SpecVLM chain generator in chain mode. Any other assistant falls
through to transformers' own code. The overridden hooks are named in `hf_internals`.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from contextvars import ContextVar

from torch import nn

from .adapters import adapter_for, keeping_image_inputs
from .chain import SpecVLMChainCandidateGenerator
from .decoding import tree_assisted_decoding
from .hf_internals import (
    ASSISTED_DECODING,
    CANDIDATE_GENERATOR,
    VALIDATE_GENERATION_MODE,
    CandidateStopCheck,
    generation_cache_key,
)
from .errors import UserError
from .request_checks import check_chain_cache, check_empty_cache, validate_request
from .target import FeatureTap, check_draft_fits, unwrap_target

DRAFT_MODEL_TYPE = "specvlm_draft"
# keyword arguments of `_assisted_decoding` that are not model inputs
_DECODING_ARGUMENTS = {
    "synced_gpus",
    "streamer",
    "inputs_tensor",
    "assistant_model",
    "assistant_tokenizer",
    "tokenizer",
}


class _ChainCall:
    """What a chain-mode `generate` call hands from `_assisted_decoding` to `_get_candidate_generator` (which
    transformers calls without the stopping criteria), and the generator it made."""

    def __init__(self, adapter, tap: FeatureTap, stopping_criteria):
        self.adapter, self.tap, self.stopping_criteria = adapter, tap, stopping_criteria
        self.generator: SpecVLMChainCandidateGenerator | None = None


# the chain-mode call in progress in this thread / task (None outside one)
_CHAIN_CALL: ContextVar[_ChainCall | None] = ContextVar("specvlm_chain_call", default=None)


def is_specvlm_draft(model) -> bool:
    """Whether `model` is a SpecVLM draft (by config, so remote-code copies of the class count too)."""
    return getattr(getattr(model, "config", None), "model_type", None) == DRAFT_MODEL_TYPE


def _uses_tree(draft) -> bool:
    return draft.config.decoding_mode == "tree"


# one lock per target and per draft (weakly keyed: nothing is added to the models, which stay picklable)
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()
_DECODING: ContextVar[frozenset] = ContextVar("specvlm_decoding_drafts", default=frozenset())


def _lock_of(module: nn.Module) -> threading.RLock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.RLock()
        return lock


@contextmanager
def exclusive_use(target: nn.Module, draft: nn.Module, decoding: bool = True):
    """SpecVLM calls that share a target or a draft run one at a time: a draft holds a call's caches, graphs and
    statistics, and a target carries the call's feature hooks, so two threads decoding on either at once would mix
    their state (wrong tokens on the fast path). Other threads wait here; the same thread starting a second call
    with a draft it is decoding with (from a streamer or a stopping criterion) is refused. `decoding=False` takes
    the locks only (a wrapper whose own `generate` call decodes inside)."""
    if decoding and id(draft) in _DECODING.get():
        raise UserError(
            "generate was called with a SpecVLM draft from inside a generate call that is decoding with it (a "
            "streamer, stopping criterion or logits processor calling generate?). A draft holds one call's state; "
            "finish the outer call first, or give the inner call its own draft."
        )
    with _lock_of(unwrap_target(target)), _lock_of(draft):
        token = _DECODING.set(_DECODING.get() | {id(draft)} if decoding else _DECODING.get())
        try:
            yield
        finally:
            _DECODING.reset(token)


class SpecVLMGenerationMixin:
    """Overrides of `GenerationMixin` methods, active only when the assistant is a SpecVLM draft."""

    _specvlm_base_class: type

    def generate(self, *args, **kwargs):
        draft = kwargs.get("assistant_model")
        if is_specvlm_draft(draft):
            # before the image count, which such a cache covers (`cache=` from 5.24 on, `past_key_values=` before)
            check_empty_cache(kwargs.get(generation_cache_key(kwargs) or "past_key_values"))
            # before transformers encodes the images (5.23+), so that a wrong image count is explained
            input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            if input_ids is None and kwargs.get("inputs_embeds") is not None:
                raise ValueError(
                    "SpecVLM decoding needs the prompt's token ids (the draft reads each token with the target's "
                    "features, and checks the image placeholders); this call gave `inputs_embeds` only. Pass "
                    "`input_ids` (with `pixel_values` for images) instead, or generate without `assistant_model`."
                )
            adapter = adapter_for(self, tree=_uses_tree(draft))  # refuses an unverified family in tree mode
            if input_ids is not None and input_ids.dim() == 2:
                adapter.check_images(input_ids, kwargs)
            with keeping_image_inputs(kwargs), exclusive_use(self, draft):
                return super().generate(*args, **kwargs)
        return super().generate(*args, **kwargs)


def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
    draft = generation_mode_kwargs.get("assistant_model")
    if is_specvlm_draft(draft):
        draft.config.validate_decoding_settings()
        check_draft_fits(draft.config, self)  # a clear error before transformers' tokenizer checks
    return super(SpecVLMGenerationMixin, self)._validate_generation_mode(
        generation_mode, generation_config, generation_mode_kwargs
    )


def _assisted_decoding(self, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs):
    draft = kwargs.get("assistant_model")
    base = super(SpecVLMGenerationMixin, self)._assisted_decoding
    if not is_specvlm_draft(draft):
        return base(input_ids, logits_processor, stopping_criteria, generation_config, **kwargs)
    if _uses_tree(draft):
        return tree_assisted_decoding(
            self, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs
        )
    validate_request(self, input_ids, generation_config, kwargs.get("synced_gpus", False))
    check_chain_cache(generation_config, kwargs.get(generation_cache_key(kwargs) or "past_key_values"))
    draft.bind_target(self)
    with FeatureTap(self) as tap:
        call = _ChainCall(adapter_for(self, tree=False), tap, stopping_criteria)
        token = _CHAIN_CALL.set(call)
        try:
            loop_criteria = CandidateStopCheck(
                stopping_criteria, lambda: call.generator and call.generator.input_length
            )
            result = base(input_ids, logits_processor, loop_criteria, generation_config, **kwargs)
        finally:
            _CHAIN_CALL.reset(token)
    if call.generator is not None:
        call.generator.finish(result if not hasattr(result, "sequences") else result.sequences)
    return result


def _get_candidate_generator(self, *args, **kwargs):
    draft = kwargs.get("assistant_model")
    call = _CHAIN_CALL.get()
    if not is_specvlm_draft(draft) or call is None:
        return super(SpecVLMGenerationMixin, self)._get_candidate_generator(*args, **kwargs)
    call.generator = SpecVLMChainCandidateGenerator(
        draft,
        call.adapter,
        call.tap,
        input_ids=kwargs["input_ids"],
        model_kwargs=kwargs["model_kwargs"],
        generation_config=kwargs["generation_config"],
        logits_processor=kwargs["logits_processor"],
        stopping_criteria=call.stopping_criteria,
    )
    return call.generator


# the hooks go in under transformers' own (private) names, kept in `hf_internals`
setattr(SpecVLMGenerationMixin, VALIDATE_GENERATION_MODE, _validate_generation_mode)
setattr(SpecVLMGenerationMixin, ASSISTED_DECODING, _assisted_decoding)
setattr(SpecVLMGenerationMixin, CANDIDATE_GENERATOR, _get_candidate_generator)

_ENABLED_CLASSES: dict[type, type] = {}


def enable(target: nn.Module) -> nn.Module:
    """Lets `target.generate(**inputs, assistant_model=draft)` run SpecVLM decoding with a SpecVLM draft.

    Idempotent; returns `target`. Other `generate` calls (no assistant, or another kind of assistant) are
    unchanged. Works on PEFT-wrapped targets (the wrapped transformers model is enabled).
    """
    model = unwrap_target(target)
    cls = type(model)
    if issubclass(cls, SpecVLMGenerationMixin):
        return target
    if not hasattr(cls, ASSISTED_DECODING):
        raise TypeError(f"{cls.__name__} is not a transformers generative model (no `{ASSISTED_DECODING}`).")
    enabled = _ENABLED_CLASSES.get(cls)
    if enabled is None:
        enabled = type(
            cls.__name__,
            (SpecVLMGenerationMixin, cls),
            {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_specvlm_base_class": cls},
        )
        _ENABLED_CLASSES[cls] = enabled
    model.__class__ = enabled
    return target


def disable(target: nn.Module) -> nn.Module:
    """Undoes `enable` (idempotent); returns `target`."""
    model = unwrap_target(target)
    base = getattr(type(model), "_specvlm_base_class", None)
    if base is not None:
        model.__class__ = base
    return target
