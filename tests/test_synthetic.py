"""Tests for the synthetic moving-shapes domain (distill/data/synthetic.py)."""

import itertools
import math
import re

import numpy as np
import pytest
import torch

from distill.data.synthetic import (
    ATTRIBUTES,
    BACKGROUND_RGB,
    COLOR_RGB,
    SYNONYMS,
    MovingShapes,
    Start,
    caption,
    indices_to_labels,
    labels_to_indices,
    render,
    sample_labels,
    sample_start,
    trajectory,
)

BASE = {
    "shape": "square",
    "color": "red",
    "size": "small",
    "direction": "right",
    "speed": "slow",
    "background": "black",
    "bounce": "no",
}


def alpha_of(video: torch.Tensor, labels: dict[str, str]) -> np.ndarray:
    """Per-pixel shape coverage ``[T, H, W]``, recovered by projecting onto the background->shape colour line."""
    fg = np.asarray(COLOR_RGB[labels["color"]])[:, None, None, None]
    bg = np.asarray(BACKGROUND_RGB[labels["background"]])[:, None, None, None]
    pixels = (video.numpy() + 1.0) / 2.0
    return ((pixels - bg) * (fg - bg)).sum(0) / ((fg - bg) ** 2).sum()


def circular_centroids(alpha: np.ndarray) -> np.ndarray:
    """Per-frame (x, y) centre of mass on the torus, so a shape split by wrapping still has one centre."""
    t, h, w = alpha.shape
    out = np.empty((t, 2))
    for axis, (period, profile_axis) in enumerate(((w, 1), (h, 2))):
        profile = alpha.sum(profile_axis)  # [T, period]
        angle = 2 * np.pi * (np.arange(period) + 0.5) / period
        mean = np.arctan2(profile @ np.sin(angle), profile @ np.cos(angle))
        out[:, axis] = np.mod(mean, 2 * np.pi) * period / (2 * np.pi)
    return out


def parse(text: str) -> dict[str, set[str]]:
    """Recover the values a caption names, longest phrase first so 'dark blue' is not read as 'blue'."""
    found: dict[str, set[str]] = {a: set() for a in ATTRIBUTES}
    phrases = [(p, a, v) for a, values in SYNONYMS.items() for v, ps in values.items() for p in ps]
    for phrase, attribute, value in sorted(phrases, key=lambda x: -len(x[0])):
        pattern = r"(?<![\w-])" + re.escape(phrase) + r"(?![\w-])"
        if re.search(pattern, text):
            found[attribute].add(value)
            text = re.sub(pattern, "#", text)
    return found


def test_attribute_tables_are_consistent():
    assert set(COLOR_RGB) == set(ATTRIBUTES["color"])
    assert set(BACKGROUND_RGB) == set(ATTRIBUTES["background"])
    assert set(SYNONYMS) == set(ATTRIBUTES)
    for attribute, names in ATTRIBUTES.items():
        assert len(set(names)) == len(names) >= 2
        assert all(SYNONYMS[attribute][n] for n in names)
    for fg, bg in itertools.product(COLOR_RGB.values(), BACKGROUND_RGB.values()):
        assert np.linalg.norm(np.subtract(fg, bg)) > 0.5
    for a, b in itertools.combinations(COLOR_RGB.values(), 2):
        assert np.linalg.norm(np.subtract(a, b)) > 0.5


def test_dataset_item_is_deterministic_and_well_formed():
    ds = MovingShapes(8, frames=6, height=24, width=40, seed=3)
    a, b = ds[5], MovingShapes(8, frames=6, height=24, width=40, seed=3)[5]
    assert torch.equal(a["video"], b["video"]) and a["caption"] == b["caption"] and a["labels"] == b["labels"]
    assert a["key"] == "00000005"
    assert a["video"].shape == (3, 6, 24, 40) and a["video"].dtype == torch.float32
    assert a["video"].min() >= -1.0 and a["video"].max() <= 1.0
    assert not torch.equal(a["video"], ds[4]["video"])
    assert not torch.equal(a["video"], MovingShapes(8, frames=6, height=24, width=40, seed=4)[5]["video"])
    assert len(ds) == 8
    with pytest.raises(IndexError):
        ds[8]


def test_default_collate_batches_items():
    batch = torch.utils.data.default_collate([MovingShapes(4)[i] for i in range(4)])
    assert batch["video"].shape == (4, 3, 16, 32, 32)
    assert len(batch["caption"]) == 4 and len(batch["labels"]["shape"]) == 4


