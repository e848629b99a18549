"""Causal students train through the trainer: ODE-pair regression and causal DMD in both modes; the CLI writes
ODE pairs, exports a streaming generator and streams it into a file."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import losses.dmd
from distill.causal import CausalWanDenoiser, chunk_steps, forcing_rollout, make_causal_student
from distill.cli import main
from distill.conditioning import Batch, Conditioning
from distill.config import ConfigError, load_job
from distill.data.shards import read_shards
from distill.run import build_model, train
from distill.stream import StreamingConfig, generator_from_model_dir
from distill.video import read_video
from teachers.wan import WanDenoiser

JOB = Path(__file__).parent / "jobs" / "tiny_causal.toml"


def test_student_settings_are_validated():
    with pytest.raises(ConfigError, match="student.chunk_frames = 3 must be >= 1 and divide data.frames = 4"):
        load_job(JOB, ["student.chunk_frames=3"])
    with pytest.raises(ConfigError, match="student.mode"):
        load_job(JOB, ["student.mode='teacher_forcing'"])
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        load_job(JOB, ["student.mode='self_forcing'", "model.gradient_checkpointing=true"])
    with pytest.raises(ConfigError, match="context_noise"):
        load_job(JOB, ["student.context_noise=1.0"])
    with pytest.raises(ConfigError, match="data.kind = 'ode_pairs'"):
        load_job(JOB, ["method.name='regression'"])
    with pytest.raises(ConfigError, match="works with method.name"):
        load_job(JOB, ["method.name='flow'"])
    with pytest.raises(ConfigError, match="would replace it"):
        load_job(JOB, ["attention.pattern='tile'"])
    with pytest.raises(ConfigError, match="rollout_frames = 6 must be 0 or a multiple of data.frames = 4"):
        load_job(JOB, ["student.mode='self_forcing'", "student.rollout_frames=6"])
    with pytest.raises(ConfigError, match="streams self-forcing rollouts for DMD"):
        load_job(JOB, ["student.rollout_frames=8"])  # diffusion forcing has no rolling window
    with pytest.raises(ConfigError, match="without a GAN term"):
        load_job(JOB, ["student.mode='self_forcing'", "student.rollout_frames=8", "method.weights={dmd=1.0, gan=0.1}"])
    with pytest.raises(ConfigError, match="student.reencode_frames = 3 must be 0 or whole chunks of 2 frames"):
        load_job(JOB, ["student.reencode_frames=3"])
    with pytest.raises(ConfigError, match="at most the window of 2 frames minus its 0 sink frames"):
        load_job(JOB, ["student.reencode_frames=4"])


def test_student_init_must_share_the_teachers_coordinate_channels(tmp_path):
    plain = WanDenoiser.load("tiny-random")
    init = plain.save_pretrained(tmp_path / "init")
    assert make_causal_student(plain, 2, str(init)).coordinate_frames == 0
    with pytest.raises(ValueError, match="coordinate_frames = 0, the teacher 4"):
        make_causal_student(plain.with_coordinates(4), 2, str(init))


def test_forcing_rollout_leaves_chunks_at_their_drawn_steps():
    model = CausalWanDenoiser.from_bidirectional(WanDenoiser.load("tiny-random"), chunk_frames=2)
    steps = chunk_steps(2, 6, 2, 3, torch.Generator().manual_seed(0))
    assert steps.shape == (2, 6) and torch.equal(steps[:, 0::2], steps[:, 1::2])
    noise = torch.randn(2, 3, 6, 16, 16)
    x, t = forcing_rollout(model, noise, Conditioning(torch.randn(2, 5, 384)), [1.0, 0.6, 0.3], steps)
    assert torch.equal(t, torch.tensor([1.0, 0.6, 0.3])[steps])
    at_start = (steps == 0)[:, None, :, None, None].expand_as(x)
    assert torch.equal(x[at_start], noise[at_start]) and not torch.equal(x[~at_start], noise[~at_start])


def test_self_forcing_stops_every_chunk_of_a_rollout_at_one_step(monkeypatch):
    """Self-Forcing (Algorithm 1) draws one exit step per rollout for all chunks, so that a rollout stopped at the
    last step is inference itself; per-chunk draws would give later chunks contexts inference never makes."""
    import losses.causal_dmd as causal_dmd
    from distill.conditioning import Batch
    from distill.config import StudentConfig

    exits = []

    def record(model, noise, *args, grad_steps, **kwargs):
        exits.append(grad_steps)
        return noise

    monkeypatch.setattr(causal_dmd, "stream_sample", record)
    method = causal_dmd.CausalDMDMethod(times=[1.0, 0.9, 0.75, 0.5],
                                        student=StudentConfig(causal=True, chunk_frames=2, mode="self_forcing"))
    batch = Batch(None, Conditioning(torch.randn(2, 5, 384)), ["a", "b"], [{}, {}], shape=(2, 3, 8, 16, 16))
    for seed in range(16):
        method.sample(None, batch, torch.Generator().manual_seed(seed), grad=False)
    assert all(len(e) == 4 and len(set(e)) == 1 for e in exits), exits
    assert {e[0] for e in exits} == {0, 1, 2, 3}  # the shared step is still drawn over the whole step list


def test_long_self_forcing_rollouts_give_one_loss_sample_per_window(monkeypatch):
    """Self-Forcing++ rollouts (``rollout_frames`` = 3 clips): each prompt's rollout streams through the rolling
    inference window and is split into training-length windows, in the order of the repeated batch's conditions,
    and every window (the rolled ones too) carries gradient into the student."""
    import losses.causal_dmd as causal_dmd
    from distill.config import DataConfig, StudentConfig

    student = CausalWanDenoiser.from_bidirectional(WanDenoiser.load("tiny-random"), chunk_frames=2)
    windows = []
    real_stream = causal_dmd.stream_sample

    def stream(model, noise, cond, *args, **kwargs):
        assert noise.shape[2] == 12 and len(cond) == 2 and kwargs["cache_frames"] == 2
        assert kwargs["context_noise"] == 0.1  # the rollout writes its cache as the exported generator will
        video = real_stream(model, noise, cond, *args, **kwargs)
        windows.append(video.detach().unflatten(2, (3, 4)))
        return video

    monkeypatch.setattr(causal_dmd, "stream_sample", stream)
    method = causal_dmd.CausalDMDMethod(times=[1.0, 0.5], data=DataConfig(frames=4, height=16, width=16),
                                        student=StudentConfig(causal=True, chunk_frames=2, mode="self_forcing",
                                                              rollout_frames=12, context_noise=0.1))
    assert method.windows == 3
    text = torch.randn(2, 5, 384)
    batch = Batch(None, Conditioning(text), ["a", "b"], [{}, {}], shape=(2, 3, 4, 16, 16)).repeat(3)
    assert batch.captions == ["a"] * 3 + ["b"] * 3 and torch.equal(batch.cond.text[3:], text[1:].expand(3, -1, -1))
    once = batch.first_of(3)  # undoes the repeat
    assert once.captions == ["a", "b"] and torch.equal(once.cond.text, text) and once.shape == (2, 3, 4, 16, 16)
    x0 = method.sample(student, batch, torch.Generator().manual_seed(0), grad=True)
    assert x0.shape == (6, 3, 4, 16, 16)
    assert torch.equal(x0.detach()[4], windows[0][1, :, 1])  # prompt "b", second window
    x0[2::3].sum().backward()  # the last (rolled) windows alone
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("mode", ["diffusion_forcing", "self_forcing"])
def test_causal_dmd_trains_and_records_the_student(tmp_path, mode):
    rollout = (["student.rollout_frames=8", "student.context_noise=0.1", "student.reencode_frames=2"]
               if mode == "self_forcing" else [])
    out = train(load_job(JOB, [f"output.dir='{tmp_path}'", f"student.mode='{mode}'", *rollout]))
    method = json.loads((out / "method.json").read_text())
    assert method["causal"] == {"chunk_frames": 2, "train_frames": 4, "mode": mode, "cache_frames": 2,
                                "sink_frames": 0, "rollout_frames": 8 if rollout else 4,
                                "context_noise": 0.1 if rollout else 0.0, "reencode_frames": 2 if rollout else 0,
                                "latent_size": [3, 16, 16]}
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any("generator/loss" in r for r in log) and any("critic/loss" in r for r in log)
    teacher = build_model(load_job(JOB)).state_dict()
    trained = WanDenoiser.from_pretrained(out).state_dict()
    assert any(not torch.equal(teacher[k], trained[k]) for k in teacher)


def test_ode_pairs_regression_export_and_stream(tmp_path, capsys, monkeypatch):
    pairs = tmp_path / "pairs"
    main(["ode-pairs", "--teacher", "tiny-random", "--out", str(pairs), "--num", "4", "--student-steps", "2",
          "--teacher-steps", "4", "--frames", "4", "--height", "16", "--width", "16", "--device", "cpu"])
    sample = next(iter(read_shards(pairs, on_error="raise")))
    assert sample["trajectory"].shape == (2, 3, 4, 16, 16)
    assert torch.equal(sample["trajectory"][0], sample["noise"])  # the first student time is t = 1
    run = tmp_path / "run"
    model = train(load_job(JOB, [f"output.dir='{run}'", "method.name='regression'", "data.kind='ode_pairs'",
                                 f"data.path='{pairs}'"]))
    assert json.loads((model / "method.json").read_text())["method"] == "regression"
    # DMD with its regression term on the same pairs (DMD's paired loss; the causal student's chunks), here with
    # self-forcing rollouts two clips long: the DMD term sees every window, the regression term each pair once
    regressed = []
    regression_loss = losses.dmd.regression_loss

    def recorded(student, batch, *args):
        regressed.append(batch.captions)
        return regression_loss(student, batch, *args)

    monkeypatch.setattr(losses.dmd, "regression_loss", recorded)
    both = tmp_path / "dmd_regression"
    train(load_job(JOB, [f"output.dir='{both}'", "data.kind='ode_pairs'", f"data.path='{pairs}'",
                         "method.weights={dmd=1.0, regression=0.5}", "student.mode='self_forcing'",
                         "student.rollout_frames=8"]))
    assert regressed and all(len(captions) == 2 for captions in regressed)  # data.batch_size, not 2 windows x 2
    log = [json.loads(line) for line in (both / "log.jsonl").read_text().splitlines()]
    assert all(r["generator/regression"] > 0 for r in log if "generator/regression" in r)
    assert any("generator/regression" in r for r in log)
    with pytest.raises(ConfigError, match="regression > 0"):
        load_job(JOB, ["method.weights={dmd=1.0, regression=0.5}"])
    gen = tmp_path / "gen"
    main(["export", "--model", str(model), "--format", "streaming", "--out", str(gen), "--sink-frames", "0"])
    assert StreamingConfig.read(gen).cache_frames == 2
    video = tmp_path / "stream.mp4"
    main(["stream", "--generator", str(gen), "--prompt", "a red circle", "--prompt", "a blue square",
          "--seconds", "1", "--out", str(video), "--device", "cpu"])
    frames = read_video(video)
    assert frames.shape == (8, 16, 16, 3) and frames.dtype == np.uint8
    assert "first chunk after" in capsys.readouterr().out


def test_window_eval_writes_causal_rows(tmp_path):
    """eval.windows at toy size: teacher and bidirectional rows on window 0, causal rows on windows 0 and 2, rolling
    and re-encoding, each without and with sink frames."""
    from eval.windows import main as windows_main

    model = WanDenoiser.load("tiny-random")
    student = model.save_pretrained(tmp_path / "student")
    (student / "method.json").write_text(json.dumps({"method": "dmd", "timesteps": [1.0, 0.5]}))
    causal = model.save_pretrained(tmp_path / "causal")
    (causal / "method.json").write_text(json.dumps({"method": "dmd", "timesteps": [1.0, 0.5], "causal": {
        "chunk_frames": 2, "train_frames": 6, "mode": "self_forcing", "latent_size": [3, 16, 16]}}))  # window: 4
    (tmp_path / "log.jsonl").write_text('{"step": 50, "sec": 30.0}\n{"step": 61, "event": "stopped", "sec": 36.6}\n')
    out = tmp_path / "causal_tiny.json"
    windows_main(["--teacher", "tiny-random", "--teacher-steps", "2", "--bidirectional", str(student),
                  "--causal", f"sf={causal}", "--windows", "0", "2", "--num", "4", "--frames", "4", "--height", "16",
                  "--width", "16", "--speed-chunks", "3", "--reencode-frames", "0", "2", "--sink-frames", "0", "2",
                  "--device", "cpu", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["window"]) for r in rows] == [("real", 0), ("real", 2), ("teacher", 0), ("bidirectional", 0),
                                                        *[("sf", 0), ("sf", 2)] * 4]
    real, causal_rows, settings = rows[:2], rows[4:6], rows[4:]
    assert [(r["reencode_frames"], r["sink_frames"]) for r in settings[::2]] == [(0, 0), (0, 2), (2, 0), (2, 2)]
    assert len({r["fvd_probe"] for r in settings[::2]}) == 1  # the window is not full before frame 4
    assert len({r["fvd_probe"] for r in settings[1::2]}) == 4  # after it, each way of making room differs
    assert all((r["train_steps"], r["train_minutes"]) == (61, 0.61) for r in settings)  # from the run's log
    assert causal_rows[1]["frames"] == [8, 12] and causal_rows[0]["video_frames"] == 12
    assert all(r["fps"] > 0 and r["first_chunk_latency_s"] > 0 and 0 <= r["accuracy"] <= 1 for r in causal_rows)
    # window 0 is compared with the real clips either way; later windows with the real videos' own window
    assert all(r["fvd_probe"] == r["fvd_probe_vs_clips"] for r in real + causal_rows if r["window"] == 0)
    assert real[1]["fvd_probe"] != real[1]["fvd_probe_vs_clips"]
    assert all(r["shape_speed"] > 0 for r in real) and "shape_speed" in rows[2] and "shape_speed" in causal_rows[1]
    assert all(r["grain"] < 0.05 for r in real) and "grain" in rows[2] and causal_rows[1]["grain"] > 0
    from eval.evaluate import load_sampler  # model directories of causal students sample chunk by chunk

    noise = torch.randn(1, 3, 6, 16, 16)
    with torch.no_grad():
        video = load_sampler(causal, torch.device("cpu"), 1.0)(Conditioning(torch.randn(1, 5, 384)), noise)
    assert video.shape == noise.shape


def test_shape_speed_follows_the_shape_and_skips_wraps():
    from eval.windows import shape_speed

    video = torch.full((2, 3, 6, 16, 16), -1.0)
    for f in range(6):
        video[0, :, f, 4:8, 2 + f:6 + f] = 1.0  # one pixel a frame to the right
        video[1, :, f, 4:8, 2:6] = 1.0  # still
    assert shape_speed(video[:1]) == pytest.approx(1.0) and shape_speed(video[1:]) == 0.0
    video[0, :, 3] = -1.0
    video[0, :, 3, 4:8, 12:16] = 1.0  # 8 pixels out and 6 back, as in a wrap: both steps left out
    assert shape_speed(video[:1], jump=6.0) == pytest.approx((1 + 1 + 1) / 3)


def test_grain_measures_the_background_noise_and_not_the_shape():
    from eval.windows import grain

    video = torch.zeros(2, 3, 4, 32, 32)
    video[:, :, :, 4:12, 4:12] = 1.0  # a shape on a plain background
    assert grain(video) == 0.0
    noisy = video + 0.05 * torch.randn(video.shape, generator=torch.Generator().manual_seed(0))
    assert grain(noisy) == pytest.approx(3 * 0.05 * (2 / math.pi) ** 0.5, rel=0.1)  # E|noise| on 3 channels


def test_a_teacher_of_long_video_windows_scores_each_rollout_window_at_its_offset(tmp_path, monkeypatch):
    """The long-video teacher end to end at toy size: flow matching on synthetic windows (``data.max_offset``)
    trains its offset channel; causal DMD with it as the real score gives every window of a self-forcing rollout
    its offset (teacher and critic), while the student, started from a model without the channel, stays without
    it; eval.windows makes the teacher's window k at its offset."""
    import teachers.wan
    from eval.windows import main as windows_main
    from teachers.wan import saved_inputs

    flow_job = Path(__file__).parent / "jobs" / "tiny_flow.toml"
    with pytest.raises(ConfigError, match="needs data.kind = 'synthetic' and model.offsets > 0"):
        load_job(flow_job, ["data.max_offset=8"])
    teacher = train(load_job(flow_job, [f"output.dir='{tmp_path / 'teacher'}'", "model.offsets=8",
                                        "data.max_offset=8", "data.batch_size=8", "train.steps=2", "optim.lr=1e-2"]))
    assert saved_inputs(teacher) == {"coordinate_frames": 0, "offset_frames": 8}
    weight = WanDenoiser.from_pretrained(teacher).transformer.patch_embedding.weight
    assert weight[:, 3:].abs().sum() > 0  # trained: some clips came from later in their videos

    seen = []
    real_channel = teachers.wan.offset_channel

    def recorded(frame_offset, like, offset_frames):
        seen.append(None if frame_offset is None else frame_offset.tolist())
        return real_channel(frame_offset, like, offset_frames)

    monkeypatch.setattr(teachers.wan, "offset_channel", recorded)
    init = build_model(load_job(flow_job)).save_pretrained(tmp_path / "init")  # in the place of a regression student
    student = train(load_job(JOB, [f"output.dir='{tmp_path / 'sf'}'", "model.family='wan'", f"model.source='{teacher}'",
                                   "data.height=32", "data.width=32", f"student.init='{init}'",
                                   "student.mode='self_forcing'", "student.rollout_frames=8"]))
    assert seen and all(offsets == [0, 4] * (len(offsets) // 2) for offsets in seen)  # 2 prompts x 2 windows
    assert any(len(offsets) == 8 for offsets in seen)  # the teacher's guided batch keeps them
    assert saved_inputs(student)["offset_frames"] == 0 and WanDenoiser.from_pretrained(student).config.in_channels == 3
    as_student = shutil.copytree(teacher, tmp_path / "teacher_as_student")
    (as_student / "method.json").write_text((student / "method.json").read_text())
    with pytest.raises(ValueError, match="does not stream"):
        generator_from_model_dir(as_student)

    out = tmp_path / "windows.json"
    windows_main(["--teacher", str(teacher), "--teacher-steps", "2", "--windows", "0", "2", "--num", "4", "--frames",
                  "4", "--device", "cpu", "--out", str(out)])
    rows = [r for r in json.loads(out.read_text())["rows"] if r["model"] == "teacher"]
    assert [r["window"] for r in rows] == [0, 2] and rows[0]["fvd_probe"] != rows[1]["fvd_probe"]
    assert [8] * 8 in seen  # window 2 of 4-frame clips starts at frame 8 (4 prompts, doubled for CFG)
