"""A reduced draft vocabulary: the target tokens a draft scores, chosen by how often the target produces them.

Large vocabularies (Qwen 152k, Gemma 262k) make the draft's `lm_head` the largest read of a tree level. A draft
built with `draft_vocab_size=N` scores only `N` token ids (`draft.draft_vocab`, saved with its weights), and
`draft.restrict_vocab(ids)` makes a trained full-vocabulary draft do the same without retraining; the target still
scores the full vocabulary, so decoding stays lossless, greedy and sampling alike. Tokens outside the reduced
vocabulary are never drafted (they cost acceptance, not exactness).
"""

from __future__ import annotations

import torch


def count_tokens(sequences, vocab_size: int) -> torch.Tensor:
    """`(vocab_size,)` counts of the token ids in `sequences` (an iterable of id tensors or lists), e.g. the
    target's answers on the training data."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for sequence in sequences:
        ids = torch.as_tensor(sequence, dtype=torch.long).flatten()
        ids = ids[(ids >= 0) & (ids < vocab_size)]
        counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def choose_draft_vocab(counts: torch.Tensor, size: int, always=()) -> torch.Tensor:
    """The `size` token ids to score: `always` (e.g. EOS and other special tokens) first, then the most frequent
    (ties broken by the lower id), returned in ascending id order."""
    if not 1 <= size <= counts.numel():
        raise ValueError(f"a draft vocabulary of {size} tokens does not fit a vocabulary of {counts.numel()}")
    always = sorted({int(token) for token in always})
    if len(always) > size:
        raise ValueError(f"{len(always)} tokens must always be scored, more than the draft vocabulary's {size}")
    scores = counts.double().clone()
    scores[always] = float("inf")
    order = torch.sort(-scores, stable=True).indices
    return order[:size].sort().values
