"""One process of `test_train_fsdp.py`'s two-process CPU run (gloo): trains a draft with the target sharded
(`shard_target=True`), then checks the sharded target against a whole copy. Not a test module itself.

    RANK=r WORLD_SIZE=2 LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/train_fsdp_worker.py DATA OUT
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch

torch.set_num_threads(1)

from train_fsdp_common import TRAIN, config_settings, tiny_sharding_target
from transformers import AutoProcessor

from specvlm_hf.mini import WEIGHTS_DIR
from specvlm_hf.training import DistillConfig, DistillTrainer
from specvlm_hf.training.data import (
    Collator,
    ConversationDataset,
    ImageResolver,
    load_records,
)
from specvlm_hf.training.objective import teacher_forward
from specvlm_hf.training.sharding import decoder_layers, is_sharded


def main(data_path: str, out: str) -> None:
    rank = int(os.environ["RANK"])
    processor = AutoProcessor.from_pretrained(WEIGHTS_DIR)
    records = load_records(data_path)
    config = DistillConfig(**config_settings(data_path, os.path.join(out, "run"), shard_target=True))
    trainer = DistillTrainer(
        config,
        target=tiny_sharding_target(),
        processor=processor,
        train_records=records[: TRAIN["train"]],
        eval_records=records[TRAIN["train"] : TRAIN["eval_end"]],
    )
    metrics = trainer.train()
    target = trainer.target
    report = {"rank": rank, "world": trainer.accelerator.num_processes, "sharded": is_sharded(target)}
    # every layer weight holds a shard: half of its rows on each of 2 processes
    q = decoder_layers(target)[0].self_attn.q_proj.weight
    report["q_proj_local_rows"], report["q_proj_rows"] = q.to_local().shape[0], q.shape[0]
    report["target_weight_bytes"] = metrics["target_weight_bytes"]

    # the sharded target's teacher pass (every process, its own batch) equals a whole copy's, bit for bit
    whole = tiny_sharding_target()
    dataset = ConversationDataset(records, processor, ImageResolver(None, data_path), {1}, config.max_length)
    batch = Collator(0)([dataset[2 * rank], dataset[2 * rank + 1]])
    with torch.no_grad():
        sharded_teacher = teacher_forward(target, batch)
        whole_teacher = teacher_forward(whole, batch)
    report["teacher_features_equal"] = torch.equal(sharded_teacher.features, whole_teacher.features)
    report["teacher_embeds_equal"] = torch.equal(sharded_teacher.inputs_embeds, whole_teacher.inputs_embeds)

    # the main process decodes alone (greedy, plain and with the trained draft) while the other follows
    if trainer.accelerator.is_main_process:
        import specvlm_hf

        inputs = processor(text="<|user|>\nDescribe this image.<|end|>\n<|assistant|>\n", return_tensors="pt")
        with trainer.lockstep.lead():
            plain = target.generate(**inputs, max_new_tokens=10, do_sample=False)
            specvlm_hf.enable(target)
            draft = trainer.draft.eval()
            draft.config.decoding_mode = "tree"
            speculative = target.generate(**inputs, assistant_model=draft, max_new_tokens=10, do_sample=False)
        expected = whole.generate(**inputs, max_new_tokens=10, do_sample=False)
        report["generate_equal"] = torch.equal(plain, expected)
        report["speculative_equal"] = torch.equal(speculative, expected)
        report["metrics"] = metrics
        torch.save(trainer.draft.state_dict(), os.path.join(out, "draft_state.pt"))
    else:
        trainer.lockstep.follow()
        report["followed_forwards"] = trainer.lockstep.forwards
    with open(os.path.join(out, f"report_{rank}.json"), "w") as handle:
        json.dump(report, handle, default=str)
    trainer.accelerator.wait_for_everyone()
    import torch.distributed as dist

    dist.barrier()  # both ranks done before the group is torn down (gloo once aborted at exit)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
