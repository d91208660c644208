"""The mini VLM's training script runs end to end on CPU and learns."""

import json

from specvlm_hf.mini.train import MiniTrainConfig, learning_rate, main, train

TINY = dict(
    num_train_examples=400,
    tokenizer_examples=300,
    vocab_size=1024,
    vision_hidden_size=32,
    vision_layers=1,
    vision_heads=2,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    batch_size=16,
    learning_rate=3e-3,
    warmup_steps=3,
    max_steps=25,
    max_minutes=5.0,
    device="cpu",
    workers=1,
    log_every=1,
)


def test_training_a_few_steps_on_cpu_lowers_the_loss(tmp_path):
    summary = train(MiniTrainConfig(output_dir=str(tmp_path), **TINY))
    losses = [entry["loss"] for entry in summary["history"]]
    assert summary["steps"] == 25
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0


def test_training_saves_a_loadable_llava_folder(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    main([f"--output_dir={tmp_path}"] + [f"--{k}={v}" for k, v in {**TINY, "max_steps": 2}.items()])
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert model.config.text_config.num_hidden_layers == 2 and len(processor.tokenizer) == 1024
    assert json.loads((tmp_path / "train_config.json").read_text())["summary"]["steps"] == 2


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = MiniTrainConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(config, 0, 0.0) == 0.1
    assert learning_rate(config, 10, 0.0) == 1.0
    assert abs(learning_rate(config, 500, 1.0) - 0.1) < 1e-9
