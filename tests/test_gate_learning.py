"""Does the `select` compressor's gate learn to pick a branch per input (issue 15)?

A synthetic two-kind task through the real training objective (`DistillationObjective`: distillation loss +
`cost_weight * expected visual fraction`), a tiny LLaVA target's config, embedding and `lm_head`, a one-layer
draft (the default size) with the real compressor (`pool@4`, `prune@4`, `text`) and its gate, whose input is
the real question vector (`question_features`: the mean target feature over the prompt's text tokens). The
draft is frozen (with weights of unit-variance scale, so that its answer rows do read the image) and only the
gate trains. The teacher's features are synthetic, so that no target forward runs:

- every prompt is `BOS, 4 words, a 4 x 4 image, 2 words` and one answer token; the image's draft inputs differ
  per example, and the text features carry a kind marker (`+u` for kind A, `-u` for kind B), which is all the
  gate can tell the kinds by;
- kind A ("the answer needs the pictures"): the answer's target feature is what the frozen draft predicts when
  it reads the image through `pool@4`, so dropping the visual tokens (`text`) raises the loss;
- kind B ("text suffices"): the answer's target feature is what the draft predicts without visual tokens.

Without the visual dependence (kind A's target made like kind B's), both kinds' loss is lowest with `text`.

What the tests show: the gate, its question vector and the cost term can learn the per-input choice when the
gate is trained on the objective's expectation over its choice (each branch's loss from the objective,
weighted by the gate's probabilities), and that the training path (Gumbel-softmax straight-through) learns it
too. The straight-through scale `1 + p - p.detach()` of the chosen branch's output alone gave the gate almost no
gradient from the loss (the draft's decoder layer RMS-normalises its inputs before attention reads them, and
`text` has no tokens to scale), so the gate learned from the cost term only and picked `text` for every input
whenever `cost_weight > 0` (the shipped mini video draft: `cost_weight` 0.3, `text` on every clip). The objective
now adds a score-function term on the drawn branch's log-probability (`DistillationObjective.gate_score_term`);
the last two tests failed before it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.compressor import VisualLayout, question_features
from specvlm_hf.training.objective import DistillationObjective, TeacherOutputs, draft_sequences
from tiny_models import IMAGE_TOKEN, tiny_llava

BRANCHES = ("pool@4", "prune@4", "text")
KEEPS_PICTURES = ("pool@4", "prune@4")
PROMPT = [1, 5, 6, 7, 8] + [IMAGE_TOKEN] * 16 + [9, 10]
LAYOUT = VisualLayout.grid(16)
MARKER = 3.0  # size of the kind marker in the text features


class GateTask:
    """The synthetic task's draft, objective and batches (see the module docstring)."""

    def __init__(self, cost_weight: float, pictures_matter: bool = True, seed: int = 0):
        target = tiny_llava()
        torch.manual_seed(seed)
        compressor = {"mode": "select", "branches": list(BRANCHES), "gate_hidden": 16, "cost_weight": cost_weight}
        self.draft = SpecVLMDraftModel.from_target(target, num_draft_layers=1, compressor=compressor)
        with torch.no_grad():  # weights of a trained draft's size (the default init barely mixes tokens)
            for module in [self.draft.fc, *self.draft.model.modules()]:
                if isinstance(module, torch.nn.Linear):
                    module.weight.normal_(0.0, module.in_features**-0.5)
        self.draft.requires_grad_(False)
        self.draft.compressor.gate.requires_grad_(True)
        self.config = target.config
        self.objective = DistillationObjective(self.draft, target.config)
        self.pictures_matter = pictures_matter
        self.hidden = target.config.get_text_config().hidden_size
        self.marker = F.normalize(torch.randn(self.hidden), dim=0)

    def batch(self, size: int) -> dict:
        """`size` prompts (kind A at even rows, kind B at odd ones), each with one answer token."""
        input_ids = torch.tensor(PROMPT + [11]).repeat(size, 1)
        labels = torch.zeros_like(input_ids, dtype=torch.bool)
        labels[:, -1] = True
        kind_a = torch.arange(size) % 2 == 0
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels, "a": kind_a}

    def teacher(self, batch: dict, generator: torch.Generator) -> TeacherOutputs:
        """Random embeddings and features, the kind marker on the text features, and the answer's target feature
        (the feature at the last prompt token, which pair `L - 3` predicts) from the frozen draft itself."""
        size, length = batch["input_ids"].shape
        visual = batch["input_ids"][0] == IMAGE_TOKEN
        embeds = torch.randn(size, length, self.hidden, generator=generator)
        embeds[:, visual] = 3 * torch.randn(size, 1, self.hidden, generator=generator) + torch.randn(
            size, int(visual.sum()), self.hidden, generator=generator
        )
        features = torch.randn(size, length, self.hidden, generator=generator)
        sign = torch.where(batch["a"], 1.0, -1.0)
        features[:, ~visual] += MARKER * sign[:, None, None] * self.marker
        teacher = TeacherOutputs(embeds, features)
        with_pictures = self.predict(batch, teacher, "pool@4" if self.pictures_matter else "text")
        without = self.predict(batch, teacher, "text")
        features[:, length - 2] = torch.where(batch["a"][:, None], with_pictures, without)
        return teacher

    @torch.no_grad()
    def predict(self, batch: dict, teacher: TeacherOutputs, spec: str) -> torch.Tensor:
        """The frozen draft's prediction at each example's loss row when the gate is forced to `spec`."""
        with forced(self.draft.compressor, spec):
            seq = draft_sequences(self.draft, self.config, batch, teacher)
            predicted = self.draft.decode(
                seq.fused, attention_mask=seq.attention_mask, position_ids=seq.position_ids, use_cache=False
            )
        return predicted[seq.loss_rows[:, 0], seq.loss_rows[:, 1]]

    @torch.no_grad()
    def branch_losses(self, batch: dict, teacher: TeacherOutputs) -> torch.Tensor:
        """`(B, branches)`: the objective's distillation loss (cost left out) of each example with each branch."""
        losses = torch.zeros(batch["input_ids"].shape[0], len(BRANCHES))
        for b in range(losses.shape[0]):
            one = {key: value[b : b + 1] for key, value in batch.items()}
            part = TeacherOutputs(teacher.inputs_embeds[b : b + 1], teacher.features[b : b + 1])
            for i, spec in enumerate(BRANCHES):
                with forced(self.draft.compressor, spec):
                    out = self.objective(one, part)
                losses[b, i] = out.loss - out.cost
        return losses

    def gate(self, batch: dict, teacher: TeacherOutputs) -> list:
        """Per example, the real compressor's (gate probabilities, expected visual fraction, branch) in eval mode
        (argmax) on the example's own question vector and image."""
        length = batch["input_ids"].shape[1]
        prompt = batch["input_ids"][:, : length - 1]
        out = []
        for b in range(prompt.shape[0]):
            is_image = prompt[b] == IMAGE_TOKEN
            question = question_features(teacher.features[b, : length - 1], torch.ones_like(is_image), is_image)
            tokens = self.draft.fuse(teacher.inputs_embeds[b, 1:length], teacher.features[b, : length - 1])
            result = self.draft.compressor(tokens[batch["input_ids"][b, 1:] == IMAGE_TOKEN], LAYOUT, question)
            out.append((result.gate_probs, result.expected_fraction, result.branch))
        return out


