"""GPU paths: bf16 Wan forward against float32, and a DeepSpeed ZeRO-2 bf16 training run (``pytest -m gpu``)."""

from pathlib import Path

import pytest
import torch

import teachers
from distill.conditioning import Conditioning
from distill.config import load_job
from distill.run import train

pytestmark = pytest.mark.gpu
JOB = Path(__file__).parent / "jobs" / "tiny_flow.toml"


def test_bf16_forward_matches_float32():
    reference = teachers.load("wan", "tiny-random")
    fast = teachers.load("wan", "tiny-random", dtype=torch.bfloat16).cuda()
    x, t = torch.randn(2, 3, 4, 16, 16), torch.tensor([0.3, 0.8])
    cond = Conditioning(torch.randn(2, 8, 384))
    expected = reference(x, t, cond)
    got = fast(x.cuda(), t.cuda(), cond.to("cuda")).float().cpu()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_zero2_bf16_training_on_gpu(tmp_path):
    job = load_job(JOB, [f"output.dir='{tmp_path}'", "train.device='cuda'", "deepspeed.zero_stage=2",
                         "deepspeed.precision='bf16'", "train.steps=3"])
    out = train(job)
    from teachers.wan import WanDenoiser

    model = WanDenoiser.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_compiled_self_forcing_with_long_rollouts_trains_on_gpu(tmp_path):
    """``train.compile`` with the KV-cached student under autograd (its eager cache attention between compiled
    pieces) and Self-Forcing++ rollouts through the rolling window, in bf16 under ZeRO-2."""
    causal = Path(__file__).parent / "jobs" / "tiny_causal.toml"
    job = load_job(causal, [f"output.dir='{tmp_path}'", "train.device='cuda'", "deepspeed.zero_stage=2",
                            "deepspeed.precision='bf16'", "train.compile=true", "student.mode='self_forcing'",
                            "student.rollout_frames=12", "train.steps=3"])
    out = train(job)
    from teachers.wan import WanDenoiser

    trained, teacher = WanDenoiser.from_pretrained(out), teachers.load("wan", "tiny-random")
    assert all(torch.isfinite(p).all() for p in trained.parameters())
    assert any(not torch.equal(a, b.to(a.dtype)) for a, b in zip(trained.state_dict().values(),
                                                                   teacher.state_dict().values()))
