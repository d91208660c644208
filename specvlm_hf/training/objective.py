"""The distillation objective: the frozen target's teacher pass, the draft's view of the batch, and the loss.

For a sequence x_0..x_{n-1} the target yields merged input embeddings e_t and final post-norm features f_t.
The draft reads pairs (e_{t+1}, f_t), t = 0..n-2, at the target's position ids; its output at pair t
predicts f_{t+1} (SmoothL1) and, through the target's `lm_head`, the distribution of x_{t+2} (soft
cross-entropy against the teacher's logits there). The loss is taken where x_{t+2} is an answer token.

With a visual compressor the prompt pairs go through `draft.compress_prompt` exactly as at inference
(`draft_runner.prompt_pairs` + `DraftRunner.prefill`); the answer pairs follow uncompressed, as the
draft's catch-up on accepted tokens does.

Unrolled training (`unroll_steps = k > 1`, beyond the paper): step j feeds the draft, at every answer pair,
its own step j-1 prediction of that pair's feature instead of the target's, as inside a draft tree; the
prompt keeps the target's features (at inference the prefix always has them). This is an approximation:
the draft's context holds predicted features for all earlier answer tokens too, where a tree's context
holds them only for the node's ancestors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import adapter_for
from ..compressor import prompt_layouts, question_features
from ..target import FeatureTap, unwrap_target
from .fused_loss import soft_cross_entropy


@dataclass
class TeacherOutputs:
    """What the frozen target gives a batch: `inputs_embeds` and `features` `(B, L, d)`."""

    inputs_embeds: torch.Tensor
    features: torch.Tensor


def teacher_forward(target: nn.Module, batch: dict, inference_mode: bool = True) -> TeacherOutputs:
    """One target forward over a right-padded batch without autograd, recording e and f with `FeatureTap`.

    It runs under `torch.inference_mode` (no autograd bookkeeping at all; the two recorded tensors are copied
    out of it so that the draft's graph may save them), or under `torch.no_grad` with `inference_mode=False`:
    a target sharded with FSDP2 needs that (its all-gather buffers, made in one forward, are written in place in
    later ones, which inference tensors forbid outside inference mode).
    """
    model = unwrap_target(target)
    kwargs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "use_cache": False,
        "logits_to_keep": 1,
    }
    if batch.get("pixel_values") is not None:
        kwargs["pixel_values"] = batch["pixel_values"].to(model.dtype)
    if batch.get("image_sizes") is not None:
        kwargs["image_sizes"] = batch["image_sizes"]
    if batch.get("image_grid_thw") is not None:
        kwargs["image_grid_thw"] = batch["image_grid_thw"]
    if batch.get("pixel_values_videos") is not None:  # Qwen-VL clips
        kwargs["pixel_values_videos"] = batch["pixel_values_videos"].to(model.dtype)
        kwargs["video_grid_thw"] = batch["video_grid_thw"]
    # the family's extra inputs (Qwen-VL: `mm_token_type_ids`, without which the forward silently uses 1-D
    # positions instead of M-RoPE's), as its processor gives them to `generate`
    kwargs.update(adapter_for(model, tree=False).forward_inputs(batch["input_ids"]))
    with torch.inference_mode() if inference_mode else torch.no_grad(), FeatureTap(target) as tap:
        target(**kwargs)
        embeds, features = tap.inputs_embeds, tap.last_hidden_state
    if inference_mode:
        return TeacherOutputs(embeds.clone(), features.clone())
    return TeacherOutputs(embeds.detach(), features.detach())


@dataclass
class DraftSequences:
    """The draft's input rows for a batch (prompt compressed when the draft has a compressor).

    Attributes:
        fused: `(B, S, d)` fused inputs (target features); token_embeds: `(B, S, d)` e_{t+1} of each answer
            row (zero elsewhere), to refuse rows with fed-back features when unrolling.
        attention_mask: `(B, S)` long; position_ids: `(B, S)`.
        answer_rows: `(B, S)` bool, rows of answer pairs (t >= first answer token index).
        loss_rows: `(N, 2)` (b, row) of the rows with a loss; loss_pairs: `(N, 2)` (b, t) of their pairs.
        expected_fraction: per compressed example, the gate's expected kept fraction (differentiable).
        choices: `(b, log_prob)` per example whose compressor drew its branches (training, `select`): the
            drawn branches' log-probability (differentiable), for the gate's score-function term.
    """

    fused: torch.Tensor
    token_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    answer_rows: torch.Tensor
    loss_rows: torch.Tensor
    loss_pairs: torch.Tensor
    expected_fraction: list = field(default_factory=list)
    choices: list = field(default_factory=list)


def _noise(features: torch.Tensor, amount: float, kind: str) -> torch.Tensor:
    if amount <= 0:
        return features
    if kind == "gaussian":
        return features + amount * torch.randn_like(features)
    return features + amount * (torch.rand_like(features) - 0.5)


def draft_sequences(
    draft, target_config, batch: dict, teacher: TeacherOutputs, noise: float = 0.0, noise_type: str = "uniform"
) -> DraftSequences:
    """Builds the draft's input rows for a batch (see the module docstring)."""
    input_ids, mask, labels = batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]
    dtype = draft.fc.weight.dtype
    embeds = teacher.inputs_embeds.to(dtype)
    features = _noise(teacher.features.to(dtype), noise, noise_type)
    token_embeds = embeds[:, 1:]  # (B, L-1, d): e_{t+1}
    fused = draft.fuse(token_embeds, features[:, :-1])
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, :-1]
    pair_real = mask[:, 1:]
    pair_loss = torch.zeros_like(pair_real)
    pair_loss[:, :-1] = labels[:, 2:] & mask[:, 2:]  # pair t predicts x_{t+2}
    lengths = mask.sum(-1)
    # index of the first answer token per example (= number of prompt pairs, as at inference)
    has_answer = labels.any(-1)
    prompt_pairs = torch.where(has_answer, labels.float().argmax(-1), lengths - 1)
    pair_index = torch.arange(pair_real.shape[1], device=mask.device)[None]
    answer_rows = (pair_index >= prompt_pairs[:, None]) & pair_real

    if draft.compressor is None:
        return DraftSequences(
            fused=fused,
            token_embeds=token_embeds * answer_rows[..., None],
            attention_mask=pair_real.long(),
            position_ids=positions,
            answer_rows=answer_rows,
            loss_rows=pair_loss.nonzero(),
            loss_pairs=pair_loss.nonzero(),
        )

    image_token = getattr(target_config, "image_token_id", None)
    video_token = getattr(target_config, "video_token_id", None)
    given_layouts = batch.get("layouts")  # per example, its visual spans' layouts (video clips: their frames)
    images_per_example = batch.get("images_per_example")
    image_sizes = batch.get("image_sizes")
    first_image = 0
    rows, row_embeds, row_positions, row_answer, loss_rows, loss_pairs, expected = [], [], [], [], [], [], []
    choices = []
    for b in range(input_ids.shape[0]):
        n_pairs = int(lengths[b]) - 1
        n_prompt = int(prompt_pairs[b])
        is_image = input_ids[b, :n_prompt] == image_token
        visual = input_ids[b, 1 : n_prompt + 1] == image_token
        if video_token is not None:
            is_image = is_image | (input_ids[b, :n_prompt] == video_token)
            visual = visual | (input_ids[b, 1 : n_prompt + 1] == video_token)
        count = int(images_per_example[b]) if images_per_example is not None else 0
        sizes = image_sizes[first_image : first_image + count] if image_sizes is not None else None
        first_image += count
        real = torch.ones(n_prompt, dtype=torch.bool, device=mask.device)
        if bool(visual.any()):
            compressed, compressed_positions, _, info = draft.compress_prompt(
                fused[b, :n_prompt],
                positions[b, :n_prompt],
                real,
                visual,
                given_layouts[b] if given_layouts is not None else prompt_layouts(target_config, visual, sizes),
                question_features(teacher.features[b, :n_prompt], real, is_image),
            )
            if info["expected_fraction"] is not None:
                expected.append(info["expected_fraction"])
            if info.get("log_prob") is not None:
                choices.append((b, info["log_prob"]))
            last_visual = int(visual.nonzero().max())
        else:
            compressed, compressed_positions, last_visual = fused[b, :n_prompt], positions[b, :n_prompt], -1
        m = compressed.shape[0]
        rows.append(torch.cat([compressed, fused[b, n_prompt:n_pairs]]))
        row_positions.append(torch.cat([compressed_positions, positions[b, n_prompt:n_pairs]]))
        row_embeds.append(torch.cat([torch.zeros_like(compressed), token_embeds[b, n_prompt:n_pairs]]))
        row_answer.append(torch.arange(m + n_pairs - n_prompt, device=mask.device) >= m)
        pairs = pair_loss[b, :n_pairs].nonzero().flatten()
        pairs = pairs[pairs > last_visual]  # pairs inside the compressed image do not exist for the draft
        loss_pairs.append(torch.stack([torch.full_like(pairs, b), pairs], -1))
        loss_rows.append(torch.stack([torch.full_like(pairs, b), pairs - n_prompt + m], -1))
    width = max(r.shape[0] for r in rows)

    def pad(pieces, value=0):
        return torch.stack(
            [
                F.pad(p, (0, 0, 0, width - p.shape[0]) if p.dim() == 2 else (0, width - p.shape[0]), value=value)
                for p in pieces
            ]
        )

    real_rows = torch.stack([torch.arange(width, device=mask.device) < r.shape[0] for r in rows])
    return DraftSequences(
        fused=pad(rows),
        token_embeds=pad(row_embeds),
        attention_mask=real_rows.long(),
        position_ids=pad(row_positions),
        answer_rows=pad(row_answer, False),
        loss_rows=torch.cat(loss_rows),
        loss_pairs=torch.cat(loss_pairs),
        expected_fraction=expected,
        choices=choices,
    )


