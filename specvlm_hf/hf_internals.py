"""Everything specvlm-hf borrows from transformers' and torch's private internals, in one place.

Each name below depends on something transformers (5.17 to the newest 5.x) or torch does not promise to keep:
a private method, an attribute of a cache layer, a field of a logits processor. `tests/test_hf_internals.py`
checks every one of them against the installed versions and fails with the symbol's name when an upgrade
changes it. The rest of the package calls these functions and never touches the internals directly.
"""

from __future__ import annotations

import collections
import functools
import inspect
from contextlib import contextmanager

import torch
from transformers import GenerationMixin
from transformers.generation.logits_process import (
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

# --------------------------------------------------------------------------------------------------------------
# generate's decoding-method hooks that `integration.SpecVLMGenerationMixin` overrides (looked up on the class)
ASSISTED_DECODING = "_assisted_decoding"
CANDIDATE_GENERATOR = "_get_candidate_generator"
VALIDATE_GENERATION_MODE = "_validate_generation_mode"
OVERRIDDEN_METHODS = {
    ASSISTED_DECODING: ("input_ids", "logits_processor", "stopping_criteria", "generation_config"),
    CANDIDATE_GENERATOR: ("generation_config", "input_ids", "assistant_model", "logits_processor", "model_kwargs"),
    VALIDATE_GENERATION_MODE: ("generation_mode", "generation_config", "generation_mode_kwargs"),
    "_sample": ("input_ids", "logits_processor", "stopping_criteria", "generation_config", "streamer"),  # called
}


def prefill(model, input_ids: torch.Tensor, generation_config, model_kwargs: dict):
    """The prompt's forward exactly as `generate` runs it before its first token (`GenerationMixin._prefill`):
    the same inputs preparation, so the first token is bit-identical to plain decoding. Returns the model output
    (`.logits`), and leaves the prompt in `model_kwargs`' cache."""
    return model._prefill(input_ids, generation_config, model_kwargs)


def plain_decoding(model, input_ids, logits_processor, stopping_criteria, generation_config, streamer, model_kwargs):
    """`generate`'s own token-by-token loop (`GenerationMixin._sample`, greedy or sampling) over the prepared call:
    what a batch runs when speculation would not pay."""
    return model._sample(
        input_ids, logits_processor, stopping_criteria, generation_config, streamer=streamer, **model_kwargs
    )


class CandidateStopCheck:
    """The stopping criteria handed to transformers' assisted-decoding loop in chain mode.

    Before verifying a round, the loop asks whether the candidate sequence is already done
    (`stopping_criteria(candidate_input_ids, None)`) and, if so, keeps one token fewer. When no token was drafted
    (in transformers 5.17 the first round, which is the prefill), the candidate sequence is the prompt itself: a
    prompt ending in an end-of-sequence token then made the loop keep nothing and stop, where plain `generate` always
    adds a token. With no candidates this answers "not done"; every other call goes to the criteria unchanged.
    (5.25 prefills before the loop and never asks about the bare prompt; the wrapper is then inert.)

    Args:
        criteria: the loop's `StoppingCriteriaList`.
        input_length: returns the length of the sequence the candidate generator last drafted from (None before
            its first call).
    """

    def __init__(self, criteria, input_length):
        self.criteria, self.input_length = criteria, input_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if scores is None and input_ids.shape[-1] == self.input_length():
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return self.criteria(input_ids, scores, **kwargs)

    def __getattr__(self, name):  # `max_length` and anything else the loop reads from the list
        if name == "criteria":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.criteria, name)

    def __iter__(self):
        return iter(self.criteria)

    def __len__(self) -> int:
        return len(self.criteria)


def pad_token_of(generation_config) -> int | None:
    """The token `generate` pads finished rows with (`pad_token_id`, else the first EOS), as it prepared it."""
    pad = getattr(generation_config, "_pad_token_tensor", None)
    return None if pad is None else int(pad.reshape(-1)[0])


def mrope_deltas(model) -> torch.Tensor | None:
    """`(B, 1)` M-RoPE position offsets that `generate` stored on a Qwen-VL model before decoding (text tokens
    after the last image sit at `index + delta`), or None where the model keeps none."""
    inner = getattr(model, "model", None)
    return getattr(inner, "rope_deltas", None)


