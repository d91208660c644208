"""Round functions compiled ahead of time and kept on disk: a new process loads them instead of tracing them.

`torch.compile` traces a function again in every process (its disk caches only skip code generation): on the
LLaVA-1.5-7B shape a new process spent about 20 s of its first fast-path call tracing and guarding the three round
functions. With a store of compiled rounds (`use_store(directory)`, which `specvlm_hf.warmup(cache_dir=...)` and the
environment variable `SPECVLM_COMPILE_CACHE` set up), each round function is compiled whole ahead of time
(`torch.compile(...).aot_compile`) for the round object it is called with, saved under a key of what shapes it, and
a later process loads it: no tracing, no code generation. One compiled function serves every round of the same
key, every length bucket included (the cache widths are dynamic dimensions while it is traced).

A stored function is used only when it still fits:

- its key: the round's kind, the target's and the draft's configurations and attention implementations, dtypes,
  device, tree shape, batch rows, inference mode, and the versions of torch, transformers, Python and specvlm-hf;
- the source of every function traced into it (ours, transformers', torch's) is unchanged;
- its guards (tensor shapes, strides, dtypes and devices, constants) pass on the round it is called with.

Otherwise it is compiled again and saved anew. When a round cannot be compiled ahead of time at all (its guards or
objects cannot be written), the fast path warns and compiles it in-process as without a store.

Each compiled function is a file `<function>-<key>-<n>.pt2`, with a description of what it was compiled for next to
it (`.json`: the key's values, when it was saved; its modification time is when a process last loaded it).
`stored_rounds` lists them and `prune` removes the files this installation can no longer use (written by other
versions of torch, transformers, Python or specvlm-hf) and, if asked, those unused for some days; `specvlm
compile-cache` does both from the command line. The folder may also be deleted at any time (the next process
compiles again). Its files are pickles, as torch's own compile caches are: keep it where only the server's user
can write.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass

import torch

from .errors import write_atomic
from .hf_internals import (
    ahead_sources_unchanged,
    compile_ahead,
    inductor_options,
    load_ahead,
    save_ahead,
    shared_storage_layout,
)

ENVIRONMENT_VARIABLE = "SPECVLM_COMPILE_CACHE"
FORMAT = 1  # bump when what a stored round function means changes

_store: PrecompiledRounds | None = None
_chosen = False  # whether `use_store` was called (then the environment variable is not read)


class PrecompileFailed(RuntimeError):
    """A round function could not be compiled ahead of time (raised before it ran: nothing changed); `repeated`:
    the store had already failed on it in this process (and did not try again)."""

    def __init__(self, message: str, repeated: bool = False):
        super().__init__(message)
        self.repeated = repeated


class PrecompiledRounds:
    """The store: compiled round functions by key, in this process and as files in `directory`.

    Attributes:
        directory: where the files live (one per round function and key).
        compiled / loaded: how many functions this process compiled / read from disk (per key, not per round).
    """

    def __init__(self, directory: str):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        os.makedirs(self.directory, exist_ok=True)
        # function name and key -> compiled functions (None: a file that could not be used)
        self.functions: dict[str, list] = {}
        self.failed: dict[str, str] = {}  # function name and key -> why it cannot be compiled ahead of time
        self.compiled = self.loaded = 0

    def callable_for(self, method, backend) -> callable:
        """A callable running the bound round function `method` (e.g. `round._draft`) compiled ahead of time with
        `backend`, called with the round (`call(round)`; it keeps no reference to it): looked up, loaded or compiled
        on its first call."""
        function = method.__func__
        resolved = []

        def call(owner):
            if not resolved:
                resolved.append(self.function_for(owner, function, backend))
            return resolved[0](owner)

        call.__name__ = function.__name__
        return call

    def function_for(self, owner, function, backend):
        """The compiled `function` for the round `owner`: one of this process's, else a file's, else compiled now
        (and saved). A key holds a few functions when rounds of one key differ in what their guards check."""
        key = round_key(owner, function, backend)
        name = f"{function.__name__.strip('_')}-{key}"
        if name not in self.functions:  # first use in this process: what earlier processes saved
            self.functions[name] = [[path, self._load(path)] for path in self._files(name)]
            self.loaded += sum(compiled is not None for _, compiled in self.functions[name])
        candidates = self.functions[name]
        for path, compiled in candidates:
            if compiled is not None and compiled.guard_check(owner):
                touch(description_path(path))  # when it was last used (`prune`'s `unused_days`)
                return compiled
        if name in self.failed:
            raise PrecompileFailed(self.failed[name], repeated=True)
        try:
            compiled = self._compile(owner, function, backend)
        except PrecompileFailed as error:
            self.failed[name] = str(error)
            raise
        self.compiled += 1
        # a file that could not be used (stale, damaged) is replaced; otherwise a new one is added
        entry = next((entry for entry in candidates if entry[1] is None), None)
        if entry is None:
            entry = [os.path.join(self.directory, f"{name}-{file_index(candidates) + 1}.pt2"), None]
            candidates.append(entry)
        entry[1] = compiled
        try:
            save_ahead(compiled, entry[0])
            write_description(entry[0], round_description(owner, function, backend))
        except Exception as error:  # the function works in this process; only the next one compiles again
            message = f"SpecVLM: could not save the compiled round function to {entry[0]} ({error})."
            warnings.warn(message, stacklevel=4)
        return compiled

    def _files(self, name: str) -> list[str]:
        """The files of `name` (function and key) in the folder, by their number."""
        paths = glob.glob(os.path.join(glob.escape(self.directory), f"{name}-*.pt2"))
        return sorted((path for path in paths if file_number(path) is not None), key=file_number)

    @staticmethod
    def _load(path: str):
        """The stored function, or None when it cannot be read or is stale (then its file is replaced)."""
        try:
            compiled = load_ahead(path)
            if ahead_sources_unchanged(compiled):
                return compiled
        except Exception as error:  # written by another torch, or damaged: compiling again is correct, only slower
            warnings.warn(f"SpecVLM: could not load {path} ({type(error).__name__}: {error}); compiling again.")
        return None

    @staticmethod
    def _compile(owner, function, backend):
        """`function` compiled ahead of time for `owner`, its cache widths marked dynamic while it is traced."""
        owner.mark_width_dynamic()
        try:
            join = getattr(owner, "join_projections", False)
            # the joining pass keyed by the weights' layout (the compile's inputs are not known before it)
            weights = [*owner.adapter.model.parameters(), *owner.draft.parameters()] if join else []
            options = inductor_options(
                getattr(owner, "merge_repeated", False),
                join,
                getattr(owner, "autotune_gemms", False),
                shared_storage_layout(weights),
            )
            compiled = compile_ahead(function, (owner,), backend, options)
        except Exception as error:
            raise PrecompileFailed(f"{type(error).__name__}: {error}") from error
        finally:
            owner.clear_width_dynamic()
        if not compiled.guard_check(owner):
            raise PrecompileFailed("its guards do not pass on the round it was compiled for")
        return compiled


def use_store(directory: str | None) -> PrecompiledRounds | None:
    """Keeps the fast path's compiled round functions in `directory` from now on (None: no store, whatever
    `$SPECVLM_COMPILE_CACHE` says). Returns the store."""
    global _store, _chosen
    _store, _chosen = (None if directory is None else PrecompiledRounds(directory)), True
    return _store


def active_store() -> PrecompiledRounds | None:
    """The store set by `use_store`, else (if `use_store` was never called) one in `$SPECVLM_COMPILE_CACHE` if set,
    else None."""
    global _store
    if not _chosen and _store is None and os.environ.get(ENVIRONMENT_VARIABLE):
        _store = PrecompiledRounds(os.environ[ENVIRONMENT_VARIABLE])
    return _store


def round_key(owner, function, backend) -> str:
    """What a compiled round function depends on beyond what its guards check (see the module docstring), hashed."""
    text = json.dumps(round_description(owner, function, backend), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def round_description(owner, function, backend) -> dict:
    """The values `round_key` hashes (also written next to each file, for `stored_rounds` and `prune`)."""
    draft = owner.draft
    target_parameter = next(owner.adapter.model.parameters())
    return {
        "format": FORMAT,
        "function": f"{type(owner).__qualname__}.{function.__name__}",
        "adapter": type(owner.adapter).__qualname__,
        "target": config_description(owner.adapter.model.config),
        "draft": config_description(draft.config),
        "dtypes": [str(target_parameter.dtype), str(draft.fc.weight.dtype)],
        "device": str(draft.fc.weight.device),
        # what the guards, which drop identity checks, would not see: which attention kernels the configurations
        # name (not in `to_dict`), and which optional tensors are absent
        "attention": [
            getattr(config, "_attn_implementation", None)
            for config in (owner.adapter.model.config, owner.adapter.model.config.get_text_config(), draft.config)
        ],
        "verify_attention": getattr(owner, "verify_attention", None),
        "draft_attention": getattr(owner, "draft_attention", None),
        "merge_repeated": getattr(owner, "merge_repeated", False),
        "join_projections": getattr(owner, "join_projections", False),
        "autotune_gemms": getattr(owner, "autotune_gemms", False),
        "kernels": [getattr(owner, "fused_top_k", False), getattr(owner, "fp8_kernel", False)],  # (attention: above)
        "head_rows": draft._head_rows is not None,
        "fp8_head": draft._fp8_head is not None,
        "stacked_layers": getattr(owner.target_window, "stacked", None) is not None,
        "rows": owner.rows_of(owner.runner.window),
        "tree": [owner.top_k, owner.depth, owner.total_tokens],
        "inference_mode": torch.is_inference_mode_enabled(),
        "backend": backend if isinstance(backend, str) else type(backend).__qualname__,
        "versions": current_versions(),
    }


def current_versions() -> list[str]:
    """torch, transformers, Python and specvlm-hf versions: a compiled function is of these only."""
    import importlib.metadata

    import transformers

    try:  # (remote code, `custom_generate/`, runs from a folder of these modules without the package installed)
        ours = importlib.metadata.version("specvlm-hf")
    except importlib.metadata.PackageNotFoundError:
        ours = "not installed"
    return [torch.__version__, transformers.__version__, platform.python_version(), ours]


def config_description(config) -> dict:
    """A configuration's values, without what does not shape computation (names, paths, versions)."""
    values = config.to_dict()

    def clean(value):
        if isinstance(value, dict):
            return {
                k: clean(v)
                for k, v in value.items()
                if not str(k).startswith("_") and k not in ("transformers_version", "name_or_path", "auto_map")
            }
        return value

    return clean(values)


