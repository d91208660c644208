"""SpecVLM demo (Gradio): plain `generate` and SpecVLM speculative decoding side by side on one image + prompt.

    specvlm demo                                    # the built-in mini VLM and its shipped draft, on CPU
    specvlm demo --target llava-hf/llava-1.5-7b-hf --draft me/llava-1.5-7b-specvlm-draft --device cuda
    python spaces/specvlm-demo/app.py               # the Hugging Face Space: a thin wrapper over this module

It ships in the package (`pip install "specvlm-hf[demo]"`), so it runs from any install, not only a checkout.
Both runs are greedy, one after the other on the same hardware (so the timings are comparable); in float32
SpecVLM's output is token-for-token plain `generate`'s. The SpecVLM pane colours the text by the verification
round that accepted it: one colour band = one target forward. Sigma is the project's one definition
(`SpecVLMStats.sigma`): tokens accepted per verification round, the target's own token included. The decoding
mode follows the rule `specvlm generate` and `specvlm bench` use (chain on the CPU, tree on a GPU).

Inputs are bounded (image size and format, prompt length, `max_new_tokens`) with a plain message; the app serves
only its `demo_examples/` and its upload cache (`GRADIO_TEMP_DIR`); users are queued one at a time.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

EXAMPLES_DIR = Path(__file__).resolve().parent / "demo_examples"
# uploads land here unless GRADIO_TEMP_DIR says otherwise (the Space keeps them in its own folder)
CACHE_DIR = Path(tempfile.gettempdir()) / "specvlm-demo-uploads"

# Input limits (a CPU Space has little memory and time per user).
MAX_UPLOAD_MB = 10
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MIN_IMAGE_SIDE = 8
MAX_IMAGE_SIDE = 4096
MAX_PROMPT_CHARS = 500
DEFAULT_MAX_NEW_TOKENS = 128
MAX_NEW_TOKENS_LIMIT = 256
QUEUE_SIZE = 20


def _examples() -> list[tuple[str, str]]:
    """(image file, prompt) of each example: generated scenes the mini VLM answers correctly
    (`benchmarks/pick_demo_examples.py` checked its answers, recorded in `demo_examples/examples.json`)."""
    listed = EXAMPLES_DIR / "examples.json"
    return [(e["image"], e["prompt"]) for e in json.loads(listed.read_text())] if listed.is_file() else []


EXAMPLES = _examples()
NOT_AN_IMAGE = "This file is not an image the demo can read; use one of {formats}."
# one background colour per round, cycled; consecutive rounds always differ
ROUND_COLOURS = ("#fde68a", "#bfdbfe", "#bbf7d0", "#fbcfe8", "#ddd6fe", "#fed7aa")


class InputError(UserError):
    """A request outside the demo's limits; the message says what to change."""


class DemoModelsMissing(UserError, FileNotFoundError):
    """The default models are not in this install."""


@dataclass
class DemoModels:
    """What the demo runs: a target with its processor, and a SpecVLM draft made for it."""

    target: object
    processor: object
    draft: object
    name: str

    @property
    def max_positions(self) -> int | None:
        return getattr(self.target.config.get_text_config(), "max_position_embeddings", None)


def default_models(device: str = "cpu", name: str = "mini") -> DemoModels:
    """A built-in mini VLM (`specvlm_hf.mini.load()`; `name` "mini" or "mini-qwen") and its shipped draft
    (`specvlm_hf.mini.DRAFT_DIR`, `QWEN_DRAFT_DIR`)."""
    from specvlm_hf import SpecVLMDraftModel, mini

    draft_dir = getattr(mini, "DRAFT_DIR", None) if name == "mini" else mini.builtin_dirs(name)[1]
    if draft_dir is None or not (Path(draft_dir) / "config.json").exists():
        raise DemoModelsMissing(
            "The mini VLM's trained draft is not shipped in this install yet (expected a saved draft at "
            f"specvlm_hf.mini.DRAFT_DIR{'' if draft_dir is None else f' = {draft_dir}'}). Run the demo with your "
            "own models: --target <LLaVA folder or Hub id> --draft <SpecVLM draft folder or Hub id>."
        )
    target, processor = mini.load(device=device, name=name)
    label = "specvlm-hf mini VLM" if name == "mini" else f"specvlm-hf {name}"
    return DemoModels(target, processor, SpecVLMDraftModel.from_pretrained(draft_dir).to(device), label)


