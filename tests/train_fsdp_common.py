"""Shared by `test_train_fsdp.py` and its two-process worker: the target and the run settings."""

from tiny_models import mini_processor_llava
from transformers import LlamaConfig

# records [0, train) train, [train, eval_end) are held out
TRAIN = {"train": 16, "eval_end": 18}


def tiny_sharding_target(seed: int = 0):
    """A random LLaVA that takes the mini VLM's processor (vocab 4096, 64 image tokens), with 3 decoder layers
    and an MLP width (99) that 2 processes cannot split evenly (FSDP pads the last shard)."""
    text = LlamaConfig(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=99,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
    )
    return mini_processor_llava(text, seed)


def config_settings(data_path: str, output_dir: str, **overrides) -> dict:
    """`DistillConfig` fields of the comparison: 4 steps of a global batch of 4 (2 processes x 2, or 1 process
    x 2 x 2 accumulated), no randomness beyond the seed (no compressor sampling, no feature noise), one
    evaluation at the end (sigma with the real decoder)."""
    settings = {
        "data": data_path,
        "output_dir": output_dir,
        "per_device_batch_size": 2,
        "learning_rate": 2e-3,
        "max_steps": 4,
        "save_steps": 0,
        "log_steps": 1,
        "progress_bar": False,
        "eval_each_epoch": True,
        "eval_max_new_tokens": 12,
        "eval_depths": 2,
        "max_length": 256,
        "seed": 0,
    }
    return settings | overrides
