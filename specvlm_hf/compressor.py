"""SpecVLM's elastic visual compressor, on the draft side only (the target always sees every visual token).

The draft's prompt inputs at image positions (its fused `fc([embedding ; feature])` vectors, width d) are
replaced by fewer vectors before they enter the draft's decoder layers, so the draft's prefill, KV cache
and attention shrink. Decoding stays lossless: only the draft's proposals change.

Branches (each reports its output token count, parameter count and FLOPs for a layout):

- `prune@r`: keep 1/r of the tokens, chosen at random (the paper's choice; a fixed seed at inference);
  `prune_norm@r`: keep the tokens of largest L2 norm (saliency);
- `pool@r`: 2-D average pooling over each patch grid with a kh x kw window, kh * kw ~ r;
- `conv@r`: depthwise 3x3 convolution with the same strides, then a pointwise linear map;
- `resampler@q`: one cross-attention layer with q learned queries;
- `text`: no visual tokens at all;
- over time, for videos (layouts with `temporal` frames; images pass unchanged): `frames@k` keeps every k-th
  frame, `tpool@k` averages each k consecutive frames, `frame_norm@r` keeps the 1/r most salient (largest norm)
  tokens of each frame. No branch mixes tokens of different videos, images, tiles or (spatially) frames.

Modes (`SpecVLMDraftConfig.compressor["mode"]`): `none`; `fixed` (one branch); `select` (default for a
compressing draft: a question-aware gate picks one branch per input, Gumbel-softmax straight-through in
training, argmax at inference); `weighted` (gate-weighted sum of prune / pool / conv at one ratio, which
produce the same token count); `concat` (several branches side by side, e.g. prune@20 + pool@20 + conv@3 +
resampler@2).

Positions: text keeps its original positions; the m compressed tokens of an image take the last m
positions of that image's original span, so the first text token after the image keeps its distance. The
draft's positions are 1-D sequence indices (the target's M-RoPE time and space indices are used only by the
target's own verify forward), so a compressed video keeps the positions of the text after it exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .hf_internals import anyres_grid

COMPRESSOR_MODES = ("none", "fixed", "select", "weighted", "concat")
DEFAULT_BRANCHES = ("prune@4", "pool@4", "conv@3", "resampler@2", "text")
DEFAULT_CONCAT = ("prune@20", "pool@20", "conv@3", "resampler@2")


# ---------------------------------------------------------------------------------------------- layouts
@dataclass
class GridSegment:
    """`rows x cols` patch tokens laid out row-major from `start` (relative to the image's first token); with
    `newline`, every row is followed by one separator token (LLaVA-NeXT's `image_newline`)."""

    start: int
    rows: int
    cols: int
    newline: bool = False

    @property
    def length(self) -> int:
        return self.rows * (self.cols + int(self.newline))


@dataclass
class VisualLayout:
    """How the visual tokens of one image (or video) are arranged: one or more patch grids. With `temporal`, the
    segments are a video's frames in time order (a `(t, h, w)` grid when they share one shape); otherwise they are
    tiles or crops of one image, which pooling over time never mixes. A video whose frames are separate spans of
    the prompt (Qwen3-VL puts each frame after its timestamp text) has one layout per frame, all with the video's
    `clip` number: the draft compresses them as one video (`join_clip`, `SpecVLMDraftModel.compress_prompt`)."""

    segments: list[GridSegment] = field(default_factory=list)
    temporal: bool = False
    clip: int | None = None  # frames of one video split over several spans share it (Qwen3-VL: text between frames)

    @property
    def num_tokens(self) -> int:
        return sum(segment.length for segment in self.segments)

    @classmethod
    def frames(cls, frames: int, rows: int, cols: int, start: int = 0) -> "VisualLayout":
        """A video's `frames x rows x cols` tokens, frame after frame, each frame row-major."""
        return cls([GridSegment(start + f * rows * cols, rows, cols) for f in range(frames)], temporal=True)

    @classmethod
    def sequence(cls, num_tokens: int) -> "VisualLayout":
        """A layout of unknown geometry: one row (1-D pooling and convolution)."""
        return cls([GridSegment(0, 1, num_tokens)])

    @classmethod
    def grid(cls, num_tokens: int) -> "VisualLayout":
        """A square grid when `num_tokens` is a square (LLaVA-1.5: 24 x 24), else one row."""
        side = math.isqrt(num_tokens)
        return cls([GridSegment(0, side, side)]) if side * side == num_tokens else cls.sequence(num_tokens)


def join_clip(layouts: list[VisualLayout]) -> VisualLayout:
    """One temporal layout over the frames of several spans (each span's tokens following the previous one's)."""
    segments, offset = [], 0
    for layout in layouts:
        segments += [GridSegment(offset + s.start, s.rows, s.cols, s.newline) for s in layout.segments]
        offset += layout.num_tokens
    return VisualLayout(segments, temporal=True, clip=layouts[0].clip)


def visual_units(layouts: list[VisualLayout]) -> list[list[int]]:
    """Indices of `layouts` grouped into what the compressor sees at once: consecutive layouts of one `clip` (a
    video split over spans) together, every other layout alone."""
    units: list[list[int]] = []
    for index, layout in enumerate(layouts):
        if units and layout.clip is not None and layouts[units[-1][-1]].clip == layout.clip:
            units[-1].append(index)
        else:
            units.append([index])
    return units


def span_counts(lengths: list[int], kept: int, per_segment: list[int] | None) -> list[int]:
    """How many of a unit's `kept` compressed tokens go to each of its spans (`lengths` tokens each). With the
    branch's per-frame counts (`Branch.segment_counts`; one segment per span), each frame's output stays in its own
    span, after its own timestamp; otherwise the tokens fill the unit's last visual positions, from the end."""
    if per_segment is not None and len(per_segment) == len(lengths) and sum(per_segment) == kept:
        if all(count <= length for count, length in zip(per_segment, lengths)):
            return list(per_segment)
    counts, left = [0] * len(lengths), kept
    for index in reversed(range(len(lengths))):
        counts[index] = min(left, lengths[index])
        left -= counts[index]
    counts[-1] += left  # more tokens than positions (a resampler's queries): the last span takes the rest
    return counts


def image_layout(target_config, num_tokens: int | None, image_size=None) -> VisualLayout:
    """The layout of one image's `num_tokens` visual tokens in a LLaVA / LLaVA-NeXT prompt (`None`: whatever the
    image's AnyRes geometry gives, for a target with `image_size`).

    LLaVA-NeXT (AnyRes): the base image's S x S grid, then the tiles' unpadded grid with a newline token after
    each row; computed with transformers' own AnyRes helpers from `image_size` (height, width).
    """
    if getattr(target_config, "model_type", None) in ("llava_next", "llava_next_video") and image_size is not None:
        vision = target_config.vision_config
        side = vision.image_size // vision.patch_size
        rows, cols = anyres_grid(target_config, image_size)
        base = GridSegment(0, side, side)
        layout = VisualLayout([base, GridSegment(base.length, rows, cols, newline=True)])
        if num_tokens is None or layout.num_tokens == num_tokens:
            return layout
    return VisualLayout.grid(num_tokens)


def window_for_ratio(ratio: float, rows: int) -> tuple[int, int]:
    """A (kh, kw) window with kh * kw ~ ratio; 1-D layouts (`rows == 1`) pool along the row only."""
    if rows == 1:
        return 1, max(1, round(ratio))
    kh = max(1, round(math.sqrt(ratio)))
    return kh, max(1, round(ratio / kh))


def pooled_count(layout: VisualLayout, ratio: float) -> int:
    """Tokens left by `pool@ratio` (and by `conv@ratio`, `prune@ratio`, which match it)."""
    total = 0
    for segment in layout.segments:
        kh, kw = window_for_ratio(ratio, segment.rows)
        total += math.ceil(segment.rows / kh) * math.ceil(segment.cols / kw)
    return total


def segment_grids(tokens: torch.Tensor, layout: VisualLayout):
    """Yields each segment's tokens as a `(d, rows, cols)` grid (newline tokens dropped)."""
    for segment in layout.segments:
        part = tokens[segment.start : segment.start + segment.length]
        part = part.view(segment.rows, segment.cols + int(segment.newline), -1)[:, : segment.cols]
        yield segment, part.permute(2, 0, 1)


# --------------------------------------------------------------------------------------------- branches
class Branch(nn.Module):
    """One way of compressing an image's visual tokens `(n, d) -> (m, d)`."""

    spec: str

    def num_tokens(self, layout: VisualLayout) -> int:
        raise NotImplementedError

    def flops(self, layout: VisualLayout, hidden: int) -> int:
        return 0

    def segment_counts(self, layout: VisualLayout) -> list[int] | None:
        """Output tokens that come from each segment of `layout`, in segment order (the output is those runs, one
        after another), or None when outputs mix segments (`prune@R`'s draw over the whole layout, a resampler)."""
        return None

    @property
    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())


class PruneBranch(Branch):
    def __init__(self, ratio: float, saliency: bool = False):
        super().__init__()
        self.ratio, self.saliency = ratio, saliency
        self.spec = f"prune_norm@{ratio:g}" if saliency else f"prune@{ratio:g}"

    def num_tokens(self, layout):
        return pooled_count(layout, self.ratio)

    def flops(self, layout, hidden):
        return 2 * layout.num_tokens * hidden if self.saliency else 0

    def forward(self, tokens, layout):
        keep = min(self.num_tokens(layout), tokens.shape[0])
        if self.saliency:
            chosen = tokens.float().norm(dim=-1).topk(keep).indices
        else:  # random, as in the paper; reproducible at inference
            generator = None if self.training else torch.Generator().manual_seed(0)
            chosen = torch.randperm(tokens.shape[0], generator=generator)[:keep].to(tokens.device)
        return tokens[chosen.sort().values]


class WindowBranch(Branch):
    """A branch that reduces each segment's grid by windows of `ratio` tokens (`window_for_ratio`): its outputs are
    each segment's pooled grid in turn."""

    ratio: float

    def num_tokens(self, layout):
        return pooled_count(layout, self.ratio)

    def segment_counts(self, layout):
        return [pooled_count(VisualLayout([segment]), self.ratio) for segment in layout.segments]


class PoolBranch(WindowBranch):
    def __init__(self, ratio: float):
        super().__init__()
        self.ratio, self.spec = ratio, f"pool@{ratio:g}"

    def flops(self, layout, hidden):
        return layout.num_tokens * hidden

    def forward(self, tokens, layout):
        out = []
        for segment, grid in segment_grids(tokens, layout):
            kh, kw = window_for_ratio(self.ratio, segment.rows)
            size = (math.ceil(segment.rows / kh), math.ceil(segment.cols / kw))
            pooled = F.adaptive_avg_pool2d(grid.float(), size).to(tokens.dtype)
            out.append(pooled.flatten(1).transpose(0, 1))
        return torch.cat(out)


class ConvBranch(WindowBranch):
    """Depthwise 3x3 convolution with stride (kh, kw), then a pointwise linear map (depthwise-separable)."""

    def __init__(self, ratio: float, hidden: int):
        super().__init__()
        self.ratio, self.spec = ratio, f"conv@{ratio:g}"
        self.depthwise = nn.Parameter(torch.zeros(hidden, 1, 3, 3))
        self.pointwise = nn.Linear(hidden, hidden)
        with torch.no_grad():  # starts as average pooling of the centre tap, then learns
            self.depthwise[:, 0, 1, 1] = 1.0
            self.pointwise.weight.copy_(torch.eye(hidden))
            self.pointwise.bias.zero_()

    def flops(self, layout, hidden):
        out = self.num_tokens(layout)
        return 2 * out * hidden * 9 + 2 * out * hidden * hidden

    def forward(self, tokens, layout):
        out = []
        for segment, grid in segment_grids(tokens, layout):
            kh, kw = window_for_ratio(self.ratio, segment.rows)
            conv = F.conv2d(
                grid[None], self.depthwise.to(grid.dtype), stride=(kh, kw), padding=1, groups=grid.shape[0]
            )
            out.append(conv[0].flatten(1).transpose(0, 1))
        return self.pointwise(torch.cat(out))


class ResamplerBranch(Branch):
    """One cross-attention layer: `num_queries` learned queries attend to all visual tokens."""

    def __init__(self, num_queries: int, hidden: int, heads: int):
        super().__init__()
        self.num_queries, self.spec = num_queries, f"resampler@{num_queries}"
        self.queries = nn.Parameter(torch.randn(num_queries, hidden) * 0.02)
        self.attention = nn.MultiheadAttention(hidden, heads, batch_first=True)

    def num_tokens(self, layout):
        return self.num_queries

    def flops(self, layout, hidden):
        n, q = layout.num_tokens, self.num_queries
        return 2 * hidden * hidden * (2 * n + 2 * q) + 4 * q * n * hidden

    def forward(self, tokens, layout):
        out, _ = self.attention(self.queries[None].to(tokens.dtype), tokens[None], tokens[None], need_weights=False)
        return out[0]


class TextOnlyBranch(Branch):
    spec = "text"

    def num_tokens(self, layout):
        return 0

    def segment_counts(self, layout):
        return [0] * len(layout.segments)

    def forward(self, tokens, layout):
        return tokens[:0]


def frame_groups(layout: VisualLayout) -> list[list[GridSegment]]:
    """The layout's segments grouped into clips that pool over time: runs of consecutive frames of one shape in a
    temporal layout; every segment alone otherwise (tiles and crops are never mixed)."""
    groups: list[list[GridSegment]] = []
    for segment in layout.segments:
        previous = groups[-1][-1] if groups else None
        same_shape = previous is not None and (previous.rows, previous.cols, previous.newline) == (
            segment.rows,
            segment.cols,
            segment.newline,
        )
        if layout.temporal and same_shape:
            groups[-1].append(segment)
        else:
            groups.append([segment])
    return groups


def _segment_tokens(tokens: torch.Tensor, segment: GridSegment) -> torch.Tensor:
    return tokens[segment.start : segment.start + segment.length]


class FrameSkipBranch(Branch):
    """`frames@k`: keeps every k-th frame of a video (frames 0, k, 2k, ...), whole; images pass unchanged."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride, self.spec = stride, f"frames@{stride:g}"

    def kept(self, layout: VisualLayout) -> list[GridSegment]:
        return [segment for group in frame_groups(layout) for segment in group[:: self.stride]]

    def num_tokens(self, layout):
        return sum(segment.length for segment in self.kept(layout))

    def segment_counts(self, layout):
        kept = {id(segment) for segment in self.kept(layout)}
        return [segment.length if id(segment) in kept else 0 for segment in layout.segments]

    def forward(self, tokens, layout):
        return torch.cat([_segment_tokens(tokens, segment) for segment in self.kept(layout)])


class TemporalPoolBranch(Branch):
    """`tpool@k`: averages each run of k consecutive frames of a video into one frame (the last run may be
    shorter); images pass unchanged."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride, self.spec = stride, f"tpool@{stride:g}"

    def num_tokens(self, layout):
        return sum(group[0].length * math.ceil(len(group) / self.stride) for group in frame_groups(layout) if group)

    def flops(self, layout, hidden):
        return layout.num_tokens * hidden

    def segment_counts(self, layout):
        """A clip of k frames pools into its last frame's place (after that frame's timestamp)."""
        counts = []
        for group in frame_groups(layout):
            for index, segment in enumerate(group):
                last = index % self.stride == self.stride - 1 or index == len(group) - 1
                counts.append(segment.length if last else 0)
        return counts

    def forward(self, tokens, layout):
        out = []
        for group in frame_groups(layout):
            for first in range(0, len(group), self.stride):
                clip = torch.stack([_segment_tokens(tokens, s) for s in group[first : first + self.stride]])
                out.append(clip.float().mean(dim=0).to(tokens.dtype))
        return torch.cat(out)


class FrameSaliencyBranch(Branch):
    """`frame_norm@r`: per-frame saliency: keeps the 1/r of each frame's (or tile's) tokens of largest L2 norm, in
    their order, so that every frame keeps some tokens and no token moves to another frame."""

    def __init__(self, ratio: float):
        super().__init__()
        self.ratio, self.spec = ratio, f"frame_norm@{ratio:g}"

    def kept_per_segment(self, segment: GridSegment) -> int:
        return max(1, math.ceil(segment.length / self.ratio))

    def num_tokens(self, layout):
        return sum(self.kept_per_segment(segment) for segment in layout.segments)

    def flops(self, layout, hidden):
        return 2 * layout.num_tokens * hidden

    def segment_counts(self, layout):
        return [self.kept_per_segment(segment) for segment in layout.segments]

    def forward(self, tokens, layout):
        out = []
        for segment in layout.segments:
            part = _segment_tokens(tokens, segment)
            chosen = part.float().norm(dim=-1).topk(self.kept_per_segment(segment)).indices
            out.append(part[chosen.sort().values])
        return torch.cat(out)


def build_branch(spec: str, hidden: int, heads: int) -> Branch:
    """A branch from its name: `prune@4`, `prune_norm@4`, `pool@9`, `conv@3`, `resampler@2`, `text`, and over
    time `frames@2` (every 2nd frame), `tpool@2` (average of 2 frames), `frame_norm@4` (per-frame saliency)."""
    if spec == "text":
        return TextOnlyBranch()
    kind, _, value = spec.partition("@")
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    kinds = ("prune", "prune_norm", "pool", "conv", "resampler", "frames", "tpool", "frame_norm")
    if number <= 0 or kind not in kinds:
        raise ValueError(
            f"unknown compressor branch {spec!r}: use prune@R, prune_norm@R, pool@R, conv@R, frame_norm@R (R >= 1), "
            "resampler@Q (Q learned queries), frames@K or tpool@K (K frames, an integer) or text"
        )
    if kind == "resampler":
        return ResamplerBranch(int(number), hidden, heads)
    if number < 1:
        raise ValueError(f"compressor branch {spec!r}: the ratio must be >= 1")
    if kind in ("frames", "tpool"):
        if number != int(number):
            raise ValueError(f"compressor branch {spec!r}: the frame stride must be an integer")
        return FrameSkipBranch(int(number)) if kind == "frames" else TemporalPoolBranch(int(number))
    if kind == "frame_norm":
        return FrameSaliencyBranch(number)
    if kind == "pool":
        return PoolBranch(number)
    if kind == "conv":
        return ConvBranch(number, hidden)
    return PruneBranch(number, saliency=kind == "prune_norm")


# ------------------------------------------------------------------------------------------ compressor
@dataclass
class CompressionResult:
    """What the compressor did to one image."""

    tokens: torch.Tensor  # (m, d)
    branch: str
    gate_probs: torch.Tensor | None = None  # (B,) soft gate probabilities (select / weighted)
    expected_fraction: torch.Tensor | None = None  # expected kept fraction of visual tokens under the gate
    log_prob: torch.Tensor | None = None  # training, select: log-probability of the drawn branch (differentiable)


class VisualCompressor(nn.Module):
    """The elastic visual compressor of a SpecVLM draft (see the module docstring).

    Args:
        settings: the draft config's `compressor` dict: `mode`, `branches`, `fixed`, `gumbel_temperature`,
            `gate_hidden`.
        hidden: LLM width d.
        heads: attention heads of the resampler.
    """

    def __init__(self, settings: dict, hidden: int, heads: int):
        super().__init__()
        self.mode = settings.get("mode", "none")
        if self.mode not in COMPRESSOR_MODES:
            raise ValueError(f"compressor mode must be one of {COMPRESSOR_MODES}, got {self.mode!r}")
        if self.mode == "fixed":
            specs = [settings.get("fixed", "pool@4")]
        elif self.mode == "concat":
            specs = list(settings.get("branches") or DEFAULT_CONCAT)
        elif self.mode == "weighted":
            ratio = settings.get("ratio", 3)
            specs = [f"prune@{ratio:g}", f"pool@{ratio:g}", f"conv@{ratio:g}"]
        elif self.mode == "select":
            specs = list(settings.get("branches") or DEFAULT_BRANCHES)
        else:
            specs = []
        self.specs = specs
        self.branches = nn.ModuleList(build_branch(spec, hidden, heads) for spec in specs)
        self.temperature = float(settings.get("gumbel_temperature", 1.0))
        if self.mode in ("select", "weighted"):
            gate_hidden = int(settings.get("gate_hidden", 256))
            self.gate = nn.Sequential(nn.Linear(hidden, gate_hidden), nn.SiLU(), nn.Linear(gate_hidden, len(specs)))
        else:
            self.gate = None

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def gate_logits(self, question: torch.Tensor) -> torch.Tensor:
        """`(B,)` branch logits from the question's pooled target features `(d,)`."""
        return self.gate(question.to(self.gate[0].weight.dtype))

    def forward(
        self, tokens: torch.Tensor, layout: VisualLayout, question: torch.Tensor | None = None
    ) -> CompressionResult:
        """Compresses one image's draft inputs `(n, d)` laid out as `layout`."""
        if self.mode == "none":
            return CompressionResult(tokens, "none")
        if self.mode == "fixed":
            return CompressionResult(self.branches[0](tokens, layout), self.specs[0])
        if self.mode == "concat":
            return CompressionResult(torch.cat([branch(tokens, layout) for branch in self.branches]), "concat")
        if question is None:
            raise ValueError("the select / weighted compressor needs the question's target features")
        logits = self.gate_logits(question)
        probs = logits.float().softmax(-1)
        counts = torch.tensor([b.num_tokens(layout) for b in self.branches], dtype=probs.dtype, device=probs.device)
        expected = (probs * counts).sum() / max(layout.num_tokens, 1)
        if self.mode == "weighted":
            mixed = sum(p.to(tokens.dtype) * branch(tokens, layout) for p, branch in zip(probs, self.branches))
            return CompressionResult(mixed, f"weighted@{self.branches[0].ratio:g}", probs, expected)
        log_prob = None
        if self.training:  # Gumbel-softmax, straight-through: run the sampled branch, keep the gate's gradient
            soft = F.gumbel_softmax(logits.float(), tau=self.temperature, hard=False)
            choice = int(soft.argmax())
            weight = 1.0 + soft[choice] - soft[choice].detach()
            # the straight-through scale alone sends the gate almost no gradient from the loss (the draft's
            # decoder layer RMS-normalises the scaled tokens, and `text` has none): the training objective adds
            # a score-function term on this log-probability (`DistillationObjective`)
            log_prob = F.log_softmax(logits.float(), -1)[choice]
        else:
            choice = int(logits.argmax())
            weight = None
        out = self.branches[choice](tokens, layout)
        if weight is not None:
            out = out * weight.to(out.dtype)
        return CompressionResult(out, self.specs[choice], probs, expected, log_prob)

    def segment_counts(self, result: CompressionResult, layout: VisualLayout) -> list[int] | None:
        """Output tokens of `result` that come from each segment of `layout` (see `Branch.segment_counts`)."""
        if self.mode == "none":
            return [segment.length for segment in layout.segments]
        if self.mode in ("fixed", "select"):
            return self.branches[self.specs.index(result.branch)].segment_counts(layout)
        return None  # weighted / concat mix branches

    def describe(self, layout: VisualLayout, hidden: int) -> list[dict]:
        """Token count, parameters and FLOPs of every branch for `layout`."""
        return [
            {
                "branch": b.spec,
                "tokens": b.num_tokens(layout),
                "parameters": b.num_parameters,
                "flops": b.flops(layout, hidden),
            }
            for b in self.branches
        ]


def image_spans(visual: torch.Tensor) -> list[tuple[int, int]]:
    """`(start, end)` of every run of True in a `(n,)` bool mask (one run per image)."""
    flags = visual.tolist()
    spans, start = [], None
    for index, flag in enumerate(flags + [False]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            spans.append((start, index))
            start = None
    return spans


def prompt_layouts(target_config, is_image: torch.Tensor, image_sizes=None) -> list[VisualLayout]:
    """One `VisualLayout` per image span of a prompt (`is_image`: `(n,)` bool over its tokens)."""
    layouts = []
    for index, (start, end) in enumerate(image_spans(is_image)):
        size = image_sizes[index].tolist() if image_sizes is not None and index < len(image_sizes) else None
        layouts.append(image_layout(target_config, end - start, size))
    return layouts


def question_features(features: torch.Tensor, real: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
    """The gate's input: the mean target feature `(d,)` over a prompt's real text tokens."""
    text = real & ~is_image
    chosen = features[text] if bool(text.any()) else features[real]
    return chosen.float().mean(dim=0)
