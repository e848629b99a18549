"""GPU benchmark: a causal student at Wan2.1-T2V-1.3B size (random weights) streaming 832x480 video in chunks of
3 latent frames, 4 steps per chunk plus the cache write (Self-Forcing's setting, Huang et al. 2025): first-chunk
latency and sustained frames per second, DiT alone and with the Wan VAE decode (diffusers ``AutoencoderKLWan``,
random weights, decoding chunk by chunk with its causal convolution cache). Writes
``eval/results/streaming_<gpu>.json``.

    python eval/bench_streaming.py            # every row below in one process (about 4 minutes on an H100)
    python eval/bench_streaming.py --tiny     # CPU smoke run: a toy Wan and a toy VAE, seconds

Rows, in the order run (each names the switches it had on): the DiT alone; with the decode, the path as it was
(one decoder call per latent frame, cuDNN's heuristics, the decode after the DiT on one stream), then cuDNN
autotuning, channels-last (on its own: it may lose), all latent frames of a chunk per decoder call, and the decode
overlapped with the next chunk's DiT on a second CUDA stream; then the DiT alone and everything on with
``torch.compile``'d blocks (last: compiling is not undone); each row once per ``--reencode-frames`` value (a rolling
window, or restarts from that many frames). The generator is the product's
:class:`distill.stream.StreamingGenerator`; random 512-token text embeddings stand in for umT5's.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from distill.causal import CausalWanDenoiser
from distill.conditioning import Conditioning
from distill.schedule import schedule_to_dict
from distill.stream import StreamingConfig, StreamingGenerator, WanVAEDecoder, measure
from eval.results import device_name, gpu_slug, write_results
from teachers.wan import WanDenoiser

# --tiny: a 16-channel toy Wan (the Wan VAE's latent channels) and a toy VAE, small enough for a CPU test
TOY_WAN = {"patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 16,
           "out_channels": 16, "text_dim": 64, "freq_dim": 32, "ffn_dim": 64, "num_layers": 2}
TINY = {"preset": "toy", "height": 4, "width": 4, "chunk_frames": 2, "cache_frames": 2, "chunks": 3,
        "text_tokens": 8, "dtype": "float32", "vae_config": '{"base_dim": 8, "num_res_blocks": 1}'}

SWITCHES = ("vae_batch_frames", "cudnn_benchmark", "channels_last", "overlap_decode")
DECODE_STEPS = ({}, {"cudnn_benchmark": True}, {"cudnn_benchmark": True, "channels_last": True},
                {"cudnn_benchmark": True, "vae_batch_frames": True},
                {"cudnn_benchmark": True, "vae_batch_frames": True, "overlap_decode": True})


def build_generator(source: str | dict, latent_size: tuple[int, int], chunk_frames: int, steps: int,
                    cache_frames: int, dtype: torch.dtype, device: torch.device,
                    vae_config: dict | None) -> StreamingGenerator:
    """A streaming generator with random weights from a Wan preset, config file or dict, built on the device (fast
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
                             decoder={"kind": "wan_vae" if vae_config is not None else "identity", "path": ""},
                             coordinate_frames=model.coordinate_frames)
    decoder = None
    if vae_config is not None:
        from diffusers import AutoencoderKLWan

        with torch.device(device):
            vae = AutoencoderKLWan(**vae_config).to(dtype).eval()
        decoder = WanVAEDecoder(vae)
    return StreamingGenerator(CausalWanDenoiser.from_bidirectional(model, chunk_frames).to(device), config,
                              decoder=decoder)


def plan(vae: bool, compile_blocks: bool, ends_only: bool = False) -> list[dict]:
    """The measured configurations, in the order run: ``compiled``, ``decode`` and every switch of ``SWITCHES``;
    ``ends_only``: the decode as it was and with every switch on, and compiled only with every switch on."""
    old = dict.fromkeys(SWITCHES, False)
    dit = {"decode": False, **old}
    steps = (DECODE_STEPS[0], DECODE_STEPS[-1]) if ends_only else DECODE_STEPS
    decoded = [{"decode": True, **old, **step} for step in steps] if vae else []
    eager = [{"compiled": False, **config} for config in (dit, *decoded)]
    compiled = (*decoded[-1:],) if ends_only and vae else (dit, *decoded[-1:])
    return eager + ([{"compiled": True, **config} for config in compiled] if compile_blocks else [])


