"""The Qwen2.5-VL-style mini target ("mini-qwen") and Qwen-VL targets in every command.

Until the GPU-trained weights are shipped, the commands run on a tiny mini-qwen built by the same training code
(`specvlm_hf.mini.train`, `architecture="qwen2_5_vl"`, a few steps); once `results/mini_qwen.json` records a real
run, the shipped weights and draft must be there (`test_shipped_mini_qwen`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import specvlm_hf.mini as mini
from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.cli import main
from specvlm_hf.mini.data import make_example, write_dataset
from specvlm_hf.processors import load_processor

RESULTS = Path(__file__).resolve().parents[1] / "results" / "mini_qwen.json"
TINY = dict(
    architecture="qwen2_5_vl",
    patch_size=8,
    num_train_examples=120,
    tokenizer_examples=200,
    vocab_size=700,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    vision_hidden_size=32,
    vision_layers=2,
    vision_heads=2,
    batch_size=8,
    max_steps=2,
    warmup_steps=1,
    workers=1,
    log_every=1,
    device="cpu",
    save_dtype="float32",
)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    """A tiny mini-qwen (model + processor folder) and a random EagleVLM draft folder for it."""
    from specvlm_hf.mini.train import MiniTrainConfig, train

    folder = tmp_path_factory.mktemp("mini-qwen")
    result = train(MiniTrainConfig(output_dir=str(folder / "weights"), **TINY))
    torch.manual_seed(0)
    SpecVLMDraftModel.from_target(result["model"]).save_pretrained(folder / "draft")
    return folder / "weights", folder / "draft"


@pytest.fixture()
def builtin_qwen(tiny_qwen, monkeypatch):
    """`--model mini-qwen` resolves to the tiny one (shipped weights are tested by `test_shipped_mini_qwen`)."""
    monkeypatch.setattr(mini, "QWEN_WEIGHTS_DIR", tiny_qwen[0])
    monkeypatch.setattr(mini, "QWEN_DRAFT_DIR", tiny_qwen[1])
    return tiny_qwen


def test_processor_loads_without_torchvision_and_training_tensors_equal_its_outputs(tiny_qwen):
    from specvlm_hf.mini.tokenizer import encode_record, image_to_uint8, normalize_pixels, prompt_text, qwen_grid

    processor = load_processor(str(tiny_qwen[0]))
    assert type(processor).__name__ == "Qwen2_5_VLProcessor" and processor.image_token == "<|image_pad|>"
    record, image = next(make_example(9, i) for i in range(50) if make_example(9, i)[1] is not None)
    inputs = processor(images=[image], text=[prompt_text(processor, record)], return_tensors="pt")
    ids, labels = encode_record(processor, record, 128)
    assert inputs["input_ids"][0].tolist() == ids[: labels.count(-100)]
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 64  # 16 x 16 patches, merged 2 x 2
    assert inputs["image_grid_thw"].tolist() == qwen_grid(1, 128, processor.image_processor).tolist() == [[1, 16, 16]]
    pixels = normalize_pixels(torch.from_numpy(image_to_uint8(image, 128))[None], processor.image_processor)
    torch.testing.assert_close(pixels, inputs["pixel_values"], atol=1e-5, rtol=0)
    # dynamic resolution: a wide image gets its own grid
    wide = processor(images=[image.resize((256, 128))], text=[prompt_text(processor, record)], return_tensors="pt")
    assert wide["image_grid_thw"].tolist() == [[1, 16, 32]]


def test_training_batches_carry_the_models_own_mrope_positions(tiny_qwen):
    from transformers import AutoModelForImageTextToText

    from specvlm_hf.mini.train import encode_dataset, make_batch

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen[0]).eval()
    processor = load_processor(str(tiny_qwen[0]))
    data = encode_dataset(str(tiny_qwen[0]), 5, 12, 128, 384, 0, workers=1)
    batch = make_batch(data, torch.arange(12), processor.image_processor, image_token_id=model.config.image_token_id)
    expected, deltas = model.model.get_rope_index(
        batch["input_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
        mm_token_type_ids=batch["mm_token_type_ids"],
    )
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["position_ids"][:, real], expected[:, real])
    assert bool((deltas != 0).any())  # the images really move the text positions (1-D positions would differ)
    with torch.no_grad():
        explicit = model(**batch).loss
        batch.pop("position_ids")
        assert torch.allclose(model(**batch).loss, explicit)


def test_specvlm_train_on_a_qwen_target_uses_mrope_in_the_teacher_and_measures_sigma(tiny_qwen, tmp_path):
    from transformers import AutoModelForImageTextToText

    from specvlm_hf.target import FeatureTap
    from specvlm_hf.training import DistillConfig, DistillTrainer
    from specvlm_hf.training.data import Collator, ConversationDataset, ImageResolver, load_records
    from specvlm_hf.training.objective import teacher_forward

    path = write_dataset(tmp_path / "data", 20, seed=23)
    records = load_records(str(path))
    target = AutoModelForImageTextToText.from_pretrained(tiny_qwen[0]).eval()
    processor = load_processor(str(tiny_qwen[0]))
    dataset = ConversationDataset(records, processor, ImageResolver(None, str(path)), {1}, 384)
    examples = [dataset[i] for i in range(4)]
    batch = Collator(0)(examples)
    assert batch["image_grid_thw"] is not None
    assert batch["images_per_example"].tolist() == [int(e["pixel_values"] is not None) for e in examples]
    teacher = teacher_forward(target, batch)
    mm_types = (batch["input_ids"] == target.config.image_token_id).int()
    kwargs = dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
    )
    positions, _ = target.model.get_rope_index(
        batch["input_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
        mm_token_type_ids=mm_types,
    )
    with torch.no_grad(), FeatureTap(target) as tap:
        target(**kwargs, position_ids=positions)
        mrope = tap.last_hidden_state.clone()
        target(**kwargs)  # no mm_token_type_ids: transformers falls back to 1-D positions
        one_d = tap.last_hidden_state.clone()
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(teacher.features[real], mrope[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(teacher.features[real], one_d[real], atol=1e-3)

    config = DistillConfig(
        data=str(path), output_dir=str(tmp_path / "run"), per_device_batch_size=4, max_steps=3, num_epochs=1,
        save_steps=0, log_steps=1, progress_bar=False, eval_each_epoch=True, eval_max_new_tokens=8, max_length=384,
    )  # fmt: skip
    metrics = DistillTrainer(
        config, target=target, processor=processor, train_records=records[:16], eval_records=records[16:18]
    ).train()
    assert len(metrics["train"]) == 3 and all(entry["loss"] == entry["loss"] for entry in metrics["train"])
    assert metrics["eval"][-1]["sigma"]["tree"] >= 1.0


@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_generate_on_a_qwen_folder_with_its_processor_equals_plain_greedy(tiny_qwen, capsys, mode):
    weights, draft = tiny_qwen
    argv = ["generate", "--model", weights, "--draft", draft, "--mode", mode, "--device", "cpu"]
    status = main([str(a) for a in argv + ["--max-new-tokens", "12"]])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "output identical to plain greedy decoding (float32: exact" in out, out
    assert "[12 tokens" in out, out  # a real comparison: the whole budget was generated


def test_mini_qwen_is_a_built_in_model_of_generate_train_and_distill_data(builtin_qwen, capsys, tmp_path):
    status = main(["generate", "--model", "mini-qwen", "--device", "cpu", "--max-new-tokens", "6", "--mode", "tree"])
    out = capsys.readouterr().out
    assert status == 0 and "with the default draft (tree)" in out and "output identical" in out, out
    status = main(["generate", "--model", "mini-qwen", "--draft", "specvlm", "--device", "cpu"])
    assert status != 0 and "not of mini-qwen" in capsys.readouterr().err

    bench = ["bench", "--target", "mini-qwen", "--num-prompts", "1", "--max-new-tokens", "6", "--device", "cpu"]
    status = main(bench + ["--methods", "plain,eaglevlm-tree", "--out", str(tmp_path / "bench.json")])
    runs = {r["method"]: r for r in json.loads((tmp_path / "bench.json").read_text())["methods"]}
    assert status == 0 and runs["eaglevlm-tree"]["matches_plain"] is True, capsys.readouterr()

    path = write_dataset(tmp_path / "data", 6, seed=24)
    train = ["train", "--target", "mini-qwen", "--data", path, "--output-dir", tmp_path / "run", "--max-steps", "1"]
    status = main([str(a) for a in train + ["--per-device-batch-size", "2", "--no-progress-bar", "--device", "cpu"]])
    assert status == 0, capsys.readouterr()
    assert (tmp_path / "run" / "draft" / "model.safetensors").exists()
    distill = ["distill-data", "--target", "mini-qwen", "--data", path, "--out", tmp_path / "distilled.json"]
    status = main([str(a) for a in distill + ["--max-new-tokens", "4", "--device", "cpu"]])
    assert status == 0, capsys.readouterr()


def test_shipped_mini_qwen():
    """Once a real run is recorded in results/, its weights and draft are shipped within the size budget."""
    if not RESULTS.exists() or json.loads(RESULTS.read_text()).get("smoke", True):
        assert not (mini.QWEN_WEIGHTS_DIR / "config.json").exists(), "weights shipped without results/mini_qwen.json"
        return
    shards = sorted(mini.QWEN_WEIGHTS_DIR.glob("*.safetensors"))
    draft = mini.QWEN_DRAFT_DIR / "model.safetensors"
    assert shards and all(s.stat().st_size <= 14.5e6 for s in shards) and draft.exists()
    assert sum(s.stat().st_size for s in shards) + draft.stat().st_size <= 40e6
    model, processor = mini.load(name="mini-qwen")
    assert (
        type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
        and model.config.text_config.num_hidden_layers >= 8
    )
    assert SpecVLMDraftModel.from_pretrained(mini.QWEN_DRAFT_DIR).bind_target(model) is not None
    if (mini.QWEN_DRAFT_DIR.parent / "qwen_specvlm" / "model.safetensors").exists():  # the video run's drafts
        from specvlm_hf.commands.bench import _mini_drafts

        drafts = _mini_drafts(model, "mini-qwen")
        assert set(drafts) == {"eaglevlm", "specvlm"}
        assert drafts["specvlm"].config.compressor["mode"] != "none" == drafts["eaglevlm"].config.compressor["mode"]


def test_the_demo_runs_mini_qwen_with_its_draft(builtin_qwen):
    import specvlm_hf
    from specvlm_hf.demo_app import compare, load_models

    models = load_models("mini-qwen")
    assert type(models.target).__name__ == "Qwen2_5_VLForConditionalGeneration" and models.name.endswith("mini-qwen")
    models.draft.config.decoding_mode = "tree"
    specvlm_hf.enable(models.target)
    *_, (plain, spec, stats) = compare(models, str(mini.EXAMPLE_IMAGE), "Describe this image.", 8)
    assert "outputs identical: **yes**" in stats, stats


# ---------------------------------------------------------------------------------------------------------------
# clips for the video mini target (`benchmarks/train_mini_video.py`)
def test_a_still_clips_patches_are_its_images_patches():
    """A clip whose two frames are one image patchifies to that image's rows (the image processor repeats a still
    image over the temporal patch): the video layout agrees with the image layout the tests pin to Qwen's."""
    from specvlm_hf.mini.tokenizer import build_qwen_processor, qwen_patches, qwen_video_patches, train_tokenizer

    processor = build_qwen_processor(train_tokenizer(["a b c"], 300, qwen_vision_tokens=True), 64, 8)
    image = processor.image_processor
    frame = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    rows, grid = qwen_video_patches(frame.expand(2, -1, -1, -1), image)
    mean = torch.tensor(image.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image.image_std).view(1, 3, 1, 1)
    values = (frame.float() * image.rescale_factor - mean) / std
    torch.testing.assert_close(rows, qwen_patches(values, 8, 2, 2))
    assert grid.tolist() == [[1, 8, 8]]
    odd, odd_grid = qwen_video_patches(torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8), image)
    assert odd_grid.tolist() == [[2, 8, 8]] and odd.shape[0] == 2 * 64  # the last frame repeated


