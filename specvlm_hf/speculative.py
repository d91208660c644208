"""The tree-decoding loop: prefill, then rounds of draft tree -> one target forward -> accept -> compact.

`tree_assisted_decoding` has the signature of transformers' `GenerationMixin._assisted_decoding`, so
`generate` prepares everything (cache, attention mask, position ids, logits processors, stopping criteria,
streamer) and then hands over to it. Each round is a few plain functions from sibling modules:

    build_dynamic_tree (tree.py) -> target forward over the tree -> processed_scores ->
    greedy_path / sampling_path (verify.py) -> append_until_stop -> compact_kv (kv_cache.py) ->
    draft catch-up on the target's true features of the accepted tokens

Two loops run them: the eager loop below (dynamic caches, any device), and the fast path
(`cache_implementation="static"`, `static_round.StaticRound`), which runs the same tree, acceptance and
compaction functions with fixed shapes and device-side state, captured as CUDA graphs on a GPU.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .compressor import prompt_layouts, question_features
from .kv_cache import cache_argument_name, cache_layers, compact_kv, crop_kv
from .target import FeatureTap, text_model_of, unwrap_target
from .tree import (
    DraftTree,
    additive_mask,
    build_dynamic_tree,
    tree_attention_mask,
    tree_position_ids,
    visible_slots,
)
from .static_round import StaticRound, draft_tree_step
from .verify import Acceptance, greedy_path, pack_acceptance, sampling_path, to_host, unpack_acceptance


@dataclass
class SpecVLMStats:
    """What the last `generate` call with a SpecVLM draft did (`draft.stats`).

    Attributes:
        mode: "tree" or "chain".
        rounds: target verification forwards after the prefill.
        accepted_per_round: tokens each round added to the output, the target's own token included.
        prompt_tokens / new_tokens: lengths of the prompt and of the generated continuation.
        prefill_seconds, draft_seconds, verify_seconds, total_seconds: wall time spent in the target's
            prefill, in drafting (tree building and draft catch-up), in target verification and
            acceptance, and in the whole call.
        visual_branch: the compressor branch the draft used for the prompt's image ("none" without one).
        draft_visual_tokens / target_visual_tokens: visual tokens in the draft's cache and in the target's.
    """

    mode: str = ""
    rounds: int = 0
    accepted_per_round: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    total_seconds: float = 0.0
    visual_branch: str = "none"
    draft_visual_tokens: int = 0
    target_visual_tokens: int = 0

    @property
    def sigma(self) -> float:
        """Mean tokens accepted per target forward, the target's own token included."""
        return sum(self.accepted_per_round) / len(self.accepted_per_round) if self.accepted_per_round else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "sigma": self.sigma}


class PhaseClock:
    """Wall time per phase ("prefill", "draft", "verify", ...). `lap(phase)` charges the time since the previous
    lap to `phase`. On CUDA it records events instead of synchronising, so timing adds no host sync; the
    totals are read once, by `totals()`."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start = time.perf_counter()
        self.last = self.start
        self.seconds: dict[str, float] = {}
        self.marks: list = [(None, self._event())] if self.cuda else []

    @staticmethod
    def _event():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def lap(self, phase: str) -> None:
        if self.cuda:
            self.marks.append((phase, self._event()))
            return
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now

    def totals(self) -> dict[str, float]:
        """Seconds per phase, and "total" (wall time since the clock started)."""
        seconds = dict(self.seconds)
        if self.cuda:
            torch.cuda.synchronize()
            for (_, before), (phase, after) in zip(self.marks, self.marks[1:]):
                seconds[phase] = seconds.get(phase, 0.0) + before.elapsed_time(after) / 1000
        seconds["total"] = time.perf_counter() - self.start
        return seconds

    def fill(self, stats: "SpecVLMStats") -> None:
        """Writes the phase totals into `stats`."""
        totals = self.totals()
        stats.prefill_seconds = totals.get("prefill", 0.0)
        stats.draft_seconds = totals.get("draft", 0.0)
        stats.verify_seconds = totals.get("verify", 0.0)
        stats.total_seconds = totals["total"]


def model_cache(model_kwargs: dict):
    """The generation cache in `model_kwargs` (`cache` from transformers 5.24, else `past_key_values`)."""
    for key in ("cache", "past_key_values"):
        if model_kwargs.get(key) is not None:
            return model_kwargs[key]
    raise RuntimeError("SpecVLM tree decoding needs the generation cache; do not pass use_cache=False")


def prefix_positions(input_ids: torch.Tensor, model_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask `(n,)` bool and position ids `(n,)` of a batch-1 prompt, as `generate` prepared them.

    Only left padding is accepted: positions count real tokens, padded slots are masked.
    """
    n = input_ids.shape[1]
    mask = model_kwargs.get("attention_mask")
    mask = torch.ones(n, dtype=torch.bool, device=input_ids.device) if mask is None else mask[0].bool()
    first_real = int(mask.float().argmax()) if bool(mask.any()) else n
    if not bool(mask[first_real:].all()):
        raise ValueError(
            "SpecVLM decoding supports left padding only: the attention mask has a zero after the first real token. "
            "Pad on the left (`processor.tokenizer.padding_side = 'left'`) or drop the padding for batch size 1."
        )
    positions = (mask.long().cumsum(0) - 1).clamp(min=0)
    return mask, positions


