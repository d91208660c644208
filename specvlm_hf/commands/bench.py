"""`specvlm bench`: every decoding method side by side on the same prompts (see `specvlm_hf.bench`).

specvlm bench                                   # the mini VLM and its shipped drafts, CPU or GPU
specvlm bench --target llava-hf/llava-1.5-7b-hf --draft eaglevlm=path/to/draft --projected-sigma 3.67
specvlm bench --restrict-vocab 1024             # the drafts restricted to the target's 1024 most used ids
"""

from __future__ import annotations

import os


def register(subparsers):
    from .common import positive_float, positive_int

    parser = subparsers.add_parser(
        "bench", help="Benchmark every decoding method side by side.", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--target",
        "--model",
        default="mini",
        help="Model + processor folder or Hub id of a supported VLM, or a built-in one: 'mini' (the default) or "
        "'mini-qwen'.",
    )
    parser.add_argument(
        "--draft",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="A draft folder or Hub id; NAME is eaglevlm or specvlm. Repeatable. "
        "Default with a built-in target: its shipped drafts.",
    )
    parser.add_argument(
        "--assistant-lm", default=None, help="A small causal LM for transformers' assisted generation."
    )
    parser.add_argument("--methods", default=",".join(_default_methods()), help="Comma-separated methods.")
    parser.add_argument(
        "--num-prompts", type=positive_int, default=8, help="Held-out mini-VLM prompts to use (default 8)."
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=96, help="New tokens per prompt (default 96).")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=1,
        help="Decode the prompts in left-padded batches of this many rows (default 1); tokens/s counts every row.",
    )
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on GPU, float32 on CPU.",
    )
    parser.add_argument(
        "--restrict-vocab",
        type=positive_int,
        default=None,
        metavar="N",
        help="Make each draft score only the N token ids the target answers with most often on separate "
        "calibration prompts (plus EOS), without retraining (`draft.restrict_vocab`): a cheaper draft, exact "
        "outputs, acceptance lower where the target's next token is not among them.",
    )
    parser.add_argument(
        "--fp8-head",
        action="store_true",
        help="Each draft reads an e4m3 (float8) copy of the lm_head rows it scores (`draft.use_fp8_head`), after "
        "--restrict-vocab: fewer bytes a tree level on GPUs of compute capability 8.9+; outputs stay exact.",
    )
    parser.add_argument(
        "--calibration-prompts",
        type=positive_int,
        default=64,
        help="Prompts (a data seed of their own) whose plain answers choose --restrict-vocab's ids (default 64).",
    )
    parser.add_argument(
        "--projected-sigma",
        type=positive_float,
        default=None,
        help="Also project the tree methods' speed-up at this sigma (labelled as a projection).",
    )
    parser.add_argument(
        "--out",
        default="bench.json",
        help="JSON report path (a PNG chart is written next to it); checked for writing before the run.",
    )
    from .common import add_compile_cache_argument

    add_compile_cache_argument(parser)
    parser.set_defaults(func=_run)


def _default_methods():
    from specvlm_hf.bench import METHODS

    return [m for m in METHODS if m != "assisted-lm"]


