"""The tree-decoding loop inside `generate`: prefill, then rounds of draft tree -> verify -> accept -> commit.

`tree_assisted_decoding` has the signature of transformers' `GenerationMixin._assisted_decoding`, so
`generate` prepares everything (cache, attention mask, position ids, logits processors, stopping criteria,
streamer) and then hands over to it. One loop (`run_rounds`) drives both backends of `round.SpeculativeRound`:

    draft_tree -> verify -> processed_scores -> greedy_path / sampling_path (verify.py) -> commit -> append

eager on dynamic caches (any device), or the fast path on static caches (`cache_implementation="static"`),
captured as CUDA graphs on a GPU. What differs between target families is asked of the target's adapter.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache
from transformers.generation import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    GenerateDecoderOnlyOutput,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from .adapters import adapter_for, call_image_inputs
from .draft_runner import compress_pairs, prompt_pairs
from .hf_internals import (
    generation_cache_key,
    host_stop_rule,
    length_rule_active,
    pad_token_of,
    plain_decoding,
    prefill,
)
from .request_checks import check_attention_backend, prefix_positions, validate_request
from .round import FastPath, RowsRound, SpeculativeRound, fast_path_options, tree_room
from .stats import PhaseClock, SpecVLMStats, warn_if_low_acceptance
from .target import FeatureTap
from .tensor_parallel import RankAgreement
from .tree import DraftTree
from .verify import Acceptance, greedy_path, pack_acceptance, sampling_path, unpack_acceptance

# warpers that read only the scores, never the sequence: the whole tree is processed in one call
_SEQUENCE_FREE_PROCESSORS = (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    MinPLogitsWarper,
    TypicalLogitsWarper,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
)


def _same_for_every_node(logits_processor, prefix_length: int, max_depth: int) -> bool:
    """True when the processors treat every tree node alike: each reads only the scores, or only the length and
    acts (or not) on the shortest and the longest sequence of the tree alike (minimum-length rules are monotone)."""
    for processor in logits_processor:
        if type(processor) in _SEQUENCE_FREE_PROCESSORS:
            continue
        shortest = length_rule_active(processor, prefix_length)
        if shortest is None or shortest != length_rule_active(processor, prefix_length + max_depth):
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
    logits_processor = row_processors(logits_processor, 0, 1, tree.num_nodes)  # per-row fields, one per node
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


class Decoding:
    """What one `generate` call accumulates and how it grows: the ids, streamed tokens, per-token scores and
    logits, stopping, and the round statistics."""

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
        self.agreement: RankAgreement | None = None  # a tensor-parallel target's check that its ranks agree

    def append(self, tokens: list[int]) -> int:
        """Appends `tokens` up to the first that stops generation; streams them; returns how many were appended.
        On a tensor-parallel target, checks that every rank appended the same."""
        self.input_ids, appended, self.finished = append_until_stop(
            self.input_ids, tokens, self.stopping_criteria, self.host_rule
        )
        if self.agreement is not None:
            self.agreement.add(tokens[:appended])
            self.agreement.check()
        if self.streamer is not None:  # from the host's copy: `.cpu()` on the device ids would wait for the GPU
            self.streamer.put(torch.tensor([tokens[:appended]]))
        return appended

    def first_token(self, logits: torch.Tensor) -> int:
        """Chooses and appends the prefill's token from its `(1, V)` float32 logits."""
        scores = self.logits_processor(self.input_ids, logits)
        if self.do_sample:
            token = int(torch.multinomial(torch.softmax(scores[0], dim=-1), 1))
        else:
            token = int(scores[0].argmax())
        if self.want_scores:
            self.scores.append(scores)
        if self.want_logits:
            self.logits.append(logits)
        self.append([token])
        return token

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

    def rows_to_keep(self) -> list[int] | None:
        """For a batch, the rows of the round to keep after a round (None: keep them all)."""
        return None

    def score_outputs(self) -> tuple[tuple | None, tuple | None]:
        """`(scores, logits)` as `generate` returns them: one `(B, V)` tensor per new token (None: not asked for)."""
        return (
            tuple(self.scores) if self.want_scores else None,
            tuple(self.logits) if self.want_logits else None,
        )

    def sequences(self) -> torch.Tensor:
        """The output ids, as plain `generate` returns them."""
        return self.input_ids


