"""Run a compiled network on a Dask cluster: the same results as one process, on many.

``csdc run|sweep ... --workers N`` starts a ``LocalCluster`` (N worker processes bound to
127.0.0.1) and ``--scheduler tcp://host:8786`` connects to an existing Dask scheduler
(SLURM through dask-jobqueue, Kubernetes, a few workstations: docs/cluster.md). This module
is imported only then: without those flags nothing here runs and Dask is not imported.

- **Work unit**: a shard of ``--batch`` consecutive samples (for a sweep: one delay D and one
  shard). A shard is one batch of the single-process run, which the worker's backend cuts
  into per-thread chunks as a local run does.
- **The network** travels once per worker, as the bytes of its ``.sir`` file inside a
  worker plugin (:class:`NetworkPlugin`): the scheduler hands the plugin to every worker,
  including workers that join or are restarted later. On setup each worker loads and
  verifies the network (no pickle of csdc's own data). Then a warm-up task per worker runs a
  shard of zeros in the thread that will run the shards: it builds the backend's plan, loads or
  compiles the numba kernels (the JIT warm-up) and grows that thread's heap to a shard's tensors,
  before any shard (:func:`warm_up`; a worker that joins later warms up on its first shard).
- **Data**: ``path`` mode sends only ``(path, start, stop)``; workers memory-map the uncompressed
  ``.npz`` (:func:`csdc.runtime.datasets.load_npz`, once per worker process) and copy their
  shard's rows. ``scatter`` mode (no file, or a file the workers cannot see) has the client
  read one shard at a time and ``Client.scatter`` it to the cluster, at most one shard per
  worker thread in flight. ``auto`` picks ``path`` when every worker sees the client's file
  (same size and modification time), else ``scatter``.
- **Identical results**: shard results are written into the output arrays at their sample
  index, whatever order they finish in; statistics are Python integers (sums and maxima,
  exact and order-independent); logits are computed on the client from the merged integer
  readout with the backend's own formula.
- **Faults**: a worker that dies loses nothing. In path mode the scheduler reruns its shards;
  in scatter mode the shards whose scattered data died with it come back cancelled and are
  scattered and submitted again (``recomputed`` in the report). A shard that fails for a
  data error (a :class:`csdc.errors.CsdcError` on the worker) stops the run, and the error
  names the shard's sample range.
- **Threads**: a shard runs with ``cores // (Dask threads of all workers on its host)`` numba
  threads, at most NUMBA_NUM_THREADS (:func:`shard_threads`, worked out by each worker when it
  joins), so a host never runs more shard threads than cores, whatever the split of processes
  and threads. ``--workers N`` starts N processes with one Dask thread each (one shard at a
  time per process), i.e. ``cores // N`` numba threads per shard.
- **Memory**: the shards on a host share the backend's memory budget for live tensors as they
  share its cores (numba: 512 MiB per host, as for one local run). The client holds the results
  (readout, logits, labels) and, in scatter mode, the shard it is sending; each worker holds the
  shard it runs (plus its mapped file pages).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np

from csdc.errors import CsdcError, DataError

try:
    from dask.system import CPU_COUNT  # cores this process may use (affinity and cgroup quota)
    from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker
except ImportError as _exc:  # the optional extra is missing
    raise CsdcError(
        f"--workers / --scheduler run on Dask distributed, which is not installed ({_exc}); "
        "install the extra: pip install 'csdc[cluster]'") from None

from csdc.backends.base import NodeStats, get_backend
from csdc.ir.graph import Network
from csdc.ir.semantics import readout_logits
from csdc.runtime.evaluate import RunOutput, onnx_logits, summarize
from csdc.runtime.sweep import SweepRow, sweep_row

SHARD_SOURCES = ("auto", "path", "scatter")
#: Seconds to wait for the first worker of an existing cluster (batch jobs may be queued).
WAIT_FOR_WORKERS = 600
#: Resubmissions of one shard whose scattered data was lost before the run gives up.
MAX_RESUBMITS = 3


@dataclass(frozen=True)
class ClusterOptions:
    """Where to run: ``workers`` local processes, or the Dask scheduler at ``scheduler``."""

    workers: int | None = None
    scheduler: str | None = None
    shard_source: str = "auto"  # auto | path | scatter


@dataclass
class WorkerThroughput:
    address: str
    samples: int = 0
    seconds: float = 0.0  # time spent running shards

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


@dataclass
class ClusterReport:
    """How a cluster run went: where, how the data travelled, and each worker's throughput."""

    scheduler: str
    local: bool
    workers: int  # at start
    threads_per_shard: dict[str, int]
    startup_seconds: float  # connect or start the cluster, ship the network, warm every worker
    ship_seconds: float = 0.0  # of startup_seconds: network to every worker, loaded, plan built, JIT warmed
    run_seconds: float = 0.0  # from the first shard submitted to the last result merged
    shard_source: str = ""
    shard_size: int = 0
    shards: int = 0
    recomputed: int = 0  # shards submitted again after their scattered data was lost
    per_worker: dict[str, WorkerThroughput] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["per_worker"] = {a: {**asdict(w), "samples_per_s": w.samples_per_s} for a, w in self.per_worker.items()}
        return d

    def line(self) -> str:
        """The final line of a cluster run: per-worker throughput."""
        where = f"{self.workers} local workers" if self.local else f"{self.workers} workers at {self.scheduler}"
        parts = [f"{a.rsplit('/', 1)[-1]} {w.samples} samples {w.samples_per_s:.1f}/s"
                 for a, w in sorted(self.per_worker.items())]
        extra = f", {self.recomputed} shards sent again after a lost worker" if self.recomputed else ""
        return (f"cluster: {where}, start-up {self.startup_seconds:.1f} s, {self.shards} shards of {self.shard_size} "
                f"({self.shard_source}){extra}; per worker: " + ", ".join(parts))


