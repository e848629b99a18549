"""Tests for FVD (eval/fvd.py) and the I3D feature extractors (eval/i3d.py). CPU only, no weights."""

from pathlib import Path

import pytest
import torch

from eval.fvd import FVD, PROTOCOLS, FVDProtocol, get_protocol, preprocess, random_clips
from eval.i3d import (
    FeatureExtractor,
    InceptionI3d,
    build_i3d,
    load_i3d_state_dict,
    load_i3d_torchscript,
)


@pytest.fixture(scope="module")
def i3d():
    torch.manual_seed(0)
    return build_i3d()


class ProjectionExtractor:
    """A tiny deterministic stand-in for I3D: spatially pooled pixels times a fixed random matrix."""

    def __init__(self, dim: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(3 * 4 * 4, dim, generator=g)

    def __call__(self, videos):
        pooled = torch.nn.functional.adaptive_avg_pool3d(videos, (1, 4, 4)).flatten(1)
        return pooled @ self.proj


def small_protocol(**kw):
    base = dict(name="tiny", num_frames=4, num_clips=16, resize="squash", size=16)
    base.update(kw)
    return FVDProtocol(**base)


# ---------------------------------------------------------------- I3D architecture and loading


def test_i3d_state_dict_names_and_shapes(i3d):
    sd = i3d.state_dict()
    for key in (
        "Conv3d_1a_7x7.conv3d.weight",
        "Conv3d_1a_7x7.bn.running_var",
        "Mixed_3b.b1b.conv3d.weight",
        "Mixed_5c.b3b.bn.running_mean",
        "logits.conv3d.weight",
        "logits.conv3d.bias",
    ):
        assert key in sd, key
    assert "Conv3d_1a_7x7.conv3d.bias" not in sd  # Unit3D convs have no bias
    assert sd["Conv3d_1a_7x7.conv3d.weight"].shape == (64, 3, 7, 7, 7)
    assert sd["Mixed_5c.b0.conv3d.weight"].shape == (384, 832, 1, 1, 1)
    assert sd["Mixed_4f.b2b.conv3d.weight"].shape == (128, 32, 3, 3, 3)
    assert sd["logits.conv3d.weight"].shape == (400, 1024, 1, 1, 1)
    bn = i3d.Mixed_4b.b0.bn
    assert bn.eps == pytest.approx(1e-3) and bn.momentum == pytest.approx(0.01)
    # The inflated Inception-v1 backbone is 12.29M parameters; the 400-way classifier adds 410k.
    total = sum(p.numel() for p in i3d.parameters())
    logits = sum(p.numel() for p in i3d.logits.parameters())
    assert logits == 1024 * 400 + 400
    assert total - logits == 12_287_264
    assert total == 12_697_264


def test_state_dict_round_trip_strict(i3d, tmp_path):
    path = tmp_path / "i3d_pretrained_400.pt"
    torch.save(i3d.state_dict(), path)
    extractor = load_i3d_state_dict(path)
    assert isinstance(extractor, FeatureExtractor) and isinstance(extractor.model, InceptionI3d)
    loaded = extractor.model.state_dict()
    for key, value in i3d.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_state_dict_without_num_batches_tracked_loads(i3d, tmp_path):
    # Checkpoints saved by PyTorch < 0.4.1 (like the published ones) lack num_batches_tracked.
    sd = {k: v for k, v in i3d.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pt"
    torch.save(sd, path)
    load_i3d_state_dict(path)


def test_wrong_keys_fail_strictly(i3d, tmp_path):
    sd = dict(i3d.state_dict())
    sd["Logits.conv3d.weight"] = sd.pop("logits.conv3d.weight")
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match="Logits.conv3d.weight"):
        load_i3d_state_dict(path)


def test_i3d_forward_shapes(i3d):
    x = torch.rand(2, 3, 8, 64, 64) * 2 - 1
    with torch.no_grad():
        logits = i3d(x)
    assert logits.shape[:2] == (2, 400) and logits.ndim == 3
    feats = i3d.extract_features(x)
    assert feats.shape == (2, 400)
    assert torch.allclose(feats, logits.mean(dim=2))
    assert torch.isfinite(feats).all()


def test_missing_files_raise_with_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="i3d_pretrained_400.pt.*[Nn]othing is downloaded"):
        load_i3d_state_dict(tmp_path / "i3d_pretrained_400.pt")
    with pytest.raises(FileNotFoundError, match="StyleGAN-V"):
        load_i3d_torchscript(tmp_path / "i3d_torchscript.pt")


