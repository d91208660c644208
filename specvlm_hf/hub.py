"""Publishing trained drafts to the Hugging Face Hub: the model card and the upload.

    from specvlm_hf.hub import publish_draft
    publish_draft("runs/draft", "me/llava-1.5-7b-specvlm-draft", base_model="llava-hf/llava-1.5-7b-hf")

A published repo holds what `SpecVLMDraftModel.save_pretrained` wrote (safetensors weights, `config.json` with
`auto_map`, the remote-code files, `custom_generate/`), the draft's `eval_results.json` when it has one, and a
`README.md` rendered from `model_cards/specvlm_draft.md`: the Hub metadata header, usage code for the three
ways to use a draft, and the measured sigma and speedup read from `eval_results.json` (never typed by hand;
without the file the card says "not measured").

`eval_results.json` (written by the evaluation, schema version 1)::

    {
      "sigma": 3.4,                  # required: mean tokens accepted per target forward, default decoding mode
      "speedup": 2.1,                # required: wall-time speedup over plain greedy generate, same machine
      "device": "NVIDIA H100 80GB",  # required: where it was measured
      "dataset": "mini VLM eval split, 200 prompts",   # required: what was decoded
      "date": "2026-05-01",          # required: ISO date of the measurement
      "dtype": "bfloat16",           # optional
      "max_new_tokens": 256,         # optional
      "temperature": 0.0,            # optional (0: greedy)
      "modes": {                     # optional: one entry per decoding mode measured
        "tree":  {"sigma": 3.4, "speedup": 2.1, "tokens_per_second": 120.0, "baseline_tokens_per_second": 57.0},
        "chain": {"sigma": 2.6, "speedup": 1.6}
      }
    }
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EnvironmentProblem, UserError
from .hf_internals import hub_client_factory
from .packaging import LOCATION_FILE, draft_location_source

logger = logging.getLogger(__name__)

EVAL_RESULTS_FILE = "eval_results.json"
CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "specvlm_draft.md"
"""The model card template (Jinja, rendered by `huggingface_hub.ModelCard.from_template`)."""

DEFAULT_LICENSE = "apache-2.0"
PIPELINE_TAG = "image-text-to-text"
TAGS = ["specvlm", "speculative-decoding", "eagle", "draft-model", "vision-language-model", "custom_generate"]
# files a saved draft must have (written by `SpecVLMDraftModel.save_pretrained`)
REQUIRED_FILES = (
    "config.json",
    "modeling_specvlm_draft.py",
    "configuration_specvlm_draft.py",
    "custom_generate/generate.py",
)
_SKIPPED_PARTS = {"__pycache__", ".git", ".ipynb_checkpoints"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DEFAULT_TIMEOUT = 30.0
"""Seconds a Hub request may wait for the server (connect, each read and write) before the upload fails."""


class DraftFolderError(UserError):
    """The folder is not a saved SpecVLM draft, or its `eval_results.json` is malformed."""


class HubError(EnvironmentProblem):
    """The Hub could not be reached, did not answer in time, or refused the request; the message says what to do."""


@dataclass
class ModeResult:
    """Measurements of one decoding mode (`"tree"` or `"chain"`)."""

    sigma: float
    speedup: float
    tokens_per_second: float | None = None
    baseline_tokens_per_second: float | None = None


@dataclass
class EvalResults:
    """The contents of a draft's `eval_results.json` (see the module docstring for the schema)."""

    sigma: float
    speedup: float
    device: str
    dataset: str
    date: str
    dtype: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    modes: dict[str, ModeResult] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict, source: str = EVAL_RESULTS_FILE) -> "EvalResults":
        def fail(message: str):
            raise DraftFolderError(f"{source}: {message} (schema: see `specvlm_hf.hub`).")

        def number(value, name: str, optional: bool = False) -> float | None:
            if value is None and optional:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                fail(f"{name} must be a non-negative number, got {value!r}")
            return float(value)

        if not isinstance(data, dict):
            fail("the file must hold a JSON object")
        missing = [key for key in ("sigma", "speedup", "device", "dataset", "date") if key not in data]
        if missing:
            fail(f"missing required keys {missing}")
        for key in ("device", "dataset", "date"):
            if not isinstance(data[key], str) or not data[key].strip():
                fail(f"{key} must be a non-empty string")
        modes = {}
        for mode, entry in (data.get("modes") or {}).items():
            if not isinstance(entry, dict) or "sigma" not in entry or "speedup" not in entry:
                fail(f"modes.{mode} must be an object with sigma and speedup")
            modes[mode] = ModeResult(
                sigma=number(entry["sigma"], f"modes.{mode}.sigma"),
                speedup=number(entry["speedup"], f"modes.{mode}.speedup"),
                tokens_per_second=number(entry.get("tokens_per_second"), f"modes.{mode}.tokens_per_second", True),
                baseline_tokens_per_second=number(
                    entry.get("baseline_tokens_per_second"), f"modes.{mode}.baseline_tokens_per_second", True
                ),
            )
        max_new_tokens = data.get("max_new_tokens")
        return cls(
            sigma=number(data["sigma"], "sigma"),
            speedup=number(data["speedup"], "speedup"),
            device=data["device"],
            dataset=data["dataset"],
            date=data["date"],
            dtype=data.get("dtype"),
            max_new_tokens=int(max_new_tokens) if max_new_tokens is not None else None,
            temperature=number(data.get("temperature"), "temperature", True),
            modes=modes,
        )