def _run(args):
    import torch

    from specvlm_hf import SpecVLMDraftModel
    from specvlm_hf.bench import METHODS, format_table, run_bench, save_report

    from ..errors import UserError
    from .common import check_model_folder, exactness_note, resolve_device

    # everything a user can get wrong is checked before a model is loaded or a prompt decoded
    device = resolve_device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype != "auto"
        else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    )
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(METHODS)}.")
    draft_paths = _parse_drafts(args.draft)
    from specvlm_hf.mini import BUILTIN_MODELS

    if args.target not in BUILTIN_MODELS:
        check_model_folder(args.target, "--target")
    png = os.path.splitext(args.out)[0] + ".png"
    _check_out(args.out)
    from .common import close_compile_cache, open_compile_cache

    if args.restrict_vocab is not None:
        if not draft_paths and args.target not in BUILTIN_MODELS:
            raise UserError("--restrict-vocab restricts drafts, and none is given: pass --draft NAME=PATH.")
        _check_restrict_vocab(args.target, args.restrict_vocab)
    if args.fp8_head and not draft_paths and args.target not in BUILTIN_MODELS:
        raise UserError("--fp8-head changes the drafts' head, and none is given: pass --draft NAME=PATH.")
    compile_cache = open_compile_cache(args.compile_cache)
    if device == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    target, processor = _load_target(args.target, device, dtype)
    cases = _mini_cases(processor, args.num_prompts, device, dtype, target.config, args.max_new_tokens)
    drafts = {
        name: SpecVLMDraftModel.from_pretrained(path).bind_target(target).eval() for name, path in draft_paths.items()
    }
    if not drafts and args.target in BUILTIN_MODELS:
        drafts = _mini_drafts(target, args.target)
    restricted = None
    if args.restrict_vocab is not None and drafts:
        restricted = _restrict_drafts(target, processor, drafts, args, device, dtype)
    if args.fp8_head:
        for draft in drafts.values():
            draft.use_fp8_head()
    assistant = None
    if args.assistant_lm:
        from transformers import AutoModelForCausalLM

        assistant = AutoModelForCausalLM.from_pretrained(args.assistant_lm, dtype=dtype).to(device).eval()
    report = run_bench(
        target,
        cases,
        drafts,
        methods,
        args.max_new_tokens,
        assistant,
        args.projected_sigma,
        batch_size=args.batch_size,
    )
    report["target"] = args.target
    if restricted is not None:
        report["restricted_vocab"] = restricted
    report["fp8_head"] = bool(args.fp8_head and drafts)
    if compile_cache is not None:
        report["compile_cache"] = {"folder": compile_cache.folder, "round_functions": compile_cache.round_functions}
    print(format_table(report))
    save_report(report, args.out, png)
    print(f"wrote {args.out} and {png}")
    close_compile_cache(compile_cache)
    different = [r["method"] for r in report["methods"] if r["matches_plain"] is False]
    if different and report["dtype"] == "float32":
        print(f"{', '.join(different)}: {exactness_note('float32', identical=False)}")
        return 1
    return 0


def _parse_drafts(specs: list[str]) -> dict:
    """`NAME=PATH` pairs of --draft, each folder checked (Hub ids are checked when loaded)."""
    from ..errors import UserError
    from .common import HUB_ID, check_draft_folder

    drafts = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or name not in ("eaglevlm", "specvlm"):
            raise UserError(f"--draft takes NAME=PATH with NAME eaglevlm or specvlm, got {spec!r}.")
        if os.path.exists(path) or not HUB_ID.match(path):
            check_draft_folder(path)
        drafts[name] = path
    return drafts


def _check_out(out: str) -> None:
    """--out must be a file path whose folder can be written (checked before the run, not after it)."""
    from ..errors import UserError, check_writable_folder

    if os.path.isdir(out):
        raise UserError(f"--out {out} is a folder; pass a file path such as {os.path.join(out, 'bench.json')}.")
    check_writable_folder(os.path.dirname(os.path.abspath(out)), "--out: the folder")


def _load_target(name, device, dtype):
    from specvlm_hf.mini import BUILTIN_MODELS

    if name in BUILTIN_MODELS:
        from specvlm_hf.mini import load

        return load(dtype=dtype, device=device, name=name)
    from transformers import AutoModelForImageTextToText

    from specvlm_hf.processors import load_processor

    model = (
        AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    )
    return model, load_processor(name)