# processor fields that hold one entry per batch row (transformers 5.25's repetition penalty keeps each row's
# padding length): a row's processors see its own entry
_PER_ROW_FIELDS = ("prompt_ignore_length",)


def row_processors(logits_processor, row: int, batch: int, copies: int = 1):
    """`logits_processor` as row `row` of a batch of `batch` rows alone would have it, repeated for `copies`
    sequences (a tree's nodes): processors with per-row fields (`_PER_ROW_FIELDS`) are copied with that row's
    entry; the others are shared."""
    if logits_processor is None:
        return None
    out = []
    for processor in logits_processor:
        fields = {
            name: value[row : row + 1].expand(copies, *value.shape[1:])
            for name, value in vars(processor).items()
            if name in _PER_ROW_FIELDS and torch.is_tensor(value) and value.dim() and value.shape[0] == batch
        }
        if fields:
            processor = copy.copy(processor)
            for name, value in fields.items():
                setattr(processor, name, value)
        out.append(processor)
    return type(logits_processor)(out)


class RowsDecoding(Decoding):
    """`Decoding` for a batch of `B` rows, each growing at its own pace: every row's ids, stopping criteria and
    logits processors are run on that row's own `(1, n_b)` ids, as plain batched `generate` runs them row by row.

    Plain `generate`'s batch conventions: a row whose stopping criteria fired stays finished; when the criteria
    include EOS, it is padded (with the pad token) up to the longest row; without an EOS criterion (e.g. stop
    strings alone) it keeps decoding until every row has stopped, and all rows end at the length where the last
    one stopped. The streamer receives step `t` (a `(B,)` tensor) once every row has produced token `t`. `scores` /
    `logits` hold one `(B, V)` tensor per step; where plain `generate` pads a finished row (and scores the pad tokens
    it feeds the model), that row's entries are 0 at the pad token and -inf elsewhere (the pad's log-probability is
    0), since no target forward runs on them.

    Attributes:
        live: the original row of each row still in the round, in the round's order.
    """

    def __init__(self, input_ids, logits_processor, stopping_criteria, generation_config, streamer, stats, pad_token):
        super().__init__(input_ids, logits_processor, stopping_criteria, generation_config, streamer, stats)
        batch = input_ids.shape[0]
        self.rows = [input_ids[row : row + 1] for row in range(batch)]
        self.stopped_at: list[int | None] = [None] * batch  # length of each row when its criteria fired
        self.has_eos = any(hasattr(criterion, "eos_token_id") for criterion in stopping_criteria)
        self.max_length = generation_config.max_length
        self.pad_token = pad_token
        self.prompt_length = input_ids.shape[1]
        self.streamed = 0  # steps sent to the streamer
        self.live = list(range(batch))
        self.row_processors = [row_processors(logits_processor, row, batch) for row in range(batch)]
        self.row_scores: list[list[torch.Tensor]] = [[] for _ in range(batch)]  # `(n, V)` chunks per row
        self.row_logits: list[list[torch.Tensor]] = [[] for _ in range(batch)]

    @property
    def final_length(self) -> int | None:
        """The output's length once every row has stopped (None before)."""
        stops = self.stopped_at
        return None if None in stops else max(stops)

    def _update_finished(self) -> None:
        end = self.final_length
        self.finished = end is not None and all(
            self.rows[row].shape[1] >= end for row in range(len(self.rows)) if not self._padded(row)
        )

    def _padded(self, row: int) -> bool:
        """Whether the row's output continues with padding (it stopped, and EOS is among the criteria)."""
        return self.has_eos and self.stopped_at[row] is not None

    def append_row(self, row: int, tokens: list[int]) -> int:
        """Appends `tokens` to row `row` up to the first that stops it (after that, without an EOS criterion, up to
        the maximum length); returns how many were appended."""
        ids = self.rows[row]
        if self._padded(row):
            return 0
        if self.stopped_at[row] is None:
            ids, appended, stopped = append_until_stop(ids, tokens, self.stopping_criteria, self.host_rule)
            if stopped:
                self.stopped_at[row] = ids.shape[1]
        else:
            appended = max(0, min(len(tokens), self.max_length - ids.shape[1]))
            ids = torch.cat([ids, to_device(tokens[:appended], ids.device)[None]], dim=1)
        self.rows[row] = ids
        return appended

    def stream(self, flush: bool = False) -> None:
        """Sends the steps every row has produced (all of them up to the output's length when `flush`)."""
        if self.streamer is None:
            return
        end = self.final_length
        if flush:
            upto = end if end is not None else max(ids.shape[1] for ids in self.rows)
        else:
            lengths = [ids.shape[1] for row, ids in enumerate(self.rows) if not self._padded(row)]
            if not lengths:
                return
            upto = min(lengths) if end is None else min(min(lengths), end)
        output = self.sequences_upto(upto)
        for step in range(self.prompt_length + self.streamed, upto):
            self.streamer.put(output[:, step].cpu())
            self.streamed += 1

    def sequences_upto(self, length: int) -> torch.Tensor:
        """`(B, length)` ids: each row cut to `length`, padded rows padded."""
        out = []
        for ids in self.rows:
            ids = ids[:, :length]
            if ids.shape[1] < length:
                ids = torch.cat([ids, ids.new_full((1, length - ids.shape[1]), self.pad_token)], dim=1)
            out.append(ids)
        return torch.cat(out)

    def sequences(self) -> torch.Tensor:
        end = self.final_length
        return self.sequences_upto(end if end is not None else max(ids.shape[1] for ids in self.rows))

    def first_token(self, logits: torch.Tensor) -> list[int]:
        """Chooses and appends the prefill's tokens from its `(B, V)` float32 logits (one processors call for the
        batch, as plain `generate` makes)."""
        scores = self.logits_processor(self.input_ids, logits)
        if self.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), 1)[:, 0].tolist()
        else:
            tokens = scores.argmax(dim=-1).tolist()
        for row, token in enumerate(tokens):
            self.append_row(row, [token])
            self._record_scores(row, scores[row : row + 1], logits[row : row + 1])
        self._update_finished()
        self.stream()
        return tokens

    def accept(self, tree: DraftTree, logits: torch.Tensor):
        """Each live row's processed scores (a list) and the acceptances stacked: `((B, P), (B,), (B,))`."""
        scores, paths = [], []
        for index, row in enumerate(self.live):
            row_scores = processed_scores(tree.row(index), self.rows[row], logits[index], self.row_processors[row])
            scores.append(row_scores)
            if self.do_sample:
                paths.append(sampling_path(tree.row(index), torch.softmax(row_scores, dim=-1)))
            else:
                paths.append(greedy_path(tree.row(index), row_scores))
        return scores, tuple(torch.stack(parts) for parts in zip(*paths))

    def record(self, acceptances: list[Acceptance], scores, logits) -> int:
        self.stats.rows_per_round.append(len(self.live))
        appended = 0
        for index, (acceptance, row) in enumerate(zip(acceptances, self.live)):
            if self._padded(row):  # a finished row the fast path keeps in its batch, masked
                continue
            count = self.append_row(row, acceptance.tokens)
            self.stats.accepted_per_round.append(count)
            appended += count
            if count and (self.want_scores or self.want_logits):
                nodes = torch.tensor(acceptance.nodes[:count], device=logits.device)  # a copy, even of graph memory
                self._record_scores(row, scores[index][nodes.to(scores[index].device)], logits[index][nodes])
        self.stats.rounds += 1
        self._update_finished()
        self.stream()
        return appended

    def _record_scores(self, row: int, scores: torch.Tensor, logits: torch.Tensor) -> None:
        """Keeps row `row`'s `(n, V)` processed scores and logits of its `n` tokens just appended, when asked for."""
        if self.want_scores:
            self.row_scores[row].append(scores)
        if self.want_logits:
            self.row_logits[row].append(logits)

    def score_outputs(self) -> tuple[tuple | None, tuple | None]:
        """`(scores, logits)`: one `(B, V)` tensor per step of the output, each row's own (see the class)."""
        steps = self.sequences().shape[1] - self.prompt_length

        def per_step(chunks: list[list[torch.Tensor]]) -> tuple:
            rows = [torch.cat(row_chunks) for row_chunks in chunks]
            padding = torch.full_like(rows[0][:1], -float("inf"))
            if self.pad_token is not None:
                padding[0, self.pad_token] = 0.0
            return tuple(
                torch.cat([row[step : step + 1] if step < row.shape[0] else padding for row in rows])
                for step in range(steps)
            )

        return (
            per_step(self.row_scores) if self.want_scores else None,
            per_step(self.row_logits) if self.want_logits else None,
        )

    def rows_to_keep(self) -> list[int] | None:
        """The round's rows (indices into `live`) that can still add tokens; None when that is all of them, or none
        (then generation is finished)."""
        keep = [
            index
            for index, row in enumerate(self.live)
            if not self._padded(row) and self.rows[row].shape[1] < self.max_length
        ]
        if len(keep) == len(self.live) or not keep:
            return None
        return keep

    def hold(self, held: list[int]) -> None:
        """The round now holds the rows `held` (indices into `live`), in that order."""
        self.live = [self.live[index] for index in held]


