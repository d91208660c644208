"""Draft training by online logit distillation from a frozen VLM target (`specvlm train`).

- `config.DistillConfig`: every option, once (the command line is generated from it);
- `data`: LLaVA-format JSON + image folder or a `datasets` folder, rendered with the target's chat template;
- `objective`: the teacher pass and the loss (soft CE + SmoothL1 on answer tokens, compressor included);
- `trainer.DistillTrainer`: the loop on Hugging Face Accelerate (DDP with `accelerate launch`), atomic
  checkpoints and exact `--resume`, NaN guard, per-epoch sigma with the real decoder;
- `sharding`: `--shard-target`, the frozen target's language-model layers sharded over the processes (FSDP2);
- `evaluation`: sigma measurement and the training-time scaling curve;
- `distill_data`: regenerate answers with the target itself (self-distillation data).
"""

from .config import DistillConfig
from .data import DataRecordError
from .trainer import DistillTrainer, NonFiniteLossError, train

__all__ = ["DataRecordError", "DistillConfig", "DistillTrainer", "NonFiniteLossError", "train"]