# warpers that read only the scores, never the sequence: the whole tree is processed in one call
_SEQUENCE_FREE_PROCESSORS = {
    "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "TypicalLogitsWarper",
    "EpsilonLogitsWarper", "EtaLogitsWarper",
}


def _length_rule_active(processor, length: int) -> bool | None:
    """For processors that read only the sequence's length (minimum-length rules): whether they act on a
    sequence of `length` tokens; None for any other processor."""
    name = type(processor).__name__
    if name == "MinLengthLogitsProcessor":
        return length < processor.min_length
    if name == "MinNewTokensLengthLogitsProcessor":
        return length - processor.prompt_length_to_skip < processor.min_new_tokens
    return None


def _same_for_every_node(logits_processor, prefix_length: int, max_depth: int) -> bool:
    """True when the processors treat every tree node alike: each reads only the scores, or only the length and
    acts (or not) on the shortest and the longest sequence of the tree alike (minimum-length rules are monotone)."""
    for processor in logits_processor:
        if type(processor).__name__ in _SEQUENCE_FREE_PROCESSORS:
            continue
        shortest = _length_rule_active(processor, prefix_length)
        if shortest is None or shortest != _length_rule_active(processor, prefix_length + max_depth):
            return False
    return True


def processed_scores(
    tree: DraftTree, prefix_ids: torch.Tensor, logits: torch.Tensor, logits_processor
) -> torch.Tensor:
    """The target's logits at every tree node after `generate`'s logits processors.

    Each node is processed with its own sequence (prefix + path to the node), exactly as step-by-step
    decoding would; nodes of one depth share a length and are processed as one batch. The whole tree is
    processed at once when that gives the same: processors that only read the scores (temperature, top-k,
    top-p...) and minimum-length rules that act on all of the tree's lengths or on none.

    Args:
        tree: `T` nodes; the root is the last token of `prefix_ids`.
        prefix_ids: `(1, n)` the sequence so far, root included.
        logits: `(T, V)` float32 target logits; row i scores the token after node i.
    Returns:
        `(T, V)` processed scores.
    """
    if logits_processor is None or len(logits_processor) == 0:
        return logits
    # processors run where `generate` keeps the ids (with a target split over GPUs, the logits come from the
    # last one), as plain `generate` runs them; the scores go back to the tree's device
    home, logits = logits.device, logits.to(prefix_ids.device)
    if _same_for_every_node(logits_processor, prefix_ids.shape[1], tree.max_depth):
        return logits_processor(prefix_ids.expand(tree.num_nodes, -1), logits.clone()).to(home)
    # every node's own sequence: the prefix, then the tokens on its path after the root (padded past its depth)
    path_tokens = tree.tokens[tree.paths[:, 1:].clamp(min=0)].to(prefix_ids.device)
    sequences = torch.cat([prefix_ids.expand(tree.num_nodes, -1), path_tokens], dim=1)
    depths = tree.depths.to(prefix_ids.device)
    out = logits
    for depth in range(tree.max_depth + 1):  # all rows at once, kept for the nodes of this depth: no syncs
        processed = logits_processor(sequences[:, : prefix_ids.shape[1] + depth], logits.clone())
        out = torch.where((depths == depth)[:, None], processed, out)
    return out.to(home)