# ------------------------------------------------------------------------------------------- the folder's files
def file_number(path: str) -> int | None:
    """`n` of a file `<function>-<key>-<n>.pt2` (None for another name)."""
    number = os.path.basename(path)[: -len(".pt2")].rsplit("-", 1)[-1]
    return int(number) if number.isdigit() else None


def file_index(entries) -> int:
    """The highest file number among `[path, compiled]` entries (-1 for none)."""
    return max((file_number(path) for path, _ in entries), default=-1)


def description_path(path: str) -> str:
    return path[: -len(".pt2")] + ".json"


def write_description(path: str, description: dict) -> None:
    """Writes what the function in `path` was compiled for next to it (atomically)."""
    record = {"saved": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "description": description}
    write_atomic(description_path(path), json.dumps(record, sort_keys=True, default=str))


def touch(path: str) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only folder, or no description: only `prune`'s notion of use is affected
        pass


@dataclass
class StoredRound:
    """One file of a store (see `stored_rounds`).

    Attributes:
        path: the compiled function's file; function: which round function (e.g. `SpeculativeRound._draft`).
        model: the target's `model_type` and dtype, the device and the tree shape, in words.
        size_bytes: the file's size; saved: when it was written; last_used: when a process last loaded it (UTC).
        usable: whether this installation can use it; reason: why not.
    """

    path: str
    function: str
    model: str
    size_bytes: int
    saved: str
    last_used: float
    usable: bool
    reason: str = ""


