"""The fast path's speculative round: fixed shapes, state on the device, three CUDA graphs per round.

With `cache_implementation="static"` the tree loop keeps everything a round needs in fixed device buffers
(`RoundState`: the target's and the draft's static KV caches, which of their slots hold real tokens, their
lengths, the root token, its position and the draft's prediction after it). A round is then three
functions of that state, with the same shapes in every round and no host synchronisation:

1. `draft`: the EAGLE-2 tree (`build_dynamic_tree`, each level one draft forward), the draft cache rewound;
2. `verify`: one target forward over the tree's nodes, giving logits and the draft's true features;
3. `commit`: after acceptance, the target cache compacted to the accepted path (`compact_static_kv`), the
   draft caught up on the target's features of the accepted tokens, and the next root loaded.

Acceptance itself (`greedy_path` / `sampling_path` after `generate`'s logits processors) runs between 2 and 3
on the device; its result reaches the host through one pinned, asynchronous copy that the host waits for
while `commit` runs, which is the round's only synchronisation. On a GPU each of the three functions is
captured once as a CUDA graph (`GraphedCall`) and replayed in later rounds, optionally over kernels that
`torch.compile` fused first; on a CPU (and in the tests) the very same functions run eagerly.

Attention masks are as wide as the caches and are built from the device-side lengths (`window_visibility`),
so the varying prefix length never changes a shape.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from transformers import StaticCache

from .kv_cache import cache_argument_name, compact_static_kv, set_static_length, stack_static_layers
from .target import text_model_of, unwrap_target
from .tree import DraftTree, additive_mask, build_dynamic_tree, window_visibility


def draft_tree_step(draft, token_embeds, parent_hidden, attention_mask, position_ids, cache):
    """One draft forward over a tree level: `(1, n, d)` inputs -> `(n, d)` hidden states, `(n, V)` log-probs."""
    hidden = draft.decode(
        draft.fuse(token_embeds, parent_hidden), attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=cache, use_cache=True,
    )[0]
    return hidden, torch.log_softmax(draft.lm_head(hidden).float(), dim=-1)


# options of the `torch.compile` calls of the fast path (tests swap in a CPU backend to check tracing)
COMPILE_OPTIONS = {"dynamic": False}


class GraphedCall:
    """Runs a function of no arguments (it reads and writes fixed buffers) eagerly on its first call, which also
    warms up kernels and `torch.compile`; captures it as a CUDA graph on the second; replays the graph after.

    Args:
        fn: the function.
        graphs: capture and replay (CUDA); otherwise every call runs `fn`.
        compile: run `torch.compile(fn)` instead; if compilation fails (a compiler error is raised before the
            function runs), warn and go on with `fn`.
    The result of a replay lives in the graph's own memory and is overwritten by the next replay.
    """

    def __init__(self, fn, graphs: bool, compile: bool = False):
        self.eager_fn = fn
        self.fn = torch.compile(fn, **COMPILE_OPTIONS) if compile else fn
        self.enabled = graphs
        self.calls = 0
        self.graph = None
        self.output = None

    def _run(self):
        if self.fn is self.eager_fn:
            return self.fn()
        try:
            return self.fn()
        except torch._dynamo.exc.TorchDynamoException as error:  # raised while compiling, before any state changed
            warnings.warn(f"torch.compile failed on the SpecVLM fast path ({type(error).__name__}: {error}); "
                          "running its CUDA graphs over eager kernels instead.", stacklevel=3)
            self.fn = self.eager_fn
            return self.fn()

    def __call__(self):
        self.calls += 1
        if not self.enabled or self.calls == 1:
            return self._run()
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.output = self.fn()
            self.graph = graph
        self.graph.replay()
        return self.output


@dataclass
class RoundState:
    """The device buffers a round reads and writes (all fixed in size; `W` is the static caches' length).

    Attributes:
        target_real / draft_real: `(W,)` bool, slots of each cache holding real tokens (False on left padding),
            read below the cache's length.
        target_length / draft_length: `()` long, entries in each cache (the draft's may be fewer: compressed
            image tokens).
        root_token: `(1,)` long, the last token the target produced; root_position: `()` long, its position.
        root_hidden: `(d,)` and root_log_probs: `(V,)` float32, the draft's prediction after the root.
        path, count, next_token: an acceptance, written before `commit` (`(P,)`, `()`, `()`).
    """

    target_real: torch.Tensor
    draft_real: torch.Tensor
    target_length: torch.Tensor
    draft_length: torch.Tensor
    root_token: torch.Tensor
    root_position: torch.Tensor
    root_hidden: torch.Tensor
    root_log_probs: torch.Tensor
    path: torch.Tensor
    count: torch.Tensor
    next_token: torch.Tensor


class StaticRound:
    """The fast path of one target and draft at one cache length: static caches, state buffers and the three
    round functions (graphed on CUDA). Kept on the draft and reused by later `generate` calls with the same
    target and length, so the graphs are captured once per length.

    Args:
        target, draft: the models (bound).
        length: slots of each static cache (`max_length` plus room for one tree and a draft round).
        graphs: capture the round functions as CUDA graphs (one device, CUDA only).
        compile: fuse the target's and the draft's forwards with `torch.compile` before capture.
    """

    def __init__(self, target, draft, length: int, graphs: bool, compile: bool):
        self.key = self.key_of(target, draft, length, graphs, compile)
        self.length = length
        self.draft = draft
        model = unwrap_target(target)
        self.text_model = text_model_of(model)
        self.target_head = model.get_output_embeddings()
        self.cache_kw = cache_argument_name(self.text_model.forward)
        text_config = model.config.get_text_config(decoder=True)
        self.target_cache = StaticCache(config=text_config, max_cache_len=length)
        self.draft_cache = StaticCache(config=draft.config.text_config, max_cache_len=length)
        self.target_dtype = self.target_head.weight.dtype
        self.draft_dtype = draft.fc.weight.dtype
        config = draft.config
        self.top_k, self.depth, self.total_tokens = config.tree_top_k, config.tree_depth, config.tree_total_tokens
        self.path_width = config.tree_depth + 2  # root + one node per tree depth (depths 1..depth + 1)
        self.graphs, self.compiled = graphs, compile
        # each round function is compiled whole (kernels fused across the tree bookkeeping, masks and layers)
        self.draft_call = GraphedCall(self._draft, graphs, compile)
        self.verify_call = GraphedCall(self._verify, graphs, compile)
        self.commit_call = GraphedCall(self._commit, graphs, compile)
        self.stacked_kv: torch.Tensor | None = None  # the target cache's layers as one tensor (one-gather compaction)
        self.state: RoundState | None = None
        self.tree: DraftTree | None = None
        self.logits = self.features = None

    @staticmethod
    def key_of(target, draft, length: int, graphs: bool, compile: bool) -> tuple:
        """What a `StaticRound` is built for: a new one is built when any of it changes. The graphs read the
        weights where they were captured, so the weights' addresses are part of it (moving or replacing a
        parameter rebuilds); the tree settings fix the shapes; buffers made under `torch.inference_mode` cannot
        be written outside it (and vice versa)."""
        config = draft.config
        weights = hash(tuple(p.data_ptr() for p in (*unwrap_target(target).parameters(), *draft.parameters())))
        return (id(target), length, graphs, compile, torch.is_inference_mode_enabled(), config.tree_top_k,
                config.tree_depth, config.tree_total_tokens, weights)

    @classmethod
    def for_call(cls, target, draft, needed_length: int, graphs: bool, compile: bool) -> "StaticRound":
        """The draft's fast path for this call (rebuilt only when the target, the length or the options change;
        lengths are rounded up to a multiple of 256 so that nearby budgets share one set of graphs)."""
        length = -(-needed_length // 256) * 256
        current = getattr(draft, "_specvlm_static_round", None)
        if current is None or current.key != cls.key_of(target, draft, length, graphs, compile):
            current = cls(target, draft, length, graphs, compile)
            draft._specvlm_static_round = current
        current.target_cache.reset()
        current.draft_cache.reset()
        return current

    # ----------------------------------------------------------------------------------------------------
    def start(self, target_real, draft_real, root_token: int, root_position: int, root_hidden, root_log_probs) -> None:
        """Loads the state after the prefills (target and draft caches filled by their eager prefills).

        Args:
            target_real / draft_real: `(n,)` / `(m,)` bool, the real entries of each cache so far.
            root_token, root_position: the first generated token and its position.
            root_hidden, root_log_probs: `(d,)` and `(V,)` the draft's prediction after it.
        """
        device = root_hidden.device
        if self.stacked_kv is None:  # once, after the first prefill initialised the layers; later calls reuse it
            self.stacked_kv = stack_static_layers(self.target_cache)
        if self.state is None:  # allocated once: the graphs read these addresses
            long = dict(dtype=torch.long, device=device)
            self.state = RoundState(
                target_real=torch.zeros(self.length, dtype=torch.bool, device=device),
                draft_real=torch.zeros(self.length, dtype=torch.bool, device=device),
                target_length=torch.zeros((), **long), draft_length=torch.zeros((), **long),
                root_token=torch.zeros(1, **long), root_position=torch.zeros((), **long),
                root_hidden=torch.zeros_like(root_hidden), root_log_probs=torch.zeros_like(root_log_probs),
                path=torch.zeros(self.path_width, **long), count=torch.ones((), **long),
                next_token=torch.zeros((), **long),
            )
        state = self.state
        for real, given, length in ((state.target_real, target_real, state.target_length),
                                    (state.draft_real, draft_real, state.draft_length)):
            real.zero_()
            real[: given.numel()] = given.to(device)
            length.fill_(given.numel())
        state.root_token.fill_(root_token)
        state.root_position.fill_(root_position)
        state.root_hidden.copy_(root_hidden)
        state.root_log_probs.copy_(root_log_probs)

    def draft_tree(self) -> DraftTree:
        self.tree = DraftTree(*self.draft_call())
        return self.tree

    def verify(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(T, V)` float32 target logits at every node and `(T, d)` final hidden states (graph memory: read or
        copy them before the next round)."""
        self.logits, self.features = self.verify_call()
        return self.logits, self.features

    def commit(self, path: torch.Tensor, length: torch.Tensor, next_token: torch.Tensor) -> None:
        """Keeps the accepted path in the target cache, catches the draft up and loads the next root."""
        state = self.state
        state.path.copy_(path)
        state.count.copy_(length)
        state.next_token.copy_(next_token)
        self.commit_call()

    # ----------------------------------------------------------------------------------------------------
    # the round functions: fixed shapes, no host syncs
    def _draft(self) -> tuple[torch.Tensor, ...]:
        state, draft = self.state, self.draft

        def step(tokens, parent_hidden, level, ancestor_mask):
            visible = window_visibility(state.draft_real, state.draft_length, ancestor_mask)
            positions = (state.root_position + (level - 1)).expand(1, tokens.shape[0])
            return draft_tree_step(
                draft, draft.embed(tokens)[None], parent_hidden[None],
                additive_mask(visible, self.draft_dtype)[None, None], positions, self.draft_cache,
            )

        tree = build_dynamic_tree(
            state.root_token, state.root_log_probs, state.root_hidden, step,
            top_k=self.top_k, depth=self.depth, total_tokens=self.total_tokens,
        )
        set_static_length(self.draft_cache, state.draft_length)  # drop the tree entries drafted this round
        return tree.tokens, tree.parents, tree.depths, tree.scores, tree.ancestor_mask, tree.paths

    def _verify(self):
        state, tree = self.state, self.tree
        visible = window_visibility(state.target_real, state.target_length, tree.ancestor_mask)
        hidden = self.text_model(
            input_ids=tree.tokens[None],
            attention_mask=additive_mask(visible, self.target_dtype)[None, None],
            position_ids=(tree.depths + state.root_position)[None],
            use_cache=True,
            **{self.cache_kw: self.target_cache},
        ).last_hidden_state[0]
        return self.target_head(hidden).float(), hidden

    def _commit(self) -> None:
        state, tree, features, draft = self.state, self.tree, self.features, self.draft
        count, width = state.count, self.path_width
        compact_static_kv(self.target_cache, state.target_length, state.path, count, self.stacked_kv)
        rows = torch.arange(width, device=count.device)
        state.target_real.index_fill_(0, state.target_length + rows, True)

        # draft catch-up on pairs (x_{t+1}, f_t) of the root and the accepted nodes: x is the next node's token,
        # and after the last accepted node the target's next token; rows from `count` on are padding, written
        # past the new draft length (so never read) and hidden from the real rows by causality
        tokens = torch.cat([tree.tokens[state.path[1:]], state.next_token.reshape(1)])
        tokens = torch.where(rows == count - 1, state.next_token, tokens)
        causal = torch.ones(width, width, dtype=torch.bool, device=count.device).tril()
        visible = window_visibility(state.draft_real, state.draft_length, causal)
        hidden, log_probs = draft_tree_step(
            draft, draft.embed(tokens)[None], features[state.path][None],
            additive_mask(visible, self.draft_dtype)[None, None], (state.root_position + rows)[None],
            self.draft_cache,
        )
        last = (count - 1).reshape(1)
        state.root_hidden.copy_(hidden.index_select(0, last)[0])
        state.root_log_probs.copy_(log_probs.index_select(0, last)[0])
        state.draft_real.index_fill_(0, state.draft_length + rows, True)
        set_static_length(self.draft_cache, state.draft_length + count)
        state.target_length.add_(count)
        state.draft_length.add_(count)
        state.root_position.add_(count)
        state.root_token.copy_(state.next_token.reshape(1))