def host_stop_rule(stopping_criteria) -> tuple[int | None, set[int]] | None:
    """`(max_length, eos ids)` when the stopping criteria are only a length limit and EOS tokens (they can then
    be checked on the host without a device sync per token); None otherwise."""
    max_length, eos = None, set()
    for criterion in stopping_criteria or []:
        name = type(criterion).__name__
        if name == "MaxLengthCriteria":
            max_length = criterion.max_length
        elif name == "EosTokenCriteria":
            eos |= set(criterion.eos_token_id.flatten().tolist())
        else:
            return None
    return max_length, eos


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A long tensor of host `values` on `device`; on CUDA through pinned memory, so the copy does not wait for
    the work already queued on the stream (a copy from pageable memory would)."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def append_until_stop(
    input_ids: torch.Tensor, tokens: list[int], stopping_criteria, host_rule=None
) -> tuple[torch.Tensor, int, bool]:
    """Appends `tokens` one by one, stopping right after the first one on which `stopping_criteria` fire
    (EOS, max length, stop strings, user criteria), as step-by-step decoding would.

    Args:
        host_rule: `host_stop_rule(stopping_criteria)`, to decide on the host when possible.
    Returns:
        the new `(1, n + j)` ids, the number `j` of tokens appended, and whether generation is finished.
    """
    if host_rule is not None:
        max_length, eos = host_rule
        length = input_ids.shape[1]
        count, finished = len(tokens), False
        for j, token in enumerate(tokens, start=1):
            if token in eos or (max_length is not None and length + j >= max_length):
                count, finished = j, True
                break
        return torch.cat([input_ids, to_device(tokens[:count], input_ids.device)[None]], dim=1), count, finished
    for j, token in enumerate(tokens, start=1):
        input_ids = torch.cat([input_ids, input_ids.new_tensor([[token]])], dim=1)
        if bool(stopping_criteria(input_ids, None).any()):
            return input_ids, j, True
    return input_ids, len(tokens), False


class TreeVerifier:
    """Scores a tree with the target (eager loop): one forward of its text model over all nodes after the cached
    prefix. The text model is called directly (the VLM wrapper adds nothing once the image is in the cache), so
    the final hidden states come back with the logits. The fast path's counterpart is `StaticRound.verify`."""

    def __init__(self, target):
        model = unwrap_target(target)
        self.text_model = text_model_of(model)
        self.lm_head = model.get_output_embeddings()
        self.cache_kw = cache_argument_name(self.text_model.forward)
        self.dtype = self.lm_head.weight.dtype

    def __call__(self, tree: DraftTree, cache, prefix_mask: torch.Tensor, root_position: int):
        """Returns `(T, V)` float32 logits and `(T, d)` final hidden states (the draft's true features)."""
        hidden = self.text_model(
            input_ids=tree.tokens[None],
            attention_mask=tree_attention_mask(tree, prefix_mask, self.dtype),
            position_ids=tree_position_ids(tree, root_position),
            use_cache=True,
            **{self.cache_kw: cache},
        ).last_hidden_state[0]
        return self.lm_head(hidden).float(), hidden


def fast_path_options(target, draft, device: torch.device, generation_config) -> tuple[bool, bool]:
    """`(graphs, compile)` for the fast path: CUDA graphs when the target and the draft sit on one CUDA device;
    `torch.compile` kernel fusion before capture unless `generate(..., disable_compile=True)`."""
    devices = {p.device for p in unwrap_target(target).parameters()} | {p.device for p in draft.parameters()}
    graphs = device.type == "cuda" and len(devices) == 1
    return graphs, graphs and not getattr(generation_config, "disable_compile", False)


