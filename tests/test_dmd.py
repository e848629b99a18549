import json
from pathlib import Path

import pytest
import torch

from distill.conditioning import Batch, Conditioning
from distill.config import load_job
from distill.run import train
from distill.schedule import FlowMatching, broadcast_time
from distill.students import few_step_sample, rollout, student_times
from losses.dmd import DMDMethod, dmd_loss
from teachers.base import Denoiser

JOB = Path(__file__).parent / "jobs" / "tiny_dmd.toml"


class PointMass(Denoiser):
    """The exact denoiser of data concentrated at one point ``x_star`` (plus an optional bias)."""

    def __init__(self, x_star, bias=0.0, shift=1.0):
        super().__init__(FlowMatching(shift=shift))
        self.x_star, self.bias = x_star, bias
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, cond, **kwargs):
        alpha, sigma = self.schedule.alpha_sigma(broadcast_time(t, x_t))
        x0 = (self.x_star + self.bias + 0 * self.dummy).expand_as(x_t)
        return self.schedule.target(x0, (x_t - alpha * x0) / sigma.clamp_min(1e-6), t)


def _cond(batch=2):
    return Conditioning(torch.zeros(batch, 4, 8), negative_text=torch.zeros(batch, 4, 8))


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 2, 4, 4, generator=g, requires_grad=True)
    real, fake = torch.randn(2, 3, 2, 4, 4, generator=g), torch.randn(2, 3, 2, 4, 4, generator=g)
    dmd_loss(x0, real, fake).backward()
    normaliser = (x0.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(x0.grad, (fake - real) / normaliser / x0.numel())


def test_student_times_and_point_mass_sampling():
    assert student_times(PointMass(torch.zeros(1)), 4) == [1.0, 0.75, 0.5, 0.25]
    x_star = torch.randn(2, 3, 2, 4, 4)
    net = PointMass(x_star, shift=3.0)
    times = student_times(net, 4)
    noise = torch.randn_like(x_star)
    torch.testing.assert_close(few_step_sample(net, noise, _cond(), times), x_star)
    g = torch.Generator().manual_seed(0)
    x2 = rollout(net, noise, _cond(), times, 2, g)
    eps = (x2 - (1 - times[2]) * x_star) / times[2]  # the state is x* re-noised to t_2 with unit noise
    assert abs(eps.std().item() - 1.0) < 0.25


def test_generator_loss_vanishes_when_fake_equals_real_and_points_to_teacher_otherwise():
    x_star = torch.randn(2, 3, 2, 4, 4)
    method = DMDMethod(times=[1.0, 0.5], guidance=1.0)
    batch = Batch(torch.zeros_like(x_star), _cond(), ["a", "b"], [{}, {}])
    same = {"generator": PointMass(x_star, bias=0.5), "critic": PointMass(x_star), "teacher": PointMass(x_star)}
    loss, _ = method.loss("generator", same, batch, torch.Generator().manual_seed(0))
    assert loss.item() == 0.0
    # fake score at the student's samples (x* + 0.5), real score at x*: the gradient pushes the student down
    nets = {"generator": PointMass(x_star, bias=0.5), "critic": PointMass(x_star, bias=0.5),
            "teacher": PointMass(x_star)}
    x0 = torch.full_like(x_star, 0.0, requires_grad=True)
    real, fake = nets["teacher"].denoise(x0, torch.tensor([0.5, 0.5]), batch.cond), nets["critic"].denoise(
        x0, torch.tensor([0.5, 0.5]), batch.cond)
    dmd_loss(x0 + x_star + 0.5, real, fake).backward()
    assert (x0.grad > 0).all()  # gradient descent lowers the student's output toward the teacher's x*


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown DMD loss terms"):
        DMDMethod(times=[1.0], weights={"dmd": 1.0, "gan_critic": 0.1})  # the GAN term is losses/adversarial.py's
    with pytest.raises(ValueError, match="t_min"):
        DMDMethod(times=[1.0], t_min=0.9, t_max=0.1)


def test_dmd_job_trains_student_and_critic_and_exports_the_step_list(tmp_path):
    out = train(load_job(JOB, [f"output.dir='{tmp_path}'"]))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all("critic/loss" in r and "generator/loss" in r for r in records)
    described = json.loads((out / "method.json").read_text())
    assert described["method"] == "dmd" and described["timesteps"] == [1.0, 0.75, 0.5, 0.25]
    from distill.run import build_model
    from teachers.wan import WanDenoiser

    teacher = build_model(load_job(JOB)).state_dict()
    student = WanDenoiser.from_pretrained(out).state_dict()
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)


