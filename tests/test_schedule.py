import math

import pytest
import torch

from distill.schedule import (FlowMatching, VPSchedule, broadcast_time, euler_sample, make_schedule,
                              prediction_coefficients, shift_time)

SCHEDULES = [FlowMatching(), FlowMatching(shift=5.0), VPSchedule(), VPSchedule(zero_terminal_snr=False, snr_shift=1.0)]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
@pytest.mark.parametrize("prediction", ["velocity", "v", "eps", "x0"])
def test_split_inverts_target(schedule, prediction):
    schedule = type(schedule)(**{**schedule.__dict__, "prediction": prediction})
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 5, 5, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 5, 5, generator=g,
                                                                                        dtype=torch.float64)
    t = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    x_t = schedule.add_noise(x0, eps, t)
    got_x0, got_eps = schedule.split(x_t, t, schedule.target(x0, eps, t))
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)


def test_flow_conversions_match_definitions():
    s = FlowMatching()
    x0, eps, t = torch.randn(2, 3, 2, 4, 4), torch.randn(2, 3, 2, 4, 4), torch.tensor([0.3, 0.8])
    tb = t.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(s.add_noise(x0, eps, t), (1 - tb) * x0 + tb * eps)
    torch.testing.assert_close(s.target(x0, eps, t), eps - x0)


def test_vp_is_variance_preserving_and_reaches_pure_noise():
    s = VPSchedule()
    alpha, sigma = s.alpha_sigma(torch.linspace(0, 1, 101, dtype=torch.float64))
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(101, dtype=torch.float64))
    assert alpha[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert torch.all(alpha[1:] <= alpha[:-1])
    # integer times hit the discrete table exactly
    table = s.alphas_cumprod()
    a, _ = s.alpha_sigma(torch.tensor([500 / 999], dtype=torch.float64))
    assert a.item() ** 2 == pytest.approx(table[500].item(), rel=1e-9)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_ode_step_is_exact_for_a_point_mass(schedule):
    """With all data at one point x*, the exact model is known in closed form and the ODE paths are
    the DDIM curves x_t = alpha_t x* + sigma_t eps, which one step must follow exactly."""
    x_star = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)

    def exact_model(x_t, t):
        alpha, sigma = schedule.alpha_sigma(broadcast_time(t, x_t))
        return schedule.target(x_star, (x_t - alpha * x_star) / sigma, t)

    t, s = torch.tensor([0.9], dtype=torch.float64), 0.25
    x_s = schedule.step(schedule.add_noise(x_star, eps, t), t, s, exact_model(schedule.add_noise(x_star, eps, t), t))
    torch.testing.assert_close(x_s, schedule.add_noise(x_star, eps, s))
    sample = euler_sample(exact_model, schedule.add_noise(x_star, eps, 1.0), schedule, steps=3)
    torch.testing.assert_close(sample, x_star)


def test_flow_step_is_euler_on_linear_velocity():
    s = FlowMatching(shift=3.0)
    x_t, v = torch.randn(2, 1, 2, 2, 2), torch.randn(2, 1, 2, 2, 2)
    torch.testing.assert_close(s.step(x_t, torch.tensor([0.7, 0.7]), 0.2, v), x_t + (0.2 - 0.7) * v)


def test_timesteps_student_list_and_shift():
    torch.testing.assert_close(FlowMatching().timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = FlowMatching(shift=5.0).timesteps(4)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert shifted[2].item() == pytest.approx(5 * 0.5 / (1 + 4 * 0.5))
    assert shift_time(0.5, 1.0) == 0.5
    with pytest.raises(ValueError, match="steps"):
        FlowMatching().timesteps(0)


def test_per_frame_time_broadcast():
    s = FlowMatching()
    x0, eps = torch.zeros(2, 1, 3, 2, 2), torch.ones(2, 1, 3, 2, 2)
    t = torch.tensor([[0.0, 0.5, 1.0], [0.25, 0.25, 0.25]])
    x_t = s.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t[:, 0, :, 0, 0], t)
    with pytest.raises(ValueError, match="does not fit"):
        s.add_noise(x0, eps, torch.zeros(2, 4))


def test_training_time_distribution():
    g = torch.Generator().manual_seed(0)
    t = FlowMatching().sample_training_time((20000,), g)
    assert 0 < t.min() and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.02
    t_shift = FlowMatching(shift=3.0).sample_training_time((20000,), g, distribution="uniform")
    assert t_shift.mean().item() > 0.6


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="prediction"):
        FlowMatching(prediction="score")
    with pytest.raises(ValueError, match="shift"):
        FlowMatching(shift=-1.0)
    with pytest.raises(ValueError, match="schedule"):
        make_schedule("cosine")
    with pytest.raises(ValueError, match="distribution"):
        FlowMatching().sample_training_time((2,), distribution="beta")
    with pytest.raises(ValueError, match="prediction"):
        prediction_coefficients("sample", torch.ones(1), torch.ones(1))
    assert math.isclose(make_schedule("flow", shift=2.0).shift, 2.0)
