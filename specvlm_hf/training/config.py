"""`DistillConfig`: every option of draft training, defined once (the Python API and `specvlm train` share it).

`add_config_arguments(parser, DistillConfig)` turns the dataclass into command-line options (one per field,
with its default and help); `config_from_args` turns parsed arguments back into the dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field

from ..errors import UserError


def option(default, help: str, choices: tuple | None = None):
    """A dataclass field with its help text (and allowed values) for the command line."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


@dataclass
class DistillConfig:
    """Online logit distillation of a SpecVLM / EagleVLM draft from a frozen VLM target (one config per run).

    Loss on assistant tokens: `lambda_logit * soft-CE(draft logits, teacher logits) + lambda_feat *
    SmoothL1(draft feature, target feature)` (+ `cost_weight * expected visual fraction` with a gated
    compressor). See `docs/training.md`.
    """

    # ---- models
    target: str = option(
        "mini", "Target VLM: a folder or Hub id of a supported VLM, or 'mini' / 'mini-qwen' for a built-in mini VLM."
    )
    target_dtype: str = option("float32", "dtype the target is loaded in.", ("float32", "bfloat16", "float16"))
    adapter: str | None = option(
        None, "A PEFT adapter (folder) applied to the target; the adapted model is the teacher."
    )
    attn_implementation: str = option("sdpa", "Attention backend of the target and the draft.", ("sdpa", "eager"))
    shard_target: bool = option(
        False,
        "Shard the frozen target over the processes of `accelerate launch --num_processes N` (FSDP2: each process "
        "holds 1/N of every decoder layer of its language model; the embedding, lm_head and vision tower stay whole "
        "on every process) instead of replicating it, for targets that do not fit one GPU. The draft still trains "
        "data-parallel. Needs N >= 2 processes and torch >= 2.7; each process loads the target into host memory "
        "once before sharding it.",
    )
    draft: str | None = option(
        None,
        "Continue from this draft folder (its config, compressor included, is kept); "
        "default: a fresh draft sized to the target.",
    )
    num_draft_layers: int = option(1, "Decoder layers of a fresh draft.")
    draft_vocab_size: int | None = option(
        None,
        "A fresh draft scores only this many target tokens: the most frequent in the training answers, plus EOS "
        "(for large vocabularies, e.g. 32768 for Qwen or Gemma); default: the full vocabulary.",
    )
    compressor: str = option(
        "none",
        "Visual compressor of a fresh draft ('none' = EagleVLM).",
        ("none", "fixed", "select", "weighted", "concat"),
    )
    compressor_branches: str | None = option(
        None,
        "Comma-separated branches for select/concat, e.g. 'prune@4,pool@4,conv@3,resampler@2,text' "
        "(default: the compressor's).",
    )
    compressor_fixed: str = option("pool@4", "The branch of compressor='fixed'.")
    compressor_ratio: float = option(3.0, "Compression ratio of compressor='weighted'.")
    gumbel_temperature: float = option(1.0, "Gumbel-softmax temperature of the gated compressor.")
    cost_weight: float = option(
        0.0, "Penalty on the gate's expected fraction of visual tokens kept (a fresh draft's compressor cost_weight)."
    )
    # ---- data
    data: str = option(
        "", "Training data: a LLaVA-format JSON file (with --image-folder) or a Hugging Face `datasets` folder."
    )
    image_folder: str | None = option(
        None,
        "Folder that the records' 'image' paths are relative to "
        "(default: the JSON file's folder, then its images/ subfolder).",
    )
    eval_data: str | None = option(
        None, "Held-out data for evaluation (same formats); default: the last --eval-examples records of --data."
    )
    eval_examples: int = option(16, "Held-out prompts for the per-epoch evaluation.")
    max_examples: int | None = option(None, "Use at most this many training records.")
    max_length: int = option(2048, "Longest training sequence in tokens (longer ones are cut).")
    # ---- optimisation
    output_dir: str = option(
        "specvlm-draft",
        "Folder for checkpoints, the final draft, metrics.json and the scaling-curve plot. A folder that is not "
        "empty is refused unless --resume or --overwrite-output-dir is given; it must be writable (checked before "
        "the first step).",
    )
    overwrite_output_dir: bool = option(
        False,
        "Start afresh in a non-empty output_dir: deletes the previous run's checkpoints, draft/, metrics.json and "
        "scaling_curve.png first (other files stay).",
    )
    num_epochs: int = option(1, "Passes over the training data (ignored when max_steps is given).")
    max_steps: int | None = option(
        None,
        "Total optimizer steps; overrides num_epochs as in Hugging Face's Trainer (the data is passed over as often "
        "as needed). Default: num_epochs full passes.",
    )
    max_train_minutes: float | None = option(
        None, "Stop (evaluate, checkpoint, save the draft) once training has run this long."
    )
    per_device_batch_size: int = option(8, "Sequences per micro-batch on each device.")
    gradient_accumulation_steps: int = option(
        1, "Micro-batches per optimizer step (global batch = this x per-device batch x devices)."
    )
    learning_rate: float = option(8e-5, "Peak AdamW learning rate (the paper: 8e-5 for 7B targets).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.95, "AdamW beta2.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    lr_scheduler: str = option("constant", "Learning-rate schedule after warm-up.", ("constant", "linear", "cosine"))
    warmup_steps: int = option(0, "Linear warm-up steps.")
    max_grad_norm: float = option(0.5, "Gradient clipping norm (0 disables).")
    lambda_logit: float = option(0.1, "Weight of the soft cross-entropy against the teacher's logits.")
    lambda_feat: float = option(1.0, "Weight of the SmoothL1 regression of the target's final features.")
    feature_noise: float = option(
        0.0, "Augmentation: noise added to the target features the draft reads (0 disables)."
    )
    feature_noise_type: str = option(
        "uniform", "Noise distribution: uniform in [-a/2, a/2] or gaussian with std a.", ("uniform", "gaussian")
    )
    unroll_steps: int = option(
        1,
        "Train k >= 1 steps ahead: step j feeds the draft its own step j-1 predictions as the features of the "
        "answer tokens (beyond the paper).",
    )
    unroll_detach: bool = option(True, "Stop gradients through the fed-back predictions of unrolled steps.")
    loss_chunk_rows: int = option(
        1024,
        "Answer tokens scored through the lm_head at once by the soft cross-entropy (memory: a few chunk x "
        "vocabulary fp32 tensors; the loss is the same for any value).",
    )
    bf16: bool = option(True, "bf16 autocast on CUDA (ignored on CPU).")
    seed: int = option(0, "Seed of the initialisation, the data order and the augmentation.")
    # ---- checkpoints, logging, evaluation
    save_steps: int = option(500, "Write a checkpoint every this many optimizer steps (and at the end of each epoch).")
    save_total_limit: int = option(2, "Checkpoints kept (older ones are deleted).")
    resume: bool = option(
        False,
        "Continue from the latest checkpoint in output_dir (weights, optimizer, scheduler, RNG, data position). "
        "The run's settings must be the checkpoint's, except those in RESUME_MAY_CHANGE (the total step count only "
        "with the constant schedule).",
    )
    log_steps: int = option(10, "Record the loss every this many optimizer steps.")
    eval_each_epoch: bool = option(
        True, "After each epoch: measure sigma with the real decoder on held-out prompts, and per-depth agreement."
    )
    eval_before_training: bool = option(False, "Also evaluate the untrained draft (epoch 0).")
    eval_modes: str = option("tree", "Comma-separated decoding modes measured at each evaluation: tree, chain.")
    eval_max_new_tokens: int = option(64, "New tokens per held-out prompt when measuring sigma.")
    eval_depths: int = option(4, "Depths of the per-depth top-1 agreement.")
    num_workers: int = option(0, "Data-loader worker processes per device.")
    device: str = option("auto", "'auto' (the Accelerate device: cuda if available), 'cpu' or 'cuda'.")
    progress_bar: bool = option(True, "Show a progress bar with loss and token agreement.")

    def __post_init__(self):
        for name in (
            "unroll_steps",
            "per_device_batch_size",
            "gradient_accumulation_steps",
            "num_epochs",
            "max_steps",
            "log_steps",
            "eval_examples",
            "eval_max_new_tokens",
            "eval_depths",
            "max_length",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be at least 1, got {value}; pass --{name.replace('_', '-')} 1 or more.")
        for name in ("save_steps", "save_total_limit", "warmup_steps", "num_workers"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be 0 or more, got {getattr(self, name)}.")
        if self.max_examples is not None and self.max_examples < 1:
            raise UserError(f"max_examples must be at least 1, got {self.max_examples}.")
        if self.resume and self.overwrite_output_dir:
            raise UserError(
                "--resume continues the run in output_dir and --overwrite-output-dir deletes it; pass one of them."
            )
        modes = [m for m in self.eval_modes.split(",") if m]
        if any(m not in ("tree", "chain") for m in modes):
            raise UserError(f"eval_modes takes tree and/or chain, got {self.eval_modes!r}")

    def compressor_settings(self) -> dict:
        """The `compressor` dict of a fresh draft's config."""
        settings = {
            "mode": self.compressor,
            "gumbel_temperature": self.gumbel_temperature,
            "cost_weight": self.cost_weight,
        }
        if self.compressor_branches:
            settings["branches"] = [b.strip() for b in self.compressor_branches.split(",") if b.strip()]
        if self.compressor == "fixed":
            settings["fixed"] = self.compressor_fixed
        if self.compressor == "weighted":
            settings["ratio"] = self.compressor_ratio
        return settings

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RESUME_MAY_CHANGE = (
    "output_dir",
    "resume",
    "overwrite_output_dir",
    "num_epochs",
    "max_steps",
    "max_train_minutes",
    "save_steps",
    "save_total_limit",
    "log_steps",
    "eval_each_epoch",
    "eval_before_training",
    "eval_modes",
    "eval_max_new_tokens",
    "eval_depths",
    "num_workers",
    "device",
    "progress_bar",
)
"""Settings a resumed run may change. Every other one shapes the weights, the data order or the batches, so a
resume with another value is refused. The total step count (from num_epochs / max_steps) may change only with
lr_scheduler "constant": the other schedules are shaped by it."""


def resume_conflicts(
    saved: dict, config: DistillConfig, saved_total_steps: int | None = None, total_steps: int | None = None
) -> list[str]:
    """`name: saved -> now` for every setting a resume from a checkpoint written with `saved` may not change."""
    now = config.to_dict()
    conflicts = [
        f"{name}: {saved[name]!r} -> {now[name]!r}"
        for name in now
        if name in saved and name not in RESUME_MAY_CHANGE and saved[name] != now[name]
    ]
    if (
        saved_total_steps is not None
        and total_steps is not None
        and saved_total_steps != total_steps
        and config.lr_scheduler != "constant"
    ):
        conflicts.append(f"total steps with the {config.lr_scheduler} schedule: {saved_total_steps} -> {total_steps}")
    return conflicts


# ------------------------------------------------------------------------------------- command line
def _base_type(annotation):
    """`int | None` -> (int, True); `str` -> (str, False). Annotations are strings under `from __future__`."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing}, {})  # our own field annotations only
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [a for a in args if a is not type(None)]
        return kinds[0], True
    return annotation, False


def add_config_arguments(parser: argparse.ArgumentParser, cls=DistillConfig) -> argparse.ArgumentParser:
    """Adds one `--option-name` per dataclass field (its default, help and choices)."""
    for f in dataclasses.fields(cls):
        kind, optional = _base_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "") + f" (default: {f.default})"
        if kind is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
        else:
            parser.add_argument(
                flag,
                dest=f.name,
                type=kind,
                default=f.default,
                choices=f.metadata.get("choices"),
                help=help_text,
                metavar=f.name.upper() if f.metadata.get("choices") is None else None,
            )
    return parser


def config_from_args(args: argparse.Namespace, cls=DistillConfig):
    """The dataclass from parsed arguments (extra attributes such as `func` are ignored)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