def test_clip_batches_run_the_target_and_a_compressing_draft_trains_on_their_frames(tiny_qwen):
    """A clip record encodes to as many `<|video_pad|>` tokens as its patches merge into (the target's forward
    checks it), and the distillation objective compresses the clip's video tokens with the layouts given."""
    import importlib.util

    from specvlm_hf.adapters import adapter_for
    from specvlm_hf.training.objective import DistillationObjective, draft_sequences, teacher_forward

    spec = importlib.util.spec_from_file_location(
        "train_mini_video", Path(__file__).resolve().parents[1] / "benchmarks" / "train_mini_video.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    target = mini_target(tiny_qwen[0])
    processor = load_processor(str(tiny_qwen[0]))
    rows = script.clip_rows(processor, 0, 0, 2, 4, 64)
    batch = script.collate(rows, processor, target.config, torch.device("cpu"))
    video = int((batch["input_ids"] == target.config.video_token_id).sum())
    assert video == 2 * 2 * 16  # per clip: 2 temporal patches of 8 x 8 patches merged 2 x 2
    batch["labels"] = batch.pop("answer")
    batch["layouts"] = script.clip_layouts(adapter_for(target), batch)
    assert [len(layouts) for layouts in batch["layouts"]] == [1, 1] and batch["layouts"][0][0].temporal
    teacher = teacher_forward(target, batch)  # raises if the placeholders and the patches disagree
    draft = SpecVLMDraftModel.from_target(target, compressor={"mode": "fixed", "fixed": "tpool@2"}).bind_target(target)
    sequences = draft_sequences(draft, target.config, batch, teacher)
    plain = draft_sequences(SpecVLMDraftModel.from_target(target).bind_target(target), target.config, batch, teacher)
    assert int(sequences.attention_mask.sum()) == int(plain.attention_mask.sum()) - video // 2
    loss = DistillationObjective(draft, target.config)(batch, teacher).loss
    loss.backward()
    assert torch.isfinite(loss) and draft.fc.weight.grad is not None


def mini_target(folder):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_generate_with_a_video_on_mini_qwen_without_torchvision(builtin_qwen, capsys, tmp_path, mode):
    """`specvlm generate --model mini-qwen --video FILE`: the Qwen processor built without torchvision still takes
    the clip (`processors.qwen_video_inputs`), and the output equals plain greedy decoding."""
    pytest.importorskip("av", reason="PyAV (the `video` extra) is not installed")
    from test_video_files import write_clip

    write_clip(tmp_path / "clip.mp4", frames=8, size=64)
    args = ["generate", "--model", "mini-qwen", "--video", str(tmp_path / "clip.mp4"), "--mode", mode]
    assert main(args + ["--max-new-tokens", "6", "--prompt", "Which way does it move?"]) == 0
    out = capsys.readouterr().out
    assert "output identical to plain greedy decoding" in out, out


def test_the_demo_takes_a_video_on_mini_qwen_without_torchvision(builtin_qwen, tmp_path):
    """The Space's video upload on a Qwen-VL processor built without its video processor: the clip goes through
    `qwen_video_inputs`, and SpecVLM's output equals plain `generate`'s."""
    pytest.importorskip("av", reason="PyAV (the `video` extra) is not installed")
    import specvlm_hf
    from specvlm_hf.demo_app import compare, load_models
    from specvlm_hf.hf_internals import NoVideoProcessor
    from test_video_files import write_clip

    models = load_models("mini-qwen")
    if not isinstance(models.processor.video_processor, NoVideoProcessor):
        pytest.skip("torchvision is installed: the processor has Qwen's own video processor")
    specvlm_hf.enable(models.target)
    models.draft.config.decoding_mode = "tree"
    write_clip(tmp_path / "clip.mp4", frames=8, size=64)
    *_, (plain, spec, stats) = compare(models, None, "Which way does it move?", 6, video_path=tmp_path / "clip.mp4")
    assert "outputs identical: **yes**" in stats, stats


def test_qwen_video_inputs_expand_the_placeholder_to_the_patches(tiny_qwen):
    from specvlm_hf.processors import qwen_video_inputs, takes_video

    processor = load_processor(str(tiny_qwen[0]))
    assert takes_video(processor)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    frames = np.random.default_rng(0).integers(0, 256, (5, 40, 70, 3), dtype=np.uint8)
    inputs = qwen_video_inputs(processor, frames, text)
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert t == 3 and inputs["pixel_values_videos"].shape[0] == t * h * w
    assert int((inputs["mm_token_type_ids"] == 2).sum()) == t * h * w // 4
