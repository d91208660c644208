"""Configuration of the SpecVLM / EagleVLM draft model."""

from __future__ import annotations

import warnings

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

DECODING_MODES = ("tree", "chain")
# Each round scores top_k children of each of top_k frontier nodes at every depth: top_k^2 x depth candidates
# (the 12M mini VLM: 700 by default, 28k in 2 s, 117M with top_k=4096 took 123 s and 7.8 GB for 20 tokens).
MAX_TREE_CANDIDATES = 2**20
SLOW_TREE_CANDIDATES = 2**16


def full_attention_only(text_config):
    """Makes a draft's text configuration full attention in every layer (no sliding windows, attention chunks or
    per-layer attention types, whatever the target's text model uses), so that the draft's cache can be rewound
    and its masks are plain tree masks. Returns it."""
    if getattr(text_config, "layer_types", None) is not None:
        text_config.layer_types = ["full_attention"] * text_config.num_hidden_layers
    for name, value in (("sliding_window", None), ("use_sliding_window", False), ("attention_chunk_size", None)):
        if getattr(text_config, name, None) is not None:
            setattr(text_config, name, value)
    return text_config


class SpecVLMDraftConfig(PretrainedConfig):
    r"""Configuration of a [`SpecVLMDraftModel`]: a small draft that predicts the target's next final hidden
    state from [token embedding ; target's final hidden state], for lossless speculative decoding.

    The draft is `fc(2d -> d)` -> RMSNorm -> `num_draft_layers` decoder layers of the target's own text
    architecture -> the target's (frozen, shared) `lm_head`. Embedding and `lm_head` belong to the target and
    are not stored in the draft.

    Args:
        text_config (`dict` or `PretrainedConfig`, *optional*):
            The target's text-model configuration (architecture, sizes, GQA, RoPE settings). Its
            `num_hidden_layers` is replaced by `num_draft_layers`. Defaults to a Llama configuration.
        num_draft_layers (`int`, *optional*, defaults to 1):
            Number of decoder layers in the draft (EAGLE and SpecVLM use 1).
        target (`dict`, *optional*):
            What the draft was made for: `model_type`, `architecture`, `vocab_size`, `hidden_size`,
            `num_hidden_layers`, `name_or_path`. Checked when the draft is bound to a target.
        tree_top_k (`int`, *optional*, defaults to 10):
            Children proposed per expanded node, and size of the frontier (EAGLE-2 `top_k`). At most the
            vocabulary; `tree_top_k**2 * tree_depth` (candidates scored per round) at most 2**20, with a warning
            above 2**16.
        tree_depth (`int`, *optional*, defaults to 7):
            Expansion steps after the first draft step; the deepest node has depth `tree_depth + 1`.
        tree_total_tokens (`int`, *optional*, defaults to 60):
            Nodes verified per round, root included.
        decoding_mode (`str`, *optional*, defaults to `"tree"`):
            `"tree"`: EAGLE-2 dynamic tree verified in one target forward. `"chain"`: one draft token per
            step, `chain_length` tokens, verified by transformers' own assisted-decoding loop.
        chain_length (`int`, *optional*, defaults to 5):
            Draft tokens per round in chain mode.
        input_norm (`bool`, *optional*, defaults to `True`):
            Apply an RMSNorm after `fc` (SpecVLM's change to EAGLE's draft, for stable low-precision training).
        draft_vocab_size (`int`, *optional*):
            Score only this many target tokens in the draft (a reduced vocabulary: the most frequent tokens of the
            target's outputs, stored in the draft's `draft_vocab` buffer); the draft's `lm_head` read per tree level
            shrinks by `vocab_size / draft_vocab_size`. Decoding stays lossless: the target scores the full
            vocabulary. Default: the full vocabulary.
        compressor (`dict`, *optional*):
            The elastic visual compressor (see `specvlm_hf.compressor`): `{"mode": "none" | "fixed" | "select" |
            "weighted" | "concat", "branches": [...], "fixed": "pool@4", "ratio": 3, "gumbel_temperature": 1.0,
            "gate_hidden": 256, "cost_weight": 0.0}`. Defaults to `{"mode": "none"}` (EagleVLM: the draft reads
            every visual token). `cost_weight` is the training penalty on the gate's expected visual-token
            fraction.
    """

    model_type = "specvlm_draft"
    sub_configs = {"text_config": AutoConfig}

    text_config: dict | PretrainedConfig | None = None
    num_draft_layers: int = 1
    target: dict | None = None
    tree_top_k: int = 10
    tree_depth: int = 7
    tree_total_tokens: int = 60
    decoding_mode: str = "tree"
    chain_length: int = 5
    input_norm: bool = True
    draft_vocab_size: int | None = None
    compressor: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.text_config, dict):
            text = dict(self.text_config)
            text_type = text.pop("model_type", "llama")
            self.text_config = CONFIG_MAPPING[text_type](**text)
        elif self.text_config is None:
            self.text_config = CONFIG_MAPPING["llama"]()
        self.text_config.num_hidden_layers = self.num_draft_layers
        full_attention_only(self.text_config)
        if self.target is None:
            self.target = {}
        if self.compressor is None:
            self.compressor = {"mode": "none"}
        self.validate_decoding_settings()
        super().__post_init__(**kwargs)

    def validate_decoding_settings(self) -> None:
        """Raises a `ValueError` naming the bad setting when the tree / chain settings are invalid."""
        if self.decoding_mode not in DECODING_MODES:
            raise ValueError(f"decoding_mode must be one of {DECODING_MODES}, got {self.decoding_mode!r}")
        if self.num_draft_layers < 1:
            raise ValueError(f"num_draft_layers must be >= 1, got {self.num_draft_layers}")
        if self.tree_top_k < 1 or self.tree_depth < 0 or self.tree_total_tokens < 2:
            raise ValueError(
                "tree settings need tree_top_k >= 1, tree_depth >= 0 and tree_total_tokens >= 2; got "
                f"top_k={self.tree_top_k}, depth={self.tree_depth}, total_tokens={self.tree_total_tokens}"
            )
        vocab = getattr(self.text_config, "vocab_size", None)
        if vocab and self.tree_top_k > vocab:
            raise ValueError(
                f"tree_top_k={self.tree_top_k} is more than the vocabulary ({vocab} tokens); use at most {vocab} "
                "(EAGLE-2 uses 10)."
            )
        candidates = self.tree_top_k**2 * max(self.tree_depth, 1)
        if candidates > SLOW_TREE_CANDIDATES:
            message = (
                f"tree_top_k={self.tree_top_k} and tree_depth={self.tree_depth} score tree_top_k^2 x tree_depth = "
                f"{candidates:,} candidate tokens per round"
            )
            if candidates > MAX_TREE_CANDIDATES:
                raise ValueError(
                    f"{message}, more than the {MAX_TREE_CANDIDATES:,} allowed; lower tree_top_k (EAGLE-2 "
                    "uses 10) or tree_depth."
                )
            warnings.warn(
                f"{message}: drafting will cost more than it saves; EAGLE-2 uses tree_top_k=10, tree_depth=7.",
                stacklevel=2,
            )
        if self.draft_vocab_size is not None and not 1 <= self.draft_vocab_size <= (vocab or self.draft_vocab_size):
            raise ValueError(
                f"draft_vocab_size must be in 1..{vocab} (the target's vocabulary), got {self.draft_vocab_size}"
            )
        if self.chain_length < 1:
            raise ValueError(f"chain_length must be >= 1, got {self.chain_length}")
        mode = (self.compressor or {}).get("mode", "none")
        if mode not in ("none", "fixed", "select", "weighted", "concat"):
            raise ValueError(f"compressor mode must be one of none, fixed, select, weighted, concat; got {mode!r}")


SpecVLMDraftConfig.register_for_auto_class()

__all__ = ["SpecVLMDraftConfig"]