class _ScriptedDetector(torch.nn.Module):
    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
                return_features: bool = False) -> torch.Tensor:
        if rescale or resize or not return_features:
            raise RuntimeError("wrong detector kwargs")
        # Return per-clip mean and max so the test can see the [0, 255] input range.
        return torch.stack([x.mean(dim=(1, 2, 3, 4)), x.amax(dim=(1, 2, 3, 4)), x.amin(dim=(1, 2, 3, 4))], dim=1)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_loader(tmp_path):
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(_ScriptedDetector()), str(path))
    extractor = load_i3d_torchscript(path)
    videos = torch.zeros(2, 3, 4, 8, 8)
    videos[0] = 1.0
    videos[1, :, 0] = -1.0
    feats = extractor(videos)
    assert feats.shape == (2, 3) and feats.dtype == torch.float32
    assert feats[0].tolist() == pytest.approx([255.0, 255.0, 255.0])
    assert feats[1, 1].item() == pytest.approx(127.5) and feats[1, 2].item() == pytest.approx(0.0)


# ---------------------------------------------------------------- protocols and preprocessing


def test_protocols():
    p = get_protocol("fvd2048_16f")
    assert (p.num_frames, p.num_clips, p.resize, p.size) == (16, 2048, "squash", 224)
    assert p.value_range == (-1.0, 1.0)
    assert PROTOCOLS["videogpt_fvd2048_16f"].resize == "center_crop"
    assert get_protocol(p) is p
    with pytest.raises(ValueError, match="unknown FVD protocol"):
        get_protocol("fvd_nope")
    with pytest.raises(ValueError, match="resize"):
        FVDProtocol("bad", resize="stretch")


@pytest.mark.parametrize("resize", ["squash", "center_crop"])
def test_preprocess_shapes_and_range(resize):
    proto = FVDProtocol("p", resize=resize)
    u8 = torch.randint(0, 256, (2, 3, 48, 80, 3), dtype=torch.uint8)
    out = preprocess(u8, proto)
    assert out.shape == (2, 3, 3, 224, 224) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    fl = torch.rand(1, 3, 2, 100, 60)
    out = preprocess(fl, FVDProtocol("p01", resize=resize, value_range=(0.0, 1.0)))
    assert out.shape == (1, 3, 2, 224, 224)


def test_preprocess_values():
    # uint8 0/255 map to -1/1; float in a declared [0, 1] range maps the same way.
    u8 = torch.zeros(1, 1, 4, 4, 3, dtype=torch.uint8)
    u8[..., 0] = 255
    out = preprocess(u8, small_protocol(size=4))
    assert torch.allclose(out[0, 0], torch.ones(1, 4, 4)) and torch.allclose(out[0, 1], -torch.ones(1, 4, 4))
    fl = u8.permute(0, 4, 1, 2, 3).float() / 255
    assert torch.allclose(preprocess(fl, small_protocol(size=4, value_range=(0.0, 1.0))), out)


def test_center_crop_keeps_aspect():
    # A wide video with a bright left third: centre crop removes it, squash keeps it.
    v = -torch.ones(1, 3, 1, 224, 672)
    v[..., :224] = 1.0
    crop = preprocess(v, FVDProtocol("c", resize="center_crop"))
    squash = preprocess(v, FVDProtocol("s", resize="squash"))
    assert torch.allclose(crop, -torch.ones_like(crop))
    assert squash[..., :60].mean() > 0.9


def test_random_clips():
    video = torch.arange(20).view(20, 1, 1, 1).expand(20, 2, 2, 3)
    g = torch.Generator().manual_seed(0)
    clip = random_clips(video, 16, g)
    assert clip.shape == (16, 2, 2, 3)
    frames = clip[:, 0, 0, 0]
    assert torch.equal(frames, torch.arange(frames[0], frames[0] + 16))
    many = random_clips(torch.zeros(3, 30, 4, 4), 8, g, time_dim=1, num_clips=5)
    assert many.shape == (5, 3, 8, 4, 4)
    offsets = {int(random_clips(video, 16, g)[0, 0, 0, 0]) for _ in range(50)}
    assert len(offsets) > 1 and offsets <= set(range(5))
    with pytest.raises(ValueError, match="fewer than the 16"):
        random_clips(torch.zeros(10, 2, 2, 3), 16, g)


# ---------------------------------------------------------------- the metric


def _videos(n, seed, shift=0.0, t=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, t, 16, 16, generator=g) * 1.6 - 0.8 + shift).clamp(-1, 1)


