"""One speculative round, defined once and run by both backends.

A round is three functions of one `RoundState` and two cache windows (the target's and the draft's):

1. `draft`: the EAGLE-2 tree (`build_dynamic_tree`, each level one draft forward), then the draft cache rewound;
2. `verify`: one target forward over the tree's nodes (through the target's adapter), giving logits and the
   draft's true features;
3. `commit`: after acceptance, the target cache keeps the accepted path, the draft catches up on the target's
   features of the accepted tokens (a fixed-width block), and the next root is loaded.

Acceptance (`greedy_path` / `sampling_path` after `generate`'s logits processors) runs between 2 and 3, on the
device. The two backends differ only in their cache windows and in how the functions are called:

- eager (`SpeculativeRound.eager`): `DynamicCache`s (`GrowingWindow`), the functions called directly; any
  device layout, a target split over GPUs included;
- fast (`SpeculativeRound.static`, `cache_implementation="static"`): `StaticCache`s (`FixedWindow`, masks as wide
  as the caches, lengths on the device), fixed shapes and no host synchronisation, so on a GPU each function is
  captured once as a CUDA graph (`GraphedCall`), optionally over kernels `torch.compile` fused first. Its buffers
  (`FastPath`: the target's static cache, and one round per draft cache width) are kept on the draft and reused by
  later calls with the same target, length and settings. The draft's static cache is sized by what the draft
  holds (its compressed prompt, not the target's), so its KV bytes and attention width follow the compressed count.
"""

from __future__ import annotations

import gc
import inspect
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, StaticCache

from . import kernels
from .draft_runner import DraftRunner
from .errors import UserError
from .hf_internals import (
    clear_dynamic_marks,
    compile_backend,
    cublas_workspace_of_its_own,
    dynamo_error_types,
    inductor_backend,
    inductor_options,
    layer_tensors,
    mark_dynamic_dim,
    MergeRepeatedCounts,
    recompile_limit,
    use_attention_implementation,
)
from .joined_weights import join_projection_weights
from .kv_cache import FixedRowsWindow, FixedWindow, GrowingWindow, RowsWindow, SharedBuffers
from .precompile import PrecompileFailed, active_store
from .target import unwrap_target
from .tree import DraftTree, build_dynamic_tree, build_dynamic_trees
from .verify_attention import TREE, check_name

# options of the `torch.compile` calls of the fast path (tests swap in a CPU backend to check tracing). The cache
# width is marked dynamic (`SpeculativeRound.mark_width_dynamic`): one compile serves every length bucket.
COMPILE_OPTIONS = {"backend": "inductor"}
# static cache lengths are rounded up to a multiple of this, so that nearby budgets share one set of graphs
LENGTH_BUCKET = 256
# whether compiled round functions also move the target cache's layers into one tensor (`FixedWindow.place`:
# one gather compacts every layer). Off: layers that are views of one tensor whose width is dynamic make dynamo
# prove, with symbolic guards, that no two of them overlap (about layers^2 / 2 guards), and a new process spent
# most of its first call (40-54 s on the LLaVA-1.5-7B shape; 39 s against 13 s on a 32-layer CPU miniature)
# building and checking those guards. Uncompiled graphs (eager kernels) stack, since they never trace.
STACK_COMPILED_LAYERS = False
# the attention implementation of the fast path's verify forwards (a name registered with transformers'
# `AttentionInterface`, e.g. `verify_attention.TREE`, `.SPLIT_KV` or "flex_attention"); None: the package's choice
# (`verify_attention_for`: `TREE` where the package's kernels run and compute the model's own attention; else the
# target's own). See `verify_attention` for why the tree's queries want another kernel than the target's other
# forwards.
VERIFY_ATTENTION: str | None = None
# the same for the fast path's draft forwards (tree levels and catch-up) over the draft's static cache
DRAFT_ATTENTION: str | None = None
# whether inductor compiles of the round functions first merge repeated computations (`hf_internals.merge_repeated`:
# what a round's graph repeats per draft level and per layer, computed once). On an H100 the LLaVA-1.5-7B-shaped
# round fell from 10.93 to 10.50 ms at 601 prompt tokens (results/README.md, round variants). Set it before the
# process's first fast-path call: torch keeps what it compiled for a round function's code, whatever this said then.
MERGE_REPEATED = True
# whether the fast path lays out each layer's q/k/v and gate/up weights one after the other in one storage
# (`joined_weights`, the target's and the draft's; the modules and their values stay as they are) and its inductor
# compiles read each group as one matrix: one GEMM where there were three or two (`hf_internals.
# join_adjacent_products`). On an H100 (2026-12-06) it cut the LLaVA-1.5-7B-shaped round from 10.77 to 10.36 ms at
# 601 prompt tokens and from 12.17 to 11.75 ms at 2137 (the verify's GEMMs), with greedy fp32 outputs equal to plain
# `generate` on the GPU. Once a compile of the process has joined products, the weights are laid out again before
# every fast-path call whatever this says (compiled code is kept). Its compiles never autotune GEMMs (see below).
JOIN_PROJECTIONS = True
# whether inductor compiles of the round functions time each matrix product against its Triton templates and keep
# the fastest (`max_autotune_gemm`, for the round's compiles only: plain `generate` keeps its own). The draft's
# products of 10 rows are where cuBLAS looked slowest (an H100 autotuning log, under load: 43.5 against 74.5 us for
# 10 x 4096 by 4096 x 11008). Off: measured alone on an H100 (2026-12-06), the round fell 10.77 -> 10.55 ms at 601
# prompt tokens and 12.17 -> 11.94 at 2137, within the noise between processes, for minutes more of first compile.
# Not with JOIN_PROJECTIONS: inductor times a joined product on a copy of the first weight alone, which the joined
# view reads past (an H100, 2026-12-06: "setStorage ... out of bounds", then an illegal memory access); the round
# refuses the pair, and its joined compiles turn GEMM autotuning off even where the process turned it on.
AUTOTUNE_GEMMS = False