def load_eval_results(folder) -> EvalResults | None:
    """The draft's measured results from `folder/eval_results.json`, or None when the file is absent."""
    path = Path(folder) / EVAL_RESULTS_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        from .errors import json_error_message

        raise DraftFolderError(json_error_message(path, error, "fix it (schema: see `specvlm_hf.hub`)")) from None
    return EvalResults.from_dict(data, source=str(path))


def read_draft_config(folder) -> dict:
    """`config.json` of a saved draft, after checking that `folder` holds everything a Hub repo needs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DraftFolderError(f"{folder} is not a folder; pass the folder a draft was saved to with save_pretrained.")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    if not has_weights:
        missing.append("model.safetensors")
    if missing:
        raise DraftFolderError(
            f"{folder} is not a saved SpecVLM draft: {', '.join(missing)} missing. Save the draft with "
            "`draft.save_pretrained(folder)` (it writes the weights, config, remote code and custom_generate/)."
        )
    from .errors import read_json

    config = read_json(folder / "config.json", "re-save the draft with SpecVLMDraftModel.save_pretrained")
    if not isinstance(config, dict) or config.get("model_type") != "specvlm_draft":
        raise DraftFolderError(
            f"{folder}/config.json has model_type {config.get('model_type')!r}, not 'specvlm_draft': this is not a "
            "SpecVLM draft."
        )
    if "AutoModel" not in (config.get("auto_map") or {}):
        raise DraftFolderError(
            f"{folder}/config.json has no auto_map, so remote code would not load; re-save the draft with "
            "`SpecVLMDraftModel.save_pretrained`."
        )
    return config


def _parameter_count(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for weights in sorted(folder.glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += count
    return total


def _human_count(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def resolve_base_model(config: dict, base_model: str | None = None) -> str | None:
    """The Hub id of the draft's target: `base_model` if given, else the target's `name_or_path` recorded in
    the draft's config when it looks like a Hub id (`owner/name`) rather than a local folder; else None."""
    if base_model:
        return base_model
    name = (config.get("target") or {}).get("name_or_path") or ""
    if _HUB_ID.match(name) and not Path(name).exists():
        return name
    return None


def _eval_context(results: EvalResults, default_mode: str) -> dict:
    rows = []
    modes = results.modes or {default_mode: ModeResult(results.sigma, results.speedup)}
    for mode, result in modes.items():
        throughput = "n/a"
        if result.tokens_per_second is not None and result.baseline_tokens_per_second is not None:
            throughput = f"{result.tokens_per_second:.1f} / {result.baseline_tokens_per_second:.1f}"
        label = f"{mode} (default)" if mode == default_mode else mode
        rows.append(
            {
                "label": label,
                "sigma": f"{result.sigma:.2f}",
                "speedup": f"{result.speedup:.2f}x",
                "throughput": throughput,
            }
        )
    settings = []
    if results.temperature is not None:
        settings.append("greedy" if results.temperature == 0 else f"sampling at temperature {results.temperature:g}")
    if results.max_new_tokens is not None:
        settings.append(f"up to {results.max_new_tokens} new tokens")
    return {
        "rows": rows,
        "has_throughput": any(row["throughput"] != "n/a" for row in rows),
        "device": results.device,
        "dtype": results.dtype,
        "dataset": results.dataset,
        "date": results.date,
        "settings": ", ".join(settings) or "settings not recorded",
    }


