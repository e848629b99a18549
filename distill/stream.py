"""The streaming generator: a causal few-step student that emits decoded video chunk by chunk with a KV cache
(CausVid, Yin et al. 2025; Self-Forcing, Huang et al. 2025), for as long as the caller keeps asking.

A generator directory holds ``streaming.json`` (architecture and transformer config, schedule, step list, chunk
size, cache window and sinks, dtype, latent size, text encoder and decoder references) and ``model.safetensors``.
``distill export --format streaming`` writes one from a trained causal student.

Each chunk costs ``len(timesteps)`` forwards plus one at ``t = 0`` that writes the cache (queued after the chunk's
decode, so that its frames never wait for it). The cache buffers, RoPE tables, step times and noise generator live
on the device and are made once per stream; the only host/device synchronisation is the copy of each finished
chunk's frames. On CUDA a chunk is decoded on a second stream while the next one is generated.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from distill.causal import CausalWanDenoiser, KVCache, denoise_chunk
from distill.conditioning import Conditioning
from distill.config import cache_window, check_reencode
from distill.schedule import device_times, schedule_from_dict, schedule_to_dict
from teachers.wan import WanDenoiser

CONFIG, WEIGHTS = "streaming.json", "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StreamingConfig:
    """What ``streaming.json`` records. ``cache_frames`` is the KV window (latent frames, sinks included);
    ``text_encoder`` is ``{"kind": "minilm", "path": ""}`` (empty path: the packaged MiniLM) or
    ``{"kind": "none"}`` (the caller passes embeddings); ``decoder`` is ``{"kind": "identity"}`` (pixel-space
    latents) or ``{"kind": "wan_vae", "path": DIR}`` (a local diffusers ``AutoencoderKLWan``).
    ``coordinate_frames``: the model's coordinate input channels (``WanDenoiser``; 0, the default of files
    written before they existed: none)."""

    transformer: dict[str, Any]
    schedule: dict[str, Any]
    timesteps: list[float]
    chunk_frames: int
    cache_frames: int
    latent_size: list[int]  # [channels, height, width]
    sink_frames: int = 0
    dtype: str = "float32"
    architecture: str = "WanTransformer3DModel"
    text_encoder: dict[str, str] = field(default_factory=lambda: {"kind": "minilm", "path": ""})
    decoder: dict[str, str] = field(default_factory=lambda: {"kind": "identity"})
    fps: float = 8.0
    coordinate_frames: int = 0
    context_noise: float = 0.0  # the noise level of the cache writes (StudentConfig.context_noise)
    reencode_frames: int = 0  # frames re-encoded when the window is full (StudentConfig.reencode_frames; 0: rolling)

    def __post_init__(self) -> None:
        if self.architecture != "WanTransformer3DModel":
            raise ValueError(f"{CONFIG}: architecture {self.architecture!r} is not supported (WanTransformer3DModel)")
        if self.dtype not in DTYPES:
            raise ValueError(f"{CONFIG}: dtype {self.dtype!r}; expected one of {list(DTYPES)}")
        if not self.timesteps:
            raise ValueError(f"{CONFIG}: timesteps is empty")
        if self.cache_frames < self.sink_frames + self.chunk_frames:
            raise ValueError(f"{CONFIG}: cache_frames ({self.cache_frames}) must hold sink_frames ({self.sink_frames}) "
                             f"plus one chunk ({self.chunk_frames})")
        check_reencode(self.reencode_frames, self.cache_frames, self.chunk_frames, self.sink_frames)
        if not 0.0 <= self.context_noise < 1.0:
            raise ValueError(f"{CONFIG}: context_noise ({self.context_noise}) must be a noise level in [0, 1)")
        if len(self.latent_size) != 3:
            raise ValueError(f"{CONFIG}: latent_size must be [channels, height, width], got {self.latent_size}")

    @classmethod
    def read(cls, directory: str | Path) -> "StreamingConfig":
        path = Path(directory) / CONFIG
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a streaming generator directory (no {CONFIG})")
        table = json.loads(path.read_text())
        known = set(cls.__dataclass_fields__)
        if set(table) - known:
            raise ValueError(f"{path}: unknown keys {sorted(set(table) - known)}")
        return cls(**table)


class IdentityDecoder:
    """Pixel-space latents (the tiny domain): frames are the latents."""

    def reset(self) -> None:
        pass

    def __call__(self, latents: Tensor) -> Tensor:
        return latents


class WanVAEDecoder:
    """Decodes Wan latents chunk by chunk with the VAE's causal convolution cache kept between chunks, so a
    streamed video decodes as the whole clip would (the first latent frame gives one frame, later ones four).

    Speed switches (``eval/bench_streaming.py`` measures each): ``batch_frames`` sends all latent frames of a chunk
    through the decoder in one call instead of diffusers' one call per frame (the causal cache makes both equal;
    the stream's first frame, which the VAE treats specially, still goes alone): fewer, larger convolutions.
    ``cudnn_benchmark`` lets cuDNN time its algorithms per shape around the decode (its heuristics choose poorly
    for bf16 3-D convolutions; the few shapes of a stream are timed once). ``channels_last`` keeps weights and
    activations channels-last (NDHWC), the layout of cuDNN's tensor-core kernels.
    """

    def __init__(self, vae, batch_frames: bool = True, cudnn_benchmark: bool = True, channels_last: bool = False):
        self.vae = vae
        param = next(vae.parameters())
        # on the VAE's device once: a host tensor moved at every chunk would be a blocking copy
        self.mean, self.std = (torch.tensor(values, dtype=param.dtype).view(1, -1, 1, 1, 1).to(param.device)
                               for values in (vae.config.latents_mean, vae.config.latents_std))
        self.batch_frames, self.cudnn_benchmark = batch_frames, cudnn_benchmark
        self._channels_last = False
        self.channels_last = channels_last
        self.first = True

    @property
    def channels_last(self) -> bool:
        return self._channels_last

    @channels_last.setter
    def channels_last(self, on: bool) -> None:
        for module in self.vae.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.nn.Parameter) and weight.ndim in (4, 5):
                layout = torch.channels_last if weight.ndim == 4 else torch.channels_last_3d
                weight.data = weight.data.contiguous(memory_format=layout if on else torch.contiguous_format)
        self._channels_last = on

    def reset(self) -> None:
        self.vae.clear_cache()
        self.first = True

    def __call__(self, latents: Tensor) -> Tensor:
        z = latents.to(self.vae.dtype) * self.std + self.mean
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last_3d)
        with _cudnn_benchmark(self.cudnn_benchmark):
            x = self.vae.post_quant_conv(z)
            frames = [self._decode(x[:, :, part]) for part in self._calls(x.shape[2])]
        return torch.cat(frames, dim=2).clamp(-1, 1)

    def _calls(self, frames: int) -> list[slice]:
        """The latent frames of each decoder call."""
        if not self.batch_frames:
            return [slice(i, i + 1) for i in range(frames)]
        return [slice(0, 1), slice(1, frames)] if self.first and frames > 1 else [slice(0, frames)]

    def _decode(self, x: Tensor) -> Tensor:
        """diffusers' ``AutoencoderKLWan._decode`` loop body, without clearing the cache."""
        vae = self.vae
        vae._conv_idx = [0]
        out = vae.decoder(x, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=self.first)
        self.first = False
        return out


