"""Batched tree decoding (`generate` with batch size > 1) equals plain batched `generate`, token for token (fp32, CPU).

Rows are left-padded by different amounts (0 to 220 tokens), carry 0, 1 or 2 images, and stop at different steps
(EOS lists chosen from the rows' own continuations: on the first token, in the middle of a round's accepted path,
late, never); each row also equals that row run alone; every greedy case runs on the eager and the static (fast)
path. Fault injections (rows sharing one position, row 0's accepted path used for every row, slots past a row's
length visible) make the same comparison fail. Sampling: each row's tokens and the two rows' joint against plain
batched sampling; a broken acceptance rule fails them, and rows sharing random draws fail the joint test.
"""

from __future__ import annotations

import pytest
import torch

import specvlm_hf
from specvlm_hf import decoding as decoding_module
from specvlm_hf import kv_cache, round as round_module
from tiny_families import family_inputs, tiny_qwen2_5_vl
from tiny_models import oracle_draft, random_inputs, tiny_llava

TREE = dict(tree_top_k=4, tree_depth=4, tree_total_tokens=16)  # small trees: fast CPU tests, same code


@pytest.fixture(scope="module")
def llava():
    return specvlm_hf.enable(tiny_llava(scale=32.0))


@pytest.fixture(scope="module")
def qwen():
    return specvlm_hf.enable(tiny_qwen2_5_vl(seed=0, scale=8.0))


def make_draft(target, noise=0.003, **overrides):
    draft = oracle_draft(target, noise=noise, **overrides)
    for key, value in TREE.items():
        setattr(draft.config, key, value)
    draft.config.max_speculative_batch = 16  # speculate on every batch tested here (the default stops above 8 rows)
    return draft


def llava_row(target, generator, images: int, text_tokens: int) -> dict:
    """One LLaVA prompt with `images` images (0, 1 or 2)."""
    if images < 2:
        return random_inputs(target, generator, text_tokens=text_tokens, image=images == 1)
    first = random_inputs(target, generator, text_tokens=text_tokens)
    second = random_inputs(target, generator, text_tokens=2)
    ids = torch.cat([first["input_ids"], second["input_ids"][:, 1:]], dim=1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.cat([first["pixel_values"], second["pixel_values"]]),
    }


def left_pad(rows: list[dict], extra: list[int], pad: int = 0) -> dict:
    """One batch of batch-1 prompts, left-padded to the longest plus `extra[i]` more pad tokens on row i; the image
    inputs concatenated in row order (`mm_token_type_ids` padded with 0)."""
    width = max(row["input_ids"].shape[1] + more for row, more in zip(rows, extra))
    batch = {"input_ids": [], "attention_mask": [], "mm_token_type_ids": [], "token_type_ids": []}
    for row in rows:
        n = row["input_ids"].shape[1]
        for key, fill in (("input_ids", pad), ("attention_mask", 0), ("mm_token_type_ids", 0), ("token_type_ids", 0)):
            if key in row:
                padded = row[key].new_full((1, width), fill)
                padded[:, width - n :] = row[key]
                batch[key].append(padded)
    out = {key: torch.cat(value) for key, value in batch.items() if value}
    for key in ("pixel_values", "image_grid_thw", "image_sizes"):
        values = [row[key] for row in rows if key in row]
        if values:
            out[key] = torch.cat(values)
    return out


def ragged_eos(target, batch: dict, kwargs: dict, steps: list[int]) -> list[int]:
    """EOS tokens that stop the rows at about `steps[i]` (None: that row's continuation is not used)."""
    full = target.generate(**batch, **{**kwargs, "min_new_tokens": kwargs["max_new_tokens"]})
    new = full[:, batch["input_ids"].shape[1] :].tolist()
    return sorted({new[row][step] for row, step in enumerate(steps) if step is not None})


def assert_rows_alone_agree(target, rows, batch, out, kwargs, draft, pad: int = 0):
    """Each row run alone (no padding, batch size 1) gives that row's tokens, then padding."""
    start = batch["input_ids"].shape[1]
    for index, row in enumerate(rows):
        alone = target.generate(**row, **kwargs, assistant_model=draft)[0, row["input_ids"].shape[1] :].tolist()
        mine = out[index, start:].tolist()
        assert mine[: len(alone)] == alone, index
        assert all(token == pad for token in mine[len(alone) :]), index


