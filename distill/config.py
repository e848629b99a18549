"""Job configuration: dataclasses loaded from TOML job files, validated, overridable with ``--set a.b=c``."""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.attention.spec import AttentionSpec  # the [attention] table (distill/attention)


class ConfigError(ValueError):
    """A job file or override is wrong; the message names the file and the key."""


@dataclass
class ModelConfig:
    """The network being trained (a teacher) or distilled from (the teacher of a student)."""

    family: str = "wan"
    source: str = ""  # preset name, local diffusers directory or config .json; empty for shipped "tiny"
    config: dict[str, Any] = field(default_factory=dict)  # inline transformer config; wins over source
    dtype: str = "float32"  # weights of frozen networks; trainable ones follow the DeepSpeed precision
    gradient_checkpointing: bool = False
    # > 0: give the model (x, y, frame) coordinate input channels, the frame scaled to this many frames; a loaded
    # model without them gets them zero-initialised (it is unchanged until trained)
    coordinates: int = 0
    # > 0: give the model the clip-offset input channel (where in a long video the clip starts, scaled to this many
    # frames; teachers.wan.offset_channel), zero-initialised on a model without it: a teacher of long-video windows
    offsets: int = 0


@dataclass
class ScheduleConfig:
    kind: str = "flow"  # "flow" or "vp"
    shift: float = 1.0
    time_distribution: str = "logit_normal"  # training noise levels: "logit_normal" or "uniform"


@dataclass
class DataConfig:
    kind: str = "synthetic"  # "synthetic" (moving shapes, rendered on the fly) or "shards"
    path: str = ""  # shard directory for kind = "shards"
    channels: int = 3  # latent channels (3 for pixel-space tiny models, 16 for Wan's VAE)
    frames: int = 16
    height: int = 32
    width: int = 32
    batch_size: int = 8
    num_samples: int = 100_000  # size of the synthetic dataset (its index space)
    pool: int = 0  # > 0: render and encode this many synthetic clips once, on the device, and draw from them
    max_offset: int = 0  # synthetic: > 0 draws half the clips from later in their long videos (MovingShapes)
    negative_prompt: str = ""  # the unconditional context for CFG
    on_error: str = "warn"  # corrupt shards: "warn" (skip and count) or "raise"


@dataclass
class ConsistencyConfig:
    """Consistency distillation (``method.name = "cd"``; losses/consistency.py)."""

    teacher_steps: int = 48  # the teacher solver's grid; a multiple of method.student_steps (its phases)
    skip: int = 2  # grid intervals one teacher ODE step spans (LCM's k)
    distance: str = "huber"  # "huber" (pseudo-Huber) or "l2"
    huber_c: float = 0.001
    target_decay: float = 0.95  # EMA of the target network (0: the student itself, without gradient)
    lpips_path: str = ""  # safetensors state dict of lpips.LPIPS; needed when method.weights.lpips > 0
    lpips_net: str = "alex"


@dataclass
class AdversarialConfig:
    """The GAN term (``method.weights.gan > 0``, or ``method.name = "gan"``; losses/adversarial.py)."""

    backbone: str = "teacher"  # frozen network whose features the heads read: "teacher" (LADD) or "critic" (DMD2)
    layers: list[int] = field(default_factory=list)  # its blocks that get a head; empty: the middle block
    loss: str = "hinge"  # "hinge" or "non_saturating"
    r1_weight: float = 100.0  # approximate R1 on real samples (APT): |D(x) - D(x + sigma n)|^2
    r1_sigma: float = 0.01


@dataclass
class MethodConfig:
    name: str = "flow"
    guidance: float = 5.0  # CFG scale of the teacher wherever a method queries it
    cfg_dropout: float = 0.1  # flow matching: probability of training on the negative prompt
    critic_steps: int = 1  # critic/discriminator updates per generator update (two time-scale rule)
    weights: dict[str, float] = field(default_factory=dict)  # named loss terms and their weights
    student_steps: int = 4  # the few-step student's step count (distillation methods)
    t_min: float = 0.02  # range of the noise levels at which DMD compares scores and discriminators look
    t_max: float = 0.98
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)