class PendingAcceptance:
    """The round's one device-to-host transfer (a `pack_acceptance` tensor), started without waiting: on CUDA
    it is copied into pinned memory behind an event, so the host can queue more work before it waits."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = self.event = self.values = None

    def send(self, packed: torch.Tensor) -> None:
        if not self.cuda:
            self.values = packed.tolist()
            return
        if self.host is None or self.host.shape != packed.shape:
            self.host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        self.host.copy_(packed, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def receive(self) -> Acceptance:
        if self.cuda:
            self.event.synchronize()
            self.values = self.host.tolist()
        return unpack_acceptance(self.values)


def _select_token(scores: torch.Tensor, do_sample: bool) -> int:
    if do_sample:
        return int(torch.multinomial(torch.softmax(scores, dim=-1), 1))
    return int(scores.argmax())


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


def prompt_pairs(target, draft, prompt_ids, prompt_embeds, prompt_features, first_token_ids, mask, positions, image_sizes):
    """Builds the draft's view of a prompt from the target's prefill (see `PromptPairs`).

    Args:
        prompt_ids: `(1, n)` prompt; prompt_embeds / prompt_features: `(1, n, d)` from the target's prefill.
        first_token_ids: `(1, 1)` the first generated token x_n.
        mask, positions: `(n,)` the prompt's attention mask (bool) and position ids.
        image_sizes: `generate`'s `image_sizes` (LLaVA-NeXT) or None.
    """
    config = unwrap_target(target).config
    image_token = getattr(config, "image_token_id", None)
    is_image = prompt_ids[0] == image_token if image_token is not None else torch.zeros_like(mask)
    visual = torch.cat([is_image[1:], is_image.new_zeros(1)])
    compressing = draft.compressor is not None and bool(is_image.any())
    first = draft.embed(first_token_ids)
    return PromptPairs(
        token_embeds=torch.cat([prompt_embeds[:, 1:].to(first.device), first], dim=1),
        features=prompt_features.to(first.device),
        positions=positions,
        real=mask,
        visual=visual,
        layouts=prompt_layouts(config, visual, image_sizes) if compressing else [],
        question=question_features(prompt_features[0], mask, is_image) if compressing else None,
    )


class _DraftRunner:
    """Runs the draft over its own KV cache: prompt prefill, then (eager loop) catch-up on the target's features
    and tree steps. With a `StaticRound` the cache is its static draft cache and prefill masks span it (the
    rounds then run in `StaticRound`)."""

    def __init__(self, draft, mask: torch.Tensor, static: "StaticRound | None" = None):
        self.draft = draft
        self.cache = static.draft_cache if static else DynamicCache(config=draft.config.text_config)
        self.static_length = static.length if static else None
        self.device = draft.fc.weight.device  # may differ from the inputs' when the target is split over GPUs
        self.mask = mask.to(self.device)  # (Ld,) bool, real (non-padding) cached draft entries
        self.dtype = draft.fc.weight.dtype

    def catch_up(self, token_embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor):
        """Appends pairs (x_{t+1}, f_t) to the draft cache.

        Args:
            token_embeds: `(1, q, d)` embeddings of x_{t+1}.
            features: `(1, q, d)` target features f_t.
            positions: `(q,)` position ids.
        Returns:
            the last pair's predicted feature `(d,)` and its draft log-probabilities `(V,)`.
        """
        real = self.mask.new_ones(token_embeds.shape[1])
        return self._append(self.draft.fuse(token_embeds, features)[0], positions.to(self.device), real)

    def prefill(self, prompt: "PromptPairs"):
        """Runs the draft over a prompt's pairs (visual ones compressed); returns the last pair's predicted
        feature `(d,)`, its log-probabilities `(V,)` and the compressor's info."""
        fused = self.draft.fuse(prompt.token_embeds, prompt.features)[0]
        fused, positions, real, info = self.draft.compress_prompt(
            fused, prompt.positions.to(self.device), prompt.real.to(self.device), prompt.visual.to(self.device),
            prompt.layouts, prompt.question,
        )
        return (*self._append(fused, positions, real), info)

    def _append(self, fused: torch.Tensor, positions: torch.Tensor, real: torch.Tensor):
        past = self.mask
        self.mask = torch.cat([past, real])
        q = fused.shape[0]
        causal = torch.ones(q, q, dtype=torch.bool, device=fused.device).tril()
        visible = visible_slots(past, causal & real[None, :], self.static_length)
        hidden = self.draft.decode(
            fused[None],
            attention_mask=additive_mask(visible, self.dtype)[None, None],
            position_ids=positions[None],
            past_key_values=self.cache,
            use_cache=True,
        )
        last = hidden[0, -1]
        return last, torch.log_softmax(self.draft.lm_head(last).float(), dim=-1)

    def tree_step_fn(self, root_position: int):
        """The `draft_step` callable of `build_dynamic_tree` for a round whose root is at `root_position`."""
        prefix = self.mask

        def step(tokens, parent_hidden, level, ancestor_mask):
            n = tokens.shape[0]
            visible = visible_slots(prefix, ancestor_mask)
            return draft_tree_step(
                self.draft,
                self.draft.embed(tokens)[None],
                parent_hidden[None],
                additive_mask(visible, self.dtype)[None, None],
                torch.full((1, n), root_position - 1 + level, device=tokens.device),
                self.cache,
            )

        return step

    def rewind(self):
        """Drops the tree entries drafted this round."""
        crop_kv(self.cache, self.mask.numel())


