"""`specvlm generate`: answer a prompt about an image with a LLaVA model (by default the built-in mini VLM).

    specvlm generate                                        # describe the bundled example image
    specvlm generate --image photo.png --prompt "How many circles are there?"
    specvlm generate --draft eaglevlm --mode chain          # another shipped draft, chain decoding
    specvlm generate --draft none                           # plain greedy decoding only
    specvlm generate --fast                                 # static caches: the tree fast path (CUDA graphs on GPUs)
    specvlm generate --fast --compile-cache ~/.cache/specvlm/compile   # a later run loads the compiled code
    specvlm generate --do-sample --temperature 0.7 --top-p 0.9 --seed 1    # speculative sampling

With the built-in mini VLM, speculative decoding uses its shipped default draft (`specvlm_hf.mini.drafts`).
Prints the answer, sigma (tokens accepted per target forward, the target's own token included) and the speedup
over plain `generate`, and whether the output equals plain greedy decoding (in float32 it must, token for token;
in bfloat16 / float16 it can part at near-ties).
"""

from __future__ import annotations

import time
from pathlib import Path

from .common import add_compile_cache_argument, close_compile_cache, open_compile_cache

DEFAULT_PROMPT = "Describe this image."


def register(subparsers):
    from .common import positive_float, positive_int, probability

    parser = subparsers.add_parser(
        "generate", help="Generate text for an image and a prompt.", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--image", default=None, help="Image file (default: the mini VLM's bundled example image).")
    parser.add_argument("--no-image", action="store_true", help="Send the prompt alone, without any image.")
    parser.add_argument(
        "--video",
        default=None,
        help="Video file (MP4, WebM, ...; 8 evenly spaced frames) instead of an image, for a --model that takes "
        "video (Qwen-VL, LLaVA-OneVision, LLaVA-NeXT-Video). Needs PyAV: pip install 'specvlm-hf[video]'.",
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"User prompt (default: {DEFAULT_PROMPT!r}).")
    parser.add_argument(
        "--model",
        default=None,
        help="Vision-language model + processor folder or Hub id of any supported family (LLaVA, Qwen-VL, Gemma 3, "
        "...), or a built-in mini VLM: 'mini' (LLaVA, the default) or 'mini-qwen' (Qwen2.5-VL style).",
    )
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=200, help="Most tokens to generate (default: 200)."
    )
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="Weights dtype. Only float32 outputs equal plain greedy decoding token for token; in "
        "bfloat16 / float16 they can part at near-ties (default: float32).",
    )
    parser.add_argument(
        "--do-sample",
        action="store_true",
        help="Sample instead of greedy decoding (speculative sampling keeps the target's distribution).",
    )
    parser.add_argument(
        "--temperature", type=positive_float, default=1.0, help="Sampling temperature (with --do-sample)."
    )
    parser.add_argument("--top-p", type=probability, default=1.0, help="Nucleus sampling mass (with --do-sample).")
    parser.add_argument("--seed", type=int, default=0, help="Random seed of sampling (with --do-sample; default 0).")
    parser.add_argument(
        "--draft",
        default="default",
        help="Draft for speculative decoding: 'default' (a built-in mini VLM's shipped draft; none for another "
        "--model), a shipped draft name of the mini VLM ('specvlm', 'eaglevlm'), a draft folder, or 'none' for plain "
        "decoding only.",
    )
    parser.add_argument(
        "--mode",
        default=None,
        choices=["tree", "chain"],
        help="Decoding mode (default: tree on a GPU or with --fast, chain on the CPU, where scoring a 60-token tree "
        "costs more than it saves; the same rule as `specvlm demo` and `specvlm bench`).",
    )
    parser.add_argument(
        "--fast",
        action="store_true",
        help="Static KV caches for both runs: plain decoding with transformers' compiled static cache against the "
        "SpecVLM fast path (tree mode; CUDA graphs on a GPU). The untimed warm-up call compiles (tens of seconds on "
        "a GPU).",
    )
    parser.add_argument(
        "--fp8-head",
        action="store_true",
        help="The draft reads an e4m3 (float8) copy of the lm_head rows it scores (`draft.use_fp8_head`): fewer bytes "
        "a tree level on GPUs of compute capability 8.9+ (H100, L4, ...); outputs stay exact.",
    )
    add_compile_cache_argument(parser)
    parser.set_defaults(func=_run)


def build_inputs(processor, image, prompt: str):
    """Chat-formatted model inputs for one user turn: `input_ids`, `attention_mask` `(1, length)` and,
    when `image` is given, `pixel_values` `(1, 3, H, W)` (or, when `image` is a `specvlm_hf.video.VideoClip`, the
    processor's video inputs, e.g. `pixel_values_videos` and `video_grid_thw`)."""
    from ..video import VideoClip

    if isinstance(image, VideoClip):
        return _video_inputs(processor, image, prompt)
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    if image is None:
        return processor(text=text, return_tensors="pt")
    return processor(images=image, text=text, return_tensors="pt")