@dataclass
class StudentConfig:
    """A causal student (CausVid/Self-Forcing): chunk-causal attention over chunks of ``chunk_frames`` latent
    frames, trained by ``mode`` (DMD) and streamed with a KV window of ``cache_frames`` (0: the training length
    minus one chunk) whose first ``sink_frames`` frames are never evicted. ``init``: a trained model directory
    to start the causal student from (e.g. the ODE-regression run before causal DMD) instead of the teacher.
    ``rollout_frames`` (self-forcing): each rollout streams this many frames, a multiple of ``data.frames`` (0: one
    clip), through the KV window it streams with at inference, and every training-length window of it is a sample
    of the loss (Self-Forcing++, Cui et al. 2025): the student learns from what a rolled window feeds it.
    ``context_noise``: the noise level at which finished chunks are written to the KV cache (0: clean, the default
    of CausVid and of Self-Forcing, whose code has the same option); above 0 the cache holds re-noised chunks, so
    that a chunk's small errors are not copied into the next one and compound (the self-forcing rollouts and the
    exported generator write it the same way). ``reencode_frames``: once the KV window is full, restart it from
    the last this many frames, written again at the window's first positions (``distill.causal.KVCache``; 0: a
    rolling window), in self-forcing rollouts and in the exported generator."""

    causal: bool = False
    chunk_frames: int = 4
    mode: str = "diffusion_forcing"  # or "self_forcing"
    cache_frames: int = 0
    sink_frames: int = 0
    init: str = ""
    rollout_frames: int = 0
    context_noise: float = 0.0
    reencode_frames: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    critic_lr: float = 0.0  # 0: same as lr
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    warmup_steps: int = 0


@dataclass
class DeepSpeedSettings:
    zero_stage: int = 0
    precision: str = "auto"  # "auto" (bf16 where the device has it), "bf16" or "fp32"
    offload: bool = False  # optimizer state on the CPU (ZeRO stage >= 1)
    config: str = ""  # a DeepSpeed JSON whose entries override the generated ones


@dataclass
class TrainConfig:
    steps: int = 1000
    grad_accum: int = 1
    ema_decay: float = 0.0  # 0 disables the EMA of the generator
    seed: int = 0
    checkpoint_every: int = 500
    keep_last: int = 2
    on_nonfinite: str = "stop"  # "stop" or "skip" (the bad micro-batch contributes no gradient)
    device: str = "auto"  # "auto", "cpu", "cuda"
    max_minutes: float = 0.0  # stop cleanly (checkpoint, export) after this wall time; 0 = no limit
    compile: bool = False  # torch.compile every network's transformer blocks (the first steps compile them)


@dataclass
class LoggingConfig:
    every: int = 10
    tensorboard: bool = True
    progress: bool = True


@dataclass
class OutputConfig:
    dir: str = "runs/job"
    resume: bool = True  # continue from the newest checkpoint in dir when there is one
    dtype: str = "float32"  # dtype of the exported model's weights


@dataclass
class LoraSettings:
    """LoRA-only training (distill/lora.py): every trainable network is a peft adapter on one frozen base."""

    rank: int = 0  # 0: full fine-tuning; > 0: LoRA adapters of this rank
    alpha: float = 0.0  # peft's lora_alpha (the update is scaled by alpha / rank); 0: equal to rank
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj",
                                                               "ffn.net.2"])  # Wan's attention and FFN linears
    init: str = "default"  # peft init: "default" (B = 0: the student starts as the teacher), "gaussian", "orthogonal"


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    attention: AttentionSpec = field(default_factory=AttentionSpec)


