"""The fast training step computes what the plain one did: the chunked soft cross-entropy equals the full-vocabulary
formula, a whole optimizer step (inference-mode teacher, chunked loss, one host read per step, prefetched data)
gives the plain step's loss, gradients and weights, and the prefetcher hands out the loader's batches in order."""

import threading

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoProcessor

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.mini import WEIGHTS_DIR
from specvlm_hf.training import DistillConfig, DistillTrainer
from specvlm_hf.training.data import Collator, ConversationDataset, ImageResolver, load_records
from specvlm_hf.training.fused_loss import soft_cross_entropy
from specvlm_hf.training.objective import draft_sequences, teacher_forward
from specvlm_hf.training.prefetch import Prefetcher
from specvlm_hf.training.step_timer import StepTimer
from test_train_loop import tiny_target


def plain_soft_cross_entropy(rows, targets, head):
    """The formula as the trainer wrote it before: every (N, V) tensor at once."""
    with torch.no_grad():
        teacher_logits = head(targets).float()
        teacher_probs = teacher_logits.softmax(-1)
    logits = head(rows.to(head.weight.dtype)).float()
    loss = -(teacher_probs * logits.log_softmax(-1)).sum(-1).mean()
    return loss, (logits.argmax(-1) == teacher_logits.argmax(-1)).sum()


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 4096])
def test_chunked_soft_cross_entropy_equals_the_full_vocabulary_formula(chunk_rows):
    torch.manual_seed(chunk_rows)
    head = torch.nn.Linear(32, 501, bias=False)
    head.weight.data *= 4  # peaked distributions, as a trained lm_head gives
    rows = torch.randn(53, 32, requires_grad=True)
    targets = torch.randn(53, 32)
    expected, expected_agree = plain_soft_cross_entropy(rows, targets, head)
    (expected_grad,) = torch.autograd.grad(3.0 * expected, rows)
    loss, agree = soft_cross_entropy(rows, targets, head, chunk_rows)
    (grad,) = torch.autograd.grad(3.0 * loss, rows)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, expected_grad, atol=1e-7, rtol=1e-5)
    assert int(agree) == int(expected_agree)
    assert head.weight.grad is None  # the target's lm_head stays frozen


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(WEIGHTS_DIR)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from specvlm_hf.mini.data import write_dataset

    folder = tmp_path_factory.mktemp("fast-step")
    path = write_dataset(folder, 24, seed=5)
    return str(path), load_records(str(path))


