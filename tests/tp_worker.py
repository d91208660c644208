"""One rank of `test_tensor_parallel.py`: run with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (as `torchrun`
sets them). Loads the saved tiny targets whole and with `tp_plan="auto"` (transformers' tensor parallelism over
gloo), decodes with SpecVLM in tree, chain and static mode, and writes what it saw to `report_<rank>.json`."""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)
warnings.filterwarnings("ignore")

import specvlm_hf  # noqa: E402
from specvlm_hf import SpecVLMDraftModel  # noqa: E402
from specvlm_hf.hf_internals import tensor_parallel_mesh, unsharded  # noqa: E402
from specvlm_hf.tensor_parallel import TensorParallelDivergenceError  # noqa: E402
from tiny_families import family_inputs  # noqa: E402
from tiny_models import oracle_draft, random_inputs  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402

MODES = {"tree": {}, "chain": {}, "static": {"cache_implementation": "static"}}


def load_tp(folder: str, plan="auto"):
    try:
        from transformers import DistributedConfig  # transformers 5.17+: tp_plan= alone is deprecated

        model = AutoModelForImageTextToText.from_pretrained(folder, distributed_config=DistributedConfig(tp_plan=plan))
    except ImportError:
        model = AutoModelForImageTextToText.from_pretrained(folder, tp_plan=plan)
    return specvlm_hf.enable(model.eval())


def draft_for(whole, mode: str, kind: str = "oracle", **overrides):
    if kind == "fresh":
        torch.manual_seed(100 + dist.get_rank())  # a different random draft on every rank
        draft = SpecVLMDraftModel.from_target(whole, **overrides)
    else:
        draft = oracle_draft(whole, noise=0.003 if kind == "noisy" else 0.0, seed=1, **overrides)
    draft.config.decoding_mode = "chain" if mode == "chain" else "tree"
    return draft


def family_report(folder: str, family: str) -> dict:
    whole = specvlm_hf.enable(AutoModelForImageTextToText.from_pretrained(folder).eval())
    tp = load_tp(folder)
    mesh = tensor_parallel_mesh(tp)
    q_proj = tp.model.language_model.layers[0].self_attn.q_proj.weight
    whole_q = whole.model.language_model.layers[0].self_attn.q_proj.weight
    report = {
        "mesh_size": mesh.size() if mesh is not None else None,
        "whole_mesh": tensor_parallel_mesh(whole) is None,
        "q_proj_local_rows": q_proj.to_local().shape[0],
        "q_proj_rows": whole_q.shape[0],
        "unsharded_equal": bool(torch.equal(unsharded(q_proj.detach()), whole_q.detach())),
        "cases": [],
    }
    generator = torch.Generator().manual_seed(5)
    make = random_inputs if family == "llava" else family_inputs
    prompts = [make(whole, generator), make(whole, generator)]
    for mode, extra in MODES.items():
        for index, (kind, inputs) in enumerate(zip(("oracle", "noisy"), prompts)):
            kwargs = {"do_sample": False, "max_new_tokens": 14 + 2 * index, **extra}
            if index == 0:
                kwargs["min_new_tokens"] = kwargs["max_new_tokens"]
            reference = whole.generate(**inputs, **kwargs).tolist()
            plain = tp.generate(**inputs, **kwargs).tolist()
            draft = draft_for(whole, mode, kind)
            speculative = tp.generate(**inputs, **kwargs, assistant_model=draft).tolist()
            report["cases"].append(
                {
                    "mode": mode,
                    "kind": kind,
                    "plain_equal": plain == reference,
                    "speculative_equal": speculative == reference,
                    "accepted": draft.stats.accepted_per_round,
                    "tokens": speculative,
                }
            )
    return report


def sharded_head_report(folder: str) -> dict:
    """The lm_head column-sharded too (`colwise_gather_output`, as transformers shards text-only LMs' heads): the
    draft's reduced vocabulary gathers its rows from every rank."""
    whole = specvlm_hf.enable(AutoModelForImageTextToText.from_pretrained(folder).eval())
    tp = load_tp(folder, dict(whole.tp_plan) | {"lm_head": "colwise_gather_output"})
    inputs = random_inputs(whole, torch.Generator().manual_seed(9))
    kwargs = {"do_sample": False, "max_new_tokens": 14, "min_new_tokens": 14}
    reference = whole.generate(**inputs, **kwargs).tolist()
    vocab = whole.config.get_text_config().vocab_size
    equal = {}
    for name, overrides in {"full": {}, "reduced": {"draft_vocab_size": vocab // 2}}.items():
        draft = draft_for(whole, "tree", **overrides)
        if overrides:
            draft.set_draft_vocab(torch.arange(vocab // 2) * 2 + (torch.arange(vocab // 2) % 2))
        equal[name] = tp.generate(**inputs, **kwargs, assistant_model=draft).tolist() == reference
    head = tp.get_output_embeddings().weight
    return {"head_sharded": type(head).__name__ == "DTensor" and head.to_local().shape[0] == vocab // 2, **equal}


def divergence_report(folder: str) -> dict:
    """Rank 1 runs another call (one prompt token differs): every rank must raise, naming rank 1, instead of hanging
    or mixing. (A different draft on rank 1 is not a reliable way to diverge: on transformers 5.24 both ranks'
    drafts proposed the same tokens.)"""
    whole = specvlm_hf.enable(AutoModelForImageTextToText.from_pretrained(folder).eval())
    tp = load_tp(folder)
    inputs = random_inputs(whole, torch.Generator().manual_seed(11))
    if dist.get_rank() == 1:
        inputs["input_ids"] = inputs["input_ids"].clone()
        inputs["input_ids"][0, -1] = (inputs["input_ids"][0, -1] + 1) % 90 + 3
    out = {}
    for mode in ("tree", "chain"):
        draft = draft_for(whole, mode, "oracle")
        try:
            tp.generate(**inputs, do_sample=False, max_new_tokens=16, min_new_tokens=16, assistant_model=draft)
            out[mode] = None
        except TensorParallelDivergenceError as error:
            out[mode] = str(error)
    return out


def main(workdir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {"world": dist.get_world_size()}
    try:
        report["llava"] = family_report(f"{workdir}/llava", "llava")
        report["qwen2_5_vl"] = family_report(f"{workdir}/qwen2_5_vl", "qwen2_5_vl")
        report["sharded_head"] = sharded_head_report(f"{workdir}/llava")
        report["divergence"] = divergence_report(f"{workdir}/llava")
    except Exception:
        report["error"] = traceback.format_exc()
    Path(workdir, f"report_{rank}.json").write_text(json.dumps(report))
    dist.barrier()  # both ranks done before the group is torn down (gloo once aborted at exit)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
