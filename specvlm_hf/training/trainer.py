"""`DistillTrainer`: online logit distillation of a draft from a frozen VLM target, on Hugging Face Accelerate.

    from specvlm_hf.training import DistillConfig, DistillTrainer
    DistillTrainer(DistillConfig(data="data.json", output_dir="out", num_epochs=3)).train()

Each optimizer step, on every process: the target (frozen, no grad) reads a micro-batch and gives the
teacher's features; the draft (and its compressor) learns from them (`objective.DistillationObjective`).
`accelerate launch --num_processes N -m specvlm_hf.cli train ...` runs the same code data-parallel (DDP):
each process takes its slice of every global batch, so a global batch holds the same examples for any
number of processes. With `--shard-target` the target's language-model layers are sharded over the
processes (FSDP2, `sharding.py`) instead of replicated; the draft stays data-parallel. After each epoch
the main process measures sigma with the real decoder on held-out prompts (`evaluation.measure_sigma`)
and per-depth agreement, and redraws the scaling curve.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..errors import UserError, write_atomic
from ..modeling_specvlm_draft import SpecVLMDraftModel
from ..target import unwrap_target
from .checkpoint import (
    latest_checkpoint,
    load_draft_weights,
    prepare_output_dir,
    rng_state,
    save_checkpoint,
    saved_run,
    set_rng_state,
)
from .config import DistillConfig, resume_conflicts
from ..draft_vocab import choose_draft_vocab, count_tokens
from .data import (
    Collator,
    ConversationDataset,
    ImageResolver,
    answer_token_ids,
    first_prompt,
    load_records,
    record_images,
)
from .evaluation import measure_sigma, plot_scaling_curve, prompt_inputs
from .objective import DistillationObjective, teacher_forward
from .prefetch import Prefetcher
from .sharding import Lockstep, shard_target, target_memory


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced a NaN / inf loss or gradient; the last good checkpoint is kept."""

    exit_status = 1


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_target(config: DistillConfig, device="cpu"):
    """The frozen target and its processor: a built-in mini VLM ("mini", "mini-qwen") or a VLM folder / Hub id of
    any supported family (Auto classes, the model's own processor; with an optional PEFT adapter)."""
    from ..mini import BUILTIN_MODELS

    dtype = DTYPES[config.target_dtype]
    if config.target in BUILTIN_MODELS:
        from ..mini import load

        target, processor = load(dtype=dtype, device=device, name=config.target)
    else:
        from transformers import AutoModelForImageTextToText

        from ..processors import load_processor

        target = AutoModelForImageTextToText.from_pretrained(
            config.target, dtype=dtype, attn_implementation=config.attn_implementation
        ).to(device)
        processor = load_processor(config.target)
    if config.adapter:
        from peft import PeftModel

        target = PeftModel.from_pretrained(target, config.adapter)
    return target, processor


def eos_token_ids(target, processor) -> set[int]:
    ids = set()
    for source in (
        getattr(unwrap_target(target), "generation_config", None),
        getattr(processor, "tokenizer", processor),
    ):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    return ids