def _video_inputs(processor, clip, prompt: str):
    from ..errors import UserError
    from ..processors import qwen_video_inputs, takes_video

    if not takes_video(processor):
        raise UserError(
            f"{type(processor).__name__} takes no video: pass --video with a --model that does (Qwen2-VL, Qwen2.5-VL, "
            "Qwen3-VL, LLaVA-OneVision, LLaVA-NeXT-Video), or an image with --image."
        )
    content = [{"type": "video"}, {"type": "text", "text": prompt}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    from ..hf_internals import NoVideoProcessor

    if isinstance(processor.video_processor, NoVideoProcessor):  # a Qwen-VL processor without torchvision
        return qwen_video_inputs(processor, clip.frames, text)
    return processor(videos=[clip.frames], text=text, return_tensors="pt", do_sample_frames=False)


def run_generate(
    model, processor, image, prompt: str, max_new_tokens: int = 200, **generate_kwargs
) -> tuple[str, dict]:
    """Generate an answer to `prompt` about `image` (a PIL image, or None for text only).

    `generate_kwargs` go to `model.generate` (greedy by default; e.g. `assistant_model=` for speculative
    decoding). Returns `(text, stats)`, where stats has `new_tokens`, `seconds` (prefill included) and
    `tokens_per_second`.
    """
    import torch

    device = next(model.parameters()).device
    inputs = build_inputs(processor, image, prompt).to(device)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(model.dtype)
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
    """Open an image file as RGB (decoded whole, so a truncated file fails here), with an error that names the file."""
    from PIL import Image, UnidentifiedImageError

    from ..errors import UserError

    path = Path(path)
    if not path.exists():
        raise UserError(f"Image {path} does not exist; pass an existing file with --image.")
    if path.is_dir():
        raise UserError(f"--image {path} is a folder; pass one image file (PNG or JPEG).")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image PIL can read; pass a PNG or JPEG file with --image.") from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupted pixel data
        raise UserError(
            f"{path} cannot be decoded ({error}); the file is truncated or corrupted, pass a whole image with --image."
        ) from None


def _run(args):
    import torch

    from ..errors import UserError
    from ..mini import BUILTIN_MODELS, EXAMPLE_IMAGE, builtin_dirs
    from .common import check_model_folder, check_positions, default_decoding_mode, exactness_note, resolve_device

    device = resolve_device(args.device)
    # everything a user can get wrong is checked before a weight is loaded
    builtin = (args.model or "mini") if args.model in (None, *BUILTIN_MODELS) else None
    model_dir = str(builtin_dirs(builtin)[0]) if builtin else args.model
    if builtin and not Path(model_dir, "config.json").is_file():
        raise UserError(
            f"--model {builtin}: its weights are not in this install ({model_dir}); reinstall specvlm-hf, or pass "
            "a model folder."
        )
    model_config = check_model_folder(model_dir, "--model")
    draft_folder = _check_draft_name(args.draft, builtin)
    if args.no_image and args.image:
        raise UserError("--image and --no-image contradict each other; pass one of them.")
    if args.video and (args.image or args.no_image):
        raise UserError("--video replaces the image: pass --video alone, without --image or --no-image.")
    if args.compile_cache and not args.fast:
        raise UserError("--compile-cache keeps the fast path's compiled code: add --fast (static caches).")
    if args.fp8_head and args.draft == "none":
        raise UserError("--fp8-head changes the draft's head, and --draft none runs no draft: drop one of them.")
    if args.fast and args.mode == "chain":
        raise UserError(
            "--fast is the tree's fast path (static caches); chain mode runs transformers' assisted loop, which takes "
            "no static cache: drop --mode chain, or drop --fast."
        )
    image = None if args.no_image else load_image(args.image or EXAMPLE_IMAGE)
    if args.video:
        from ..video import read_video

        image = read_video(args.video)
    dtype = getattr(torch, args.dtype)
    compile_cache = open_compile_cache(args.compile_cache)

    from transformers import AutoModelForImageTextToText

    from ..processors import load_processor

    try:
        processor = load_processor(model_dir)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise UserError(
            f"--model {model_dir}: cannot load its processor ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}); save the processor "
            "into the model folder with processor.save_pretrained."
        ) from None
    inputs = build_inputs(processor, image, args.prompt)
    check_positions(model_config, inputs["input_ids"].shape[1], args.max_new_tokens)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    draft = _load_draft(args.draft, draft_folder, model, builtin)
    if draft is not None:
        draft.config.decoding_mode = args.mode or ("tree" if args.fast else default_decoding_mode(device))
        if args.fp8_head:
            draft.use_fp8_head()

    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.do_sample else {}
    # One untimed warm-up call, so that the reported speed is that of decoding, not of first-call set-up (with
    # --fast, of the full length: static caches are compiled and graphed per length)
    fast = {"cache_implementation": "static"} if args.fast else {}
    warmup_tokens = args.max_new_tokens if args.fast else 2
    warmup_seconds = timed(run_generate, model, processor, image, args.prompt, max_new_tokens=warmup_tokens, **fast)
    torch.manual_seed(args.seed)
    text, stats = run_generate(model, processor, image, args.prompt, args.max_new_tokens, **fast, **sampling)
    if draft is None:
        print(text.strip())
        print(
            f"\n[{stats['new_tokens']} tokens in {stats['seconds']:.2f} s: {stats['tokens_per_second']:.1f} tokens/s "
            f"on {device} ({args.dtype}{', sampled' if args.do_sample else ''}); warm-up call (compilation, graph "
            f"capture) {warmup_seconds:.2f} s, not counted]"
        )
        close_compile_cache(compile_cache)
        return 0
    import specvlm_hf

    specvlm_hf.enable(model)
    spec_warmup_seconds = timed(
        run_generate, model, processor, image, args.prompt, max_new_tokens=warmup_tokens, assistant_model=draft, **fast
    )
    torch.manual_seed(args.seed)
    spec_text, spec_stats = run_generate(
        model, processor, image, args.prompt, args.max_new_tokens, assistant_model=draft, **fast, **sampling
    )
    print(spec_text.strip())
    if args.do_sample:
        comparison = (
            f"sampled at temperature {args.temperature:g}, top-p {args.top_p:g}, seed {args.seed}: the output "
            "follows plain sampling's distribution, but is not the same text token for token"
        )
    else:
        comparison = exactness_note(args.dtype, spec_text == text)
    print(
        f"\n[{spec_stats['new_tokens']} tokens in {spec_stats['seconds']:.2f} s: "
        f"{spec_stats['tokens_per_second']:.1f} tokens/s "
        f"with the {args.draft if args.draft != 'default' else 'default'} draft ({draft.config.decoding_mode}"
        f"{', fast path' if args.fast and draft.config.decoding_mode == 'tree' else ''}"
        f"{', fp8 head' if draft.fp8_head else ''}) on {device} "
        f"({args.dtype}); sigma {draft.stats.sigma:.2f} tokens per target forward; speedup "
        f"{stats['seconds'] / spec_stats['seconds']:.2f}x over plain generate{' (static cache)' if args.fast else ''} "
        f"({stats['tokens_per_second']:.1f} tokens/s); {comparison}]"
    )
    print(
        f"[warm-up calls, not counted above (compilation and graph capture with --fast): plain "
        f"{warmup_seconds:.2f} s, SpecVLM {spec_warmup_seconds:.2f} s; decoding: plain {stats['seconds']:.2f} s, "
        f"SpecVLM {spec_stats['seconds']:.2f} s]"
    )
    close_compile_cache(compile_cache)
    return 0


def timed(fn, *args, **kwargs) -> float:
    """Seconds `fn(*args, **kwargs)` takes, the device's queued work included."""
    import torch

    start = time.perf_counter()
    fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _check_draft_name(name: str, builtin: str | None = "mini") -> str | None:
    """The draft folder `--draft` names (None for none or a shipped draft), checked before anything is loaded.
    `builtin` is the built-in target in use ("mini", "mini-qwen") or None."""
    from ..errors import UserError
    from ..mini import builtin_dirs
    from ..mini.drafts import DRAFT_NAMES
    from .common import check_draft_folder

    if name == "default" and builtin == "mini-qwen":
        folder = builtin_dirs(builtin)[1]
        if not (folder / "model.safetensors").is_file():
            raise UserError(
                f"--model mini-qwen: its draft is not in this install ({folder}); pass --draft <folder> or "
                "--draft none."
            )
        return str(folder)
    if name in DRAFT_NAMES and builtin == "mini-qwen":
        raise UserError(
            f"--draft {name} is a draft of the mini VLM ('mini'), not of mini-qwen; use --draft default, a draft "
            "folder, or 'none'."
        )
    if name in ("none", "default", *DRAFT_NAMES):
        return None
    if not Path(name).exists():
        raise UserError(
            f"--draft {name}: no such folder; pass a draft folder, a shipped draft name "
            f"({', '.join(DRAFT_NAMES)}), or 'none'."
        )
    check_draft_folder(name)
    return name


def _load_draft(name: str, folder: str | None, model, builtin: str | None):
    """The draft `--draft` names, bound to `model` (None for plain decoding)."""
    if name == "none" or (name == "default" and folder is None and builtin != "mini"):
        return None
    from ..mini.drafts import DEFAULT_DRAFT, load_draft

    if folder is None:
        return load_draft(model, DEFAULT_DRAFT if name == "default" else name)
    from specvlm_hf import SpecVLMDraftModel

    return SpecVLMDraftModel.from_pretrained(folder).bind_target(model).eval()
