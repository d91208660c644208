"""`specvlm generate`: answer a prompt about an image with a LLaVA model (by default the built-in mini VLM).

    specvlm generate                                        # describe the bundled example image
    specvlm generate --image photo.png --prompt "How many circles are there?"
    specvlm generate --draft eaglevlm --mode chain          # another shipped draft, chain decoding
    specvlm generate --draft none                           # plain greedy decoding only
    specvlm generate --fast --mode tree                     # static caches: the fast path (CUDA graphs on a GPU)

With the built-in mini VLM, speculative decoding uses its shipped default draft (`specvlm_hf.mini.drafts`).
Prints the answer, sigma (tokens accepted per target forward) and the speedup over plain `generate`.
"""

from __future__ import annotations

import time
from pathlib import Path

DEFAULT_PROMPT = "Describe this image."


def register(subparsers):
    parser = subparsers.add_parser(
        "generate", help="Generate text for an image and a prompt.", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--image", default=None, help="Image file (default: the mini VLM's bundled example image).")
    parser.add_argument("--no-image", action="store_true", help="Send the prompt alone, without any image.")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"User prompt (default: {DEFAULT_PROMPT!r}).")
    parser.add_argument("--model", default=None, help="LLaVA model + processor folder (default: the built-in mini VLM).")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="Most tokens to generate (default: 200).")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="Weights dtype.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed (matters only for sampling).")
    parser.add_argument(
        "--draft", default="default",
        help="Draft for speculative decoding: 'default' (the mini VLM's shipped draft; none for --model), a shipped "
        "draft name ('specvlm', 'eaglevlm'), a draft folder, or 'none' for plain decoding only.",
    )
    parser.add_argument(
        "--mode", default=None, choices=["tree", "chain"],
        help="Decoding mode (default: tree on a GPU, chain on the CPU, where scoring a 60-token tree costs more than it "
        "saves: results/train_mini_drafts_bench_cpu.json).",
    )
    parser.add_argument(
        "--fast", action="store_true",
        help="Static KV caches for both runs: plain decoding with transformers' compiled static cache against the "
        "SpecVLM fast path (CUDA graphs on a GPU). The untimed warm-up call compiles (tens of seconds on a GPU).",
    )
    parser.set_defaults(func=_run)


def build_inputs(processor, image, prompt: str):
    """Chat-formatted model inputs for one user turn: `input_ids`, `attention_mask` `(1, length)` and,
    when `image` is given, `pixel_values` `(1, 3, H, W)`."""
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    if image is None:
        return processor(text=text, return_tensors="pt")
    return processor(images=image, text=text, return_tensors="pt")


def run_generate(model, processor, image, prompt: str, max_new_tokens: int = 200, **generate_kwargs) -> tuple[str, dict]:
    """Generate an answer to `prompt` about `image` (a PIL image, or None for text only).

    `generate_kwargs` go to `model.generate` (greedy by default; e.g. `assistant_model=` for speculative
    decoding). Returns `(text, stats)`, where stats has `new_tokens`, `seconds` (prefill included) and
    `tokens_per_second`.
    """
    import torch

    device = next(model.parameters()).device
    inputs = build_inputs(processor, image, prompt).to(device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    generate_kwargs.setdefault("do_sample", False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    text = processor.decode(new_tokens, skip_special_tokens=True)
    stats = {"new_tokens": int(len(new_tokens)), "seconds": seconds, "tokens_per_second": len(new_tokens) / seconds}
    return text, stats


def load_image(path):
    """Open an image file as RGB, with an error that names the file if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise SystemExit(f"Image {path} does not exist; pass an existing file with --image.")
    try:
        return Image.open(path).convert("RGB")
    except UnidentifiedImageError:
        raise SystemExit(f"{path} is not an image PIL can read; pass a PNG or JPEG file with --image.") from None


def _run(args):
    import torch

    from specvlm_hf.mini import EXAMPLE_IMAGE, WEIGHTS_DIR

    torch.manual_seed(args.seed)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device} was asked for but CUDA is not available; use --device cpu.")
    dtype = getattr(torch, args.dtype)

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_dir = args.model or WEIGHTS_DIR
    if not Path(model_dir, "config.json").exists():
        raise SystemExit(f"No model found in {model_dir}; pass a LLaVA folder with --model.")
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    image = None if args.no_image else load_image(args.image or EXAMPLE_IMAGE)

    draft = _load_draft(args.draft, model, using_mini=args.model is None)
    if draft is not None:
        draft.config.decoding_mode = args.mode or ("tree" if device.startswith("cuda") else "chain")

    # One untimed warm-up call, so that the reported speed is that of decoding, not of first-call set-up (with
    # --fast, of the full length: static caches are compiled and graphed per length)
    fast = {"cache_implementation": "static"} if args.fast else {}
    warmup_tokens = args.max_new_tokens if args.fast else 2
    run_generate(model, processor, image, args.prompt, max_new_tokens=warmup_tokens, **fast)
    text, stats = run_generate(model, processor, image, args.prompt, args.max_new_tokens, **fast)
    if draft is None:
        print(text.strip())
        print(
            f"\n[{stats['new_tokens']} tokens in {stats['seconds']:.2f} s: {stats['tokens_per_second']:.1f} tokens/s "
            f"on {device} ({args.dtype})]"
        )
        return 0
    import specvlm_hf

    specvlm_hf.enable(model)
    run_generate(model, processor, image, args.prompt, max_new_tokens=warmup_tokens, assistant_model=draft, **fast)
    spec_text, spec_stats = run_generate(model, processor, image, args.prompt, args.max_new_tokens, assistant_model=draft,
                                         **fast)
    print(spec_text.strip())
    same = "identical to" if spec_text == text else "DIFFERENT from"
    print(
        f"\n[{spec_stats['new_tokens']} tokens in {spec_stats['seconds']:.2f} s: {spec_stats['tokens_per_second']:.1f} tokens/s "
        f"with the {args.draft if args.draft != 'default' else 'default'} draft ({draft.config.decoding_mode}"
        f"{', fast path' if args.fast and draft.config.decoding_mode == 'tree' else ''}) on {device} "
        f"({args.dtype}); sigma {draft.stats.sigma:.2f} tokens per target forward; speedup "
        f"{stats['seconds'] / spec_stats['seconds']:.2f}x over plain generate{' (static cache)' if args.fast else ''} "
        f"({stats['tokens_per_second']:.1f} tokens/s), "
        f"output {same} plain greedy decoding]"
    )
    return 0


def _load_draft(name: str, model, using_mini: bool):
    """The draft `--draft` names, bound to `model` (None for plain decoding)."""
    if name == "none" or (name == "default" and not using_mini):
        return None
    from specvlm_hf.mini.drafts import DEFAULT_DRAFT, DRAFT_NAMES, load_draft

    if name in ("default", *DRAFT_NAMES):
        return load_draft(model, DEFAULT_DRAFT if name == "default" else name)
    if not Path(name, "config.json").exists():
        raise SystemExit(f"No draft found in {name}; pass a draft folder, a shipped draft name {DRAFT_NAMES}, or 'none'.")
    from specvlm_hf import SpecVLMDraftModel

    return SpecVLMDraftModel.from_pretrained(name).bind_target(model).eval()