# --------------------------------------------------------------------------------------------------------------
# cache layers: transformers offers no public way to reorder a layer's entries or to move a static layer's
# write position (5.17 and 5.23 `StaticLayer` have no `crop`)
def layer_tensors(layer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A cache layer's `(keys, values)` tensors `(batch, heads, length, head_dim)` (None before first use)."""
    return getattr(layer, "keys", None), getattr(layer, "values", None)


def set_layer_tensors(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replaces a dynamic cache layer's tensors (after a reorder), or a static layer's buffers by views of a
    stacked tensor holding the same values."""
    layer.keys, layer.values = keys, values


def is_static_layer(layer) -> bool:
    """Whether a cache layer is a fixed-size (static) buffer with a device-side write position."""
    return torch.is_tensor(getattr(layer, "cumulative_length", None))


def is_initialized(layer) -> bool:
    return bool(getattr(layer, "is_initialized", False))


def set_static_write_position(layer, length: torch.Tensor | int) -> None:
    """Moves a static layer's write position to `length` (a device scalar or an int), dropping what lies after."""
    if torch.is_tensor(length):
        layer.cumulative_length.copy_(length)
    else:
        layer.cumulative_length.fill_(length)


def static_write_position(layer) -> torch.Tensor:
    """A static layer's write position: `()` long on the device, the slots it holds."""
    return layer.cumulative_length


def mark_static_address(tensor: torch.Tensor) -> None:
    """Tags a static cache buffer as having a fixed address for `torch.compile`, as a static layer's own
    initialisation tags the buffers it allocates."""
    import torch._dynamo

    torch._dynamo.mark_static_address(tensor)


def initialize_static_layer(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Allocates a static layer's buffers for `(batch, heads, *, head_dim)` entries shaped, typed and placed as
    `keys` / `values` (as its first `update` would; the buffers are zero, the write position unchanged)."""
    layer.lazy_initialization(keys, values)


# the keywords `generate`'s model kwargs hold the cache under: `cache` from transformers 5.24, else `past_key_values`
GENERATION_CACHE_KEYS = ("cache", "past_key_values")


def generation_cache_key(model_kwargs: dict) -> str | None:
    """The keyword `generate`'s model kwargs hold a cache under (None: no cache passed or made)."""
    return next((key for key in GENERATION_CACHE_KEYS if model_kwargs.get(key) is not None), None)


def cache_argument_name(forward) -> str:
    """The keyword a model's forward takes its cache under: `cache` from transformers 5.24, else
    `past_key_values`."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


# --------------------------------------------------------------------------------------------------------------
# logits processors and stopping criteria whose fields the tree loop reads, to treat a whole tree in one call
def length_rule_active(processor, length: int) -> bool | None:
    """For processors that read only the sequence's length (minimum-length rules): whether they act on a
    sequence of `length` tokens; None for any other processor."""
    if type(processor) is MinLengthLogitsProcessor:
        return length < processor.min_length
    if type(processor) is MinNewTokensLengthLogitsProcessor:
        return length - processor.prompt_length_to_skip < processor.min_new_tokens
    return None


def host_stop_rule(stopping_criteria) -> tuple[int | None, set[int]] | None:
    """`(max_length, eos ids)` when the stopping criteria are only a length limit and EOS tokens (they can then
    be checked on the host without a device sync per token); None otherwise."""
    max_length, eos = None, set()
    for criterion in stopping_criteria or []:
        if type(criterion) is MaxLengthCriteria:
            max_length = criterion.max_length
        elif type(criterion) is EosTokenCriteria:
            eos |= set(criterion.eos_token_id.flatten().tolist())
        else:
            return None
    return max_length, eos


# --------------------------------------------------------------------------------------------------------------
# model geometry helpers that transformers keeps inside modeling files
def anyres_grid(target_config, image_size) -> tuple[int, int]:
    """LLaVA-NeXT's unpadded tile grid `(rows, cols)` of patch tokens for an image of `image_size` (h, w)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    vision = target_config.vision_config
    side = vision.image_size // vision.patch_size
    grid_h, grid_w = get_anyres_image_grid_shape(
        [int(v) for v in image_size], target_config.image_grid_pinpoints, vision.image_size
    )
    tiles = unpad_image(torch.empty(1, grid_h * side, grid_w * side), torch.as_tensor(image_size))
    return tuple(tiles.shape[-2:])


def onevision_grid(target_config, image_size, vision_aspect_ratio: str | None = None) -> tuple[int, int]:
    """LLaVA-OneVision's tile grid `(rows, cols)` of patch tokens for one AnyRes image of `image_size` (h, w):
    the unpadded grid (llava_onevision's get_anyres_image_grid_shape / unpad_image), shrunk like
    `LlavaOnevisionModel.pack_image_features` when it exceeds `anyres_max_N` tiles by more than 10%."""
    import math

    from transformers.models.llava_onevision.modeling_llava_onevision import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    vision = target_config.vision_config
    side = vision.image_size // vision.patch_size
    size = [int(v) for v in image_size]
    grid_h, grid_w = get_anyres_image_grid_shape(size, target_config.image_grid_pinpoints, vision.image_size)
    rows, cols = unpad_image(torch.empty(1, grid_h * side, grid_w * side), size).shape[-2:]
    aspect = vision_aspect_ratio or getattr(target_config, "vision_aspect_ratio", None) or "anyres_max_9"
    ratio = math.sqrt(rows * cols / (int(aspect.strip("anyres_max_")) * side**2))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return int(rows), int(cols)


# --------------------------------------------------------------------------------------------------------------
# tensor parallelism: transformers 5.x (`from_pretrained(..., tp_plan="auto")` or
# `distributed_config=DistributedConfig(tp_plan="auto")` under torchrun) shards the layers of its `tp_plan` as
# DTensor parameters on a 1-D device mesh and wraps their forwards with the collectives; the rest stays whole
def tensor_parallel_mesh(model):
    """The device mesh over which transformers' tensor parallelism shards `model`'s weights (its ranks each hold
    a shard of every planned layer), or None for a model transformers did not shard (`model.tp_size` unset or 1:
    one process, `device_map` splits, FSDP-sharded weights) or outside `torch.distributed`."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    tp_size = getattr(model, "tp_size", None)
    if tp_size is not None and tp_size < 2:
        return None
    from torch.distributed.tensor import DTensor

    for parameter in model.parameters():
        if isinstance(parameter, DTensor) and not all(p.is_replicate() for p in parameter.placements):
            mesh = parameter.device_mesh
            names = mesh.mesh_dim_names or ()
            if tp_size is None and "tp" not in names:
                # transformers 5.24 may leave `tp_size` unset under `DistributedConfig(tp_plan="auto")`; a sharded
                # weight on a mesh without a "tp" dimension is FSDP's, not tensor parallelism's
                continue
            return mesh if mesh.ndim == 1 else mesh["tp"]
    if tp_size is not None:  # transformers 5.24 keeps plain local shards and the mesh on the model
        manager = getattr(model, "_mesh_manager", None)
        if manager is not None:
            return manager.get_mesh("tp")
        mesh = getattr(model, "_device_mesh", None)
        if mesh is not None:
            return mesh if mesh.ndim == 1 else mesh["tp"]
    return None


def unsharded(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a tensor-parallel weight (a DTensor: gathered from every rank, so every rank of its
    mesh must call this at the same point), or the tensor itself."""
    if not torch.distributed.is_available():
        return tensor
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


# --------------------------------------------------------------------------------------------------------------
# huggingface_hub
def hub_client_factory():
    """The HTTP client factory `huggingface_hub` uses now (`set_client_factory` has no public getter), to restore it
    after a temporary one."""
    from huggingface_hub.utils import _http

    return getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or _http.default_client_factory


# --------------------------------------------------------------------------------------------------------------
# which attention function a model's layers call: `config._attn_implementation` (a property over
# `_attn_implementation_internal`), looked up in transformers' `AttentionInterface` at every forward
def attention_implementations() -> set[str]:
    """The names transformers' attention layers accept as `config._attn_implementation` ("eager" included)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return set(ALL_ATTENTION_FUNCTIONS.valid_keys()) | {"eager"}


@contextmanager
def use_attention_implementation(config, name: str | None):
    """While in the context, the layers built from `config` (one text config) run attention `name`; None: no change.
    Sets the private attribute, not the property, whose setter would also change the sub-configs."""
    if name is None:
        yield
        return
    before = config._attn_implementation_internal
    config._attn_implementation_internal = name
    try:
        yield
    finally:
        config._attn_implementation_internal = before


# --------------------------------------------------------------------------------------------------------------
# torch
def dynamo_error_types() -> tuple[type, ...]:
    """Errors `torch.compile` raises while compiling (before the compiled function changed any state)."""
    return (torch._dynamo.exc.TorchDynamoException,)


def check_overridable(cls: type = GenerationMixin) -> None:
    """Raises naming the method when a `generate` hook that SpecVLM overrides is gone or changed its arguments."""
    for name, parameters in OVERRIDDEN_METHODS.items():
        method = getattr(cls, name, None)
        if method is None:
            raise RuntimeError(f"transformers' GenerationMixin.{name} is gone: specvlm-hf cannot hook into generate")
        have = inspect.signature(method).parameters
        missing = [p for p in parameters if p not in have]
        if missing:
            raise RuntimeError(f"transformers' GenerationMixin.{name} no longer takes {missing}")


# --------------------------------------------------------------------------------------------------------------
# processors of families whose processor takes a video processor (Qwen-VL): transformers builds the video processor
# with torchvision, and without torchvision `AutoProcessor` cannot load the processor at all (not even for images)
def processor_without_video(processor_class: type, image_processor, tokenizer, chat_template=None):
    """`processor_class(image_processor, tokenizer, video_processor=<none>, chat_template)`: the processor for
    images and text when torchvision (needed by transformers' video processors) is missing; passing videos to it
    raises. Relies on `ProcessorMixin.__init__` checking each argument through `self.check_argument_for_proper_class`
    (shadowed on the instance for the video processor only) and on the family's `__init__` taking
    `video_processor`."""
    processor = processor_class.__new__(processor_class)

    def check(name, argument):
        if isinstance(argument, NoVideoProcessor):
            return NoVideoProcessor
        return processor_class.check_argument_for_proper_class(processor, name, argument)

    processor.check_argument_for_proper_class = check
    processor_class.__init__(
        processor, image_processor=image_processor, tokenizer=tokenizer, video_processor=NoVideoProcessor(),
        chat_template=chat_template,
    )  # fmt: skip
    del processor.check_argument_for_proper_class
    return processor


class NoVideoProcessor:
    """Stands in for a video processor where torchvision is missing."""

    def __call__(self, *args, **kwargs):
        raise ImportError("video inputs need torchvision (`pip install torchvision`), which is not installed")


# torch: a tensor's version counter
def version_of(tensor: torch.Tensor) -> int | None:
    """How many times `tensor` was changed in place (`Tensor._version`: `copy_`, `mul_`, `load_state_dict`, ...; not
    writes through `.data`): copies made from it are stale once it moves. None for a tensor made under
    `torch.inference_mode`, which keeps no count."""
    if tensor.is_inference():
        return None
    return tensor._version


# torch.compile: dynamic dimensions and the recompile limit (torch._dynamo)
def mark_dynamic_dim(tensor: torch.Tensor, dim: int) -> None:
    """Tells `torch.compile` that `tensor`'s size along `dim` varies between calls (one compiled graph serves every
    size): `torch._dynamo.maybe_mark_dynamic`, which does not fail when the code needs the size fixed."""
    import torch._dynamo

    torch._dynamo.maybe_mark_dynamic(tensor, dim)


def check_same_size(size, other, message: str) -> None:
    """Raises `RuntimeError(message)` unless two sizes are equal; under `torch.compile` it also tells the shape solver
    that they are one size (`torch._check`), which shape arithmetic alone may not prove."""
    torch._check(size == other, lambda: message)


def recompile_limit() -> int:
    """How many times torch compiles one function (one code object) before running it uncompiled."""
    import torch._dynamo

    config = torch._dynamo.config
    return int(getattr(config, "recompile_limit", None) or config.cache_size_limit)


def compile_backend(name_or_fn):
    """The callable behind a `torch.compile` backend name (`"inductor"`, `"aot_eager"`, ...)."""
    import torch._dynamo

    return torch._dynamo.lookup_backend(name_or_fn) if isinstance(name_or_fn, str) else name_or_fn


# CUDA graph capture and cuBLAS's workspace (torch._C). torch keeps one cuBLAS (and one cuBLASLt) workspace per
# (handle, stream) in process-wide maps, allocated on first use; a graph that captures a GEMM embeds that workspace's
# address. Captures on one stream (`torch.cuda.graph`'s default side stream) would all share the first capture's
# workspace, which lives in that graph's memory pool, and anything that clears the maps (torch.compile's CUDA graph
# trees before and after each recording, e.g. transformers' static-cache `generate` on a GPU; newer torch also when
# any graph captured on that stream is destroyed: pytorch/pytorch#193402) frees it under every other graph: their
# replays then write through a dangling pointer (silent corruption, or an illegal memory access once unmapped).
CLEAR_CUBLAS_WORKSPACES = "_cuda_clearCublasWorkspaces"


@contextmanager
def cublas_workspace_of_its_own():
    """Around a CUDA graph capture: clears torch's cuBLAS workspaces before it, so that a GEMM in the capture
    allocates a workspace in the graph's own memory pool (owned by the graph for its lifetime, as CUDA graph trees
    do), and after it, so that no later capture or eager GEMM is handed that workspace. torch keeps cuBLAS's and
    cuBLASLt's workspaces apart: a captured graph costs one of each that its GEMMs use (cuBLAS's: 32 MiB on Hopper)."""
    clear = getattr(torch._C, CLEAR_CUBLAS_WORKSPACES, None)
    if clear is None:
        raise RuntimeError(
            f"torch {torch.__version__} has no torch._C.{CLEAR_CUBLAS_WORKSPACES}, which the SpecVLM fast path needs "
            "to give each CUDA graph a cuBLAS workspace of its own (see specvlm_hf/hf_internals.py). Use a torch "
            "this version of specvlm-hf supports, or decode without the fast path (no cache_implementation='static')."
        )
    clear()
    try:
        yield
    finally:
        clear()


# fused attention kernels that also return their softmax's log-sum-exp (private aten ops: sdpa returns no
# log-sum-exp, which merging attention over separate key chunks needs)
def attention_with_lse(query, key, value, bias, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention `(B, H, L, d)` of `query` `(B, H, L, d)` over `key` / `value` `(B, H, S, d)` with the
    additive `bias` `(B, H, L, S)` (query's dtype; broadcast dimensions may have stride 0), and the log-sum-exp of
    each row's biased scores, `(B, H, L)` float32. CUDA: the memory-efficient kernel; CPU: the flash kernel that
    CPU sdpa runs."""
    if query.device.type == "cuda":
        output, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, True, 0.0, False, scale=scale
        )[:2]
        return output, lse[..., : query.shape[-2]]  # the kernel pads its rows to a multiple of 32
    output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, False, attn_mask=bias, scale=scale
    )
    return output, lse