def plain_step(trainer, micro_batches):
    """One optimizer step as the trainer took it before: no-grad teacher, full-vocabulary loss, a host read per
    metric. Returns the loss and the gradients before the optimizer step."""
    objective = trainer.objective
    draft = objective.draft
    loss_sum = 0.0
    for batch in micro_batches:
        with torch.no_grad():
            teacher = teacher_forward(trainer.target, batch, inference_mode=False)
        seq = draft_sequences(
            draft, objective.target_config, batch, teacher, objective.feature_noise, objective.feature_noise_type
        )
        b_pair, t_pair = seq.loss_pairs[:, 0], seq.loss_pairs[:, 1]
        b_row, r_row = seq.loss_rows[:, 0], seq.loss_rows[:, 1]
        target_features = teacher.features[b_pair, t_pair + 1]
        predicted = draft.decode(
            seq.fused, attention_mask=seq.attention_mask, position_ids=seq.position_ids, use_cache=False
        )
        rows = predicted[b_row, r_row]
        logit_loss, _ = plain_soft_cross_entropy(rows, target_features, draft.get_output_embeddings())
        feature_loss = F.smooth_l1_loss(rows.float(), target_features.float())
        loss = objective.lambda_logit * logit_loss + objective.lambda_feat * feature_loss
        if seq.choices:  # the gate's score-function term (a gradient only)
            per_row = F.smooth_l1_loss(rows.float(), target_features.float(), reduction="none").mean(-1)
            loss = loss + objective.gate_score_term(seq, b_row, per_row.detach())
        if seq.expected_fraction and objective.cost_weight:
            loss = loss + objective.cost_weight * torch.stack(seq.expected_fraction).mean()
        (loss / len(micro_batches)).backward()
        loss_sum += loss.item() / len(micro_batches)
    torch.nn.utils.clip_grad_norm_(draft.parameters(), trainer.config.max_grad_norm)
    grads = {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return loss_sum, grads


@pytest.mark.parametrize("compressor", ["none", "select"])
def test_the_fast_step_gives_the_plain_steps_loss_gradients_and_weights(tmp_path, processor, data, compressor):
    path, records = data
    config = DistillConfig(
        data=path,
        output_dir=str(tmp_path / "run"),
        per_device_batch_size=3,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        save_steps=0,
        progress_bar=False,
        eval_each_epoch=False,
        max_length=256,
        compressor=compressor,
        feature_noise=0.1,
        loss_chunk_rows=5,
    )  # several chunks per micro-batch
    target = tiny_target(seed=2)
    dataset = ConversationDataset(records, processor, ImageResolver(None, path), {1}, 256)
    micro = [Collator(0)([dataset[i] for i in range(k, k + 3)]) for k in (0, 3)]

    def trainer():
        torch.manual_seed(0)
        draft = SpecVLMDraftModel.from_target(target, compressor={"mode": compressor, "cost_weight": 0.05})
        return DistillTrainer(
            config,
            target=target,
            processor=processor,
            draft=draft,
            train_records=records[:12],
            eval_records=records[12:14],
        )

    plain, fast = trainer(), trainer()
    torch.manual_seed(1)  # feature noise and the compressor's Gumbel sampling draw the same numbers in both
    plain_loss, plain_grads = plain_step(plain, micro)
    grads = {}
    fast.optimizer.register_step_pre_hook(
        lambda *_: grads.update({n: p.grad.clone() for n, p in fast.draft.named_parameters() if p.grad is not None})
    )
    torch.manual_seed(1)
    result = fast.train_step(micro)
    assert result["loss"] == pytest.approx(plain_loss, rel=1e-5, abs=1e-6)
    assert set(grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    for (name, weight), plain_weight in zip(fast.draft.state_dict().items(), plain.draft.state_dict().values()):
        torch.testing.assert_close(weight, plain_weight, atol=1e-5, rtol=1e-5, msg=name)


def test_the_step_timer_splits_a_step_into_its_phases(tmp_path, processor, data):
    path, records = data
    config = DistillConfig(
        data=path,
        output_dir=str(tmp_path / "run"),
        per_device_batch_size=2,
        max_steps=2,
        save_steps=0,
        progress_bar=False,
        eval_each_epoch=False,
        max_length=256,
    )
    trainer = DistillTrainer(
        config, target=tiny_target(), processor=processor, train_records=records[:12], eval_records=records[12:14]
    )
    trainer.timer = StepTimer("cpu")
    trainer.train()
    summary = trainer.timer.summary(first_step=1)
    assert summary["steps"] == 1
    assert set(summary["seconds"]) == {"data", "teacher", "draft", "optimizer"}
    assert all(seconds > 0 for seconds in summary["seconds"].values())


def test_the_prefetcher_hands_out_the_loaders_batches_in_order_and_raises_its_errors():
    batches = [{"x": torch.tensor([i])} for i in range(7)]
    assert [int(b["x"]) for b in Prefetcher(batches, depth=2)] == list(range(7))

    def broken():
        yield {"x": torch.tensor([0])}
        raise ValueError("record 1 is broken")

    fetched = Prefetcher(broken(), depth=4)
    assert int(next(fetched)["x"]) == 0
    with pytest.raises(ValueError, match="record 1 is broken"):
        next(fetched)


def endless_batches():
    while True:
        yield {"x": torch.zeros(1)}


def test_a_dropped_prefetcher_leaves_no_thread_behind():
    fetched = Prefetcher(endless_batches(), depth=1)
    next(fetched)
    del fetched
    for _ in range(50):
        if not any(t.name == "specvlm-prefetch" for t in threading.enumerate()):
            break
        threading.Event().wait(0.05)
    assert not any(t.name == "specvlm-prefetch" for t in threading.enumerate())


def test_closing_a_prefetcher_waits_for_its_thread():
    """`close` (the trainer calls it at the end of each epoch's loop) returns once the loading thread has stopped."""
    fetched = Prefetcher(endless_batches(), depth=1)
    next(fetched)
    fetched.close()
    assert not fetched._thread.is_alive()
    with pytest.raises(StopIteration):
        next(fetched)
