"""The SpecVLM / EagleVLM draft model.

At position t the draft reads [embedding of token x_{t+1} ; target's final hidden state f_t] and predicts
the target's next final hidden state f_{t+1}; the target's own (frozen) `lm_head` turns it into logits:

    fc(2d -> d) -> RMSNorm -> N decoder layers of the target's text architecture -> target lm_head

The decoder layers are built by transformers from the target's text configuration (Llama, Mistral,
Qwen2, ...), with their own RoPE, attention and KV cache. Embedding and `lm_head` stay with the target:
`bind_target` lends them to the draft without making them part of its weights.

This file, and the flat sibling modules it imports, are also the remote code saved with every draft.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .compressor import VisualCompressor, image_spans, join_clip, span_counts, visual_units
from .configuration_specvlm_draft import SpecVLMDraftConfig
from .errors import UserError
from .hf_internals import cache_argument_name, scaled_product_rows, unsharded, version_of
from .kernels import fp8_kernel_usable, fp8_product
from .packaging import write_custom_generate
from .stats import SpecVLMStats
from .target import check_draft_fits, describe_target, target_text_config, unwrap_target


FP8 = torch.float8_e4m3fn
FP8_ROWS_CHUNK = 8192  # rows quantized at a time (bounds the float32 temporary of a large vocabulary's head)


def fp8_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and float32 scales `(rows, 1)`, one per row of the 2-D `values` (`values ~= e4m3 * scale`)."""
    scale = values.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / torch.finfo(FP8).max
    return (values.float() / scale).to(FP8), scale