def test_render_is_deterministic_given_rng():
    labels = sample_labels(np.random.default_rng(0))
    a = render(labels, 4, 16, 16, np.random.default_rng(1))
    assert torch.equal(a, render(labels, 4, 16, 16, np.random.default_rng(1)))
    assert not torch.equal(a, render(labels, 4, 16, 16, np.random.default_rng(2)))


def test_caption_is_deterministic_and_names_every_attribute_unambiguously():
    rng = np.random.default_rng(0)
    seen = set()
    for i in range(1500):
        labels = sample_labels(rng)
        text = caption(labels, np.random.default_rng(i))
        assert text == caption(labels, np.random.default_rng(i))
        assert parse(text) == {a: {v} for a, v in labels.items()}, text
        seen.add(text)
    assert len(seen) > 1400  # templates and synonyms give variety


def test_labels_index_round_trip():
    for labels in (sample_labels(np.random.default_rng(i)) for i in range(50)):
        indices = labels_to_indices(labels)
        assert all(0 <= indices[a] < len(ATTRIBUTES[a]) for a in ATTRIBUTES)
        assert indices_to_labels(indices) == labels
    assert labels_to_indices({a: names[-1] for a, names in ATTRIBUTES.items()}) == {
        a: len(names) - 1 for a, names in ATTRIBUTES.items()
    }


