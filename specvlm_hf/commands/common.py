"""What the commands share: the device and decoding-mode rule, checks made before anything is loaded or
decoded, the sentence that says how exact an output is, and the `--compile-cache` folder.

Every check raises `specvlm_hf.errors.UserError` with one line naming the problem and the fix; `specvlm`
prints that line (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..errors import UserError, check_writable_folder, read_json

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ------------------------------------------------------------------------------------ devices and modes
def resolve_device(name: str, flag: str = "--device") -> str:
    """`auto` -> "cuda" when a GPU is visible, else "cpu"; a CUDA device without CUDA is refused."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{flag} {name} was asked for but CUDA is not available; use {flag} cpu.")
    return name


def default_decoding_mode(device) -> str:
    """The decoding mode `specvlm generate`, `specvlm demo` and `specvlm bench` use unless told otherwise:
    "tree" on a GPU, "chain" on a CPU, where scoring a 60-token tree costs more than it saves
    (`results/train_mini_drafts_bench_cpu.json`)."""
    return "chain" if str(device).split(":")[0] == "cpu" else "tree"


# ------------------------------------------------------------------------------------ argument types
def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def probability(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text}")
    return value


# ------------------------------------------------------------------------------------ model folders
def check_safetensors(folder) -> None:
    """Reads the header of every `*.safetensors` file in `folder` (and checks the shards an index names), so a
    missing, empty, truncated or corrupted weights file is named before any model is built."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set((read_json(index, "re-save the model") or {}).get("weight_map", {}).values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise UserError(
                f"{index} names {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} missing from "
                f"{folder}; download or copy the whole model folder again."
            )
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own SafetensorError (and OSError for unreadable files)
            state = "empty" if path.stat().st_size == 0 else "corrupted or truncated"
            raise UserError(f"{path} is {state} ({error}); download or save the model again.") from None


def check_model_folder(name: str, flag: str = "--model"):
    """The configuration of the vision-language model `name` (a folder or a Hub id), read and checked before
    any weight is loaded: `config.json` and the folder's other JSON files parse, the model is an image-text-to-text
    model (not, say, a text-only `LlamaForCausalLM`), and its safetensors files are whole. Returns the config."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise UserError(
                f"{flag} {name} is a file; pass the folder that holds the model's config.json and weights."
            )
        if not (path / "config.json").is_file():
            raise UserError(
                f"{flag} {name} has no config.json; pass a folder written by save_pretrained (model and processor)."
            )
        for json_file in sorted(path.glob("*.json")):
            read_json(json_file, "re-save the model and processor with save_pretrained")
        config_data = read_json(path / "config.json")
        if not isinstance(config_data, dict):
            raise UserError(f"{path / 'config.json'} holds no JSON object; re-save the model with save_pretrained.")
        model_type = config_data.get("model_type")
        architectures = ", ".join(config_data.get("architectures") or []) or "a model"
        if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            raise UserError(
                f"{flag} {name} holds {architectures} (model_type {model_type!r}), not a vision-language model; "
                "pass a LLaVA-style image-text-to-text model folder (with its processor)."
            )
        check_safetensors(path)
    elif not HUB_ID.match(name):
        raise UserError(
            f"{flag} {name}: no such folder; pass a model folder or a Hub id such as llava-hf/llava-1.5-7b-hf."
        )
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise UserError(
            f"{flag} {name}: cannot read its configuration ({first_line}); check the name, or the network for "
            "a Hub id."
        ) from None
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        architectures = ", ".join(getattr(config, "architectures", None) or []) or "a model"
        raise UserError(
            f"{flag} {name} holds {architectures} (model_type {config.model_type!r}), not a vision-language model; "
            "pass a LLaVA-style image-text-to-text model (with its processor)."
        )
    return config


