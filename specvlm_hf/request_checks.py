"""Checks of a speculative `generate` call before any work; each error names the problem and the fix."""

from __future__ import annotations

import torch
from transformers import StaticCache

from .target import unwrap_target


def prefix_positions(input_ids: torch.Tensor, model_kwargs: dict, row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask `(n,)` bool and sequence positions `(n,)` of a prompt (batch row `row`), as `generate`
    prepared them.

    Only left padding is accepted: positions count real tokens, padded slots are masked.
    """
    n = input_ids.shape[1]
    mask = model_kwargs.get("attention_mask")
    mask = torch.ones(n, dtype=torch.bool, device=input_ids.device) if mask is None else mask[row].bool()
    first_real = int(mask.float().argmax()) if bool(mask.any()) else n
    if not bool(mask[first_real:].all()):
        raise ValueError(
            "SpecVLM decoding supports left padding only: the attention mask has a zero after the first real token. "
            "Pad on the left (`processor.tokenizer.padding_side = 'left'`) or drop the padding for batch size 1."
        )
    positions = (mask.long().cumsum(0) - 1).clamp(min=0)
    return mask, positions


def validate_request(
    target, input_ids: torch.Tensor, generation_config, synced_gpus: bool = False, batched: bool = False
) -> None:
    """Checks a speculative `generate` call before any work, raising an error that names the problem and the fix.

    Covers: batch size (`batched`: the caller decodes batches, tree mode on dynamic caches), DeepSpeed/FSDP sync,
    outputs a tree cannot give, classifier-free guidance, and the total length against the model's positions (the
    images are checked earlier, by the adapter's `check_images`, before transformers encodes them).
    """
    batch = input_ids.shape[0]
    if batch != 1 and not batched:
        raise ValueError(
            f"SpecVLM chain mode supports batch size 1 (got {batch}). Use tree mode "
            "(`draft.config.decoding_mode = 'tree'`), call `generate` once per example, or drop `assistant_model`."
        )
    if synced_gpus:
        raise ValueError("SpecVLM speculative decoding does not support `synced_gpus` (DeepSpeed ZeRO-3 / FSDP).")
    if generation_config.output_attentions or generation_config.output_hidden_states:
        raise ValueError(
            "SpecVLM speculative decoding cannot return attentions or hidden states (the target scores a tree, not "
            "a sequence). Drop `output_attentions` / `output_hidden_states`, or generate without `assistant_model`."
        )
    if generation_config.guidance_scale is not None and generation_config.guidance_scale != 1:
        raise ValueError(
            f"SpecVLM speculative decoding cannot run classifier-free guidance (guidance_scale="
            f"{generation_config.guidance_scale}): its logits processor runs the model on its own prompt, one token "
            "after another, which a verified tree or chain cannot feed. Drop `guidance_scale`, or generate without "
            "`assistant_model`."
        )
    text = unwrap_target(target).config.get_text_config(decoder=True)
    max_positions = getattr(text, "max_position_embeddings", None)
    if max_positions is not None and generation_config.max_length > max_positions:
        raise ValueError(
            f"The prompt ({input_ids.shape[1]} tokens) plus the new tokens reach {generation_config.max_length} "
            f"positions, more than the model's max_position_embeddings ({max_positions}). Shorten the prompt or "
            "lower `max_new_tokens`."
        )


def check_attention_backend(target, draft) -> None:
    """Tree verification passes arbitrary 4-D masks: only the eager and sdpa backends take them."""
    for name, model in (("target", unwrap_target(target)), ("draft", draft)):
        config = model.config.get_text_config(decoder=True) if name == "target" else model.config
        attn = getattr(config, "_attn_implementation", None)
        if attn not in (None, "sdpa", "eager"):
            raise ValueError(
                f"SpecVLM tree decoding needs arbitrary 4-D attention masks, which the {name}'s {attn!r} attention "
                "backend cannot take. Load it with attn_implementation='sdpa' (or 'eager'), or use chain mode: "
                "`draft.config.decoding_mode = 'chain'`."
            )


def check_empty_cache(cache) -> None:
    """SpecVLM decoding starts from the whole prompt: refuses a cache that already holds tokens (an earlier turn's
    `past_key_values`), with the way out."""
    filled = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    if filled:
        raise ValueError(
            f"SpecVLM decoding cannot continue from a filled cache (`past_key_values` holding {int(filled)} tokens, "
            "e.g. an earlier turn's): the draft needs the target's features of the whole prompt, which a reused "
            "cache skips, and transformers' assisted-generation loop (chain mode) is not exact from one. Pass the "
            "whole conversation as `input_ids` (with its images) and no `past_key_values`."
        )


def check_chain_cache(generation_config, past_key_values=None) -> None:
    """Chain mode runs transformers' assisted-generation loop, which crops its cache after every round and so takes
    no static cache: refuses one with the way out (the tree's fast path is the static-cache one)."""
    static = generation_config.cache_implementation in ("static", "hybrid", "sliding_window", "offloaded_static")
    if static or isinstance(past_key_values, StaticCache):
        raise ValueError(
            'SpecVLM chain mode cannot run on a static cache (`cache_implementation="static"` or a `StaticCache`): '
            "it runs transformers' assisted-generation loop, which crops its cache after each round. For the "
            "static-cache fast path use tree mode (`draft.config.decoding_mode = 'tree'`); for chain mode drop the "
            "static cache."
        )
