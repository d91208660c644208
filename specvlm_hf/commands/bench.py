"""`specvlm bench`: every decoding method side by side on the same prompts (see `specvlm_hf.bench`).

    specvlm bench                                   # the mini VLM and its shipped drafts, CPU or GPU
    specvlm bench --target llava-hf/llava-1.5-7b-hf --draft eaglevlm=path/to/draft --projected-sigma 3.67
"""

from __future__ import annotations

import os


def register(subparsers):
    parser = subparsers.add_parser("bench", help="Benchmark every decoding method side by side.",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="mini", help="LLaVA model + processor folder or Hub id (default: the mini VLM).")
    parser.add_argument("--draft", action="append", default=[], metavar="NAME=PATH",
                        help="A draft folder or Hub id; NAME is eaglevlm or specvlm. Repeatable. "
                             "Default with the mini target: its shipped drafts.")
    parser.add_argument("--assistant-lm", default=None, help="A small causal LM for transformers' assisted generation.")
    parser.add_argument("--methods", default=",".join(_default_methods()), help="Comma-separated methods.")
    parser.add_argument("--num-prompts", type=int, default=8, help="Held-out mini-VLM prompts to use (default 8).")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on GPU, float32 on CPU.")
    parser.add_argument("--projected-sigma", type=float, default=None,
                        help="Also project the tree methods' speed-up at this sigma (labelled as a projection).")
    parser.add_argument("--out", default="bench.json", help="JSON report path (a PNG chart is written next to it).")
    parser.set_defaults(func=_run)


def _default_methods():
    from specvlm_hf.bench import METHODS

    return [m for m in METHODS if m != "assisted-lm"]


def _run(args):
    import torch

    from specvlm_hf import SpecVLMDraftModel
    from specvlm_hf.bench import format_table, run_bench, save_report

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if device == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    target, processor = _load_target(args.target, device, dtype)
    drafts = {}
    for spec in args.draft:
        name, sep, path = spec.partition("=")
        if not sep or name not in ("eaglevlm", "specvlm"):
            raise SystemExit(f"--draft takes NAME=PATH with NAME eaglevlm or specvlm, got {spec!r}")
        drafts[name] = SpecVLMDraftModel.from_pretrained(path).bind_target(target).eval()
    if not drafts and args.target == "mini":
        drafts = _mini_drafts(target)
    assistant = None
    if args.assistant_lm:
        from transformers import AutoModelForCausalLM

        assistant = AutoModelForCausalLM.from_pretrained(args.assistant_lm, dtype=dtype).to(device).eval()
    cases = _mini_cases(processor, args.num_prompts, device, dtype)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    report = run_bench(target, cases, drafts, methods, args.max_new_tokens, assistant, args.projected_sigma)
    report["target"] = args.target
    print(format_table(report))
    png = os.path.splitext(args.out)[0] + ".png"
    save_report(report, args.out, png)
    print(f"wrote {args.out} and {png}")
    return 0 if all(r["matches_plain"] is not False for r in report["methods"]) else 1


def _load_target(name, device, dtype):
    if name == "mini":
        from specvlm_hf.mini import load

        return load(dtype=dtype, device=device)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return model, AutoProcessor.from_pretrained(name)


def _mini_drafts(target) -> dict:
    """The mini VLM's shipped drafts."""
    from specvlm_hf.mini.drafts import DRAFT_NAMES, load_draft

    return {name: load_draft(target, name) for name in DRAFT_NAMES}


def _mini_cases(processor, count, device, dtype) -> list[dict]:
    """Held-out prompts from the mini VLM's data generator (a seed the training data never uses)."""
    from specvlm_hf.commands.generate import build_inputs
    from specvlm_hf.mini.data import make_example

    cases = []
    for index in range(count):
        record, image = make_example(seed=424242, index=index)
        prompt = record["conversations"][0]["value"].replace("<image>", "").strip()
        inputs = build_inputs(processor, image, prompt).to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        cases.append(dict(inputs))
    return cases