def load_models(
    target: str | None = None, draft: str | None = None, device: str = "cpu", dtype: str = "float32"
) -> DemoModels:
    """The demo's models: `default_models()` when neither is given, else a target (folder or Hub id, with its
    processor) and a draft (folder or Hub id) loaded with `from_pretrained`."""
    from .mini import BUILTIN_MODELS

    if target in (None, *BUILTIN_MODELS) and draft is None:
        return default_models(device, target or "mini")
    if target is None or draft is None:
        raise UserError("Pass both --target and --draft (a draft only works with the target it was trained for).")
    import torch

    from .commands.common import HUB_ID, check_draft_folder, check_model_folder

    check_model_folder(target, "--target")
    if Path(draft).exists() or not HUB_ID.match(draft):
        check_draft_folder(draft)
    from transformers import AutoModelForImageTextToText

    from specvlm_hf import SpecVLMDraftModel

    from .processors import load_processor

    model = AutoModelForImageTextToText.from_pretrained(target, dtype=getattr(torch, dtype)).to(device).eval()
    processor = load_processor(target)
    spec_draft = SpecVLMDraftModel.from_pretrained(draft, dtype=getattr(torch, dtype)).to(device).eval()
    name = Path(target).name if Path(target).is_dir() else target  # a Hub id, or a local folder's name
    return DemoModels(model, processor, spec_draft, name)


# ---- input limits ----


def check_image(path):
    """Opens an uploaded image after checking its file size, format and dimensions; returns it as RGB."""
    from PIL import Image, UnidentifiedImageError

    if path is None:
        raise InputError("Upload an image (PNG, JPEG, WebP, GIF or BMP) or pick an example below.")
    size_mb = os.path.getsize(path) / 2**20
    if size_mb > MAX_UPLOAD_MB:
        raise InputError(f"The image file is {size_mb:.1f} MB; the limit is {MAX_UPLOAD_MB} MB.")
    try:
        image = Image.open(path)  # reads the header only: format and size are known before decoding
    except (UnidentifiedImageError, OSError):
        raise InputError(NOT_AN_IMAGE.format(formats=", ".join(IMAGE_FORMATS))) from None
    if image.format not in IMAGE_FORMATS:
        raise InputError(f"{image.format} images are not accepted; use one of {', '.join(IMAGE_FORMATS)}.")
    width, height = image.size
    if min(width, height) < MIN_IMAGE_SIDE or max(width, height) > MAX_IMAGE_SIDE:
        raise InputError(
            f"The image is {width}x{height} pixels; each side must be between {MIN_IMAGE_SIDE} and {MAX_IMAGE_SIDE}."
        )
    return image.convert("RGB")


def check_video(path, processor):
    """Reads an uploaded video (8 evenly spaced frames) after checking its file size and that the model takes video;
    returns a `specvlm_hf.video.VideoClip`."""
    from .processors import takes_video
    from .video import read_video

    if not takes_video(processor):
        raise InputError("This model takes no video; upload an image instead.")
    size_mb = os.path.getsize(path) / 2**20
    if size_mb > MAX_UPLOAD_MB:
        raise InputError(f"The video file is {size_mb:.1f} MB; the limit is {MAX_UPLOAD_MB} MB.")
    try:
        return read_video(path)
    except UserError as error:
        raise InputError(str(error).replace(" with --video", "").replace(str(path), "The video")) from None


def check_prompt(prompt: str | None) -> str:
    prompt = (prompt or "").strip()
    if not prompt:
        raise InputError("Type a prompt (a question or instruction about the image).")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"The prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}.")
    return prompt


def check_max_new_tokens(value, limit: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"max_new_tokens must be a whole number between 1 and {limit}.") from None
    if not 1 <= number <= limit or number != value:
        raise InputError(f"max_new_tokens must be a whole number between 1 and {limit}; got {value}.")
    return number


# ---- decoding with a round-recording streamer ----


class RoundStreamer:
    """A `generate` streamer that queues each `put` after the prompt as one round of accepted tokens.

    Plain `generate` puts one token per forward; SpecVLM puts every token one verification round accepted.
    """

    def __init__(self):
        self.rounds: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True  # the first put is the prompt, as in plain generate
            return
        self.rounds.put(value.reshape(-1).tolist())

    def end(self):
        self.rounds.put(None)