def greedy_case(target, draft, rows, extra, kwargs, steps=None, alone=True):
    batch = left_pad(rows, extra)
    if steps is not None:
        kwargs = {**kwargs, "eos_token_id": ragged_eos(target, batch, kwargs, steps)}
    plain = target.generate(**batch, **kwargs)
    spec = target.generate(**batch, **kwargs, assistant_model=draft)
    stats = draft.stats
    assert spec.tolist() == plain.tolist()
    if alone:
        assert_rows_alone_agree(target, rows, batch, spec, kwargs, draft)
    return plain, stats


CASES = {  # batch size: (images per row, extra left padding per row, stop step per row (None: never))
    2: ([1, 0], [0, 37], [0, None]),
    3: ([2, 1, 0], [5, 0, 100], [None, 9, 0]),
    5: ([0, 1, 2, 1, 0], [0, 60, 3, 0, 11], [0, 4, 15, None, 8]),
    8: ([1, 0, 1, 2, 0, 1, 1, 0], [0, 2, 90, 0, 7, 30, 0, 1], [0, 5, 11, None, None, None, 16, None]),
}


PATHS = {"eager": {}, "static": {"cache_implementation": "static"}}  # static: the fast path (no CUDA graphs on CPU)


class StopRecorder:
    """Records, for every row a round appends to, how many tokens the round accepted for it and how many were
    appended before its stopping criteria fired (fewer: the row stopped in the middle of its accepted path)."""

    def __init__(self, monkeypatch):
        self.appends = []  # (row, accepted, appended, stopped)
        original = decoding_module.RowsDecoding.append_row

        def append_row(decoding, row, tokens):
            before = decoding.stopped_at[row]
            appended = original(decoding, row, tokens)
            self.appends.append((row, len(tokens), appended, before is None and decoding.stopped_at[row] is not None))
            return appended

        monkeypatch.setattr(decoding_module.RowsDecoding, "append_row", append_row)

    def stopped_mid_path(self) -> bool:
        return any(stopped and 1 < appended < accepted for _, accepted, appended, stopped in self.appends)


def new_tokens_per_row(out, start: int, eos: list[int]) -> list[int]:
    """Each row's generated tokens up to and including its first EOS."""
    counts = []
    for row in out[:, start:].tolist():
        ends = [index for index, token in enumerate(row) if token in eos]
        counts.append(ends[0] + 1 if ends else len(row))
    return counts


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("size", list(CASES))
def test_batched_greedy_equals_plain_batched_generate_and_each_row_alone(llava, size, path, monkeypatch):
    images, extra, steps = CASES[size]
    generator = torch.Generator().manual_seed(size)
    rows = [llava_row(llava, generator, count, 2 + 3 * index) for index, count in enumerate(images)]
    draft = make_draft(llava, noise=0.003 if size % 2 else 0.0)  # rejections at every depth, or long paths
    kwargs = dict(do_sample=False, max_new_tokens=18, **PATHS[path])
    recorder = StopRecorder(monkeypatch)
    plain, stats = greedy_case(llava, draft, rows, extra, kwargs, steps)
    batch = left_pad(rows, extra)
    eos = ragged_eos(llava, batch, kwargs, steps)
    assert len(eos) >= 2 or size == 2, "an EOS list, not one token"
    counts = new_tokens_per_row(plain, batch["input_ids"].shape[1], eos)
    assert 1 in counts, "a row stops on its first token (the prefill's)"
    assert 18 in counts and min(counts) < 18, "rows stop at different steps; one runs to max_new_tokens"
    assert max(stats.accepted_per_round) >= 2
    if size >= 5:  # the larger batches also stop a row inside a round's accepted path
        assert recorder.stopped_mid_path()


@pytest.mark.parametrize("path", list(PATHS))
def test_left_padding_of_hundreds_of_tokens(llava, path):
    """One row padded by 220 tokens (its cache slots far from its positions), one by none, one by 60."""
    generator = torch.Generator().manual_seed(11)
    rows = [llava_row(llava, generator, count, 3) for count in (0, 1, 2)]
    batch = left_pad(rows, [220, 0, 60])
    assert int((batch["attention_mask"] == 0).sum(dim=1).max()) >= 220
    kwargs = dict(do_sample=False, max_new_tokens=12, **PATHS[path])
    greedy_case(llava, make_draft(llava), rows, [220, 0, 60], kwargs, steps=[None, 4, None])