_CHOICES = {
    "schedule.kind": ("flow", "vp"),
    "schedule.time_distribution": ("logit_normal", "uniform"),
    "data.kind": ("synthetic", "shards", "ode_pairs"),
    "data.on_error": ("warn", "raise"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "output.dtype": ("float32", "bfloat16", "float16"),
    "deepspeed.precision": ("auto", "bf16", "fp32"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.device": ("auto", "cpu", "cuda"),
    "method.consistency.distance": ("huber", "l2"),
    "method.consistency.lpips_net": ("alex", "vgg", "squeeze"),
    "method.adversarial.backbone": ("teacher", "critic"),
    "method.adversarial.loss": ("hinge", "non_saturating"),
    "student.mode": ("diffusion_forcing", "self_forcing"),
}
_POSITIVE = ("data.channels", "data.frames", "data.height", "data.width", "data.batch_size", "data.num_samples",
             "train.steps", "train.grad_accum", "train.checkpoint_every", "train.keep_last", "method.critic_steps",
             "method.student_steps", "logging.every", "optim.lr", "method.consistency.teacher_steps",
             "method.consistency.skip")


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Return ``value`` converted to ``hint`` (ints widen to floats), or raise naming ``where``."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return _build(hint, value, where)
    if origin in (types.UnionType, typing.Union):
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not match {hint}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        _, item = typing.get_args(hint)
        return {k: _check_type(v, item, f"{where}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is type(None) and value is None:
        return None
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise ConfigError(f"{where or 'top level'}: unknown key(s) {unknown}; known: {names}")
    return cls(**{k: _check_type(v, hints[k], f"{where}.{k}" if where else k) for k, v in table.items()})


def _get(job: JobConfig, dotted: str) -> Any:
    value: Any = job
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate(job: JobConfig, where: str = "job") -> JobConfig:
    """Value checks and impossible combinations, each error naming its key."""
    for key, choices in _CHOICES.items():
        if _get(job, key) not in choices:
            raise ConfigError(f"{where}: {key} = {_get(job, key)!r}; expected one of {list(choices)}")
    for key in _POSITIVE:
        if not _get(job, key) > 0:
            raise ConfigError(f"{where}: {key} must be > 0, got {_get(job, key)!r}")
    if not 0.0 <= job.method.cfg_dropout < 1.0:
        raise ConfigError(f"{where}: method.cfg_dropout must be in [0, 1), got {job.method.cfg_dropout}")
    if job.train.max_minutes < 0:
        raise ConfigError(f"{where}: train.max_minutes must be >= 0, got {job.train.max_minutes}")
    if not 0.0 <= job.train.ema_decay < 1.0:
        raise ConfigError(f"{where}: train.ema_decay must be in [0, 1), got {job.train.ema_decay}")
    if job.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: deepspeed.zero_stage must be 0, 1, 2 or 3, got {job.deepspeed.zero_stage}")
    if job.deepspeed.offload and job.deepspeed.zero_stage == 0:
        raise ConfigError(f"{where}: deepspeed.offload needs deepspeed.zero_stage >= 1")
    if job.data.kind in ("shards", "ode_pairs") and not job.data.path:
        raise ConfigError(f"{where}: data.kind = {job.data.kind!r} needs data.path (a shard directory)")
    _validate_methods(job.method, where)
    if job.model.coordinates < 0 or job.model.coordinates == 1:
        raise ConfigError(f"{where}: model.coordinates must be 0 (none) or a clip length >= 2 (the frames the frame "
                          f"coordinate spans), got {job.model.coordinates}")
    if job.model.coordinates and job.lora.rank:
        raise ConfigError(f"{where}: model.coordinates > 0 with lora.rank > 0 would add the coordinate weights to the "
                          "frozen base, where they stay zero; train them in full (lora.rank = 0). A base that has "
                          "coordinate channels already keeps them with model.coordinates = 0")
    if job.model.offsets < 0 or job.data.max_offset < 0:
        raise ConfigError(f"{where}: model.offsets and data.max_offset must be >= 0")
    if job.data.max_offset and (job.data.kind != "synthetic" or not job.model.offsets):
        raise ConfigError(f"{where}: data.max_offset > 0 draws synthetic clips from later in their videos, which a "
                          "model tells apart only by the offset channel: needs data.kind = 'synthetic' and "
                          "model.offsets > 0")
    if job.model.offsets and job.lora.rank:
        raise ConfigError(f"{where}: model.offsets > 0 with lora.rank > 0 would add the offset weights to the frozen "
                          "base, where they stay zero; train them in full (lora.rank = 0)")
    if job.method.weights.get("regression", 0.0) > 0 and job.data.kind != "ode_pairs":
        raise ConfigError(f"{where}: method.weights.regression > 0 regresses onto teacher ODE pairs: set data.kind = "
                          "'ode_pairs' (shards from `distill ode-pairs`)")
    _validate_student(job, where)
    if len(job.optim.betas) != 2:
        raise ConfigError(f"{where}: optim.betas must have two entries, got {job.optim.betas}")
    _validate_lora(job, where)
    if job.lora.rank and job.attention.active:
        raise ConfigError(f"{where}: [attention] with lora.rank > 0 would change the shared frozen base, and so the "
                          "teacher; train sparse students as full-weight students")
    attention_problems = job.attention.problems()
    if attention_problems:
        raise ConfigError(f"{where}: " + "; ".join(attention_problems))
    return job


_LORA_INITS = ("default", "gaussian", "orthogonal")


def _validate_lora(job: JobConfig, where: str) -> None:
    lora = job.lora
    if lora.rank < 0 or lora.alpha < 0:
        raise ConfigError(f"{where}: lora.rank and lora.alpha must be >= 0, got {lora.rank} and {lora.alpha}")
    if lora.init not in _LORA_INITS:
        raise ConfigError(f"{where}: lora.init = {lora.init!r}; expected one of {list(_LORA_INITS)} (inits such as "
                          "pissa or olora rewrite the base weights, which the frozen teacher shares)")
    if not lora.rank:
        return
    if job.method.name == "cd":
        raise ConfigError(f"{where}: method.name = 'cd' keeps a frozen EMA target of the generator, which LoRA mode "
                          "cannot hold yet (it would be the bare base, i.e. the teacher); use lora.rank = 0")
    if not lora.target_modules:
        raise ConfigError(f"{where}: lora.target_modules is empty; name the linear layers to adapt")
    if lora.init == "orthogonal" and lora.rank % 2:
        raise ConfigError(f"{where}: lora.init = 'orthogonal' needs an even lora.rank, got {lora.rank}")
    if job.deepspeed.zero_stage == 3:
        raise ConfigError(f"{where}: lora.rank > 0 keeps the frozen base whole on every GPU; use "
                          "deepspeed.zero_stage 0-2 (ZeRO-3 would partition only the adapters)")


def _validate_methods(method: MethodConfig, where: str) -> None:
    """Settings of consistency distillation and of the GAN term."""
    cd = method.consistency
    if method.name == "cd" and cd.teacher_steps % method.student_steps:
        raise ConfigError(f"{where}: method.consistency.teacher_steps ({cd.teacher_steps}) must be a multiple of "
                          f"method.student_steps ({method.student_steps}): each student step is a phase of the grid")
    if not 0.0 <= cd.target_decay < 1.0:
        raise ConfigError(f"{where}: method.consistency.target_decay must be in [0, 1), got {cd.target_decay}")
    if method.weights.get("lpips", 0.0) > 0 and not cd.lpips_path:
        raise ConfigError(f"{where}: method.weights.lpips > 0 needs method.consistency.lpips_path (a local "
                          "safetensors state dict of lpips.LPIPS; nothing is downloaded)")
    adv = method.adversarial
    if adv.r1_weight < 0 or adv.r1_sigma <= 0:
        raise ConfigError(f"{where}: method.adversarial needs r1_weight >= 0 and r1_sigma > 0, "
                          f"got {adv.r1_weight}, {adv.r1_sigma}")


def cache_window(cache_frames: int, train_frames: int, chunk_frames: int, sink_frames: int) -> int:
    """The KV window (frames) a causal student streams with: ``cache_frames`` when set, else the training length
    minus one chunk (the most context any chunk saw in training), at least the sinks and one chunk."""
    return cache_frames or max(train_frames - chunk_frames, sink_frames + chunk_frames)


def check_reencode(reencode: int, capacity: int, chunk_frames: int, sinks: int) -> None:
    """``reencode`` (frames re-encoded at a restart; 0: a rolling window) must be whole chunks after the sinks."""
    if reencode and (reencode % chunk_frames or not chunk_frames <= reencode <= capacity - sinks):
        raise ValueError(f"reencode_frames = {reencode} must be 0 or whole chunks of {chunk_frames} frames, at most "
                         f"the window of {capacity} frames minus its {sinks} sink frames")


def _validate_student(job: JobConfig, where: str) -> None:
    """The ``[student]`` table and the methods and data it combines with."""
    student = job.student
    if job.method.name == "regression" and job.data.kind != "ode_pairs":
        raise ConfigError(f"{where}: method.name = 'regression' trains on teacher ODE pairs: set data.kind = "
                          "'ode_pairs' (shards from `distill ode-pairs`)")
    if not student.causal:
        return
    if job.attention.active:
        raise ConfigError(f"{where}: student.causal = true installs its own chunk-causal attention with a KV cache; "
                          "an [attention] pattern would replace it (leave [attention] dense for causal students)")
    if job.lora.rank:
        raise ConfigError(f"{where}: student.causal = true with lora.rank > 0 is not supported: the causal student "
                          "swaps the attention processors of its own copy of the teacher, which a LoRA view on the "
                          "shared frozen base does not have; train causal students in full (lora.rank = 0)")
    if job.method.name not in ("dmd", "regression"):
        raise ConfigError(f"{where}: student.causal = true works with method.name 'dmd' or 'regression', "
                          f"got {job.method.name!r}")
    if student.chunk_frames < 1 or job.data.frames % student.chunk_frames:
        raise ConfigError(f"{where}: student.chunk_frames = {student.chunk_frames} must be >= 1 and divide "
                          f"data.frames = {job.data.frames}")
    if student.sink_frames < 0 or student.cache_frames < 0:
        raise ConfigError(f"{where}: student.cache_frames and student.sink_frames must be >= 0")
    if student.cache_frames and student.cache_frames < student.sink_frames + student.chunk_frames:
        raise ConfigError(f"{where}: student.cache_frames = {student.cache_frames} must hold student.sink_frames "
                          f"+ student.chunk_frames = {student.sink_frames + student.chunk_frames}")
    if not 0.0 <= student.context_noise < 1.0:
        raise ConfigError(f"{where}: student.context_noise = {student.context_noise} must be a noise level in [0, 1)")
    if student.rollout_frames < 0 or student.rollout_frames % job.data.frames:
        raise ConfigError(f"{where}: student.rollout_frames = {student.rollout_frames} must be 0 or a multiple of "
                          f"data.frames = {job.data.frames} (the loss sees whole training-length windows)")
    if student.rollout_frames > job.data.frames and (student.mode != "self_forcing" or job.method.name != "dmd"
                                                     or job.method.weights.get("gan", 0.0) > 0):
        raise ConfigError(f"{where}: student.rollout_frames > data.frames streams self-forcing rollouts for DMD: "
                          "needs method.name = 'dmd' without a GAN term and student.mode = 'self_forcing'")
    try:
        check_reencode(student.reencode_frames, cache_window(student.cache_frames, job.data.frames,
                                                             student.chunk_frames, student.sink_frames),
                       student.chunk_frames, student.sink_frames)
    except ValueError as error:
        raise ConfigError(f"{where}: student.{error}") from None
    if student.mode == "self_forcing" and job.model.gradient_checkpointing:
        raise ConfigError(f"{where}: student.mode = 'self_forcing' runs the KV cache with gradient, which "
                          "model.gradient_checkpointing cannot recompute; turn one off")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], c), with ``c`` read as a TOML value (a bare word is a string)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(table: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = table
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a table")
        node[path[-1]] = value
    return table


def load_job(path: str | Path | None = None, overrides: list[str] = ()) -> JobConfig:
    """Read a TOML job file (or start from defaults when ``path`` is None) and apply overrides."""
    table: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"job file {path} does not exist")
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
        where = str(path)
    apply_overrides(table, list(overrides))
    try:
        job = _build(JobConfig, table, "")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return validate(job, where)


def to_dict(job: JobConfig) -> dict[str, Any]:
    return dataclasses.asdict(job)
