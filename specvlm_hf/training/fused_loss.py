"""Soft cross-entropy against the teacher's logits, over the vocabulary in chunks of rows.

The loss of `objective.DistillationObjective` scores the draft's outputs h and the target's features f of
the N answer rows through the target's `lm_head` W `(V, d)`:

    soft_ce = mean over rows of  -sum_v softmax(W f)_v * log_softmax(W h)_v

Written plainly it holds several `(N, V)` fp32 tensors at once (teacher logits and probabilities, draft
logits, their log-softmax, its gradient): with a 152k vocabulary and 4k answer rows that is over 10 GB.
Here the rows go through W `chunk_rows` at a time, and each chunk's gradient with respect to h,

    d soft_ce / d h = (softmax(W h) - softmax(W f)) @ W / N        (the teacher's probabilities sum to 1)

is computed in the forward pass; nothing of size `(N, V)` is kept, and the backward is one scaling. The
matrix products run in the surrounding autocast dtype (bf16 on a GPU), as `lm_head(h).float()` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _ChunkedSoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, teacher_hidden, weight, bias, chunk_rows):
        rows = hidden.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        agree = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad = torch.empty_like(hidden) if hidden.requires_grad else None
        for start in range(0, rows, chunk_rows):
            end = min(start + chunk_rows, rows)
            teacher_logits = F.linear(teacher_hidden[start:end], weight, bias).float()
            teacher_probs = teacher_logits.softmax(-1)
            logits = F.linear(hidden[start:end], weight, bias).float()
            log_probs = logits.log_softmax(-1)
            loss -= (teacher_probs * log_probs).sum()
            agree += (logits.argmax(-1) == teacher_logits.argmax(-1)).sum()
            if grad is not None:
                # d/dlogits of -sum(p * log_softmax(logits)) is softmax(logits) * sum(p) - p, and sum(p) = 1
                grad_logits = log_probs.exp_().sub_(teacher_probs).div_(rows)
                grad[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(agree)
        return loss / rows, agree

    @staticmethod
    def backward(ctx, grad_loss, grad_agree):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None


def soft_cross_entropy(
    hidden: torch.Tensor, teacher_hidden: torch.Tensor, head: torch.nn.Module, chunk_rows: int = 1024
):
    """Mean soft cross-entropy of the draft's logits `head(hidden)` against the teacher's `head(teacher_hidden)`,
    and how many rows agree on the top-1 token.

    Args:
        hidden: `(N, d)` the draft's outputs (differentiable). teacher_hidden: `(N, d)` the target's features.
        head: the target's frozen `lm_head` (an `nn.Linear`, weight `(V, d)`); no gradient reaches it.
        chunk_rows: rows scored at once (memory: a few `(chunk_rows, V)` fp32 tensors).

    Returns:
        `(loss, agree)`: the 0-d fp32 mean over the N rows, and a 0-d long count (no gradient).
    """
    if hidden.shape[0] == 0:
        raise ValueError("soft_cross_entropy needs at least one row")
    weight = head.weight.detach()
    bias = head.bias.detach() if getattr(head, "bias", None) is not None else None
    if torch.is_autocast_enabled(hidden.device.type):
        # the same casts autocast gives `head(hidden)`: the products run in its dtype
        dtype = torch.get_autocast_dtype(hidden.device.type)
        weight = weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        hidden, teacher_hidden = hidden.to(dtype), teacher_hidden.to(dtype)
    else:
        hidden, teacher_hidden = hidden.to(weight.dtype), teacher_hidden.to(weight.dtype)
    return _ChunkedSoftCrossEntropy.apply(hidden, teacher_hidden.detach(), weight, bias, max(int(chunk_rows), 1))
