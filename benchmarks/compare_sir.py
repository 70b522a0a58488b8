"""Simulator speed of two compiles of the same model, measured in the same run (issue 10: the
precision policy must not cost speed).

    .venv/bin/python benchmarks/compare_sir.py OLD.sir NEW.sir [--batch 32] [--rounds 3]

Both networks run on the same random batch (CIFAR-like images for a 3x32x32 input, the digits
test set otherwise) with the numba backend (``benchmarks/run.py``'s ``bench_numba``: warm-up,
then the median of timed runs), alternating old and new for ``--rounds`` rounds so that machine
load hits both alike. Prints images/s of each and the ratio new/old (median over rounds). With
``--interleave N`` it then runs N more old/new pairs, one batch each, and reports the medians of both the
wall time and the process's CPU time (all threads) per batch: on a machine shared with other jobs the CPU
time is the steadier measure of the work, the wall time includes waiting for a core.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import bench_numba  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--interleave", type=int, default=0, help="old/new batch pairs timed by wall and CPU time")
    args = p.parse_args()
    from csdc.ir.serialize import load

    old, new = load(args.old), load(args.new)
    if tuple(old.input_shape) != tuple(new.input_shape):
        raise SystemExit("the two networks take different inputs")
    shape = tuple(new.input_shape)
    if shape[0] == 3:
        x = (np.round(np.random.default_rng(0).random((args.batch, *shape)) * 255) / 255).astype(np.float32)
    else:
        from csdc.runtime.datasets import load_digits_split

        x = load_digits_split("test")[0][:args.batch]
    speed: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for label, net in (("old", old), ("new", new)):
            seconds = bench_numba(net, x, args.repeats)[0]
            speed[label].append(len(x) / seconds)
    ratios = [n / o for n, o in zip(speed["new"], speed["old"])]
    for label in ("old", "new"):
        print(f"{label}: {statistics.median(speed[label]):.1f} images/s (rounds: "
              f"{', '.join(f'{v:.1f}' for v in speed[label])})")
    print(f"new / old: {statistics.median(ratios):.3f} (median of {args.rounds} rounds)")
    if args.interleave:
        import time

        from csdc.backends.numba import NumbaBackend

        be = NumbaBackend()
        times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in ("old", "new")}
        for _ in range(args.interleave):
            for label, net in (("old", old), ("new", new)):
                w0, c0 = time.perf_counter(), time.process_time()
                be.run(net, x)
                times[label]["wall"].append(time.perf_counter() - w0)
                times[label]["cpu"].append(time.process_time() - c0)
        for kind in ("wall", "cpu"):
            o, n = (statistics.median(times[k][kind]) for k in ("old", "new"))
            print(f"interleaved {args.interleave} pairs, {kind} time per batch: old {o:.3f} s, new {n:.3f} s, "
                  f"speed new / old {o / n:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
