"""LoRA-only distillation on one frozen base (LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models"; peft's implementation).

The teacher's weights are loaded once and frozen. Every trainable network (DMD's generator and critic, a
flow-matching generator, ...) is a named peft adapter injected into that one base, and the teacher is the
base with all adapters off. A :class:`LoraView` is one role's Denoiser: its forward switches the shared base
to its adapter, and it registers only that adapter's modules, so the trainer's engine for the role holds
only them and the frozen base is in no engine. Methods need no change: ``make_student`` on a view returns a
new view, and :func:`lora_networks` names the adapters after the roles the method gave them.

The trained generator is saved as a LoRA file in diffusers' format (``pytorch_lora_weights.safetensors``,
keys ``transformer.blocks.0.attn1.to_q.lora_A.weight``, the ``alpha / rank`` scale folded into ``lora_B``),
which ``WanPipeline.load_lora_weights`` reads; :func:`load_student` merges such a file into a base teacher.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from distill.checkpointing import checkpoint_block
from distill.config import JobConfig, LoraSettings
from teachers.base import Denoiser

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA weight name
LORA_META = "lora.json"
# peft inits that leave the base weights untouched (pissa, olora, corda, loftq rewrite them: the frozen
# teacher shares the base, so they are refused in distill/config.py)
PEFT_INIT = {"default": True, "gaussian": "gaussian", "orthogonal": "orthogonal"}


class SharedBase:
    """One frozen base network, its named LoRA adapters, and which adapter is active (None: the teacher)."""

    def __init__(self, base: Denoiser, settings: LoraSettings):
        self.base = base.requires_grad_(False).eval()
        self.settings = settings
        self.active: str | None = None
        self.adapters: dict[str, nn.Module] = {}
        self._layers: list[nn.Module] = []

    def add_adapter(self, name: str) -> nn.Module:
        """Inject a peft LoRA adapter ``name``; returns a module tree holding only its modules (float32)."""
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        if name in self.adapters:
            raise ValueError(f"LoRA adapter {name!r} exists already")
        s = self.settings
        config = LoraConfig(r=s.rank, lora_alpha=s.alpha or s.rank, target_modules=list(s.target_modules),
                            init_lora_weights=PEFT_INIT[s.init], lora_dropout=0.0)
        with warnings.catch_warnings():  # a second adapter on one model is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(config, self.base, adapter_name=name)
        self._layers = [m for m in self.base.modules() if isinstance(m, BaseTunerLayer)]
        if not self._layers:
            raise ValueError(f"lora.target_modules {s.target_modules} match no module of the base network")
        tree = nn.Module()
        for path, layer in self.base.named_modules():
            if isinstance(layer, BaseTunerLayer):
                for attr in layer.adapter_layer_names:
                    holder = getattr(layer, attr, None)
                    if holder is not None and name in holder:
                        _attach(tree, f"{path}.{attr}", holder[name])
        self.adapters[name] = tree.float()
        # peft's injection flips requires_grad of adapters it does not activate: set every flag here
        for param in self.base.parameters():
            param.requires_grad_(False)
        for adapter in self.adapters.values():
            adapter.requires_grad_(True)
        self._select(self.active)
        return tree

    def _select(self, adapter: str | None) -> None:
        # Set peft's state directly: its set_adapter/enable_adapters also change requires_grad, which
        # belongs to the trainer (an adapter's engine must keep its gradients while another role runs).
        for layer in self._layers:
            layer._active_adapter = [adapter] if adapter is not None else layer._active_adapter
            layer._disable_adapters = adapter is None
        self.active = adapter

    @contextlib.contextmanager
    def using(self, adapter: str | None) -> Iterator[None]:
        """Run the base with ``adapter`` (None: all adapters off) inside the block."""
        previous = self.active
        if adapter == previous:
            yield
            return
        self._select(adapter)
        try:
            yield
        finally:
            self._select(previous)

    def _checkpoint(self, block: nn.Module, *args):
        """diffusers' checkpoint function, recomputing a block under the adapter of its forward (the
        backward of one role can run after another role's forward switched the base)."""
        adapter = self.active
        return checkpoint_block(block, *args, restore=lambda: self.using(adapter))

    def enable_gradient_checkpointing(self) -> None:
        from diffusers import ModelMixin

        found = False
        for module in self.base.modules():
            if isinstance(module, ModelMixin) and module._supports_gradient_checkpointing:
                module.enable_gradient_checkpointing(self._checkpoint)
                found = True
        if not found:
            raise ValueError(f"{type(self.base).__name__} holds no diffusers model with gradient checkpointing")