def _target_loading_code(base_model: str | None, target_name: str) -> str:
    if base_model:
        return (
            "from transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
            f'target = AutoModelForImageTextToText.from_pretrained("{base_model}", dtype=torch.bfloat16).cuda()\n'
            f'processor = AutoProcessor.from_pretrained("{base_model}")'
        )
    if target_name == "the specvlm-hf mini VLM":
        return "from specvlm_hf.mini import load\n\ntarget, processor = load()  # the built-in mini VLM, on CPU"
    return (
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
        'target = AutoModelForImageTextToText.from_pretrained("<the target>")  '
        "# the model this draft was trained for\n"
        'processor = AutoProcessor.from_pretrained("<the target>")'
    )


def render_model_card(
    folder,
    repo_id: str,
    base_model: str | None = None,
    license: str = DEFAULT_LICENSE,
    template=None,
) -> str:
    """The model card (`README.md` text) of the draft saved in `folder`, to be published as `repo_id`.

    Args:
        folder: a folder written by `SpecVLMDraftModel.save_pretrained`, optionally with `eval_results.json`.
        repo_id: the Hub repo the card is for (used in the usage code).
        base_model: Hub id of the target (default: read from the draft's config, see `resolve_base_model`).
        license: Hub license id for the metadata header.
        template: path of a Jinja card template (default: `model_cards/specvlm_draft.md`).
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    config = read_draft_config(folder)
    template = Path(template) if template is not None else CARD_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(
            f"Model card template {template} not found; it ships in the repository's model_cards/ folder "
            "(use a source checkout of specvlm-hf, or pass template=)."
        )
    target = config.get("target") or {}
    base_model = resolve_base_model(config, base_model)
    if base_model is None:
        logger.warning("No Hub id for the draft's target: the card has no base_model (pass base_model=).")
    name_or_path = target.get("name_or_path") or ""
    if base_model:
        target_name = base_model
    elif name_or_path.rstrip("/").endswith("mini/weights"):
        target_name = "the specvlm-hf mini VLM"
    else:
        target_name = name_or_path or target.get("architecture") or "its target"
    results = load_eval_results(folder)
    decoding_mode = config.get("decoding_mode", "tree")
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        base_model=base_model,
        pipeline_tag=PIPELINE_TAG,
        tags=list(TAGS),
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        repo_id=repo_id,
        target_name=target_name,
        target_architecture=target.get("architecture", "unknown architecture"),
        target_vocab_size=target.get("vocab_size", "unknown"),
        target_hidden_size=target.get("hidden_size", "unknown"),
        target_loading=_target_loading_code(base_model, target_name),
        draft_parameters=_human_count(_parameter_count(folder)),
        num_draft_layers=config.get("num_draft_layers", 1),
        decoding_mode=decoding_mode,
        tree_total_tokens=config.get("tree_total_tokens"),
        tree_depth=config.get("tree_depth"),
        tree_top_k=config.get("tree_top_k"),
        eval=_eval_context(results, decoding_mode) if results is not None else None,
    )
    return str(card)


def files_to_publish(folder) -> list[Path]:
    """The files of a draft folder that go to the Hub, relative to it (caches and an old README.md excluded)."""
    folder = Path(folder)
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or _SKIPPED_PARTS & set(relative.parts) or path.suffix == ".pyc":
            continue
        if relative.as_posix() == "README.md" or relative.name.startswith("."):
            continue
        files.append(relative)
    return files


def require_token(token: str | None = None) -> str:
    """The Hub token to upload with (`token`, else `HF_TOKEN` or the saved login), checked before any request."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise UserError(
            "No Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass --token (a token with write "
            "access to the repo's namespace)."
        )
    return token


@contextmanager
def request_timeout(seconds: float):
    """Gives every `huggingface_hub` request in the block a timeout (its client has none by default, so a server
    that accepts connections but never answers would hang the upload forever)."""
    from huggingface_hub import set_client_factory

    previous = hub_client_factory()

    def factory():
        client = previous()
        client.timeout = type(client.timeout)(seconds)  # httpx's Timeout (huggingface_hub 1.x) or httpx2's (2.x)
        return client

    set_client_factory(factory)
    try:
        yield
    finally:
        set_client_factory(previous)


class _HttpErrors:
    """The transport errors of the HTTP clients `huggingface_hub` may use (httpx for 1.x, httpx2 for 2.x)."""

    def __init__(self, modules):
        self.TimeoutException = tuple(m.TimeoutException for m in modules)
        self.ConnectError = tuple(m.ConnectError for m in modules)
        self.TransportError = tuple(m.TransportError for m in modules)


