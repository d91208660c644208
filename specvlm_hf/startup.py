"""Start a server fast: prepare the fast path for every length bucket once, with compiled code cached on disk.

    import specvlm_hf
    specvlm_hf.enable(target)
    report = specvlm_hf.warmup(target, draft, max_length=4096, cache_dir="~/.cache/specvlm/compile")
    print(report)            # buckets prepared, seconds spent, whether compiled code came from the disk cache

The fast path (`generate(..., cache_implementation="static")`) sizes its static caches in buckets of
`round.LENGTH_BUCKET` slots; its three round functions are compiled once for every bucket (the cache width is a
dynamic dimension), so a bucket first met costs only buffers and CUDA-graph capture. `warmup` runs one short call
per bucket up to `max_length` (a progress bar shows them), so that the compile and every bucket's first-call costs
are paid before the first request. With `cache_dir`, the compiled round functions are kept there (`precompile`:
compiled ahead of time, loaded by a new process without tracing them again; `rounds/`), with torch's own compile
caches: the inductor FX graph cache (`TORCHINDUCTOR_CACHE_DIR`, unless already set) and a file of
`torch.compiler.save_cache_artifacts`, loaded back by `warmup` in a new process. A restarted server is ready in
seconds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from .errors import write_atomic

ARTIFACTS_FILE = "specvlm_compile_artifacts.bin"
WARMUP_NEW_TOKENS = 4  # new tokens of each warm-up call: a few rounds, so that graphs are captured and replayed


@dataclass
class WarmupReport:
    """What `warmup` did.

    Attributes:
        buckets: the static cache lengths prepared, in order (longest first).
        seconds: wall time of each bucket's call (the first includes compilation).
        total_seconds: all of it, loading and saving the disk cache included.
        loaded_from_disk: whether compiled artifacts were loaded from `cache_dir`.
        saved_to: the artifacts file written, if any.
        round_functions: with `cache_dir`, how many compiled round functions were loaded from it and how many
            compiled (`{"loaded": n, "compiled": n}`).
        tree: the tree shape prepared (and, for `tree="auto"`, what was measured).
    """

    buckets: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    total_seconds: float = 0.0
    loaded_from_disk: bool = False
    saved_to: str | None = None
    round_functions: dict | None = None
    tree: dict | None = None


def bucket_lengths(draft, max_length: int, min_length: int = 1) -> list[int]:
    """The static cache lengths (`LENGTH_BUCKET` multiples) of fast-path calls whose prompt plus new tokens span
    `min_length..max_length`, with the room a round needs for its tree."""
    from . import round as round_module

    step = round_module.LENGTH_BUCKET
    extra = tree_room(draft)
    first = -(-(max(min_length, 1 + WARMUP_NEW_TOKENS) + extra) // step) * step
    last = -(-(max_length + extra) // step) * step
    return list(range(first, last + 1, step))


def tree_room(draft) -> int:
    """Cache slots a round needs beyond the sequence (one tree, or a round's draft entries): `round.tree_room`."""
    from .round import tree_room as room

    return room(draft.config)


def use_cache_dir(cache_dir: str) -> str:
    """Keeps the fast path's compiled round functions in `cache_dir/rounds` (`precompile.use_store`), points
    torch's inductor caches at `cache_dir` (unless `TORCHINDUCTOR_CACHE_DIR` is set) and returns the path of the
    artifacts file kept there."""
    from .precompile import use_store

    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    os.makedirs(cache_dir, exist_ok=True)
    use_store(os.path.join(cache_dir, "rounds"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_dir, "inductor"))
    return os.path.join(cache_dir, ARTIFACTS_FILE)


@dataclass
class CompileCache:
    """A compile cache folder this process uses (`open_compile_cache`): its compiled round functions and torch's
    compile caches.

    Attributes:
        folder: the folder; artifacts: its file of torch's compiled artifacts; loaded_from_disk: whether that
            file was read when the folder was opened.
    """

    folder: str
    artifacts: str
    loaded_from_disk: bool

    def save(self) -> bool:
        """Writes this process's compiled artifacts into the folder (the round functions are saved as they are
        compiled); False when there were none."""
        return save_compile_cache(self.artifacts)

    @property
    def round_functions(self) -> dict:
        """How many compiled round functions this process loaded from the folder and how many it compiled."""
        from .precompile import active_store

        store = active_store()
        return {"loaded": store.loaded, "compiled": store.compiled} if store is not None else {}

    def summary(self) -> str:
        functions = self.round_functions
        return (
            f"compile cache {self.folder}: {functions.get('loaded', 0)} round functions loaded, "
            f"{functions.get('compiled', 0)} compiled; torch's artifacts "
            f"{'loaded' if self.loaded_from_disk else 'not found (first use)'}"
        )


def open_compile_cache(cache_dir: str) -> CompileCache:
    """Uses `cache_dir` for this process's fast-path compilation from now on (`use_cache_dir`) and loads torch's
    artifacts an earlier process saved there. Call `.save()` once the calls that compile have run."""
    artifacts = use_cache_dir(cache_dir)
    return CompileCache(os.path.dirname(artifacts), artifacts, load_compile_cache(artifacts))


def load_compile_cache(path: str) -> bool:
    """Loads compiled artifacts saved by an earlier process (`torch.compiler.load_cache_artifacts`); False when
    there are none or torch cannot read them (then code is compiled again, and saved anew)."""
    if not os.path.exists(path):
        return False
    try:
        with open(path, "rb") as handle:
            return torch.compiler.load_cache_artifacts(handle.read()) is not None
    except Exception as error:  # a cache written by another torch version: recompiling is correct, only slower
        import warnings

        warnings.warn(f"SpecVLM warmup: could not load the compile cache {path} ({error}); compiling again.")
        return False


def save_compile_cache(path: str) -> bool:
    """Writes this process's compiled artifacts (`torch.compiler.save_cache_artifacts`) to `path`."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return False
    write_atomic(path, saved[0])
    return True


def ordinary_tokens(target, generator, length: int, device) -> torch.Tensor:
    """`(1, length)` random token ids that are no placeholder (image, video, ...) of the target."""
    vocab = min(target.config.get_text_config().vocab_size, 1000)
    special = {v for k, v in vars(target.config).items() if k.endswith(("token_id", "token_index", "token_ids"))}
    ordinary = torch.tensor([t for t in range(3, vocab) if t not in special])
    return ordinary[torch.randint(len(ordinary), (1, length), generator=generator)].to(device)


def set_tree(target, draft, tree, device, generation_kwargs: dict, inference_mode: bool) -> dict:
    """Sets `warmup`'s `tree` choice on `draft.config`; returns the shape (and what `"auto"` measured)."""
    from .tree_auto import PAPER_TREE, auto_tree

    config = draft.config
    if tree == "auto":
        ids = ordinary_tokens(target, torch.Generator().manual_seed(1), 200, device)
        with torch.inference_mode(inference_mode):
            # widths are timed as CUDA graphs over eager kernels: compiling each candidate width would cost a
            # compile apiece (minutes on a 7B target); only the chosen shape is compiled, by the warm-up calls
            result = auto_tree(
                target, draft, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, disable_compile=True
            )
        result["shape"] = list(result["shape"])
        return result
    if tree is not None:
        shape = PAPER_TREE if tree == "paper" else tuple(tree)
        if len(shape) != 3:
            raise ValueError(f"tree must be None, 'paper', 'auto' or (top_k, depth, total_tokens); got {tree!r}")
        config.tree_top_k, config.tree_depth, config.tree_total_tokens = (int(v) for v in shape)
    return {"shape": [config.tree_top_k, config.tree_depth, config.tree_total_tokens]}


def warmup(
    target,
    draft,
    max_length: int,
    min_length: int = 1,
    cache_dir: str | None = None,
    progress: bool = True,
    generation_kwargs: dict | None = None,
    inference_mode: bool = True,
    tree=None,
) -> WarmupReport:
    """Prepares the fast path of `target` with `draft` for every length bucket up to `max_length`.

    Args:
        target: the target model (`specvlm_hf.enable` is called on it if needed), on its serving device and dtype.
        draft: the SpecVLM draft (tree mode), bound or not.
        max_length: the longest prompt plus new tokens the server will run.
        min_length: the shortest (buckets below it are skipped).
        cache_dir: a folder for the compiled round functions and torch's compile caches, reused by later
            processes (None: compiled in this process, with torch's default caches). From then on, every fast path
            of this process keeps its compiled round functions there.
        progress: show a tqdm progress bar over the buckets.
        generation_kwargs: extra `generate` arguments of the server's calls (e.g. `disable_compile=True`).
        inference_mode: whether the server calls `generate` under `torch.inference_mode()` (buffers made in one
            mode cannot serve the other, so warm up in the server's).
        tree: the tree shape to prepare: None keeps `draft.config`'s; `"paper"` EAGLE-2's (10, 7, 60); a tuple
            `(top_k, depth, total_tokens)`; `"auto"` measures round costs against tree width once on this device
            and picks the shape with the most expected accepted tokens per millisecond (`tree_auto.auto_tree`),
            set on `draft.config` (the choice is in the report).
    Returns:
        a `WarmupReport`. The draft keeps every bucket prepared (its graphs; the buckets' caches share the longest
        one's memory), so a server's calls replay them; a call at a bucket not prepared builds its buffers and
        captures its graphs (no compile) on its first call.
    """
    from . import enable
    from .adapters import adapter_for

    start = time.perf_counter()
    report = WarmupReport()
    cache = open_compile_cache(cache_dir) if cache_dir is not None else None
    if cache is not None:
        report.loaded_from_disk = cache.loaded_from_disk
    enable(target)
    adapter_for(target).check_static_cache()  # before any compile: a target without a fast path says so at once
    device = next(target.parameters()).device
    report.tree = set_tree(target, draft, tree, device, generation_kwargs or {}, inference_mode)
    # longest first: it sizes the memory every bucket's target cache shares, so no later bucket replaces it (and
    # drops the buckets prepared before it); every bucket prepared stays kept
    buckets = bucket_lengths(draft, max_length, min_length)[::-1]
    extra, new_tokens = tree_room(draft), WARMUP_NEW_TOKENS
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(buckets), desc="specvlm warmup (length buckets)", unit="bucket", dynamic_ncols=True)
    generator = torch.Generator().manual_seed(0)
    try:
        for bucket in buckets:
            # a text prompt whose call needs `bucket` slots: prompt + new tokens + tree room fills the bucket
            prompt = max(1, bucket - extra - new_tokens)
            input_ids = ordinary_tokens(target, generator, prompt, device)
            begin = time.perf_counter()
            with torch.inference_mode(inference_mode):
                target.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    assistant_model=draft,
                    cache_implementation="static",
                    **(generation_kwargs or {}),
                )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            report.buckets.append(draft._specvlm_static_round.length)
            kept = draft._specvlm_fast_paths
            kept.limit = max(kept.limit, len(buckets))
            report.seconds.append(time.perf_counter() - begin)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(length=bucket, seconds=f"{report.seconds[-1]:.1f}")
    finally:
        if bar is not None:
            bar.close()
    if cache is not None:
        report.saved_to = cache.artifacts if cache.save() else None
        report.round_functions = cache.round_functions
    report.total_seconds = time.perf_counter() - start
    return report