@pytest.mark.parametrize("path", list(PATHS))
def test_batched_greedy_with_processors_and_compressing_draft(llava, path):
    """min_new_tokens and repetition_penalty run on each row's own ids; a compressing draft pools each row's
    images on its own. (Rows alone are not compared: plain batched `generate` penalises the pad tokens too.)"""
    generator = torch.Generator().manual_seed(7)
    rows = [llava_row(llava, generator, count, 3 + 2 * count) for count in (2, 0, 1)]
    draft = make_draft(llava, compressor={"mode": "fixed", "fixed": "pool@4"})
    kwargs = dict(do_sample=False, max_new_tokens=14, min_new_tokens=6, repetition_penalty=1.3, **PATHS[path])
    greedy_case(llava, draft, rows, [4, 0, 20], kwargs, steps=[2, 9, None], alone=False)
    assert draft.stats.draft_visual_tokens < draft.stats.target_visual_tokens


@pytest.mark.parametrize("path", list(PATHS))
def test_batched_greedy_on_an_m_rope_target(qwen, path):
    """Qwen2.5-VL: each row's own M-RoPE offset (rope_deltas) and its own images' grids."""
    generator = torch.Generator().manual_seed(3)
    rows = [family_inputs(qwen, generator, images=count, text_tokens=3 + count) for count in (1, 0, 2)]
    draft = make_draft(qwen)
    kwargs = dict(do_sample=False, max_new_tokens=16, **PATHS[path])
    greedy_case(qwen, draft, rows, [0, 9, 3], kwargs, steps=[None, 6, 0])


# transformers 5.17's own `generate` (and its prefill, which the fast path calls) fails on PaliGemma 2 with a static
# cache, batch size 1 included (test_families.py): no static case for it
GEMMA_FAMILY = [
    ("gemma3", "eager"),
    ("gemma3", "static"),
    ("paligemma2", "eager"),
    ("paligemma", "eager"),
    ("paligemma", "static"),
]


@pytest.mark.parametrize("family, path", GEMMA_FAMILY, ids=[f"{family}-{path}" for family, path in GEMMA_FAMILY])
def test_batched_greedy_on_gemma_family_targets(family, path):
    """Gemma 3 and PaliGemma 2 (a sliding window of 8 slots, shorter than the prompts plus their continuations):
    each row's window counts from its own length, the slot plain batched `generate` gives its tokens (left padding
    included). PaliGemma 1: positions counted from 1, every row's own."""
    from tiny_families import tiny_gemma3, tiny_paligemma, tiny_paligemma2

    build = {
        "gemma3": lambda: tiny_gemma3(scale=16.0, tied=False),  # untied: varied continuations, not repeats
        "paligemma2": lambda: tiny_paligemma2(scale=32.0),
        "paligemma": lambda: tiny_paligemma(scale=32.0),
    }
    target = specvlm_hf.enable(build[family]())
    generator = torch.Generator().manual_seed(4)
    images = (1, 0, 2) if family == "gemma3" else (1, 1, 1)  # PaliGemma: every prompt starts with its image
    rows = [family_inputs(target, generator, images=count, text_tokens=3 + 2 * i) for i, count in enumerate(images)]
    kwargs = dict(do_sample=False, max_new_tokens=16, **PATHS[path])
    greedy_case(target, make_draft(target), rows, [0, 11, 3], kwargs, steps=[None, 5, 1])


@pytest.mark.parametrize("path", list(PATHS))
def test_a_window_counted_from_the_shared_offset_breaks_the_equality(path, monkeypatch):
    """Fault: every row's sliding window counts from the longest row's length (where the trees are written)."""
    from specvlm_hf.adapters import HybridAttentionAdapter
    from tiny_families import tiny_gemma3

    target = specvlm_hf.enable(tiny_gemma3(scale=16.0, tied=False))  # untied: varied continuations, not repeats
    generator = torch.Generator().manual_seed(4)
    rows = [family_inputs(target, generator, images=count, text_tokens=3 + 2 * i) for i, count in enumerate((1, 0, 2))]
    batch = left_pad(rows, [0, 11, 3])
    kwargs = dict(do_sample=False, max_new_tokens=16, min_new_tokens=16, **PATHS[path])
    plain = target.generate(**batch, **kwargs)
    original = HybridAttentionAdapter.verify_mask

    def shared_offset(self, visible, depths, cache_length):
        if torch.is_tensor(cache_length) and cache_length.dim() == 1:
            cache_length = cache_length.max().expand(cache_length.shape[0])
        return original(self, visible, depths, cache_length)

    monkeypatch.setattr(HybridAttentionAdapter, "verify_mask", shared_offset)
    assert target.generate(**batch, **kwargs, assistant_model=make_draft(target)).tolist() != plain.tolist()


