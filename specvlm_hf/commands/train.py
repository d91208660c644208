"""`specvlm train`: train a SpecVLM / EagleVLM draft for a VLM target by online logit distillation.

    specvlm train --data data.json --output-dir out                      # EagleVLM draft for the mini VLM
    specvlm train --target llava-hf/llava-1.5-7b-hf --data mix665k.json --image-folder images \
        --compressor select --num-epochs 3 --output-dir llava-draft
    accelerate launch --num_processes 2 -m specvlm_hf.cli train ...       # data-parallel on 2 GPUs
    accelerate launch --multi_gpu --num_processes 2 -m specvlm_hf.cli train --shard-target ...  # target sharded (FSDP)

Every option comes from `specvlm_hf.training.DistillConfig` (the Python API takes the same fields).
"""

from __future__ import annotations


def register(subparsers):
    from specvlm_hf.training.config import add_config_arguments

    parser = subparsers.add_parser(
        "train", help="Train a draft for a target by online logit distillation.", description=__doc__.split("\n\n")[0]
    )
    add_config_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args):
    import torch

    from specvlm_hf.training import DistillTrainer
    from specvlm_hf.training.config import config_from_args

    from specvlm_hf.mini import BUILTIN_MODELS

    from .common import check_draft_folder, check_model_folder

    config = config_from_args(args)
    # the models named are checked before anything is loaded (the output folder is checked by the trainer)
    if config.target not in BUILTIN_MODELS:
        check_model_folder(config.target, "--target")
    if config.draft:
        check_draft_folder(config.draft)
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    metrics = DistillTrainer(config).train()
    if "final_draft" not in metrics:  # not the main process
        return 0
    evals = metrics.get("eval", [])
    if evals:
        last = evals[-1]
        print(
            "sigma by epoch: "
            + "; ".join(f"{e['epoch']:g}: " + ", ".join(f"{m} {s:.2f}" for m, s in e["sigma"].items()) for e in evals)
        )
        print(f"final depth agreement: {' '.join(f'{a:.3f}' for a in last['depth_agreement'])}")
    print(f"draft saved to {metrics.get('final_draft')}; metrics in {config.output_dir}/metrics.json")
    return 0