def verify_attention_for(config, chosen: str | None, device) -> str | None:
    """The attention a fast-path forward of the model of text `config` runs: `chosen` when set; else the package's
    kernels (`verify_attention.TREE`) where they run (`kernels.attention_usable`), take the model's head size
    (`kernels.attention_fits`) and compute what its own attention does (sdpa, no logit softcapping); else None (the
    model's own). `TREE` chosen on a GPU the kernels are not built for (`kernels.kernels_fit`) is refused."""
    if chosen == TREE and not kernels.kernels_fit(device):  # (off CUDA, where the interpreter may run them: fit)
        raise UserError(
            f"the package's attention kernels ({TREE!r}) need an NVIDIA GPU of compute capability 8.0 or newer, and "
            f"{device} is not one: set `specvlm_hf.round.VERIFY_ATTENTION` and `DRAFT_ATTENTION` to None (the "
            "model's own attention there)."
        )
    if chosen is not None:
        return chosen
    own = getattr(config, "_attn_implementation", None)
    plain = own == "sdpa" and getattr(config, "attn_logit_softcapping", None) is None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return TREE if plain and kernels.attention_fits(head_dim) and kernels.attention_usable(device) else None


class CountingBackend:
    """A `torch.compile` backend that counts the graphs it compiles for one round function and warns once when
    torch is about to stop compiling it (its recompile limit), instead of letting later shapes run uncompiled
    without a word. One instance per (function, backend) is shared by every fast path, so that torch's cache of
    compiled code (kept per code object and backend) serves them all."""

    _shared: dict = {}

    def __init__(self, name: str, backend):
        self.name, self.backend, self.compiles, self.warned = name, backend, 0, False

    @classmethod
    def get(cls, name: str, backend) -> "CountingBackend":
        key = (name, backend if isinstance(backend, str) else id(backend))
        if key not in cls._shared:
            cls._shared[key] = cls(name, backend)
        return cls._shared[key]

    def __call__(self, graph_module, example_inputs):
        self.compiles += 1
        backend = self.backend
        if backend == "inductor":
            backend = inductor_backend(inductor_options(MERGE_REPEATED, JOIN_PROJECTIONS, AUTOTUNE_GEMMS))
        limit = recompile_limit()
        if self.compiles >= limit and not self.warned:
            self.warned = True
            warnings.warn(
                f"the SpecVLM fast path's `{self.name}` was compiled {self.compiles} times, torch's recompile limit "
                f"(torch._dynamo.config.recompile_limit = {limit}): calls whose shapes or settings differ again will "
                "run uncompiled (slower). Use fewer tree settings / dtypes per process, or raise the limit.",
                stacklevel=2,
            )
        return compile_backend(backend)(graph_module, example_inputs)


class GraphedCall:
    """Runs a function of no arguments (it reads and writes fixed buffers) eagerly on its first call, which also
    warms up kernels and `torch.compile`; captures it as a CUDA graph on the second; replays the graph after.

    A bound method (a round function) is held as its function and a weak reference to its object, and called with
    the object: a round holds its `GraphedCall`s, so holding the method itself would make every round refer to itself,
    and a dropped round (its CUDA graphs, caches and cuBLAS workspaces) would wait for Python's cyclic collector.

    Args:
        fn: the function, or a bound method.
        graphs: capture and replay (CUDA); otherwise every call runs `fn`.
        compile: run `torch.compile(fn)` instead; if compilation fails (a compiler error is raised before the
            function runs), warn and go on with `fn`.
        store: with `compile`, a `precompile.PrecompiledRounds`: `fn` (a bound round function) is compiled ahead of
            time and kept on disk instead, or loaded from there; if torch cannot compile it ahead of time, warn and
            compile it in this process.
    The result of a replay lives in the graph's own memory and is overwritten by the next replay. Each graph owns its
    memory pool and, in it, its own cuBLAS workspace (`hf_internals.cublas_workspace_of_its_own`).
    """

    def __init__(self, fn, graphs: bool = False, compile: bool = False, store=None):
        # `fn(*self.arguments())`: a method's function takes its object, held weakly; a plain function nothing
        self.owner = weakref.ref(fn.__self__) if inspect.ismethod(fn) else None
        self.eager_fn = fn.__func__ if self.owner is not None else fn
        self.fn = self.eager_fn
        if compile and store is not None:
            self.fn = store.callable_for(fn, COMPILE_OPTIONS.get("backend", "inductor"))
        elif compile:
            self.fn = self.compiled_in_process(self.eager_fn)
        self.enabled = graphs
        self.calls = 0
        self.graph = None
        self.output = None

    @staticmethod
    def compiled_in_process(fn):
        options = dict(COMPILE_OPTIONS)
        name = getattr(fn, "__name__", "round function")
        backend = CountingBackend.get(name, options.pop("backend", "inductor"))
        return torch.compile(fn, backend=backend, **options)

    def __getstate__(self) -> dict:
        """Nothing: a round compiled ahead of time has its objects written with its guards, and a call's compiled
        code and CUDA graph are of this process only."""
        return {}

    def arguments(self) -> tuple:
        """What the function is called with: its object (alive while its round runs it), or nothing."""
        return () if self.owner is None else (self.owner(),)

    def _run(self):
        if self.fn is self.eager_fn:
            return self.fn(*self.arguments())
        try:
            return self.fn(*self.arguments())
        except PrecompileFailed as error:  # raised before the function ran
            if not error.repeated:
                warnings.warn(
                    f"the SpecVLM fast path's `{self.eager_fn.__name__}` cannot be compiled ahead of time ({error}); "
                    "compiling it in this process instead (a new process will trace it again).",
                    stacklevel=3,
                )
            # unmarked (the round's other functions may be compiled ahead of time, which guard on no marks): torch
            # makes the widths dynamic at the second width it meets
            self.fn = self.compiled_in_process(self.eager_fn)
            return self._run()
        except dynamo_error_types() as error:  # raised while compiling, before any state changed
            warnings.warn(
                f"torch.compile failed on the SpecVLM fast path ({type(error).__name__}: {error}); "
                "running its CUDA graphs over eager kernels instead.",
                stacklevel=3,
            )
            self.fn = self.eager_fn
            return self.fn(*self.arguments())

    def __call__(self):
        self.calls += 1
        if not self.enabled or self.calls == 1:
            return self._run()
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            # no cyclic garbage collection while capturing: freeing an unreachable round that something else keeps
            # in a reference cycle destroys its CUDA graphs, which CUDA forbids during a capture and which
            # invalidates it (met on an H200, "operation not permitted when stream is capturing (function reset)",
            # when rounds still referred to themselves through their functions). `torch.cuda.graph` collects before
            # it starts.
            # a cuBLAS workspace of its own (see `hf_internals.cublas_workspace_of_its_own`): graphs sharing one lose
            # it when something else clears torch's workspaces; the likely cause of the illegal memory access met on
            # an H100 in the first fast-path call after transformers' compiled static-cache `generate` (README).
            collecting = gc.isenabled()
            gc.disable()
            try:
                with cublas_workspace_of_its_own(), torch.cuda.graph(graph):
                    self.output = self.fn(*self.arguments())
            finally:
                if collecting:
                    gc.enable()
            self.graph = graph
        self.graph.replay()
        return self.output