@contextmanager
def forced(compressor, spec: str):
    """The gate's logits replaced by a one-hot choice of `spec` (argmax in eval, a near-sure Gumbel draw)."""
    logits = torch.full((len(BRANCHES),), -1e4)
    logits[BRANCHES.index(spec)] = 1e4
    compressor.gate_logits = lambda question: logits
    try:
        yield
    finally:
        del compressor.gate_logits


def choices(task: GateTask, seed: int = 123, size: int = 16):
    """Held-out examples: per kind, the gate's argmax branches and its mean probability of `text`."""
    task.draft.eval()
    generator = torch.Generator().manual_seed(seed)
    batch = task.batch(size)
    with torch.no_grad():
        results = task.gate(batch, task.teacher(batch, generator))
    picked = {True: [], False: []}
    text = {True: [], False: []}
    for kind_a, (probs, _, branch) in zip(batch["a"].tolist(), results):
        picked[kind_a].append(branch)
        text[kind_a].append(float(probs[BRANCHES.index("text")]))
    return (
        {"A": picked[True], "B": picked[False]},
        {"A": sum(text[True]) / len(text[True]), "B": sum(text[False]) / len(text[False])},
    )


def test_dropping_the_pictures_raises_the_loss_of_kind_a_only():
    """The task is real: under the objective, `text` costs kind A far more loss than a branch that keeps the
    image, while kind B (and kind A without its visual dependence) does best with `text`."""
    for pictures_matter in (True, False):
        task = GateTask(cost_weight=0.0, pictures_matter=pictures_matter)
        batch = task.batch(8)
        losses = task.branch_losses(batch, task.teacher(batch, torch.Generator().manual_seed(1)))
        extra = losses - losses.min(-1, keepdim=True).values  # above each example's best branch
        pool, text = extra[:, BRANCHES.index("pool@4")], extra[:, BRANCHES.index("text")]
        kind_a, kind_b = batch["a"], ~batch["a"]
        assert bool((text[kind_b] < 1e-4).all()) and bool((pool[kind_b] > 1e-3).all())
        if pictures_matter:
            assert bool((pool[kind_a] < 1e-4).all()) and bool((text[kind_a] > 0.05).all())
        else:
            assert bool((text[kind_a] < 1e-4).all())


