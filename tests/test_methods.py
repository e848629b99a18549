"""Consistency distillation, the adversarial term, their combinations through job weights, and the method comparison."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file, save_model

import teachers
from distill.conditioning import Batch, Conditioning
from distill.config import ConfigError, load_job
from distill.run import train
from distill.schedule import FlowMatching, VPSchedule
from distill.students import few_step_sample, student_times
from losses.adversarial import Adversarial, WithGAN, discriminator_objective, generator_objective
from losses.consistency import ConsistencyMethod, phase_draw, pseudo_huber
from losses.dmd import DMDMethod
from tests.test_dmd import PointMass

TESTS = Path(__file__).parent / "jobs"
JOBS = Path(__file__).parents[1] / "jobs"


def _cond(batch=2, dim=8):
    return Conditioning(torch.randn(batch, 4, dim), negative_text=torch.zeros(batch, 4, dim))


@pytest.mark.parametrize("schedule", [FlowMatching(), VPSchedule()])
def test_renoise_is_the_forward_process_from_a_lower_level(schedule):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 16, 16, generator=g)
    e1, e2 = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    # from t = 0 it is add_noise (a VP schedule's t = 0 keeps a trace of noise, hence the tolerance)
    torch.testing.assert_close(schedule.renoise(x0, 0.0, 0.7, e2), schedule.add_noise(x0, e2, 0.7), atol=2e-3, rtol=0)
    x_s = schedule.add_noise(x0, e1, torch.tensor([0.3, 0.3]))
    x_t = schedule.renoise(x_s, torch.tensor([0.3, 0.3]), torch.tensor([0.8, 0.8]), e2)
    alpha, sigma = schedule.alpha_sigma(torch.tensor(0.8))
    residual = (x_t - alpha * x0) / sigma  # unit Gaussian if the marginal at 0.8 is right
    assert abs(residual.mean().item()) < 0.05 and abs(residual.std().item() - 1) < 0.05


def test_phase_draw_stays_inside_each_phase():
    j, j_next, edge = phase_draw(12, 3, 2, 2000, torch.Generator().manual_seed(0))
    assert set(edge.tolist()) == {4, 8, 12}
    assert ((edge - 4 <= j) & (j < edge) & (j < j_next) & (j_next <= edge) & (j_next <= j + 2)).all()
    assert (j_next == edge).any() and (j_next < edge).any()


def test_consistency_loss_vanishes_on_an_exact_trajectory_and_not_for_a_biased_student():
    x_star = torch.randn(1, 3, 2, 4, 4)  # one point for the whole (CFG-doubled) batch
    grid = FlowMatching(shift=3.0).timesteps(8).tolist()
    method = ConsistencyMethod(grid=grid, phases=4, skip=2, guidance=3.0, distance="l2")
    assert method.times == pytest.approx(student_times(PointMass(x_star, shift=3.0), 4))
    batch = Batch(x_star.expand(2, -1, -1, -1, -1).clone(), _cond(), ["a", "b"], [{}, {}])
    exact = {"generator": PointMass(x_star, shift=3.0), "target": PointMass(x_star, shift=3.0),
             "teacher": PointMass(x_star, shift=3.0)}
    for seed in range(3):
        loss, logs, out, s = method.generator_loss(exact, batch, torch.Generator().manual_seed(seed))
        assert loss.item() < 1e-10 and set(s.tolist()) <= set(grid[2::2])
    biased = {**exact, "generator": PointMass(x_star, bias=0.3, shift=3.0)}
    assert method.loss("generator", biased, batch, torch.Generator().manual_seed(0))[0].item() > 1e-3
    assert pseudo_huber(torch.zeros(3), torch.full((3,), 4.0), c=1.0).item() == pytest.approx(17**0.5 - 1)


class Recording(PointMass):
    """A point mass that records its inputs: on a point mass every consistency target is exact, so only the calls
    show where the target is read and which network gets CFG."""

    def __init__(self, x_star):
        super().__init__(x_star, shift=3.0)
        self.calls = []

    def forward(self, x_t, t, cond, **kwargs):
        self.calls.append((x_t.clone(), torch.as_tensor(t).clone()))
        return super().forward(x_t, t, cond, **kwargs)


def test_consistency_target_is_read_after_one_guided_teacher_step_clipped_at_the_edge():
    x_star, n = torch.randn(1, 3, 2, 4, 4), 16
    grid = FlowMatching(shift=3.0).timesteps(8).tolist()
    method = ConsistencyMethod(grid=grid, phases=2, skip=3, guidance=3.0, distance="l2")
    nets = {name: Recording(x_star) for name in ("generator", "target", "teacher")}
    batch = Batch(x_star.expand(n, -1, -1, -1, -1).clone(), _cond(n), ["a"] * n, [{}] * n)
    method.generator_loss(nets, batch, torch.Generator().manual_seed(0))
    j, j_next, edge = phase_draw(8, 2, 3, n, torch.Generator().manual_seed(0))  # the draw _start makes first
    assert (j_next == edge).any() and (j_next < edge).any()
    times = torch.tensor(grid)
    (x_cfg, t_cfg), = nets["teacher"].calls  # one CFG call: conditional and unconditional halves
    (x_t, t), = nets["generator"].calls  # the student: no CFG, at (x_t, t)
    (x_next, t_next), = nets["target"].calls  # the EMA target: no CFG, one teacher step later
    assert x_cfg.shape[0] == 2 * n and x_t.shape[0] == n and x_next.shape[0] == n
    torch.testing.assert_close(t, times[j])
    torch.testing.assert_close(t_cfg, torch.cat([t, t]))
    torch.testing.assert_close(t_next, times[j_next])  # skip intervals toward t = 0, clipped at the phase edge
    teacher = nets["teacher"]
    torch.testing.assert_close(x_next, teacher.schedule.step(x_t, t, t_next, teacher.guided(x_t, t, _cond(n), 3.0)))


def test_phased_student_samples_deterministically_along_its_ode():
    x_star = torch.randn(2, 3, 2, 4, 4)
    net, noise = PointMass(x_star, shift=3.0), torch.randn(2, 3, 2, 4, 4)
    torch.testing.assert_close(few_step_sample(net, noise, _cond(), [1.0, 0.75, 0.5, 0.25], deterministic=True),
                               x_star)


def test_features_of_several_blocks_match_the_blocks_outputs():
    net = teachers.load("wan", "tiny-random")
    x, t, cond = torch.randn(2, 3, 2, 8, 8), torch.tensor([0.3, 0.6]), Conditioning(torch.randn(2, 4, 384))
    seen = []
    handles = [b.register_forward_hook(lambda m, a, out: seen.append(out)) for b in net.transformer.blocks]
    net(x, t, cond)
    for h in handles:
        h.remove()
    first, last = net.features(x, t, cond, [0, -1])
    torch.testing.assert_close(first, seen[0])
    torch.testing.assert_close(last, seen[1])
    torch.testing.assert_close(net.features(x, t, cond, [None])[0], net.features(x, t, cond))
    with pytest.raises(ValueError, match="out of range: this model has 2 blocks"):
        net.features(x, t, cond, [2])


def test_gan_objectives():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert discriminator_objective(real, fake, "hinge").item() == pytest.approx(0.25 + 0.75)
    assert generator_objective(fake, "hinge").item() == pytest.approx(0.75)
    ns = discriminator_objective(real, fake, "non_saturating")
    softplus = torch.nn.functional.softplus
    assert ns.item() == pytest.approx((softplus(-real).mean() + softplus(fake).mean()).item())
    with pytest.raises(ValueError, match="unknown GAN loss"):
        generator_objective(fake, "wasserstein")


@pytest.mark.parametrize("backbone", ["teacher", "critic"])
def test_gan_roles_train_only_their_own_parameters(backbone):
    teacher = teachers.load("wan", "tiny-random")
    gan = Adversarial(backbone=backbone, layers=[0, 1], r1_weight=10.0)
    method = WithGAN(DMDMethod(times=[1.0, 0.5], guidance=2.0), gan, 0.5, "dmd+gan")
    assert method.roles == ("critic", "discriminator", "generator")
    trainable, frozen_nets = method.networks(teacher)
    frozen_nets["teacher"].requires_grad_(False)
    nets = {**trainable, **frozen_nets}
    batch = Batch(torch.rand(2, 3, 2, 8, 8) * 2 - 1, _cond(dim=384), ["a", "b"], [{}, {}])
    loss, logs = method.loss("discriminator", nets, batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert logs["r1"] > 0 and all(p.grad is not None for p in nets["discriminator"].parameters())
    assert all(p.grad is None for name in ("generator", "critic") for p in nets[name].parameters())
    assert all(p.requires_grad for p in nets["critic"].parameters())
    nets["discriminator"].zero_grad(set_to_none=True)
    loss, logs = method.loss("generator", nets, batch, torch.Generator().manual_seed(1))
    loss.backward()
    assert "gan" in logs and "real_fake_gap" in logs
    assert all(p.grad is None for name in ("discriminator", "critic") for p in nets[name].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets["generator"].parameters())
    with pytest.raises(ValueError, match="needs real clips"):
        method.loss("discriminator", nets, Batch(None, batch.cond, ["a", "b"], [{}, {}], (2, 3, 2, 8, 8)),
                    torch.Generator())


def test_method_settings_are_checked():
    import losses

    with pytest.raises(ConfigError, match="teacher_steps .* multiple of method.student_steps"):
        load_job(TESTS / "tiny_cd.toml", ["method.student_steps=3"])
    with pytest.raises(ConfigError, match="lpips_path"):
        load_job(TESTS / "tiny_cd.toml", ["method.weights={cd=1.0, lpips=0.5}"])
    with pytest.raises(ConfigError, match="method.adversarial.loss"):
        load_job(TESTS / "tiny_gan.toml", ["method.adversarial.loss='wgan'"])
    with pytest.raises(ValueError, match="needs method.weights.gan > 0"):
        losses.build(load_job(TESTS / "tiny_gan.toml", ["method.weights={gan=0.0}"]))
    with pytest.raises(ValueError, match="unknown consistency loss terms"):
        losses.build(load_job(TESTS / "tiny_cd.toml", ["method.weights={dmd=1.0}"]))
    with pytest.raises(ValueError, match="no such network"):
        losses.build(load_job(TESTS / "tiny_cd_gan.toml", ["method.adversarial.backbone='critic'"])).networks(
            teachers.load("wan", "tiny-random"))


def test_lpips_loads_only_from_a_local_file_and_converts_official_files(tmp_path):
    from losses.perceptual import _empty_lpips, convert_lpips, load_lpips, lpips_frames

    with pytest.raises(FileNotFoundError, match="lpips_path"):
        load_lpips(tmp_path / "missing.safetensors")
    reference = _empty_lpips("alex")  # random weights stand in for the official ones (linear layers are >= 0)
    for lin in reference.lins:
        lin.model[1].weight.data.abs_()
    state = reference.state_dict()
    trunk = {k.replace(f"net.{k.split('.')[1]}", "features"): v for k, v in state.items() if k.startswith("net.")}
    torch.save(trunk, tmp_path / "alexnet.pth")
    torch.save({k: v for k, v in state.items() if k.startswith("lin") and not k.startswith("lins.")},
               tmp_path / "alex.pth")
    path = convert_lpips(tmp_path / "alexnet.pth", tmp_path / "alex.pth", tmp_path / "lpips_alex.safetensors")
    model = load_lpips(path)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    x = torch.rand(1, 3, 2, 32, 32) * 2 - 1
    assert lpips_frames(model, x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert lpips_frames(model, x, -x).item() > 0
    save_file({"bogus": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not an lpips.LPIPS"):
        load_lpips(tmp_path / "bad.safetensors")


def test_cd_job_with_lpips_trains(tmp_path):
    from losses.perceptual import _empty_lpips

    save_model(_empty_lpips("alex"), str(tmp_path / "lpips.safetensors"))
    overrides = [f"output.dir='{tmp_path / 'run'}'", "train.steps=1", "method.weights={cd=1.0, lpips=0.1}",
                 f"method.consistency.lpips_path='{tmp_path / 'lpips.safetensors'}'", "data.height=32",
                 "data.width=32", "data.frames=2", "data.batch_size=1"]
    train(load_job(TESTS / "tiny_cd.toml", overrides))
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    # random LPIPS weights (the real ones are non-negative) can give a distance a hair below zero
    assert math.isfinite(record["generator/lpips"]) and record["generator/cd"] > 0


def test_cd_target_follows_the_student_and_a_resumed_run_continues_bitwise(tmp_path):
    job = TESTS / "tiny_cd.toml"
    straight = train(load_job(job, [f"output.dir='{tmp_path / 'a'}'", "train.steps=2"]))
    train(load_job(job, [f"output.dir='{tmp_path / 'b'}'", "train.steps=1"]))
    resumed = train(load_job(job, [f"output.dir='{tmp_path / 'b'}'", "train.steps=2"]))
    weights = "diffusion_pytorch_model.safetensors"
    assert (straight / weights).read_bytes() == (resumed / weights).read_bytes()
    target = load_file(str(tmp_path / "a" / "checkpoints" / "step-00000002" / "target.safetensors"))
    from distill.run import build_model

    initial = build_model(load_job(job)).state_dict()
    assert set(target) == set(initial)
    assert any(not torch.equal(target[k], initial[k]) for k in target)
    described = json.loads((straight / "method.json").read_text())
    assert described["sampler"] == "ode"
    from eval.evaluate import trained_sampler

    with pytest.raises(ValueError, match="only with its own 2 steps"):
        trained_sampler(None, described, 1)
    from distill.export import export_diffusers

    exported = export_diffusers(straight, tmp_path / "export")
    assert not json.loads((exported / "scheduler" / "scheduler_config.json").read_text())["stochastic_sampling"]


@pytest.mark.parametrize("name", ["cd_gan", "gan", "dmd_gan"])  # tiny_cd.toml: the resume test
def test_cpu_method_jobs_train_every_role(tmp_path, name):
    out = train(load_job(TESTS / f"tiny_{name}.toml", [f"output.dir='{tmp_path}'"]))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["generator/loss"] == r["generator/loss"] for r in records)  # finite, logged
    if "gan" in name:
        assert all("discriminator/loss" in r and "generator/gan" in r for r in records)
    described = json.loads((out / "method.json").read_text())
    assert described["method"] == {"cd_gan": "cd+gan", "gan": "gan", "dmd_gan": "dmd+gan"}[name]


@pytest.mark.parametrize("name", ["cd", "cd_gan", "gan", "dmd", "dmd_gan"])
def test_gpu_method_job_files_run_on_cpu_at_tiny_settings(tmp_path, name):
    """jobs/tiny_<method>.toml (the H100 jobs of the comparison) run here with smaller data and another step count."""
    overrides = [f"output.dir='{tmp_path}'", "train.device='cpu'", "data.frames=2", "data.height=16", "data.width=16",
                 "data.batch_size=1",
                 "data.pool=0", "train.steps=1", "logging.every=1", "logging.progress=false",
                 "logging.tensorboard=false", "method.student_steps=2", "method.critic_steps=1", "model.source=''"]
    out = train(load_job(JOBS / f"tiny_{name}.toml", overrides))
    assert len(json.loads((out / "method.json").read_text())["timesteps"]) == 2


def test_pure_gan_starts_from_an_exported_student(tmp_path):
    """Regression initialisation: model.source names a trained student's exported directory."""
    from teachers.wan import WanDenoiser

    first = train(load_job(TESTS / "tiny_cd.toml", [f"output.dir='{tmp_path / 'init'}'", "train.steps=1"]))
    overrides = [f"output.dir='{tmp_path / 'gan'}'", "train.steps=1", "model.config={}", f"model.source='{first}'",
                 "optim.lr=1e-12", "train.ema_decay=0.0"]
    out = train(load_job(TESTS / "tiny_gan.toml", overrides))
    start, trained = WanDenoiser.from_pretrained(first).state_dict(), WanDenoiser.from_pretrained(out).state_dict()
    assert all(torch.allclose(start[k], trained[k], atol=1e-6) for k in start)


