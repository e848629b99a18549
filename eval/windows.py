"""Causal students on the tiny domain, on windows of long videos: quality of the first training-length window
and of windows far beyond it (drift), beside the teacher and a bidirectional student on the first window, plus
the streaming generator's first-chunk latency and frames per second. Writes ``eval/results/causal_tiny.json``.

    python -m eval.windows --teacher tiny --bidirectional runs/causal_tiny/bidir/model \\
        --causal dmd_df=runs/causal_tiny/df/model --causal dmd_sf=runs/causal_tiny/sf/model \\
        --windows 0 1 4 --num 256 --out eval/results/causal_tiny.json
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import replace

import torch
from torch import Tensor

from distill.causal import stream_sample
from distill.conditioning import Conditioning
from distill.stream import StreamingGenerator, generator_from_model_dir, measure
from distill.text import TextEncoder
from eval.evaluate import Sampler, eval_prompts, evaluate, generate, load_sampler, trained_method, training_record
from eval.probe import REFERENCE_SEED, Probe, attribute_accuracy, fvd_probe, real_videos
from eval.results import write_results
from teachers.wan import saved_inputs


def causal_sampler(generator: StreamingGenerator) -> Sampler:
    """Whole videos of any length from a streaming generator's model (batched, with its cache window)."""
    model, cfg = generator.model, generator.config

    def sample(cond: Conditioning, noise: Tensor) -> Tensor:
        cache = model.new_cache(noise.shape[0], noise.shape[3], noise.shape[4], cfg.cache_frames, cfg.sink_frames,
                                cfg.reencode_frames)
        return stream_sample(model, noise, cond, cfg.timesteps, cache=cache, context_noise=cfg.context_noise)

    return sample


def at_offset(sampler: Sampler, frame_offset: int) -> Sampler:
    """``sampler`` making the clip that starts ``frame_offset`` frames into the video (for a teacher of long-video
    windows, ``teachers.wan.offset_channel``; the clip itself at 0)."""
    if not frame_offset:
        return sampler

    def sample(cond: Conditioning, noise: Tensor) -> Tensor:
        offsets = torch.full((len(cond),), frame_offset, device=cond.text.device)
        return sampler(replace(cond, frame_offset=offsets), noise)

    return sample


def _shape_and_deviation(videos: Tensor) -> tuple[Tensor, Tensor]:
    """Tiny-domain videos ``[N, C, T, H, W]`` (one shape on a plain background): each pixel's distance from its
    frame's median colour (summed over channels) and the shape mask (pixels far from it), both ``[N, T, H, W]``."""
    v = videos.float().clamp(-1, 1)
    deviation = (v - v.flatten(3).median(dim=3).values[..., None, None]).abs().sum(dim=1)
    return (deviation > 0.5).float(), deviation


def shape_speed(videos: Tensor, jump: float = 6.0) -> float:
    """How fast the shapes of tiny-domain videos ``[N, C, T, H, W]`` move: the mean step, in pixels per frame, of
    the centroid of the shape's pixels, leaving out frames without a shape and steps longer than ``jump`` (a shape
    wrapping around the frame). FVD-probe scores a window's distance from real video; this names one way of
    drifting from it: shapes that slow down."""
    shape, _ = _shape_and_deviation(videos)
    mass = shape.sum(dim=(2, 3))
    rows = torch.arange(videos.shape[3], dtype=torch.float32, device=videos.device).view(-1, 1)
    cols = torch.arange(videos.shape[4], dtype=torch.float32, device=videos.device).view(1, -1)
    y, x = ((shape * axis).sum(dim=(2, 3)) / mass.clamp_min(1) for axis in (rows, cols))
    steps = torch.hypot(y.diff(dim=1), x.diff(dim=1))
    kept = (mass[:, 1:] > 0) & (mass[:, :-1] > 0) & (steps < jump)
    return steps[kept].mean().item() if kept.any() else float("nan")


def grain(videos: Tensor) -> float:
    """How far the background of tiny-domain videos ``[N, C, T, H, W]`` strays from a plain colour: the mean distance
    of non-shape pixels from their frame's median colour (summed over channels; real videos: about 0). The other way
    of drifting: noise that a chunk copies from its context into the next and that compounds."""
    shape, deviation = _shape_and_deviation(videos)
    return ((deviation * (1 - shape)).sum() / (1 - shape).sum().clamp_min(1)).item()


