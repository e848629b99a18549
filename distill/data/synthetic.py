"""Procedural moving-shapes text-to-video domain.

The tiny teacher is trained on it in pixel space, and a probe classifier trained on the same labels
checks that generated videos follow their prompts. Every attribute is therefore chosen to stay
visually distinct at 32x32, every caption names every attribute unambiguously, and a clip is a pure
function of its labels, start state and geometry so that ``MovingShapes[i]`` is reproducible.

Geometry: pixel ``j`` covers ``[j, j + 1)``; positions are float pixel coordinates ``(x, y)`` with
``y`` pointing down. Sizes and speeds are fractions of ``min(height, width)`` so they scale with
resolution. ``direction`` is the initial heading (a bouncing shape reverses at the walls).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "cross"),
    "color": ("red", "green", "blue", "yellow", "magenta", "cyan", "white"),
    "size": ("small", "large"),
    "direction": ("left", "right", "up", "down", "up-left", "up-right", "down-left", "down-right"),
    "speed": ("slow", "fast"),
    "background": ("black", "gray", "navy"),
    "bounce": ("yes", "no"),
}
"""Ordered class names per attribute; the index of a name is its class id (see labels_to_indices)."""

COLOR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.9, 0.1),
    "blue": (0.15, 0.35, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "magenta": (1.0, 0.1, 1.0),
    "cyan": (0.1, 0.9, 1.0),
    "white": (1.0, 1.0, 1.0),
}
"""Shape colours in [0, 1]; the blue is light enough to stand out on navy."""

BACKGROUND_RGB: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "gray": (0.45, 0.45, 0.45),
    "navy": (0.0, 0.0, 0.3),
}
"""Background colours in [0, 1], each far from every shape colour."""

MIN_RESOLUTION = 8
"""Smallest height/width that still draws a recognisable shape."""

_SIZE_FRACTION = {"small": 0.13, "large": 0.23}  # half-extent of the shape's bounding box
_SPEED_FRACTION = {"slow": 0.015, "fast": 0.045}  # pixels per frame
_CROSS_ARM = 0.35  # half-thickness of a cross arm, relative to the half-extent
_DIAGONAL = 1.0 / math.sqrt(2.0)
_HEADING = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-left": (-_DIAGONAL, -_DIAGONAL),
    "up-right": (_DIAGONAL, -_DIAGONAL),
    "down-left": (-_DIAGONAL, _DIAGONAL),
    "down-right": (_DIAGONAL, _DIAGONAL),
}

# Caption grammar: a slot is a grammatical form of one attribute, with its phrases per value.
_SLOTS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "size": ("size", {"small": ("small", "tiny", "little"), "large": ("large", "big")}),
    "color": ("color", {c: (c,) for c in ATTRIBUTES["color"]}),
    "shape": (
        "shape",
        {
            "circle": ("circle", "disc", "ball"),
            "square": ("square", "box"),
            "triangle": ("triangle",),
            "cross": ("cross", "plus sign"),
        },
    ),
    "speed_adj": ("speed", {"slow": ("slow", "slow-moving"), "fast": ("fast", "quick", "speedy")}),
    "speed_adv": (
        "speed",
        {"slow": ("slowly", "at a slow pace"), "fast": ("quickly", "rapidly", "at a fast pace")},
    ),
    "direction": (
        "direction",
        {
            "left": ("left", "to the left", "leftward"),
            "right": ("right", "to the right", "rightward"),
            "up": ("up", "upward", "upwards"),
            "down": ("down", "downward", "downwards"),
            "up-left": ("up and to the left", "toward the top left", "diagonally up-left"),
            "up-right": ("up and to the right", "toward the top right", "diagonally up-right"),
            "down-left": ("down and to the left", "toward the bottom left", "diagonally down-left"),
            "down-right": ("down and to the right", "toward the bottom right", "diagonally down-right"),
        },
    ),
    "background": ("background", {"black": ("black",), "gray": ("gray", "grey"), "navy": ("navy", "dark blue")}),
    "bounce_ing": (
        "bounce",
        {
            "yes": ("bouncing off the walls", "bouncing off the edges"),
            "no": ("wrapping around the edges", "wrapping around the frame"),
        },
    ),
    "bounce_s": (
        "bounce",
        {
            "yes": ("bounces off the walls", "bounces off the edges"),
            "no": ("wraps around the edges", "wraps around the frame"),
        },
    ),
}

_TEMPLATES: tuple[str, ...] = (
    "a {size} {color} {shape} moving {direction} {speed_adv} on a {background} background, {bounce_ing}",
    "a {speed_adj} {size} {color} {shape} heading {direction} over a {background} background, {bounce_ing}",
    "on a {background} background, a {size} {color} {shape} moves {speed_adv} {direction}, {bounce_ing}",
    "a {size} {color} {shape} {bounce_s} as it travels {direction} {speed_adv} across a {background} background",
    "a {speed_adj} {color} {shape}, {size}, goes {direction} over {background} and {bounce_s}",
)


def _synonyms() -> dict[str, dict[str, tuple[str, ...]]]:
    """Merge the grammatical forms of each attribute into one phrase table."""
    table: dict[str, dict[str, tuple[str, ...]]] = {a: {v: () for v in vs} for a, vs in ATTRIBUTES.items()}
    for attribute, phrases in _SLOTS.values():
        for value, options in phrases.items():
            table[attribute][value] += options
    return table


SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = _synonyms()
"""Every phrase a caption may use for each attribute value (for tests and caption parsers)."""


class Start(NamedTuple):
    """Centre of the shape's bounding box at frame 0, in pixels."""

    x: float
    y: float


