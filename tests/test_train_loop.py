"""Draft training: the training view equals inference, a short run learns, resume is exact, NaN stops the run,
a PEFT-wrapped target teaches and generates."""

import math

import pytest
import torch
from transformers import DynamicCache
from transformers import AutoProcessor

import specvlm_hf
from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.mini import WEIGHTS_DIR
from specvlm_hf.adapters import adapter_for
from specvlm_hf.draft_runner import DraftRunner, prompt_pairs
from specvlm_hf.kv_cache import GrowingWindow
from specvlm_hf.target import FeatureTap
from specvlm_hf.training import DistillConfig, DistillTrainer, NonFiniteLossError
from specvlm_hf.training.checkpoint import latest_checkpoint
from specvlm_hf.training.data import Collator, ConversationDataset, ImageResolver, load_records
from specvlm_hf.training.objective import draft_sequences, teacher_forward
from tiny_models import mini_processor_llava, text_config


def tiny_target(seed=0):
    """A random LLaVA that takes the mini VLM's processor (vocab 4096, 128 px images -> 64 image tokens)."""
    text = text_config(vocab=4096, hidden=64, layers=2)
    text.pad_token_id, text.bos_token_id, text.eos_token_id = 0, None, 1
    text.max_position_embeddings = 512
    return mini_processor_llava(text, seed)


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(WEIGHTS_DIR)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from specvlm_hf.mini.data import write_dataset

    folder = tmp_path_factory.mktemp("mini-train")
    path = write_dataset(folder, 40, seed=21)
    return str(path), load_records(str(path))


def _config(tmp_path, data_path, **overrides):
    settings = dict(
        data=data_path,
        output_dir=str(tmp_path / "run"),
        per_device_batch_size=2,
        learning_rate=1e-3,
        save_steps=0,
        log_steps=1,
        progress_bar=False,
        eval_each_epoch=False,
        max_length=256,
    )
    settings.update(overrides)
    return DistillConfig(**settings)


@pytest.mark.parametrize("compressor", ["none", "select"])
def test_training_rows_equal_the_drafts_inference_outputs(processor, data, compressor):
    """Prefill on the prompt (compressed as at inference) + catch-up on the answer's true features gives, token
    for token, the draft outputs the loss is computed on."""
    target = tiny_target()
    draft = SpecVLMDraftModel.from_target(target, compressor={"mode": compressor}).eval()
    path, records = data
    dataset = ConversationDataset(records, processor, ImageResolver(None, path), {1}, 256)
    batch = Collator(0)([dataset[i] for i in range(3)])
    with torch.no_grad():
        teacher = teacher_forward(target, batch)
        seq = draft_sequences(draft, target.config, batch, teacher)
        predicted = draft.decode(seq.fused, attention_mask=seq.attention_mask, position_ids=seq.position_ids)
        for b in range(3):
            n = int(batch["attention_mask"][b].sum())
            ids = batch["input_ids"][b : b + 1, :n]
            n_prompt = int(batch["labels"][b].float().argmax())
            pixels = batch["pixel_values"][b : b + 1] if batch["images_per_example"][b] else None
            with FeatureTap(target) as tap:
                target(input_ids=ids[:, :n_prompt], pixel_values=pixels)
                embeds, features = tap.inputs_embeds, tap.last_hidden_state
            mask, positions = torch.ones(n_prompt, dtype=torch.bool), torch.arange(n_prompt)
            runner = DraftRunner(draft, GrowingWindow(DynamicCache(config=draft.config.text_config), mask[:0]))
            last, _, _ = runner.prefill(
                prompt_pairs(
                    adapter_for(target),
                    draft,
                    ids[:, :n_prompt],
                    embeds,
                    features,
                    ids[:, n_prompt : n_prompt + 1],
                    mask,
                    positions,
                    {},
                )
            )
            inference = [last]
            for t in range(n_prompt, n - 1):
                last, _ = runner.append(
                    draft.embed(ids[:, t + 1 : t + 2]), teacher.features[b : b + 1, t : t + 1], torch.tensor([t])
                )
                last = last[-1]
                inference.append(last)
            inference = torch.stack(inference)  # pairs n_prompt - 1 .. n - 2
            mine = seq.loss_pairs[:, 0] == b
            pairs, rows = seq.loss_pairs[mine, 1], seq.loss_rows[mine, 1]
            keep = pairs >= n_prompt - 1
            assert keep.sum() > 3
            torch.testing.assert_close(
                predicted[b, rows[keep]], inference[pairs[keep] - (n_prompt - 1)], atol=1e-5, rtol=1e-5
            )


def test_short_run_on_the_mini_vlm_lowers_the_loss_and_raises_held_out_sigma(tmp_path, data):
    path, records = data
    config = _config(
        tmp_path,
        path,
        per_device_batch_size=4,
        max_steps=8,
        num_epochs=1,
        eval_each_epoch=True,
        eval_before_training=True,
        eval_max_new_tokens=24,
        unroll_steps=2,
    )
    metrics = DistillTrainer(config, train_records=records[:32], eval_records=records[32:35]).train()
    losses = [entry["loss"] for entry in metrics["train"]]
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2])
    before, after = metrics["eval"][0], metrics["eval"][-1]
    assert after["sigma"]["tree"] > before["sigma"]["tree"] + 0.2
    assert after["depth_agreement"][0] > before["depth_agreement"][0]
    assert (tmp_path / "run" / "scaling_curve.png").exists() or pytest.importorskip("matplotlib") is None
    reloaded = SpecVLMDraftModel.from_pretrained(tmp_path / "run" / "draft")
    assert set(reloaded.state_dict()) == set(SpecVLMDraftModel.from_target(tiny_target()).state_dict())