# -- worker side -------------------------------------------------------------------------------
class NetworkPlugin(WorkerPlugin):
    """Carries a network's ``.sir`` bytes to every worker once and keeps it loaded there."""

    def __init__(self, name: str, sir: bytes, backend: str, shard: int):
        self.name = name
        self.sir = sir
        self.backend_name = backend
        self.shard = shard

    async def setup(self, worker) -> None:
        import asyncio

        from distributed.comm import get_address_host

        host = get_address_host(worker.address)
        workers = (await worker.scheduler.identity())["workers"].values()
        on_host = sum(w["nthreads"] for w in workers if w["host"] == host) or worker.state.nthreads
        self.threads = shard_threads(CPU_COUNT, _numba_threads(), on_host)
        self.host_share = min(1.0, self.threads / CPU_COUNT)  # of the host's cores, and so of its memory budget
        # off the event loop, which must keep answering the scheduler's heartbeats meanwhile
        await asyncio.get_running_loop().run_in_executor(None, self._load)

    def _load(self) -> None:
        from csdc.ir.serialize import from_bytes

        self.net = from_bytes(self.sir, source=f"network {self.name}")
        self.backend = get_backend(self.backend_name)
        if hasattr(self.backend, "memory_budget"):
            # the host's shards together keep the live tensors of one local run (numba: 512 MiB),
            # so a shard's chunks are as large as a local run's and the host's caches see the same
            self.backend.memory_budget = max(1, int(self.backend.memory_budget * self.host_share))
        self.delayed: dict[int, Network] = {}
        self.data: dict[tuple, np.ndarray] = {}
        self.warm_threads: set[int] = set()  # threads that ran the warm-up shard

    def use_threads(self) -> None:
        """Give the calling thread this worker's share of numba threads (numba's setting is per thread)."""
        import numba

        numba.set_num_threads(self.threads)

    def teardown(self, worker) -> None:
        self.net = self.backend = None
        self.delayed, self.data = {}, {}

    def network(self, delay: int | None) -> Network:
        if delay is None:
            return self.net
        if delay not in self.delayed:  # kept, so that the backend's plan is built once per delay
            self.delayed[delay] = self.net.with_delay(delay)
        return self.delayed[delay]

    def rows(self, path: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``x`` in the .npz at ``path`` (memory-mapped once per worker)."""
        from csdc.runtime.datasets import load_npz

        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataError(f"{path}: cannot be read on worker {get_worker().address} ({exc})") from None
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self.data:
            self.data = {key: load_npz(path, self.net.input_shape)[0]}
        x = self.data[key]
        if stop > len(x):
            raise DataError(f"{path}: has {len(x)} samples on worker {get_worker().address}, the run needs {stop}")
        return np.ascontiguousarray(x[start:stop], dtype=np.float32)


def shard_threads(cores: int, numba_threads: int, host_threads: int) -> int:
    """Numba threads of one shard: the host's cores shared by the Dask threads of every worker on
    that host (each runs one shard at a time), at most NUMBA_NUM_THREADS, at least one."""
    return max(1, min(numba_threads, cores // max(1, host_threads)))


@dataclass
class ShardResult:
    delay: int | None
    start: int
    stop: int
    readout: np.ndarray
    stats: dict[str, dict[str, int]]  # NodeStats fields by name
    seconds: float
    worker: str
    warm: bool = False  # ran in a thread that had run the warm-up shard


def run_shard(plugin: str, delay: int | None, start: int, stop: int, data: np.ndarray | str) -> ShardResult:
    """Run samples ``start:stop`` (``data``: the .npz path, or the scattered shard itself)."""
    worker = get_worker()
    p = worker.plugins[plugin]
    x = p.rows(data, start, stop) if isinstance(data, str) else data
    if p.backend_name == "numba":
        p.use_threads()
    t0 = time.perf_counter()
    res = p.backend.run(p.network(delay), x)
    seconds = time.perf_counter() - t0
    stats = {name: {k: int(v) for k, v in asdict(s).items()} for name, s in res.stats.items()}
    return ShardResult(delay, start, stop, np.asarray(res.readout, dtype=np.int64), stats, seconds, worker.address,
                       threading.get_ident() in p.warm_threads)


def warm_up(plugin: str) -> None:
    """The JIT warm-up of a worker: a shard of zeros loads (or compiles into the cache) the numba
    kernels and builds the plan. It runs as a task, in the thread that runs the shards, because
    each thread allocates from its own malloc arena, which grows page by page during the first
    shard the thread runs (measured: 1.5x the time of the next shards when the warm-up ran in the
    plugin's set-up thread instead)."""
    p = get_worker().plugins[plugin]
    if p.backend_name == "numba":
        p.use_threads()
        p.backend.run(p.net, np.zeros((p.shard, *p.net.input_shape), dtype=np.float32))
    p.warm_threads.add(threading.get_ident())


def _file_signature(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _numba_threads() -> int:
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def _plugin_threads(dask_worker, name: str) -> int:
    return dask_worker.plugins[name].threads


# -- client side --------------------------------------------------------------------------------
def local_cluster(workers: int) -> LocalCluster:
    """``workers`` worker processes on this machine, listening on 127.0.0.1 only, each with one
    Dask thread (one shard at a time) and an equal share of the cores for its numba threads."""
    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address="127.0.0.1:0", silence_logs=logging.CRITICAL,
                        env={"NUMBA_NUM_THREADS": str(max(1, CPU_COUNT // workers))})


@contextmanager
def connect(opts: ClusterOptions) -> Iterator[tuple[Client, ClusterReport]]:
    """A client on a new local cluster (``opts.workers``) or on ``opts.scheduler``; closed on exit
    (a local cluster is shut down, an existing one is left running)."""
    if (opts.workers is None) == (opts.scheduler is None):
        raise CsdcError("give either --workers N (a local cluster) or --scheduler ADDRESS (an existing one)")
    if opts.shard_source not in SHARD_SOURCES:
        raise CsdcError(f"--shards '{opts.shard_source}' is not one of {', '.join(SHARD_SOURCES)}")
    t0 = time.perf_counter()
    cluster = None
    if opts.workers is not None:
        if opts.workers < 1:
            raise CsdcError(f"--workers must be >= 1, got {opts.workers}")
        cluster = local_cluster(opts.workers)
        client = Client(cluster)
    else:
        try:
            client = Client(opts.scheduler, timeout="20s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise CsdcError(f"cannot connect to the Dask scheduler at {opts.scheduler} ({exc}); start one with "
                            "'dask scheduler' and workers with 'dask worker ADDRESS --nthreads 1' (docs/cluster.md)") from None
    try:
        info = client.scheduler_info(n_workers=-1)["workers"]
        if not info:  # a batch system may still be starting them
            try:
                client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS)
            except TimeoutError:
                raise CsdcError(f"no worker joined the Dask scheduler at {opts.scheduler} within "
                                f"{WAIT_FOR_WORKERS} s; start workers with 'dask worker {opts.scheduler} --nthreads 1'") from None
            info = client.scheduler_info(n_workers=-1)["workers"]
        report = ClusterReport(scheduler=client.scheduler.address, local=cluster is not None, workers=len(info),
                               threads_per_shard={}, startup_seconds=time.perf_counter() - t0)
        yield client, report
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _shard_source(client: Client, opts: ClusterOptions, data_path: str | None) -> str:
    """'path' or 'scatter' for this run (see :func:`choose_shard_source`)."""
    if data_path is None or opts.shard_source == "scatter":
        return choose_shard_source(opts.shard_source, data_path, None, {})
    return choose_shard_source(opts.shard_source, data_path, _file_signature(data_path),
                               client.run(_file_signature, data_path))


def choose_shard_source(requested: str, data_path: str | None, mine: tuple | None,
                        seen: dict[str, tuple | None]) -> str:
    """'path' when every worker sees the client's file (``seen``: worker -> (size, mtime) of
    ``data_path`` there, ``mine``: the client's), else 'scatter'; ``requested`` 'path' or
    'scatter' forces a route, and a forced 'path' that some worker cannot see is an error."""
    if requested == "scatter" or (requested == "auto" and data_path is None):
        return "scatter"
    if data_path is None:
        raise CsdcError("--shards path needs --data FILE.npz (a file every worker can read)")
    if mine is None:
        raise DataError(f"{data_path}: data file not found; check the path")
    blind = sorted(a for a, s in seen.items() if s != mine)
    if not blind:
        return "path"
    if requested == "path":
        raise DataError(f"{data_path}: workers {', '.join(blind)} cannot see this file (or see another version); "
                        "put it on a filesystem every worker mounts, or use --shards scatter")
    return "scatter"


@dataclass
class _Merged:
    """Results of one delay, filled in by sample index."""

    readout: np.ndarray | None = None
    stats: dict[str, NodeStats] = field(default_factory=dict)
    seconds: float = 0.0


def _run_shards(client: Client, report: ClusterReport, net: Network, backend: str, delays: list[int | None],
                x: np.ndarray, data_path: str | None, opts: ClusterOptions, shard: int, progress: bool,
                on_shard: Callable[[ShardResult], None] | None) -> dict[int | None, _Merged]:
    """Run every (delay, shard) as a task; merge the results by index."""
    from csdc.ir import serialize

    if shard < 1:
        raise CsdcError(f"--batch (the shard size) must be >= 1, got {shard}")
    n = len(x)
    data_path = os.path.abspath(data_path) if data_path is not None else None  # workers may run in another folder
    t0 = time.perf_counter()
    name = f"csdc-network-{uuid.uuid4().hex[:12]}"
    client.register_plugin(NetworkPlugin(name, serialize.to_bytes(net), backend, min(shard, n)), name=name)
    report.threads_per_shard = client.run(_plugin_threads, name=name)
    client.gather([client.submit(warm_up, name, workers=[w], allow_other_workers=True, pure=False,
                                 key=f"csdc-warm-{name[-12:]}-{w}") for w in report.threads_per_shard])
    report.ship_seconds = time.perf_counter() - t0
    report.startup_seconds += report.ship_seconds
    try:
        t0 = time.perf_counter()
        source = _shard_source(client, opts, data_path)
        todo = [(d, s, min(s + shard, n)) for d in delays for s in range(0, n, shard)]
        report.shard_source, report.shard_size, report.shards = source, shard, len(todo)
        limit = len(todo) if source == "path" else max(1, sum(client.nthreads().values()))
        merged = {d: _Merged() for d in delays}
        bar = None
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=n * len(delays), unit="img", desc=f"{backend} on {report.workers} workers", leave=False)
        futures: dict = {}  # future -> (delay, start, stop, attempt, scattered data future)
        ac = as_completed()
        queue = iter(todo)

        def submit(spec: tuple, attempt: int = 0) -> None:
            d, a, b = spec
            data = None
            if source == "scatter":
                data = _scatter(client, np.ascontiguousarray(x[a:b], dtype=np.float32), f"samples {a}..{b - 1}")
            key = f"csdc-shard-{name[-12:]}-{'net' if d is None else d}-{a}-{attempt}"
            fut = client.submit(run_shard, name, d, a, b, data if data is not None else data_path, key=key, pure=False)
            futures[fut] = (d, a, b, attempt, data)
            ac.add(fut)

        for spec in (next(queue) for _ in range(min(limit, len(todo)))):
            submit(spec)
        try:
            for fut in ac:
                d, a, b, attempt, data = futures.pop(fut)
                try:
                    res: ShardResult = fut.result()
                except FutureCancelledError:
                    if source != "scatter" or attempt >= MAX_RESUBMITS:
                        raise CsdcError(f"samples {a}..{b - 1}{_at(d)}: the shard was cancelled {attempt + 1} times "
                                        "(workers lost); check the cluster and run again") from None
                    report.recomputed += 1
                    submit((d, a, b), attempt + 1)  # its scattered data died with a worker: send it again
                    continue
                except KilledWorker as exc:
                    raise CsdcError(f"samples {a}..{b - 1}{_at(d)}: the shard killed every worker that ran it ({exc}); "
                                    "a worker may run out of memory: use a smaller --batch") from None
                except CsdcError as exc:
                    raise DataError(f"samples {a}..{b - 1}{_at(d)} (shard {a // shard + 1} of {-(-n // shard)}) "
                                    f"failed: {exc}") from None
                except Exception as exc:
                    exc.add_note(f"in the shard of samples {a}..{b - 1}{_at(d)}")
                    raise
                finally:
                    fut.release()
                    if data is not None:
                        data.release()
                _merge(merged[d], res, n)
                w = report.per_worker.setdefault(res.worker, WorkerThroughput(res.worker))
                w.samples += b - a
                w.seconds += res.seconds
                if bar is not None:
                    bar.update(b - a)
                if on_shard is not None:
                    on_shard(res)
                nxt = next(queue, None)
                if nxt is not None:
                    submit(nxt)
        except BaseException:
            client.cancel(list(futures))
            raise
        finally:
            if bar is not None:
                bar.close()
        report.run_seconds = time.perf_counter() - t0
        return merged
    finally:
        client.unregister_worker_plugin(name)


def _scatter(client: Client, shard: np.ndarray, what: str, attempts: int = 5):
    """``client.scatter`` that tries again when the chosen worker just died (the scheduler
    drops it within moments, and the next attempt goes to a live worker)."""
    for attempt in range(attempts):
        try:
            return client.scatter(shard, hash=False)
        except OSError as exc:  # CommClosedError: the connection to a dying worker closed
            if attempt == attempts - 1:
                raise CsdcError(f"{what}: cannot send the shard to any worker ({exc}); check the cluster") from None
            time.sleep(0.5 * (attempt + 1))


def _at(delay: int | None) -> str:
    return "" if delay is None else f" at D={delay}"


def _merge(m: _Merged, res: ShardResult, n: int) -> None:
    if m.readout is None:
        m.readout = np.empty((n, *res.readout.shape[1:]), dtype=np.int64)  # every row is written once
    m.readout[res.start:res.stop] = res.readout
    for node, fields in res.stats.items():
        m.stats.setdefault(node, NodeStats()).merge(NodeStats(**fields))
    m.seconds += res.seconds


def run_on_cluster(net: Network, backend: str, x: np.ndarray, y: np.ndarray | None, opts: ClusterOptions,
                   data_path: str | None = None, batch: int = 64, progress: bool = True,
                   on_shard: Callable[[ShardResult], None] | None = None) -> tuple[RunOutput, ClusterReport]:
    """:func:`csdc.runtime.evaluate.run_dataset` on a Dask cluster, shard by shard; the same output.

    ``x`` may be a memory map: in path mode the client never reads it (workers read ``data_path``,
    which must hold ``x`` as its first ``len(x)`` samples). ``on_shard`` is called with each
    shard's result as it arrives."""
    _check_backend(backend)
    if tuple(x.shape[1:]) != tuple(net.input_shape):
        raise DataError(f"data samples have shape {tuple(x.shape[1:])} but the network expects {tuple(net.input_shape)}")
    if len(x) == 0:
        raise DataError("the dataset is empty")
    with connect(opts) as (client, report):
        m = _run_shards(client, report, net, backend, [None], x, data_path, opts, batch, progress, on_shard)[None]
    lg = readout_logits(net.op(net.output_name), m.readout)
    return RunOutput(summarize(net, get_backend(backend), m.stats, lg, y, report.run_seconds), lg, m.readout, y), report


def sweep_on_cluster(net: Network, backend: str, delays: list[int], x: np.ndarray, y: np.ndarray | None,
                     opts: ClusterOptions, compare: str | os.PathLike | None = None, data_path: str | None = None,
                     batch: int = 64, progress: bool = True) -> tuple[list[SweepRow], ClusterReport]:
    """:func:`csdc.runtime.sweep.sweep_delays` on a Dask cluster: every (delay, shard) is a task.
    A row's ``seconds`` is the time its shards ran, summed over workers."""
    _check_backend(backend)
    ref = onnx_logits(compare, x).argmax(1) if compare is not None else None
    with connect(opts) as (client, report):
        merged = _run_shards(client, report, net, backend, list(delays), x, data_path, opts, batch, progress, None)
    rows = []
    be = get_backend(backend)
    for d in delays:
        m = merged[d]
        netd = net.with_delay(d)
        lg = readout_logits(netd.op(netd.output_name), m.readout)
        rows.append(sweep_row(d, RunOutput(summarize(netd, be, m.stats, lg, y, m.seconds), lg, m.readout, y), ref))
    return rows, report


def _check_backend(backend: str) -> None:
    if backend not in ("numba", "reference"):
        raise CsdcError(f"--workers / --scheduler run the numba or reference backend, not '{backend}'")
