"""The draft over its own KV cache: the prompt's pairs, prefill (compressed), catch-up and tree steps.

At position t the draft reads the pair (x_{t+1}, f_t): the target's input embedding of the next token and the
target's final hidden state at t. `prompt_pairs` builds a prompt's pairs from the target's prefill,
`compress_pairs` the draft's prefill block from them (visual pairs compressed; its length sizes the fast path's
draft cache). `DraftRunner` runs the draft over blocks of pairs on a cache window (`kv_cache.py`: dynamic or static
cache), and is shared by the tree round (`round.SpeculativeRound`), chain mode (`chain.py`) and training
(`training/objective.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import call_image_inputs
from .compressor import question_features
from .kv_cache import FixedRowsWindow, FixedWindow, GrowingWindow, RowsWindow
from .tree import additive_mask


@dataclass
class PromptPairs:
    """A prompt as the draft reads it: pairs (x_{t+1}, f_t) for t = 0..n-1, x_n being the first new token.

    Attributes:
        token_embeds: `(1, n, d)` the target's input embeddings of x_1..x_n (image features at image tokens).
        features: `(1, n, d)` the target's final hidden states f_0..f_{n-1}.
        positions: `(n,)` position ids; real: `(n,)` bool, False on left padding.
        visual: `(n,)` bool, True where x_{t+1} is an image token.
        layouts: one `VisualLayout` per image; question: `(d,)` the compressor gate's input.
    """

    token_embeds: torch.Tensor
    features: torch.Tensor
    positions: torch.Tensor
    real: torch.Tensor
    visual: torch.Tensor
    layouts: list
    question: torch.Tensor | None


def prompt_pairs(
    adapter, draft, prompt_ids, prompt_embeds, prompt_features, first_token_ids, mask, positions, model_kwargs
) -> PromptPairs:
    """Builds the draft's view of a prompt from the target's prefill (see `PromptPairs`).

    Args:
        adapter: the target's `TargetAdapter` (image token, visual layouts).
        prompt_ids: `(1, n)` prompt; prompt_embeds / prompt_features: `(1, n, d)` from the target's prefill.
        first_token_ids: `(1, 1)` the first generated token x_n.
        mask, positions: `(n,)` the prompt's attention mask (bool) and position ids.
        model_kwargs: `generate`'s model inputs (image sizes and grids for the layouts; where transformers has
            dropped them before the loop, those the call was given, see `call_image_inputs`).
    """
    model_kwargs = call_image_inputs(model_kwargs)
    is_image = adapter.visual_mask(prompt_ids[0], model_kwargs)
    visual = torch.cat([is_image[1:], is_image.new_zeros(1)])
    compressing = draft.compressor is not None and bool(is_image.any())
    first = draft.embed(first_token_ids)
    return PromptPairs(
        token_embeds=torch.cat([prompt_embeds[:, 1:].to(first.device), first], dim=1),
        features=prompt_features.to(first.device),
        positions=positions,
        real=mask,
        visual=visual,
        layouts=adapter.visual_layouts(visual, {**model_kwargs, "input_ids": prompt_ids[0]}) if compressing else [],
        question=question_features(prompt_features[0], mask, is_image) if compressing else None,
    )


@dataclass
class DraftPrefill:
    """The block the draft's prefill writes to its cache: a prompt's pairs, fused, with the visual ones compressed.

    Attributes:
        fused: `(q, d)` fused inputs (text pairs, then each visual span's `m` compressed tokens in its place).
        positions: `(q,)` position ids (a span's compressed tokens take its last `m` positions).
        real: `(q,)` bool, which entries are real tokens (all of them: `compress_pairs` drops left padding).
        info: the compressor's report (`branch`, `draft_visual_tokens`, `target_visual_tokens`).
    """

    fused: torch.Tensor
    positions: torch.Tensor
    real: torch.Tensor
    info: dict

    @property
    def length(self) -> int:
        """Cache entries the prefill writes: the text pairs plus the compressed visual tokens."""
        return self.fused.shape[0]


def compress_pairs(draft, prompt: PromptPairs) -> DraftPrefill:
    """Fuses a prompt's pairs and compresses the visual ones (`SpecVLMDraftModel.compress_prompt`), on the draft's
    device; the draft's cache is not touched. Left padding is dropped too (no query sees it): the block holds the
    prompt's real pairs only."""
    device = draft.fc.weight.device
    fused = draft.fuse(prompt.token_embeds, prompt.features)[0]
    fused, positions, real, info = draft.compress_prompt(
        fused,
        prompt.positions.to(device),
        prompt.real.to(device),
        prompt.visual.to(device),
        prompt.layouts,
        prompt.question,
    )
    if not bool(real.all()):
        fused, positions, real = fused[real], positions[real], real[real]
    return DraftPrefill(fused, positions, real, info)


class DraftRunner:
    """Runs a draft over its cache window: one row (a `GrowingWindow` or a `FixedWindow`) or a batch of rows in one
    cache (a `RowsWindow` or a `FixedRowsWindow`: every call runs one draft forward over all rows).

    Args:
        draft: a bound `SpecVLMDraftModel`.
        window: the draft cache's window.
    """

    def __init__(self, draft, window: GrowingWindow | FixedWindow | RowsWindow | FixedRowsWindow):
        self.draft = draft
        self.window = window
        self.device = draft.fc.weight.device  # may differ from the target's when the target is split over GPUs
        self.dtype = draft.fc.weight.dtype

    @property
    def rows(self) -> bool:
        """Whether the window holds a batch of rows (calls take and give a leading batch dimension)."""
        return isinstance(self.window, (RowsWindow, FixedRowsWindow))

    def _forward(self, fused, block_mask, positions):
        """The draft's layers over `(q, d)` fused inputs written after the cached entries; `block_mask` `(q, m)`
        says which of the block's entries (this block's, after earlier blocks of this round) each row sees.
        Returns `(q, d)` predicted features. Rows: `(B, q, d)`, `(B, q, m)` and `(B, q)` positions give `(B, q, d)`
        (the block written at the window's shared offset)."""
        visible = self.window.visible(block_mask.to(self.device))
        if not self.rows:
            fused, visible, positions = fused[None], visible[None], positions[None]
        hidden = self.draft.decode(
            fused,
            attention_mask=additive_mask(visible, self.dtype)[:, None],
            position_ids=positions.to(self.device),
            past_key_values=self.window.cache,
            use_cache=True,
        )
        return hidden if self.rows else hidden[0]

    def log_probs(self, hidden):
        return torch.log_softmax(self.draft.lm_head(hidden).float(), dim=-1)

    def step(self, token_embeds, features, block_mask, positions):
        """One draft forward over a block of pairs: `(1, q, d)` token embeddings and features -> `(q, d)`
        predicted features and `(q, V)` float32 log-probabilities (rows: `(B, q, d)` -> `(B, q, d)`, `(B, q, V)`)."""
        fused = self.draft.fuse(token_embeds, features)
        hidden = self._forward(fused if self.rows else fused[0], block_mask, positions)
        return hidden, self.log_probs(hidden)

    def append(self, token_embeds, features, positions, count=None, real=None):
        """Appends pairs (x_{t+1}, f_t) to the draft cache, causally.

        Args:
            token_embeds / features: `(1, q, d)` embeddings of x_{t+1} and target features f_t.
            positions: `(q,)` position ids.
            count: how many of the `q` rows to keep (an int or a device scalar; default all): rows past it are
                padding of a fixed-width block, hidden from the kept rows by causality and dropped after.
            real: `(q,)` bool, False for left padding (default all real).
        Rows (a rows window): `(B, q, d)` pairs, `(B, q)` positions and `(B,)` counts (required; a count of 0
        keeps nothing), all real; each row keeps its first `count[b]` entries at its own length.
        Returns:
            `(q, d)` predicted features and `(q, V)` log-probabilities of every row (rows: `(B, q, ...)`).
        """
        q = token_embeds.shape[1]
        causal = torch.ones(q, q, dtype=torch.bool, device=self.device).tril()
        if self.rows:
            batch = token_embeds.shape[0]
            hidden, log_probs = self.step(token_embeds, features, causal.expand(batch, q, q), positions)
            self.window.keep(torch.arange(q, device=self.device).expand(batch, q), count)
            return hidden, log_probs
        real = torch.ones(q, dtype=torch.bool, device=self.device) if real is None else real.to(self.device)
        hidden, log_probs = self.step(token_embeds, features, causal & real[None, :], positions)
        self.window.extend(real, q if count is None else count)
        return hidden, log_probs

    def prefill(self, prompt: PromptPairs | DraftPrefill):
        """Runs the draft over a prompt's pairs (visual ones compressed, unless `compress_pairs` already did);
        returns the last pair's predicted feature `(d,)`, its log-probabilities `(V,)` and the compressor's info."""
        block = prompt if isinstance(prompt, DraftPrefill) else compress_pairs(self.draft, prompt)
        q = block.length
        causal = torch.ones(q, q, dtype=torch.bool, device=self.device).tril() & block.real[None, :]
        last = self._forward(block.fused, causal, block.positions)[-1]
        self.window.extend(block.real, q)
        return last, self.log_probs(last), block.info

    def prefill_rows(self, blocks: list[DraftPrefill]) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the draft over `B` rows' prefill blocks (`compress_pairs`, of different lengths) in one forward on a
        rows window: the blocks left-padded into one `(B, L)` block, the padding not real (hidden from every real
        entry; each padding entry sees itself only, so that no attention row is empty). Returns each row's last
        pair's predicted feature `(B, d)` and log-probabilities `(B, V)`."""
        width = max(block.length for block in blocks)
        fused = blocks[0].fused.new_zeros(len(blocks), width, blocks[0].fused.shape[-1])
        positions = torch.zeros(len(blocks), width, dtype=torch.long, device=self.device)
        real = torch.zeros(len(blocks), width, dtype=torch.bool, device=self.device)
        for row, block in enumerate(blocks):
            fused[row, width - block.length :] = block.fused
            positions[row, width - block.length :] = block.positions.to(self.device)
            real[row, width - block.length :] = block.real.to(self.device)
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        eye = torch.eye(width, dtype=torch.bool, device=self.device)
        last = self._forward(fused, (causal[None] & real[:, None, :]) | eye[None], positions)[:, -1]
        self.window.extend(real)
        return last, self.log_probs(last)

    def tree_step_fn(self, root_position):
        """The `draft_step` callable of `build_dynamic_tree` for a round whose root sits at `root_position` (an
        int or a device scalar): the nodes of tree level `level` read pairs at position `root_position - 1 +
        level`. Rows: of `build_dynamic_trees`, with `(B,)` root positions."""

        def step(tokens, parent_hidden, level, ancestor_mask):
            positions = torch.as_tensor(root_position + (level - 1), device=self.device)
            positions = positions.unsqueeze(-1).expand(tokens.shape)
            if self.rows:  # `(B, n)` tokens, `(B,)` root positions: one forward over every row's frontier
                return self.step(self.draft.embed(tokens), parent_hidden, ancestor_mask, positions)
            return self.step(self.draft.embed(tokens)[None], parent_hidden[None], ancestor_mask, positions)

        return step

    def rewind(self) -> None:
        """Drops the entries drafted since the last `append` (a round's tree levels)."""
        self.window.rewind()