def validate_request(target, input_ids: torch.Tensor, model_kwargs: dict, generation_config, synced_gpus=False) -> None:
    """Checks a speculative `generate` call before any work, raising an error that names the problem and the fix.

    Covers: batch size, DeepSpeed/FSDP sync, outputs a tree cannot give, and the total length against the
    model's positions (the images are checked earlier, by `check_images`, before transformers encodes them).
    """
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"SpecVLM speculative decoding supports batch size 1 (got {input_ids.shape[0]}). Call `generate` once per "
            "example, or drop `assistant_model` for batched decoding."
        )
    if synced_gpus:
        raise ValueError("SpecVLM speculative decoding does not support `synced_gpus` (DeepSpeed ZeRO-3 / FSDP).")
    if generation_config.output_attentions or generation_config.output_hidden_states:
        raise ValueError(
            "SpecVLM speculative decoding cannot return attentions or hidden states (the target scores a tree, not "
            "a sequence). Drop `output_attentions` / `output_hidden_states`, or generate without `assistant_model`."
        )
    config = unwrap_target(target).config
    text = config.get_text_config(decoder=True)
    max_positions = getattr(text, "max_position_embeddings", None)
    if max_positions is not None and generation_config.max_length > max_positions:
        raise ValueError(
            f"The prompt ({input_ids.shape[1]} tokens) plus the new tokens reach {generation_config.max_length} "
            f"positions, more than the model's max_position_embeddings ({max_positions}). Shorten the prompt or "
            "lower `max_new_tokens`."
        )


