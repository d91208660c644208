"""Random exactness campaign: greedy SpecVLM decoding against plain `generate`, tokens and raw logits, over random
combinations of what the fixed tests try one at a time (fp32, CPU).

Each case draws a target family (every verified one, three seeds each; videos on the video families), a decoding
mode (tree, the static-cache fast path, chain), a draft (oracle, noisy oracle, fresh; sometimes a compressing one, a
reduced vocabulary or two layers), a tree shape, a prompt (0-2 images, 1-12 text tokens; sometimes a left-padded
batch of 2-3 rows), a token budget, logits processors (min_new_tokens, repetition_penalty, no_repeat_ngram_size,
suppressed and bad words, sequence bias, length penalty, forced EOS), extra end-of-sequence tokens, and on the fast
path sometimes the split-KV verify kernel, and with `--compiled-share P` a share P of the fast-path cases compiled
(`aot_eager` after `merge_repeated` and, with the weights laid out for it, `join_adjacent_products`: the graph pass
inductor runs first on a GPU, with `round.JOIN_PROJECTIONS` on). Plain `generate` is the
reference: the same tokens, and the same raw logits and processed scores while a row decodes (rows that have ended
hold padding logits by design).

    python tests/exactness_campaign.py --seconds 600 --seed 7     # prints failures; exit status 1 if any
    python tests/exactness_campaign.py --seconds 600 --compiled-share 1   # every fast-path case compiled (slower)

`tests/test_exactness_campaign.py` runs a fixed-seed slice of it in the suite.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import specvlm_hf  # noqa: E402
from family_checks import make_draft  # noqa: E402
from test_batched import left_pad  # noqa: E402
from tiny_families import FAMILIES, family_inputs  # noqa: E402
from tiny_families_more import FAMILIES_MORE, family_inputs_more  # noqa: E402
from tiny_models import random_inputs, tiny_llava, tiny_llava_next  # noqa: E402
from tiny_video import VIDEO_FAMILIES, video_inputs  # noqa: E402

LOGIT_TOLERANCE = 1e-4


def _llava_inputs(model, generator, images: int = 1, text_tokens: int = 6) -> dict:
    return random_inputs(model, generator, text_tokens=text_tokens, image=images > 0)


def _video_inputs(model, generator, images: int = 1, text_tokens: int = 6) -> dict:
    """A video of 2 or 4 frames, after an image when `images` > 0."""
    frames = 2 * int(torch.randint(1, 3, (1,), generator=generator))
    return video_inputs(model, generator, frames=frames, image=images > 0, text_tokens=text_tokens)


# name: (builder taking a seed, prompt maker taking (model, generator, images=, text_tokens=))
BUILDERS = {
    "llava": (lambda seed: tiny_llava(seed=seed, scale=16.0), _llava_inputs),
    "llava-gqa-tied": (lambda seed: tiny_llava(seed=seed, scale=16.0, gqa=True, tied=True), _llava_inputs),
    "llava-eager": (lambda seed: tiny_llava(seed=seed, scale=16.0, attn="eager"), _llava_inputs),
    "llava_next": (lambda seed: tiny_llava_next(seed=seed, scale=16.0), _llava_inputs),
    **{name: (lambda seed, build=build: build(seed=seed), family_inputs) for name, build in FAMILIES.items()},
    **{
        name: (lambda seed, build=build: build(seed=seed), family_inputs_more) for name, build in FAMILIES_MORE.items()
    },
    **{
        f"video-{name}": (lambda seed, build=build: build(seed=seed), _video_inputs)
        for name, build in VIDEO_FAMILIES.items()
    },
}
NO_STATIC = {"paligemma2"}  # refused with a clear error (transformers' own static `generate` fails on it)


@dataclass
class Case:
    family: str
    seed: int
    mode: str
    draft_kind: str
    tree: tuple[int, int, int]
    rows: int
    images: list[int]
    generate_kwargs: dict
    draft_overrides: dict = field(default_factory=dict)
    draft_vocab: int | None = None
    split_kv: bool = False
    prompt_seed: int = 0
    compiled: bool = False


def draw_case(rng: random.Random, compiled_share: float = 0.0) -> Case:
    family = rng.choice(sorted(BUILDERS))
    modes = ["tree", "chain"] + ([] if family in NO_STATIC else ["static"])
    mode = rng.choice(modes)
    top_k, depth = rng.randint(1, 6), rng.randint(1, 5)
    rows = 1 if mode == "chain" or rng.random() < 0.7 else rng.randint(2, 3)
    new_tokens = rng.randint(1, 24)
    kwargs: dict = {"max_new_tokens": new_tokens}
    if rng.random() < 0.5:
        kwargs["min_new_tokens"] = rng.randint(0, new_tokens)
    if rng.random() < 0.3:
        kwargs["repetition_penalty"] = rng.choice([1.1, 1.5])
    if rng.random() < 0.2:
        kwargs["no_repeat_ngram_size"] = rng.choice([2, 3])
    if rng.random() < 0.3:
        kwargs["extra_eos"] = rng.sample(range(3, 60), 2)  # ragged stops (turned into eos_token_id later)
    a, b, c = rng.sample(range(3, 60), 3)
    for name, value in (
        ("suppress_tokens", [a, b]),
        ("bad_words_ids", [[a], [b, c]]),
        ("sequence_bias", [[[a], 2.0], [[b, c], -3.0]]),
        ("exponential_decay_length_penalty", (rng.randint(1, 6), 1.3)),
        ("forced_eos_token_id", 2),
    ):
        if rng.random() < 0.08:
            kwargs[name] = value
    if rng.random() < 0.2:  # the sampling path, with one-token distributions: its output is the greedy one
        kwargs.update(do_sample=True, top_k=1, temperature=rng.choice([0.7, 1.0, 1.3]))
        if "min_new_tokens" in kwargs:  # with the length penalty, EOS's -inf becomes NaN: plain sampling raises
            kwargs.pop("exponential_decay_length_penalty", None)
    kind = rng.choice(["oracle", "noisy", "fresh"])
    overrides: dict = {}
    if rng.random() < 0.25:
        branches = ["pool@2", "pool@4"] + (["tpool@2", "frames@2"] if family.startswith("video-") else [])
        overrides["compressor"] = {"mode": "fixed", "fixed": rng.choice(branches)}
    if kind == "fresh" and rng.random() < 0.3:
        overrides["num_draft_layers"] = 2
    case = Case(
        family=family,
        seed=rng.randrange(3),
        mode=mode,
        draft_kind=kind,
        tree=(top_k, depth, rng.randint(2, min(40, 1 + top_k * depth))),
        rows=rows,
        images=[rng.choice([0, 1, 1, 2]) if rows == 1 else rng.choice([0, 1]) for _ in range(rows)],
        generate_kwargs=kwargs,
        draft_overrides=overrides,
        draft_vocab=rng.choice([None, None, None, 24]),
        split_kv=mode == "static" and rng.random() < 0.3,
        prompt_seed=rng.randrange(10**6),
    )
    if mode == "static" and compiled_share > 0:  # drawn last, and not at share 0: the same cases as without it
        case.compiled = rng.random() < compiled_share
    return case


@contextmanager
def split_kv_verify():
    """The fast path's verify forwards on the split-KV kernel, in 16-slot chunks (several per cache)."""
    from specvlm_hf import round as round_module, verify_attention

    saved = round_module.VERIFY_ATTENTION, verify_attention.CHUNK
    round_module.VERIFY_ATTENTION, verify_attention.CHUNK = "specvlm_split_kv", 16
    try:
        yield
    finally:
        round_module.VERIFY_ATTENTION, verify_attention.CHUNK = saved