def set_switches(generator: StreamingGenerator, row: dict) -> None:
    """Turn the generator's and its decoder's speed switches to a row's (one generator serves every row)."""
    generator.overlap_decode = row["overlap_decode"]
    if isinstance(generator.decoder, WanVAEDecoder):
        decoder = generator.decoder
        decoder.batch_frames, decoder.cudnn_benchmark = row["vae_batch_frames"], row["cudnn_benchmark"]
        decoder.channels_last = row["channels_last"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b",
                        help="a teachers.wan preset or a transformer config .json ('toy' with --tiny)")
    parser.add_argument("--height", type=int, default=60, help="latent height (480 / 8)")
    parser.add_argument("--width", type=int, default=104, help="latent width (832 / 8)")
    parser.add_argument("--chunk-frames", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cache-frames", type=int, default=18,
                        help="KV window in latent frames (21-frame training clips minus one chunk)")
    parser.add_argument("--reencode-frames", type=int, nargs="+", default=[0],
                        help="frames re-encoded when the window is full (distill.causal.KVCache; 0: rolling); several "
                             "values: each row measured once per value, side by side in one process")
    parser.add_argument("--chunks", type=int, default=14, help="chunks streamed per measurement")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--vae-config", default="{}", help="AutoencoderKLWan config overrides (JSON); 'none': no VAE")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure torch.compile'd blocks (default: on CUDA)")
    parser.add_argument("--ends-only", action="store_true",
                        help="only the rows of the path as it was and with every switch on (a short GPU run)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: defaults " + json.dumps(TINY))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="", help="default: eval/results/streaming_<gpu>.json")
    if parser.parse_known_args(argv)[0].tiny:
        parser.set_defaults(**TINY)  # options given explicitly still win
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = getattr(torch, args.dtype)
    vae_config = None if args.vae_config == "none" else json.loads(args.vae_config)
    generator = build_generator(TOY_WAN if args.preset == "toy" else args.preset, (args.height, args.width),
                                args.chunk_frames, args.steps, args.cache_frames, dtype, device, vae_config)
    # one model and decoder, a streaming config per re-encoding value
    generators = {r: StreamingGenerator(generator.model, replace(generator.config, reencode_frames=r),
                                        decoder=generator.decoder) for r in args.reencode_frames}
    channels, text_dim = generator.model.latent_channels, generator.model.config.text_dim
    cond = Conditioning(torch.randn(1, args.text_tokens, text_dim, device=device, dtype=dtype))
    model_size = Path(args.preset).stem if args.preset.endswith(".json") else args.preset
    common = {"model_size": model_size, "resolution": f"{args.width * 8}x{args.height * 8}",
              "latent": [channels, args.height, args.width], "chunk_frames": args.chunk_frames, "steps": args.steps,
              "forwards_per_chunk": args.steps + 1, "cache_frames": args.cache_frames, "dtype": args.dtype,
              "chunks": args.chunks}
    compile_blocks = device.type == "cuda" if args.compile is None else args.compile
    rows, failures, compiled = [], [], False
    for config in plan(vae_config is not None, compile_blocks, args.ends_only):
        if config["compiled"] and not compiled:
            generator.model.compile_blocks()
            compiled = True
        decode = config.pop("decode")
        for reencode, streaming in generators.items():
            set_switches(streaming, config)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                with torch.inference_mode():
                    speed = measure(streaming, lambda c: cond, args.chunks, decode=decode)
            except Exception as err:  # noqa: BLE001 - a compiled row may fail; the eager rows still stand
                if not config["compiled"]:
                    raise
                failures.append(f"torch.compile: {type(err).__name__}: {err}")
                break
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            row = {**common, "reencode_frames": reencode, "writes_per_restart": reencode // args.chunk_frames,
                   "includes_vae_decode": decode, **config, **speed,
                   "peak_gib": None if peak is None else round(peak, 2)}
            rows.append(row)
            print(format_row(row), flush=True)
        if failures:
            break
    notes = (f"Causal Wan student with random weights ({args.preset}), {args.dtype}, batch 1, {args.steps} steps per "
             f"chunk of {args.chunk_frames} latent frames plus one t=0 forward writing the KV cache (stopped after "
             f"the last layer's keys/values; window {args.cache_frames} latent frames), random {args.text_tokens}-token"
             " text embeddings. first_chunk_latency_s: stream start (on an idle device, after a warm-up stream that "
             "fills and rolls the cache) to the first chunk's frames on the host; a chunk's frames are made before "
             "its cache write. fps: video frames per second over the chunks after the first (DiT only: 4 video frames"
             " per latent frame; with decode: frames the Wan VAE actually produced, decoding chunk by chunk with its "
             "causal cache). Switches: vae_batch_frames (all latent frames of a chunk per decoder call), "
             "cudnn_benchmark (cuDNN autotuning around the decode), channels_last (VAE in NDHWC), overlap_decode "
             "(decode on a second, higher-priority CUDA stream while the next chunk's DiT runs; sequential on CPU), "
             "compiled (torch.compile'd blocks, static shapes, cache attention eager). reencode_frames: 0, a rolling "
             "window; K, the window restarts from its last K frames once full (writes_per_restart more cache-write "
             "forwards per restart). Targets (issue 5): >= 17 fps "
             "with VAE decode, first chunk < 0.69 s (Self-Forcing on an H100). " + " ".join(failures))
    out = args.out or f"eval/results/streaming_{gpu_slug(device_name(device))}.json"
    write_results(out, rows, device, notes)
    print(f"{'compiled':8s} {'vae':5s} {'batch':5s} {'cudnn':5s} {'nhwc':5s} {'overlap':7s} {'reencode':8s} "
          f"{'first_chunk_s':>13s} {'fps':>7s}")
    for row in rows:
        print(format_row(row))
    print(f"wrote {out}")
    return rows


def format_row(row: dict) -> str:
    flags = [row["compiled"], row["includes_vae_decode"], *(row[s] for s in SWITCHES), row["reencode_frames"]]
    widths = [8, 5, 5, 5, 5, 7, 8]
    return (" ".join(f"{flag!s:{w}s}" for flag, w in zip(flags, widths))
            + f" {row['first_chunk_latency_s']:13.3f} {row['fps']:7.1f}")


if __name__ == "__main__":
    main()