def train_expected(task: GateTask, steps: int = 150, size: int = 16):
    """Trains the gate on the expectation of the objective over its choice: `sum_i p_i * loss_i + cost_weight *
    expected visual fraction`, with each branch's loss from the objective (the gradient that the Gumbel
    straight-through estimate stands for) and the compressor's own expected fraction."""
    generator = torch.Generator().manual_seed(7)
    batch = task.batch(size)
    teacher = task.teacher(batch, generator)
    losses = task.branch_losses(batch, teacher)
    optimizer = torch.optim.Adam(task.draft.compressor.gate.parameters(), lr=0.03)
    task.draft.eval()
    for _ in range(steps):
        results = task.gate(batch, teacher)
        probs = torch.stack([p for p, _, _ in results])
        fraction = torch.stack([f for _, f, _ in results]).mean()
        loss = (probs * losses).sum(-1).mean() + task.objective.cost_weight * fraction
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def train_straight_through(task: GateTask, steps: int = 150, size: int = 8):
    """The real training path: `DistillationObjective` in train mode (the compressor's Gumbel-softmax
    straight-through choice per example, its cost term), fresh examples every step, Adam on the gate."""
    generator = torch.Generator().manual_seed(7)
    optimizer = torch.optim.Adam(task.draft.compressor.gate.parameters(), lr=0.03)
    for _ in range(steps):
        batch = task.batch(size)
        teacher = task.teacher(batch, generator)
        task.objective.train()
        loss = task.objective(batch, teacher).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_gate_learns_per_input_choice_from_the_expected_objective():
    """Trained on the objective's expectation over its choice, the gate keeps the image for kind A and drops it
    for kind B (loss saved > cost paid only for A); with the visual dependence removed, or a cost that outweighs
    kind A's loss gap (`10 * 1/4` against about 0.1), it picks `text` for both: the choice is learnt per input,
    not fixed."""
    task = GateTask(cost_weight=0.1)
    train_expected(task)
    picked, text = choices(task)
    assert all(branch in KEEPS_PICTURES for branch in picked["A"]), picked
    assert all(branch == "text" for branch in picked["B"]), picked
    assert text["A"] < 0.1 and text["B"] > 0.9, text

    for task in (GateTask(cost_weight=0.1, pictures_matter=False), GateTask(cost_weight=10.0)):
        train_expected(task)
        picked, text = choices(task)
        assert all(branch == "text" for branch in picked["A"] + picked["B"]), picked
        assert text["A"] > 0.9 and text["B"] > 0.9, text


def test_straight_through_loss_reaches_the_gate():
    """With the cost term off, the objective's loss in train mode (Gumbel straight-through) sends the gate a
    gradient of the size of the branches' loss differences (here about 0.1): summed over a few draws on kind B
    prompts, where keeping the image costs loss."""
    task = GateTask(cost_weight=0.0)
    with torch.no_grad():
        task.draft.compressor.gate[-1].weight.zero_()  # a uniform gate: every branch is drawn now and then
        task.draft.compressor.gate[-1].bias.zero_()
    batch = task.batch(4)
    batch = {key: value[~batch["a"]] for key, value in batch.items()}
    teacher = task.teacher(batch, torch.Generator().manual_seed(3))
    task.objective.train()
    torch.manual_seed(0)
    for _ in range(8):
        task.objective(batch, teacher).loss.backward()
    gradient = sum(float(p.grad.abs().sum()) for p in task.draft.compressor.gate.parameters())
    assert gradient > 1e-4, gradient


def test_gumbel_straight_through_training_learns_per_input_choice():
    """The real training path (the objective in train mode, Gumbel-softmax straight-through, the cost term)
    learns what the expected objective does: keep the image for kind A, drop it for kind B."""
    task = GateTask(cost_weight=0.1)
    train_straight_through(task)
    picked, text = choices(task)
    assert all(branch in KEEPS_PICTURES for branch in picked["A"]), (picked, text)
    assert all(branch == "text" for branch in picked["B"]), (picked, text)

    task = GateTask(cost_weight=0.1, pictures_matter=False)  # the control: then nothing is worth its cost
    train_straight_through(task)
    picked, text = choices(task)
    assert all(branch == "text" for branch in picked["A"] + picked["B"]), (picked, text)