@dataclass
class ObjectiveOutput:
    """Loss and metrics of one micro-batch. The metrics are detached 0-d tensors (read them with `float`; the
    trainer reads a whole step's at once, so that the GPU never waits for the host in between); per-step lists
    have one entry per unrolled step."""

    loss: torch.Tensor
    logit_loss: torch.Tensor | float = 0.0
    feature_loss: torch.Tensor | float = 0.0
    cost: torch.Tensor | float = 0.0
    agreement: list = field(default_factory=list)  # top-1 agreement with the teacher at each step
    rows: list = field(default_factory=list)  # answer tokens scored at each step (ints)
    visual_fraction: torch.Tensor | None = None


class DistillationObjective(nn.Module):
    """The draft plus its training loss, as one module (what Accelerate / DDP wraps).

    The target is not a submodule: it stays frozen and unreplicated; only its text config is kept here
    (the draft borrows its embedding and `lm_head`).

    Args:
        draft: a `SpecVLMDraftModel` bound to the target.
        target_config: the target's config (image token id, LLaVA-NeXT grid settings).
        lambda_logit, lambda_feat: loss weights. feature_noise, feature_noise_type: augmentation.
        unroll_steps, unroll_detach: unrolled training (see the module docstring).
        loss_chunk_rows: answer rows scored through the `lm_head` at once (`fused_loss.soft_cross_entropy`).
    """

    def __init__(
        self,
        draft,
        target_config,
        lambda_logit=0.1,
        lambda_feat=1.0,
        feature_noise=0.0,
        feature_noise_type="uniform",
        unroll_steps=1,
        unroll_detach=True,
        loss_chunk_rows=1024,
    ):
        super().__init__()
        self.draft = draft
        self.target_config = target_config
        self.lambda_logit, self.lambda_feat = lambda_logit, lambda_feat
        self.feature_noise, self.feature_noise_type = feature_noise, feature_noise_type
        self.unroll_steps, self.unroll_detach = unroll_steps, unroll_detach
        self.loss_chunk_rows = loss_chunk_rows
        self.cost_weight = float((draft.config.compressor or {}).get("cost_weight", 0.0) or 0.0)
        self.gate_baseline: torch.Tensor | None = None  # running mean of the examples' loss (`gate_score_term`)

    def forward(self, batch: dict, teacher: TeacherOutputs, unroll_steps: int | None = None) -> ObjectiveOutput:
        draft = self.draft
        steps = unroll_steps or self.unroll_steps
        noise = self.feature_noise if self.training else 0.0
        seq = draft_sequences(draft, self.target_config, batch, teacher, noise, self.feature_noise_type)
        b_pair, t_pair = seq.loss_pairs[:, 0], seq.loss_pairs[:, 1]
        b_row, r_row = seq.loss_rows[:, 0], seq.loss_rows[:, 1]
        target_features = teacher.features[b_pair, t_pair + 1]
        head = draft.get_output_embeddings()
        if draft.draft_vocab is not None:  # a reduced vocabulary: both distributions over its tokens only
            head = _RowsOf(head, draft.draft_vocab)

        fused = seq.fused
        total = fused.new_zeros((), dtype=torch.float32)
        out = ObjectiveOutput(loss=total)
        logit_sum = feature_sum = total.detach()
        for step in range(1, steps + 1):
            predicted = draft.decode(
                fused, attention_mask=seq.attention_mask, position_ids=seq.position_ids, use_cache=False
            )
            if step == 1:  # every loss row (no boolean mask: it would wait for the GPU)
                rows, targets = predicted[b_row, r_row], target_features
            else:
                keep = seq.answer_rows[b_row, r_row]
                rows, targets = predicted[b_row[keep], r_row[keep]], target_features[keep]
            if rows.shape[0]:
                logit_loss, agree = soft_cross_entropy(rows, targets, head, self.loss_chunk_rows)
                feature_rows = F.smooth_l1_loss(rows.float(), targets.float(), reduction="none").mean(-1)
                feature_loss = feature_rows.mean()
                if step == 1 and seq.choices:
                    total = total + steps * self.gate_score_term(seq, b_row, feature_rows.detach())
                total = total + self.lambda_logit * logit_loss + self.lambda_feat * feature_loss
                agree = agree.float() / rows.shape[0]
                logit_sum = logit_sum + logit_loss.detach()
                feature_sum = feature_sum + feature_loss.detach()
            else:  # no answer token in this micro-batch: keep the graph (and DDP's gradient sync) intact
                total = total + 0.0 * predicted.float().sum()
                agree = total.new_zeros(())
            out.agreement.append(agree)
            out.rows.append(int(rows.shape[0]))
            if step < steps:  # feed the predictions back as the next step's answer features
                fed = predicted.detach() if self.unroll_detach else predicted
                previous = torch.cat(
                    [torch.zeros_like(fed[:, :1]), fed[:, :-1]], dim=1
                )  # row r reads row r-1's output
                refused = draft.fuse(seq.token_embeds, previous)
                fused = torch.where(seq.answer_rows[..., None], refused, seq.fused)
        total = total / steps
        if seq.expected_fraction:
            fraction = torch.stack(seq.expected_fraction).mean()
            out.visual_fraction = fraction.detach()
            if self.cost_weight:
                cost = self.cost_weight * fraction
                total = total + cost
                out.cost = cost.detach()
        out.loss = total
        out.logit_loss, out.feature_loss = logit_sum / steps, feature_sum / steps
        return out

    def gate_score_term(self, seq: DraftSequences, b_row: torch.Tensor, per_row: torch.Tensor) -> torch.Tensor:
        """The gate's score-function (REINFORCE) term: `mean_b (loss_b - baseline_b) * log p_b(drawn branches)`,
        whose gradient is an unbiased estimate of the gate's share of the objective's gradient. `loss_b` is example
        b's mean feature loss (`per_row`: each loss row's smooth L1, no gradient; `b_row`: the row's example); the
        baseline is the mean over the batch's other drawing examples (a running mean when there is one). The
        straight-through scale alone gives the gate almost no gradient from the loss: the draft's decoder layer
        RMS-normalises the scaled tokens, and `text` has none (`tests/test_gate_learning.py`)."""
        batch = seq.fused.shape[0]
        sums = per_row.new_zeros(batch).index_add_(0, b_row, per_row)
        counts = per_row.new_zeros(batch).index_add_(0, b_row, torch.ones_like(per_row))
        index = torch.tensor([b for b, _ in seq.choices], device=sums.device)
        present = (counts[index] > 0).float()  # examples with loss rows (on the device: no host sync)
        loss = sums[index] / counts[index].clamp(min=1)
        n = present.sum()
        mean = (loss * present).sum() / n.clamp(min=1)
        running = mean if self.gate_baseline is None else self.gate_baseline.to(mean.device)
        others = ((loss * present).sum() - loss) / (n - 1).clamp(min=1)  # the other examples' mean
        baseline = torch.where(n > 1, others, running)
        self.gate_baseline = torch.where(n > 0, 0.9 * running + 0.1 * mean, running).detach()
        log_probs = torch.stack([log_prob for _, log_prob in seq.choices])
        score = ((loss - baseline) * log_probs * present).sum() / n.clamp(min=1)
        return score - score.detach()  # a gradient only: the reported loss keeps its value


class _RowsOf:
    """The rows `ids` of a frozen `lm_head` (weight and bias), as `fused_loss.soft_cross_entropy` reads a head."""

    def __init__(self, head, ids: torch.Tensor):
        ids = ids.to(head.weight.device)
        self.weight = head.weight.detach().index_select(0, ids)
        bias = getattr(head, "bias", None)
        self.bias = bias.detach().index_select(0, ids) if bias is not None else None