def check_images(config, input_ids: torch.Tensor, model_kwargs: dict) -> None:
    """Raises when a batch-1 prompt's image placeholders do not match the images given (`pixel_values`)."""
    image_token = getattr(config, "image_token_id", None)
    if image_token is None or input_ids.shape[0] != 1:
        return
    is_image = input_ids[0] == image_token
    placeholders = int(is_image.sum())
    runs = int((is_image[1:] & ~is_image[:-1]).sum()) + int(is_image[0]) if placeholders else 0
    pixel_values = model_kwargs.get("pixel_values")
    if placeholders and pixel_values is None and model_kwargs.get("inputs_embeds") is None:
        raise ValueError(
            f"The prompt has {placeholders} image tokens but no image was given. Pass the image (`pixel_values`, "
            "e.g. `processor(images=image, text=prompt, return_tensors='pt')`), or remove `<image>` from the prompt."
        )
    if pixel_values is None:
        return
    num_images = pixel_values.shape[0]
    if not placeholders:
        raise ValueError(
            f"{num_images} image(s) were given but the prompt has no image token. Put `<image>` in the prompt (the "
            "processor's chat template does this for you), or do not pass `pixel_values`."
        )
    per_image = getattr(config, "image_seq_length", None) if config.model_type == "llava" else None
    if runs > num_images or (per_image and placeholders != num_images * per_image and placeholders % per_image == 0):
        raise ValueError(
            f"The prompt has {runs} image placeholder(s) ({placeholders} image tokens) but {num_images} image(s) "
            "were given. Give exactly one image per `<image>` in the prompt, and build the prompt with the model's "
            "processor so that each `<image>` is expanded to the right number of tokens."
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


class _Decoding:
    """What one `generate` call accumulates and how it grows: the ids, streamed tokens, per-token scores and
    logits, stopping, and the round statistics. Shared by the eager loop and the fast path."""

    def __init__(self, input_ids, logits_processor, stopping_criteria, generation_config, streamer, stats):
        self.input_ids = input_ids
        self.logits_processor = logits_processor
        self.stopping_criteria = stopping_criteria
        self.host_rule = host_stop_rule(stopping_criteria)
        self.streamer = streamer
        self.stats = stats
        self.do_sample = bool(generation_config.do_sample)
        self.want_scores = generation_config.return_dict_in_generate and generation_config.output_scores
        self.want_logits = generation_config.return_dict_in_generate and generation_config.output_logits
        self.scores, self.logits = [], []
        self.finished = False

    def append(self, tokens: list[int]) -> int:
        """Appends `tokens` up to the first that stops generation; streams them; returns how many were appended."""
        self.input_ids, appended, self.finished = append_until_stop(
            self.input_ids, tokens, self.stopping_criteria, self.host_rule
        )
        if self.streamer is not None:  # from the host's copy: `.cpu()` on the device ids would wait for the GPU
            self.streamer.put(torch.tensor([tokens[:appended]]))
        return appended

    def accept(self, tree: DraftTree, logits: torch.Tensor):
        """`(scores, (path, length, next_token))`: the processed target scores at every node and the acceptance,
        on the device."""
        scores = processed_scores(tree, self.input_ids, logits, self.logits_processor)
        if self.do_sample:
            return scores, sampling_path(tree, torch.softmax(scores, dim=-1))
        return scores, greedy_path(tree, scores)

    def record(self, acceptance: Acceptance, scores: torch.Tensor, logits: torch.Tensor) -> int:
        """Appends a round's accepted tokens (and their scores / logits when asked for); returns how many."""
        appended = self.append(acceptance.tokens)
        if self.want_scores or self.want_logits:
            rows = torch.tensor(acceptance.nodes[:appended], device=logits.device)  # a copy, even of graph memory
            if self.want_scores:
                self.scores.extend(scores[rows].split(1))
            if self.want_logits:
                self.logits.extend(logits[rows].split(1))
        self.stats.rounds += 1
        self.stats.accepted_per_round.append(appended)
        return appended


def _eager_rounds(decoding: _Decoding, target, draft, cache, runner: "_DraftRunner", target_mask, root_position,
                  root_hidden, root_log_probs, clock: PhaseClock) -> None:
    """The eager loop (dynamic caches, any device): tree, verify, accept, compact, catch up, until finished."""
    config = draft.config
    verifier = TreeVerifier(target)
    while not decoding.finished:
        tree = build_dynamic_tree(
            decoding.input_ids[0, -1], root_log_probs, root_hidden, runner.tree_step_fn(root_position),
            top_k=config.tree_top_k, depth=config.tree_depth, total_tokens=config.tree_total_tokens,
        )
        runner.rewind()
        clock.lap("draft")

        prefix_length = target_mask.numel()
        logits, features = verifier(tree, cache, target_mask, root_position)
        scores, path = decoding.accept(tree, logits)
        acceptance = to_host(tree, *path)
        appended = decoding.record(acceptance, scores, logits)
        kept = acceptance.nodes[:appended]  # the cache holds every token but the newest
        compact_kv(cache, prefix_length, kept)
        target_mask = torch.cat([target_mask, target_mask.new_ones(len(kept))])
        clock.lap("verify")
        if decoding.finished:
            break

        # draft catch-up on the target's true features of the root and the accepted nodes
        root_hidden, root_log_probs = runner.catch_up(
            draft.embed(decoding.input_ids[:, -appended:]),
            features[torch.tensor(kept, device=features.device)][None],
            torch.arange(root_position, root_position + appended, device=decoding.input_ids.device),
        )
        root_position += appended
        clock.lap("draft")


def _fast_rounds(decoding: _Decoding, static: StaticRound, clock: PhaseClock) -> None:
    """The fast path's loop (state already loaded by `static.start`): three graphed round functions, acceptance
    between verify and commit, and one wait per round, on the acceptance, while commit runs."""
    pending = PendingAcceptance(decoding.input_ids.device)
    while not decoding.finished:
        tree = static.draft_tree()
        clock.lap("draft")
        logits, _ = static.verify()
        scores, path = decoding.accept(tree, logits)
        pending.send(pack_acceptance(tree, *path))
        clock.lap("verify")
        static.commit(*path)
        clock.lap("draft")
        decoding.record(pending.receive(), scores, logits)


@torch.no_grad()
def tree_assisted_decoding(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    assistant_model=None,
    **model_kwargs,
):
    """EAGLE-2 tree speculative decoding with a SpecVLM draft (`assistant_model`), lossless.

    Arguments are those `generate` passes to a decoding method; see `GenerationMixin._assisted_decoding`.
    Returns what `generate` returns: the sequences, or a `GenerateDecoderOnlyOutput` when
    `return_dict_in_generate=True` (with `scores` / `logits` per new token when requested).
    """
    draft = assistant_model
    for unused in ("inputs_tensor", "assistant_tokenizer", "tokenizer"):
        model_kwargs.pop(unused, None)
    validate_request(model, input_ids, model_kwargs, generation_config, synced_gpus)
    check_attention_backend(model, draft)
    draft.bind_target(model)
    config = draft.config
    stats = draft.stats = SpecVLMStats(mode="tree", prompt_tokens=input_ids.shape[1])
    clock = PhaseClock(input_ids.device)
    prompt_mask, prompt_positions = prefix_positions(input_ids, model_kwargs)
    static = None
    if generation_config.cache_implementation == "static":  # the fast path: static caches, CUDA graphs
        graphs, compile = fast_path_options(model, draft, input_ids.device, generation_config)
        # room for one tree in the target's cache, and for a round's draft entries (tree levels, catch-up)
        needed = generation_config.max_length + max(
            config.tree_total_tokens, config.tree_depth * config.tree_top_k + config.tree_depth + 2
        )
        static = StaticRound.for_call(model, draft, needed, graphs, compile)
        cache_key = next(key for key in ("cache", "past_key_values") if model_kwargs.get(key) is not None)
        model_kwargs[cache_key] = static.target_cache
    cache = model_cache(model_kwargs)
    cache_layers(cache)  # refuses sliding-window caches early
    decoding = _Decoding(input_ids, logits_processor, stopping_criteria, generation_config, streamer, stats)

    # 1. prefill: the same call plain `generate` makes, so the first token is bit-identical; the tap records
    # the prompt's merged input embeddings and final hidden states for the draft
    with FeatureTap(model) as tap:
        outputs = model._prefill(input_ids, generation_config, model_kwargs)
        prompt_embeds, prompt_features = tap.inputs_embeds, tap.last_hidden_state
    first_logits = outputs.logits[:, -1].to(dtype=torch.float32, device=input_ids.device, copy=True)
    first_scores = logits_processor(input_ids, first_logits)
    token = _select_token(first_scores[0], decoding.do_sample)
    del outputs
    if decoding.want_scores:
        decoding.scores.append(first_scores)
    if decoding.want_logits:
        decoding.logits.append(first_logits)
    decoding.append([token])
    clock.lap("prefill")

    if not decoding.finished:
        # 2. draft prefill on (x_{t+1}, f_t) for the whole prompt
        runner = _DraftRunner(draft, prompt_mask.new_zeros(0), static)
        pairs = prompt_pairs(
            model, draft, input_ids, prompt_embeds, prompt_features, decoding.input_ids[:, -1:],
            prompt_mask, prompt_positions, model_kwargs.get("image_sizes"),
        )
        root_hidden, root_log_probs, info = runner.prefill(pairs)
        stats.visual_branch = info["branch"]
        stats.draft_visual_tokens = info["draft_visual_tokens"]
        stats.target_visual_tokens = info["target_visual_tokens"]
        clock.lap("draft")

        # 3. rounds: draft a tree, score it with the target, accept, keep the accepted path, catch the draft up
        root_position = int(prompt_positions[-1]) + 1
        if static is not None:
            static.start(prompt_mask, runner.mask, token, root_position, root_hidden, root_log_probs)
            _fast_rounds(decoding, static, clock)
        else:
            _eager_rounds(decoding, model, draft, cache, runner, prompt_mask.clone(), root_position, root_hidden,
                          root_log_probs, clock)

    if streamer is not None:
        streamer.end()
    stats.new_tokens = decoding.input_ids.shape[1] - stats.prompt_tokens
    clock.fill(stats)
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(
            sequences=decoding.input_ids,
            scores=tuple(decoding.scores) if decoding.want_scores else None,
            logits=tuple(decoding.logits) if decoding.want_logits else None,
            past_key_values=cache,
        )
    return decoding.input_ids