@contextmanager
def compiled_fast_path(enabled: bool):
    """The fast path's round functions compiled on the CPU as on a GPU, minus code generation: traced whole, the
    functional graph run by `aot_eager` after `merge_repeated` and `join_adjacent_products` (projection weights laid
    out for joined products: `round.JOIN_PROJECTIONS`; no CUDA graphs)."""
    if not enabled:
        yield
        return
    import torch._dynamo

    from specvlm_hf import decoding, round as round_module
    from specvlm_hf.hf_internals import aot_eager_merging_backend

    saved = round_module.COMPILE_OPTIONS, decoding.fast_path_options, round_module.JOIN_PROJECTIONS
    round_module.COMPILE_OPTIONS = {"dynamic": False, "backend": aot_eager_merging_backend(None, [])}
    decoding.fast_path_options = lambda *args, **kwargs: (False, True)
    round_module.JOIN_PROJECTIONS = True
    torch._dynamo.reset()
    try:
        yield
    finally:
        round_module.COMPILE_OPTIONS, decoding.fast_path_options, round_module.JOIN_PROJECTIONS = saved
        torch._dynamo.reset()


class PlainGenerateFailed(Exception):
    """Plain `generate` itself failed on the case: there is nothing to compare with (the case is skipped)."""


def run_case(case: Case, targets: dict) -> str | None:
    """None when the case equals plain `generate`; otherwise what differed. Raises what decoding raised."""
    build, make_inputs = BUILDERS[case.family]
    if (case.family, case.seed) not in targets:
        targets[(case.family, case.seed)] = specvlm_hf.enable(build(case.seed))
    target = targets[(case.family, case.seed)]
    rng = random.Random(case.prompt_seed)
    generator = torch.Generator().manual_seed(case.prompt_seed)
    prompts = [make_inputs(target, generator, images=n, text_tokens=rng.randint(1, 12)) for n in case.images]
    if case.rows == 1:
        inputs = prompts[0]
    else:
        try:
            inputs = left_pad(prompts, [rng.choice([0, 0, 3, 20]) for _ in prompts])
            for key in {key for prompt in prompts for key in prompt} - set(inputs):  # video inputs, in row order
                inputs[key] = torch.cat([prompt[key] for prompt in prompts if key in prompt])
        except RuntimeError:  # images of different sizes cannot share one pixel tensor: one row instead
            inputs = prompts[0]
    overrides = dict(case.draft_overrides)
    vocab = target.config.get_text_config().vocab_size
    if case.draft_vocab is not None:
        overrides["draft_vocab_size"] = min(case.draft_vocab, vocab - 1)
    draft = make_draft(target, case.draft_kind, case.mode, **overrides)
    if case.draft_vocab is not None:
        draft.set_draft_vocab(sorted(rng.sample(range(vocab), overrides["draft_vocab_size"])))
    if case.mode != "chain":
        draft.config.tree_top_k, draft.config.tree_depth, draft.config.tree_total_tokens = case.tree
    kwargs = {"do_sample": False, **case.generate_kwargs}
    eos = target.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    eos += kwargs.pop("extra_eos", [])
    kwargs.update(eos_token_id=eos, return_dict_in_generate=True, output_logits=True, output_scores=True)
    fast = {"cache_implementation": "static"} if case.mode == "static" else {}
    try:
        reference = target.generate(**inputs, **kwargs)
    except RuntimeError as error:  # e.g. two processors make a NaN that plain sampling itself cannot draw from
        raise PlainGenerateFailed(str(error)) from error
    with compiled_fast_path(case.compiled):
        if case.split_kv:
            with split_kv_verify():
                speculative = target.generate(**inputs, **kwargs, **fast, assistant_model=draft)
        else:
            speculative = target.generate(**inputs, **kwargs, **fast, assistant_model=draft)
    if speculative.sequences.tolist() != reference.sequences.tolist():
        return f"tokens differ:\n  plain {reference.sequences.tolist()}\n  spec  {speculative.sequences.tolist()}"
    if len(speculative.logits) != len(reference.logits):
        return f"{len(speculative.logits)} logits steps against {len(reference.logits)}"
    start = inputs["input_ids"].shape[1]
    ends = []  # the step of each row's end-of-sequence token (rows hold padding logits after it)
    for row in reference.sequences[:, start:].tolist():
        hits = [step for step, token in enumerate(row) if token in eos]
        ends.append(hits[0] if hits else len(row))
    for what, mine_steps, their_steps in (
        ("logits", speculative.logits, reference.logits),
        ("scores", speculative.scores, reference.scores),
    ):
        for step, (mine, theirs) in enumerate(zip(mine_steps, their_steps)):
            live = [row for row, end in enumerate(ends) if step <= end]
            if not live:
                continue
            mine, theirs = mine[live], theirs[live]
            finite = torch.isfinite(theirs)
            odd_mine, odd_theirs = mine[~finite], theirs[~finite]  # -inf, and NaN where processors combine them
            if not torch.equal(finite, torch.isfinite(mine)) or not torch.allclose(
                odd_mine, odd_theirs, equal_nan=True
            ):
                return f"{what}: other tokens masked at step {step}"
            worst = float((mine[finite] - theirs[finite]).abs().max()) if finite.any() else 0.0
            if not worst <= LOGIT_TOLERANCE:
                return f"{what} differ by {worst:.3g} at step {step}"
    return None


