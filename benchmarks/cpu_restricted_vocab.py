"""What a restricted draft vocabulary costs in acceptance, on the built-in mini VLM with its shipped trained drafts.

`SpecVLMDraftModel.restrict_vocab(ids)` makes a trained full-vocabulary draft score only `ids`, without retraining:
each tree level then reads only their rows of the target's `lm_head` (issue 13: with a 32k vocabulary the `lm_head` is
the draft's largest GEMM, and its top-k reads every id; an 8192-id draft cut a 7B round's draft by 0.4-0.7 ms).
The ids are the most frequent tokens of the target's greedy answers on calibration prompts (a data seed of their
own, as `specvlm bench --restrict-vocab N` chooses them), plus EOS. This script measures, on held-out prompts (the
seed `specvlm bench` uses): how many of the target's answer tokens the kept ids cover, the draft's acceptance
(sigma, tokens per target forward) in tree mode, and that every output still equals plain `generate`. The mini
VLM's vocabulary has 4096 ids, so the sizes are fractions of it (a quarter of it matches 8192 of LLaVA's 32064).

    python benchmarks/cpu_restricted_vocab.py --calibration 256 --prompts 64 --new-tokens 96 \
        --sizes 4096,2048,1024,512,256,128 --out results/cpu_restricted_vocab.json   # ~6 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import specvlm_hf  # noqa: E402
from specvlm_hf import SpecVLMDraftModel  # noqa: E402
from specvlm_hf.bench import eos_ids  # noqa: E402
from specvlm_hf.commands.bench import _mini_cases, calibration_counts  # noqa: E402
from specvlm_hf.draft_vocab import choose_draft_vocab  # noqa: E402
from specvlm_hf.mini import load  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mini_acceptance import add_arguments, held_out_acceptance, write_report  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4096,2048,1024,512,256", help="draft vocabulary sizes (4096: all)")
    parser.add_argument("--calibration", type=int, default=64, help="prompts whose answers choose the ids")
    add_arguments(parser)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    target, processor = load()
    specvlm_hf.enable(target)
    draft = SpecVLMDraftModel.from_pretrained(args.draft).bind_target(target).eval()
    draft.config.decoding_mode = "tree"
    vocab = target.config.get_text_config().vocab_size
    eos = eos_ids(target)

    start = time.perf_counter()
    counts = calibration_counts(target, processor, args.calibration, args.new_tokens, "cpu", torch.float32)
    held_out = _mini_cases(processor, args.prompts, "cpu", torch.float32)
    references = [target.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False) for inputs in held_out]
    held_out_tokens = torch.cat([r[0, c["input_ids"].shape[1] :] for r, c in zip(references, held_out)])
    print(f"calibration and references: {time.perf_counter() - start:.0f} s", flush=True)

    rows = []
    print("| kept ids | share of the vocabulary | held-out answer tokens covered | sigma | outputs equal plain |")
    print("|---|---|---|---|---|")
    for size in [int(s) for s in args.sizes.split(",")]:
        draft.restrict_vocab(None if size >= vocab else choose_draft_vocab(counts, size, always=eos))
        kept = set(range(vocab)) if draft.draft_vocab is None else set(draft.draft_vocab.tolist())
        covered = sum(int(t) in kept for t in held_out_tokens.tolist()) / held_out_tokens.numel()
        row = {
            "kept_ids": min(size, vocab),
            "share_of_vocabulary": min(size, vocab) / vocab,
            "held_out_tokens_covered": covered,
            **held_out_acceptance(target, draft, held_out, references, args.new_tokens),
        }
        rows.append(row)
        print(
            f"| {row['kept_ids']} | {row['share_of_vocabulary']:.3f} | {covered:.4f} | {row['sigma']:.3f} "
            f"| {row['outputs_equal_plain']} |",
            flush=True,
        )
    write_report(
        args.out,
        "CPU (tree mode, eager: acceptance only, no timing)",
        args.draft,
        rows,
        calibration_prompts=args.calibration,
        held_out_prompts=args.prompts,
        new_tokens=args.new_tokens,
        held_out_answer_tokens=held_out_tokens.numel(),
    )


if __name__ == "__main__":
    main()
