"""specvlm-hf: lossless speculative decoding (SpecVLM / EAGLE-2) for vision-language models."""

__version__ = "0.1.0"