@pytest.mark.parametrize("path", list(PATHS))
def test_identical_rows_give_identical_outputs_and_permuted_rows_permuted_outputs(llava, path):
    generator = torch.Generator().manual_seed(5)
    rows = [llava_row(llava, generator, count, 4) for count in (1, 0, 2)]
    draft = make_draft(llava)
    kwargs = dict(do_sample=False, max_new_tokens=12, **PATHS[path])
    same = left_pad([rows[0], rows[0], rows[0]], [0, 0, 0])
    out = llava.generate(**same, **kwargs, assistant_model=draft)
    assert out[0].tolist() == out[1].tolist() == out[2].tolist()
    forward = llava.generate(**left_pad(rows, [0, 0, 0]), **kwargs, assistant_model=draft)
    order = [2, 0, 1]
    permuted = llava.generate(**left_pad([rows[i] for i in order], [0, 0, 0]), **kwargs, assistant_model=draft)
    assert permuted.tolist() == forward[order].tolist()


@pytest.mark.parametrize("path", list(PATHS))
def test_stop_strings_rows_keep_decoding_as_plain_generate_does(llava, path):
    """Without an EOS criterion, plain `generate` keeps decoding a row that hit a stop string until all stop."""
    from test_generate_contract import piece_tokenizer

    tokenizer = piece_tokenizer(llava.config.text_config.vocab_size)
    generator = torch.Generator().manual_seed(9)
    rows = [llava_row(llava, generator, 1, 3 + i) for i in range(3)]
    batch = left_pad(rows, [0, 3, 0])
    full = llava.generate(**batch, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    stop = tokenizer.decode(full[1, -20:].tolist()[5:7])[1:]
    kwargs = dict(max_new_tokens=20, do_sample=False, stop_strings=[stop], tokenizer=tokenizer, eos_token_id=None)
    kwargs.update(PATHS[path])
    llava.generation_config.eos_token_id = None
    try:
        greedy_case(llava, make_draft(llava), rows, [0, 3, 0], kwargs, alone=False)
    finally:
        llava.generation_config.eos_token_id = 2


class RecordingStreamer:
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("path", list(PATHS))
def test_the_streamer_gets_the_steps_plain_batched_generate_gives(llava, path):
    generator = torch.Generator().manual_seed(2)
    rows = [llava_row(llava, generator, 1, 3 + i) for i in range(3)]
    batch = left_pad(rows, [0, 2, 5])
    kwargs = dict(do_sample=False, max_new_tokens=10, **PATHS[path])
    kwargs["eos_token_id"] = ragged_eos(llava, batch, kwargs, [3, None, 7])
    plain, spec = RecordingStreamer(), RecordingStreamer()
    llava.generate(**batch, **kwargs, streamer=plain)
    llava.generate(**batch, **kwargs, streamer=spec, assistant_model=make_draft(llava))
    assert spec.puts == plain.puts and spec.ended


@pytest.mark.parametrize("path", list(PATHS))
def test_scores_and_logits_follow_plain_batched_generate(llava, path):
    """One `(B, V)` tensor per step, as plain batched `generate` gives: each row's processed scores and raw logits
    while it decodes; after a row's end (plain `generate` scores the pad tokens it feeds), 0 at the pad token and
    -inf elsewhere."""
    generator = torch.Generator().manual_seed(6)
    rows = [llava_row(llava, generator, count, 3 + count) for count in (1, 2, 0)]
    batch = left_pad(rows, [0, 4, 9])
    kwargs = dict(do_sample=False, max_new_tokens=14, min_new_tokens=2, repetition_penalty=1.3, **PATHS[path])
    kwargs["eos_token_id"] = ragged_eos(llava, batch, kwargs, [6, 2, None])
    kwargs.update(return_dict_in_generate=True, output_scores=True, output_logits=True)
    plain = llava.generate(**batch, **kwargs)
    spec = llava.generate(**batch, **kwargs, assistant_model=make_draft(llava))
    assert spec.sequences.tolist() == plain.sequences.tolist()
    assert (
        len(spec.scores)
        == len(plain.scores)
        == len(spec.logits)
        == plain.sequences.shape[1] - batch["input_ids"].shape[1]
    )
    lengths = new_tokens_per_row(plain.sequences, batch["input_ids"].shape[1], kwargs["eos_token_id"])
    assert min(lengths) < len(plain.scores), "a row ends early"
    padding = torch.full((llava.config.text_config.vocab_size,), -float("inf"))
    padding[0] = 0.0
    for step, (mine, theirs, my_logits, their_logits) in enumerate(
        zip(spec.scores, plain.scores, spec.logits, plain.logits)
    ):
        assert mine.shape == theirs.shape and my_logits.shape == their_logits.shape
        for row, length in enumerate(lengths):
            if step >= length:  # after the row's end
                assert torch.equal(mine[row], padding) and torch.equal(my_logits[row], padding)
                continue
            finite = torch.isfinite(theirs[row])
            assert torch.equal(finite, torch.isfinite(mine[row]))
            assert torch.allclose(mine[row][finite], theirs[row][finite], atol=1e-4)
            assert torch.allclose(my_logits[row], their_logits[row], atol=1e-4)
    assert not torch.allclose(spec.scores[1][0], spec.logits[1][0]), "processors applied to the scores only"


# ------------------------------------------------------------------------------------------ smaller batches
def _dropping_rows(llava):
    """8 rows stopping one after the other (EOS list from their continuations), so that 8, then at most 4, 2 and 1
    rows are live."""
    generator = torch.Generator().manual_seed(12)
    rows = [llava_row(llava, generator, index % 3, 2 + index) for index in range(8)]
    extra = [0, 3, 0, 7, 1, 0, 20, 2]
    return rows, extra, [1, 3, 5, 7, 10, 14, 18, None]


def test_the_fast_path_moves_live_rows_to_a_smaller_batch_with_the_same_output(llava):
    """When at most half of the captured rows are live, they continue in the round of the smallest power-of-two
    batch that holds them (graphs per (batch, tree) shape, trees of that batch's size), with the same output."""
    rows, extra, steps = _dropping_rows(llava)
    draft = make_draft(llava)
    draft.config.batch_verify_tokens = 64  # 8 rows: trees of 8 nodes; 4 rows and fewer: 16 (the draft's size)
    kwargs = dict(do_sample=False, max_new_tokens=24, cache_implementation="static")
    _, stats = greedy_case(llava, draft, rows, extra, kwargs, steps, alone=False)
    sizes = stats.rows_per_round
    assert sizes == sorted(sizes, reverse=True) and {8, 4, 2, 1} <= set(sizes), sizes
    shapes = {shape: fast for (_, shape), fast in draft._specvlm_fast_rows.paths.items()}
    assert set(shapes) == {(8, 8), (4, 16), (2, 16), (1, 16)}, "one fast path (buffers, graphs) per (batch, tree)"
    assert all(len(fast.rounds) == 1 for fast in shapes.values()), "moved rows keep the draft cache width"
    before = {key: (fast, *fast.rounds.values()) for key, fast in shapes.items()}
    greedy_case(llava, draft, rows, extra, kwargs, steps, alone=False)
    shapes = {shape: fast for (_, shape), fast in draft._specvlm_fast_rows.paths.items()}
    after = {key: (fast, *fast.rounds.values()) for key, fast in shapes.items()}
    assert all(a is b for key in before for a, b in zip(before[key], after[key])), "a second call reuses them"


def test_moving_rows_to_a_smaller_batch_is_checked_by_the_output(llava, monkeypatch):
    """Fault: the smaller batch takes the rows' caches and states in the wrong order; the output changes."""
    rows, extra, steps = _dropping_rows(llava)
    batch = left_pad(rows, extra)
    kwargs = dict(do_sample=False, max_new_tokens=24, cache_implementation="static")
    kwargs["eos_token_id"] = ragged_eos(llava, batch, kwargs, steps)
    plain = llava.generate(**batch, **kwargs)
    original = round_module.RowsRound._moved
    monkeypatch.setattr(round_module.RowsRound, "_moved", lambda self, held: original(self, held[::-1]))
    draft = make_draft(llava)
    spec = llava.generate(**batch, **kwargs, assistant_model=draft)
    assert 4 in draft.stats.rows_per_round and spec.tolist() != plain.tolist()


# ------------------------------------------------------------------------------------------ fault injections
def _three_rows(llava, path):
    generator = torch.Generator().manual_seed(8)
    rows = [llava_row(llava, generator, count, 3 + 4 * count) for count in (1, 0, 2)]
    return rows, dict(do_sample=False, max_new_tokens=14, **PATHS[path])


def shared_positions(self):
    tree, state = self.tree, self.state
    visible = self.target_window.visible(tree.ancestor_mask)
    positions = tree.depths + (state.root_position[0] + state.position_offset[0])  # row 0's for all
    hidden = self.adapter.verify(
        tree.tokens, tree.depths, visible, positions, self.target_window.length, self.target_window.cache
    )
    return self.adapter.logits(hidden), hidden


def first_rows_path_for_all(self, tree, logits):
    scores, (path, length, next_token) = original_accept(self, tree, logits)
    rows = path.shape[0]
    return scores, (path[:1].expand(rows, -1), length[:1].expand(rows), next_token[:1].expand(rows))


original_accept = decoding_module.RowsDecoding.accept


def every_slot_visible(self, block_mask):
    prefix = torch.ones(block_mask.shape[0], block_mask.shape[1], self.length, dtype=torch.bool)
    return torch.cat([prefix, block_mask], dim=2)


def every_fixed_slot_visible(self, block_mask):
    return torch.ones(*block_mask.shape[:2], self.real.shape[1], dtype=torch.bool)


FAULTS = {
    "rows share positions": (round_module.RowsRound, "_verify", shared_positions),
    "row 0's path for every row": (decoding_module.RowsDecoding, "accept", first_rows_path_for_all),
    "padding and stale slots visible": (kv_cache.RowsWindow, "visible", every_slot_visible),
    "padding and stale slots visible (static)": (kv_cache.FixedRowsWindow, "visible", every_fixed_slot_visible),
}


@pytest.mark.parametrize(
    "path, fault",
    [("eager", name) for name in FAULTS if "static" not in name]
    + [("static", name) for name in FAULTS if name != "padding and stale slots visible"],
)
def test_fault_injections_break_the_equality(llava, monkeypatch, path, fault):
    owner, name, replacement = FAULTS[fault]
    rows, kwargs = _three_rows(llava, path)
    batch = left_pad(rows, [0, 6, 2])
    plain = llava.generate(**batch, **kwargs)
    monkeypatch.setattr(owner, name, replacement)  # before the round is built: it binds its functions then
    spec = llava.generate(**batch, **kwargs, assistant_model=make_draft(llava))
    assert spec.tolist() != plain.tolist()


# ------------------------------------------------------------------------------------------ refusals
def test_what_batches_cannot_do_yet_is_refused_with_the_fix(llava):
    generator = torch.Generator().manual_seed(1)
    batch = left_pad([llava_row(llava, generator, 1, 3), llava_row(llava, generator, 0, 5)], [0, 0])
    draft = make_draft(llava)
    draft.config.decoding_mode = "chain"
    with pytest.raises(ValueError, match="tree mode"):
        llava.generate(**batch, max_new_tokens=4, assistant_model=draft)


# ------------------------------------------------------------------------------------------ sampling
SAMPLES = 300  # per row


def share_random_draws_within_pairs(monkeypatch):
    """Fault: the two rows of each pair (rows 2i, 2i + 1) accept with the same random numbers. Each row alone
    still samples its own distribution; the two rows are no longer independent."""
    from specvlm_hf.decoding import processed_scores, sampling_path

    def accept(self, tree, logits):
        seeds = torch.randint(2**62, (len(self.rows) // 2 + 1,)).tolist()
        scores, paths = [], []
        for index, row in enumerate(self.live):
            row_scores = processed_scores(tree.row(index), self.rows[row], logits[index], self.row_processors[row])
            scores.append(row_scores)
            draws = torch.Generator().manual_seed(seeds[row // 2])
            paths.append(sampling_path(tree.row(index), torch.softmax(row_scores, dim=-1), draws))
        return scores, tuple(torch.stack(parts) for parts in zip(*paths))

    monkeypatch.setattr(decoding_module.RowsDecoding, "accept", accept)


def _sampling_batches(path: str = "eager", fault=None, monkeypatch=None):
    """(plain, speculative) batches of `SAMPLES` pairs of rows (A with an image, B without, left-padded), their
    first 3 sampled tokens as `(rows, 2, 3)` lists. The first token comes from the prefill, the second and third
    from speculative rounds. `fault(monkeypatch)` breaks the speculative run."""
    target = specvlm_hf.enable(tiny_llava(seed=0, scale=8.0, vocab=12))
    generator = torch.Generator().manual_seed(0)
    rows = [random_inputs(target, generator, text_tokens=4), random_inputs(target, generator, 3, image=False)]
    pair = left_pad(rows, [0, 2])
    start = pair["input_ids"].shape[1]
    kwargs = dict(do_sample=True, max_new_tokens=3, min_new_tokens=3, temperature=1.0, **PATHS[path])

    def repeated(copies):
        return {
            key: value.repeat(copies, *([1] * (value.dim() - 1)))
            if key != "pixel_values"
            else value.repeat(copies, 1, 1, 1)
            for key, value in pair.items()
        }

    torch.manual_seed(0)
    plain = target.generate(**repeated(SAMPLES), **kwargs)[:, start:].reshape(SAMPLES, 2, 3).tolist()
    if fault is not None:
        fault(monkeypatch)
    draft = make_draft(target, noise=0.0)
    draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = 4, 3, 20
    draft.config.batch_verify_tokens = 10**6  # 200 rows a call: keep speculating (the batch rule would stop it)
    draft.config.max_speculative_batch = 10**6
    speculative, sigmas = [], []
    for _ in range(SAMPLES // 100):
        out = target.generate(**repeated(100), **kwargs, assistant_model=draft)
        speculative += out[:, start:].reshape(100, 2, 3).tolist()
        sigmas.append(draft.stats.sigma)
    return plain, speculative, sum(sigmas) / len(sigmas)


def _p_values(plain, speculative) -> dict:
    """p-values of chi-square tests against plain batched sampling: each row's three tokens (`0`, `1`), and the two
    rows' round tokens together (`"joint"`: for the second and third token of each row, whether it is that row's
    most frequent plain token at that step; 16 outcomes, so that 300 pairs show a dependence between rows).
    The first token of all comes from the prefill, not from a round, and is left out of the joint."""
    import collections

    from test_lossless_sampling import chi_square_p_value

    out = {
        row: chi_square_p_value([tuple(s[row]) for s in plain], [tuple(s[row]) for s in speculative]) for row in (0, 1)
    }
    steps = [(row, step) for row in (0, 1) for step in (1, 2)]
    mode = {key: collections.Counter(s[key[0]][key[1]] for s in plain).most_common(1)[0][0] for key in steps}

    def joint(samples):
        return [tuple(s[row][step] == mode[row, step] for row, step in steps) for s in samples]

    out["joint"] = chi_square_p_value(joint(plain), joint(speculative))
    return out


@pytest.mark.parametrize("path", list(PATHS))
def test_batched_sampling_keeps_each_rows_distribution_and_their_joint(path):
    from test_lossless_sampling import P_THRESHOLD

    plain, speculative, sigma = _sampling_batches(path)
    assert sigma > 1.2, "the draft must get tokens accepted for the test to mean anything"
    assert min(_p_values(plain, speculative).values()) > P_THRESHOLD


def test_the_batched_sampling_tests_catch_a_broken_acceptance_rule(monkeypatch):
    from test_lossless_sampling import P_THRESHOLD, break_acceptance_rule

    p_values = _p_values(*_sampling_batches(fault=break_acceptance_rule, monkeypatch=monkeypatch)[:2])
    assert min(p_values[0], p_values[1]) < P_THRESHOLD and p_values["joint"] < P_THRESHOLD


def test_the_joint_test_catches_rows_sharing_random_draws(monkeypatch):
    """Rows drawing the same random numbers keep each row's distribution (the per-row tests pass) but not their
    independence: only the joint test fails."""
    from test_lossless_sampling import P_THRESHOLD

    p_values = _p_values(*_sampling_batches(fault=share_random_draws_within_pairs, monkeypatch=monkeypatch)[:2])
    assert min(p_values[0], p_values[1]) > P_THRESHOLD and p_values["joint"] < P_THRESHOLD


# ------------------------------------------------------------------------------------------ tree size against batch
def test_trees_shrink_with_the_batch_and_speculation_stops_where_it_would_not_pay(llava):
    from specvlm_hf.decoding import tree_tokens_for_batch

    draft = make_draft(llava)
    draft.config.tree_total_tokens = 60
    del draft.config.max_speculative_batch  # the default: batches above 8 rows run generate's own loop
    sizes = {batch: tree_tokens_for_batch(draft.config, batch) for batch in (1, 2, 4, 8, 9, 16)}
    assert sizes == {1: 60, 2: 60, 4: 60, 8: 32, 9: None, 16: None}
    draft.config.max_speculative_batch = 64
    sizes = {batch: tree_tokens_for_batch(draft.config, batch) for batch in (1, 2, 4, 8, 16, 32, 64)}
    assert sizes == {1: 60, 2: 60, 4: 60, 8: 32, 16: 16, 32: 8, 64: None}

    generator = torch.Generator().manual_seed(4)
    batch = left_pad([llava_row(llava, generator, 1, 3), llava_row(llava, generator, 0, 6)], [0, 0])
    kwargs = dict(do_sample=False, max_new_tokens=8)
    plain = llava.generate(**batch, **kwargs)
    draft.config.batch_verify_tokens = 20  # 10 nodes per row: speculation on, smaller trees
    assert llava.generate(**batch, **kwargs, assistant_model=draft).tolist() == plain.tolist()
    assert draft.stats.mode == "tree" and draft.stats.rounds > 0
    draft.config.batch_verify_tokens = 12  # 6 nodes per row: below the minimum, generate's own loop
    assert llava.generate(**batch, **kwargs, assistant_model=draft).tolist() == plain.tolist()
    assert draft.stats.mode == "plain" and draft.stats.rounds == 0


@pytest.mark.parametrize("path", list(PATHS))
def test_batched_greedy_on_llava_next_with_a_compressing_draft(path):
    """LLaVA-NeXT: each row's AnyRes layout comes from its own `image_sizes` entry (rows without an image skip one)."""
    from tiny_models import tiny_llava_next

    target = specvlm_hf.enable(tiny_llava_next(scale=32.0))
    generator = torch.Generator().manual_seed(1)
    rows = [random_inputs(target, generator, text_tokens=3 + 2 * i, image=i != 1) for i in range(3)]
    draft = make_draft(target, compressor={"mode": "fixed", "fixed": "pool@4"})
    kwargs = dict(do_sample=False, max_new_tokens=12, **PATHS[path])
    _, stats = greedy_case(target, draft, rows, [0, 5, 2], kwargs, steps=[None, 3, 0])
    assert stats.draft_visual_tokens < stats.target_visual_tokens


# ------------------------------------------------------------------------------------------ draft forwards per round
@pytest.mark.parametrize("path", list(PATHS))
def test_draft_forwards_per_round_do_not_grow_with_the_batch(llava, path):
    """The draft runs one forward for every row's prefill, one per tree level and one for the catch-up, whatever the
    batch size: a call of 4 rows (stopping at different rounds) runs `1 + rounds * (depth + 1)` draft forwards, as a
    call of one row does (a draft drafting each row on its own ran that many per row)."""
    generator = torch.Generator().manual_seed(6)
    rows = [llava_row(llava, generator, index % 3, 3 + index) for index in range(4)]
    draft = make_draft(llava)
    calls = []
    decode = draft.decode

    def counting(fused, *args, **kwargs):
        calls.append(fused.shape[0])  # the rows of the forward
        return decode(fused, *args, **kwargs)

    draft.decode = counting
    kwargs = dict(do_sample=False, max_new_tokens=12, **PATHS[path])
    forwards = {}
    for size in (1, 4):
        batch = left_pad(rows[:size], [0, 5, 0, 2][:size])
        if size > 1:  # rows stop at different rounds (the first on its first token)
            kwargs["eos_token_id"] = ragged_eos(llava, batch, kwargs, [0, 4, 7, None])
        calls.clear()
        spec = llava.generate(**batch, **kwargs, assistant_model=draft)
        assert spec.tolist() == llava.generate(**batch, **kwargs).tolist()
        assert draft.stats.rounds > 2
        assert len(calls) == 1 + draft.stats.rounds * (draft.config.tree_depth + 1), (size, len(calls))
        forwards[size] = (len(calls) - 1) / draft.stats.rounds
    assert forwards[1] == forwards[4] == draft.config.tree_depth + 1
    assert max(calls) > 1, "the batch's rows share each forward"