def fp8_rows_padded(rows: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`rows` `(n, d)` as e4m3 on `device`, zero rows appended up to a multiple of 16 (the float8 product's
    width), their scales `(1, n_padded)`, and `n`."""
    count = rows.shape[0]
    padded = -(-count // 16) * 16
    weight = torch.zeros(padded, rows.shape[1], dtype=FP8, device=device)
    scale = torch.ones(1, padded, dtype=torch.float32, device=device)
    with torch.no_grad():
        for start in range(0, count, FP8_ROWS_CHUNK):
            chunk_fp8, chunk_scale = fp8_rows(rows[start : start + FP8_ROWS_CHUNK].to(device))
            weight[start : start + chunk_fp8.shape[0]] = chunk_fp8
            scale[0, start : start + chunk_fp8.shape[0]] = chunk_scale[:, 0]
    return weight, scale, count


def fp8_logits(hidden_states: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, count: int) -> torch.Tensor:
    """`hidden_states @ rows.T` for `fp8_rows_padded`'s rows, `(..., count)` in the hidden states' dtype: on a GPU
    one kernel reading the e4m3 rows with the hidden states as they are (`kernels.fp8_product`); else torch's
    row-scaled float8 product, the hidden states quantized to e4m3 per row here."""
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    if fp8_kernel_usable(flat.device):
        return (
            fp8_product(flat, weight, scale, count).to(hidden_states.dtype).reshape(*hidden_states.shape[:-1], count)
        )
    inputs, inputs_scale = fp8_rows(flat)
    out_dtype = torch.bfloat16 if flat.is_cuda else flat.dtype  # CUDA's row-scaled product gives bfloat16
    logits = scaled_product_rows(inputs, inputs_scale, weight, scale, out_dtype)
    if logits.shape[-1] != count:
        logits = logits[:, :count]
    return logits.to(hidden_states.dtype).reshape(*hidden_states.shape[:-1], count)


@dataclass
class SpecVLMDraftOutput(ModelOutput):
    """Output of [`SpecVLMDraftModel.forward`].

    Attributes:
        last_hidden_state: `(batch, seq, d)` predicted next target features f^_{t+1}.
        logits: `(batch, seq, vocab)` the target `lm_head` applied to them (when requested).

    The draft's KV cache is the one passed in (updated in place).
    """

    last_hidden_state: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class SpecVLMRMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SpecVLMDraftPreTrainedModel(PreTrainedModel):
    config_class = SpecVLMDraftConfig
    base_model_prefix = "specvlm_draft"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False  # tree masks are arbitrary 4-D masks
    _supports_flex_attn = False

    def _init_weights(self, module):
        std = self.config.text_config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, SpecVLMRMSNorm):
            nn.init.ones_(module.weight)
        else:
            super()._init_weights(module)


class SpecVLMDraftModel(SpecVLMDraftPreTrainedModel, GenerationMixin):
    """EAGLE-style draft for a VLM target (see the module docstring).

    Use it as `target.generate(**inputs, assistant_model=draft)` after `specvlm_hf.enable(target)`; it is not
    a standalone language model.
    """

    def __init__(self, config: SpecVLMDraftConfig):
        super().__init__(config)
        text_config = config.text_config
        hidden = text_config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        eps = getattr(text_config, "rms_norm_eps", 1e-6)
        self.input_norm = SpecVLMRMSNorm(hidden, eps=eps) if config.input_norm else nn.Identity()

        # The target architecture's own text model, minus what the draft borrows from the target:
        # token embeddings (a 1-row table is built, then dropped) and the final norm (the draft regresses
        # the post-norm feature directly, as EAGLE does).
        layers_config = copy.deepcopy(text_config)
        layers_config.vocab_size = 1
        layers_config.pad_token_id = None
        layers_config._attn_implementation = config._attn_implementation
        self.model = AutoModel.from_config(layers_config, attn_implementation=config._attn_implementation)
        self.model.embed_tokens = None
        self.model.norm = nn.Identity()
        self.compressor = (
            VisualCompressor(config.compressor, hidden, text_config.num_attention_heads)
            if config.compressor.get("mode", "none") != "none"
            else None
        )
        if config.draft_vocab_size is not None:  # target token ids the draft scores (set by `set_draft_vocab`)
            self.register_buffer("draft_vocab", torch.arange(config.draft_vocab_size), persistent=True)
        else:
            self.draft_vocab = None
        self._head_rows: torch.Tensor | None = None  # the target lm_head's rows of `draft_vocab`
        self._fp8_head: tuple[torch.Tensor, torch.Tensor, int] | None = None  # e4m3 rows, scales, rows scored
        self._fp8_wanted = False  # `use_fp8_head`: a runtime setting, not saved
        self._head_rows_key = None
        self._no_split_modules = list(getattr(self.model, "_no_split_modules", None) or [])
        self._cache_argument = cache_argument_name(self.model.forward)

        self._target_modules: tuple[nn.Module, nn.Module] | None = None  # (embed_tokens, lm_head), not owned
        self.stats = SpecVLMStats()
        self.post_init()

    # ----------------------------------------------------------------------------------------------------
    # binding to a target
    @classmethod
    def from_target(cls, target: nn.Module, **overrides) -> "SpecVLMDraftModel":
        """A freshly initialised draft sized to `target` (its text architecture, sizes, GQA and RoPE settings),
        bound to it, on its `lm_head`'s device and dtype.

        Args:
            target: a transformers VLM (e.g. `LlavaForConditionalGeneration`), possibly PEFT-wrapped.
            overrides: `SpecVLMDraftConfig` fields, e.g. `num_draft_layers=2`, `tree_total_tokens=40`.
        """
        text_config = target_text_config(target)
        text = text_config.to_dict()
        # sdpa, unless the target's text model runs eager attention (some architectures have no sdpa kernel)
        attn = overrides.pop("attn_implementation", None)
        if attn is None:
            attn = "eager" if getattr(text_config, "_attn_implementation", None) == "eager" else "sdpa"
        config = SpecVLMDraftConfig(text_config=text, target=describe_target(target), **overrides)
        config._attn_implementation = attn
        draft = cls(config)
        return draft.bind_target(target)

    def bind_target(self, target: nn.Module) -> "SpecVLMDraftModel":
        """Lends the target's embedding and `lm_head` to the draft and moves the draft to the `lm_head`'s device
        and dtype. Raises `DraftTargetMismatchError` when the draft does not fit the target."""
        check_draft_fits(self.config, target)
        model = unwrap_target(target)
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        if head is None or embed is None:
            raise TypeError(f"{type(model).__name__} has no input embeddings or lm_head to lend the draft")
        self._target_modules = (embed, head)
        weight = head.weight
        if self.fc.weight.device != weight.device or self.fc.weight.dtype != weight.dtype:
            self.to(device=weight.device, dtype=weight.dtype)
        if self._gather_head_rows() and self._fp8_wanted:
            self._check_fp8_head()  # once per copy of the rows (`generate` binds the draft at every call)
        return self

    def set_draft_vocab(self, token_ids) -> "SpecVLMDraftModel":
        """Sets the reduced vocabulary: the `draft_vocab_size` target token ids the draft scores (e.g. from
        `specvlm_hf.draft_vocab.choose_draft_vocab`)."""
        if self.draft_vocab is None:
            raise ValueError(
                "this draft scores the full vocabulary; build it with `draft_vocab_size=N`, or call "
                "`restrict_vocab(token_ids)` to make it score fewer ids"
            )
        token_ids = self._vocab_ids(token_ids, self.draft_vocab.numel())
        with torch.no_grad():
            self.draft_vocab.copy_(token_ids.to(self.draft_vocab.device))
        self._drop_head_rows()
        self._gather_head_rows()
        return self

    def restrict_vocab(self, token_ids) -> "SpecVLMDraftModel":
        """Makes the draft score only `token_ids` (any number of distinct target ids, e.g.
        `choose_draft_vocab(count_tokens(answers, vocab), 8192, always=[eos])`), or the full vocabulary again with
        None. Works on a trained full-vocabulary draft without retraining: the draft's logits come from the target's
        `lm_head`, so the restricted draft ranks the kept ids as before and never drafts the others. Each tree level
        then reads only their `lm_head` rows. Outputs stay exact (the target still scores every id); acceptance falls
        only where the target's next token is outside the kept ids. The setting is saved with the draft
        (`draft_vocab_size` and the `draft_vocab` buffer), and a fast path built before is rebuilt at the next call."""
        if token_ids is None:
            self._buffers.pop("draft_vocab", None)
            self.draft_vocab = None
            self.config.draft_vocab_size = None
        else:
            token_ids = self._vocab_ids(token_ids).to(self.fc.weight.device)
            if "draft_vocab" not in self._buffers:
                self.__dict__.pop("draft_vocab", None)
                self.register_buffer("draft_vocab", token_ids, persistent=True)
            else:
                self.draft_vocab = token_ids
            self.config.draft_vocab_size = token_ids.numel()
        self._drop_head_rows()
        self._gather_head_rows()
        return self

    def use_fp8_head(self, enabled: bool = True) -> "SpecVLMDraftModel":
        """Makes the draft read the `lm_head` rows it scores (the whole vocabulary, or `draft_vocab`) from an e4m3
        (float8) copy with one scale per row, its hidden states quantized the same way per call: half the bytes of
        a bfloat16 head at every tree level, the draft's largest read (a whole round: -0.13 ms at LLaVA-7B's 32k
        ids and -4% at Qwen2.5-VL-7B's 152k on an H200, -10% at Gemma-3-12B's 262k on an H100; results/README.md).
        Outputs stay exact: the target still scores every token with its own head; only the draft's guesses may
        change (on the mini VLM acceptance did not move). The copy costs `rows x hidden` bytes of memory (the head
        itself stays: the target uses it).

        Needs a hidden size that is a multiple of 16 and a device where torch's row-scaled float8 product runs: an
        NVIDIA GPU of compute capability 8.9 or newer (L4, L40S, H100, H200, ...); a bound draft checks that here
        and raises `UserError` otherwise. The CPU runs it (tests do), slower than the head's own product: a warning
        says so. For decoding only (no gradients flow through it); not saved with the draft; `use_fp8_head(False)`
        goes back to the head's own weights. A fast path built before is rebuilt at the next call."""
        if enabled and self.config.text_config.hidden_size % 16:
            raise UserError(
                f"an fp8 draft head needs a hidden size that is a multiple of 16, and this draft's is "
                f"{self.config.text_config.hidden_size}: decode without `use_fp8_head`"
            )
        if bool(enabled) == self._fp8_wanted:
            return self  # unchanged: the rows keep their addresses (a fast path built on them stays)
        try:
            self._set_head_rows(fp8=bool(enabled))
        except UserError:
            self._set_head_rows(fp8=not enabled)  # refused: the draft stays as it was
            raise
        if self._fp8_wanted and self.is_bound:
            self._check_fp8_head()
        return self

    @property
    def fp8_head(self) -> bool:
        """Whether the draft reads an e4m3 copy of its `lm_head` rows (`use_fp8_head`)."""
        return self._fp8_wanted

    def _check_fp8_head(self) -> None:
        """Runs the fp8 head once; a device without torch's row-scaled float8 product raises `UserError`, with the
        draft back on the head's own weights."""
        weight = self.fc.weight
        try:
            with torch.no_grad():
                self.lm_head(
                    torch.ones(1, self.config.text_config.hidden_size, device=weight.device, dtype=weight.dtype)
                )
        except Exception as error:  # torch's float8 product raises RuntimeError, Triton's compiler its own errors
            self._set_head_rows(fp8=False)
            raise UserError(
                f"this device cannot run the fp8 draft head: its float8 product failed on "
                f"{weight.device} ({str(error).splitlines()[0][:200]}). It needs an NVIDIA GPU of compute capability "
                f"8.9 or newer (L4, L40S, H100, ...) or the CPU; decode without `use_fp8_head` (the draft is back on "
                f"its {weight.dtype} head)."
            ) from error
        if weight.device.type == "cpu":
            warnings.warn(
                "the fp8 draft head runs on the CPU, where torch's float8 product is slower than the head's own: it "
                "pays on GPUs of compute capability 8.9 or newer; outputs stay exact either way",
                stacklevel=3,
            )

    def _set_head_rows(self, fp8: bool) -> None:
        """Copies the head rows again, as e4m3 or not (`use_fp8_head`, and its refusals going back)."""
        self._fp8_wanted = fp8
        self._drop_head_rows()
        self._gather_head_rows()

    def _drop_head_rows(self) -> None:
        self._head_rows = self._fp8_head = self._head_rows_key = None

    def _vocab_ids(self, token_ids, size: int | None = None) -> torch.Tensor:
        """`token_ids` as a 1-D long tensor, checked: distinct target ids (`size` of them when given)."""
        vocab = self.config.text_config.vocab_size
        token_ids = torch.as_tensor(token_ids, dtype=torch.long)
        count = token_ids.numel()
        if token_ids.dim() != 1 or count == 0 or (size is not None and count != size):
            wanted = f"{size}" if size is not None else "a 1-D list of"
            raise ValueError(f"need {wanted} distinct token ids, got shape {tuple(token_ids.shape)}")
        if len(set(token_ids.tolist())) != count:
            raise ValueError(f"need {count} distinct token ids, but some repeat; give each id once")
        if int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab:
            raise ValueError(f"draft vocabulary ids must lie in 0..{vocab - 1}")
        return token_ids

    def _gather_head_rows(self) -> bool:
        """Copies the target `lm_head`'s rows the draft reads at each tree level when it does not read the head
        itself: those of a reduced vocabulary, and (`use_fp8_head`) the rows scored as e4m3 with their scales.
        Returns whether it made a new copy."""
        if self._target_modules is None or (self.draft_vocab is None and not self._fp8_wanted):
            return False
        head = self._target_modules[1]
        # (weights or ids changed in place, e.g. by `load_state_dict` into the target, make the copy stale)
        vocab = None if self.draft_vocab is None else (self.draft_vocab.data_ptr(), version_of(self.draft_vocab))
        weights = (head.weight.data_ptr(), version_of(head.weight))
        key = (id(head), weights, vocab, self.fc.weight.device, self._fp8_wanted)
        if (self._head_rows is not None or self._fp8_head is not None) and self._head_rows_key == key:
            return False  # the same rows: keep their address (captured fast-path graphs read it)
        if getattr(head, "bias", None) is not None:
            raise UserError(
                "a reduced draft vocabulary or an fp8 draft head needs an lm_head without bias; this target's has "
                "one: keep the full vocabulary and the head's own weights"
            )
        weight = unsharded(head.weight.detach())  # a tensor-parallel head's rows are gathered from every rank
        rows = weight if self.draft_vocab is None else weight.index_select(0, self.draft_vocab.to(weight.device))
        if self._fp8_wanted:
            self._head_rows, self._fp8_head = None, fp8_rows_padded(rows, self.fc.weight.device)
        else:
            self._head_rows, self._fp8_head = rows.to(self.fc.weight.device), None
        self._head_rows_key = key
        return True

    @property
    def is_bound(self) -> bool:
        return self._target_modules is not None

    def _borrowed(self) -> tuple[nn.Module, nn.Module]:
        if self._target_modules is None:
            raise RuntimeError(
                "This draft is not bound to a target: call `draft.bind_target(target)`, or pass it as "
                "`assistant_model=` to `target.generate` (after `specvlm_hf.enable(target)`)."
            )
        return self._target_modules

    def get_input_embeddings(self):
        return self._target_modules[0] if self._target_modules is not None else None

    def get_output_embeddings(self):
        return self._target_modules[1] if self._target_modules is not None else None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings from the target's (frozen) table, on the draft's device (the table may sit on
        another GPU when the target is split with `device_map`)."""
        return self._borrowed()[0](input_ids).to(self.fc.weight.device)

    def lm_head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits from the target's (frozen) `lm_head`: over the full vocabulary, or over `draft_vocab` (column i
        scores target token `draft_vocab[i]`) for a draft with a reduced vocabulary."""
        head = self._borrowed()[1]
        if self._fp8_head is not None:
            return fp8_logits(hidden_states.to(self.fc.weight.device), *self._fp8_head)
        if self._head_rows is None:
            return head(hidden_states)
        return torch.nn.functional.linear(hidden_states.to(self._head_rows.dtype), self._head_rows)

    def full_vocab(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Draft log-probabilities over the target's full vocabulary (-inf outside a reduced vocabulary)."""
        if self.draft_vocab is None:
            return log_probs
        full = log_probs.new_full((*log_probs.shape[:-1], self.config.text_config.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.draft_vocab.to(log_probs.device), log_probs)

    # ----------------------------------------------------------------------------------------------------
    def fuse(self, inputs_embeds: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """The draft's input vectors: RMSNorm(fc([embedding ; feature])), `(..., 2d) -> (..., d)`."""
        weight = self.fc.weight
        inputs_embeds = inputs_embeds.to(weight.device)
        fused = self.fc(torch.cat([inputs_embeds, hidden_states.to(weight.device, inputs_embeds.dtype)], dim=-1))
        return self.input_norm(fused)

    def decode(self, fused, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None, **kwargs):
        """Runs the decoder layers on fused input vectors `(batch, seq, d)`; returns their outputs."""
        outputs = self.model(
            inputs_embeds=fused,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{self._cache_argument: past_key_values},
            **kwargs,
        )
        return outputs.last_hidden_state

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        compute_logits: bool = False,
        **kwargs,
    ) -> SpecVLMDraftOutput:
        """Predicts the target's next final hidden states (no visual compression: see `compress_prompt`).

        Args:
            inputs_embeds: `(batch, seq, d)` embeddings of tokens x_{t+1} (target's table; image features at
                image positions).
            hidden_states: `(batch, seq, d)` the target's final hidden states f_t (or the draft's own
                predictions while drafting ahead).
            attention_mask: `(batch, seq_total)` padding mask, or a 4-D additive mask `(batch, 1, seq,
                cached + seq)` for tree steps.
            position_ids: `(batch, seq)`.
            past_key_values: the draft's KV cache (a transformers `DynamicCache`).
            compute_logits: also apply the target's `lm_head`.
        """
        predicted = self.decode(
            self.fuse(inputs_embeds, hidden_states), attention_mask, position_ids, past_key_values, use_cache, **kwargs
        )
        logits = self.lm_head(predicted) if compute_logits else None
        return SpecVLMDraftOutput(last_hidden_state=predicted, logits=logits)

    def compress_prompt(
        self,
        fused: torch.Tensor,
        positions: torch.Tensor,
        real: torch.Tensor,
        visual: torch.Tensor,
        layouts: list,
        question: torch.Tensor | None,
    ):
        """Replaces each image's fused draft inputs by the compressor's output (no-op without a compressor).

        Args:
            fused: `(n, d)` fused inputs of one prompt (`fuse` output).
            positions: `(n,)` their position ids; real: `(n,)` bool, False on left padding.
            visual: `(n,)` bool, True where the pair's token is an image token.
            layouts: one `VisualLayout` per image span of `visual`, in order; consecutive ones of one `clip` (a
                video's frames split by text, Qwen3-VL) are compressed as one video, each frame's output kept in
                its own span where the branch says which frame it came from (`VisualCompressor.segment_counts`:
                `frames@K` keeps a frame in its place, `tpool@K` puts a pooled clip in its last frame's place).
            question: `(d,)` pooled target features of the prompt's text (the gate's input).
        Returns:
            `(fused (m, d), positions (m,), real (m,), info)` with `info` = dict(branch, draft_visual_tokens,
            target_visual_tokens, expected_fraction, log_prob: the drawn branches' summed log-probability, in
            training).
        """
        spans = image_spans(visual)
        info = {
            "branch": "none",
            "draft_visual_tokens": int(visual.sum()),
            "target_visual_tokens": int(visual.sum()),
            "expected_fraction": None,
            "log_prob": None,
        }
        if self.compressor is None or not spans:
            return fused, positions, real, info
        if len(layouts) != len(spans):
            raise ValueError(f"{len(spans)} image spans in the prompt but {len(layouts)} layouts")
        pieces, piece_positions, piece_real, branches, expected, log_probs = [], [], [], [], [], []
        cursor = 0
        for unit in visual_units(layouts):  # an image, a video, or a video's frame spans (Qwen3-VL) together
            unit_spans = [spans[index] for index in unit]
            layout = layouts[unit[0]] if len(unit) == 1 else join_clip([layouts[index] for index in unit])
            result = self.compressor(torch.cat([fused[start:end] for start, end in unit_spans]), layout, question)
            lengths = [end - start for start, end in unit_spans]
            counts = span_counts(lengths, result.tokens.shape[0], self.compressor.segment_counts(result, layout))
            taken = 0
            for (start, end), kept in zip(unit_spans, counts):
                pieces += [fused[cursor:start], result.tokens[taken : taken + kept]]
                # the span's last positions: the text after it keeps its distance to it
                piece_positions += [positions[cursor:start], positions[end - kept : end]]
                piece_real += [real[cursor:start], real[end - kept : end]]
                taken += kept
                cursor = end
            branches.append(result.branch)
            if result.expected_fraction is not None:
                expected.append(result.expected_fraction)
            if result.log_prob is not None:
                log_probs.append(result.log_prob)
        pieces.append(fused[cursor:])
        piece_positions.append(positions[cursor:])
        piece_real.append(real[cursor:])
        out = torch.cat(pieces)
        info["branch"] = branches[0] if len(set(branches)) == 1 else ",".join(branches)
        info["draft_visual_tokens"] = int(out.shape[0] - (fused.shape[0] - int(visual.sum())))
        info["expected_fraction"] = torch.stack(expected).mean() if expected else None
        info["log_prob"] = torch.stack(log_probs).sum() if log_probs else None
        return out, torch.cat(piece_positions), torch.cat(piece_real), info

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves weights (safetensors; the target's embedding and `lm_head` are not included), the config with
        `auto_map`, the remote-code files and `custom_generate/`."""
        super().save_pretrained(save_directory, *args, **kwargs)
        write_custom_generate(str(save_directory))

    def generate(self, *args, **kwargs):
        raise RuntimeError(
            "A SpecVLM draft is not a standalone language model and cannot `generate` by itself. Pass it to the "
            "target instead: `specvlm_hf.enable(target); target.generate(**inputs, assistant_model=draft)`."
        )


SpecVLMDraftModel.register_for_auto_class("AutoModel")

__all__ = ["SpecVLMDraftModel", "SpecVLMDraftPreTrainedModel", "SpecVLMDraftOutput"]