def _check_int(name: str, value: int, minimum: int) -> int:
    """Reject non-integers and values below ``minimum`` with a message naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_geometry(frames: int, height: int, width: int) -> None:
    """Validate clip geometry: at least one frame and a drawable resolution."""
    _check_int("frames", frames, 1)
    _check_int("height", height, MIN_RESOLUTION)
    _check_int("width", width, MIN_RESOLUTION)


def _check_labels(labels: Mapping[str, str]) -> None:
    """Require exactly the attributes of ATTRIBUTES, each with a known value."""
    unknown = sorted(set(labels) - set(ATTRIBUTES))
    missing = [a for a in ATTRIBUTES if a not in labels]
    if unknown or missing:
        raise ValueError(f"labels: unknown attributes {unknown}, missing attributes {missing}")
    for attribute, value in labels.items():
        if value not in ATTRIBUTES[attribute]:
            raise ValueError(f"labels[{attribute!r}] = {value!r}; expected one of {ATTRIBUTES[attribute]}")


def labels_to_indices(labels: Mapping[str, str]) -> dict[str, int]:
    """Class ids per attribute, in the order of ATTRIBUTES, for classifier targets."""
    _check_labels(labels)
    return {a: ATTRIBUTES[a].index(labels[a]) for a in ATTRIBUTES}


def indices_to_labels(indices: Mapping[str, int]) -> dict[str, str]:
    """Inverse of labels_to_indices, e.g. to caption a classifier's predictions."""
    unknown = sorted(set(indices) - set(ATTRIBUTES))
    missing = [a for a in ATTRIBUTES if a not in indices]
    if unknown or missing:
        raise ValueError(f"indices: unknown attributes {unknown}, missing attributes {missing}")
    labels = {}
    for attribute, names in ATTRIBUTES.items():
        index = indices[attribute]
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(names):
            raise ValueError(f"indices[{attribute!r}] = {index!r}; expected an int in [0, {len(names)})")
        labels[attribute] = names[index]
    return labels


def sample_labels(rng: np.random.Generator) -> dict[str, str]:
    """Draw every attribute uniformly and independently."""
    return {a: names[int(rng.integers(len(names)))] for a, names in ATTRIBUTES.items()}