def test_fvd_identical_sets_is_zero_and_shift_is_positive():
    proto = small_protocol()
    real = _videos(32, 1)
    m = FVD(ProjectionExtractor(), proto, batch_size=5)
    m.update(real, real=True)
    m.update(real, real=False)
    out = m.compute()
    assert out["fvd"] == pytest.approx(0.0, abs=1e-6)
    assert out == {"fvd": out["fvd"], "protocol": "tiny", "num_real": 32, "num_fake": 32}
    assert isinstance(out["fvd"], float)

    m2 = FVD(ProjectionExtractor(), proto, batch_size=7)
    m2.update(real, real=True)
    m2.update(_videos(32, 2, shift=0.3), real=False)
    shifted = m2.compute()["fvd"]
    assert shifted > 0.1
    m2.reset()
    assert len(m2.real_features) == 0 and len(m2.fake_features) == 0


def test_fvd_too_few_clips_and_frames():
    proto = small_protocol()
    m = FVD(ProjectionExtractor(), proto)
    m.update(_videos(8, 1), real=True)
    m.update(_videos(8, 2), real=False)
    with pytest.raises(ValueError, match="asks for 16 real clips, got 8"):
        m.compute()
    lenient = FVD(ProjectionExtractor(), proto, allow_fewer=True)
    lenient.update(_videos(8, 1), real=True)
    lenient.update(_videos(1, 2), real=False)
    with pytest.raises(ValueError, match="at least 2 fake clips"):
        lenient.compute()
    lenient.update(_videos(3, 3), real=False)
    assert lenient.compute()["num_fake"] == 4
    with pytest.raises(ValueError, match="needs clips of 4 frames, got 3"):
        m.update(_videos(2, 1, t=3), real=True)
    with pytest.raises(ValueError, match="random_clips"):
        m.update(_videos(2, 1, t=6), real=True)


def test_fvd_uint8_input_and_real_i3d_path(i3d):
    # The metric runs end to end with the real architecture (random weights) on small clips.
    proto = FVDProtocol("i3d_small", num_frames=8, num_clips=2, size=64)
    from eval.i3d import I3DStateDictExtractor

    m = FVD(I3DStateDictExtractor(i3d), proto, batch_size=2)
    g = torch.Generator().manual_seed(0)
    m.update(torch.randint(0, 256, (2, 8, 64, 64, 3), dtype=torch.uint8, generator=g), real=True)
    m.update(torch.randint(0, 256, (2, 8, 64, 64, 3), dtype=torch.uint8, generator=g), real=False)
    out = m.compute()
    assert out["num_real"] == 2 and out["fvd"] >= 0.0
    assert m.real_features[0].shape == (2, 400)


class _ChannelStats(torch.nn.Module):
    """A stand-in detector with StyleGAN-V's call convention: per-channel mean and std as features."""

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
                return_features: bool = False) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_eval_fvd_command_reads_shards_videos_and_models(tmp_path):
    import json

    from distill.cli import main
    from distill.data.synthetic import MovingShapes
    from distill.video import to_uint8, write_video

    detector = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(_ChannelStats()), str(detector))
    main(["data", "synth", "--out", str(tmp_path / "real"), "--num", "6", "--frames", "20"])
    (tmp_path / "fake").mkdir()
    for i in range(6):
        write_video(tmp_path / "fake" / f"{i}.mp4", to_uint8(MovingShapes(6, 16, seed=7)[i]["video"]))
    out = tmp_path / "fvd.json"
    common = ["--real", str(tmp_path / "real"), "--i3d", str(detector), "--num", "6", "--device", "cpu",
              "--out", str(out), "--append"]
    main(["eval", "fvd", "--fake", str(tmp_path / "fake"), *common])
    from distill.run import train
    from distill.config import load_job

    student = train(load_job(Path(__file__).parent / "jobs" / "tiny_dmd.toml",
                             [f"output.dir='{tmp_path / 'run'}'", "train.steps=1"]))
    main(["eval", "fvd", "--fake", str(student), *common])
    rows = json.loads(out.read_text())["rows"]
    assert [r["protocol"] for r in rows] == ["fvd2048_16f"] * 2
    assert all(r["num_real"] == 6 and r["num_fake"] == 6 for r in rows)
    assert 0 <= rows[0]["fvd"] < rows[1]["fvd"]  # real-like clips are closer than an untrained student's
    with pytest.raises(SystemExit):
        main(["eval", "fvd", "--fake", str(tmp_path / "fake"), "--real", str(tmp_path / "real"), "--device", "cpu"])