def test_compare_methods_writes_rows_and_a_table(tmp_path, capsys):
    from eval.compare_methods import main

    cd = train(load_job(TESTS / "tiny_cd.toml", [f"output.dir='{tmp_path / 'cd_s2'}'", "train.steps=1"]))
    train(load_job(TESTS / "tiny_dmd.toml", [f"output.dir='{tmp_path / 'dmd_s4'}'", "train.steps=1"]))
    out = tmp_path / "methods.json"
    rows = main([str(cd), str(tmp_path / "dmd_s4"), "--teacher", "tiny-random", "--teacher-steps", "2", "--num", "4",
                 "--batch-size", "4", "--frames", "4", "--device", "cpu", "--out", str(out)])
    record = json.loads(out.read_text())
    assert [(r["model"], r["method"], r["steps"]) for r in record["rows"]] == [
        ("teacher", "flow", 2), ("cd_s2", "cd", 2), ("dmd_s4", "dmd", 1), ("dmd_s4", "dmd", 2), ("dmd_s4", "dmd", 4)]
    for row in record["rows"]:
        assert {"accuracy", "fvd_probe", "sec_per_video", "num_videos", "train_minutes"} <= set(row)
    assert rows[1]["train_seconds"] > 0 and rows[1]["train_steps"] == 1
    assert "| cd_s2 | cd | 2 |" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cd", "cd_gan", "gan", "dmd_gan"])
def test_method_jobs_train_on_the_gpu_in_bf16(tmp_path, name):
    """The bf16 engines (heads, EMA target, teacher in float32) on CUDA, at the CPU test size."""
    train(load_job(TESTS / f"tiny_{name}.toml", [f"output.dir='{tmp_path}'", "train.device='cuda'",
                                                 "deepspeed.precision='bf16'", "deepspeed.zero_stage=2"]))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["generator/loss"])) for r in records)