def _half_extent(size: str, height: int, width: int) -> float:
    """Half the side of the shape's bounding box in pixels."""
    return _SIZE_FRACTION[size] * min(height, width)


def sample_start(
    labels: Mapping[str, str], frames: int, height: int, width: int, rng: np.random.Generator
) -> Start:
    """Draw a frame-0 position where the whole shape is visible and its box meets a wall during the clip.

    The meeting happens at a random frame in the first half of the clip (so that what follows it, a
    reflection or a wrap, is in view): ``bounce`` is then visible in every clip. One axis of the heading
    (either, for a diagonal) is placed to meet its wall; the other is drawn uniformly.
    """
    _check_labels(labels)
    _check_geometry(frames, height, width)
    r = _half_extent(labels["size"], height, width)
    extent = np.array([width, height], dtype=np.float64)
    heading = np.asarray(_HEADING[labels["direction"]])
    speed = _SPEED_FRACTION[labels["speed"]] * min(height, width)
    start = rng.uniform(r, extent - r)
    axis = int(rng.choice(np.flatnonzero(heading)))
    contact = rng.uniform(0.15, 0.5) * (frames - 1)
    travel = min(abs(heading[axis]) * speed * contact, extent[axis] - 2.0 * r)
    start[axis] = extent[axis] - r - travel if heading[axis] > 0 else r + travel
    return Start(x=float(start[0]), y=float(start[1]))


def trajectory(labels: Mapping[str, str], start: Start, frames: int, height: int, width: int) -> np.ndarray:
    """Per-frame centres ``[frames, 2]`` as (x, y) pixels.

    Motion is straight at constant speed; a bouncing shape is reflected so its bounding box stays
    inside the frame, otherwise positions wrap around (the frame is a torus).
    """
    _check_labels(labels)
    _check_geometry(frames, height, width)
    scale = min(height, width)
    velocity = np.asarray(_HEADING[labels["direction"]]) * _SPEED_FRACTION[labels["speed"]] * scale
    free = np.asarray(start, dtype=np.float64) + np.arange(frames)[:, None] * velocity
    extent = np.array([width, height], dtype=np.float64)
    if labels["bounce"] == "no":
        return np.mod(free, extent)
    r = _half_extent(labels["size"], height, width)
    span = extent - 2.0 * r  # range of the centre; positive because the shape is under half the frame
    return r + span - np.abs(np.mod(free - r, 2.0 * span) - span)


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance in pixels (negative inside) to a shape filling the box ``[-r, r]^2``.

    Exact along straight edges, which is all one pixel of anti-aliasing needs.
    """
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return np.maximum(ax, ay) - r
    if shape == "triangle":  # apex (0, -r), base corners (+-r, r): pointing up
        return np.maximum((2.0 * ax - dy - r) / math.sqrt(5.0), dy - r)
    w = _CROSS_ARM * r  # cross: union of a horizontal and a vertical bar
    return np.minimum(np.maximum(ax - r, ay - w), np.maximum(ax - w, ay - r))


def _offsets(coords: np.ndarray, centres: np.ndarray, period: int, wrap: bool) -> np.ndarray:
    """Pixel-centre offsets from each frame's centre, ``[T, N]``; shortest way round on a torus."""
    d = coords[None, :] - centres[:, None]
    return np.mod(d + period / 2.0, period) - period / 2.0 if wrap else d


def _rasterise(labels: Mapping[str, str], centres: np.ndarray, height: int, width: int) -> torch.Tensor:
    """Draw all frames at once with broadcast coordinate grids; returns ``[3, T, H, W]`` in [-1, 1]."""
    wrap = labels["bounce"] == "no"
    xs = np.arange(width, dtype=np.float32) + 0.5
    ys = np.arange(height, dtype=np.float32) + 0.5
    dx = _offsets(xs, centres[:, 0].astype(np.float32), width, wrap)[:, None, :]
    dy = _offsets(ys, centres[:, 1].astype(np.float32), height, wrap)[:, :, None]
    r = _half_extent(labels["size"], height, width)
    alpha = np.clip(0.5 - _signed_distance(labels["shape"], dx, dy, r), 0.0, 1.0)  # [T, H, W]
    fg = np.asarray(COLOR_RGB[labels["color"]], dtype=np.float32)[:, None, None, None]
    bg = np.asarray(BACKGROUND_RGB[labels["background"]], dtype=np.float32)[:, None, None, None]
    video = (bg + (fg - bg) * alpha[None]) * 2.0 - 1.0
    return torch.from_numpy(np.ascontiguousarray(video, dtype=np.float32))