def drift_measures(videos: Tensor) -> dict[str, float]:
    """:func:`shape_speed` and :func:`grain` of a window, as its row records them."""
    return {"shape_speed": round(shape_speed(videos), 3), "grain": round(grain(videos), 4)}


def report(name: str, row: dict) -> None:
    """One printed line per results row (its re-encoding and streaming speed where it has them)."""
    stream = (f"  reencode={row['reencode_frames']}  sinks={row['sink_frames']}  "
              f"first_chunk={row['first_chunk_latency_s']:.4f}s  fps={row['fps']:.1f}" if "fps" in row else "")
    print(f"{name:14s} window {row['window']}  accuracy={row['accuracy']:.3f}  fvd_probe={row['fvd_probe']:.3f}  "
          f"shape_speed={row['shape_speed']:.2f}  grain={row['grain']:.3f}{stream}")


def window_features(probe: Probe, videos: Tensor, frames: int, windows: list[int]) -> dict[int, Tensor]:
    """Probe features of frames ``[k * frames, (k + 1) * frames)`` of ``videos``, per window ``k``."""
    return {k: probe.features(videos[:, :, k * frames:(k + 1) * frames]) for k in windows}


def window_metrics(videos: Tensor, labels: list[dict], probe: Probe, real: dict[int, Tensor], frames: int,
                   windows: list[int]) -> list[dict]:
    """Probe accuracy and FVD-probe of each window ``k`` of ``videos``: against the real videos' same window (drift
    from what the domain does next) and against real training-length clips (window 0; how far the window looks
    from a clip's start, which even real continuations do: their wall contact lies in the first window)."""
    rows = []
    for k in windows:
        clip = videos[:, :, k * frames:(k + 1) * frames]
        accuracy = attribute_accuracy(probe.predict(clip), labels)
        features = probe.features(clip)
        rows.append({"window": k, "frames": [k * frames, (k + 1) * frames], "accuracy": round(accuracy["mean"], 4),
                     "accuracy_per_attribute": {a: round(v, 4) for a, v in accuracy.items() if a != "mean"},
                     "fvd_probe": round(fvd_probe(probe, features, real[k]), 3),
                     "fvd_probe_vs_clips": round(fvd_probe(probe, features, real[0]), 3),
                     **drift_measures(clip)})
    return rows


