"""Acceptance of a draft on the built-in mini VLM's held-out prompts, shared by the CPU acceptance benchmarks
(`cpu_restricted_vocab.py`, `cpu_fp8_draft.py`)."""

from __future__ import annotations

import json
import os

from specvlm_hf.bench import software_versions
from specvlm_hf.mini import DRAFT_DIR


def add_arguments(parser) -> None:
    """The options both benchmarks take: held-out prompts, new tokens, the draft folder, the JSON output."""
    parser.add_argument("--prompts", type=int, default=24, help="held-out prompts measured")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--draft", default=str(DRAFT_DIR), help="a trained draft folder of the mini VLM")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")


def held_out_acceptance(target, draft, held_out, references, new_tokens: int) -> dict:
    """Greedy tree decoding of each held-out prompt with `draft`: sigma (tokens per target forward over all rounds),
    the rounds, and how many outputs equal plain `generate`'s `references`."""
    accepted, equal = [], 0
    for inputs, reference in zip(held_out, references):
        output = target.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, assistant_model=draft)
        equal += output.tolist() == reference.tolist()
        accepted += draft.stats.accepted_per_round
    return {
        "sigma": sum(accepted) / len(accepted),
        "rounds": len(accepted),
        "outputs_equal_plain": f"{equal}/{len(held_out)}",
    }


def write_report(path: str | None, machine: str, draft_dir: str, rows: list, **fields) -> None:
    """The figures as JSON at `path` (nothing when None): software versions, the machine, the mini target, the draft
    folder (relative to the repository), `fields`, and the rows."""
    if not path:
        return
    report = {
        **software_versions(),
        "machine": machine,
        "target": "built-in mini VLM (LLaVA, vocabulary 4096), fp32",
        "draft": os.path.relpath(draft_dir, os.path.join(os.path.dirname(__file__), "..")),
        **fields,
        "rows": rows,
    }
    with open(path, "w") as handle:
        json.dump(report, handle, indent=1)