def render(
    labels: Mapping[str, str], frames: int, height: int, width: int, rng: np.random.Generator,
    length: int | None = None,
) -> torch.Tensor:
    """Render a clip as float32 ``[3, length, height, width]`` in [-1, 1] (diffusers' [C, T, H, W]).

    The start position is drawn from ``rng`` for a clip of ``frames`` (its wall contact in the first half);
    everything else follows from the labels. ``length`` (default ``frames``) continues the same motion past the
    clip: the real counterpart of a video streamed beyond the training length, whose first ``frames`` are the clip.
    """
    start = sample_start(labels, frames, height, width, rng)
    return render_from(labels, start, length or frames, height, width)


def render_from(labels: Mapping[str, str], start: Start, length: int, height: int, width: int,
                offset: int = 0) -> torch.Tensor:
    """Frames ``offset .. offset + length - 1`` of the video that starts at ``start`` (see :func:`render`)."""
    centres = trajectory(labels, start, offset + length, height, width)[offset:]
    return _rasterise(labels, centres, height, width)


def caption(labels: Mapping[str, str], rng: np.random.Generator) -> str:
    """Describe the clip with a random template and random synonyms, naming every attribute once."""
    _check_labels(labels)
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    phrases = {}
    for slot in re.findall(r"{(\w+)}", template):
        attribute, options = _SLOTS[slot]
        choices = options[labels[attribute]]
        phrases[slot] = choices[int(rng.integers(len(choices)))]
    return template.format(**phrases)


class MovingShapes(torch.utils.data.Dataset):
    """``num`` clips where item ``i`` depends only on ``(seed, i)``: reproducible across workers and runs.
    ``length > frames`` continues each clip's motion to ``length`` frames (see :func:`render`).

    ``max_offset > 0``: windows of long videos. Half the items are the clip itself (offset 0), the others the
    ``frames`` frames that follow ``offset`` frames later in the same video, ``offset`` uniform in
    ``1 .. max_offset``; the item's ``offset`` says which (its caption still describes the video's opening). A
    teacher trained on them with the offset as input knows later windows (``teachers.wan.offset_channel``)."""

    def __init__(self, num: int, frames: int = 16, height: int = 32, width: int = 32, seed: int = 0,
                 length: int | None = None, max_offset: int = 0) -> None:
        self.num = _check_int("num", num, 1)
        _check_geometry(frames, height, width)
        self.frames, self.height, self.width = int(frames), int(height), int(width)
        self.length = _check_int("length", length, self.frames) if length is not None else self.frames
        self.seed = _check_int("seed", seed, 0)
        self.max_offset = _check_int("max_offset", max_offset, 0)

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str | dict[str, str]]:
        if not 0 <= index < self.num:
            raise IndexError(f"index {index} out of range for MovingShapes of length {self.num}")
        rng = np.random.default_rng([self.seed, int(index)])
        labels = sample_labels(rng)
        start = sample_start(labels, self.frames, self.height, self.width, rng)
        text = caption(labels, rng)  # drawn before the offset: items without offsets are what they always were
        offset = int(rng.integers(1, self.max_offset + 1)) if self.max_offset and rng.random() < 0.5 else 0
        video = render_from(labels, start, self.length, self.height, self.width, offset)
        return {"video": video, "caption": text, "labels": labels, "key": f"{index:08d}", "offset": offset}