@contextlib.contextmanager
def _cudnn_benchmark(on: bool) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` set to ``on`` inside, as it was outside."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def load_decoder(spec: dict[str, str], device, dtype: torch.dtype):
    if spec.get("kind") == "identity":
        return IdentityDecoder()
    if spec.get("kind") == "wan_vae":
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(spec["path"], torch_dtype=dtype, local_files_only=True)
        return WanVAEDecoder(vae.to(device).eval())
    raise ValueError(f"{CONFIG}: decoder {spec!r}; expected kind 'identity' or 'wan_vae' (with a local path)")


def to_uint8_frames(video: Tensor) -> Tensor:
    """``[C, T, H, W]`` in ``[-1, 1]`` -> ``uint8`` ``[T, H, W, 3]`` on the video's device."""
    video = video.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
    return video.expand(-1, -1, -1, 3) if video.shape[-1] == 1 else video


Prompt = str | Sequence[str] | Callable[[int], str]


class StreamingGenerator:
    """``stream(prompt, num_chunks, seed)`` yields ``uint8`` frames ``[F, H, W, 3]`` per chunk; ``prompt`` is a
    string, one string per chunk, or a function of the chunk index (the prompt may change between chunks)."""

    def __init__(self, model: CausalWanDenoiser, config: StreamingConfig, text_encoder=None, decoder=None,
                 overlap_decode: bool = True):
        self.model, self.config, self.text_encoder = model.eval(), config, text_encoder
        self.decoder = decoder or IdentityDecoder()
        self.overlap_decode = overlap_decode  # on CUDA: decode chunk k while chunk k + 1 is generated
        self._cache: KVCache | None = None
        self._decode_stream: torch.cuda.Stream | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        load_text_encoder: bool = True) -> "StreamingGenerator":
        directory = Path(directory)
        config = StreamingConfig.read(directory)
        dtype = DTYPES[config.dtype]
        base = WanDenoiser.from_config(config.transformer, schedule_from_dict(config.schedule), dtype, seed=None,
                                       coordinate_frames=config.coordinate_frames)
        missing, unexpected = base.transformer.load_state_dict(load_file(str(directory / WEIGHTS)), strict=False)
        if missing or unexpected:
            raise ValueError(f"{directory / WEIGHTS}: missing {missing[:5]}, unexpected {unexpected[:5]} parameters")
        model = CausalWanDenoiser.from_bidirectional(base.to(device), config.chunk_frames)
        text_encoder = None
        if load_text_encoder and config.text_encoder.get("kind") == "minilm":
            from distill.text import TextEncoder

            text_encoder = TextEncoder.from_pretrained(config.text_encoder.get("path") or None, device=device)
        return cls(model, config, text_encoder, load_decoder(config.decoder, device, dtype))

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dtype = DTYPES[self.config.dtype]
        state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in self.model.transformer.state_dict().items()}
        save_file(state, str(directory / WEIGHTS))
        (directory / CONFIG).write_text(json.dumps(asdict(self.config), indent=1))
        return directory

    def _conditioning(self, prompt: str) -> Conditioning:
        if self.text_encoder is None:
            raise ValueError("this generator has no text encoder: pass embeddings to stream_embeddings()")
        text, mask = self.text_encoder.encode([prompt])  # the encoder caches repeated prompts
        return Conditioning(text.to(self.device), mask.to(self.device))

    def stream(self, prompt: Prompt, num_chunks: int, seed: int = 0) -> Iterator[np.ndarray]:
        """Decoded ``uint8`` frames of each chunk, as soon as it is generated."""
        if isinstance(prompt, str):
            prompt_of = lambda c: prompt  # noqa: E731
        elif callable(prompt):
            prompt_of = prompt
        else:
            prompts = list(prompt)
            if len(prompts) < num_chunks:
                raise ValueError(f"{len(prompts)} prompts for {num_chunks} chunks: give one per chunk")
            prompt_of = prompts.__getitem__
        for frames in self.stream_embeddings(lambda c: self._conditioning(prompt_of(c)), num_chunks, seed):
            yield frames.cpu().numpy()

    @torch.no_grad()
    def stream_embeddings(self, cond_of: Callable[[int], Conditioning], num_chunks: int, seed: int = 0,
                          decode: bool = True) -> Iterator[Tensor]:
        """Frames (``uint8`` ``[F, H, W, 3]`` on the device, ready for the current stream) or, with
        ``decode=False``, latents ``[1, C, c, h, w]`` of each chunk (the chunk's cache write, queued when the next
        chunk is asked for, reads them: do not change them in place), conditioned on ``cond_of(chunk_index)``.
        Nothing here waits on the device. With ``overlap_decode`` on CUDA, ``cond_of(c + 1)`` is asked for before
        chunk ``c``'s frames are handed over (chunk ``c + 1`` is generated while ``c`` decodes)."""
        latents = self._latents(cond_of, num_chunks, seed)
        if not decode:
            yield from latents
            return
        self.decoder.reset()
        if self.overlap_decode and self.device.type == "cuda":
            yield from self._overlapped(latents)
        else:
            for x0 in latents:
                yield self._frames(x0)

    def _latents(self, cond_of: Callable[[int], Conditioning], num_chunks: int, seed: int) -> Iterator[Tensor]:
        """Each chunk's ``x0`` once its steps are queued; its cache write is queued when the next chunk is asked
        for, after the caller has queued what it does with this one (the last chunk's, which no chunk reads, never)."""
        cfg, model, device = self.config, self.model, self.device
        channels, height, width = cfg.latent_size
        if self._cache is None or self._cache.k.device != device:
            self._cache = model.new_cache(1, height, width, cfg.cache_frames, cfg.sink_frames, cfg.reencode_frames,
                                          device=device)
        cache = self._cache
        cache.reset()
        generator = torch.Generator(device).manual_seed(seed)
        times = device_times(cfg.timesteps, device)
        shape = (1, channels, cfg.chunk_frames, height, width)
        for c in range(num_chunks):
            cond = cond_of(c)
            step = lambda x, t: model.denoise(x, t.expand(1), cond, cache=cache)  # noqa: E731
            noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
            x0 = denoise_chunk(step, noise, times, model.schedule, generator)
            yield x0
            if c + 1 < num_chunks:
                model.write_cache(x0, cond, cache, cfg.context_noise, generator)

    def _frames(self, x0: Tensor) -> Tensor:
        """A chunk's decoded ``uint8`` frames, queued on the current stream."""
        return to_uint8_frames(self.decoder(x0)[0])

    def _overlapped(self, latents: Iterator[Tensor]) -> Iterator[Tensor]:
        """Frames decoded on a second CUDA stream while the current stream generates the next chunk. Chunk ``c``
        is handed over once chunk ``c + 1``'s steps are queued, the first chunk at once (its latency must not wait
        for a second chunk). The decode stream has the higher priority, so that a decode ends within the next
        chunk's steps instead of trailing behind them."""
        main, side = torch.cuda.current_stream(self.device), self._side_stream()
        pending: list[tuple[Tensor, torch.cuda.Event]] = []
        for c, x0 in enumerate(latents):
            side.wait_stream(main)  # x0 is ready
            x0.record_stream(side)  # and its memory is not reused before the decode has read it
            with torch.cuda.stream(side):
                pending.append((self._frames(x0), side.record_event()))
            lag = 1 if c else 0  # the first chunk at once
            while len(pending) > lag:
                yield _hand_over(*pending.pop(0), main)
        for frames, done in pending:
            yield _hand_over(frames, done, main)

    def _side_stream(self) -> torch.cuda.Stream:
        if self._decode_stream is None or self._decode_stream.device != self.device:
            self._decode_stream = torch.cuda.Stream(self.device, priority=-1)
        return self._decode_stream


def _hand_over(frames: Tensor, done: torch.cuda.Event, stream: torch.cuda.Stream) -> Tensor:
    """``frames`` made on another stream, safe to use on ``stream``: it waits for them, and their memory is kept
    until its work on them is done."""
    stream.wait_event(done)
    frames.record_stream(stream)
    return frames


def generator_from_model_dir(model_dir: str | Path, cache_frames: int = 0, sink_frames: int | None = None,
                             dtype: str = "", decoder: dict[str, str] | None = None,
                             text_encoder: dict[str, str] | None = None, fps: float = 8.0,
                             device: str | torch.device = "cpu", reencode_frames: int | None = None
                             ) -> StreamingGenerator:
    """The streaming generator of a trained causal student (``<output.dir>/model`` with a ``method.json`` that
    records ``causal``), without its text encoder or decoder loaded. ``cache_frames``, ``sink_frames`` and
    ``reencode_frames`` default to the job's (a window of the training length minus one chunk: the most context
    any chunk saw in training)."""
    model_dir = Path(model_dir)
    method_file = model_dir / "method.json"
    method = json.loads(method_file.read_text()) if method_file.is_file() else {}
    causal = method.get("causal")
    if not causal or "timesteps" not in method:
        raise ValueError(f"{method_file}: not a causal few-step student (needs 'causal' and 'timesteps'); train one "
                         "with [student] causal = true")
    model = WanDenoiser.from_pretrained(model_dir)
    if model.offset_frames:
        raise ValueError(f"{model_dir}: a model with a clip-offset input channel (a long-video teacher) does not "
                         "stream; streaming students start from the video's opening and have none")
    chunk = causal["chunk_frames"]
    sink_frames = causal.get("sink_frames", 0) if sink_frames is None else sink_frames
    config = StreamingConfig(
        transformer={k: v for k, v in model.transformer.config.items() if not k.startswith("_")},
        schedule=schedule_to_dict(model.schedule), timesteps=method["timesteps"], chunk_frames=chunk,
        cache_frames=cache_window(cache_frames or causal.get("cache_frames", 0), causal["train_frames"], chunk,
                                  sink_frames),
        latent_size=causal["latent_size"], sink_frames=sink_frames,
        dtype=dtype or str(next(model.parameters()).dtype).removeprefix("torch."),
        text_encoder=text_encoder or {"kind": "minilm", "path": ""}, decoder=decoder or {"kind": "identity"}, fps=fps,
        coordinate_frames=model.coordinate_frames, context_noise=causal.get("context_noise", 0.0),
        reencode_frames=causal.get("reencode_frames", 0) if reencode_frames is None else reencode_frames)
    return StreamingGenerator(CausalWanDenoiser.from_bidirectional(model.to(device), chunk), config)


def export_streaming(model_dir: str | Path, out_dir: str | Path, cache_frames: int = 0, sink_frames: int | None = None,
                     dtype: str = "", decoder: dict[str, str] | None = None, text_encoder: dict[str, str] | None = None,
                     fps: float = 8.0, reencode_frames: int | None = None) -> Path:
    """``distill export --format streaming``: a trained causal student as a streaming generator directory."""
    return generator_from_model_dir(model_dir, cache_frames, sink_frames, dtype, decoder, text_encoder, fps,
                                    reencode_frames=reencode_frames).save_pretrained(out_dir)


def measure(generator: StreamingGenerator, cond_of: Callable[[int], Conditioning], num_chunks: int,
            seed: int = 0, decode: bool = True) -> dict[str, float]:
    """First-chunk latency (stream start to the chunk's frames on the host) and sustained frames per second
    (chunks after the first), after a warm-up stream long enough to fill and roll the cache (every shape the
    timed stream meets: kernels, allocator, compiled graphs), consumed like the timed one and then waited for (work
    it left queued would otherwise count against the first chunk). Video frames count after decoding; without
    decoding, latent frames times the decoder's temporal ratio (what decoding would give)."""
    cfg = generator.config
    ratio = 4 if cfg.decoder.get("kind") == "wan_vae" else 1
    for chunk in generator.stream_embeddings(cond_of, cfg.cache_frames // cfg.chunk_frames + 2, seed, decode):
        chunk.cpu()
    if generator.device.type == "cuda":
        torch.cuda.synchronize(generator.device)  # the timed stream starts on an idle device
    began, stamps, frames = time.perf_counter(), [], []
    for chunk in generator.stream_embeddings(cond_of, num_chunks, seed, decode):
        chunk.cpu()  # the host has the frames: the only synchronisation
        stamps.append(time.perf_counter() - began)
        frames.append(chunk.shape[0] if decode else chunk.shape[2] * ratio)
    sustained = sum(frames[1:]) / (stamps[-1] - stamps[0]) if num_chunks > 1 else frames[0] / stamps[0]
    return {"first_chunk_latency_s": round(stamps[0], 4), "fps": round(sustained, 2),
            "frames": sum(frames), "chunks": num_chunks, "seconds": round(stamps[-1], 4)}


def write_stream(generator: StreamingGenerator, prompts: str | Sequence[str], seconds: float, out: str | Path,
                 seed: int = 0, fps: float = 0) -> dict[str, float]:
    """Stream ``seconds`` of video into ``out`` chunk by chunk: ``.mp4`` is fragmented (playable while it grows),
    ``.gif`` is written at the end, ``.npy`` (for machines without PyAV) too. ``prompts``: one prompt, or a list
    whose ``c``-th entry conditions chunk ``c`` (the last one holds). Returns frames, first-chunk latency, fps."""
    from tqdm.auto import tqdm

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    fps = fps or generator.config.fps
    ratio = 4 if generator.config.decoder.get("kind") == "wan_vae" else 1  # video frames per latent frame
    num_chunks = max(1, math.ceil(seconds * fps / (ratio * generator.config.chunk_frames)))
    out = Path(out)
    frames, collected, first = 0, [], None
    writer = None
    if out.suffix != ".npy":
        from distill.video import VideoWriter

        writer = VideoWriter(out, fps=fps)
    began = time.perf_counter()
    try:
        with tqdm(total=num_chunks, desc="stream", unit="chunk") as bar:
            for chunk in generator.stream(lambda c: prompts[min(c, len(prompts) - 1)], num_chunks, seed):
                if first is None:
                    first = time.perf_counter() - began
                frames += len(chunk)
                writer.write(chunk) if writer is not None else collected.append(chunk)
                bar.set_postfix(fps=f"{frames / (time.perf_counter() - began):.1f}", first_chunk=f"{first:.3f}s")
                bar.update(1)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        np.save(out, np.concatenate(collected))
    return {"frames": frames, "first_chunk_latency_s": first, "fps": frames / (time.perf_counter() - began)}
