"""GPU benchmark: a causal student at Wan2.1-T2V-1.3B size (random weights) streaming 832x480 video in chunks of
3 latent frames, 4 steps per chunk plus the cache write (Self-Forcing's setting, Huang et al. 2025): first-chunk
latency and sustained frames per second, DiT alone and with the Wan VAE decode (diffusers ``AutoencoderKLWan``,
random weights, decoding chunk by chunk with its causal convolution cache). Writes
``eval/results/streaming_<gpu>.json``.

    python eval/bench_streaming.py                 # bf16, eager, then torch.compile rows when --compile

The generator is the product's :class:`distill.stream.StreamingGenerator` (static KV buffers, no host
synchronisation per step); random 512-token text embeddings stand in for umT5's.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from distill.causal import CausalWanDenoiser
from distill.conditioning import Conditioning
from distill.schedule import schedule_to_dict
from distill.stream import StreamingConfig, StreamingGenerator, WanVAEDecoder, measure
from eval.results import device_name, write_results
from teachers.wan import WanDenoiser


def gpu_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100`` (the file name's ``<gpu>``)."""
    found = re.search(r"\b([a-z]+\d{2,4}[a-z]?)\b", name.lower())
    return found.group(1) if found else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def build_generator(source: str, latent_size: tuple[int, int], chunk_frames: int, steps: int, cache_frames: int,
                    dtype: torch.dtype, device: torch.device, vae_config: dict | None) -> StreamingGenerator:
    """A streaming generator with random weights from a Wan preset or config file, built on the device (fast
    init), with the Wan VAE decoder when ``vae_config`` is given."""
    torch.manual_seed(0)
    with torch.device(device):
        model = WanDenoiser.load(source, dtype=dtype)
    schedule = model.schedule
    latent = (model.latent_channels, *latent_size)
    config = StreamingConfig(transformer={k: v for k, v in model.config.items() if not k.startswith("_")},
                             schedule=schedule_to_dict(schedule),
                             timesteps=schedule.timesteps(steps)[:-1].tolist(), chunk_frames=chunk_frames,
                             cache_frames=cache_frames, latent_size=list(latent), dtype=str(dtype).split(".")[-1],
                             text_encoder={"kind": "none"},
                             decoder={"kind": "wan_vae" if vae_config is not None else "identity", "path": ""})
    decoder = None
    if vae_config is not None:
        from diffusers import AutoencoderKLWan

        with torch.device(device):
            vae = AutoencoderKLWan(**vae_config).to(dtype).eval()
        decoder = WanVAEDecoder(vae)
    return StreamingGenerator(CausalWanDenoiser.from_bidirectional(model, chunk_frames).to(device), config,
                              decoder=decoder)


def compile_blocks(generator: StreamingGenerator) -> None:
    """``torch.compile`` each transformer block (shapes change with the cache fill, hence ``dynamic``)."""
    for block in generator.model.transformer.blocks:
        block.compile(dynamic=True)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b",
                        help="a teachers.wan preset or a transformer config .json")
    parser.add_argument("--height", type=int, default=60, help="latent height (480 / 8)")
    parser.add_argument("--width", type=int, default=104, help="latent width (832 / 8)")
    parser.add_argument("--chunk-frames", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cache-frames", type=int, default=18,
                        help="KV window in latent frames (21-frame training clips minus one chunk)")
    parser.add_argument("--chunks", type=int, default=14, help="chunks streamed per measurement")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--vae-config", default="{}", help="AutoencoderKLWan config overrides (JSON); 'none': no VAE")
    parser.add_argument("--compile", action="store_true", help="also measure with torch.compile'd blocks")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="", help="default: eval/results/streaming_<gpu>.json")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = getattr(torch, args.dtype)
    vae_config = None if args.vae_config == "none" else json.loads(args.vae_config)
    generator = build_generator(args.preset, (args.height, args.width), args.chunk_frames, args.steps,
                                args.cache_frames, dtype, device, vae_config)
    channels, text_dim = generator.model.latent_channels, generator.model.config.text_dim
    text = torch.randn(1, args.text_tokens, text_dim, device=device, dtype=dtype)
    cond = Conditioning(text)
    name = device_name(device)
    model_size = Path(args.preset).stem if args.preset.endswith(".json") else args.preset
    common = {"model_size": model_size, "resolution": f"{args.width * 8}x{args.height * 8}",
              "latent": [channels, args.height, args.width], "chunk_frames": args.chunk_frames, "steps": args.steps,
              "forwards_per_chunk": args.steps + 1, "cache_frames": args.cache_frames, "dtype": args.dtype,
              "chunks": args.chunks}
    rows, failures = [], []
    for compiled in ([False, True] if args.compile else [False]):
        if compiled:
            try:
                compile_blocks(generator)
            except Exception as err:  # noqa: BLE001 - the eager rows still stand; the failure goes in the notes
                failures.append(f"torch.compile: {type(err).__name__}: {err}")
                break
        for decode in ([False, True] if vae_config is not None else [False]):
            with torch.inference_mode():
                try:
                    speed = measure(generator, lambda c: cond, args.chunks, decode=decode)
                except Exception as err:  # noqa: BLE001
                    if not compiled:
                        raise
                    failures.append(f"torch.compile: {type(err).__name__}: {err}")
                    break
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            rows.append({**common, "includes_vae_decode": decode, "compiled": compiled, **speed,
                         "peak_gib": None if peak is None else round(peak, 2)})
            print(f"compiled={compiled!s:5s} vae_decode={decode!s:5s} first_chunk={speed['first_chunk_latency_s']:.3f}s"
                  f" fps={speed['fps']:.1f}")
    notes = (f"Causal Wan student with random weights ({args.preset}), {args.dtype}, batch 1, {args.steps} steps per "
             f"chunk of {args.chunk_frames} latent frames plus one t=0 forward writing the KV cache "
             f"(window {args.cache_frames} latent frames), random {args.text_tokens}-token text embeddings. "
             "first_chunk_latency_s: stream start to the first chunk's frames on the host, after a warm-up stream; "
             "fps: video frames per second over the chunks after the first (DiT only: 4 video frames per latent "
             "frame; with decode: frames the Wan VAE actually produced, decoding chunk by chunk with its causal "
             "cache). Targets (issue 5): >= 17 fps with VAE decode, first chunk < 0.69 s (Self-Forcing on an H100). "
             + " ".join(failures))
    out = args.out or f"eval/results/streaming_{gpu_slug(name)}.json"
    write_results(out, rows, device, notes)
    print(f"{'compiled':8s} {'vae':5s} {'first_chunk_s':>13s} {'fps':>7s}")
    for row in rows:
        print(f"{row['compiled']!s:8s} {row['includes_vae_decode']!s:5s} {row['first_chunk_latency_s']:13.3f} "
              f"{row['fps']:7.1f}")
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
