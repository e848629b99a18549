"""The ``distill`` command line: data, training, sampling."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _device(choice: str):
    """``auto`` is CUDA where there is one, else the CPU."""
    import torch

    return torch.device("cuda" if choice == "auto" and torch.cuda.is_available() else
                        ("cpu" if choice == "auto" else choice))


def _data_synth(args: argparse.Namespace) -> None:
    """Render moving-shapes clips, encode their captions, write webdataset shards."""
    import torch
    from tqdm.auto import tqdm

    from distill.data.shards import ShardWriter
    from distill.data.synthetic import MovingShapes
    from distill.text import TextEncoder

    dataset = MovingShapes(args.num, args.frames, args.height, args.width, seed=args.seed)
    encoder = TextEncoder.from_pretrained(max_length=args.max_length)
    dtype = getattr(torch, args.dtype)
    with ShardWriter(args.out, max_samples_per_shard=args.shard_size) as writer, \
            tqdm(total=args.num, desc="synth", unit="clip") as bar:
        for start in range(0, args.num, 256):
            items = [dataset[i] for i in range(start, min(start + 256, args.num))]
            text, mask = encoder.encode([item["caption"] for item in items])
            for item, emb, m in zip(items, text, mask):
                writer.write({"key": item["key"], "latents": item["video"].to(dtype), "text_emb": emb.to(dtype),
                              "text_mask": m, "caption": item["caption"], "labels": item["labels"]})
            bar.update(len(items))
    print(f"wrote {args.num} clips to {args.out}")


def _train(args: argparse.Namespace) -> None:
    from distill.config import load_job
    from distill.run import train

    out = train(load_job(args.job, args.set))
    print(f"model written to {out}")


def _sample(args: argparse.Namespace) -> None:
    """Sample one video from a teacher with the Euler sampler and CFG, and write it."""
    import torch

    import teachers
    from distill.conditioning import Conditioning
    from distill.schedule import euler_sample
    from distill.text import TextEncoder
    from distill.video import to_uint8, upscale_nearest, write_gif, write_video

    device = _device(args.device)
    teacher = teachers.load_spec(args.teacher, args.family).to(device).eval()
    if teacher.latent_channels != 3:
        raise SystemExit(f"{args.teacher} generates {teacher.latent_channels}-channel latents; this command writes "
                         "pixel-space (3-channel) models' samples directly and has no VAE decoder yet")
    encoder = TextEncoder.from_pretrained(device=device)
    text, mask = encoder.encode([args.prompt])
    negative, negative_mask = encoder.encode([args.negative_prompt])
    cond = Conditioning(text, mask, negative, negative_mask)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    noise = torch.randn(1, 3, args.frames, args.height, args.width, generator=generator).to(device)
    start = time.perf_counter()
    with torch.no_grad():
        video = euler_sample(lambda x, t: teacher.guided(x, t, cond, args.guidance), noise, teacher.schedule,
                             args.steps, progress=True)
    seconds = time.perf_counter() - start
    frames = upscale_nearest(to_uint8(video[0].float().cpu()), args.scale)
    writer = write_gif if Path(args.out).suffix.lower() == ".gif" else write_video
    writer(args.out, frames, fps=args.fps)
    print(f"wrote {args.out}: {frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]}, "
          f"{args.steps} steps in {seconds:.2f} s on {device}")


def _eval_fvd(args: argparse.Namespace) -> None:
    """FVD between real clips (shards or video files) and generated ones (video files, or a model directory)."""
    import torch
    from tqdm.auto import tqdm

    from eval.fvd import FVD, get_protocol, random_clips
    from eval.i3d import load_i3d_state_dict, load_i3d_torchscript
    from eval.results import write_results
    from eval.sources import generate_videos, read_videos

    if not (args.real and args.fake and args.i3d):
        raise ValueError("eval fvd needs --real, --fake and --i3d")
    device = _device(args.device)
    protocol = get_protocol(args.protocol)
    torchscript = args.i3d_format == "torchscript" or (args.i3d_format == "auto" and "torchscript" in args.i3d)
    extractor = (load_i3d_torchscript if torchscript else load_i3d_state_dict)(args.i3d, device)
    num = args.num or protocol.num_clips
    metric = FVD(extractor, protocol, allow_fewer=bool(args.num))
    generator = torch.Generator().manual_seed(0)
    for clip in tqdm(read_videos(args.real, limit=num), total=num, desc="real clips"):
        metric.update(random_clips(clip, protocol.num_frames, generator, time_dim=1)[None], real=True)
    if Path(args.fake, "method.json").is_file() or Path(args.fake, "config.json").is_file() or \
            Path(args.fake, "transformer").is_dir():
        fake = generate_videos(args.fake, num, (3, protocol.num_frames, args.height, args.width), device,
                               args.batch_size, args.guidance)
        clips = iter(fake)
    else:
        clips = read_videos(args.fake, limit=num)
    for clip in tqdm(clips, total=num, desc="fake clips"):
        metric.update(clip[:, :protocol.num_frames][None], real=False)
    result = metric.compute()
    print(f"FVD ({result['protocol']}): {result['fvd']:.3f} from {result['num_real']} real and "
          f"{result['num_fake']} fake clips")
    if args.out:
        notes = (f"protocol {protocol.name}: {protocol.description}; I3D file {Path(args.i3d).name}; real clips "
                 f"from {args.real} at random offsets (seed 0); fake from {args.fake}")
        write_results(args.out, [{"model": str(args.fake), "metric": "fvd", **result}], device, notes,
                      append=args.append)


def _eval(args: argparse.Namespace) -> None:
    """Probe accuracy, FVD-probe and seconds per video of the teacher's Euler sampler at several step counts,
    and of a few-step student (a directory from ``distill train`` or ``distill export``) at subsets of its steps."""
    import teachers
    from distill.text import TextEncoder
    from distill.video import grid, to_uint8, upscale_nearest, write_gif
    from eval.evaluate import evaluate, load_samplers, teacher_sampler, trained_method
    from eval.probe import Probe, reference_features
    from eval.results import write_results

    if args.metric == "fvd":
        return _eval_fvd(args)
    args.num = args.num or 256
    device = _device(args.device)
    teacher = teachers.load_spec(args.teacher, args.family).to(device).eval()
    probe = Probe.load(device=device)
    encoder = TextEncoder.from_pretrained(device=device)
    real = reference_features(probe, args.num, args.frames, args.height, args.width)
    runs = [("teacher" if steps == max(args.steps) else "naive", "flow", steps,
             teacher_sampler(teacher, steps, args.guidance)) for steps in args.steps]
    students = [(args.student_name, args.student)] if args.student else []
    for spec in args.also_student:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--also-student {spec!r}: expected NAME=DIR")
        students.append((name, path))
    for name, path in students:
        method = trained_method(path)["method"]  # a LoRA student adapts the teacher given here
        samplers = load_samplers(path, device, args.guidance, args.student_steps, base=teacher)
        runs += [(name, method, steps, sampler) for steps, sampler in zip(args.student_steps, samplers)]
    rows, strips = [], []
    for model, method, steps, sampler in runs:
        result = evaluate(sampler, probe, encoder, args.num, device, args.frames, args.height, args.width,
                          args.batch_size, real_features=real)
        videos = result.pop("videos")
        strips.append(grid([to_uint8(v) for v in videos[:args.grid_count]], nrow=args.grid_count))
        rows.append({"model": model, "method": method, "steps": steps, "guidance": args.guidance, **result})
        print(f"{model:8s} steps={steps:3d}  accuracy={result['accuracy']:.3f}  fvd_probe={result['fvd_probe']:9.3f}"
              f"  sec/video={result['sec_per_video']:.4f}")
    notes = (f"{args.num} prompts from eval.evaluate.eval_prompts (seed fixed), batch {args.batch_size}, "
             f"guidance {args.guidance}; FVD-probe against {args.num} unseen real clips; sec_per_video = batched "
             "sampling wall time / videos, text encoding excluded.")
    if args.out:
        write_results(args.out, rows, device, notes, append=args.append)
        print(f"wrote {args.out}")
    if args.grid:
        import numpy as np

        frames = upscale_nearest(np.concatenate(strips, axis=1), args.scale)
        if args.grid.endswith(".npy"):  # raw frames, for machines without a video encoder
            np.save(args.grid, frames)
        else:
            write_gif(args.grid, frames, fps=8)
        print(f"wrote {args.grid}: one row per step count {args.steps}")
    print(f"{'model':8s} {'steps':>5s} {'accuracy':>9s} {'fvd_probe':>10s} {'sec/video':>10s}")
    for row in rows:
        print(f"{row['model']:8s} {row['steps']:5d} {row['accuracy']:9.3f} {row['fvd_probe']:10.3f} "
              f"{row['sec_per_video']:10.4f}")


def _export(args: argparse.Namespace) -> None:
    from distill.export import export_diffusers, export_lora

    if args.format == "streaming":
        from distill.stream import export_streaming

        decoder = {"kind": "wan_vae", "path": args.vae} if args.vae else None
        out = export_streaming(args.model, args.out, args.cache_frames, args.sink_frames, args.dtype, decoder,
                               reencode_frames=args.reencode_frames)
    else:
        out = (export_lora if args.format == "lora" else export_diffusers)(args.model, args.out)
    print(f"exported {args.model} as {args.format} to {out}")


def _demo(args: argparse.Namespace) -> None:
    """Distil the shipped tiny teacher into a 4-step student, export it, and compare it with the teacher."""
    import numpy as np

    import teachers
    from distill.config import load_job
    from distill.export import export_diffusers
    from distill.run import train
    from distill.text import TextEncoder
    from distill.video import grid, to_uint8, upscale_nearest, write_gif
    from eval.evaluate import evaluate, load_sampler, teacher_sampler, trained_method
    from eval.probe import Probe, reference_features

    dev = _device(args.device)
    overrides = [f"output.dir='{args.out}'", f"train.device='{dev.type}'"] + args.set
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    job = load_job(args.job, overrides)
    student_dir = export_diffusers(train(job), Path(args.out) / "student")
    times = trained_method(student_dir)["timesteps"]

    teacher = teachers.load("tiny").to(dev).eval()
    probe, encoder = Probe.load(device=dev), TextEncoder.from_pretrained(device=dev)
    # The 50-step teacher is slow on a CPU, so it is measured on fewer prompts; FVD-probe depends on the
    # number of videos, so only rows with the same count compare on it (the student and the naive sampler).
    samplers = {
        f"teacher ({args.teacher_steps} steps)": (teacher_sampler(teacher, args.teacher_steps, job.method.guidance),
                                                 args.num_teacher),
        f"naive ({len(times)} steps)": (teacher_sampler(teacher, len(times), job.method.guidance), args.num),
        f"student ({len(times)} steps)": (load_sampler(student_dir, dev, job.method.guidance), args.num),
    }
    rows, strips = {}, []
    for name, (sampler, num) in samplers.items():
        real = reference_features(probe, num)
        result = evaluate(sampler, probe, encoder, num, dev, batch_size=min(num, 64), real_features=real)
        strips.append(grid([to_uint8(v) for v in result.pop("videos")[:8]], nrow=8))
        rows[name] = result
    write_gif(Path(args.out) / "teacher_naive_student.gif", upscale_nearest(np.concatenate(strips, axis=1), 3))
    base = rows[next(iter(rows))]["sec_per_video"]
    print(f"\n{'sampler':22s} {'videos':>6s} {'accuracy':>9s} {'fvd_probe':>10s} {'sec/video':>10s} {'speed-up':>9s}")
    for name, r in rows.items():
        print(f"{name:22s} {r['num_videos']:6d} {r['accuracy']:9.3f} {r['fvd_probe']:10.1f} "
              f"{r['sec_per_video']:10.4f} {base / r['sec_per_video']:8.1f}x")
    print(f"student exported to {student_dir}; grid (rows: teacher, naive, student) in "
          f"{Path(args.out) / 'teacher_naive_student.gif'}")


def _ode_pairs(args: argparse.Namespace) -> None:
    """Teacher ODE trajectories at a student's step times, as shards (regression initialisation)."""
    import torch

    import teachers
    from distill.ode_pairs import write_ode_pairs
    from distill.text import TextEncoder

    dev = _device(args.device)
    teacher = teachers.load_spec(args.teacher, args.family).to(dev).eval()
    out = write_ode_pairs(teacher, TextEncoder.from_pretrained(device=dev), args.out, args.num,
                          (teacher.latent_channels, args.frames, args.height, args.width), args.guidance,
                          args.teacher_steps, args.student_steps, args.batch_size, args.seed,
                          shard_size=args.shard_size, dtype=getattr(torch, args.dtype))
    print(f"wrote {args.num} ODE pairs to {out}")