def evaluate_causal(generator: StreamingGenerator, probe: Probe, encoder: TextEncoder, num: int, device: torch.device,
                    frames: int, height: int, width: int, windows: list[int], batch_size: int, real: dict[int, Tensor],
                    speed_chunks: int) -> list[dict]:
    """One row per window, each with the streaming speed (batch 1, identity decoder) of the generator."""
    captions, labels = eval_prompts(num)
    length = frames * (max(windows) + 1)
    videos, seconds = generate(causal_sampler(generator), captions, encoder, (3, length, height, width), device,
                               batch_size)
    text, mask = encoder.encode([captions[0]])
    cond = Conditioning(text.to(device), mask.to(device))
    speed = measure(generator, lambda c: cond, speed_chunks)
    common = {"steps": len(generator.config.timesteps), "chunk_frames": generator.config.chunk_frames,
              "cache_frames": generator.config.cache_frames, "sink_frames": generator.config.sink_frames,
              "reencode_frames": generator.config.reencode_frames,
              "video_frames": length, "sec_per_video": round(seconds / num, 5), "num_videos": num,
              "first_chunk_latency_s": speed["first_chunk_latency_s"], "fps": speed["fps"]}
    return [{**common, **row} for row in window_metrics(videos, labels, probe, real, frames, windows)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="tiny", help="teacher model directory or 'tiny'")
    parser.add_argument("--teacher-steps", type=int, default=50, help="0 skips the teacher row")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--bidirectional", help="a bidirectional few-step student directory (first window only)")
    parser.add_argument("--causal", action="append", default=[], metavar="NAME=DIR",
                        help="a trained causal student (repeatable)")
    parser.add_argument("--windows", type=int, nargs="+", default=[0, 1, 4])
    parser.add_argument("--num", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=16, help="training length (frames per window)")
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--speed-chunks", type=int, default=40, help="chunks streamed for latency and fps")
    parser.add_argument("--reencode-frames", type=int, nargs="+", default=None,
                        help="stream each causal student once per value, re-encoding this many frames when the window "
                             "is full (0: a rolling window; default: each student's job)")
    parser.add_argument("--sink-frames", type=int, nargs="+", default=None,
                        help="stream each causal student once per value (and per --reencode-frames value), keeping "
                             "this many first frames in the window for good (default: each student's job)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="eval/results/causal_tiny.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    probe, encoder = Probe.load(device=device), TextEncoder.from_pretrained(device=device)
    shape, length = (args.frames, args.height, args.width), args.frames * (max(args.windows) + 1)
    windows = sorted(set(args.windows) | {0})
    real = window_features(probe, real_videos(args.num, *shape, length=length)[0], args.frames, windows)
    videos, labels = real_videos(args.num, *shape, REFERENCE_SEED + 1, length)
    rows = [{"model": "real", "method": "data", **row} for row in window_metrics(videos, labels, probe, real,
                                                                                 args.frames, args.windows)]
    for row in rows:
        report("real", row)
    baselines = []
    if args.teacher_steps:
        teacher = load_sampler(args.teacher, device, args.guidance, args.teacher_steps)
        reads_offsets = saved_inputs(args.teacher)["offset_frames"] > 0  # a shipped name has no inputs.json
        baselines += [("teacher", "flow", args.teacher_steps, k, at_offset(teacher, k * args.frames))
                      for k in (args.windows if reads_offsets else [0])]
    if args.bidirectional:
        trained = trained_method(args.bidirectional)
        baselines.append(("bidirectional", trained["method"], len(trained["timesteps"]), 0,
                          load_sampler(args.bidirectional, device, args.guidance)))
    for model, method, steps, k, sampler in baselines:
        result = evaluate(sampler, probe, encoder, args.num, device, *shape, args.batch_size, real_features=real[k])
        drift = drift_measures(result.pop("videos"))
        rows.append({"model": model, "method": method, "steps": steps, "window": k, **result, **drift})
        report(model, rows[-1])
    for spec in args.causal:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--causal {spec!r}: expected NAME=DIR")
        method, loaded = trained_method(path), generator_from_model_dir(path, device=device)
        record = training_record(path)  # its run's steps and minutes, where the run's log lies beside it
        for reencode, sinks in itertools.product(args.reencode_frames or [loaded.config.reencode_frames],
                                                 args.sink_frames or [loaded.config.sink_frames]):
            # one model, a config per setting
            generator = StreamingGenerator(loaded.model, replace(loaded.config, reencode_frames=reencode,
                                                                 sink_frames=sinks))
            for row in evaluate_causal(generator, probe, encoder, args.num, device, *shape, args.windows,
                                       args.batch_size, real, args.speed_chunks):
                rows.append({"model": name, "method": method["method"], "mode": method["causal"]["mode"], **record,
                             **row})
                report(name, row)
    notes = (f"{args.num} prompts from eval.evaluate.eval_prompts (seed fixed); window k = frames "
             f"[{args.frames}k, {args.frames}(k+1)) of one long video per prompt, streamed with the KV window of the "
             "student's job (reencode_frames: frames written again from the window's first positions once it is "
             f"full; 0: a rolling window). fvd_probe: against window k of {args.num} unseen real videos "
             "(training-length clips whose motion continues past the clip, eval.probe.real_videos); "
             "fvd_probe_vs_clips: against their window 0 (real clips). 'real' rows: other real videos of the same "
             "kind (the floor of both numbers; the probe's direction label is the initial heading, so real windows "
             "after a wall contact score lower). "
             "shape_speed: the shapes' mean centroid step in pixels per frame (eval.windows.shape_speed); grain: "
             "the background pixels' mean distance from their frame's median colour (eval.windows.grain). "
             f"The teacher ({args.teacher_steps} Euler steps, guidance {args.guidance}) and the bidirectional student "
             "generate one training-length clip (window 0 only; a teacher of long-video windows, with an offset "
             "channel, makes window k from its offset). first_chunk_latency_s and fps: batch 1, identity "
             "decoder (pixel space), after a warm-up stream; fps counts chunks after the first. sec_per_video: the "
             "whole long video, batched.")
    write_results(args.out, rows, device, notes)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