@pytest.mark.parametrize("direction", ATTRIBUTES["direction"])
@pytest.mark.parametrize("speed", ATTRIBUTES["speed"])
def test_wrapping_shape_moves_the_captioned_way(direction, speed):
    labels = {**BASE, "direction": direction, "speed": speed, "shape": "circle"}
    frames, size = 12, 32
    alpha = alpha_of(render(labels, frames, size, size, np.random.default_rng(7)), labels)
    assert np.allclose(alpha.sum((1, 2)), alpha[0].sum(), rtol=0.02)  # wraps: never leaves the frame
    steps = np.diff(circular_centroids(alpha), axis=0)
    steps = np.mod(steps + size / 2, size) - size / 2  # unwrap the jump at the border
    heading = np.array({"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction.split("-")[0]])
    if "-" in direction:
        heading = heading + np.array({"left": (-1, 0), "right": (1, 0)}[direction.split("-")[1]])
    heading = heading / np.linalg.norm(heading)
    assert np.all(steps @ heading > 0)  # every frame moves forward along the heading
    across = steps @ np.array([-heading[1], heading[0]])
    assert np.all(np.abs(across) < 0.1)  # and not sideways
    distance = np.linalg.norm(steps.sum(0))
    expected_per_frame = {"slow": 0.015, "fast": 0.045}[speed] * size
    assert distance == pytest.approx(expected_per_frame * (frames - 1), rel=0.1)


def test_fast_is_faster_than_slow():
    def travel(speed: str) -> float:
        labels = {**BASE, "speed": speed}
        return float(np.ptp(trajectory(labels, Start(10.0, 10.0), 8, 32, 32)[:, 0]))

    assert travel("fast") > 2.5 * travel("slow")


@pytest.mark.parametrize("shape", ATTRIBUTES["shape"])
@pytest.mark.parametrize("direction", ["left", "up-right", "down-left"])
def test_bouncing_shape_stays_inside_and_reflects(shape, direction):
    labels = {**BASE, "shape": shape, "size": "large", "speed": "fast", "direction": direction, "bounce": "yes"}
    frames, height, width = 64, 32, 40
    video = render(labels, frames, height, width, np.random.default_rng(11))
    alpha = alpha_of(video, labels)
    mass = alpha.sum((1, 2))
    assert np.allclose(mass, mass[0], rtol=0.02)  # never cut off by a border
    r = 0.23 * min(height, width)
    cols = np.nonzero(alpha.max(1) > 0.5)
    rows = np.nonzero(alpha.max(2) > 0.5)
    for frame in range(frames):  # one compact blob per frame: never split across opposite borders
        assert np.ptp(cols[1][cols[0] == frame]) <= 2 * r
        assert np.ptp(rows[1][rows[0] == frame]) <= 2 * r
    centres = trajectory(labels, sample_start(labels, frames, height, width, np.random.default_rng(11)), frames, height, width)
    weights = alpha.sum(1)  # [T, W]; every shape is symmetric left-right about its centre
    drawn_x = weights @ (np.arange(width) + 0.5) / weights.sum(1)
    assert np.allclose(drawn_x, centres[:, 0], atol=0.05)
    assert np.all(centres >= r - 1e-9) and np.all(centres <= np.array([width, height]) - r + 1e-9)
    vx = np.diff(centres[:, 0])
    assert vx.max() > 0 > vx.min()  # the horizontal motion reverses at a wall


def test_sizes_scale_with_resolution():
    labels = {**BASE, "shape": "square", "size": "large"}
    small = alpha_of(render(labels, 1, 16, 16, np.random.default_rng(0)), labels).sum()
    big = alpha_of(render(labels, 1, 64, 64, np.random.default_rng(0)), labels).sum()
    assert big / small == pytest.approx(16, rel=0.05)
    assert render(labels, 1, 8, 8, np.random.default_rng(0)).shape == (3, 1, 8, 8)


@pytest.mark.parametrize(
    "call",
    [
        lambda: render(BASE, 0, 32, 32, np.random.default_rng(0)),
        lambda: render(BASE, 4, 7, 32, np.random.default_rng(0)),
        lambda: render(BASE, 4, 32, -1, np.random.default_rng(0)),
        lambda: render(BASE, 4.0, 32, 32, np.random.default_rng(0)),
        lambda: render({**BASE, "shape": "hexagon"}, 4, 32, 32, np.random.default_rng(0)),
        lambda: render({**BASE, "texture": "wood"}, 4, 32, 32, np.random.default_rng(0)),
        lambda: render({k: v for k, v in BASE.items() if k != "bounce"}, 4, 32, 32, np.random.default_rng(0)),
        lambda: caption({**BASE, "color": "purple"}, np.random.default_rng(0)),
        lambda: caption({**BASE, "mood": "happy"}, np.random.default_rng(0)),
        lambda: labels_to_indices({**BASE, "speed": "medium"}),
        lambda: indices_to_labels({**labels_to_indices(BASE), "color": len(ATTRIBUTES["color"])}),
        lambda: MovingShapes(0),
        lambda: MovingShapes(4, frames=0),
        lambda: MovingShapes(4, height=4),
        lambda: MovingShapes(4, seed=-1),
    ],
)
def test_bad_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_generates_many_clips():
    ds = MovingShapes(200, seed=1)
    videos = torch.stack([ds[i]["video"] for i in range(len(ds))])
    assert videos.shape == (200, 3, 16, 32, 32) and torch.isfinite(videos).all()
    assert math.isclose(float(videos.max()), 1.0, abs_tol=1e-6)


def test_every_clip_shows_its_bounce_value():
    """The shape meets a wall within the clip, so bouncing and wrapping clips always render differently."""
    rng = np.random.default_rng(5)
    for _ in range(200):
        labels = sample_labels(rng)
        other = {**labels, "bounce": "no" if labels["bounce"] == "yes" else "yes"}
        state = rng.bit_generator.state
        a = render(labels, 16, 32, 32, rng)
        rng.bit_generator.state = state
        b = render(other, 16, 32, 32, rng)
        assert (a - b).abs().amax() > 0.5, labels


def test_long_render_continues_the_clip():
    """``length`` continues the same motion: the first ``frames`` are the clip, and the centre keeps moving."""
    a = MovingShapes(4, frames=8, height=24, width=24, seed=5)[2]["video"]
    b = MovingShapes(4, frames=8, height=24, width=24, seed=5, length=20)[2]["video"]
    assert b.shape == (3, 20, 24, 24) and torch.equal(b[:, :8], a)
    assert not torch.equal(b[:, 8:16], a)
    with pytest.raises(ValueError, match="length must be >= 8"):
        MovingShapes(4, frames=8, length=4)


def test_offset_windows_are_later_frames_of_the_same_videos():
    """``max_offset``: half the items are the clips themselves (as without it), the others the same videos' frames
    ``offset`` frames later, which ``length`` renders as the continuation."""
    plain = MovingShapes(64, frames=8, height=24, width=24, seed=5)
    windows = MovingShapes(64, frames=8, height=24, width=24, seed=5, max_offset=12)
    offsets = [windows[i]["offset"] for i in range(64)]
    assert all(plain[i]["offset"] == 0 for i in range(4))
    assert 20 < offsets.count(0) < 44 and set(offsets) - {0} <= set(range(1, 13)) and len(set(offsets)) > 6
    for i, offset in enumerate(offsets[:16]):
        item, clip = windows[i], plain[i]
        assert item["caption"] == clip["caption"] and item["labels"] == clip["labels"]
        long = MovingShapes(64, frames=8, height=24, width=24, seed=5, length=8 + offset)[i]["video"]
        assert item["video"].shape == (3, 8, 24, 24) and torch.equal(item["video"], long[:, offset:])
    with pytest.raises(ValueError, match="max_offset must be >= 0"):
        MovingShapes(4, max_offset=-1)