def _attach(tree: nn.Module, dotted: str, item: nn.Module | nn.Parameter) -> None:
    """Register ``item`` in ``tree`` at ``dotted`` (a path in the base), making containers on the way."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    if isinstance(item, nn.Parameter):
        node.register_parameter(leaf, item)
    else:
        node.add_module(leaf, item)


class LoraView(Denoiser):
    """One role's Denoiser on a :class:`SharedBase`: the base with the role's adapter (or none) active.

    Only the adapter's modules (``self.lora``) and what a method attaches (e.g. DMD2's GAN head) are
    registered, so ``parameters()``, ``.to()`` and a DeepSpeed engine see nothing of the shared base.
    Attributes and sub-modules of the base (``feature_dim``, ``transformer``, ...) are reachable here as they
    are, and its methods (``features``, ...) run with this view's adapter active.
    """

    def __init__(self, shared: SharedBase):
        super().__init__(shared.base.schedule)
        self.__dict__["shared"] = shared  # not a submodule: the base belongs to no role
        self.adapter: str | None = None

    def adapt(self, name: str) -> "LoraView":
        """Give this view its own new adapter ``name`` (trainable)."""
        if self.adapter is not None:
            raise ValueError(f"this LoRA view has adapter {self.adapter!r} already; cannot add {name!r}")
        self.lora = self.shared.add_adapter(name)
        self.adapter = name
        return self

    def forward(self, x_t: Tensor, t: Tensor, cond, **kwargs) -> Tensor:
        with self.shared.using(self.adapter):
            return self.shared.base(x_t, t, cond, **kwargs)

    def enable_gradient_checkpointing(self) -> None:
        self.shared.enable_gradient_checkpointing()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "shared" not in self.__dict__:
                raise
        value = getattr(self.__dict__["shared"].base, name)
        if not inspect.ismethod(value):  # attributes and sub-modules as they are; only methods switch adapters
            return value

        def with_adapter(*args, **kwargs):
            with self.shared.using(self.adapter):
                return value(*args, **kwargs)

        return with_adapter

    def new_view(self) -> "LoraView":
        """A view without an adapter yet (a student of this base); :func:`lora_networks` gives it one."""
        return LoraView(self.shared)


def lora_networks(method, model: Denoiser, settings: LoraSettings, device: torch.device,
                  dtype: torch.dtype) -> tuple[dict[str, Denoiser], dict[str, Denoiser]]:
    """``method.networks`` on one frozen base (moved to ``device``/``dtype`` once): every trainable view
    becomes an adapter named after its role; a view that is also frozen (the teacher) is copied first."""
    shared = SharedBase(model.to(device=device, dtype=dtype), settings)
    trainable, frozen = method.networks(LoraView(shared))
    frozen_ids = {id(net) for net in frozen.values()}
    for role, net in trainable.items():
        if not isinstance(net, LoraView):
            continue  # a network of its own (e.g. a separate discriminator) trains in full
        view = net.new_view() if id(net) in frozen_ids else net
        trainable[role] = view.adapt(role).requires_grad_(True).train()
    return trainable, frozen


# ------------------------------------------------------------------------- the LoRA file


def to_diffusers_lora(weights: dict[str, Tensor], scale: float, dtype: torch.dtype) -> dict[str, Tensor]:
    """A generator view's state dict (``lora.<path>.lora_A.weight``) as diffusers LoRA keys
    (``<path>.lora_A.weight``) with ``scale`` folded into ``lora_B``, so loaders need no alpha."""
    out = {}
    for key, value in weights.items():
        if not key.startswith("lora."):
            raise ValueError(f"generator weight {key!r} is not a LoRA weight; only adapters export as LoRA")
        name = key[len("lora."):]
        if not name.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"{key!r}: only plain LoRA (lora_A/lora_B) exports to diffusers")
        out[name] = (value.float() * (scale if ".lora_B." in name else 1.0)).to(dtype).contiguous()
    return out


def save_lora_model(out: str | Path, weights: dict[str, Tensor], job: JobConfig, dtype: torch.dtype) -> Path:
    """A LoRA student directory: the diffusers-format LoRA file, ``lora.json`` (the base it adapts and its
    settings) and the job's ``schedule.json``."""
    from distill.schedule import make_schedule, schedule_to_dict

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = job.lora
    save_file(to_diffusers_lora(weights, (s.alpha or s.rank) / s.rank, dtype), str(out / LORA_FILE))
    # the file's alpha equals its rank (scale 1): the trained alpha / rank is folded into lora_B
    meta = {"rank": s.rank, "alpha": s.rank, "alpha_trained": s.alpha or s.rank, "init": s.init,
            "target_modules": list(s.target_modules),
            "base": {"family": job.model.family, "source": job.model.source, "config": job.model.config}}
    (out / LORA_META).write_text(json.dumps(meta, indent=1))
    schedule = make_schedule(job.schedule.kind, shift=job.schedule.shift)
    (out / "schedule.json").write_text(json.dumps(schedule_to_dict(schedule), indent=1))
    return out


