"""Runs on a Dask cluster equal the single-process run: a LocalCluster of 2 worker processes
(listening on 127.0.0.1 only), the digits CSDformer (450 images) and a random CIFAR-size
CSDformer (64 images), both data routes (workers memory-map the file; the client scatters the
shards), a delay sweep, a worker killed mid-run, a shard failing on bad data, and the message
when the optional extra is missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")
from dask.system import CPU_COUNT  # noqa: E402

from csdc.backends.numba import NumbaBackend
from csdc.cli import main
from csdc.compiler.pipeline import compile_onnx
from csdc.errors import DataError
from csdc.ir import serialize
from csdc.runtime.cluster import (
    ClusterOptions,
    choose_shard_source,
    local_cluster,
    run_on_cluster,
    shard_threads,
    sweep_on_cluster,
)
from csdc.runtime.datasets import load_digits_split
from csdc.runtime.evaluate import RunOutput, run_dataset
from csdc.runtime.sweep import sweep_delays

ROOT = Path(__file__).resolve().parents[2]
DIGITS_MODEL = ROOT / "examples" / "digits_csdformer" / "model.onnx"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster():
    """One LocalCluster (2 workers) for the module, reached through its scheduler address."""
    with local_cluster(2) as cl:
        yield cl


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    net, _ = compile_onnx(DIGITS_MODEL)
    x, y = load_digits_split("test")
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    np.savez(path, x=x, y=y)
    local = run_dataset(net, NumbaBackend(), x, y, batch=64, progress=False)
    return net, x, y, str(path), local


def _opts(cluster, shards: str) -> ClusterOptions:
    return ClusterOptions(scheduler=cluster.scheduler_address, shard_source=shards)


def assert_same(a: RunOutput, b: RunOutput) -> None:
    """Everything but the timing is identical (integers, floats and the summary; the local run's warm-up
    and kernel-compile figures are timings too)."""
    assert np.array_equal(a.readout, b.readout)
    assert np.array_equal(a.logits, b.logits)
    sa, sb = a.summary.to_dict(), b.summary.to_dict()
    for timing in ("seconds", "warmup_seconds", "compile_seconds", "kernel_cache"):
        sa.pop(timing), sb.pop(timing)
    assert sa == sb
    assert list(sa["per_population"]) == list(sb["per_population"])  # same order in the printed table


@pytest.mark.parametrize("shards", ["path", "scatter"])
def test_digits_csdformer_identical_to_local_run(cluster, digits, shards):
    net, x, y, path, local = digits
    warm = []
    # shards of 24 samples, while the local run used batches of 64: the merge does not depend on the partition
    out, report = run_on_cluster(net, "numba", x, y, _opts(cluster, shards), data_path=path, batch=24, progress=False,
                                 on_shard=lambda res: warm.append(res.warm))
    assert_same(out, local)
    assert warm == [True] * 19  # every shard ran in a thread that had run the warm-up shard (its heap grown)
    assert report.shard_source == shards and report.shards == 19
    assert sum(w.samples for w in report.per_worker.values()) == len(x)
    assert len(report.per_worker) == 2  # both workers ran shards
    assert sorted(report.threads_per_shard.values()) == [max(1, CPU_COUNT // 2)] * 2


def test_auto_uses_the_path_when_workers_see_it_else_scatters(cluster, digits):
    net, x, y, path, local = digits
    _, seen = run_on_cluster(net, "numba", x[:40], y[:40], _opts(cluster, "auto"), data_path=path, batch=40,
                             progress=False)
    _, unseen = run_on_cluster(net, "numba", x[:40], y[:40], _opts(cluster, "auto"), data_path=None, batch=40,
                               progress=False)
    assert (seen.shard_source, unseen.shard_source) == ("path", "scatter")
    with pytest.raises(DataError, match="not found"):
        run_on_cluster(net, "numba", x[:40], y[:40], _opts(cluster, "path"), data_path=path + ".elsewhere",
                       progress=False)


def test_choice_of_the_data_route():
    mine = (1000, 5)
    both = {"tcp://a:1": mine, "tcp://b:1": mine}
    one_blind = {"tcp://a:1": mine, "tcp://b:1": None}
    assert choose_shard_source("auto", "/d.npz", mine, both) == "path"
    assert choose_shard_source("auto", "/d.npz", mine, one_blind) == "scatter"
    assert choose_shard_source("auto", "/d.npz", mine, {"tcp://a:1": (1000, 6)}) == "scatter"  # another version
    assert choose_shard_source("auto", None, None, {}) == "scatter"
    assert choose_shard_source("scatter", "/d.npz", mine, both) == "scatter"
    with pytest.raises(DataError, match=r"workers tcp://b:1 cannot see this file"):
        choose_shard_source("path", "/d.npz", mine, one_blind)


def test_cifar_size_csdformer_identical_to_local_run(cluster, tmp_path):
    pytest.importorskip("torch")
    from csdc.training.transformer import export_csdformer_cifar  # the generator of benchmarks/run.py

    model = tmp_path / "cifar.onnx"
    export_csdformer_cifar(str(model), seed=0)
    net, _ = compile_onnx(model)
    rng = np.random.default_rng(0)
    x = (np.round(rng.random((64, 3, 32, 32)) * 255) / 255).astype(np.float32)
    path = tmp_path / "cifar.npz"
    np.savez(path, x=x)
    local = run_dataset(net, NumbaBackend(), x, None, batch=32, progress=False)
    out, report = run_on_cluster(net, "numba", x, None, _opts(cluster, "path"), data_path=str(path), batch=16,
                                 progress=False)
    assert_same(out, local)
    assert report.shards == 4


def test_sweep_identical_to_local_sweep(cluster, digits):
    net, x, y, path, _ = digits
    delays = list(range(net.T + 1))
    local = sweep_delays(net, NumbaBackend(), delays, x, y, compare=DIGITS_MODEL, batch=64, progress=False)
    rows, report = sweep_on_cluster(net, "numba", delays, x, y, _opts(cluster, "auto"), compare=DIGITS_MODEL,
                                    data_path=path, batch=64, progress=False)
    strip = lambda rs: [{k: v for k, v in asdict(r).items() if k != "seconds"} for r in rs]
    assert strip(rows) == strip(local)
    assert report.shards == len(delays) * 8
    assert rows[0].accuracy < rows[-1].accuracy  # the delays really differ


def test_threads_per_shard_share_the_host():
    assert shard_threads(cores=2, numba_threads=2, host_threads=2) == 1  # --workers 2 here
    assert shard_threads(cores=2, numba_threads=2, host_threads=1) == 2  # --workers 1
    assert shard_threads(cores=32, numba_threads=32, host_threads=32) == 1  # 32 single-thread workers on a node
    assert shard_threads(cores=32, numba_threads=8, host_threads=1) == 8  # NUMBA_NUM_THREADS caps it
    assert shard_threads(cores=4, numba_threads=4, host_threads=8) == 1


@pytest.mark.parametrize("shards", ["path", "scatter"])
def test_killed_worker_loses_no_sample(cluster, digits, shards):
    from distributed import Client

    net, x, y, path, local = digits
    with Client(cluster.scheduler_address) as client:
        client.wait_for_workers(2, timeout=60)
        pids = client.run(os.getpid)
    killed: list[str] = []
    was_busy: list[bool] = []

    def kill_a_busy_worker(res) -> None:
        if not killed:  # once, after the first shard: kill a worker that is running a shard now
            # (the LocalCluster's scheduler runs in this process; a read-only look at its state)
            busy = [ws.address for ws in list(cluster.scheduler.workers.values()) if ws.processing]
            victim = next((a for a in busy if a in pids), next(a for a in pids if a != res.worker))
            os.kill(pids[victim], signal.SIGKILL)
            killed.append(victim)
            was_busy.append(victim in busy)

    out, report = run_on_cluster(net, "numba", x, y, _opts(cluster, shards), data_path=path, batch=16, progress=False,
                                 on_shard=kill_a_busy_worker)
    assert killed
    with pytest.raises(ProcessLookupError):
        os.kill(pids[killed[0]], 0)  # the worker process is gone
    assert_same(out, local)
    assert sum(w.samples for w in report.per_worker.values()) >= len(x)
    if shards == "path":
        assert was_busy == [True]  # every shard is queued at once: the victim had shards to lose
    else:
        assert report.recomputed >= 1  # its scattered shard died with it and was sent again


def test_shard_with_bad_data_fails_the_run_naming_its_samples(cluster, digits, tmp_path):
    net, x, y, _, _ = digits
    short = tmp_path / "short.npz"
    np.savez(short, x=x[:400])  # the workers' copy of the data ends early
    # whichever of the three shards past sample 399 fails first (they may run at the same time) names itself
    with pytest.raises(DataError, match=r"samples (384\.\.415 \(shard 13|416\.\.447 \(shard 14|448\.\.449 \(shard 15) "
                                        r"of 15\) failed: .*400 samples"):
        run_on_cluster(net, "numba", x, y, _opts(cluster, "path"), data_path=str(short), batch=32, progress=False)


def test_cli_workers_equals_local_run(digits, tmp_path, capsys):
    net, x, y, path, _ = digits
    sir = tmp_path / "net.sir"
    serialize.save(net, sir)
    assert main(["run", str(sir), "--data", path, "--no-progress", "--output", str(tmp_path / "local.npz")]) == 0
    capsys.readouterr()
    assert main(["run", str(sir), "--data", path, "--workers", "2", "--batch", "100",
                 "--output", str(tmp_path / "cluster.npz")]) == 0
    text = capsys.readouterr().out
    assert "cluster: 2 local workers" in text and "5 shards of 100 (path)" in text
    a, b = np.load(tmp_path / "local.npz"), np.load(tmp_path / "cluster.npz")
    for key in ("logits", "readout", "labels"):
        assert np.array_equal(a[key], b[key]), key


def test_missing_extra_names_it(digits, tmp_path, monkeypatch, capsys):
    net = digits[0]
    sir = tmp_path / "net.sir"
    serialize.save(net, sir)
    monkeypatch.delitem(sys.modules, "csdc.runtime.cluster")
    monkeypatch.setitem(sys.modules, "distributed", None)  # makes `import distributed` fail
    assert main(["run", str(sir), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'csdc[cluster]'" in err and "--workers / --scheduler" in err


def test_without_cluster_flags_dask_is_not_imported(digits, tmp_path):
    sir = tmp_path / "net.sir"
    serialize.save(digits[0], sir)
    code = ("import sys; from csdc.cli import main; "
            f"rc = main(['run', {str(sir)!r}, '--limit', '16', '--no-progress']); "
            "assert rc == 0; bad = [m for m in ('dask', 'distributed') if m in sys.modules]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_cli_sweep_on_a_scheduler_equals_local_sweep(cluster, digits, tmp_path, capsys):
    net, x, y, path, _ = digits
    sir = tmp_path / "net.sir"
    serialize.save(net, sir)
    common = ["sweep", str(sir), "--data", path, "--limit", "120", "--delays", "0,2,4", "--json"]
    assert main(common) == 0
    local = json.loads(capsys.readouterr().out)
    assert main([*common, "--scheduler", cluster.scheduler_address, "--batch", "50"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert remote["cluster"]["shards"] == 9 and remote["cluster"]["shard_source"] == "path"
    for row in (*local["rows"], *remote["rows"]):
        row.pop("seconds")
    assert remote["rows"] == local["rows"]
