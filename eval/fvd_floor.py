"""The FVD-probe's noise floor: real clips of other seeds against the reference clips, at the sample counts the
evaluations use. A model scoring at this level is indistinguishable from real data on this metric (the Frechet
distance of two finite samples of one distribution is not 0). Writes ``eval/results/fvd_probe_floor.json``.

    python -m eval.fvd_floor --num 64 256 512 --seeds 3
"""

from __future__ import annotations

import argparse

import torch

from eval.probe import REFERENCE_SEED, Probe, attribute_accuracy, fvd_probe, real_videos, reference_features
from eval.results import write_results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, nargs="+", default=[64, 256, 512], help="clips per side")
    parser.add_argument("--seeds", type=int, default=3, help="real samples per count (seeds after the reference's)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--out", default="eval/results/fvd_probe_floor.json")
    args = parser.parse_args(argv)

    probe, shape = Probe.load(device=torch.device("cpu")), (args.frames, args.height, args.width)
    rows = []
    for num in args.num:
        reference = reference_features(probe, num, *shape)
        for seed in range(REFERENCE_SEED + 1, REFERENCE_SEED + 1 + args.seeds):
            clips, labels = real_videos(num, *shape, seed)
            accuracy = attribute_accuracy(probe.predict(clips), labels)["mean"]
            rows.append({"model": "real", "method": "data", "num_videos": num, "seed": seed,
                         "accuracy": round(accuracy, 4), "fvd_probe": round(fvd_probe(probe, clips, reference), 3)})
            print(f"num={num:4d} seed={seed}  accuracy={accuracy:.4f}  fvd_probe={rows[-1]['fvd_probe']:.3f}")
    notes = (f"real {args.frames}x{args.height}x{args.width} clips (MovingShapes, seeds after "
             "eval.probe.REFERENCE_SEED) against as many reference clips (eval.probe.reference_features): the "
             "FVD-probe of real data itself at each sample count, and the probe's accuracy on real clips.")
    write_results(args.out, rows, "cpu", notes)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