def _http_module() -> _HttpErrors:
    import importlib

    modules = []
    for name in ("httpx", "httpx2"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            continue
    return _HttpErrors(modules)


def hub_error(error: Exception, endpoint: str, repo_id: str, timeout: float) -> HubError | None:
    """A one-line `HubError` (what happened, what to do) for a network or Hub error, or None for anything else."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    httpx = _http_module()

    where = f"the Hub at {endpoint}"
    if isinstance(error, OfflineModeIsEnabled):
        return HubError(
            f"HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it (or set it to 0) to push to {endpoint}."
        )
    if isinstance(error, httpx.TimeoutException):
        return HubError(
            f"{where} did not answer within {timeout:g} s; check the address (--endpoint / HF_ENDPOINT) and your "
            "network, or allow more time with --timeout."
        )
    if isinstance(error, httpx.ConnectError):
        return HubError(
            f"Could not connect to {where} ({error}); check the address (--endpoint / HF_ENDPOINT) and your network."
        )
    if isinstance(error, httpx.TransportError):
        return HubError(
            f"The connection to {where} failed ({type(error).__name__}: {error}); check your network and try again."
        )
    if isinstance(error, HfHubHTTPError):
        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
        server = (getattr(error, "server_message", None) or "").strip().splitlines()
        said = f": {server[0][:200]}" if server else ""
        if status == 401:
            return HubError(
                f"{where} refused the token (401 Unauthorized{said}); log in again with `hf auth login`, or pass "
                "a valid --token / HF_TOKEN."
            )
        if status == 403:
            return HubError(
                f"{where} refused to write to {repo_id} (403 Forbidden{said}); use a token with write access to "
                f"the {repo_id.split('/')[0]} namespace."
            )
        return HubError(
            f"{where} answered {status or 'an error'}{said} while uploading to {repo_id}; check the repo id "
            "and try again."
        )
    return None


def publish_draft(
    folder,
    repo_id: str,
    base_model: str | None = None,
    license: str = DEFAULT_LICENSE,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
    template=None,
    timeout: float = DEFAULT_TIMEOUT,
):
    """Uploads the draft saved in `folder` to the Hub repo `repo_id` (created if needed), in one commit, with
    a `README.md` rendered by `render_model_card`.

    Args:
        folder: a folder written by `SpecVLMDraftModel.save_pretrained` (plus `eval_results.json` if measured).
        repo_id: `owner/name` on the Hub.
        base_model: Hub id of the target (default: read from the draft's config).
        license: Hub license id for the card.
        private: create the repo private.
        token: Hub token (default: the one `hf auth login` saved, or `HF_TOKEN`); without one, nothing is sent.
        endpoint: Hub URL (default: `HF_ENDPOINT` or https://huggingface.co).
        commit_message: message of the upload commit.
        template: model card template (default: `model_cards/specvlm_draft.md`).
        timeout: seconds each request may wait for the server.

    Returns:
        `huggingface_hub.CommitInfo` of the upload (`.commit_url`, `.oid`, `.repo_url`).

    Raises:
        DraftFolderError: the folder is not a saved draft (checked before any request).
        UserError: no token (checked before any request).
        HubError: the Hub could not be reached, did not answer within `timeout`, or refused the upload.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    folder = Path(folder)
    if not _HUB_ID.match(repo_id):
        raise UserError(f"{repo_id!r} is not a Hub repo id; pass 'owner/name', e.g. me/llava-1.5-7b-specvlm-draft.")
    read_draft_config(folder)  # the folder, then the token, before anything else is said or sent
    token = require_token(token)
    card = render_model_card(folder, repo_id, base_model=base_model, license=license, template=template)
    api = HfApi(endpoint=endpoint, token=token)
    operations = [
        CommitOperationAdd(path.as_posix(), str(folder / path))
        for path in files_to_publish(folder)
        if path.as_posix() != LOCATION_FILE
    ]
    # custom_generate finds the draft by this repo's id
    operations.append(CommitOperationAdd(LOCATION_FILE, draft_location_source(repo_id).encode("utf-8")))
    operations.append(CommitOperationAdd("README.md", card.encode("utf-8")))
    try:
        with request_timeout(timeout):
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            return api.create_commit(repo_id, operations, commit_message=commit_message or "Upload SpecVLM draft")
    except Exception as error:
        mapped = hub_error(error, endpoint or constants.ENDPOINT, repo_id, timeout)
        if mapped is None:
            raise
        raise mapped from error