def run_rounds(decoding: Decoding, round: SpeculativeRound, clock: PhaseClock) -> None:
    """Rounds until generation stops: tree, verify, acceptance on the device, one transfer to the host started
    before the commit, and one wait, on that transfer, while the commit runs."""
    pending = PendingAcceptance(decoding.input_ids.device)
    while not decoding.finished:
        tree = round.draft_tree()
        clock.lap("draft")
        logits, _ = round.verify()
        scores, path = decoding.accept(tree, logits)
        pending.send(pack_acceptance(tree, *path))
        clock.lap("verify")
        round.commit(*path)
        clock.lap("draft")
        decoding.record(pending.receive(), scores, logits)
        keep = decoding.rows_to_keep()
        if keep is not None:  # a batch: rows that finished leave it (or are masked, or move to a smaller batch)
            round, held = round.select(keep)
            decoding.hold(held)


def _cache_key(model_kwargs: dict) -> str:
    key = generation_cache_key(model_kwargs)
    if key is not None:
        return key
    raise RuntimeError("SpecVLM tree decoding needs the generation cache; do not pass use_cache=False")


# Tree size against batch size. A verify forward stays bound by reading the target's weights up to roughly this many
# tokens in all (7B on an H100 / H200: ~150-300); past it, each row's tree costs compute. So a batch of B rows
# drafts trees of `min(tree_total_tokens, BATCH_VERIFY_TOKENS // B)` nodes, and when that falls below
# `MIN_TREE_TOKENS` speculation no longer pays and the batch is decoded by `generate`'s own loop. Batches of more
# than `MAX_SPECULATIVE_BATCH` rows are decoded by it too: measured on one H200 (results/README.md), with the draft
# running one forward per tree level for all rows, the fast path beat compiled plain batched `generate` on the mini
# VLM at 4 and 8 rows (1.21x, 1.85x, fp32, outputs equal); above 8 rows nothing has been measured with it (with the
# earlier per-row draft every batch above 4 rows lost). A draft's config may override all three
# (`draft.config.batch_verify_tokens`, `min_tree_tokens`, `max_speculative_batch`).
BATCH_VERIFY_TOKENS = 256
MIN_TREE_TOKENS = 8
MAX_SPECULATIVE_BATCH = 8