def campaign(
    seed: int, cases: int | None = None, seconds: float | None = None, log=print, compiled_share: float = 0.0
) -> list[tuple]:
    """Runs cases drawn from `seed` until `cases` ran or `seconds` passed; returns `(case, what differed)` failures
    (an exception counts, with its traceback)."""
    torch.set_num_threads(1)
    rng, targets, failures = random.Random(seed), {}, []
    deadline = None if seconds is None else time.monotonic() + seconds
    done = skipped = compiled = 0
    while (cases is None or done < cases) and (deadline is None or time.monotonic() < deadline):
        case = draw_case(rng, compiled_share)
        try:
            problem = run_case(case, targets)
        except PlainGenerateFailed:
            skipped += 1
            continue
        except Exception:  # noqa: BLE001 - every exception is a finding here
            problem = traceback.format_exc(limit=6)
        done += 1
        compiled += case.compiled
        if problem is not None:
            failures.append((case, problem))
            log(f"FAILED {case}\n{problem}")
        if done % 50 == 0:
            log(f"{done} cases, {len(failures)} failed")
    log(
        f"{done} cases ({compiled} compiled), {len(failures)} failed ({skipped} skipped: plain `generate` itself "
        "failed on them)"
    )
    return failures


def main() -> int:
    import warnings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--cases", type=int, default=None)
    parser.add_argument(
        "--compiled-share", type=float, default=0.0, help="the share of fast-path cases compiled (see above)"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # the low-acceptance warning of fresh drafts, on every other case
    failures = campaign(
        args.seed,
        cases=args.cases,
        seconds=args.seconds,
        log=lambda line: print(line, flush=True),
        compiled_share=args.compiled_share,
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
