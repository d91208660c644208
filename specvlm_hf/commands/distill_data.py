"""`specvlm distill-data`: regenerate a dataset's answers with the target itself (self-distillation data).

    specvlm distill-data --data data.json --out data_target.json
    specvlm train --data data_target.json --image-folder <the images of data.json> ...

Every option comes from `specvlm_hf.training.distill_data.DistillDataConfig`.
"""

from __future__ import annotations


def register(subparsers):
    from specvlm_hf.training.config import add_config_arguments
    from specvlm_hf.training.distill_data import DistillDataConfig

    parser = subparsers.add_parser(
        "distill-data",
        help="Regenerate a dataset's answers with the target (self-distillation data).",
        description=__doc__.split("\n\n")[0],
    )
    add_config_arguments(parser, DistillDataConfig)
    parser.set_defaults(func=_run)


def _run(args):
    from specvlm_hf.training.config import config_from_args
    from specvlm_hf.training.distill_data import DistillDataConfig, distill_data

    from specvlm_hf.mini import BUILTIN_MODELS

    from .common import check_model_folder

    config = config_from_args(args, DistillDataConfig)
    if config.target not in BUILTIN_MODELS:
        check_model_folder(config.target, "--target")
    distill_data(config)
    return 0