def stream_rounds(models: DemoModels, inputs, max_new_tokens: int, use_draft: bool):
    """Runs greedy `generate` in a thread and yields `(rounds, seconds, done)` after each round: `rounds` is
    the list of accepted-token lists so far, `seconds` the time since the call started."""
    streamer = RoundStreamer()
    kwargs = dict(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
    if use_draft:
        kwargs["assistant_model"] = models.draft
    failure = []

    def run():
        try:
            models.target.generate(**kwargs)
        except Exception as error:  # shown to the user below, not lost in the thread
            failure.append(error)
            streamer.end()

    rounds: list[list[int]] = []
    start = time.perf_counter()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while (chunk := streamer.rounds.get()) is not None:
        rounds.append(chunk)
        yield rounds, time.perf_counter() - start, False
    thread.join()
    if failure:
        raise failure[0]
    yield rounds, time.perf_counter() - start, True


def round_texts(tokenizer, rounds: list[list[int]]) -> list[str]:
    """The text each round added (decoding the whole prefix, so multi-token characters come out whole)."""
    texts, tokens, previous = [], [], ""
    for chunk in rounds:
        tokens.extend(chunk)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        texts.append(text[len(previous) :] if text.startswith(previous) else text)
        previous = text
    return texts


def render_rounds(tokenizer, rounds: list[list[int]], coloured: bool, running: bool) -> str:
    """HTML of the text so far; with `coloured`, each round's text on its own background colour."""
    pieces = []
    for index, (chunk, text) in enumerate(zip(rounds, round_texts(tokenizer, rounds))):
        escaped = html.escape(text)
        if coloured:
            colour = ROUND_COLOURS[index % len(ROUND_COLOURS)]
            pieces.append(
                f'<span class="round" style="background:{colour}" title="round {index + 1}: '
                f'{len(chunk)} token{"s" if len(chunk) != 1 else ""}">{escaped}</span>'
            )
        else:
            pieces.append(escaped)
    cursor = '<span class="cursor">&#9612;</span>' if running else ""
    return f'<div class="tokens">{"".join(pieces)}{cursor}</div>'


def format_stats(
    plain: dict | None, spec: dict | None, draft=None, identical: bool | None = None, dtype: str = "float32"
) -> str:
    """Markdown table of tokens/s, new tokens and target forwards so far; once both runs are done (`identical`
    given), sigma (the draft's `SpecVLMStats.sigma`, with the counts it is made of), the speedup, the compressor's
    chosen visual branch and whether the outputs are identical (with what to expect in `dtype` when not)."""

    def tps(run):
        return f"{run['tokens'] / run['seconds']:.1f}" if run and run["seconds"] > 0 else "..."

    done = identical is not None and spec["seconds"] > 0 and plain["seconds"] > 0
    stats = draft.stats if done else None
    forwards = spec["rounds"] if spec else "..."
    sigma = "..."
    if stats is not None:
        accepted = sum(stats.accepted_per_round)
        if spec["rounds"] == stats.rounds + 1:  # the prefill's forward gave the first token: it is not a round
            forwards = f"{spec['rounds']} (prefill + {stats.rounds} rounds)"
        sigma = f"{stats.sigma:.2f} ({accepted} tokens / {stats.rounds} rounds)"
    lines = [
        "| | plain `generate` | SpecVLM |",
        "|---|---|---|",
        f"| tokens/s | {tps(plain)} | {tps(spec)} |",
        f"| new tokens | {plain['tokens'] if plain else '...'} | {spec['tokens'] if spec else '...'} |",
        f"| target forwards | {plain['rounds'] if plain else '...'} | {forwards} |",
        f"| sigma | {'1.00' if plain else '...'} | {sigma} |",
    ]
    if done:
        from .commands.common import exactness_note

        speedup = (spec["tokens"] / spec["seconds"]) / (plain["tokens"] / plain["seconds"])
        branch = getattr(stats, "visual_branch", None) or "none"
        lines += [
            "",
            f"**speedup {speedup:.2f}x** &nbsp; **sigma {stats.sigma:.2f}** tokens accepted per verification round "
            f"({stats.mode} mode) &nbsp; visual branch: **{branch}**"
            + f" &nbsp; outputs identical: **{'yes' if identical else 'NO'}**",
            "",
            "sigma: tokens accepted per target verification forward, the target's own token included "
            "(`SpecVLMStats.sigma`).",
        ]
        if not identical:
            lines += ["", exactness_note(dtype, identical=False) + "."]
    return "\n".join(lines)


def compare(
    models: DemoModels, image_path, prompt, max_new_tokens, limit: int = MAX_NEW_TOKENS_LIMIT, video_path=None
):
    """Generator of `(plain_html, specvlm_html, stats_markdown)`: plain `generate` streams first, then SpecVLM. With
    `video_path` (a model that takes video), the video replaces the image."""
    from specvlm_hf.commands.generate import build_inputs

    image = check_video(video_path, models.processor) if video_path else check_image(image_path)
    prompt = check_prompt(prompt)
    max_new_tokens = check_max_new_tokens(max_new_tokens, limit)
    device = next(models.target.parameters()).device
    inputs = build_inputs(models.processor, image, prompt).to(device)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(models.target.dtype)
    prompt_length = inputs["input_ids"].shape[1]
    if models.max_positions and prompt_length + max_new_tokens > models.max_positions:
        raise InputError(
            f"The prompt takes {prompt_length} tokens with the image; with max_new_tokens={max_new_tokens} that "
            f"exceeds the model's {models.max_positions} positions. Shorten the prompt or lower max_new_tokens."
        )
    tokenizer = models.processor.tokenizer
    results = {}
    panes = {"plain": render_rounds(tokenizer, [], False, True), "spec": ""}
    for key, use_draft in (("plain", False), ("spec", True)):
        last_yield = 0.0
        for rounds, seconds, done in stream_rounds(models, inputs, max_new_tokens, use_draft):
            panes[key] = render_rounds(tokenizer, rounds, coloured=use_draft, running=not done)
            if done:
                results[key] = {
                    "tokens": sum(map(len, rounds)),
                    "rounds": len(rounds),
                    "seconds": seconds,
                    "ids": [t for chunk in rounds for t in chunk],
                }
            if done or time.perf_counter() - last_yield > 0.05:  # at most ~20 page updates per second
                last_yield = time.perf_counter()
                yield panes["plain"], panes["spec"], format_stats(results.get("plain"), results.get("spec"))
        if key == "plain":
            panes["spec"] = render_rounds(tokenizer, [], True, True)
    identical = results["plain"]["ids"] == results["spec"]["ids"]
    dtype = str(models.target.dtype).replace("torch.", "")
    yield (
        panes["plain"],
        panes["spec"],
        format_stats(results["plain"], results["spec"], models.draft, identical, dtype),
    )


def warm_up(models: DemoModels) -> None:
    """One short call of each kind, so that the first user's timings are not first-call set-up."""
    import tempfile

    from PIL import Image

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "warmup.png"
        Image.new("RGB", (64, 64), "white").save(path)
        for _ in compare(models, str(path), "Describe this image.", 4):
            pass


# ---- the page ----

CSS = """
.tokens {font-family: ui-monospace, monospace; white-space: pre-wrap; overflow-wrap: anywhere; min-height: 12em;
         line-height: 1.6;}
.tokens .round {border-radius: 3px; padding: 1px 0;}
.tokens .cursor {animation: blink 1s steps(1) infinite;}
@keyframes blink {50% {opacity: 0;}}
"""


def refuse_unreadable_uploads(image):
    """Makes `image` (a `gr.Image`) refuse a file PIL cannot open with a plain message: Gradio's own error names the
    file's absolute path in the server's upload cache. (An instance override: a `gr.Image` subclass would make
    Gradio write a `.pyi` stub next to this module.)"""
    import gradio as gr

    preprocess = image.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except Exception:
            raise gr.Error(NOT_AN_IMAGE.format(formats=", ".join(IMAGE_FORMATS)), title="Input not accepted") from None

    image.preprocess = checked
    return image


def build_demo(models: DemoModels, max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT):
    """The Gradio page (call `.queue(...)` and `.launch(...)` on it, or use `launch`)."""
    import gradio as gr

    from .processors import takes_video as processor_takes_video

    takes_video = processor_takes_video(models.processor)

    def run(image_path, prompt, max_new_tokens, video_path=None):
        try:
            yield from compare(models, image_path, prompt, max_new_tokens, max_new_tokens_limit, video_path)
        except InputError as error:
            raise gr.Error(str(error), title="Input not accepted") from None

    with gr.Blocks(title="SpecVLM demo") as demo:
        gr.Markdown(
            f"# SpecVLM: lossless speculative decoding for VLMs\n"
            f"Target: **{html.escape(models.name)}**, "
            f"draft in **{html.escape(models.draft.config.decoding_mode)}** mode. "
            "Plain `generate` runs first, then SpecVLM with its draft, on the same hardware; both are greedy, so in "
            "float32 the texts are identical token for token and only the speed differs (lower precision can part at "
            "near-ties). In the SpecVLM pane each colour band is one target forward (the tokens one round accepted)."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = refuse_unreadable_uploads(
                    gr.Image(type="filepath", label="Image", sources=["upload"], height=260)
                )
                video = (
                    gr.Video(label="Video (replaces the image; 8 frames)", sources=["upload"], height=200)
                    if takes_video
                    else None
                )
                prompt = gr.Textbox(
                    label="Prompt",
                    value="Describe this image.",
                    max_lines=4,
                    max_length=MAX_PROMPT_CHARS,
                    elem_id="prompt",
                )
                max_new_tokens = gr.Slider(
                    1,
                    max_new_tokens_limit,
                    value=min(DEFAULT_MAX_NEW_TOKENS, max_new_tokens_limit),
                    step=1,
                    label="max_new_tokens",
                )
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                gr.Examples(
                    [[str(EXAMPLES_DIR / name), text] for name, text in EXAMPLES if (EXAMPLES_DIR / name).exists()],
                    inputs=[image, prompt],
                    label="Examples",
                    elem_id="examples",
                )
            with gr.Column(scale=2):
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("### plain `generate`")
                        plain = gr.HTML(elem_id="plain-output")
                    with gr.Column():
                        gr.Markdown("### SpecVLM")
                        spec = gr.HTML(elem_id="specvlm-output")
                stats = gr.Markdown(elem_id="stats")
        button.click(
            run,
            [image, prompt, max_new_tokens] + ([video] if video is not None else []),
            [plain, spec, stats],
            concurrency_limit=1,
            concurrency_id="gpu",
            api_name="compare",
        )
    return demo


def launch(
    models: DemoModels,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT,
    block: bool = True,
):
    """Queues users one at a time and serves the page; returns the Blocks (running, if `block` is False)."""
    demo = build_demo(models, max_new_tokens_limit)
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    demo.launch(
        server_name=host,
        server_port=port,
        allowed_paths=[str(EXAMPLES_DIR / name) for name, _ in EXAMPLES],
        max_file_size=f"{MAX_UPLOAD_MB}mb",
        prevent_thread_lock=not block,
        show_error=False,
        css=CSS,  # user-facing messages are gr.Error
    )
    return demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (used by `specvlm demo` and the Space's app.py)."""
    from .commands.common import positive_int

    parser.add_argument(
        "--target",
        "--model",
        default=os.environ.get("SPECVLM_TARGET"),
        help="Target VLM folder or Hub id, with its processor, or a built-in one: 'mini' (the default) or "
        "'mini-qwen' (then without --draft: its shipped draft).",
    )
    parser.add_argument(
        "--draft",
        default=os.environ.get("SPECVLM_DRAFT"),
        help="SpecVLM draft folder or Hub id for that target (default: the mini VLM's draft).",
    )
    parser.add_argument(
        "--device", default=os.environ.get("SPECVLM_DEVICE", "auto"), help="'auto', 'cpu', 'cuda', ..."
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="Weights dtype (only float32 outputs equal plain decoding token for token).",
    )
    parser.add_argument(
        "--mode",
        default=None,
        choices=["tree", "chain"],
        help="Decoding mode (default: tree on a GPU, chain on the CPU, the rule of `specvlm generate`).",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="CPU threads for torch (default 1: small models stall with more on few cores).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on (a Space uses 0.0.0.0).")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 7860)), help="Port (default 7860).")
    parser.add_argument(
        "--max-new-tokens-limit",
        type=positive_int,
        default=MAX_NEW_TOKENS_LIMIT,
        help=f"Largest max_new_tokens a user may ask for (default {MAX_NEW_TOKENS_LIMIT}).",
    )


