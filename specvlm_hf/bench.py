"""`specvlm bench`: every decoding method side by side, in one process, on the same prompts.

Methods (each skipped with a reason when what it needs is missing):

| name | what |
|---|---|
| `plain` | `generate`, eager (the reference for the equality check) |
| `plain-static` | `generate(cache_implementation="static")`: transformers compiles the decode step on a GPU |
| `assisted-lm` | transformers' assisted generation with a small draft language model (`assistant_lm`) |
| `prompt-lookup` | transformers' prompt-lookup decoding (`prompt_lookup_num_tokens=10`) |
| `specvlm-chain` | a SpecVLM draft in chain mode, through transformers' assisted loop |
| `eaglevlm-tree` | the EagleVLM draft (no compressor), EAGLE-2 tree |
| `specvlm-tree` | the SpecVLM draft (with its compressor), EAGLE-2 tree |
| `*-tree-static` | the same on the fast path (static caches; CUDA graphs on a GPU) |

For each: tokens/s, speed-up over each baseline, sigma, draft / verify time per round, peak GPU memory,
the draft's KV-cache size, and whether greedy outputs equal plain `generate`.

Sigma is the project's one definition (`SpecVLMStats.sigma`): mean tokens accepted per target verification
forward, the target's own token included. SpecVLM methods report their drafts' stats (in tree mode the
prefill's forward and its first token are not a round, so they are not counted); for the other methods every
target forward verifies (plain decoding: 1 token each), so sigma is new tokens over the target forwards counted
by a streamer. `projected_sigma` adds, for
the tree methods, the speed-up that the measured round cost would give at that sigma (a projection,
labelled as such), for targets whose real weights are not available here.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer

SIGMA_DEFINITION = (
    "tokens accepted per target verification forward, the target's own token included (SpecVLMStats.sigma)"
)
METHODS = (
    "plain",
    "plain-static",
    "assisted-lm",
    "prompt-lookup",
    "specvlm-chain",
    "eaglevlm-tree",
    "specvlm-tree",
    "eaglevlm-tree-static",
    "specvlm-tree-static",
)


class RoundCounter(BaseStreamer):
    """Counts `put` calls after the prompt: one per target forward for every decoding method."""

    def __init__(self):
        self.puts = -1  # the first put is the prompt
        self.tokens = 0

    def put(self, value):
        self.puts += 1
        if self.puts > 0:
            self.tokens += value.numel()

    def end(self):
        pass


@dataclass
class MethodResult:
    method: str
    status: str = "ok"
    new_tokens: int = 0
    seconds: float = 0.0
    target_forwards: int = 0
    tokens_per_second: float = 0.0
    sigma: float | None = None
    rounds: int = 0
    speedup: dict = field(default_factory=dict)
    draft_ms_per_round: float | None = None
    verify_ms_per_round: float | None = None
    round_ms: float | None = None
    peak_memory_gb: float | None = None
    draft_kv_mb: float | None = None
    visual_branch: str | None = None
    matches_plain: bool | None = None
    projected: dict | None = None
    warmup_seconds: float = 0.0  # untimed warm-up calls (compilation, graph capture), outside `seconds`
    rows_per_round: list | None = None  # batches: the distinct numbers of rows the rounds ran with
    speculation_off: bool = False  # a draft method whose batches all ran generate's own loop (the batch rule)


def software_versions(device=None) -> dict:
    """What a figure was measured on: the GPU's name (off CUDA: the CPU and torch's thread count), torch, its CUDA and
    cuDNN versions, transformers, and the UTC time. `device`: a device or its name (None: the first GPU if any)."""
    import platform

    import transformers

    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    return {
        "machine": torch.cuda.get_device_name(device)
        if on_cuda
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if on_cuda else None,
        # sdpa's cuDNN kernel under CUDA graphs depends on it (pytorch/pytorch#169849)
        "cudnn": torch.backends.cudnn.version() if on_cuda and torch.backends.cudnn.is_available() else None,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def eos_ids(model) -> list[int]:
    """The end-of-sequence ids of `model`'s generation config (none, one or several) as a list."""
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _draft_kv_mb(draft, stats) -> float:
    """Bytes of the draft's KV cache at the end of a call: every cached pair (compressed image included)."""
    text = draft.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * draft.fc.weight.element_size()
    cached = stats.prompt_tokens - stats.target_visual_tokens + stats.draft_visual_tokens + stats.new_tokens
    return cached * per_token / 2**20


