"""Greedy speed of trained drafts against plain `generate` on held-out prompts of the mini VLM.

    python benchmarks/train_bench_drafts.py --drafts eagle=specvlm_hf/mini/drafts/eaglevlm \
        specvlm=specvlm_hf/mini/drafts/specvlm --data heldout/data.json --prompts 24 --out results/x.json

For every prompt: plain greedy `generate` once, then each draft in tree and chain mode; reports sigma
(accepted tokens per target forward), wall time, speedup over plain and whether the outputs are identical.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafts", nargs="+", required=True, help="name=folder pairs")
    parser.add_argument("--target", default="mini", help="'mini', 'mini-qwen' or a target model folder")
    parser.add_argument("--data", required=True, help="LLaVA JSON of held-out records (their first prompts are used)")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--skip", type=int, default=0, help="skip the first N records")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--modes", default="tree,chain")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    import specvlm_hf
    from specvlm_hf import SpecVLMDraftModel
    from specvlm_hf.mini import BUILTIN_MODELS, load
    from specvlm_hf.training.data import ImageResolver, first_prompt, load_records, record_images
    from specvlm_hf.training.evaluation import prompt_inputs

    if args.target in BUILTIN_MODELS:
        target, processor = load(dtype=getattr(torch, args.dtype), device=device, name=args.target)
    else:
        from transformers import AutoModelForImageTextToText

        from specvlm_hf.processors import load_processor

        target = AutoModelForImageTextToText.from_pretrained(args.target, dtype=getattr(torch, args.dtype))
        target = target.to(device).eval()
        processor = load_processor(args.target)
    specvlm_hf.enable(target)
    records = load_records(args.data)[args.skip : args.skip + args.prompts]
    resolver = ImageResolver(None, args.data)
    prompts = [
        prompt_inputs(
            processor,
            first_prompt(processor, r),
            [resolver.open(i, r, k) for i in record_images(r)],
            device,
            target.dtype,
        )
        for k, r in enumerate(records)
    ]
    drafts = {}
    for pair in args.drafts:
        name, folder = pair.split("=", 1)
        drafts[name] = SpecVLMDraftModel.from_pretrained(folder).bind_target(target).eval()
    modes = [m for m in args.modes.split(",") if m]

    def timed(fn):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    # warm-up (first-call set-up, CUDA kernels)
    for inputs in prompts[:2]:
        target.generate(**inputs, max_new_tokens=8, do_sample=False)
        for draft in drafts.values():
            for mode in modes:
                draft.config.decoding_mode = mode
                target.generate(**inputs, assistant_model=draft, max_new_tokens=8, do_sample=False)

    runs = {f"{name}/{mode}": {"seconds": 0.0, "accepted": [], "identical": 0} for name in drafts for mode in modes}
    plain_seconds, new_tokens = 0.0, 0
    with torch.no_grad():
        for inputs in prompts:
            expected, seconds = timed(
                lambda: target.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            )
            plain_seconds += seconds
            new_tokens += expected.shape[1] - inputs["input_ids"].shape[1]
            for name, draft in drafts.items():
                for mode in modes:
                    draft.config.decoding_mode = mode
                    out, seconds = timed(
                        lambda: target.generate(
                            **inputs, assistant_model=draft, max_new_tokens=args.max_new_tokens, do_sample=False
                        )
                    )
                    run = runs[f"{name}/{mode}"]
                    run["seconds"] += seconds
                    run["accepted"] += draft.stats.accepted_per_round
                    run["identical"] += int(torch.equal(out, expected))
    result = {
        "machine": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "device": device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "new_tokens": new_tokens,
        "plain_seconds": plain_seconds,
        "plain_tokens_per_second": new_tokens / plain_seconds,
        "runs": {},
    }
    for key, run in runs.items():
        accepted = run["accepted"]
        result["runs"][key] = {
            "sigma": sum(accepted) / max(len(accepted), 1),
            "rounds": len(accepted),
            "seconds": run["seconds"],
            "tokens_per_second": new_tokens / run["seconds"],
            "speedup": plain_seconds / run["seconds"],
            "identical_to_plain": f"{run['identical']}/{len(prompts)}",
        }
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
