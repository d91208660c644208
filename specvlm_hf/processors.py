"""Loading a model's own processor, also where transformers cannot: Qwen-VL processors need a video processor,
which transformers builds with torchvision; without torchvision `AutoProcessor.from_pretrained` fails even for
images, so the processor is then built from its image processor, tokenizer and chat template, with videos off."""

from __future__ import annotations

import json
from pathlib import Path


def torchvision_available() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def load_processor(name: str, **kwargs):
    """`AutoProcessor.from_pretrained(name)`, or, when that fails for want of torchvision on a processor that takes
    a video processor, the same processor for images and text (see `hf_internals.processor_without_video`)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name, **kwargs)
    except (OSError, ImportError, ValueError, TypeError):
        if torchvision_available():
            raise
        processor_class = _processor_class(name)
        if processor_class is None or "video_processor" not in _init_parameters(processor_class):
            raise
    import transformers
    from transformers import AutoTokenizer

    from .hf_internals import processor_without_video

    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    settings = dict(json.loads(Path(name, "processor_config.json").read_text()).get("image_processor") or {})
    if not settings:
        raise
    kind = settings.pop("image_processor_type", "")
    image_class = getattr(transformers, kind + "Pil", None) or getattr(
        transformers, kind
    )  # PIL backend: no torchvision
    image_processor = image_class(**settings)
    template = Path(name, "chat_template.jinja")
    chat_template = template.read_text() if template.is_file() else getattr(tokenizer, "chat_template", None)
    return processor_without_video(getattr(transformers, processor_class), image_processor, tokenizer, chat_template)


def _processor_class(name: str) -> str | None:
    for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = Path(name, file)
        if path.is_file():
            found = json.loads(path.read_text()).get("processor_class")
            if found:
                return found
    return None


def _init_parameters(class_name: str) -> tuple[str, ...]:
    import inspect

    import transformers

    cls = getattr(transformers, class_name, None)
    return tuple(inspect.signature(cls.__init__).parameters) if cls is not None else ()