@dataclass
class RoundState:
    """The device tensors a round reads and writes (fixed addresses: captured graphs read them).

    Attributes:
        root_token: `(1,)` long, the last token the target produced; root_position: `()` long, its sequence
            position (the draft's position scheme).
        position_offset: `()` long, what the target adds to a sequence position (Qwen-VL's `rope_deltas`,
            PaliGemma's 1): a device value, so graphs captured for one image serve another.
        root_hidden: `(d,)` and root_log_probs: `(V,)` float32, the draft's prediction after the root.
        path, count, next_token: an acceptance, written before `commit` (`(P,)`, `()`, `()`).
    """

    root_token: torch.Tensor
    root_position: torch.Tensor
    position_offset: torch.Tensor
    root_hidden: torch.Tensor
    root_log_probs: torch.Tensor
    path: torch.Tensor
    count: torch.Tensor
    next_token: torch.Tensor

    def copy_(self, other: "RoundState") -> None:
        """Copies `other`'s values into this state's buffers (their addresses stay)."""
        for name in self.__dataclass_fields__:
            getattr(self, name).copy_(getattr(other, name))

    def index_select(self, rows: torch.Tensor) -> "RoundState":
        """A batch state's rows `rows` (`(B',)` indices), in new buffers."""
        return RoundState(
            *(getattr(self, name).index_select(0, rows.to(self.count.device)) for name in self.__dataclass_fields__)
        )

    @classmethod
    def allocate(cls, hidden: int, vocab: int, path_width: int, dtype, device, batch=None) -> "RoundState":
        """One row's buffers (shapes above), or with `batch`, `B` rows' (a leading batch dimension on each; the root
        token `(B,)`)."""
        long = dict(dtype=torch.long, device=device)
        rows = () if batch is None else (batch,)
        return cls(
            root_token=torch.zeros(batch or 1, **long),
            root_position=torch.zeros(rows, **long),
            position_offset=torch.zeros(rows, **long),
            root_hidden=torch.zeros(*rows, hidden, dtype=dtype, device=device),
            root_log_probs=torch.zeros(*rows, vocab, dtype=torch.float32, device=device),
            path=torch.zeros(*rows, path_width, **long),
            count=torch.ones(rows, **long),
            next_token=torch.zeros(rows, **long),
        )


