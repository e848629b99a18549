import copy
import json
from dataclasses import replace

import pytest
import torch

import teachers
from distill.conditioning import Conditioning
from distill.schedule import FlowMatching, euler_sample
from teachers.wan import WAN_PRESETS, WanDenoiser


def _cond(batch=2, length=6, dim=384, negative=True):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, -2:] = False
    neg = torch.randn(batch, length, dim, generator=g) if negative else None
    return Conditioning(torch.randn(batch, length, dim, generator=g), mask, neg, mask if negative else None)


@pytest.fixture(scope="module")
def tiny():
    return teachers.load("wan", "tiny-random")


def test_forward_shape_and_per_frame_time(tiny):
    x = torch.randn(2, 3, 4, 8, 8)
    out = tiny(x, torch.tensor([0.3, 0.7]), _cond())
    assert out.shape == x.shape
    per_frame = tiny(x, torch.tensor([[0.3] * 4, [0.7] * 4]), _cond())
    torch.testing.assert_close(per_frame, out, atol=1e-5, rtol=1e-5)
    mixed = tiny(x, torch.tensor([[0.3, 0.3, 0.9, 0.9], [0.7] * 4]), _cond())
    assert not torch.allclose(mixed[0], out[0], atol=1e-4)
    torch.testing.assert_close(mixed[1], out[1], atol=1e-5, rtol=1e-5)


def test_padded_text_tokens_are_ignored(tiny):
    x, t, cond = torch.randn(2, 3, 2, 8, 8), torch.tensor([0.5, 0.5]), _cond()
    garbage = cond.text.clone()
    garbage[:, -2:] = 100.0
    torch.testing.assert_close(tiny(x, t, Conditioning(garbage, cond.text_mask)), tiny(x, t, cond))


def test_cfg_combines_conditional_and_unconditional(tiny):
    x, t, cond = torch.randn(2, 3, 2, 8, 8), torch.tensor([0.5, 0.4]), _cond()
    c = tiny(x, t, cond)
    u = tiny(x, t, Conditioning(cond.negative_text, cond.negative_mask))
    torch.testing.assert_close(tiny.guided(x, t, cond, guidance=4.0), u + 4.0 * (c - u), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tiny.guided(x, t, cond, guidance=1.0), c)
    x0 = tiny.denoise(x, t, cond, guidance=4.0)
    torch.testing.assert_close(x0, x - t.view(-1, 1, 1, 1, 1) * (u + 4.0 * (c - u)), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="negative_text"):
        tiny.guided(x, t, _cond(negative=False), guidance=3.0)


def test_samples_from_free_form_conditioning(tiny):
    cond = _cond(batch=1)
    noise = torch.randn(1, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    video = euler_sample(lambda x, t: tiny.guided(x, t, cond, 3.0), noise, tiny.schedule, steps=4)
    assert video.shape == noise.shape and torch.isfinite(video).all()


def test_save_and_load_pretrained_directory(tiny, tmp_path):
    tiny.transformer.save_pretrained(tmp_path / "transformer")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"flow_shift": 3.0}))
    loaded = teachers.load("wan", str(tmp_path))
    assert loaded.schedule == FlowMatching(shift=3.0)
    assert list((tmp_path / "transformer").glob("*.safetensors"))
    x, t = torch.randn(1, 3, 2, 8, 8), torch.tensor([0.5])
    torch.testing.assert_close(loaded(x, t, _cond(1)), tiny(x, t, _cond(1)))


