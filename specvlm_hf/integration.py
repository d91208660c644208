"""`enable(target)`: route `target.generate(..., assistant_model=draft)` to SpecVLM decoding.

transformers looks the decoding method up on the model's *class*, so `enable` gives the target instance
a subclass (same name and module, so saving and `isinstance` are unchanged) whose `_assisted_decoding`
runs the tree loop when the assistant is a SpecVLM draft in tree mode, and whose
`_get_candidate_generator` returns the SpecVLM chain generator in chain mode. Any other assistant falls
through to transformers' own code.
"""

from __future__ import annotations

from torch import nn

from .chain import SpecVLMChainCandidateGenerator
from .speculative import check_images, tree_assisted_decoding, validate_request
from .target import FeatureTap, check_draft_fits, unwrap_target

DRAFT_MODEL_TYPE = "specvlm_draft"
# keyword arguments of `_assisted_decoding` that are not model inputs
_DECODING_ARGUMENTS = {"synced_gpus", "streamer", "inputs_tensor", "assistant_model", "assistant_tokenizer", "tokenizer"}


def is_specvlm_draft(model) -> bool:
    """Whether `model` is a SpecVLM draft (by config, so remote-code copies of the class count too)."""
    return getattr(getattr(model, "config", None), "model_type", None) == DRAFT_MODEL_TYPE


class SpecVLMGenerationMixin:
    """Overrides of `GenerationMixin` methods, active only when the assistant is a SpecVLM draft."""

    _specvlm_base_class: type

    def generate(self, *args, **kwargs):
        if is_specvlm_draft(kwargs.get("assistant_model")):
            # before transformers encodes the images (5.23+), so that a wrong image count is explained
            input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            if input_ids is not None and input_ids.dim() == 2:
                check_images(unwrap_target(self).config, input_ids, kwargs)
        return super().generate(*args, **kwargs)

    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        draft = generation_mode_kwargs.get("assistant_model")
        if is_specvlm_draft(draft):
            draft.config.validate_decoding_settings()
            check_draft_fits(draft.config, self)  # a clear error before transformers' tokenizer checks
        return super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)

    def _assisted_decoding(self, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs):
        draft = kwargs.get("assistant_model")
        if not is_specvlm_draft(draft):
            return super()._assisted_decoding(input_ids, logits_processor, stopping_criteria, generation_config, **kwargs)
        if draft.config.decoding_mode == "tree":
            return tree_assisted_decoding(self, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs)
        model_kwargs = {key: value for key, value in kwargs.items() if key not in _DECODING_ARGUMENTS}
        validate_request(self, input_ids, model_kwargs, generation_config, kwargs.get("synced_gpus", False))
        draft.bind_target(self)
        with FeatureTap(self) as tap:
            self._specvlm_chain_context = (tap, stopping_criteria)
            try:
                result = super()._assisted_decoding(
                    input_ids, logits_processor, stopping_criteria, generation_config, **kwargs
                )
            finally:
                generator = getattr(self, "_specvlm_chain_generator", None)
                del self._specvlm_chain_context
                self._specvlm_chain_generator = None
        sequences = result if not hasattr(result, "sequences") else result.sequences
        if generator is not None:
            generator.finish(sequences)
        return result

    def _get_candidate_generator(self, *args, **kwargs):
        draft = kwargs.get("assistant_model")
        context = getattr(self, "_specvlm_chain_context", None)
        if not is_specvlm_draft(draft) or context is None:
            return super()._get_candidate_generator(*args, **kwargs)
        tap, stopping_criteria = context
        generator = SpecVLMChainCandidateGenerator(
            draft,
            tap,
            input_ids=kwargs["input_ids"],
            model_kwargs=kwargs["model_kwargs"],
            generation_config=kwargs["generation_config"],
            logits_processor=kwargs["logits_processor"],
            stopping_criteria=stopping_criteria,
        )
        self._specvlm_chain_generator = generator
        return generator


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
    if not hasattr(cls, "_assisted_decoding"):
        raise TypeError(f"{cls.__name__} is not a transformers generative model (no `_assisted_decoding`).")
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