def test_a_reduced_draft_vocabulary_is_built_from_the_answers_and_trains(tmp_path, data, processor):
    """`--draft-vocab-size N`: the fresh draft scores EOS and the N - 1 most frequent answer tokens, learns (the loss
    falls on those tokens), is saved with its vocabulary, and decodes exactly like plain `generate`."""
    from specvlm_hf.draft_vocab import count_tokens
    from specvlm_hf.training.data import answer_token_ids

    path, records = data
    config = _config(
        tmp_path, path, per_device_batch_size=4, max_steps=6, num_epochs=1, draft_vocab_size=48, learning_rate=2e-3
    )
    trainer = DistillTrainer(config, train_records=records[:32], eval_records=records[32:35])
    metrics = trainer.train()
    losses = [entry["loss"] for entry in metrics["train"]]
    assert losses[-1] < losses[0]
    vocab = trainer.draft.draft_vocab.tolist()
    counts = count_tokens(answer_token_ids(records[:32], processor.tokenizer), 4096)
    frequent = counts.topk(20).indices.tolist()
    assert 1 in vocab and set(frequent) <= set(vocab), "EOS and the most frequent answer tokens are scored"
    reloaded = SpecVLMDraftModel.from_pretrained(tmp_path / "run" / "draft")
    assert reloaded.draft_vocab.tolist() == vocab
    target = specvlm_hf.enable(trainer.target.float())
    example = Collator(0)([trainer.eval_set[0]])
    prompt = int(example["labels"][0].float().argmax())  # the prompt: everything before the first answer token
    inputs = {
        "input_ids": example["input_ids"][:, :prompt],
        "attention_mask": example["attention_mask"][:, :prompt],
        "pixel_values": example["pixel_values"],
    }
    kwargs = dict(max_new_tokens=16, do_sample=False)
    assert (
        target.generate(**inputs, **kwargs, assistant_model=reloaded.bind_target(target)).tolist()
        == target.generate(**inputs, **kwargs).tolist()
    )


class _Killed(Exception):
    pass


def test_a_killed_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
    tmp_path, processor, data, monkeypatch
):
    path, records = data
    # compressor (Gumbel sampling), feature noise and unrolling all draw random numbers; 2 epochs of 6 steps
    common = dict(
        num_epochs=2,
        save_steps=4,
        compressor="select",
        feature_noise=0.2,
        unroll_steps=2,
        lr_scheduler="cosine",
        warmup_steps=2,
    )

    def run(out, kill_at=None, resume=False):
        config = _config(tmp_path, path, output_dir=str(tmp_path / out), resume=resume, **common)
        trainer = DistillTrainer(
            config, target=tiny_target(), processor=processor, train_records=records[:12], eval_records=records[12:14]
        )
        if kill_at is not None:
            original = trainer.train_step

            def step(batches):
                if trainer.step + 1 == kill_at:
                    raise _Killed
                return original(batches)

            monkeypatch.setattr(trainer, "train_step", step)
        trainer.train()
        return trainer.draft.state_dict()

    reference = run("straight")
    with pytest.raises(_Killed):
        run("interrupted", kill_at=11)  # the last checkpoint is step 8, in the middle of epoch 2
    assert latest_checkpoint(tmp_path / "interrupted").name == "checkpoint-8"
    resumed = run("interrupted", resume=True)
    for name, value in reference.items():
        assert torch.equal(value, resumed[name]), name


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, processor, data, monkeypatch):
    path, records = data
    config = _config(tmp_path, path, save_steps=2, num_epochs=1)
    trainer = DistillTrainer(
        config, target=tiny_target(), processor=processor, train_records=records[:12], eval_records=records[12:14]
    )
    original = trainer.train_step

    def step(batches):
        if trainer.step == 3:
            with torch.no_grad():
                trainer.draft.fc.weight[0, 0] = float("nan")
        return original(batches)

    monkeypatch.setattr(trainer, "train_step", step)
    with pytest.raises(NonFiniteLossError, match=r"step 4 .*checkpoint-2.*--resume"):
        trainer.train()
    kept = latest_checkpoint(tmp_path / "run")
    assert kept.name == "checkpoint-2"
    assert all(
        torch.isfinite(v).all() for v in SpecVLMDraftModel.from_pretrained(kept / "draft").state_dict().values()
    )


def test_a_lora_wrapped_target_is_the_teacher_and_generates_losslessly(tmp_path, processor, data):
    peft = pytest.importorskip("peft")
    import specvlm_hf

    base = tiny_target(seed=3)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    target = peft.get_peft_model(base, lora).eval()
    path, records = data
    dataset = ConversationDataset(records, processor, ImageResolver(None, path), {1}, 256)
    batch = Collator(0)([dataset[0], dataset[1]])
    with torch.no_grad():
        adapted = teacher_forward(target, batch).features
        with target.disable_adapter():
            plain = teacher_forward(target, batch).features
    assert not torch.allclose(adapted, plain, atol=1e-4)  # the adapter is what teaches

    config = _config(tmp_path, path, max_steps=2)
    trainer = DistillTrainer(
        config, target=target, processor=processor, train_records=records[:8], eval_records=records[8:10]
    )
    metrics = trainer.train()
    assert all(math.isfinite(e["loss"]) for e in metrics["train"])

    specvlm_hf.enable(target)
    inputs = processor(text="<|user|>\nDescribe this image.<|end|>\n<|assistant|>\n", return_tensors="pt")
    expected = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    for mode in ("tree", "chain"):
        trainer.draft.config.decoding_mode = mode
        out = target.generate(**inputs, assistant_model=trainer.draft, max_new_tokens=12, do_sample=False)
        assert torch.equal(out, expected), mode