def models_from_args(args) -> DemoModels:
    """The models `args` name, on their device, with the draft's decoding mode set by the shared rule (chain on
    the CPU, tree on a GPU) unless `--mode` says otherwise, and the target `enable`d."""
    import torch

    import specvlm_hf

    from .commands.common import default_decoding_mode, resolve_device

    device = resolve_device(args.device)
    if device == "cpu":
        torch.set_num_threads(args.threads)
    models = load_models(args.target, args.draft, device=device, dtype=args.dtype)
    models.draft.config.decoding_mode = args.mode or default_decoding_mode(device)
    specvlm_hf.enable(models.target)
    return models


def run_from_args(args) -> None:
    """Loads the models named by `args`, warms them up and serves the page until interrupted."""
    os.environ.setdefault("GRADIO_TEMP_DIR", str(CACHE_DIR))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    models = models_from_args(args)
    warm_up(models)
    launch(models, args.host, args.port, args.max_new_tokens_limit)


def main(argv: list[str] | None = None) -> None:
    """The Space's entry point (`spaces/specvlm-demo/app.py`); `specvlm demo` is the same with the CLI's errors."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if os.environ.get("SPACE_ID"):  # on a Hugging Face Space: listen on every interface
        args.host = "0.0.0.0"
    try:
        run_from_args(args)
    except UserError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
