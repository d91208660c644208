"""Draft training: the config and the command line, the data sources, the record errors, distill-data."""

import argparse
import dataclasses
import json

import pytest
import torch

from specvlm_hf.mini import WEIGHTS_DIR
from specvlm_hf.training import DataRecordError, DistillConfig
from specvlm_hf.training.config import add_config_arguments, config_from_args
from specvlm_hf.training.data import Collator, ConversationDataset, ImageResolver, encode_record, load_records


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(WEIGHTS_DIR)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    from specvlm_hf.mini.data import write_dataset

    folder = tmp_path_factory.mktemp("mini-data")
    write_dataset(folder, 8, seed=11)
    return folder


def test_every_config_field_is_a_command_line_option_with_its_default_and_help():
    parser = add_config_arguments(argparse.ArgumentParser())
    assert config_from_args(parser.parse_args([])) == DistillConfig()
    help_text = " ".join(parser.format_help().split())
    for field in dataclasses.fields(DistillConfig):
        assert "--" + field.name.replace("_", "-") in help_text
        assert field.metadata["help"].split()[0] in help_text
    parsed = config_from_args(
        parser.parse_args(
            [
                "--data",
                "d.json",
                "--compressor",
                "select",
                "--unroll-steps",
                "3",
                "--no-bf16",
                "--resume",
                "--max-steps",
                "7",
            ]
        )
    )
    assert parsed == DistillConfig(
        data="d.json", compressor="select", unroll_steps=3, bf16=False, resume=True, max_steps=7
    )


def test_specvlm_train_and_distill_data_are_registered_commands():
    from specvlm_hf.cli import build_parser

    args = build_parser().parse_args(["train", "--data", "x.json", "--learning-rate", "0.001"])
    assert args.command == "train" and config_from_args(args).learning_rate == 0.001
    args = build_parser().parse_args(["distill-data", "--data", "x.json", "--out", "y.json"])
    assert args.command == "distill-data" and args.out == "y.json"


def _write(tmp_path, records):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return str(path)


def _record(**changes):
    record = {
        "id": "r1",
        "image": "missing.png",
        "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A red square."}],
    }
    record.update(changes)
    return record


def test_missing_image_file_is_reported_with_the_record(tmp_path):
    records = load_records(_write(tmp_path, [_record()]))
    with pytest.raises(DataRecordError, match=r"record 0 \(id 'r1'\).*missing.png.*--image-folder"):
        ImageResolver(None, str(tmp_path / "data.json")).check(records)