class SpeculativeRound:
    """A target and a draft's round functions over their cache windows (see the module docstring).

    Args:
        adapter: the target's `TargetAdapter`.
        draft: the bound draft.
        target_window / draft_window: the two caches' windows.
        graphs / compile: capture the round functions as CUDA graphs / compile them first (static windows only).
    """

    build_tree = staticmethod(build_dynamic_tree)  # one row's tree; `RowsRound`: every row's at once

    @staticmethod
    def rows_of(draft_window) -> int | None:
        """Rows of the round's state: None for one row (`RowsRound`: the draft window's batch)."""
        return None

    def __init__(self, adapter, draft, target_window, draft_window, graphs: bool = False, compile: bool = False):
        config = draft.config
        self.adapter = adapter
        self.draft = draft
        self.target_window = target_window
        self.runner = DraftRunner(draft, draft_window)
        self.top_k, self.depth, self.total_tokens = config.tree_top_k, config.tree_depth, config.tree_total_tokens
        self.path_width = config.tree_depth + 2  # root + one node per tree depth (depths 1..depth + 1)
        device = draft.fc.weight.device
        vocab = config.draft_vocab_size or config.text_config.vocab_size  # columns of the draft's log-probs
        self.state = RoundState.allocate(
            config.text_config.hidden_size,
            vocab,
            self.path_width,
            draft.fc.weight.dtype,
            device,
            self.rows_of(draft_window),
        )
        self.graphs, self.compiled = graphs, compile
        static = self.is_static
        target_config, draft_config = adapter.text_model.config, draft.model.config
        self.verify_attention = verify_attention_for(target_config, VERIFY_ATTENTION, device) if static else None
        self.draft_attention = verify_attention_for(draft_config, DRAFT_ATTENTION, device) if static else None
        check_name(self.verify_attention)
        check_name(self.draft_attention, "DRAFT_ATTENTION")
        self.merge_repeated = MERGE_REPEATED  # read by `precompile` (inductor compiles ahead of time)
        self.join_projections = JOIN_PROJECTIONS
        self.autotune_gemms = AUTOTUNE_GEMMS
        self.fused_top_k, self.fp8_kernel, _ = kernels.choices(device)  # where the package's kernels run
        if compile and JOIN_PROJECTIONS and AUTOTUNE_GEMMS:
            raise ValueError(
                "specvlm_hf.round.JOIN_PROJECTIONS and AUTOTUNE_GEMMS cannot both be on: inductor times each joined "
                "product on a copy of its first weight alone, which the joined view reads past (out of bounds on the "
                "GPU). Set specvlm_hf.round.JOIN_PROJECTIONS = False to autotune (joined products are on by "
                "default), or leave AUTOTUNE_GEMMS off."
            )
        # compiled ahead of time, kept on disk (`precompile`), when a store is set; else compiled in this process
        # (the round keeps no reference to the store: its objects are written with the guards of what it compiles)
        store = active_store() if compile else None
        self.compiled_ahead = store is not None
        self.marked_dynamic = False
        # each round function is compiled whole (kernels fused across the tree bookkeeping, masks and layers)
        self.draft_call = GraphedCall(self._draft, graphs, compile, store)
        self.verify_call = GraphedCall(self._verify, graphs, compile, store)
        self.commit_call = GraphedCall(self._commit, graphs, compile, store)
        self.tree: DraftTree | None = None
        self.logits = self.features = None

    # ------------------------------------------------------------------------------------------- building
    @classmethod
    def eager(cls, adapter, draft, target_cache, draft_cache, prompt_real: torch.Tensor) -> "SpeculativeRound":
        """The eager backend over `generate`'s dynamic target cache (already holding the prompt) and a fresh
        dynamic draft cache."""
        return cls(
            adapter, draft, GrowingWindow(target_cache, prompt_real), GrowingWindow(draft_cache, prompt_real[:0])
        )

    @staticmethod
    def static_key(adapter, draft, length: int, graphs: bool, compile: bool) -> tuple:
        """What a fast path is built for: a new one is built when any of it changes. The graphs read the weights
        where they were captured, so the weights' addresses are part of it (moving or replacing a parameter
        rebuilds); the tree settings fix the shapes; buffers made under `torch.inference_mode` cannot be written
        outside it (and vice versa)."""
        config = draft.config
        tensors = (
            *adapter.model.parameters(),
            *draft.parameters(),
            *draft.buffers(),
            *([draft._head_rows] if draft._head_rows is not None else []),
            *(draft._fp8_head[:2] if draft._fp8_head is not None else ()),
        )
        weights = hash(tuple(t.data_ptr() for t in tensors))
        return (
            id(adapter.model),
            type(adapter),
            length,
            graphs,
            compile,
            torch.is_inference_mode_enabled(),
            config.tree_top_k,
            config.tree_depth,
            config.tree_total_tokens,
            VERIFY_ATTENTION,
            DRAFT_ATTENTION,
            MERGE_REPEATED,
            JOIN_PROJECTIONS,
            AUTOTUNE_GEMMS,
            kernels.choices(draft.fc.weight.device),
            weights,
        )

    @property
    def is_static(self) -> bool:
        return isinstance(self.target_window, FixedWindow)

    @property
    def length(self) -> int:
        """Slots of the target's static cache."""
        return self.target_window.real.shape[-1]

    @property
    def draft_length(self) -> int:
        """Slots of the draft's static cache (per row): sized by the draft's compressed prompt."""
        return self.runner.window.real.shape[-1]

    # ------------------------------------------------------------------------------------------- calling
    def start(
        self, prompt_real, root_token: int, root_position: int, position_offset: int, root_hidden, root_log_probs
    ) -> None:
        """Loads the state after the prefills (the target cache holds the prompt, the draft cache its pairs).

        Args:
            prompt_real: `(n,)` bool, the prompt's real (non-padding) tokens, as in the target cache.
            root_token, root_position: the first generated token and its sequence position.
            position_offset: the target's position offset (`TargetAdapter.position_offset`).
            root_hidden, root_log_probs: `(d,)` and `(V,)` the draft's prediction after the root.
        """
        if self.is_static:
            self.target_window.load(prompt_real)
            # once per target cache, after its first prefill initialised it
            self.target_window.place(stack=STACK_COMPILED_LAYERS or not self.compiled)
            self.runner.window.place(stack=False)  # the draft's cache, after its prefill
            if self.compiled and not self.compiled_ahead and not self.marked_dynamic:
                self.mark_width_dynamic()  # with a store, marked only while a function is traced
        state = self.state
        state.root_token.fill_(root_token)
        state.root_position.fill_(root_position)
        state.position_offset.fill_(position_offset)
        state.root_hidden.copy_(root_hidden)
        state.root_log_probs.copy_(root_log_probs)

    def mark_width_dynamic(self) -> None:
        """Marks the cache width (every buffer as wide as the static caches) dynamic for `torch.compile`, so that
        the round functions compiled for one length bucket serve every other: a new bucket costs buffers and
        graph capture only. The draft's cache width (its compressed prompt's) is a dimension of its own. Sliding-window
        layers (narrower than the caches) keep their fixed width."""
        self.marked_dynamic = True
        for tensor, dim in self.width_dimensions():
            mark_dynamic_dim(tensor, dim)

    def clear_width_dynamic(self) -> None:
        """Undoes `mark_width_dynamic` (after a function was compiled ahead of time: see `precompile`)."""
        self.marked_dynamic = False
        for tensor, _ in self.width_dimensions():
            clear_dynamic_marks(tensor)

    def width_dimensions(self):
        """`(tensor, dim)` of every buffer dimension as wide as its cache (see `mark_width_dynamic`)."""
        for window in (self.target_window, *(runner.window for runner in self.runners)):
            width = window.real.shape[-1]
            yield window.real, window.real.dim() - 1
            for layer in getattr(window.cache, "layers", ()):
                for tensor in layer_tensors(layer):
                    if tensor is not None and tensor.dim() == 4 and tensor.shape[2] == width:
                        yield tensor, 2
        stacked = getattr(self.target_window, "stacked", None)
        if stacked is not None:
            yield stacked, 4

    @property
    def runners(self) -> list[DraftRunner]:
        """The draft runner (one, for one row or a batch of rows: a list for code that reads its window)."""
        return [self.runner]

    def draft_tree(self) -> DraftTree:
        with use_attention_implementation(self.draft.model.config, self.draft_attention):
            self.tree = DraftTree(*self.draft_call())
        return self.tree

    def verify(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(T, V)` float32 target logits at every node and `(T, d)` final hidden states (on the fast path, graph
        memory: read or copy them before the next round). The fast path's forward runs attention `VERIFY_ATTENTION`
        (set around the call: a compiled round traces it, and guards on it)."""
        with use_attention_implementation(self.adapter.text_model.config, self.verify_attention):
            self.logits, self.features = self.verify_call()
        return self.logits, self.features

    def commit(self, path: torch.Tensor, count: torch.Tensor, next_token: torch.Tensor) -> None:
        """Keeps the accepted path in the target cache, catches the draft up and loads the next root."""
        state = self.state
        state.path.copy_(path)
        state.count.copy_(count)
        state.next_token.copy_(next_token)
        with use_attention_implementation(self.draft.model.config, self.draft_attention):
            self.commit_call()

    # ------------------------------------------------------------------------------------------- the round
    def _draft(self) -> tuple[torch.Tensor, ...]:
        """The tree (each row's, for rows) from the round's state, drafted on the runner's cache (then rewound)."""
        state = self.state
        tree = self.build_tree(
            state.root_token,
            state.root_log_probs,
            state.root_hidden,
            self.runner.tree_step_fn(state.root_position),
            top_k=self.top_k,
            depth=self.depth,
            total_tokens=self.total_tokens,
            vocab_map=self.draft.draft_vocab,
            fused_top_k=self.fused_top_k,
        )
        self.runner.rewind()  # drop the tree entries drafted this round
        return tree.tokens, tree.parents, tree.depths, tree.scores, tree.ancestor_mask, tree.paths

    def _verify(self) -> tuple[torch.Tensor, torch.Tensor]:
        state, tree = self.state, self.tree
        visible = self.target_window.visible(tree.ancestor_mask)
        positions = tree.depths + state.root_position + state.position_offset
        hidden = self.adapter.verify(
            tree.tokens, tree.depths, visible, positions, self.target_window.length, self.target_window.cache
        )
        return self.adapter.logits(hidden), hidden

    def _commit(self) -> None:
        self.target_window.keep(self.state.path, self.state.count)
        self._catch_up()

    def _catch_up(self) -> None:
        """The draft's catch-up on the accepted path (`state.path`, `.count`, `.next_token`), from the tree's `(T,)`
        tokens and the target's `(T, d)` features; loads the next root."""
        state, tree_tokens, features, runner = self.state, self.tree.tokens, self.features, self.runner
        count, width = state.count, self.path_width
        # draft catch-up on pairs (x_{t+1}, f_t) of the root and the accepted nodes: x is the next node's token,
        # and after the last accepted node the target's next token; rows from `count` on are padding
        rows = torch.arange(width, device=count.device)
        tokens = torch.cat([tree_tokens[state.path[1:]], state.next_token.reshape(1)])
        tokens = torch.where(rows == count - 1, state.next_token, tokens)
        features = features.index_select(0, state.path.to(features.device))
        hidden, log_probs = runner.append(
            self.draft.embed(tokens)[None], features[None], state.root_position + rows, count=count
        )
        last = (count - 1).clamp(min=0).reshape(1)
        state.root_hidden.copy_(hidden.index_select(0, last)[0])
        state.root_log_probs.copy_(log_probs.index_select(0, last)[0])
        state.root_position.add_(count)
        state.root_token.copy_(state.next_token.reshape(1))


class RowsRound(SpeculativeRound):
    """The round over a batch of `B` rows (left-padded prompts), each with its own length, positions and tree.

    The target verifies all rows' trees in one forward (each row's tree at one shared offset, a `(B, 1, T, S)` mask,
    per-row positions), then keeps each row's accepted path at that row's own length. The draft works the same way
    on one cache of `B` rows (a rows window of the target's kind, each row with its own real slots and length): one
    draft forward for all rows' prefill blocks (left-padded), one per tree level (`build_dynamic_trees`: every row's
    frontier, at its own positions), one for the catch-up (each row keeping its own accepted count), so a round runs
    as many draft forwards for `B` rows as for one. Two backends, as for one row:

    - eager (`RowsRound.eager`): `RowsWindow`s over `generate`'s dynamic cache and a dynamic draft cache; finished
      rows are dropped;
    - fast (built by `FastPath.round_for`): `FixedRowsWindow`s over a static target cache of `B` rows and a static
      draft cache of `B` rows; every shape is fixed (the round can be captured as CUDA graphs), finished rows stay in
      the batch, masked out (`active`: they keep nothing), until at most half of the rows are live: then the live
      rows move to the round of the next smaller batch shape (`select`), which has its own graphs.

    Each row's tree has `tree_for_batch(B)` nodes (a function of the batch size: trees grow as rows leave).
    `state` is a `RoundState` of `B` rows.
    """

    build_tree = staticmethod(build_dynamic_trees)

    @staticmethod
    def rows_of(draft_window) -> int:
        return draft_window.real.shape[0]

    def __init__(
        self,
        adapter,
        draft,
        target_window,
        draft_window,
        graphs: bool = False,
        compile: bool = False,
        tree_for_batch=None,
    ):
        super().__init__(adapter, draft, target_window, draft_window, graphs, compile)
        batch = self.batch
        self.active = torch.ones(batch, dtype=torch.long, device=draft.fc.weight.device)
        self.tree_for_batch = tree_for_batch or (lambda batch: draft.config.tree_total_tokens)
        self.total_tokens = self.tree_for_batch(batch)

    @classmethod
    def eager(cls, adapter, draft, target_cache, prompt_real: torch.Tensor, tree_for_batch=None) -> "RowsRound":
        """Over `generate`'s dynamic target cache (holding the `(B, n)` prompts, `prompt_real` their real tokens) and
        a fresh dynamic draft cache; `tree_for_batch(B)`: nodes per row's tree for a batch of `B` rows (default: the
        draft's tree size)."""
        draft_window = RowsWindow(DynamicCache(config=draft.config.text_config), prompt_real[:, :0])
        return cls(adapter, draft, RowsWindow(target_cache, prompt_real), draft_window, tree_for_batch=tree_for_batch)

    @property
    def batch(self) -> int:
        return self.state.count.shape[0]

    def load(self, prompt_real: torch.Tensor) -> None:
        """Starts a call after the target's prefill: `(B, n)` the prompts' real tokens."""
        if self.is_static:
            self.target_window.load(prompt_real)

    @property
    def is_static(self) -> bool:
        return isinstance(self.target_window, FixedRowsWindow)

    def start_rows(
        self, blocks: list, root_tokens: list[int], root_positions: list[int], position_offsets: list[int]
    ) -> None:
        """Prefills the draft on every row's block (`compress_pairs`, one draft forward for all rows) and loads the
        rows' states: their first generated tokens, those tokens' sequence positions and the target's position
        offsets (see `SpeculativeRound.start`)."""
        root_hidden, root_log_probs = self.runner.prefill_rows(blocks)
        if self.is_static:
            self.runner.window.place()  # the draft's cache, after its prefill
        state = self.state
        for name, values in (
            ("root_token", root_tokens),
            ("root_position", root_positions),
            ("position_offset", position_offsets),
        ):
            getattr(state, name).copy_(torch.tensor(values, dtype=torch.long))
        state.root_hidden.copy_(root_hidden)
        state.root_log_probs.copy_(root_log_probs)

    def select(self, rows: list[int]) -> tuple["RowsRound", list[int]]:
        """Keeps only the rows `rows` (indices into the current rows, in order) drafting and keeping tokens.

        The eager backend drops the others (and the trees grow to `tree_for_batch` of the smaller batch). The fast
        path masks them out (they stay in the batch and keep nothing) while more than half of its rows are live;
        once at most half are, the live rows move to the fast round of the smallest power-of-two batch that holds
        them (filled up with masked rows; its trees `tree_for_batch` of that batch), with their caches and states.

        Returns:
            the round to continue with, and the current rows it holds, in its order (`rows`, then any masked
            rows it carries).
        """
        if not self.is_static:
            index = torch.tensor(rows, dtype=torch.long)
            self.target_window.select(index)
            self.runner.window.select(index)
            self.state = self.state.index_select(index)
            self.active = self.active.index_select(0, index.to(self.active.device))
            self.total_tokens = self.tree_for_batch(len(rows))
            return self, rows
        batch = self.batch
        if 2 * len(rows) > batch:
            self.active.copy_(torch.isin(torch.arange(batch), torch.tensor(rows)).long())
            return self, list(range(batch))
        smaller = 1 << (len(rows) - 1).bit_length()  # the smallest power of two holding the live rows
        held = rows + [row for row in range(batch) if row not in rows][: smaller - len(rows)]
        other = self._moved(held)
        other.active.copy_((torch.arange(smaller) < len(rows)).long())
        return other, held

    def _moved(self, held: list[int]) -> "RowsRound":
        """The fast round of batch `len(held)` (same target and draft cache widths) holding this round's rows `held`:
        their target and draft cache rows, lengths and real slots, and round states copied into its own buffers,
        which its graphs read."""
        fast = FastPath.for_call(
            self.adapter,
            self.draft,
            self.length,
            self.graphs,
            self.compiled,
            batch=len(held),
            tree_for_batch=self.tree_for_batch,
        )
        other = fast.round_for(self.draft_length)
        index = torch.tensor(held, dtype=torch.long, device=self.active.device)
        other.target_window.take(self.target_window, index)
        other.runner.window.take(self.runner.window, index)
        other.state.copy_(self.state.index_select(index))
        return other

    def commit(self, path: torch.Tensor, count: torch.Tensor, next_token: torch.Tensor) -> None:
        """Keeps each row's accepted path (`(B, P)`, counts and next tokens `(B,)`) and catches the draft up."""
        if self.is_static:  # finished rows stay in the batch and keep nothing
            count = count * self.active.to(count.device)
        super().commit(path, count, next_token)

    def _commit(self) -> None:
        state = self.state
        self.target_window.keep(state.path, state.count)
        self._catch_up_rows()

    def _catch_up_rows(self) -> None:
        """`_catch_up` for every row in one draft forward: a `(B, path_width)` block of each row's root and accepted
        nodes, at each row's positions; each row keeps its own count (a masked row, count 0, nothing)."""
        state, count, width = self.state, self.state.count, self.path_width
        rows = torch.arange(width, device=count.device)
        path = state.path.to(self.tree.tokens.device)
        tokens = torch.cat([self.tree.tokens.gather(1, path[:, 1:]), state.next_token[:, None]], dim=1)
        tokens = torch.where(rows[None, :] == (count - 1)[:, None], state.next_token[:, None], tokens)
        features = self.features
        index = path.to(features.device)[:, :, None].expand(-1, -1, features.shape[-1])
        hidden, log_probs = self.runner.append(
            self.draft.embed(tokens), features.gather(1, index), state.root_position[:, None] + rows, count=count
        )
        last = (count - 1).clamp(min=0)  # a masked batch row keeps nothing (count 0)
        state.root_hidden.copy_(hidden.gather(1, last[:, None, None].expand(-1, 1, hidden.shape[-1]))[:, 0])
        state.root_log_probs.copy_(log_probs.gather(1, last[:, None, None].expand(-1, 1, log_probs.shape[-1]))[:, 0])
        state.root_position.add_(count)
        state.root_token.copy_(state.next_token)

    def _verify(self) -> tuple[torch.Tensor, torch.Tensor]:
        tree, state = self.tree, self.state
        roots = state.root_position + state.position_offset
        positions = tree.depths + roots.to(tree.depths.device)[:, None]
        visible = self.target_window.visible(tree.ancestor_mask)
        # each row's own length: the sequence slot its tree's root follows (sliding windows count from it)
        hidden = self.adapter.verify(
            tree.tokens, tree.depths, visible, positions, self.target_window.lengths, self.target_window.cache
        )
        return self.adapter.logits(hidden), hidden


def tree_room(config) -> int:
    """Cache slots a round needs beyond the sequence: one tree in the target's cache, a round's draft entries (tree
    levels, catch-up block) in the draft's."""
    return max(config.tree_total_tokens, config.tree_depth * config.tree_top_k + config.tree_depth + 2)


def bucketed(length: int) -> int:
    """`length` rounded up to a multiple of `LENGTH_BUCKET` (static cache widths)."""
    return -(-length // LENGTH_BUCKET) * LENGTH_BUCKET


# length buckets whose fast paths (graphs, draft caches) a draft keeps, the least recently used dropped first
# (`warmup` keeps as many as it prepares); their target caches share one memory (`kv_cache.SharedBuffers`, one per
# batch shape), their draft caches another, so each costs its graphs' memory only
KEPT_LENGTHS = 32
# where a draft keeps them, then its other references to one of them (the last call's fast path and round)
KEPT_ONE_ROW = ("_specvlm_fast_paths", "_specvlm_fast_path", "_specvlm_static_round")
KEPT_ROWS = ("_specvlm_fast_rows", "_specvlm_static_rows_round")


@dataclass
class KeptFastPaths:
    """The fast paths a draft keeps for one target and set of options (`family`: `SpeculativeRound.static_key`
    without the length): one per length bucket and, for rows, per (batch, tree) shape (`paths`, by `(length,
    shape)`, most recently used last; the shape None for one row). The target caches of one shape share one memory
    (`shared`, by shape), and so do the draft caches of its rounds (`draft_shared`): calls at different lengths never
    run at once, while the shapes of one batched call do (its rows move from one to the next)."""

    family: tuple
    paths: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)
    draft_shared: dict = field(default_factory=dict)
    limit: int = 0  # lengths kept: at least `KEPT_LENGTHS`, at least this (`warmup` sets the buckets it prepares)

    def by_length(self, shape=None) -> dict:
        """The kept fast paths of one shape (None: one row), by length."""
        return {length: path for (length, of), path in self.paths.items() if of == shape}

    def evict(self) -> None:
        """Drops the least recently used lengths (all their shapes) past the limit, and frees them."""
        while len({length for length, _ in self.paths}) > max(KEPT_LENGTHS, self.limit):
            oldest = next(iter(self.paths))[0]
            for entry in [entry for entry in self.paths if entry[0] == oldest]:
                del self.paths[entry]


class FastPath:
    """The fast path's buffers for one target, length bucket and set of options, kept on the draft and reused by
    later calls whose key matches (`SpeculativeRound.static_key`): one per length bucket (up to `KEPT_LENGTHS`
    lengths, `KeptFastPaths` in `draft._specvlm_fast_paths`), and for rows one per length and (batch, tree) shape
    (`draft._specvlm_fast_rows`), so that a server's calls at lengths seen before, and batches whose rows move to a
    smaller captured batch (`RowsRound.select`), replay their graphs without capturing again. The target caches of
    one shape share one memory (`SharedBuffers`, as large as the longest bucket met: a longer one replaces it, and
    the buckets of that shape kept before it are dropped and built again when met); the draft caches of their rounds
    share another, sized for the longest bucket too.

    It holds the target's static cache and one round per draft cache width. The draft's static cache is sized by
    what the draft holds: its prefill block (the text pairs plus the compressor's visual tokens, not the target's
    visual count) plus the call's new tokens and a round's room, so the draft's KV bytes and the attention width of
    each draft step follow the compressed count. That block is known only after the target's prefill (the gate
    reads the target's features), so a call takes its round with `round_for` then; rounds of other draft widths
    (other branches or prompts) share the target cache and keep their own CUDA graphs.

    Use: `fast = FastPath.for_call(...)`; the target's prefill writes to `fast.target_cache`; then
    `round = fast.round_for(draft_needed)`, the draft prefill on `round`'s draft cache(s), `round.start` (one row)
    or `round.load` + `round.start_rows` (rows).

    Args:
        adapter, draft: the target's `TargetAdapter` and the bound draft.
        length: slots of the target's cache (a `LENGTH_BUCKET` multiple).
        graphs / compile: capture the round functions as CUDA graphs / compile them first.
        batch: rows of a batched call (`RowsRound`), None for one row (`SpeculativeRound`).
        tree_for_batch: for rows, tree nodes per row as a function of the batch size.
    """

    def __init__(
        self,
        adapter,
        draft,
        length: int,
        graphs: bool,
        compile: bool,
        batch=None,
        tree_for_batch=None,
        shared=None,
        draft_shared=None,
    ):
        self.adapter, self.draft, self.length = adapter, draft, length
        self.graphs, self.compile, self.batch, self.tree_for_batch = graphs, compile, batch, tree_for_batch
        self.draft_shared = draft_shared
        device = draft.fc.weight.device
        cache = adapter.static_cache(length)
        if batch is None:
            self.target_window = FixedWindow(cache, length, device, shared)
        else:
            self.target_window = FixedRowsWindow(cache, batch, length, device, shared)
        self.rounds: dict[int, SpeculativeRound] = {}  # by draft cache width
        self.key = None

    @classmethod
    def for_call(
        cls, adapter, draft, needed_length: int, graphs: bool, compile: bool, batch=None, tree_for_batch=None
    ) -> "FastPath":
        """The fast path for a call needing `needed_length` target cache slots (of `batch` rows, trees of
        `tree_for_batch(batch)` nodes each): the draft's kept one when its key still matches (target, rounded
        length, options, tree settings, weight addresses; for rows also the batch and tree size), else a new one;
        its target cache reset."""
        length = bucketed(needed_length)
        if compile and (JOIN_PROJECTIONS or MergeRepeatedCounts.joined):  # before the key: it moves weights
            join_projection_weights(adapter.text_model)
            join_projection_weights(draft)
        key = SpeculativeRound.static_key(adapter, draft, length, graphs, compile)
        if batch is not None:
            tree_for_batch = tree_for_batch or (lambda rows: draft.config.tree_total_tokens)
        current = cls.kept_for(adapter, draft, length, key, graphs, compile, batch, tree_for_batch)
        if batch is None:
            draft._specvlm_fast_path = current
        else:
            current.tree_for_batch = tree_for_batch
        current.target_window.cache.reset()
        return current

    @classmethod
    def kept_for(
        cls, adapter, draft, length: int, key: tuple, graphs: bool, compile: bool, batch=None, tree_for_batch=None
    ) -> "FastPath":
        """The fast path of `key` (and, for rows, of the batch's shape) the draft keeps, else a new one it keeps from
        now on (see the class docstring)."""
        rows = batch is not None
        attribute, *held = KEPT_ROWS if rows else KEPT_ONE_ROW
        shape = (batch, tree_for_batch(batch)) if rows else None
        family = key[:2] + key[3:]
        kept = getattr(draft, attribute, None)
        if kept is None or kept.family != family:  # another target, options, tree or weights: all are dropped
            for name in (attribute, *held):
                draft.__dict__.pop(name, None)
            kept = KeptFastPaths(family)
            setattr(draft, attribute, kept)
        shared = kept.shared.setdefault(shape, SharedBuffers())
        draft_shared = kept.draft_shared.setdefault(shape, SharedBuffers())
        draft_shared.reserve = max(draft_shared.reserve, length)  # no draft cache of a call outgrows its target's
        current = kept.paths.pop((length, shape), None)
        if current is not None and current.target_window.stale:
            current = None
        if current is None:
            others = [entry for entry in kept.paths if entry[1] == shape]
            if length > shared.length and others:  # it will replace the shared memory: free what lives in it
                for entry in others:
                    del kept.paths[entry]
                shared.buffers, draft_shared.buffers = [], []  # (replaced when this call's caches are placed)
                for name in held:
                    draft.__dict__.pop(name, None)
            current = cls(adapter, draft, length, graphs, compile, batch, tree_for_batch, shared, draft_shared)
            current.key = (*key, *shape) if rows else key
        kept.paths[(length, shape)] = current  # most recently used last
        kept.evict()
        return current

    @property
    def target_cache(self):
        """The target's static cache (the prefill writes the prompt to it)."""
        return self.target_window.cache

    def round_for(self, draft_needed: int) -> SpeculativeRound:
        """The round whose draft cache(s) hold `draft_needed` slots (rounded up to a bucket), built on first use,
        its draft caches reset; it is also kept as `draft._specvlm_static_round` (`_specvlm_static_rows_round`)."""
        width = bucketed(draft_needed)
        current = self.rounds.get(width)
        if current is not None and current.runner.window.stale:  # the draft's shared memory was replaced
            current = None
        if current is None:
            device, text_config = self.draft.fc.weight.device, self.draft.config.text_config
            cache = StaticCache(config=text_config, max_cache_len=width)
            if self.batch is None:
                window = FixedWindow(cache, width, device, self.draft_shared)
                current = SpeculativeRound(
                    self.adapter, self.draft, self.target_window, window, self.graphs, self.compile
                )
            else:  # one draft cache of `batch` rows
                current = RowsRound(
                    self.adapter,
                    self.draft,
                    self.target_window,
                    FixedRowsWindow(cache, self.batch, width, device, self.draft_shared),
                    self.graphs,
                    self.compile,
                    self.tree_for_batch,
                )
            self.rounds[width] = current
        if self.batch is None:
            self.draft._specvlm_static_round = current
        else:
            current.active.fill_(1)
            current.tree_for_batch = self.tree_for_batch
            self.draft._specvlm_static_rows_round = current
        current.runner.window.cache.reset()
        current.runner.window.load(current.runner.window.real[..., :0])
        return current


def release_fast_path(draft) -> None:
    """Drops the fast-path buffers and graphs kept on `draft`: every length bucket and batch shape, their caches,
    CUDA graphs and cuBLAS workspaces (freed here unless something else refers to them; `torch.cuda.empty_cache()`
    then hands the memory back). The next fast-path call builds what it needs again."""
    for name in (*KEPT_ONE_ROW, *KEPT_ROWS):
        draft.__dict__.pop(name, None)


# measured when the batched round traced one draft pass per row (its compiled graph, and the compile time, grew with
# the batch): on the LLaVA-1.5-7B shape (one H200) 4 rows compiled in under a minute, 8 rows not within 400 s. Larger
# batches run the fast path's CUDA graphs over eager kernels (measured: 1.85x over compiled plain batched `generate`
# at 8 rows on the mini VLM). The draft now runs one forward per tree level for all rows, so the graph no longer
# grows with the batch (tested on the CPU); compiling larger batches is left off until measured on a GPU.
COMPILE_MAX_BATCH = 4


def fast_path_options(target, draft, device: torch.device, generation_config, batch: int = 1) -> tuple[bool, bool]:
    """`(graphs, compile)` for the fast path: CUDA graphs when the target and the draft sit on one CUDA device;
    `torch.compile` kernel fusion before capture unless `generate(..., disable_compile=True)` or the batch has more
    than `COMPILE_MAX_BATCH` rows."""
    devices = {p.device for p in unwrap_target(target).parameters()} | {p.device for p in draft.parameters()}
    graphs = device.type == "cuda" and len(devices) == 1
    compile = graphs and not getattr(generation_config, "disable_compile", False) and batch <= COMPILE_MAX_BATCH
    return graphs, compile