# float8 products with one scale per row (`torch._scaled_mm`, private: its public successor
# `torch.nn.functional.scaled_mm` is missing from the torch 2.11 the GPU machines run)
def scaled_product_rows(
    inputs_fp8: torch.Tensor,
    inputs_scale: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`(inputs_fp8 * inputs_scale) @ (weight_fp8 * weight_scale.T).T` from e4m3 operands: `inputs_fp8` `(m, k)`
    with float32 scales `(m, 1)`, `weight_fp8` `(n, k)` with float32 scales `(1, n)`; `k` and `n` multiples of 16.
    CUDA needs compute capability 8.9 or newer and `out_dtype` bfloat16; the CPU computes any float dtype."""
    return torch._scaled_mm(
        inputs_fp8, weight_fp8.t(), scale_a=inputs_scale, scale_b=weight_scale, out_dtype=out_dtype
    )


# a graph pass run on the round functions' graphs (torch.fx; inductor's `post_grad_custom_pre_pass` hook and its
# `CustomGraphPass` base, `compile_fx(config_patches=)`; `torch._dynamo.backends.common.aot_autograd` for tests)
def merge_repeated(graph: torch.fx.Graph) -> int:
    """Common-subexpression elimination on a functional graph, in place: a node computing what an earlier node
    computed (the same op on the same arguments) is replaced by it. Kept apart: ops with side effects (mutable
    schemas), random ops, fresh buffers (`empty`), and values a later node writes in place. Returns how many nodes
    were removed.

    inductor merges repeated code inside one kernel, not across kernels or library calls: a round's graph repeats
    per layer what depends only on the tree (each layer's mask preparation, position arithmetic), and every
    projection sharing an input and a weight."""
    seen: dict = {}
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.is_impure():
            continue
        target = node.target
        name = str(target)
        if torch.Tag.nondeterministic_seeded in getattr(target, "tags", ()) or any(
            word in name for word in ("empty", "rand", "seed", "bernoulli", "multinomial", "exponential")
        ):
            continue
        if any(user.is_impure() for user in node.users):
            continue  # written in place later: two equal values are still two buffers
        key = (target, _graph_key(node.args), _graph_key(node.kwargs))
        earlier = seen.get(key)
        if earlier is None:
            seen[key] = node
            continue
        node.replace_all_uses_with(earlier)
        graph.erase_node(node)
        removed += 1
    return removed


def _graph_key(value):
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_graph_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _graph_key(v)) for k, v in value.items())))
    if isinstance(value, torch.fx.Node):
        return ("node", value)
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return (type(value).__name__, value)


def join_adjacent_products(graph: torch.fx.Graph) -> int:
    """Joins matrix products of one input by weights that lie next to each other in one storage into one product, in
    place: `x @ W1.T`, `x @ W2.T`, ... become column slices of `x @ W.T`, `W` the weights' rows read as one matrix
    (`as_strided` over the first weight's storage, which holds the others right after it); with biases (`addmm`),
    when they lie so too, `b1`, `b2`, ... read as one vector. Weights are recognised by their example values
    (`node.meta["val"]`: fake tensors keep their real tensors' storages and offsets), so nothing is joined unless the
    weights given to the compile lie so (`joined_weights.join_projection_weights` lays out q/k/v and gate/up that
    way); code compiled after a join is only right for weights that still do. Products whose slices a later `view`
    could not take are left alone. Returns how many products were removed.

    One GEMM reads the weights once and launches once where a layer's q/k/v took three and its gate/up two: on an H100
    the 7B verify fell 0.25-0.45 ms (results/README.md, round variants, `fused`)."""
    groups: dict = {}
    for node in graph.nodes:
        product = _projection(node)
        if product is None:
            continue
        x, weight, bias = product
        key = (x, id(weight.untyped_storage()), weight.dtype, weight.device, weight.shape[1])
        key += (id(bias.untyped_storage()),) if bias is not None else (None,)
        groups.setdefault(key, []).append((node, product))
    removed = 0
    for members in groups.values():
        members.sort(key=lambda member: member[1][1].storage_offset())
        runs, run = [], [members[0]]
        for member in members[1:]:
            if _follows(run[-1][1], member[1]):
                run.append(member)
            else:
                runs.append(run)
                run = [member]
        runs.append(run)
        for run in runs:
            if len(run) > 1 and _join_run(graph, run):
                removed += len(run) - 1
    if removed:
        graph.lint()
    return removed


def _projection(node: torch.fx.Node):
    """`(x node, weight value, bias value or None)` when `node` is `x @ W.T` (`mm`) or `b + x @ W.T` (`addmm`, no
    scaling) with a contiguous 2-D weight (and 1-D bias) that has an example value; else None."""
    aten = torch.ops.aten
    if node.op != "call_function" or node.kwargs:
        return None
    if node.target is aten.mm.default:
        bias_node, (x, transposed) = None, node.args
    elif node.target is aten.addmm.default and len(node.args) == 3:
        bias_node, x, transposed = node.args
    else:
        return None
    if not (isinstance(transposed, torch.fx.Node) and _is_matrix_transpose(transposed)):
        return None
    weight = transposed.args[0].meta.get("val") if isinstance(transposed.args[0], torch.fx.Node) else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.stride() != (weight.shape[1], 1):
        return None
    if bias_node is None:
        return x, weight, None
    bias = bias_node.meta.get("val") if isinstance(bias_node, torch.fx.Node) else None
    if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.stride() != (1,):
        return None
    return x, weight, bias


def _follows(earlier: tuple, later: tuple) -> bool:
    """Whether `later`'s weight (and bias) start where `earlier`'s end, in the same storage."""
    (_, weight, bias), (_, next_weight, next_bias) = earlier, later
    if next_weight.storage_offset() != weight.storage_offset() + weight.numel():
        return False
    return bias is None or next_bias.storage_offset() == bias.storage_offset() + bias.numel()


def _is_matrix_transpose(node: torch.fx.Node) -> bool:
    aten = torch.ops.aten
    if node.op != "call_function":
        return False
    if node.target is aten.t.default:
        return True
    return node.target is aten.permute.default and list(node.args[1]) == [1, 0]


def _join_run(graph: torch.fx.Graph, run: list) -> bool:
    """One product for a run of `(node, _projection(node))` whose weights (and biases) follow each other; False
    (the graph untouched) when a user's `view` could not take its slice, or without example values to check that."""
    aten = torch.ops.aten
    first_node, (x, first, first_bias) = run[0]
    weight_node = first_node.args[-1].args[0]
    sizes = [product[1].shape[0] for _, product in run]
    bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
    shape = [sum(sizes), first.shape[1]]
    offset = first.storage_offset()
    steps = [  # (name, op, its arguments; a string names an earlier step's result), in order
        ("weights", aten.as_strided.default, (weight_node, shape, [shape[1], 1], offset)),
        ("transposed", aten.permute.default, ("weights", [1, 0])),
    ]
    known = {weight_node: first, x: x.meta.get("val")}
    if first_bias is None:
        steps.append(("product", aten.mm.default, (x, "transposed")))
    else:
        bias_node = first_node.args[0]
        known[bias_node] = first_bias
        steps.append(("bias", aten.as_strided.default, (bias_node, [shape[0]], [1], first_bias.storage_offset())))
        steps.append(("product", aten.addmm.default, ("bias", x, "transposed")))
    steps += [(f"piece{i}", aten.slice.Tensor, ("product", 1, low, high)) for i, (low, high) in enumerate(bounds)]
    fake_mode = getattr(first, "fake_mode", None)
    if fake_mode is None or not isinstance(known[x], torch.Tensor):
        return False  # no example values to check the slices against
    values: dict = {}

    def value(arg):
        return values[arg] if isinstance(arg, str) else known[arg] if isinstance(arg, torch.fx.Node) else arg

    with fake_mode:  # the new nodes' example values, and whether every user's view takes its slice
        for name, op, args in steps:
            values[name] = op(*(value(arg) for arg in args))
        for i, (node, _) in enumerate(run):
            for user in node.users:
                if user.target is aten.view.default:
                    try:
                        aten.view.default(values[f"piece{i}"], user.args[1])
                    except RuntimeError:
                        return False
    position = {node: index for index, node in enumerate(graph.nodes)}
    nodes: dict = {}
    with graph.inserting_before(min((node for node, _ in run), key=position.__getitem__)):
        for name, op, args in steps:
            nodes[name] = graph.call_function(op, tuple(nodes[a] if isinstance(a, str) else a for a in args))
            nodes[name].meta["val"] = values[name]
    for i, (node, _) in enumerate(run):
        node.replace_all_uses_with(nodes[f"piece{i}"])
        graph.erase_node(node)
    return True


def merge_repeated_pass(join: bool = False, layout: tuple = ()):
    """The process's inductor pass object running `merge_repeated` (and, with `join`, then
    `join_adjacent_products`); their class counts the nodes removed (`removed`) and products joined (`joined`). One
    object per input `layout` (`shared_storage_layout`), part of its uuid: inductor's cache keeps code that joined
    products apart from code for weights laid out otherwise. The same object however the arguments are spelled."""
    return _merge_repeated_pass(bool(join), tuple(layout))


@functools.cache
def _merge_repeated_pass(join: bool, layout: tuple):
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class MergeRepeated(CustomGraphPass):
        """`merge_repeated` as an inductor graph pass; its uuid (part of inductor's cache keys) is its source's hash,
        so a changed pass never reuses code compiled with the old one."""

        def __call__(self, graph: torch.fx.Graph) -> None:
            MergeRepeatedCounts.removed += merge_repeated(graph)
            if join and layout:  # without the inputs' layout in the uuid, joined code could be reused for others
                MergeRepeatedCounts.joined += join_adjacent_products(graph)

        def uuid(self) -> str:
            import hashlib

            joining = [join_adjacent_products, _projection, _follows, _join_run, shared_storage_layout]
            sources = [_merge_repeated_pass, merge_repeated] + (joining if join else [])
            text = "".join(inspect.getsource(f) for f in sources) + repr(layout)
            return hashlib.sha256(text.encode()).hexdigest()

    return MergeRepeated()


class MergeRepeatedCounts:
    """What the round's inductor passes (`merge_repeated_pass`) did in this process: nodes removed, products joined."""

    removed = 0
    joined = 0


def inductor_options(merge: bool, join: bool = False, autotune_gemms: bool = False, layout: tuple = ()) -> dict:
    """inductor config patches of a round function's compile: `merge_repeated` (and with `join`,
    `join_adjacent_products`, its pass keyed by the weights' `layout`, `shared_storage_layout`) first among the
    post-grad passes; with `autotune_gemms`, each matrix product timed against inductor's Triton templates and the
    fastest kept (`max_autotune_gemm`: GEMMs only, not the rest of `max_autotune`). With `join`, GEMM autotuning is
    off in this compile even where the process turned it on (`torch._inductor.config.max_autotune`): inductor would
    time a joined product on a copy of its first weight alone, which the joined view reads past (the round refuses
    `autotune_gemms` with `join`)."""
    options = {"post_grad_custom_pre_pass": merge_repeated_pass(join, layout if join else ())} if merge or join else {}
    if join:
        return {**options, "max_autotune": False, "max_autotune_gemm": False}
    return {**options, "max_autotune_gemm": True} if autotune_gemms else options


def inductor_backend(options: dict):
    """A `torch.compile` backend: inductor with `options` patched into its config for this compile only."""
    from torch._inductor.compile_fx import compile_fx

    def backend(graph_module, example_inputs):
        patches = dict(options)
        if patches.get("post_grad_custom_pre_pass") is merge_repeated_pass(True):
            patches["post_grad_custom_pre_pass"] = merge_repeated_pass(True, shared_storage_layout(example_inputs))
        return compile_fx(graph_module, example_inputs, config_patches=patches)

    return backend


def shared_storage_layout(example_inputs) -> tuple:
    """Which inputs share a storage, and at which offsets: `((input index, first input of its storage, storage offset,
    storage bytes), ...)` for those that do. inductor's cache key drops storage offsets and sizes (unless it marks an
    input static, which it does on a GPU for parameters), while code from `join_adjacent_products` is right only for
    weights laid out one after the other: the joining pass's uuid carries this layout (of a compile's inputs; for a
    compile ahead of time, whose inputs are not known before it, of the models' parameters)."""
    first: dict = {}
    layout = []
    for index, value in enumerate(example_inputs):
        if not isinstance(value, torch.Tensor) or value.device.type == "meta":
            continue
        storage = value.untyped_storage()
        owner = first.setdefault((value.device, storage.data_ptr()), index)
        layout.append((index, owner, value.storage_offset(), storage.nbytes()))
    members = collections.Counter(owner for _, owner, _, _ in layout)
    return tuple(entry for entry in layout if members[entry[1]] > 1)


def aot_eager_merging_backend(removed: list | None = None, joined: list | None = None):
    """A `torch.compile` backend for tests: the functional graph `aot_eager` runs, after `merge_repeated` (what
    inductor's pass sees, run eagerly: the pass's exactness checked without inductor's code generation). Appends
    each graph's count of removed nodes to `removed`; with `joined` given, also runs `join_adjacent_products` and
    appends its counts there."""
    from torch._dynamo.backends.common import aot_autograd

    def merged(graph_module, example_inputs):
        count = merge_repeated(graph_module.graph)
        if removed is not None:
            removed.append(count)
        if joined is not None:
            joined.append(join_adjacent_products(graph_module.graph))
        graph_module.recompile()
        return graph_module

    return aot_autograd(fw_compiler=merged)


def clear_dynamic_marks(tensor: torch.Tensor) -> None:
    """Undoes `mark_dynamic_dim` (the attributes `torch._dynamo.maybe_mark_dynamic` sets). A function compiled ahead
    of time guards on the marks being absent (its guards are rebuilt from their serialised form, which has none), so
    tensors are marked only while it is traced."""
    for name in ("_dynamo_weak_dynamic_indices", "_has_dynamo_dim_marking"):
        if hasattr(tensor, name):
            delattr(tensor, name)


# torch.compile ahead of time (`torch.compile(fn).aot_compile`, `torch.compiler.load_compiled_function`: torch
# calls them experimental) and the guard and source checks around them (torch._dynamo)
def serializable_guards(entries) -> list[bool]:
    """A `guard_filter_fn` keeping the guards torch can write to disk: tensor (shape, stride, dtype, device) and
    constant guards on the function's arguments. Identity guards (on globals, modules, functions, `None`) are
    dropped: the caller's key (`precompile.round_key`) stands for them."""
    from torch._dynamo.guards import CheckFunctionManager

    unsupported = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    return [
        not (entry.is_global or entry.guard_type in unsupported or unsupported & set(entry.derived_guard_types))
        for entry in entries
    ]


# the name given to the class of kernels' function wrapper `<module>.<function>` (see `name_kernel_func_types`)
KERNEL_FUNC_TYPE_NAME = "_SpecVLMKernelFunc_{}"


def name_kernel_func_types() -> list[type]:
    """Gives the classes `kernels` defines inside a function a name torch can write into a compiled function's guards.

    transformers >= 5.2x requires `kernels`, whose `use_kernel_forward_from_hub` turns model functions (LLaMA's
    `apply_rotary_pos_emb`) into instances of a class `Func` defined inside `_create_func_module`, one class per
    function, and every attention module holds a private instance of it. A type torch cannot find by its qualified
    name cannot be guarded in a saved function, so no round could be compiled ahead of time. Each such class is named
    after its function (`KERNEL_FUNC_TYPE_NAME`) and set as an attribute of the function's module, where pickle finds
    it; its instances pickle through kernels' own `__reduce__`. Idempotent, and the names are the same in every
    process (the loader runs it too). Returns the classes named by this call."""
    import sys

    named = []
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("transformers.models.") or module is None:
            continue
        for attribute, value in list(vars(module).items()):
            cls = type(value)
            # kernels marks the classes it makes with the kernel's layer name
            if not isinstance(value, torch.nn.Module) or getattr(cls, "kernel_layer_name", None) is None:
                continue
            if "<locals>" not in cls.__qualname__ or cls.__module__ != module_name:
                continue
            name = KERNEL_FUNC_TYPE_NAME.format(attribute)
            cls.__qualname__ = cls.__name__ = name
            setattr(module, name, cls)
            named.append(cls)
    return named


def compile_ahead(function, args: tuple, backend, options: dict | None = None):
    """`function` compiled whole for `args` (`torch.compile(fullgraph=True).aot_compile`), without running it: an
    object that can be saved (`save_ahead`), called as `function(*args)` (checking its guards), and checked
    (`.guard_check(*args)`). `options`: inductor config patches (`inductor_options`; the `"inductor"` backend only)."""
    import torch._dynamo

    # torch 2.11 offers `aot_compile` only with this flag (on by default from 2.13). Python floats are compiled in as
    # constants (guarded by value): left symbolic, dynamo asks to trace again (`TensorifyScalarRestartAnalysis`, met
    # on an H200 with an fp32 target), which it does by itself for `torch.compile` but not ahead of time; other
    # restarts are retried here as dynamo retries them.
    name_kernel_func_types()
    with torch._dynamo.config.patch(enable_aot_compile=True, specialize_float=True):
        compiled = torch.compile(
            function,
            fullgraph=True,
            backend=backend,
            options={"guard_filter_fn": serializable_guards, **(options if backend == "inductor" else {})},
        )
        for attempt in range(3):
            try:
                return compiled.aot_compile((args, {}))
            except torch._dynamo.exc.RestartAnalysis:
                if attempt == 2:
                    raise


def save_ahead(compiled, path: str) -> None:
    """Writes a `compile_ahead` result to `path` (atomically)."""
    compiled.save_compiled_function(path)


def load_ahead(path: str):
    """Reads a function `save_ahead` wrote (raises if torch or Python differ from the writer's)."""
    name_kernel_func_types()
    with open(path, "rb") as handle:
        return torch.compiler.load_compiled_function(handle)


def ahead_sources_unchanged(compiled) -> bool:
    """Whether the source of every function traced into `compiled` (ours, transformers', torch's) is as it was when
    it was compiled: a function compiled by another version of any of them is stale."""
    import importlib

    from torch._dynamo.package import _hash_sourcelines

    for source in compiled.source_info().inlined_sources:
        try:
            module = importlib.import_module(source.module)
            if _hash_sourcelines(module, source.firstlineno, source.lastlineno) != source.checksum:
                return False
        except (ImportError, OSError):
            return False
    return True
