"""CPU timing of batched tree decoding's rounds against the batch size, on the tiny LLaVA of the tests.

Prints ms per round (the whole round, and its draft part: tree levels plus catch-up) and draft forwards per round
at B = 1, 2, 4, 8 rows, on the eager and the static (fast) path, the trees fixed at one size for every batch
(`batch_verify_tokens` raised so that the batch rule does not shrink them) and every row decoding to
`max_new_tokens` (no EOS). The outputs are checked against plain batched `generate`. Run it against two checkouts
to compare them (the package is imported from `PYTHONPATH`):

    PYTHONPATH=/path/to/checkout python benchmarks/cpu_batched_draft.py [--repeats 3] [--threads 1]

A tiny random model on a CPU measures launch and bookkeeping overheads, not a GPU's: it shows how a round's cost
grows with B, not what an H200 does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # tiny_models (the package itself comes from PYTHONPATH)

import torch  # noqa: E402

import specvlm_hf  # noqa: E402
from tiny_models import oracle_draft, random_inputs, tiny_llava  # noqa: E402

TREE = dict(tree_top_k=8, tree_depth=6, tree_total_tokens=48)


def batch_of(target, rows: int) -> dict:
    """`rows` prompts (every other one with an image), left-padded to one width."""
    generator = torch.Generator().manual_seed(rows)
    prompts = [random_inputs(target, generator, text_tokens=4 + 3 * row, image=row % 2 == 0) for row in range(rows)]
    width = max(p["input_ids"].shape[1] for p in prompts)
    ids = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        n = prompt["input_ids"].shape[1]
        ids[row, width - n :] = prompt["input_ids"][0]
        mask[row, width - n :] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    images = [p["pixel_values"] for p in prompts if "pixel_values" in p]
    if images:
        batch["pixel_values"] = torch.cat(images)
    return batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)  # as tests/conftest.py: no OpenMP spin-waits
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"specvlm_hf from {os.path.dirname(specvlm_hf.__file__)}; torch {torch.__version__}, {args.threads} threads")
    target = specvlm_hf.enable(tiny_llava(scale=32.0))
    draft = oracle_draft(target, noise=0.003)
    for key, value in TREE.items():
        setattr(draft.config, key, value)
    draft.config.max_speculative_batch = 64
    draft.config.batch_verify_tokens = 10**6  # trees of `tree_total_tokens` nodes at every batch size
    calls = []
    decode = draft.decode

    def counting(fused, *rest, **kwargs):
        calls.append(1)
        return decode(fused, *rest, **kwargs)

    draft.decode = counting
    kwargs = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, eos_token_id=None)
    print(f"tree {TREE}, {args.new_tokens} new tokens per row, best of {args.repeats} calls after a warm-up")
    columns = ("ms/round", "draft ms/round", "draft fwd/round", "rounds", "sigma")
    print(f"{'path':7} {'B':>2} " + " ".join(f"{name:>{width}}" for name, width in zip(columns, (9, 15, 16, 7, 6))))
    with torch.inference_mode():
        for path, options in (("eager", {}), ("static", {"cache_implementation": "static"})):
            for rows in (1, 2, 4, 8):
                batch = batch_of(target, rows)
                plain = target.generate(**batch, **kwargs)
                best = None
                for attempt in range(args.repeats + 1):
                    calls.clear()
                    start = time.perf_counter()
                    out = target.generate(**batch, **kwargs, **options, assistant_model=draft)
                    seconds = time.perf_counter() - start
                    assert out.tolist() == plain.tolist(), (path, rows)
                    stats = draft.stats
                    # the rounds: the call's time less the target's prefill (the draft's prefill, one forward
                    # before the first round, is part of draft_seconds: a small share over the rounds)
                    result = (
                        1000 * (stats.draft_seconds + stats.verify_seconds) / stats.rounds,
                        1000 * stats.draft_seconds / stats.rounds,
                        (len(calls) - 1) / stats.rounds,
                        stats.rounds,
                        stats.sigma,
                        seconds,
                    )
                    if attempt and (best is None or result[0] < best[0]):
                        best = result
                ms, draft_ms, forwards, rounds, sigma, _ = best
                print(f"{path:7} {rows:>2} {ms:>9.2f} {draft_ms:>15.2f} {forwards:>16.1f} {rounds:>7} {sigma:>6.2f}")


if __name__ == "__main__":
    main()