def _mini_drafts(target, name: str = "mini") -> dict:
    """A built-in target's shipped drafts (mini-qwen: its EagleVLM draft, and its SpecVLM one where shipped)."""
    from specvlm_hf.mini.drafts import DRAFT_NAMES, load_draft

    if name == "mini-qwen":
        from specvlm_hf import SpecVLMDraftModel
        from specvlm_hf.errors import UserError
        from specvlm_hf.mini import builtin_dirs

        folder = builtin_dirs(name)[1]
        if not (folder / "model.safetensors").is_file():
            raise UserError(
                f"--target mini-qwen: its draft is not in this install ({folder}); pass --draft NAME=PATH."
            )
        drafts = {"eaglevlm": SpecVLMDraftModel.from_pretrained(folder).bind_target(target).eval()}
        compressing = folder.parent / "qwen_specvlm"  # the video run's compressing draft
        if (compressing / "model.safetensors").is_file():
            drafts["specvlm"] = SpecVLMDraftModel.from_pretrained(compressing).bind_target(target).eval()
        return drafts
    return {name: load_draft(target, name) for name in DRAFT_NAMES}


HELD_OUT_SEED = 424242  # the prompts measured: a seed the mini VLM's training data never uses
CALIBRATION_SEED = 31337  # the prompts that choose --restrict-vocab's ids: neither training's nor the measured ones


def _check_restrict_vocab(name: str, size: int) -> None:
    """--restrict-vocab must not exceed the target's vocabulary (read from its config, before any weights load)."""
    from transformers import AutoConfig

    from specvlm_hf.mini import BUILTIN_MODELS, builtin_dirs

    from ..errors import UserError

    config = AutoConfig.from_pretrained(builtin_dirs(name)[0] if name in BUILTIN_MODELS else name)
    vocab = config.get_text_config().vocab_size
    if size > vocab:
        raise UserError(
            f"--restrict-vocab {size}: the target's vocabulary has only {vocab} ids; pass at most {vocab}."
        )


def calibration_counts(target, processor, count: int, new_tokens: int, device, dtype):
    """`(vocab,)` counts of the token ids in the target's plain greedy answers (`new_tokens` each) on `count`
    calibration prompts (`CALIBRATION_SEED`): what a restricted draft vocabulary is chosen from."""
    import torch
    from tqdm.auto import tqdm

    from specvlm_hf.draft_vocab import count_tokens

    answers = []
    with torch.inference_mode():
        cases = _mini_cases(processor, count, device, dtype, seed=CALIBRATION_SEED)
        for inputs in tqdm(cases, desc="calibration answers", unit="prompt"):
            output = target.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
            answers.append(output[0, inputs["input_ids"].shape[1] :].cpu())
    return count_tokens(answers, target.config.get_text_config().vocab_size)


def _restrict_drafts(target, processor, drafts: dict, args, device, dtype) -> dict:
    """Restricts every draft to the `args.restrict_vocab` ids the target's plain greedy answers use most on
    `args.calibration_prompts` prompts of their own (EOS always kept); returns what the report records."""
    from specvlm_hf.bench import eos_ids
    from specvlm_hf.draft_vocab import choose_draft_vocab

    counts = calibration_counts(target, processor, args.calibration_prompts, args.max_new_tokens, device, dtype)
    ids = choose_draft_vocab(counts, args.restrict_vocab, always=eos_ids(target))
    for draft in drafts.values():
        draft.restrict_vocab(ids)
    return {
        "ids": args.restrict_vocab,
        "calibration_prompts": args.calibration_prompts,
        "calibration_seed": CALIBRATION_SEED,
    }


def _mini_cases(
    processor, count, device, dtype, model_config=None, max_new_tokens: int = 0, seed: int = HELD_OUT_SEED
) -> list[dict]:
    """Prompts from the mini VLM's data generator (by default held out: a seed the training data never uses), each
    checked against the model's positions before any decoding."""
    from specvlm_hf.commands.generate import build_inputs
    from specvlm_hf.mini.data import make_example

    from .common import check_positions

    cases = []
    for index in range(count):
        record, image = make_example(seed=seed, index=index)
        prompt = record["conversations"][0]["value"].replace("<image>", "").strip()
        inputs = build_inputs(processor, image, prompt)
        if model_config is not None:
            check_positions(model_config, inputs["input_ids"].shape[1], max_new_tokens, f"Prompt {index + 1}")
        inputs = inputs.to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        cases.append(dict(inputs))
    return cases
