"""The one training loop: a DeepSpeed engine per trainable network, update ratio, EMA, checkpoints, logs.

It runs as a single process without a launcher (CPU with gloo, or one GPU) and unchanged under
``deepspeed --num_gpus N`` or ``torchrun``. Every random draw of a micro-batch comes from a generator
seeded by ``(seed, step, role, micro-batch, rank)`` and data is addressed by index, so a run resumed from
a checkpoint continues the same trajectory (bitwise on CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from distill.config import JobConfig, to_dict
from distill.data.batches import BatchSource
from losses.base import Method, Networks


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite (and ``train.on_nonfinite = "stop"``)."""


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device = 'cuda' but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device) -> None:
    """Join the launcher's process group, or make a one-process group when started without one."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the first deepspeed import
    import deepspeed

    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def use_bf16(job: JobConfig, device: torch.device) -> bool:
    precision = job.deepspeed.precision
    return precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def deepspeed_config(job: JobConfig, role: str, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config of one network's engine; ``deepspeed.config`` (a JSON file) overrides entries."""
    lr = job.optim.critic_lr if role != "generator" and job.optim.critic_lr > 0 else job.optim.lr
    zero: dict[str, Any] = {"stage": job.deepspeed.zero_stage}
    if job.deepspeed.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": job.data.batch_size,
        "gradient_accumulation_steps": job.train.grad_accum,
        "gradient_clipping": job.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(job, device)},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": job.optim.betas,
                                                  "weight_decay": job.optim.weight_decay,
                                                  "torch_adam": not job.deepspeed.offload}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if job.optim.warmup_steps:
        config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr,
                                                              "warmup_num_steps": job.optim.warmup_steps}}
    if job.deepspeed.config:
        config.update(json.loads(Path(job.deepspeed.config).read_text()))
    return config