def method_kwargs(method: str, drafts: dict, assistant_lm=None) -> dict | str:
    """`generate` kwargs of a method, or the reason it cannot run."""
    if method == "plain":
        return {}
    if method == "plain-static":
        return {"cache_implementation": "static"}
    if method == "prompt-lookup":
        return {"prompt_lookup_num_tokens": 10}
    if method == "assisted-lm":
        return {"assistant_model": assistant_lm} if assistant_lm is not None else "no --assistant-lm given"
    family, mode = method.split("-")[0], method.split("-")[1]
    draft = drafts.get(family)
    if draft is None:
        return f"no {family} draft given"
    draft = copy.copy(draft)  # shares weights; its own config so that modes do not leak between methods
    draft.config = copy.deepcopy(draft.config)
    draft.config.decoding_mode = mode
    kwargs = {"assistant_model": draft}
    if method.endswith("-static"):
        kwargs["cache_implementation"] = "static"
    return kwargs


# methods transformers (or chain mode) run at batch size 1 only
BATCH_ONE_METHODS = ("assisted-lm", "prompt-lookup", "specvlm-chain", "eaglevlm-chain")


def batch_cases(cases: list[dict], batch_size: int, pad_token: int) -> list[dict]:
    """`cases` (batch-1 `generate` inputs) grouped into batches of `batch_size` rows, left-padded (ids with
    `pad_token`, the attention mask and `mm_token_type_ids` with 0), image inputs concatenated in row order (rows
    without an image add none); the last batch is filled up by repeating cases from the start."""
    if batch_size == 1:
        return cases
    count = -(-len(cases) // batch_size) * batch_size
    rows = [cases[index % len(cases)] for index in range(count)]
    batches = []
    for first in range(0, count, batch_size):
        group = rows[first : first + batch_size]
        width = max(row["input_ids"].shape[1] for row in group)
        batch = {}
        keys = list(dict.fromkeys(key for row in group for key in row))  # rows without an image lack its inputs
        for key in keys:
            values = [row[key] for row in group if key in row]
            if key in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"):
                if len(values) != len(group):
                    raise ValueError(f"batch_cases: every case needs {key!r}; some cases lack it")
                fill = pad_token if key == "input_ids" else 0
                values = [
                    torch.cat([value.new_full((1, width - value.shape[1]), fill), value], dim=1) for value in values
                ]
            batch[key] = torch.cat(values)
        batches.append(batch)
    return batches


def new_tokens_per_row(output: torch.Tensor, start: int, eos: set[int]) -> list[list[int]]:
    """Each row's new tokens, up to and including its first EOS (what follows is padding)."""
    rows = []
    for row in output[:, start:].tolist():
        end = next((index + 1 for index, token in enumerate(row) if token in eos), len(row))
        rows.append(row[:end])
    return rows


def failure_reason(method: str, error: Exception) -> str:
    """The table's status for a method that failed: why, in words, for the failures we know."""
    message = str(error)
    if method == "prompt-lookup" and "Image features and image tokens do not match" in message:
        import transformers

        return (
            f"failed: transformers {transformers.__version__}'s prompt lookup copies the prompt's image placeholder "
            "tokens into its candidates, which the model then refuses (a transformers limitation with image inputs)"
        )
    first_line = message.strip().splitlines()[0] if message.strip() else ""
    return f"failed: {type(error).__name__}: {first_line}"[:300]


def run_bench(
    target,
    cases: list[dict],
    drafts: dict | None = None,
    methods=METHODS,
    max_new_tokens: int = 64,
    assistant_lm=None,
    projected_sigma: float | None = None,
    warmup: bool = True,
    batch_size: int = 1,
) -> dict:
    """Runs every method on every case (greedy) and returns `{"methods": [MethodResult...], ...}`.

    Args:
        target: a VLM, `specvlm_hf.enable`d here.
        cases: `generate` inputs (batch 1), e.g. from a processor.
        batch_size: decode the cases in left-padded batches of this many rows (`batch_cases`); tokens/s counts
            every row's new tokens up to its EOS, and methods that run at batch size 1 only are skipped.
        drafts: `{"eaglevlm": draft, "specvlm": draft}` (either may be missing).
        methods: names from `METHODS`.
        projected_sigma: also project the tree methods' speed-up at this sigma.
        warmup: run each method once, untimed, before measuring (compilation, caches).
    """
    import specvlm_hf

    from .errors import UserError

    if not cases:
        raise UserError("No prompts to benchmark: pass at least one case (--num-prompts 1 or more).")
    specvlm_hf.enable(target)
    drafts = drafts or {}
    device = next(target.parameters()).device
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown bench methods {sorted(unknown)}; choose from {list(METHODS)}")
    reference = {}
    results = []
    eos = set(eos_ids(target))
    pad = target.generation_config.pad_token_id
    cases = batch_cases(cases, batch_size, pad if pad is not None else min(eos, default=0))
    for method in ["plain"] + [m for m in methods if m != "plain"]:
        kwargs = method_kwargs(method, drafts, assistant_lm)
        if batch_size > 1 and method in BATCH_ONE_METHODS:
            kwargs = f"batch size {batch_size}: this method decodes one prompt at a time"
        result = MethodResult(method)
        if isinstance(kwargs, str):
            result.status = f"skipped: {kwargs}"
            results.append(result)
            continue
        draft = kwargs.get("assistant_model") if "tree" in method or "chain" in method else None
        draft_seconds = verify_seconds = rounds = 0.0
        accepted = row_rounds = 0  # row_rounds: one per row and round (a batch's rows each add tokens)
        kv, branches, equal, row_counts, modes = [], set(), True, set(), set()
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for index, inputs in enumerate(cases):
                generate_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
                # static caches compile per length: warm up every case there, the first elsewhere
                if warmup and (index == 0 or generate_kwargs.get("cache_implementation") == "static"):
                    _sync(device)
                    begin = time.perf_counter()
                    with torch.inference_mode():
                        target.generate(**inputs, **generate_kwargs)
                    _sync(device)
                    result.warmup_seconds += time.perf_counter() - begin
                counter = RoundCounter()
                _sync(device)
                start = time.perf_counter()
                with torch.inference_mode():
                    output = target.generate(**inputs, streamer=counter, **generate_kwargs)
                _sync(device)
                result.seconds += time.perf_counter() - start
                new = new_tokens_per_row(output, inputs["input_ids"].shape[1], eos if batch_size > 1 else set())
                result.new_tokens += sum(len(row) for row in new)
                result.target_forwards += counter.puts
                if method == "plain":
                    reference[index] = new
                else:
                    equal &= new == reference[index]
                if draft is not None:
                    stats = draft.stats
                    draft_seconds += stats.draft_seconds
                    verify_seconds += stats.verify_seconds
                    rounds += stats.rounds
                    accepted += sum(stats.accepted_per_round)
                    row_rounds += len(stats.accepted_per_round)
                    kv.append(_draft_kv_mb(draft, stats))
                    branches.add(stats.visual_branch)
                    row_counts.update(stats.rows_per_round)
                    modes.add(stats.mode)
        except Exception as error:  # one failing method must not hide the others
            result.status = failure_reason(method, error)
            results.append(result)
            continue
        result.tokens_per_second = result.new_tokens / result.seconds if result.seconds else 0.0
        if draft is not None:  # SpecVLMStats.sigma over every case
            result.rounds = int(rounds)
            result.sigma = accepted / row_rounds if row_rounds else None
        else:
            result.rounds = result.target_forwards
            forwards = result.target_forwards * batch_size  # row-steps: every forward decodes every row
            result.sigma = result.new_tokens / forwards if forwards else None
        result.matches_plain = None if method == "plain" else equal
        if device.type == "cuda":
            result.peak_memory_gb = torch.cuda.max_memory_allocated(device) / 1e9
        if draft is not None and rounds:
            result.draft_ms_per_round = 1000 * draft_seconds / rounds
            result.verify_ms_per_round = 1000 * verify_seconds / rounds
            result.round_ms = result.draft_ms_per_round + result.verify_ms_per_round
            result.draft_kv_mb = max(kv)
            result.visual_branch = ",".join(sorted(branches))
            result.rows_per_round = sorted(row_counts) if batch_size > 1 else None
        result.speculation_off = modes == {"plain"}
        results.append(result)

    by_name = {r.method: r for r in results if r.status == "ok"}
    for result in by_name.values():
        for base in ("plain", "plain-static"):
            if base in by_name and by_name[base].tokens_per_second:
                result.speedup[base] = result.tokens_per_second / by_name[base].tokens_per_second
        if projected_sigma and result.round_ms and "plain" in by_name:
            plain_ms = 1000 / by_name["plain"].tokens_per_second
            result.projected = {
                "sigma": projected_sigma,
                "label": "projection",
                "speedup_over_plain": projected_sigma * plain_ms / result.round_ms,
            }
            if "plain-static" in by_name:
                static_ms = 1000 / by_name["plain-static"].tokens_per_second
                result.projected["speedup_over_plain_static"] = projected_sigma * static_ms / result.round_ms
    from .commands.common import default_decoding_mode

    versions = software_versions(device)
    return {
        "device": versions.pop("machine"),
        **versions,
        "dtype": str(next(target.parameters()).dtype).replace("torch.", ""),
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "cases": len(cases) * batch_size,
        "default_mode": default_decoding_mode(device),
        "sigma_definition": SIGMA_DEFINITION,
        "methods": [asdict(r) for r in results],
    }


def method_mode(method: str) -> str | None:
    """ "tree" or "chain" for a SpecVLM method on the eager loop, else None."""
    parts = method.split("-")
    return parts[1] if len(parts) == 2 and parts[0] in ("specvlm", "eaglevlm") else None


def format_table(report: dict) -> str:
    """A plain-text table of a bench report, with notes: what sigma is, which mode `specvlm generate` / `specvlm
    demo` use on this device (marked *), and why outputs may differ from plain `generate`."""
    from .commands.common import exactness_note

    header = (
        f"{'method':<22}{'tok/s':>9}{'x plain':>9}{'x static':>9}{'sigma':>7}{'round ms':>10}{'draft KV MB':>12}"
        f"{'warm-up s':>10}  equal  status"
    )
    cuda = f" (CUDA {report['cuda']}, cuDNN {report['cudnn']})" if report.get("cuda") else ""
    lines = [
        f"device: {report['device']}  dtype: {report['dtype']}  cases: {report['cases']}  "
        f"max_new_tokens: {report['max_new_tokens']}",
        f"torch {report.get('torch', '?')}{cuda}, transformers {report.get('transformers', '?')}, {report['date']}",
    ]
    settings = []
    if report.get("restricted_vocab"):
        settings.append(f"{report['restricted_vocab']['ids']}-id vocabulary (--restrict-vocab)")
    if report.get("fp8_head"):
        settings.append("fp8 lm_head (--fp8-head)")
    if settings:
        lines.append("drafts: " + ", ".join(settings))
    lines.append(header)
    for r in report["methods"]:

        def num(value, fmt):
            return format(value, fmt) if isinstance(value, (int, float)) else "-"

        equal = "-" if r["matches_plain"] is None else ("yes" if r["matches_plain"] else "NO")
        name = r["method"] + (" *" if method_mode(r["method"]) == report.get("default_mode") else "")
        lines.append(
            f"{name:<22}{num(r['tokens_per_second'] or None, '9.1f'):>9}{num(r['speedup'].get('plain'), '9.2f'):>9}"
            f"{num(r['speedup'].get('plain-static'), '9.2f'):>9}{num(r['sigma'], '7.2f'):>7}"
            f"{num(r['round_ms'], '10.1f'):>10}"
            f"{num(r['draft_kv_mb'], '12.2f'):>12}{num(r.get('warmup_seconds'), '10.1f'):>10}"
            f"  {equal:<5}  {r['status']}"
        )
        if r.get("speculation_off"):
            lines.append(
                f"{'':<22}speculation off at batch size {report.get('batch_size')}: generate's own loop ran "
                "(specvlm_hf.decoding.tree_tokens_for_batch; draft.config.max_speculative_batch forces it)"
            )
        if r.get("projected"):
            lines.append(
                f"{'':<22}projection at sigma {r['projected']['sigma']}: "
                + ", ".join(f"{k} {v:.2f}x" for k, v in r["projected"].items() if k.startswith("speedup"))
            )
    lines.append(f"sigma: {report.get('sigma_definition', SIGMA_DEFINITION)}.")
    lines.append(
        "warm-up s: untimed first calls (torch.compile and CUDA-graph capture on the fast path), not in tok/s."
    )
    if report.get("default_mode"):
        lines.append(
            f"* the decoding mode `specvlm generate` and `specvlm demo` use here ({report['default_mode']}: chain on "
            "the CPU, tree on a GPU)."
        )
    if any(r["matches_plain"] is False for r in report["methods"]):
        lines.append("NO: " + exactness_note(report["dtype"], identical=False) + ".")
    return "\n".join(lines)


def save_report(report: dict, json_path: str, png_path: str | None = None) -> None:
    """Writes the JSON report and, when matplotlib is installed and `png_path` is given, bar charts."""
    with open(json_path, "w") as handle:
        json.dump(report, handle, indent=1)
    if not png_path:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib)")
        return
    rows = [r for r in report["methods"] if r["status"] == "ok"]
    names = [r["method"] for r in rows]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    axes[0].bar(names, [r["tokens_per_second"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("tokens / s")
    axes[1].bar(names, [r["sigma"] or 0 for r in rows], color="tab:green")
    axes[1].set_ylabel("sigma (tokens per target forward)")
    for axis in axes:
        axis.tick_params(axis="x", rotation=45)
        for label in axis.get_xticklabels():
            label.set_horizontalalignment("right")
    figure.suptitle(f"specvlm bench — {report['device']}, {report['dtype']}, {report['cases']} prompts")
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