def is_lora_model(path: str | Path) -> bool:
    return (Path(path) / LORA_META).is_file() and (Path(path) / LORA_FILE).is_file()


@torch.no_grad()
def merge_lora(model: nn.Module, lora: dict[str, Tensor]) -> nn.Module:
    """Add ``B @ A`` of each diffusers-format LoRA pair to the weight of the linear layer it names, in place
    (the keys' paths, ``transformer.blocks...``, are module paths of a Denoiser holding ``transformer``)."""
    for key in sorted(k for k in lora if k.endswith(".lora_A.weight")):
        path = key[:-len(".lora_A.weight")]
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in lora:
            raise ValueError(f"LoRA file: {key} has no {b_key}")
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"LoRA key {key}: the model has no module {path!r}") from None
        delta = lora[b_key].float() @ lora[key].float()
        if not isinstance(layer, nn.Linear) or layer.weight.shape != delta.shape:
            raise ValueError(f"LoRA key {key}: {path} is {type(layer).__name__} {tuple(layer.weight.shape)}, "
                             f"the LoRA update is {tuple(delta.shape)}")
        layer.weight += delta.to(layer.weight.device, layer.weight.dtype)
    return model


def load_student(path: str | Path, base: Denoiser | None = None, dtype: torch.dtype = torch.float32) -> Denoiser:
    """A LoRA student directory merged into a copy of ``base`` (default: the base recorded in its ``lora.json``),
    with the student's schedule."""
    import teachers
    from distill.schedule import schedule_from_dict

    path = Path(path)
    if not is_lora_model(path):
        raise FileNotFoundError(f"{path} is not a LoRA student directory (needs {LORA_META} and {LORA_FILE})")
    schedule = schedule_from_dict(json.loads((path / "schedule.json").read_text()))
    if base is None:
        recorded = json.loads((path / LORA_META).read_text())["base"]
        source = recorded["config"] or recorded["source"] or None
        base = teachers.load(recorded["family"], source, schedule=schedule, dtype=dtype)
    else:
        base = copy.deepcopy(base)
        base.schedule = schedule
    return merge_lora(base, load_file(str(path / LORA_FILE))).requires_grad_(False)