def tree_tokens_for_batch(config, batch: int) -> int | None:
    """Tree nodes per row for a batch of `batch` rows under the rule above; None: speculation off."""
    if batch == 1:
        return config.tree_total_tokens
    if batch > getattr(config, "max_speculative_batch", MAX_SPECULATIVE_BATCH):
        return None
    budget = getattr(config, "batch_verify_tokens", BATCH_VERIFY_TOKENS)
    smallest = getattr(config, "min_tree_tokens", MIN_TREE_TOKENS)
    per_row = min(config.tree_total_tokens, budget // batch)
    return per_row if per_row >= smallest else None


def _start_rows(adapter, draft, fast, target_cache, input_ids, prompt_embeds, prompt_features, decoding, model_kwargs):
    """The batched round after the target's prefill (on the fast path `fast`, a `FastPath`, whose draft caches are
    sized by the longest row's compressed prompt; else an eager one over `target_cache`): the draft prefilled on every
    row's own pairs (its own images and compressed length) in one forward, each row's root loaded at its own
    position."""
    batch = input_ids.shape[0]
    masks, positions = zip(*(prefix_positions(input_ids, model_kwargs, row) for row in range(batch)))
    blocks = []
    for row in range(batch):
        ids = decoding.rows[row]
        pairs = prompt_pairs(
            adapter,
            draft,
            input_ids[row : row + 1],
            prompt_embeds[row : row + 1],
            prompt_features[row : row + 1],
            ids[:, input_ids.shape[1] : input_ids.shape[1] + 1],
            masks[row],
            positions[row],
            adapter.row_image_inputs(input_ids, call_image_inputs(model_kwargs), row),
        )
        blocks.append(compress_pairs(draft, pairs))
    if fast is None:
        round = RowsRound.eager(
            adapter, draft, target_cache, torch.stack(masks), lambda rows: tree_tokens_for_batch(draft.config, rows)
        )
    else:
        room = _draft_room(draft.config, decoding.max_length, input_ids.shape[1])
        round = fast.round_for(max(block.length for block in blocks) + room)
        round.load(torch.stack(masks))
    start = input_ids.shape[1]
    round.start_rows(
        blocks,
        [int(decoding.rows[row][0, start]) for row in range(batch)],
        [int(positions[row][-1]) + 1 for row in range(batch)],
        [int(adapter.position_offset(model_kwargs, row)) for row in range(batch)],
    )
    stats = decoding.stats
    stats.draft_visual_tokens = stats.target_visual_tokens = 0
    for block in blocks:
        stats.visual_branch = block.info["branch"]
        stats.draft_visual_tokens += block.info["draft_visual_tokens"]
        stats.target_visual_tokens += block.info["target_visual_tokens"]
    keep = decoding.rows_to_keep()  # rows that stopped on their first token
    if keep is not None:
        round, held = round.select(keep)
        decoding.hold(held)
    return round


def _draft_room(config, max_length: int, prompt_length: int) -> int:
    """Draft cache slots a fast-path call needs beyond its prefill block: the new tokens and a round's room."""
    return max_length - prompt_length + tree_room(config)


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
    adapter = adapter_for(model, tree=True)
    validate_request(model, input_ids, generation_config, synced_gpus, batched=True)
    batch = input_ids.shape[0]
    check_attention_backend(model, draft)
    draft.bind_target(model)
    config = draft.config
    stats = draft.stats = SpecVLMStats(mode="tree", prompt_tokens=input_ids.shape[1])
    tree_tokens = tree_tokens_for_batch(config, batch)
    if tree_tokens is None:  # the batch is too large for trees to pay: generate's own loop
        stats.mode = "plain"
        return plain_decoding(
            model, input_ids, logits_processor, stopping_criteria, generation_config, streamer, model_kwargs
        )
    clock = PhaseClock(input_ids.device)
    prompt_mask, prompt_positions = prefix_positions(input_ids, model_kwargs)
    cache_key = _cache_key(model_kwargs)
    fast = None
    if generation_config.cache_implementation == "static":  # the fast path: static caches, CUDA graphs
        adapter.check_static_cache()
        graphs, compile = fast_path_options(model, draft, input_ids.device, generation_config, batch)
        # the target's cache: the whole sequence and one tree; the draft's is sized after its prefill (compressed)
        needed = generation_config.max_length + tree_room(config)
        rows = dict(batch=batch, tree_for_batch=lambda rows: tree_tokens_for_batch(config, rows)) if batch > 1 else {}
        fast = FastPath.for_call(adapter, draft, needed, graphs, compile, **rows)
        model_kwargs[cache_key] = fast.target_cache
    else:
        model_kwargs[cache_key] = adapter.rewindable_cache(model_kwargs[cache_key])
    if batch > 1:
        decoding = RowsDecoding(
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            streamer,
            stats,
            pad_token_of(generation_config),
        )
    else:
        decoding = Decoding(input_ids, logits_processor, stopping_criteria, generation_config, streamer, stats)
    decoding.agreement = RankAgreement.for_target(model, "tree")
    if decoding.agreement is not None and batch > 1:
        raise ValueError("SpecVLM batched tree decoding does not support tensor-parallel targets yet (batch size 1).")
    if decoding.agreement is not None:
        decoding.agreement.add(input_ids[0].tolist())

    # 1. prefill: the same call plain `generate` makes, so the first token is bit-identical; the tap records
    # the prompt's merged input embeddings and final hidden states for the draft
    with FeatureTap(model) as tap:
        outputs = prefill(model, input_ids, generation_config, model_kwargs)
        prompt_embeds, prompt_features = tap.inputs_embeds, tap.last_hidden_state
    token = decoding.first_token(outputs.logits[:, -1].to(dtype=torch.float32, device=input_ids.device, copy=True))
    del outputs
    clock.lap("prefill")

    if not decoding.finished and batch > 1:
        round = _start_rows(
            adapter,
            draft,
            fast,
            model_kwargs[cache_key],
            input_ids,
            prompt_embeds,
            prompt_features,
            decoding,
            model_kwargs,
        )
        clock.lap("draft")
        run_rounds(decoding, round, clock)
    elif not decoding.finished:
        # 2. draft prefill on (x_{t+1}, f_t) for the whole prompt
        pairs = prompt_pairs(
            adapter,
            draft,
            input_ids,
            prompt_embeds,
            prompt_features,
            decoding.input_ids[:, -1:],
            prompt_mask,
            prompt_positions,
            model_kwargs,
        )
        block = compress_pairs(draft, pairs)
        if fast is None:
            round = SpeculativeRound.eager(
                adapter, draft, model_kwargs[cache_key], DynamicCache(config=config.text_config), prompt_mask
            )
        else:  # the draft's cache holds its compressed prompt, the new tokens and a round's room
            room = _draft_room(config, generation_config.max_length, input_ids.shape[1])
            round = fast.round_for(block.length + room)
        root_hidden, root_log_probs, info = round.runner.prefill(block)
        stats.visual_branch = info["branch"]
        stats.draft_visual_tokens = info["draft_visual_tokens"]
        stats.target_visual_tokens = info["target_visual_tokens"]
        clock.lap("draft")

        # 3. rounds: draft a tree, score it with the target, accept, keep the accepted path, catch the draft up
        root_position = int(prompt_positions[-1]) + 1
        offset = adapter.position_offset(model_kwargs)
        round.start(prompt_mask, token, root_position, offset, root_hidden, root_log_probs)
        run_rounds(decoding, round, clock)

    if streamer is not None:
        if batch > 1:
            decoding.stream(flush=True)
        streamer.end()
    sequences = decoding.sequences()
    stats.new_tokens = (sequences.shape[1] - stats.prompt_tokens) * batch
    clock.fill(stats)
    warn_if_low_acceptance(draft, stats)
    if generation_config.return_dict_in_generate:
        scores, logits = decoding.score_outputs()
        return GenerateDecoderOnlyOutput(
            sequences=sequences, scores=scores, logits=logits, past_key_values=model_kwargs[cache_key]
        )
    return sequences
