"""The trainer on CPU: resume after SIGKILL continues bitwise, checkpoints, non-finite losses, ZeRO stages."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill.config import load_job
from distill.run import train

JOB = Path(__file__).parent / "jobs" / "tiny_flow.toml"


def _losses(run: Path) -> dict[int, float]:
    """Loss per step; a resumed run logs some steps twice, and the later record wins."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["generator/loss"] for r in records}


def _start(out: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "distill.cli", "train", str(JOB), "--set", f"output.dir='{out}'", *extra]
    # A process group made earlier in this pytest process left its rendezvous in the environment; each run
    # must make its own.
    inherited = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**env, "PYTHONHASHSEED": "random"})


def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
    steps = ["--set", "train.steps=8"]
    full = _start(tmp_path / "full", *steps)
    deadline = time.time() + 240
    # DeepSpeed compiles its CPU communication op on first use; let one process do it before the next starts
    while not (tmp_path / "full" / "log.jsonl").exists() and full.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed_dir = tmp_path / "killed"
    victim = _start(killed_dir, *steps)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill once a checkpoint exists and the run has moved past it
        if (killed_dir / "log.jsonl").exists() and max(_losses(killed_dir), default=0) >= 3:
            break
        assert victim.poll() is None, victim.stderr.read()
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert max(_losses(killed_dir)) < 8, "the run finished before it could be killed"
    assert not (killed_dir / "model").exists()
    resumed = _start(killed_dir, *steps)
    assert resumed.wait(timeout=240) == 0, resumed.stderr.read()
    assert full.wait(timeout=240) == 0, full.stderr.read()
    expected, got = _losses(tmp_path / "full"), _losses(killed_dir)
    assert sorted(got) == list(range(1, 9))
    assert got == expected  # bitwise: floats round-trip exactly through JSON
    assert "resumed from step" in resumed.stderr.read()
    ckpts = sorted(p.name for p in (killed_dir / "checkpoints").iterdir())
    assert ckpts == ["step-00000006", "step-00000008"]  # keep_last = 2, no temporary leftovers
    a = (tmp_path / "full" / "model" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a == (killed_dir / "model" / "diffusion_pytorch_model.safetensors").read_bytes()


class _Exploding:
    """Flow matching whose loss is NaN at chosen steps (to test the non-finite guard)."""

    def __init__(self, bad_calls):
        from losses.flow_matching import FlowMatchingMethod

        self.inner, self.calls, self.bad_calls = FlowMatchingMethod(), 0, bad_calls
        self.roles = self.inner.roles
        self.networks = self.inner.networks
        self.describe = self.inner.describe

    def loss(self, role, nets, batch, generator):
        loss, logs = self.inner.loss(role, nets, batch, generator)
        self.calls += 1
        return (loss * float("nan"), logs) if self.calls in self.bad_calls else (loss, logs)


def test_nonfinite_loss_stops_or_skips(tmp_path, monkeypatch):
    import losses

    monkeypatch.setattr(losses, "build", lambda job: _Exploding({2}))
    job = load_job(JOB, [f"output.dir='{tmp_path / 'stop'}'", "train.steps=3"])
    from distill.trainer import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="non-finite generator loss .* at step 2"):
        train(job)
    job = load_job(JOB, [f"output.dir='{tmp_path / 'skip'}'", "train.steps=3", "train.on_nonfinite='skip'"])
    train(job)
    records = [json.loads(line) for line in (tmp_path / "skip" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [0, 1, 1]
    assert all(torch.isfinite(torch.tensor(r["generator/loss"])) for r in records if r["step"] != 2)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_train_and_export(tmp_path, stage):
    overrides = [f"output.dir='{tmp_path}'", "train.steps=2", f"deepspeed.zero_stage={stage}", "train.ema_decay=0.5"]
    out = train(load_job(JOB, overrides))
    from teachers.wan import WanDenoiser

    model = WanDenoiser.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(_losses(tmp_path)) == 2


def test_ema_is_exported(tmp_path):
    """With decay close to 1 the exported (EMA) weights stay near the initial ones, unlike the raw weights."""
    from distill.run import build_model

    job = load_job(JOB, [f"output.dir='{tmp_path}'", "train.steps=3", "train.ema_decay=0.999", "optim.lr=0.01"])
    initial = build_model(job).state_dict()  # random init is seeded: the same weights training starts from
    from teachers.wan import WanDenoiser

    exported = WanDenoiser.from_pretrained(train(job)).state_dict()
    name = "transformer.proj_out.weight"
    moved = (exported[name] - initial[name]).abs().max().item()
    # Adam moves raw weights by about lr per step (0.03 in all); the EMA only by a small fraction of that.
    assert 0 < moved < 0.003


def test_the_shipped_teacher_job_file_runs_on_cpu_at_tiny_settings(tmp_path):
    """jobs/tiny_teacher.toml (trained on the H100 under deepspeed) runs unchanged here with smaller data."""
    job_file = Path(__file__).parents[1] / "jobs" / "tiny_teacher.toml"
    overrides = [f"output.dir='{tmp_path}'", "train.device='cpu'", "data.frames=4", "data.batch_size=1",
                 "data.pool=0", "train.steps=1", "logging.every=1", "logging.progress=false"]
    out = train(load_job(job_file, overrides))
    assert _losses(tmp_path)[1] > 0 and (out / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "inputs.json").read_text()) == {"coordinate_frames": 16}  # the job's coordinates
