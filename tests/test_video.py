"""Tests for distill/video.py: PyAV mp4/gif writing and reading, conversions, grids."""

import numpy as np
import pytest
av = pytest.importorskip("av")  # PyAV; absent on some GPU images
import torch

from distill.video import VideoWriter, grid, read_video, to_uint8, upscale_nearest, write_gif, write_video


def smooth_video(t=16, h=32, w=32, seed=0):
    """Gradients plus a moving soft blob: a stand-in for the tiny domain's clips."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    frames = np.empty((t, h, w, 3), np.float32)
    for i in range(t):
        cy, cx = h / 2, (i * 1.5 + seed) % w
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (w / 8) ** 2))
        frames[i, ..., 0] = 40 + 180 * xx / max(w - 1, 1)
        frames[i, ..., 1] = 40 + 150 * yy / max(h - 1, 1)
        frames[i, ..., 2] = 30 + 200 * blob
    return np.round(frames).astype(np.uint8)


def mae(a, b):
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---------------------------------------------------------------- mp4


def test_mp4_round_trip(tmp_path):
    x = smooth_video()
    path = write_video(tmp_path / "a.mp4", x, fps=8, crf=4)
    y = read_video(path)
    assert y.shape == x.shape and y.dtype == np.uint8
    assert mae(y, x) < 1.2  # measured ~0.53 (chroma siting matched, accurate swscale flags)
    with av.open(str(path)) as c:
        assert c.streams.video[0].average_rate == 8
        assert c.streams.video[0].codec_context.name == "h264"


def test_mp4_chunked_writes_and_single_frames(tmp_path):
    x = smooth_video(t=10)
    with VideoWriter(tmp_path / "b.mp4", fps=4, crf=4) as w:
        w.write(x[:4])  # a chunk, as a causal student emits them
        w.write(x[4])  # a single [H, W, 3] frame
        w.write(torch.from_numpy(x[5:]))  # uint8 tensors are accepted too
    assert w.frames_written == 10
    y = read_video(tmp_path / "b.mp4")
    assert y.shape == x.shape and mae(y, x) < 1.2


def test_mp4_readable_while_growing(tmp_path):
    x = smooth_video(t=10)
    path = tmp_path / "grow.mp4"
    w = VideoWriter(path, fps=8, crf=4, keyframe_interval=4)
    w.write(x[:3])
    with pytest.raises(ValueError, match="no frames"):
        read_video(path)  # header only: the first fragment closes at the next keyframe
    w.write(x[3:10])
    partial = read_video(path)  # fragments [0,4) and [4,8) are complete on disk
    assert partial.shape == (8, 32, 32, 3)
    assert mae(partial, x[:8]) < 1.2
    w.close()
    assert read_video(path).shape == x.shape


def test_mp4_odd_size_padded_yuv420p(tmp_path):
    x = smooth_video(t=6, h=17, w=23)
    y = read_video(write_video(tmp_path / "odd.mp4", x, fps=8, crf=4))
    assert y.shape == (6, 18, 24, 3)  # padded by one pixel at the bottom/right
    assert mae(y[:, :17, :23], x) < 1.5  # measured ~0.8
    assert mae(y[:, 17, :23], x[:, 16]) < 3  # edge replicated


def test_mp4_odd_size_exact_yuv444p(tmp_path):
    x = smooth_video(t=6, h=17, w=23)
    y = read_video(write_video(tmp_path / "odd444.mp4", x, fps=8, crf=0, pix_fmt="yuv444p"))
    assert y.shape == x.shape
    assert mae(y, x) < 1.0


# ---------------------------------------------------------------- gif


def test_gif_written_and_readable(tmp_path):
    x = smooth_video(t=8, h=17, w=23)  # odd sizes are fine for GIF
    path = write_gif(tmp_path / "a.gif", x, fps=8)
    assert path.read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    y = read_video(path)
    assert y.shape == x.shape
    assert mae(y, x) < 6.0  # 256-colour palette
    with VideoWriter(tmp_path / "b.gif", fps=4) as w:
        for frame in x:
            w.write(frame)
    assert read_video(tmp_path / "b.gif").shape == x.shape


# ---------------------------------------------------------------- conversions and grids


def test_to_uint8_layouts_and_values():
    v = torch.zeros(3, 2, 4, 5)  # [C, T, H, W]
    v[0, 0, 0, 0], v[1, 0, 0, 0], v[2, 0, 0, 0] = -1.0, 1.0, 5.0
    out = to_uint8(v)
    assert out.shape == (2, 4, 5, 3) and out.dtype == np.uint8
    assert out[0, 0, 0].tolist() == [0, 255, 255]  # clamped
    assert out[1, 1, 1].tolist() == [128, 128, 128]
    thwc = to_uint8(v.permute(1, 2, 3, 0).numpy())
    np.testing.assert_array_equal(thwc, out)
    np.testing.assert_array_equal(to_uint8(v.to(torch.bfloat16)), out)
    gray = to_uint8(torch.ones(1, 2, 4, 5))
    assert gray.shape == (2, 4, 5, 3) and (gray == 255).all()
    ambiguous = torch.zeros(3, 4, 4, 3)
    assert to_uint8(ambiguous).shape == (3, 4, 4, 3)
    assert to_uint8(ambiguous, layout="CTHW").shape == (4, 4, 3, 3)


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(3, 4, 4), torch.zeros(2, 3, 4, 4, 5), torch.zeros(4, 2, 4, 5), np.zeros((3, 2, 4, 4), np.int32)],
)
def test_to_uint8_bad_input(bad):
    with pytest.raises(ValueError):
        to_uint8(bad)


def test_to_uint8_nan_and_bad_layout():
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.full((3, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="layout"):
        to_uint8(torch.zeros(3, 1, 2, 2), layout="TCHW")


def test_grid_shape_and_placement():
    a = np.full((4, 8, 10, 3), 10, np.uint8)
    b = np.full((4, 8, 10, 3), 20, np.uint8)
    c = np.full((4, 8, 10, 3), 30, np.uint8)
    g = grid([a, b, c], nrow=2, pad=2, pad_value=255)
    assert g.shape == (4, 2 * (8 + 2) + 2, 2 * (10 + 2) + 2, 3)
    assert (g[:, 2:10, 2:12] == 10).all() and (g[:, 2:10, 14:24] == 20).all()
    assert (g[:, 12:20, 2:12] == 30).all()
    assert (g[:, 12:20, 14:24] == 255).all()  # missing tile
    assert (g[:, 0:2] == 255).all() and (g[:, :, 12:14] == 255).all()  # borders
    side_by_side = grid([a, b], nrow=2, pad=0)
    assert side_by_side.shape == (4, 8, 20, 3)


def test_grid_bad_input():
    a = np.zeros((4, 8, 10, 3), np.uint8)
    with pytest.raises(ValueError, match="same shape"):
        grid([a, np.zeros((4, 8, 12, 3), np.uint8)], nrow=2)
    with pytest.raises(ValueError):
        grid([], nrow=2)
    with pytest.raises(ValueError, match="nrow"):
        grid([a], nrow=0)
    with pytest.raises(ValueError, match="uint8"):
        grid([a.astype(np.float32)], nrow=1)


def test_upscale_nearest():
    x = smooth_video(t=2, h=4, w=5)
    up = upscale_nearest(x, 4)
    assert up.shape == (2, 16, 20, 3)
    np.testing.assert_array_equal(up[:, ::4, ::4], x)
    np.testing.assert_array_equal(up[:, 3::4, 3::4], x)
    assert upscale_nearest(x[0], 2).shape == (8, 10, 3)
    with pytest.raises(ValueError, match="factor"):
        upscale_nearest(x, 0)
    with pytest.raises(ValueError, match="factor"):
        upscale_nearest(x, 1.5)


# ---------------------------------------------------------------- errors


def test_writer_errors(tmp_path):
    x = smooth_video(t=2)
    with pytest.raises(ValueError, match="extension"):
        VideoWriter(tmp_path / "a.avi")
    with pytest.raises(ValueError, match="extension"):
        write_video(tmp_path / "a", x)
    with pytest.raises(ValueError, match="gif"):
        write_gif(tmp_path / "a.mp4", x)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "a.mp4", x.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        write_video(tmp_path / "a.mp4", x[..., :2])
    with pytest.raises(ValueError, match="fps"):
        VideoWriter(tmp_path / "a.mp4", fps=0)
    with pytest.raises(ValueError, match="crf"):
        VideoWriter(tmp_path / "a.mp4", crf=99)
    with pytest.raises(ValueError, match="pix_fmt"):
        VideoWriter(tmp_path / "a.mp4", pix_fmt="rgb24")
    w = VideoWriter(tmp_path / "c.mp4")
    w.write(x)
    with pytest.raises(ValueError, match="size changed"):
        w.write(smooth_video(t=1, h=16, w=16))
    w.close()
    w.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        w.write(x)
    with pytest.raises(ValueError, match="no frames"):
        VideoWriter(tmp_path / "empty.mp4").close()


def test_writer_does_not_mask_exceptions(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(tmp_path / "d.mp4"):
            raise RuntimeError("boom")


def test_read_errors(tmp_path):
    with pytest.raises(ValueError, match="extension"):
        read_video(tmp_path / "a.txt")
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "missing.mp4")