def test_sources_and_bad_input(tmp_path):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(WAN_PRESETS["tiny-random"]))
    assert isinstance(teachers.load("wan", str(config)), WanDenoiser)
    bf16 = teachers.load("wan", WAN_PRESETS["tiny-random"], dtype=torch.bfloat16)
    assert bf16.transformer.proj_out.weight.dtype == torch.bfloat16
    assert bf16.transformer.scale_shift_table.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown teacher family"):
        teachers.load("sora", "x")
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        teachers.load("wan", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown WanTransformer3DModel config keys"):
        teachers.load("wan", {**WAN_PRESETS["tiny-random"], "num_heads": 3})
    tiny = teachers.load("wan", "tiny-random")
    with pytest.raises(ValueError, match="do not fit"):
        tiny(torch.randn(1, 4, 2, 8, 8), torch.tensor([0.5]), _cond(1))
    with pytest.raises(ValueError, match="per-frame"):
        tiny(torch.randn(1, 3, 2, 8, 8), torch.zeros(1, 3), _cond(1))


def test_presets_are_the_published_sizes():
    meta = torch.device("meta")
    with meta:
        small = WanDenoiser.from_config(WAN_PRESETS["wan2.1-t2v-1.3b"], seed=None)
    params = sum(p.numel() for p in small.parameters())
    assert 1.2e9 < params < 1.5e9


def test_shipped_tiny_teacher_follows_its_background_prompt():
    """The shipped teacher (teachers/tiny) loads by name and, in a few steps, paints the prompted background."""
    from distill.text import TextEncoder

    tiny = teachers.load("tiny")
    assert tiny.schedule == FlowMatching(shift=3.0) and tiny.latent_channels == 3
    encoder = TextEncoder.from_pretrained()
    prompts = ["a small red circle moving left on a black background",
               "a small red circle moving left on a gray background"]
    text, mask = encoder.encode(prompts)
    negative, negative_mask = encoder.encode([""] * 2)
    cond = Conditioning(text, mask, negative, negative_mask)
    noise = torch.randn(2, 3, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        video = euler_sample(lambda x, t: tiny.guided(x, t, cond, 4.0), noise, tiny.schedule, steps=6)
    median = video.flatten(1).median(dim=1).values  # the background covers most pixels
    # black is -1 and gray -0.1; 6 guided steps overshoot a little, so allow a margin
    assert median[0] < -0.8
    assert -0.5 < median[1] < 0.5 and median[1] - median[0] > 0.8


def test_coordinate_channels_span_the_clip_and_saturate_past_it():
    from teachers.wan import coordinate_channels

    grid = coordinate_channels(2, 3, 4, 5, reference_frames=3, dtype=torch.float64)
    assert grid.shape == (2, 3, 3, 4, 5) and grid.dtype == torch.float64
    assert grid[1, 0, 2, 3].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]  # x across the width
    assert grid[0, 1, 1, :, 4].tolist() == pytest.approx([-1.0, -1 / 3, 1 / 3, 1.0])  # y across the height
    assert grid[0, 2, :, 2, 1].tolist() == [-1.0, 0.0, 1.0]  # frame: a training-length clip spans [-1, 1]
    later = coordinate_channels(1, 3, 4, 5, reference_frames=5, frame_offset=3)
    assert later[0, 2, :, 0, 0].tolist() == [0.5, 1.0, 1.0]  # frames past the training length stay at 1
    assert torch.equal(later[0, :2], grid[0, :2].float())
    with pytest.raises(ValueError, match="reference_frames >= 2"):
        coordinate_channels(1, 2, 4, 4, reference_frames=1)


@pytest.fixture(scope="module")
def with_coords(tiny):
    return tiny.with_coordinates(4)


def test_with_coordinates_starts_as_the_model_and_learns_from_them(tiny, with_coords):
    assert with_coords.coordinate_frames == 4 and with_coords.latent_channels == 3
    assert with_coords.config.in_channels == 6 and with_coords.config.out_channels == 3
    assert tiny.config.in_channels == 3 and tiny.coordinate_frames == 0  # the original is untouched
    x, t, cond = torch.randn(2, 3, 4, 8, 8), torch.tensor([0.9, 0.3]), _cond()
    with torch.no_grad():
        assert torch.equal(with_coords(x, t, cond), tiny(x, t, cond))  # zero-initialised: bitwise the same
        moved = copy.deepcopy(with_coords)
        moved.transformer.patch_embedding.weight[:, 3:].normal_(std=0.1)
        assert (moved(x, t, cond) - tiny(x, t, cond)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="do not fit"):
        with_coords(torch.randn(1, 6, 2, 8, 8), torch.tensor([0.5]), _cond(1))  # callers pass latents only
    with pytest.raises(ValueError, match="already"):
        with_coords.with_coordinates(4)
    with pytest.raises(ValueError, match="in_channels"):
        WanDenoiser.from_config({**WAN_PRESETS["tiny-random"], "in_channels": 3}, coordinate_frames=4)
    with pytest.raises(ValueError, match="coordinate_frames must be"):
        WanDenoiser(tiny.transformer, coordinate_frames=1)


def test_coordinates_survive_save_load_and_diffusers_export(with_coords, tmp_path):
    from distill.export import export_diffusers

    saved = with_coords.save_pretrained(tmp_path / "model")
    assert json.loads((saved / "inputs.json").read_text()) == {"coordinate_frames": 4}
    loaded = teachers.load("wan", str(saved))
    exported = export_diffusers(saved, tmp_path / "export")
    from_export = teachers.load("wan", str(exported))  # a pipeline folder: transformer/inputs.json
    x, t, weights = torch.randn(1, 3, 2, 8, 8), torch.tensor([0.5]), with_coords.state_dict()
    with torch.no_grad():
        reference = with_coords(x, t, _cond(1))
        for model in (loaded, from_export):
            assert model.coordinate_frames == 4
            state = model.state_dict()
            assert state.keys() == weights.keys() and all(torch.equal(v, weights[k]) for k, v in state.items())
            # equal weights, but CPU matmuls of freshly loaded tensors may round differently in the last bit
            torch.testing.assert_close(model(x, t, _cond(1)), reference, atol=1e-6, rtol=1e-6)
    assert "3 coordinate channels" in (exported / "README.md").read_text()
    WanDenoiser.load("tiny-random").save_pretrained(saved)  # no coordinates: no (stale) inputs.json
    assert not (saved / "inputs.json").exists() and teachers.load("wan", str(saved)).coordinate_frames == 0


def test_offset_channel_starts_as_the_model_and_reads_each_clips_offset(with_coords, tmp_path):
    """The clip-offset channel (a teacher of long-video windows): zero-initialised, so at first the model whatever
    the offset; once trained it tells clips apart by their ``cond.frame_offset``, per sample and through CFG's
    doubled batch; it survives save/load and export."""
    from distill.export import export_diffusers
    from teachers.wan import offset_channel

    windows = with_coords.with_offsets(8)
    assert (windows.offset_frames, windows.coordinate_frames, windows.latent_channels) == (8, 4, 3)
    assert windows.config.in_channels == 7 and with_coords.config.in_channels == 6
    x, t, cond = torch.randn(2, 3, 4, 8, 8), torch.tensor([0.9, 0.3]), _cond()
    later = replace(cond, frame_offset=torch.tensor([0, 4]))
    with torch.no_grad():
        assert torch.equal(windows(x, t, later), with_coords(x, t, cond))
        windows.transformer.patch_embedding.weight[:, 6:].normal_(std=0.1)
        assert torch.equal(windows(x, t, cond), with_coords(x, t, cond))  # no offsets: every clip at 0
        moved = windows(x, t, later)
        assert torch.equal(moved[0], windows(x, t, cond)[0])
        assert (moved[1] - with_coords(x, t, cond)[1]).abs().max() > 1e-3
        guided = windows.guided(x, t, later, guidance=3.0)
        single = windows.guided(x[:1], t[:1], later.index(slice(0, 1)), guidance=3.0)
        torch.testing.assert_close(guided[:1], single, atol=1e-5, rtol=1e-5)
        assert not torch.equal(guided, windows.guided(x, t, cond, guidance=3.0))
    assert torch.equal(offset_channel(torch.tensor([0, 4]), x, 8)[:, 0, 2, 3, 5], torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="frame_offset must be"):
        replace(cond, frame_offset=torch.tensor([1]))
    with pytest.raises(ValueError, match="before the offset channel"):
        WanDenoiser(windows.transformer, offset_frames=8).with_coordinates(4)
    saved = windows.save_pretrained(tmp_path / "model")
    assert json.loads((saved / "inputs.json").read_text()) == {"coordinate_frames": 4, "offset_frames": 8}
    exported = export_diffusers(saved, tmp_path / "export")
    for loaded in (teachers.load("wan", str(saved)), teachers.load("wan", str(exported))):
        assert (loaded.offset_frames, loaded.coordinate_frames) == (8, 4)
        torch.testing.assert_close(loaded(x, t, later), moved, atol=1e-6, rtol=1e-6)
    assert "frames / 8" in (exported / "README.md").read_text()


def test_job_model_coordinates_extend_or_match_the_loaded_model(tmp_path, monkeypatch):
    from distill.config import ConfigError, load_job
    from distill.run import build_model

    plain = load_job(None, ["model.source=tiny-random"])
    job = load_job(None, ["model.source=tiny-random", "model.coordinates=16"])
    model = build_model(job)
    assert model.coordinate_frames == 16 and model.config.in_channels == 6
    x, t = torch.randn(1, 3, 2, 8, 8), torch.tensor([0.5])
    with torch.no_grad():
        assert torch.equal(model(x, t, _cond(1)), build_model(plain)(x, t, _cond(1)))
    saved = str(model.save_pretrained(tmp_path / "model"))
    assert build_model(load_job(None, [f"model.source='{saved}'", "model.coordinates=16"])).coordinate_frames == 16
    assert build_model(load_job(None, [f"model.source='{saved}'"])).coordinate_frames == 16  # kept without the key
    with pytest.raises(ConfigError, match="scaled to 16 frames"):
        build_model(load_job(None, [f"model.source='{saved}'", "model.coordinates=8"]))
    monkeypatch.setitem(teachers.REGISTRY, "other", lambda source, schedule=None, dtype=None: torch.nn.Identity())
    with pytest.raises(ConfigError, match="Wan models only"):
        build_model(load_job(None, ["model.family=other", "model.source=x", "model.coordinates=16"]))