def check_draft_folder(name: str, flag: str = "--draft") -> dict:
    """The `config.json` of a saved SpecVLM draft folder, after checking its JSON and weights."""
    path = Path(name)
    if not path.is_dir():
        raise UserError(f"{flag} {name}: no such folder; pass a folder written by SpecVLMDraftModel.save_pretrained.")
    if not (path / "config.json").is_file():
        raise UserError(
            f"{flag} {name} has no config.json; pass a folder written by SpecVLMDraftModel.save_pretrained."
        )
    config = read_json(path / "config.json", "re-save the draft with SpecVLMDraftModel.save_pretrained")
    if not isinstance(config, dict) or config.get("model_type") != "specvlm_draft":
        found = config.get("model_type") if isinstance(config, dict) else None
        raise UserError(
            f"{flag} {name} holds model_type {found!r}, not a SpecVLM draft ('specvlm_draft'); pass a draft "
            "folder written by SpecVLMDraftModel.save_pretrained."
        )
    if not any(path.glob("*.safetensors")):
        raise UserError(f"{flag} {name} has no model.safetensors; save the draft again with save_pretrained.")
    check_safetensors(path)
    return config


# ------------------------------------------------------------------------------------ requests
def max_positions(model_config) -> int | None:
    """Positions the text model can take (`max_position_embeddings`), or None when it does not say."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return getattr(text, "max_position_embeddings", None)


def check_positions(model_config, prompt_tokens: int, max_new_tokens: int, where: str = "The prompt") -> None:
    """Refuses a request whose prompt plus new tokens would run past the model's positions (past them a model
    with learned or fixed positions produces garbage), before any decoding."""
    limit = max_positions(model_config)
    if limit is None or prompt_tokens + max_new_tokens <= limit:
        return
    if prompt_tokens >= limit:
        raise UserError(
            f"{where} takes {prompt_tokens} tokens (image included), at least the model's {limit} positions; "
            "shorten the prompt."
        )
    raise UserError(
        f"{where} takes {prompt_tokens} tokens (image included); with --max-new-tokens {max_new_tokens} that is "
        f"{prompt_tokens + max_new_tokens}, more than the model's {limit} positions; pass --max-new-tokens "
        f"{limit - prompt_tokens} or less, or shorten the prompt."
    )


# ------------------------------------------------------------------------------------ results
def exactness_note(dtype: str, identical: bool) -> str:
    """How a speculative greedy output compares with plain greedy `generate`, and what to expect in `dtype`."""
    if identical:
        if dtype == "float32":
            return "output identical to plain greedy decoding (float32: exact, token for token)"
        return (
            f"output identical to plain greedy decoding ({dtype}: near-ties may differ, as the target's kernels "
            "round a batch of 1 token and a tree of many differently; float32 is exact)"
        )
    if dtype == "float32":
        return (
            "output DIFFERENT from plain greedy decoding: in float32 they must be equal token for token, so this "
            "is a bug; please report it with this command line"
        )
    return (
        f"output DIFFERENT from plain greedy decoding at a near-tie: in {dtype} the target's own kernels round "
        "a batch of 1 token and a tree of many tokens differently, so outputs can part at near-ties; float32 is "
        "exact token for token (--dtype float32)"
    )


# ------------------------------------------------------------------------------------ compile cache
def add_compile_cache_argument(parser) -> None:
    """`--compile-cache DIR` (`specvlm generate` and `specvlm bench`)."""
    parser.add_argument(
        "--compile-cache",
        default=None,
        metavar="DIR",
        help="With static caches on a GPU: keep the fast path's compiled round functions and torch's compile caches "
        "in DIR, so that a later run loads them instead of compiling (seconds instead of minutes on a 7B target); "
        "see `specvlm compile-cache` to list or prune it. Also: $SPECVLM_COMPILE_CACHE.",
    )


def open_compile_cache(folder: str | None):
    """The `--compile-cache` folder opened for this process (`startup.open_compile_cache`), or None."""
    if folder is None:
        return None
    from ..startup import open_compile_cache as open_cache

    check_writable_folder(folder, "--compile-cache")
    return open_cache(folder)


def close_compile_cache(compile_cache) -> None:
    """Saves torch's artifacts into the `--compile-cache` folder and says what was loaded and compiled."""
    if compile_cache is not None:
        compile_cache.save()
        print(f"[{compile_cache.summary()}]")