@contextlib.contextmanager
def gathered(params: list[nn.Parameter]):
    """Full parameters inside the block, also when ZeRO-3 partitions them."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


class Trainer:
    """Owns the engines, the step counter, EMA, checkpoints and logs of one job."""

    def __init__(self, job: JobConfig, method: Method, trainable: Networks, frozen: Networks,
                 batches: BatchSource, device: torch.device):
        import deepspeed

        self.job, self.method, self.batches, self.device = job, method, batches, device
        self.rank = dist.get_rank()
        self.out = Path(job.output.dir)
        self.ckpt_root = self.out / "checkpoints"
        self.engines = {}
        for role in method.roles:
            net = trainable[role]
            if job.model.gradient_checkpointing and hasattr(net, "enable_gradient_checkpointing"):
                net.enable_gradient_checkpointing()
            params = [p for p in net.parameters() if p.requires_grad]
            engine, *_ = deepspeed.initialize(model=net, model_parameters=params,
                                              config=deepspeed_config(job, role, device))
            self.engines[role] = engine
        self.nets: Networks = {**frozen, **{role: e.module for role, e in self.engines.items()}}
        if job.train.compile:  # fused blocks: fewer launches and less GPU time per step
            for net in self.nets.values():
                if hasattr(net, "compile_blocks"):
                    net.compile_blocks()
        self.ema: dict[str, torch.Tensor] = {}
        if job.train.ema_decay > 0:
            params = dict(self.nets["generator"].named_parameters())
            with gathered(list(params.values())):
                self.ema = {name: p.detach().float().clone() for name, p in params.items() if p.requires_grad}
        # Frozen copies the method keeps near a trained network (consistency distillation's EMA target):
        # name -> (role, decay), moved after each update of that role and saved with checkpoints.
        self.targets: dict[str, tuple[str, float]] = dict(getattr(method, "ema_targets", {}))
        self.step = 0  # completed generator steps
        self.micro = 0  # micro-batches consumed
        self.skipped = 0
        self._log_file = None
        self._tb = None

    # ---------------------------------------------------------------- randomness and updates
    def _generator(self, role: str, update: int, micro: int) -> torch.Generator:
        key = repr((self.job.train.seed, self.step, role, update, micro, self.rank)).encode()
        seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1  # stable across processes
        return torch.Generator(device=self.device).manual_seed(seed)

    def _update(self, role: str, update: int) -> dict[str, float]:
        engine, logs = self.engines[role], {}
        for micro in range(self.job.train.grad_accum):
            batch = self.batches.get(self.micro)
            self.micro += 1
            loss, logs = self.method.loss(role, self.nets, batch, self._generator(role, update, micro))
            if not torch.isfinite(loss):
                message = f"non-finite {role} loss ({loss.item()}) at step {self.step + 1}, micro-batch {micro}"
                if self.job.train.on_nonfinite == "stop":
                    raise NonFiniteLossError(message)
                tqdm.write(f"warning: {message}: skipped", file=sys.stderr)
                self.skipped += 1
                # A zero loss on every parameter keeps DeepSpeed's accumulation and ZeRO hooks in step.
                loss = sum((p * 0).sum() for p in engine.module.parameters() if p.requires_grad)
            engine.backward(loss)
            engine.step()
        return {f"{role}/{k}": v for k, v in logs.items()}

    @staticmethod
    def _move_averages(averages: dict[str, torch.Tensor], source: nn.Module, decay: float) -> None:
        """``average <- decay * average + (1 - decay) * parameter`` for each named parameter of ``source``: the
        generator's EMA and the methods' frozen targets are the same update."""
        params = dict(source.named_parameters())
        with gathered(list(params.values())), torch.no_grad():
            for name, average in averages.items():
                average.lerp_(params[name].detach().to(average.dtype), 1 - decay)

    def _update_targets(self, role: str) -> None:
        for name, (source, decay) in self.targets.items():
            if source == role:
                self._move_averages(dict(self.nets[name].named_parameters()), self.nets[source], decay)

    def train_step(self) -> dict[str, float]:
        logs: dict[str, float] = {}
        for role in self.method.roles:
            repeats = 1 if role == "generator" else self.job.method.critic_steps
            for update in range(repeats):
                logs.update(self._update(role, update))
            self._update_targets(role)
        if self.ema:
            self._move_averages(self.ema, self.nets["generator"], self.job.train.ema_decay)
        self.step += 1
        return logs

    # ---------------------------------------------------------------- checkpoints
    def checkpoints(self) -> list[Path]:
        return sorted(self.ckpt_root.glob("step-*")) if self.ckpt_root.is_dir() else []

    def save_checkpoint(self) -> Path:
        """Write to a temporary directory, then rename: a killed run never leaves a half checkpoint."""
        final = self.ckpt_root / f"step-{self.step:08d}"
        tmp = self.ckpt_root / f".tmp-step-{self.step:08d}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        for role, engine in self.engines.items():
            engine.save_checkpoint(str(tmp), tag=role)
        if self.rank == 0:
            if self.ema:
                save_file({k: v.contiguous() for k, v in self.ema.items()}, str(tmp / "ema.safetensors"))
            for name in self.targets:
                save_file({k: v.contiguous() for k, v in self.nets[name].state_dict().items()},
                          str(tmp / f"{name}.safetensors"))
            state = {"step": self.step, "micro": self.micro, "skipped": self.skipped, "job": to_dict(self.job)}
            (tmp / "trainer.json").write_text(json.dumps(state, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.checkpoints()[:-self.job.train.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def resume(self) -> bool:
        """Load the newest complete checkpoint, if any."""
        found = self.checkpoints()
        if not found:
            return False
        path = found[-1]
        for role, engine in self.engines.items():
            engine.load_checkpoint(str(path), tag=role)
        state = json.loads((path / "trainer.json").read_text())
        self.step, self.micro, self.skipped = state["step"], state["micro"], state["skipped"]
        if self.ema:
            self.ema = {k: v.to(self.device) for k, v in load_file(str(path / "ema.safetensors")).items()}
        for name in self.targets:
            self.nets[name].load_state_dict(load_file(str(path / f"{name}.safetensors"), device=str(self.device)))
        return True

    # ---------------------------------------------------------------- logging and the loop
    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        if self._log_file is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.out / "log.jsonl", "a")
            if self.job.logging.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
        self._log_file.write(json.dumps(record) + "\n")
        self._log_file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, record["step"])

    def _out_of_time(self, start: float) -> bool:
        """Whether ``train.max_minutes`` has passed; every rank takes rank 0's answer."""
        if not self.job.train.max_minutes:
            return False
        flag = torch.tensor([float(time.perf_counter() - start > 60 * self.job.train.max_minutes)],
                            device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def fit(self) -> dict[str, float]:
        """Train until ``train.steps``, checkpointing on the way; returns the last step's logs."""
        if self.job.output.resume and self.resume() and self.rank == 0:
            tqdm.write(f"resumed from step {self.step} in {self.ckpt_root}", file=sys.stderr)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "job.json").write_text(json.dumps(to_dict(self.job), indent=1))
        train = self.job.train
        logs: dict[str, float] = {}
        bar = tqdm(total=train.steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=self.rank != 0 or not self.job.logging.progress)
        start = time.perf_counter()
        while self.step < train.steps:
            logs = self.train_step()
            bar.update(1)
            bar.set_postfix({k.split("/")[0] + "/" + k.split("/")[-1]: f"{v:.4f}" for k, v in logs.items()},
                            refresh=False)
            if self.step % self.job.logging.every == 0 or self.step == train.steps:
                self._log({"step": self.step, **logs, "skipped": self.skipped,
                           "lr": self.engines["generator"].get_lr()[0] if "generator" in self.engines else None,
                           "sec": round(time.perf_counter() - start, 3)})
            out_of_time = self._out_of_time(start)
            if self.step % train.checkpoint_every == 0 or self.step == train.steps or out_of_time:
                self.save_checkpoint()
            if out_of_time:
                self._log({"step": self.step, "event": "stopped: train.max_minutes reached",
                           "sec": round(time.perf_counter() - start, 3)})
                break
        bar.close()
        return logs

    def close(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
        if self._tb is not None:
            self._tb.close()

    def generator_weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        """The generator's weights (the EMA where there is one), for export."""
        net = self.nets["generator"]
        params = dict(net.named_parameters())
        with gathered(list(params.values())):
            state = {k: v.detach().float().clone() for k, v in net.state_dict().items()}
        if ema and self.ema:
            state.update({k: v.clone() for k, v in self.ema.items()})
        return state