class DistillTrainer:
    """Trains a SpecVLM / EagleVLM draft for a target (see the module docstring).

    Args:
        config: every option of the run.
        target, processor: a loaded target and processor (default: loaded from `config.target`).
        draft: a draft to train (default: `config.draft`, or a fresh one sized to the target).
        train_records, eval_records: records instead of `config.data` / `config.eval_data`.
    """

    timer = None  # a `step_timer.StepTimer` to time the phases of every step (benchmarks/train_throughput.py)

    def __init__(
        self, config: DistillConfig, target=None, processor=None, draft=None, train_records=None, eval_records=None
    ):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.config = config
        cuda = torch.cuda.is_available() and config.device != "cpu"
        if draft is not None:
            compressing = draft.compressor is not None
        elif config.draft:
            from ..configuration_specvlm_draft import SpecVLMDraftConfig

            compressing = SpecVLMDraftConfig.from_pretrained(config.draft).compressor.get("mode", "none") != "none"
        else:
            compressing = config.compressor != "none"
        self.accelerator = Accelerator(
            cpu=not cuda,
            mixed_precision="bf16" if (config.bf16 and cuda) else "no",
            # a gated compressor runs one branch per image: the others get no gradient in that step
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=compressing)],
        )
        device = self.accelerator.device
        # the output folder is checked before anything is loaded or trained: never a late failure, never lost work
        self.output_dir = Path(config.output_dir)
        prepare_output_dir(
            self.output_dir, config.resume, config.overwrite_output_dir, self.accelerator.is_main_process
        )
        self.accelerator.wait_for_everyone()
        resume_from = latest_checkpoint(self.output_dir) if config.resume else None
        world = self.accelerator.num_processes
        self.global_batch = config.per_device_batch_size * config.gradient_accumulation_steps * world
        if resume_from is not None:
            self._check_resume(resume_from)
        if config.shard_target:
            self._check_sharding()
        torch.manual_seed(config.seed)
        if target is None:
            # a sharded target is loaded into host memory first: its layers reach the device one shard at a time
            target, processor = load_target(config, "cpu" if config.shard_target else device)
        self.lockstep = None
        if config.shard_target:
            self.target = target.eval().requires_grad_(False)
            shard_target(self.target, device, self.accelerator.num_processes)
            self.lockstep = Lockstep(self.target, device)
        else:
            self.target = target.to(device).eval().requires_grad_(False)
        self.processor = processor
        fresh_draft = draft is None and not config.draft
        if draft is None:
            if config.draft:
                draft = SpecVLMDraftModel.from_pretrained(config.draft)
            else:
                draft = SpecVLMDraftModel.from_target(
                    self.target,
                    num_draft_layers=config.num_draft_layers,
                    compressor=config.compressor_settings(),
                    draft_vocab_size=config.draft_vocab_size,
                    attn_implementation=config.attn_implementation,
                )
        draft.bind_target(self.target)
        self.draft = draft.to(device=device, dtype=torch.float32).train()  # fp32 master weights; bf16 via autocast

        # data
        if train_records is None:
            if not config.data:
                raise UserError("No training data: pass --data (a LLaVA JSON file or a datasets folder).")
            train_records = load_records(config.data, config.max_examples)
        if eval_records is None:
            if config.eval_data:
                eval_records = load_records(config.eval_data, config.eval_examples)
            else:
                held = min(config.eval_examples, max(len(train_records) // 10, 1))
                train_records, eval_records = train_records[:-held], train_records[-held:]
        self.resolver = ImageResolver(config.image_folder, config.data or None)
        self.eval_resolver = (
            ImageResolver(config.image_folder, config.eval_data) if config.eval_data else self.resolver
        )
        self.resolver.check(train_records)
        self.eval_resolver.check(eval_records)
        self.eos_ids = eos_token_ids(self.target, processor)
        tokenizer = getattr(processor, "tokenizer", processor)
        if fresh_draft and config.draft_vocab_size:  # the target's most frequent answer tokens, EOS always
            counts = count_tokens(answer_token_ids(train_records, tokenizer), self.draft.config.text_config.vocab_size)
            self.draft.set_draft_vocab(choose_draft_vocab(counts, config.draft_vocab_size, always=self.eos_ids))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.collate = Collator(pad)
        self.train_set = ConversationDataset(train_records, processor, self.resolver, self.eos_ids, config.max_length)
        self.eval_set = ConversationDataset(
            eval_records, processor, self.eval_resolver, self.eos_ids, config.max_length
        )
        self.steps_per_epoch = len(self.train_set) // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(
                f"{len(self.train_set)} training records are fewer than one global batch ({self.global_batch} = "
                f"{config.per_device_batch_size} per device x {config.gradient_accumulation_steps} accumulation "
                f"x {world} processes); lower the batch size or add data."
            )
        # as in Hugging Face's Trainer: max_steps, when given, is the run's length, however many epochs it takes
        self.total_steps = (
            config.max_steps if config.max_steps is not None else self.steps_per_epoch * config.num_epochs
        )

        # optimisation
        self.objective = DistillationObjective(
            self.draft,
            unwrap_target(self.target).config,
            config.lambda_logit,
            config.lambda_feat,
            config.feature_noise,
            config.feature_noise_type,
            config.unroll_steps,
            config.unroll_detach,
            config.loss_chunk_rows,
        )
        self.optimizer = torch.optim.AdamW(
            [p for p in self.draft.parameters() if p.requires_grad],
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
            fused=True if device.type == "cuda" else None,  # one kernel for all parameters on a GPU
        )
        from transformers import get_scheduler

        name = "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler
        self.scheduler = get_scheduler(
            name, self.optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=self.total_steps
        )
        self.model = self.accelerator.prepare(self.objective)

        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.metrics = {
            "config": config.to_dict(),
            "processes": world,
            "global_batch": self.global_batch,
            "target_weight_bytes": target_memory(self.target),
            "train": [],
            "eval": [],
        }
        if config.resume:
            self._resume(resume_from)

    def _check_resume(self, checkpoint: Path) -> None:
        """Refuses to resume `checkpoint` with settings that would change the weights, the data order or the
        batches (naming each), before anything is loaded."""
        saved = saved_run(checkpoint)
        conflicts = resume_conflicts(saved.get("config", {}), self.config)
        if saved.get("global_batch") not in (None, self.global_batch):
            conflicts.append(
                f"global batch (per device x accumulation x {self.accelerator.num_processes} processes): "
                f"{saved['global_batch']} -> {self.global_batch}"
            )
        if conflicts:
            raise UserError(
                f"--resume: {checkpoint} was written with other settings ({'; '.join(conflicts)}); resume with the "
                "checkpoint's settings, or start afresh with --overwrite-output-dir or another --output-dir."
            )

    def _check_sharding(self) -> None:
        """`shard_target` needs several processes of a plain multi-process launch (not Accelerate's own FSDP /
        DeepSpeed, which would shard the small trained draft rather than the frozen target)."""
        from accelerate.utils import DistributedType

        accelerator = self.accelerator
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise UserError(
                f"--shard-target shards the frozen target itself; this run was launched with Accelerate's "
                f"{accelerator.distributed_type.value} plugin, which would wrap the small trained draft instead. "
                "Launch without --use_fsdp / --use_deepspeed: `accelerate launch --multi_gpu --num_processes N -m "
                "specvlm_hf.cli train ... --shard-target`."
            )
        if accelerator.num_processes < 2:
            where = f"{torch.cuda.device_count()} GPU(s) visible" if torch.cuda.is_available() else "no GPU visible"
            raise UserError(
                "--shard-target shards the target over the processes of a multi-process launch, but this run has "
                f"1 process ({where}). Launch it with `accelerate launch --multi_gpu --num_processes N -m "
                "specvlm_hf.cli train ... --shard-target` (N >= 2, one process per GPU; on CPUs: "
                "`torchrun --nproc_per_node N -m specvlm_hf.cli train --device cpu ...`), "
                "or drop --shard-target to train with a whole target on one device."
            )

    # ------------------------------------------------------------------------------------------------ data
    def _batches(self, epoch: int, start: int):
        """This process's micro-batches of `epoch` from optimizer step `start` on (index lists, in order)."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train_set), generator=generator).tolist()
        per, accum = self.config.per_device_batch_size, self.config.gradient_accumulation_steps
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        for step in range(start, self.steps_per_epoch):
            chunk = order[step * self.global_batch : (step + 1) * self.global_batch]
            for k in range(accum):
                first = (k * world + rank) * per
                yield chunk[first : first + per]

    def _loader(self, dataset, batches):
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=list(batches),
            collate_fn=self.collate,
            num_workers=self.config.num_workers,
            generator=torch.Generator().manual_seed(0),  # never draw from the global RNG (exact resume)
            persistent_workers=False,
        )

    def _to_device(self, batch: dict) -> dict:
        # asynchronous from the prefetcher's pinned memory: the copy queues behind the GPU's work
        return {
            k: v.to(self.accelerator.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }

    def _phase(self, name: str, host: bool = False):
        return self.timer.phase(name, self.step, host) if self.timer is not None else nullcontext()

    # ------------------------------------------------------------------------------------------ checkpoints
    def _run_settings(self) -> dict:
        """What a checkpoint records about the run, to check a later resume against (`training_config.json`)."""
        return {
            "config": self.config.to_dict(),
            "global_batch": self.global_batch,
            "total_steps": self.total_steps,
            "processes": self.accelerator.num_processes,
        }

    def _state(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "metrics": self.metrics,
            **self._run_settings(),
        }

    def save(self) -> Path | None:
        """Writes a checkpoint of the current step (main process writes; every process's RNG is kept)."""
        states = (
            self.accelerator.gather_for_metrics([rng_state()], use_gather_object=True)
            if self.accelerator.num_processes > 1
            else [rng_state()]
        )
        path = None
        if self.accelerator.is_main_process:
            path = save_checkpoint(
                self.output_dir,
                self.step,
                self.accelerator.unwrap_model(self.model).draft,
                self._state(),
                states,
                self.config.save_total_limit,
                run=self._run_settings(),
            )
        self.accelerator.wait_for_everyone()
        return path

    def _resume(self, checkpoint: Path | None) -> None:
        if checkpoint is None:
            self.accelerator.print(f"--resume: no checkpoint in {self.output_dir}; starting from scratch.")
            return
        state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False)
        conflicts = resume_conflicts({}, self.config, state.get("total_steps"), self.total_steps)
        if conflicts:
            raise UserError(
                f"--resume: {checkpoint} was written with other settings ({'; '.join(conflicts)}); "
                "keep --num-epochs / --max-steps as they were (or use --lr-scheduler constant, whose schedule does "
                "not depend on the run's length), or start afresh with --overwrite-output-dir."
            )
        load_draft_weights(self.accelerator.unwrap_model(self.model).draft, checkpoint / "draft")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.metrics = state["metrics"]
        rng_file = checkpoint / f"rng_state_{self.accelerator.process_index}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        self.metrics["config"] = (
            self.config.to_dict()
        )  # the settings of this run (resume_conflicts allowed the changes)
        if self.step >= self.total_steps:
            self.accelerator.print(
                f"resumed from {checkpoint}: it is at step {self.step}, the end of this run "
                f"({self.total_steps} steps), so there is nothing to train; raise --num-epochs or --max-steps to "
                "train further."
            )
            return
        self.accelerator.print(
            f"resumed from {checkpoint} (step {self.step} of {self.total_steps}, epoch {self.epoch}, "
            f"step {self.step_in_epoch} of it)"
        )

    def _write_metrics(self) -> None:
        if not self.accelerator.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.output_dir / "metrics.json", json.dumps(self.metrics, indent=1, default=str) + "\n")

    # ------------------------------------------------------------------------------------------- training
    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; returns its metrics.

        The host reads the step's numbers from the GPU once, after the backward passes (the finite check
        needs them before the optimizer step), so the GPU is never left waiting between micro-batches.
        """
        accum = len(micro_batches)
        device = self.accelerator.device
        zero = torch.zeros((), device=device)
        sums = {"loss": zero, "logit_loss": zero, "feature_loss": zero, "agreement": zero, "tokens": zero}
        rows, fractions = 0, []
        for k, batch in enumerate(micro_batches):
            with self._phase("teacher"), self.accelerator.autocast():
                teacher = teacher_forward(self.target, batch, inference_mode=self.lockstep is None)
            sync = nullcontext() if k == accum - 1 else self.accelerator.no_sync(self.model)
            with self._phase("draft"), sync:
                out = self.model(batch, teacher)
                self.accelerator.backward(out.loss / accum)
            sums["loss"] = sums["loss"] + out.loss.detach() / accum
            sums["logit_loss"] = sums["logit_loss"] + out.logit_loss / accum
            sums["feature_loss"] = sums["feature_loss"] + out.feature_loss / accum
            sums["agreement"] = sums["agreement"] + out.agreement[0] * out.rows[0]
            sums["tokens"] = sums["tokens"] + batch["attention_mask"].sum()
            rows += out.rows[0]
            if out.visual_fraction is not None:
                fractions.append(out.visual_fraction)
        with self._phase("optimizer"):
            grad_norm = None
            if self.config.max_grad_norm:
                grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
            check = torch.stack([sums["loss"], grad_norm.float() if grad_norm is not None else zero])
            check = self.accelerator.reduce(check, reduction="sum")
            values = torch.stack(
                [
                    check.isfinite().all().float(),
                    sums["loss"],
                    grad_norm.float() if grad_norm is not None else zero,
                    sums["logit_loss"],
                    sums["feature_loss"],
                    sums["agreement"],
                    sums["tokens"].float(),
                    torch.stack(fractions).mean() if fractions else zero,
                ]
            ).tolist()  # the step's one wait
            finite, loss, norm, logit_loss, feature_loss, agreement, tokens, fraction = values
            grad_norm = norm if grad_norm is not None else None
            if not finite:
                self.optimizer.zero_grad(set_to_none=True)
                last = latest_checkpoint(self.output_dir)
                raise NonFiniteLossError(
                    f"Non-finite loss or gradient at step {self.step + 1} (loss {loss}, gradient norm {grad_norm}); "
                    "stopped without updating the weights. "
                    f"The last good checkpoint is {last or 'none (no checkpoint yet)'}; "
                    "lower --learning-rate or --max-grad-norm, check the data, then continue with --resume."
                )
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": loss,
            "logit_loss": logit_loss,
            "feature_loss": feature_loss,
            "agreement": agreement / max(rows, 1),
            "grad_norm": grad_norm,
            "tokens": int(tokens),
            "visual_fraction": fraction if fractions else None,
        }

    def train(self) -> dict:
        """Runs (or continues) training; returns the metrics (also in `output_dir/metrics.json`)."""
        config, accelerator = self.config, self.accelerator
        if config.eval_before_training and not self.metrics["eval"] and self.step == 0:
            self.evaluate(epoch=0)
        progress = None
        if config.progress_bar and accelerator.is_main_process:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, desc="distill", dynamic_ncols=True)
        started = time.perf_counter()
        budget = config.max_train_minutes * 60 if config.max_train_minutes else math.inf
        out_of_time = False
        window = {
            "loss": 0.0,
            "agreement": 0.0,
            "logit_loss": 0.0,
            "feature_loss": 0.0,
            "n": 0,
            "tokens": 0,
            "start": time.perf_counter(),
        }
        while self.step < self.total_steps:
            micro = Prefetcher(
                self._loader(self.train_set, self._batches(self.epoch, self.step_in_epoch)),
                depth=2 * config.gradient_accumulation_steps,
                pin_memory=accelerator.device.type == "cuda",
            )
            try:
                while self.step_in_epoch < self.steps_per_epoch and self.step < self.total_steps and not out_of_time:
                    with self._phase("data", host=True):
                        batches = [self._to_device(next(micro)) for _ in range(config.gradient_accumulation_steps)]
                    result = self.train_step(batches)
                    self.step += 1
                    self.step_in_epoch += 1
                    for key in ("loss", "agreement", "logit_loss", "feature_loss"):
                        window[key] += result[key]
                    window["n"] += 1
                    window["tokens"] += result["tokens"]
                    if progress is not None:
                        progress.update(1)
                        progress.set_postfix(
                            loss=f"{result['loss']:.4f}", agree=f"{result['agreement']:.3f}", epoch=self.epoch + 1
                        )
                    if self.step % config.log_steps == 0 or self.step == self.total_steps:
                        self._log(window, result)
                        window = {k: 0 for k in window} | {"start": time.perf_counter()}
                    if config.save_steps and self.step % config.save_steps == 0:
                        self.save()
                    out_of_time = self._agree(time.perf_counter() - started > budget)
            finally:
                micro.close()  # the epoch's loading thread stops here, not at interpreter exit
            if self.step_in_epoch >= self.steps_per_epoch or self.step >= self.total_steps or out_of_time:
                epoch_done = self.step_in_epoch >= self.steps_per_epoch
                fraction = self.step_in_epoch / self.steps_per_epoch
                if config.eval_each_epoch:
                    self.evaluate(epoch=self.epoch + fraction)
                if epoch_done:
                    self.epoch += 1
                    self.step_in_epoch = 0
                self.save()
                if not epoch_done or out_of_time:
                    if out_of_time:
                        accelerator.print(
                            f"max_train_minutes reached at step {self.step} (epoch {self.epoch + fraction:.2f})."
                        )
                    break
        if progress is not None:
            progress.close()
        if accelerator.device.type == "cuda":
            peak = torch.tensor(
                [float(torch.cuda.max_memory_allocated(accelerator.device))], device=accelerator.device
            )
            self.metrics["peak_memory_bytes"] = [int(v) for v in accelerator.gather(peak).tolist()]  # per process
        if accelerator.is_main_process:
            final = self.output_dir / "draft"
            accelerator.unwrap_model(self.model).draft.save_pretrained(final)
            self.metrics["final_draft"] = str(final)
        self._write_metrics()
        accelerator.wait_for_everyone()
        return self.metrics

    def _agree(self, flag: bool) -> bool:
        """True on every process when it is True on any (all processes stop at the same step)."""
        if self.accelerator.num_processes == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor(float(flag), device=self.accelerator.device), "sum").item())

    def _log(self, window: dict, last: dict) -> None:
        n = max(window["n"], 1)
        seconds = time.perf_counter() - window["start"]
        device = self.accelerator.device
        tokens = self.accelerator.reduce(torch.tensor(float(window["tokens"]), device=device), "sum").item()
        # the mean over processes: each process's loss is that of its own slice of the global batch
        keys = ("loss", "logit_loss", "feature_loss", "agreement")
        means = torch.tensor([window[k] / n for k in keys], dtype=torch.float64, device=device)
        means = dict(zip(keys, self.accelerator.reduce(means, "mean").tolist()))
        entry = {
            "step": self.step,
            "epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch,
            "loss": means["loss"],
            "logit_loss": means["logit_loss"],
            "feature_loss": means["feature_loss"],
            "agreement": means["agreement"],
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": last["grad_norm"],
            "tokens_per_second": tokens / max(seconds, 1e-9),
            "steps_per_second": n / max(seconds, 1e-9),
        }
        if last.get("visual_fraction") is not None:
            entry["visual_fraction"] = last["visual_fraction"]
        self.metrics["train"].append(entry)
        self._write_metrics()

    # ------------------------------------------------------------------------------------------ evaluation
    def eval_prompts(self) -> list[dict]:
        """Model inputs of the held-out records' first user turns."""
        model = unwrap_target(self.target)
        prompts = []
        for index, record in enumerate(self.eval_set.records):
            images = [self.eval_resolver.open(image, record, index) for image in record_images(record)]
            prompts.append(
                prompt_inputs(
                    self.processor, first_prompt(self.processor, record), images, self.accelerator.device, model.dtype
                )
            )
        return prompts

    @torch.no_grad()
    def depth_agreement(self) -> tuple[list[float], float]:
        """Top-1 agreement with the target at depths 1..eval_depths (unrolled, see `objective`) and the depth-1
        loss, on the held-out conversations (teacher-forced)."""
        objective = self.accelerator.unwrap_model(self.model)
        objective.eval()
        agree = [0.0] * self.config.eval_depths
        rows = [0] * self.config.eval_depths
        loss, batches = 0.0, 0
        loader = self._loader(
            self.eval_set,
            [
                list(range(i, min(i + self.config.per_device_batch_size, len(self.eval_set))))
                for i in range(0, len(self.eval_set), self.config.per_device_batch_size)
            ],
        )
        for batch in loader:
            batch = self._to_device(batch)
            with self.accelerator.autocast():
                teacher = teacher_forward(self.target, batch, inference_mode=self.lockstep is None)
                out = objective(batch, teacher, unroll_steps=self.config.eval_depths)
            for d in range(self.config.eval_depths):
                agree[d] += float(out.agreement[d]) * out.rows[d]
                rows[d] += out.rows[d]
            loss += out.loss.item()
            batches += 1
        objective.train()
        return [a / max(r, 1) for a, r in zip(agree, rows)], loss / max(batches, 1)

    def evaluate(self, epoch: float) -> dict | None:
        """Sigma per decoding mode with the real decoder, per-depth agreement; appended to the metrics and
        drawn to `output_dir/scaling_curve.png`. Runs on the main process; the RNG of training is untouched.
        With a sharded target the other processes follow the main process's target forwards (`Lockstep`)."""
        if self.lockstep is None:
            result = self._evaluate_on_main(epoch)
        elif self.accelerator.is_main_process:
            with self.lockstep.lead():
                result = self._evaluate_on_main(epoch)
        else:
            self.lockstep.follow()
            result = None
        self.accelerator.wait_for_everyone()
        return result

    def _evaluate_on_main(self, epoch: float) -> dict | None:
        accelerator = self.accelerator
        result = None
        if accelerator.is_main_process:
            devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                start = time.perf_counter()
                draft = accelerator.unwrap_model(self.model).draft
                prompts = self.eval_prompts()
                sigma, details = {}, {}
                for mode in [m for m in self.config.eval_modes.split(",") if m]:
                    measured = measure_sigma(self.target, draft, prompts, mode, self.config.eval_max_new_tokens)
                    sigma[mode] = measured["sigma"]
                    details[mode] = measured
                depth, eval_loss = self.depth_agreement()
                result = {
                    "epoch": epoch,
                    "step": self.step,
                    "sigma": sigma,
                    "depth_agreement": depth,
                    "eval_loss": eval_loss,
                    "decoding": details,
                    "seconds": time.perf_counter() - start,
                }
            self.metrics["eval"].append(result)
            accelerator.print(
                f"epoch {epoch:g}: sigma "
                + ", ".join(f"{m} {s:.3f}" for m, s in sigma.items())
                + " | depth agreement "
                + " ".join(f"{a:.3f}" for a in depth)
            )
            self._write_metrics()
            plot_scaling_curve(self.metrics, self.output_dir / "scaling_curve.png")
        return result


def train(config: DistillConfig, **kwargs) -> dict:
    """Builds a `DistillTrainer` and runs it; returns the metrics."""
    return DistillTrainer(config, **kwargs).train()