def test_exported_student_loads_in_stock_diffusers(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    import teachers
    from distill.cli import main

    model = train(load_job(JOB, [f"output.dir='{tmp_path / 'run'}'", "train.steps=1", "schedule.shift=3.0"]))
    main(["export", "--model", str(model), "--format", "diffusers", "--out", str(tmp_path / "export")])
    transformer = WanTransformer3DModel.from_pretrained(tmp_path / "export", subfolder="transformer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "export", subfolder="scheduler")
    times = json.loads((tmp_path / "export" / "method.json").read_text())["timesteps"]
    card = (tmp_path / "export" / "README.md").read_text()
    sigmas = json.loads(card.split("set_timesteps(sigmas=")[1].split(")")[0])
    scheduler.set_timesteps(sigmas=sigmas)
    torch.testing.assert_close(scheduler.sigmas[:-1], torch.tensor(times), atol=1e-5, rtol=0)
    assert scheduler.config.stochastic_sampling
    ours = teachers.load("wan", str(tmp_path / "export"))
    assert ours.schedule.shift == 3.0
    original = ours.transformer.state_dict()
    assert all(torch.equal(v, transformer.state_dict()[k]) for k, v in original.items())


def test_demo_runs_end_to_end_at_toy_size(tmp_path, capsys):
    from distill.cli import main

    main(["demo", "--steps", "1", "--num", "2", "--num-teacher", "2", "--teacher-steps", "2", "--device", "cpu", "--out", str(tmp_path),
          "--set", "data.frames=4"])
    printed = capsys.readouterr().out
    assert "student (4 steps)" in printed and "naive (4 steps)" in printed and "teacher (2 steps)" in printed
    assert (tmp_path / "teacher_naive_student.gif").stat().st_size > 0
    assert (tmp_path / "student" / "transformer" / "config.json").is_file()


def test_eval_reports_teacher_naive_and_student_rows(tmp_path):
    from distill.cli import main
    from distill.students import step_subset

    assert step_subset([1.0, 0.75, 0.5, 0.25], 2) == [1.0, 0.5] and step_subset([1.0, 0.75, 0.5, 0.25], 1) == [1.0]
    with pytest.raises(ValueError, match="evenly spaced"):
        step_subset([1.0, 0.75, 0.5, 0.25], 3)
    model = train(load_job(JOB, [f"output.dir='{tmp_path / 'run'}'", "train.steps=1"]))
    out = tmp_path / "results.json"
    main(["eval", "--teacher", "tiny-random", "--steps", "2", "1", "--student", str(model), "--student-steps", "4", "1",
          "--num", "4", "--batch-size", "4", "--frames", "4", "--out", str(out), "--device", "cpu"])
    record = json.loads(out.read_text())
    assert [(r["model"], r["method"], r["steps"]) for r in record["rows"]] == [
        ("teacher", "flow", 2), ("naive", "flow", 1), ("student", "dmd", 4), ("student", "dmd", 1)]
    assert all(0 <= r["accuracy"] <= 1 and r["num_videos"] == 4 for r in record["rows"])
    assert {"command", "git_commit", "device", "date", "notes"} <= set(record)


def test_critic_features_are_the_middle_block_tokens():
    import teachers

    net = teachers.load("wan", "tiny-random")
    x, t, cond = torch.randn(2, 3, 2, 8, 8), torch.tensor([0.3, 0.6]), Conditioning(torch.randn(2, 4, 384))
    seen = []
    handle = net.transformer.blocks[1].register_forward_hook(lambda m, a, out: seen.append(out))
    full = net(x, t, cond)
    handle.remove()
    tokens = net.features(x, t, cond)
    assert tokens.shape == (2, 2 * 4 * 4, net.feature_dim)
    torch.testing.assert_close(tokens, seen[0])
    torch.testing.assert_close(net(x, t, cond), full)  # the hook is gone