def test_image_without_image_token_is_reported_with_the_record(tmp_path):
    bad = _record(conversations=[{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A square."}])
    with pytest.raises(DataRecordError, match=r"record 1 \(id 'r1'\) has an image but no <image> token"):
        load_records(_write(tmp_path, [_record(id="r0"), bad]))


def test_empty_answer_is_reported_with_the_record(tmp_path):
    bad = _record(
        id="r7", conversations=[{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "  "}]
    )
    with pytest.raises(DataRecordError, match=r"id 'r7'\) has an empty answer"):
        load_records(_write(tmp_path, [bad]))


def test_image_token_without_image_is_reported(tmp_path):
    bad = {
        "id": "t",
        "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "x"}],
    }
    with pytest.raises(DataRecordError, match=r"1 <image> token\(s\) but 0 image"):
        load_records(_write(tmp_path, [bad]))


def test_labels_cover_each_answer_up_to_its_end_token(processor, dataset_dir):
    records = load_records(str(dataset_dir / "data.json"))
    resolver = ImageResolver(None, str(dataset_dir / "data.json"))
    end = processor.tokenizer.eos_token_id
    for index, record in enumerate(records[:4]):
        images = [resolver.open(record["image"], record, index)] if "image" in record else []
        encoded = encode_record(processor, record, images, {end}, 2048)
        answer = encoded["input_ids"][encoded["labels"]]
        assert answer[-1] == end
        assert processor.decode(answer[:-1]) == record["conversations"][1]["value"]
        # the prompt is exactly what the processor gives for the rendered first turn (image tokens expanded)
        prompt_length = int(encoded["labels"].float().argmax())
        from specvlm_hf.training.data import first_prompt

        expected = processor(text=first_prompt(processor, record), images=images or None, return_tensors="pt")[
            "input_ids"
        ][0]
        assert torch.equal(encoded["input_ids"][:prompt_length], expected)


def test_datasets_folder_with_embedded_images_gives_the_same_batch_as_llava_json(processor, dataset_dir):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    records = load_records(str(dataset_dir / "data.json"))[:4]
    rows = {"id": [], "image": [], "conversations": []}
    for record in records:
        rows["id"].append(record["id"])
        rows["image"].append(Image.open(dataset_dir / "images" / record["image"]) if "image" in record else None)
        rows["conversations"].append(record["conversations"])
    folder = dataset_dir / "hf"
    datasets.Dataset.from_dict(
        rows,
        features=datasets.Features(
            {
                "id": datasets.Value("string"),
                "image": datasets.Image(),
                "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
            }
        ),
    ).save_to_disk(str(folder))
    from_hf = load_records(str(folder))
    a = ConversationDataset(records, processor, ImageResolver(None, str(dataset_dir / "data.json")), {1}, 2048)
    b = ConversationDataset(from_hf, processor, ImageResolver(None, str(folder)), {1}, 2048)
    batch_a, batch_b = Collator(0)([a[i] for i in range(4)]), Collator(0)([b[i] for i in range(4)])
    for key in ("input_ids", "attention_mask", "labels", "images_per_example"):
        assert torch.equal(batch_a[key], batch_b[key])
    assert batch_a["pixel_values"] is not None and torch.allclose(batch_a["pixel_values"], batch_b["pixel_values"])


def test_distill_data_replaces_answers_with_the_targets_greedy_answers(processor, dataset_dir, tmp_path):
    from specvlm_hf.mini import load
    from specvlm_hf.training.distill_data import regenerate_answers

    target, processor = load()
    records = load_records(str(dataset_dir / "data.json"))[:2]
    resolver = ImageResolver(None, str(dataset_dir / "data.json"))
    new, dropped = regenerate_answers(target, processor, records, resolver, batch_size=2, max_new_tokens=12)
    assert dropped == 0 and len(new) == 2
    for index, (old, record) in enumerate(zip(records, new)):
        assert record["conversations"][0] == old["conversations"][0]
        images = [resolver.open(old["image"], old, index)] if "image" in old else []
        from specvlm_hf.training.data import first_prompt

        inputs = processor(text=first_prompt(processor, old), images=images or None, return_tensors="pt")
        out = target.generate(**inputs, max_new_tokens=12, do_sample=False)
        assert (
            record["conversations"][1]["value"]
            == processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        )


def test_the_shipped_default_draft_is_lossless_and_accepts_several_tokens_per_forward_on_the_mini_vlm():
    import specvlm_hf
    from PIL import Image

    from specvlm_hf.mini import EXAMPLE_IMAGE, load
    from specvlm_hf.mini.drafts import DRAFT_NAMES, load_draft

    target, processor = load()
    specvlm_hf.enable(target)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = processor(images=Image.open(EXAMPLE_IMAGE).convert("RGB"), text=text, return_tensors="pt")
    expected = target.generate(**inputs, max_new_tokens=40, do_sample=False)
    for name in DRAFT_NAMES:
        draft = load_draft(target, name)
        out = target.generate(**inputs, assistant_model=draft, max_new_tokens=40, do_sample=False)
        assert torch.equal(out, expected), name
        assert draft.stats.sigma > 2.0, (name, draft.stats.sigma)


def test_specvlm_generate_uses_the_default_draft_and_reports_sigma_and_speedup(capsys):
    from specvlm_hf.cli import main

    assert main(["generate", "--max-new-tokens", "16", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "sigma" in printed and "speedup" in printed and "identical to plain" in printed