def _stream(args: argparse.Namespace) -> None:
    """Stream a video from a streaming generator into a file as it is generated."""
    from distill.stream import StreamingGenerator, write_stream

    generator = StreamingGenerator.from_pretrained(args.generator, _device(args.device))
    if args.compile:
        generator.model.compile_blocks()
    stats = write_stream(generator, args.prompt, args.seconds, args.out, args.seed, args.fps)
    print(f"wrote {stats['frames']} frames to {args.out}: first chunk after {stats['first_chunk_latency_s']:.3f} s, "
          f"{stats['fps']:.1f} frames/s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write moving-shapes shards with text embeddings")
    synth.add_argument("--out", required=True, help="output directory for the shards")
    synth.add_argument("--num", type=int, required=True, help="number of clips")
    synth.add_argument("--frames", type=int, default=16)
    synth.add_argument("--height", type=int, default=32)
    synth.add_argument("--width", type=int, default=32)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--shard-size", type=int, default=1000, help="clips per shard")
    synth.add_argument("--max-length", type=int, default=32, help="text tokens per caption")
    synth.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    synth.set_defaults(func=_data_synth)

    train = commands.add_parser("train", help="run a training or distillation job file")
    train.add_argument("job", help="TOML job file (see jobs/)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a job setting, e.g. --set train.steps=100 (repeatable)")
    train.set_defaults(func=_train)

    sample = commands.add_parser("sample", help="sample a video from a teacher with the Euler sampler")
    sample.add_argument("--teacher", required=True,
                        help="'tiny' (shipped), a preset name, a config .json, or a local model directory")
    sample.add_argument("--family", default="wan", help="teacher family (default: wan)")
    sample.add_argument("--prompt", required=True)
    sample.add_argument("--negative-prompt", default="")
    sample.add_argument("--steps", type=int, default=50)
    sample.add_argument("--guidance", type=float, default=5.0)
    sample.add_argument("--frames", type=int, default=16)
    sample.add_argument("--height", type=int, default=32)
    sample.add_argument("--width", type=int, default=32)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default="auto")
    sample.add_argument("--fps", type=float, default=8)
    sample.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscale for viewing")
    sample.add_argument("--out", required=True, help="output .mp4 or .gif")
    sample.set_defaults(func=_sample)
    demo = commands.add_parser("demo", help="distil the shipped tiny teacher into a 4-step student and compare")
    demo.add_argument("--job", default=str(Path(__file__).resolve().parents[1] / "jobs" / "demo_tiny_dmd.toml"))
    demo.add_argument("--steps", type=int, default=0, help="training steps (default: the job file's)")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--num", type=int, default=64, help="prompts for the student and the naive sampler")
    demo.add_argument("--num-teacher", type=int, default=16, help="prompts for the (slow) teacher")
    demo.add_argument("--teacher-steps", type=int, default=50)
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a job setting")
    demo.set_defaults(func=_demo)

    export = commands.add_parser("export", help="export a trained model directory (diffusers)")
    export.add_argument("--model", required=True, help="a trained model directory (<output.dir>/model)")
    export.add_argument("--format", choices=["diffusers", "lora", "streaming"], default="diffusers",
                        help="diffusers: a pipeline directory (a LoRA run's student fused into its base); "
                             "lora: a LoRA run's adapter file for the teacher pipeline's load_lora_weights; "
                             "streaming: a causal student as a StreamingGenerator directory")
    export.add_argument("--out", required=True)
    export.add_argument("--cache-frames", type=int, default=0, help="streaming: KV window (default: the job's)")
    export.add_argument("--sink-frames", type=int, default=None, help="streaming: frames never evicted")
    export.add_argument("--reencode-frames", type=int, default=None,
                        help="streaming: frames re-encoded when the window is full (0: a rolling window; default: "
                             "the job's)")
    export.add_argument("--dtype", default="", help="streaming: weights dtype (default: the model's)")
    export.add_argument("--vae", default="", help="streaming: a local AutoencoderKLWan directory to decode with")
    export.set_defaults(func=_export)

    ode = commands.add_parser("ode-pairs", help="write teacher ODE trajectories at a student's step times")
    ode.add_argument("--teacher", default="tiny", help="'tiny' (shipped), a preset, config or directory")
    ode.add_argument("--family", default="wan")
    ode.add_argument("--out", required=True, help="output shard directory")
    ode.add_argument("--num", type=int, required=True, help="number of trajectories")
    ode.add_argument("--student-steps", type=int, default=4)
    ode.add_argument("--teacher-steps", type=int, default=48, help="a multiple of --student-steps")
    ode.add_argument("--guidance", type=float, default=4.0)
    ode.add_argument("--frames", type=int, default=16)
    ode.add_argument("--height", type=int, default=32)
    ode.add_argument("--width", type=int, default=32)
    ode.add_argument("--batch-size", type=int, default=64)
    ode.add_argument("--seed", type=int, default=0)
    ode.add_argument("--shard-size", type=int, default=1000)
    ode.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float32")
    ode.add_argument("--device", default="auto")
    ode.set_defaults(func=_ode_pairs)

    stream = commands.add_parser("stream", help="stream a video from a streaming generator into a file")
    stream.add_argument("--generator", required=True, help="a streaming generator directory (export --format streaming)")
    stream.add_argument("--prompt", required=True, action="append",
                        help="the prompt; repeat to change it between chunks (the last one holds)")
    stream.add_argument("--seconds", type=float, required=True)
    stream.add_argument("--out", required=True, help="output .mp4 (fragmented: playable while it grows), .gif or .npy")
    stream.add_argument("--seed", type=int, default=0)
    stream.add_argument("--fps", type=float, default=0, help="playback frame rate (default: the generator's)")
    stream.add_argument("--compile", action="store_true",
                        help="torch.compile the transformer blocks (the first chunk compiles them)")
    stream.add_argument("--device", default="auto")
    stream.set_defaults(func=_stream)

    evaluate = commands.add_parser(
        "eval", help="probe metrics of samplers (default), or `eval fvd`: FVD against real clips")
    evaluate.add_argument("metric", nargs="?", choices=["probe", "fvd"], default="probe")
    fvd = evaluate.add_argument_group("fvd (distill eval fvd --real ... --fake ... --i3d ... --protocol ...)")
    fvd.add_argument("--real", help="real clips: a shard directory or a folder of video files")
    fvd.add_argument("--fake", help="generated clips: a folder of video files, or a model directory to sample")
    fvd.add_argument("--i3d", help="local I3D file: i3d_torchscript.pt (StyleGAN-V) or i3d_pretrained_400.pt")
    fvd.add_argument("--i3d-format", choices=["auto", "torchscript", "state_dict"], default="auto")
    fvd.add_argument("--protocol", default="fvd2048_16f")
    evaluate.add_argument("--teacher", default="tiny", help="'tiny' (shipped), a preset, config or directory")
    evaluate.add_argument("--family", default="wan")
    evaluate.add_argument("--steps", type=int, nargs="+", default=[50, 4, 2, 1])
    evaluate.add_argument("--guidance", type=float, default=4.0)
    evaluate.add_argument("--student", help="a student directory (with method.json) to evaluate too")
    evaluate.add_argument("--student-name", default="student", help="the student rows' model name")
    evaluate.add_argument("--also-student", action="append", default=[], metavar="NAME=DIR",
                          help="another student to evaluate beside it, rows named NAME (repeatable)")
    evaluate.add_argument("--student-steps", type=int, nargs="+", default=[4, 2, 1],
                          help="evaluate the student with this many of its steps (evenly chosen)")
    evaluate.add_argument("--num", type=int, default=0,
                          help="videos per step count (probe: default 256; fvd: default the protocol's count)")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--frames", type=int, default=16)
    evaluate.add_argument("--height", type=int, default=32)
    evaluate.add_argument("--width", type=int, default=32)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--out", help="results JSON (eval/results/...)")
    evaluate.add_argument("--append", action="store_true", help="add rows to an existing results file")
    evaluate.add_argument("--grid", help="write a GIF (or raw frames, .npy): one row of videos per step count")
    evaluate.add_argument("--grid-count", type=int, default=8, help="videos per grid row")
    evaluate.add_argument("--scale", type=int, default=3)
    evaluate.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"distill {args.command}: error: {err}")


if __name__ == "__main__":
    main()
