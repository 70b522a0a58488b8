"""Overhead of the Dask path (issue 15): the CIFAR-size CSDformer-4-384 run in this process
(``csdc run``) and on a local Dask cluster (``csdc run --workers 1`` and ``--workers 2``).

    .venv/bin/pip install -e ".[cluster,bench]"
    .venv/bin/python benchmarks/cluster.py [--images 128] [--batch 32] [--rounds 3]

The model is the random CSDformer-4-384 of ``benchmarks/run.py`` (seed 0), the data random
32x32 images in an uncompressed ``.npz`` that the workers memory-map (path mode, what
``--workers N`` does with ``--data file.npz``). Each round runs the three set-ups one after the
other (so that a change in the machine's load hits all three); a cluster run starts a new
``LocalCluster``. Reported: the medians over rounds of

- images/s of the run itself (for the cluster: first shard submitted to last result merged,
  the ``wall time`` that ``csdc run`` prints), and its time per image relative to the local run
  of the same round (median of the rounds' ratios: the overhead of the distributed path; target
  below +10 %);
- start-up: starting the cluster and connecting (``cluster``), then shipping the network to
  every worker, loading it, building the plan and running the JIT warm-up on a shard of zeros
  (``network``); a local run has neither;
- the shards' compute time per image after each worker's first shard (a fresh worker process
  grows its heap, page by page, during its first shard; the local process has already run),
  divided by the number of workers, against the local run's time per image;
- the share of the workers' time during the run spent outside shards (1 - time running shards /
  (workers x run time)): scheduling, moving results, merging, and the last shard's imbalance;
  what is left of the difference to the local run is the shards' own compute in a worker process;
- each worker's own throughput (samples over the time its shards ran).

The numba kernels are in the on-disk cache before the first round (a warm-up run here).
Nothing here is a test: the figures depend on the machine and its load (printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=128, help="images per run (default 128)")
    p.add_argument("--batch", type=int, default=32, help="batch = shard size (default 32, as benchmarks/run.py)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of local / --workers 1 / --workers 2 (median)")
    args = p.parse_args(argv)

    import numba

    from csdc.backends.numba import NumbaBackend
    from csdc.compiler.pipeline import compile_onnx
    from csdc.runtime.cluster import ClusterOptions, run_on_cluster
    from csdc.runtime.evaluate import run_dataset
    from csdc.training.transformer import export_csdformer_cifar

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "cifar.onnx"
        export_csdformer_cifar(str(model), seed=0)
        net, _ = compile_onnx(model)
        rng = np.random.default_rng(0)
        x = (np.round(rng.random((args.images, 3, 32, 32)) * 255) / 255).astype(np.float32)
        data = Path(tmp) / "cifar.npz"
        np.savez(data, x=x)
        run_dataset(net, NumbaBackend(), x[:args.batch], None, batch=args.batch, progress=False)  # kernels cached

        runs: dict[str, list[dict]] = {"local": [], "--workers 1": [], "--workers 2": []}
        reference = None
        for r in range(args.rounds):
            t0 = time.perf_counter()
            out = run_dataset(net, NumbaBackend(), x, None, batch=args.batch, progress=False)
            seconds = time.perf_counter() - t0
            runs["local"].append({"run": seconds, "cluster": 0.0, "network": 0.0, "outside": 0.0,
                                  "steady": seconds / args.images, "workers": {}})
            reference = out.readout
            for n in (1, 2):
                shards: dict[str, list] = {}  # worker -> [(samples, seconds)] in arrival order
                t0 = time.perf_counter()
                out, rep = run_on_cluster(net, "numba", x, None, ClusterOptions(workers=n), data_path=str(data),
                                          batch=args.batch, progress=False,
                                          on_shard=lambda r: shards.setdefault(r.worker, []).append(
                                              (r.stop - r.start, r.seconds)))
                total = time.perf_counter() - t0
                later = [s for w in shards.values() for s in w[1:]]  # each worker's first shard grows its heap
                assert np.array_equal(out.readout, reference)  # the same results, or the figures mean nothing
                busy = sum(w.seconds for w in rep.per_worker.values())
                runs[f"--workers {n}"].append({
                    "run": rep.run_seconds, "cluster": rep.startup_seconds - rep.ship_seconds,
                    "network": rep.ship_seconds, "total": total, "outside": 1 - busy / (n * rep.run_seconds),
                    "steady": sum(t for _, t in later) / sum(k for k, _ in later) if later else float("nan"),
                    "workers": {a.rsplit(":", 1)[-1]: w.samples_per_s for a, w in rep.per_worker.items()}})
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]['run']:.2f} s" for k, v in runs.items()),
                  file=sys.stderr, flush=True)

    fields = ("run", "cluster", "network", "outside", "steady")
    med = {k: {f: statistics.median(run[f] for run in v) for f in fields} for k, v in runs.items()}
    lines = ["| run | numba threads | images/s | time per image vs local | shard compute per image, after each worker's "
             "first shard, vs local | worker time outside shards | start-up: cluster | start-up: network to workers + "
             "warm-up | per-worker images/s while running shards (last round) |",
             "|---|---|---|---|---|---|---|---|---|"]
    cores = len(os.sched_getaffinity(0))
    for k, m in med.items():
        threads = str(numba.get_num_threads()) if k == "local" else \
            f"{max(1, cores // int(k[-1]))} per worker"
        ws = ", ".join(f"{v:.1f}" for v in runs[k][-1]["workers"].values()) or "-"
        # paired: each round's cluster run against the same round's local run (the load drifts between rounds)
        rel = "-" if k == "local" else \
            f"{100 * (statistics.median(c['run'] / l['run'] for c, l in zip(runs[k], runs['local'])) - 1):+.1f} %"
        start = "-" if k == "local" else f"{m['cluster']:.1f} s"
        ship = "-" if k == "local" else f"{m['network']:.1f} s"
        outside = "-" if k == "local" else f"{100 * m['outside']:.1f} %"
        # per worker thread-set: n workers each computing 1/n of the images
        if k != "local":
            ratio = statistics.median(c["steady"] / int(k[-1]) / l["steady"] for c, l in zip(runs[k], runs["local"]))
        steady = "-" if k == "local" else f"{100 * (ratio - 1):+.1f} %"
        lines.append(f"| {k} | {threads} | {args.images / m['run']:.1f} | {rel} | {steady} | {outside} | {start} "
                     f"| {ship} | {ws} |")
    print("\n".join(lines))
    print(f"\n{args.images} images, shards of {args.batch}, {args.rounds} rounds (medians); {cores} cores; "
          f"load average {' / '.join(f'{v:.2f}' for v in load_start)} at start, "
          f"{' / '.join(f'{v:.2f}' for v in os.getloadavg())} at end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