def stored_rounds(directory: str) -> list[StoredRound]:
    """The compiled round functions kept in `directory`, with whether this installation (its versions of torch,
    transformers, Python and specvlm-hf) can use each."""
    directory = os.path.abspath(os.path.expanduser(directory))
    versions, rounds = current_versions(), []
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), "*.pt2"))):
        record = read_description(description_path(path))
        description = (record or {}).get("description", {})
        usable, reason = True, ""
        if not description:
            usable, reason = False, "no description next to it (written by an older specvlm-hf)"
        elif description.get("format") != FORMAT:
            usable, reason = False, f"file format {description.get('format')}, this specvlm-hf reads {FORMAT}"
        elif description.get("versions") != versions:
            written = ", ".join(f"{n} {v}" for n, v in zip(VERSION_NAMES, description.get("versions") or ()))
            usable, reason = False, f"written by {written}"
        target = description.get("target", {})
        tree = description.get("tree") or ["?"] * 3
        model = (
            f"{target.get('model_type', '?')} {(description.get('dtypes') or ['?'])[0].replace('torch.', '')} on "
            f"{description.get('device', '?')}, tree {tuple(tree)}"
        )
        used_file = description_path(path) if record is not None else path
        rounds.append(
            StoredRound(
                path=path,
                function=description.get("function", os.path.basename(path).split("-")[0]),
                model=model,
                size_bytes=os.path.getsize(path),
                saved=(record or {}).get("saved", "?"),
                last_used=os.path.getmtime(used_file),
                usable=usable,
                reason=reason,
            )
        )
    return rounds


VERSION_NAMES = ("torch", "transformers", "Python", "specvlm-hf")


def read_description(path: str) -> dict | None:
    try:
        with open(path) as handle:
            record = json.load(handle)
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def prune(directory: str, unused_days: float | None = None, dry_run: bool = False) -> list[StoredRound]:
    """Removes from `directory` the compiled round functions this installation cannot use (see `stored_rounds`) and,
    with `unused_days`, those no process has loaded for that many days, with their descriptions; also descriptions
    left without their file. Returns what was (with `dry_run`: would be) removed."""
    now, removed = time.time(), []
    for stored in stored_rounds(directory):
        if stored.usable and unused_days is not None and now - stored.last_used > unused_days * 86400:
            stored.reason = f"not used for {(now - stored.last_used) / 86400:.1f} days"
        elif stored.usable:
            continue
        removed.append(stored)
        if not dry_run:
            for path in (stored.path, description_path(stored.path)):
                if os.path.exists(path):
                    os.remove(path)
    if not dry_run:
        directory = os.path.abspath(os.path.expanduser(directory))
        for path in glob.glob(os.path.join(glob.escape(directory), "*.json")):
            if not os.path.exists(path[: -len(".json")] + ".pt2"):
                os.remove(path)
    return removed
