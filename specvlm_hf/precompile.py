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

The folder may be deleted at any time (the next process compiles again); files of keys no longer met (after an
upgrade) are not removed by themselves. Its files are pickles, as torch's own compile caches are: keep it where
only the server's user can write.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import warnings

import torch

from .hf_internals import ahead_sources_unchanged, compile_ahead, load_ahead, save_ahead

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
        """A no-argument callable running the bound round function `method` (e.g. `round._draft`), compiled ahead
        of time with `backend`: looked up, loaded or compiled on its first call, then called with its round."""
        owner, function = method.__self__, method.__func__
        resolved = []

        def call():
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
            self.functions[name] = []
            index = 0
            while os.path.exists(path := os.path.join(self.directory, f"{name}-{index}.pt2")):
                compiled = self._load(path)
                self.functions[name].append(compiled)
                self.loaded += compiled is not None
                index += 1
        candidates = self.functions[name]
        for compiled in candidates:
            if compiled is not None and compiled.guard_check(owner):
                return compiled
        if name in self.failed:
            raise PrecompileFailed(self.failed[name], repeated=True)
        try:
            compiled = self._compile(owner, function, backend)
        except PrecompileFailed as error:
            self.failed[name] = str(error)
            raise
        # a file that could not be used (stale, damaged) is replaced; otherwise a new one is added
        index = next((i for i, c in enumerate(candidates) if c is None), len(candidates))
        candidates[index : index + 1] = [compiled]
        self.compiled += 1
        path = os.path.join(self.directory, f"{name}-{index}.pt2")
        try:
            save_ahead(compiled, path)
        except Exception as error:  # the function works in this process; only the next one compiles again
            warnings.warn(f"SpecVLM: could not save the compiled round function to {path} ({error}).", stacklevel=4)
        return compiled

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
            compiled = compile_ahead(function, (owner,), backend)
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
    """What a compiled round function depends on beyond what its guards check (see the module docstring)."""
    import importlib.metadata

    import transformers

    try:  # (remote code, `custom_generate/`, runs from a folder of these modules without the package installed)
        ours = importlib.metadata.version("specvlm-hf")
    except importlib.metadata.PackageNotFoundError:
        ours = "not installed"
    draft = owner.draft
    target_parameter = next(owner.adapter.model.parameters())
    description = {
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
        "head_rows": draft._head_rows is not None,
        "stacked_layers": getattr(owner.target_window, "stacked", None) is not None,
        "rows": owner.rows_of(owner.runner.window),
        "tree": [owner.top_k, owner.depth, owner.total_tokens],
        "inference_mode": torch.is_inference_mode_enabled(),
        "backend": backend if isinstance(backend, str) else type(backend).__qualname__,
        "versions": [torch.__version__, transformers.__version__, platform.python_version(), ours],
    }
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


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
