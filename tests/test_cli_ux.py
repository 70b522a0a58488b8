"""What a user sees: quiet logs when not at a terminal, first-run figures without kernel compilation,
"not measured" instead of zeros, figures that match between compile and run, messages naming the
real problem, a warning for a compared model that is not the compiled one, aligned tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from csdc.backends.numba import NumbaBackend
from csdc.cli import main
from csdc.ir import serialize
from csdc.ir.graph import Network
from csdc.ir.ops import DenseSynapse, Encode, Neuron, Readout, Reshape
from csdc.runtime.datasets import load_digits_split
from csdc.runtime.evaluate import run_dataset
from csdc.runtime.sweep import SweepRow, figure

ROOT = os.path.join(os.path.dirname(__file__), "..")
CNN = os.path.join(ROOT, "examples", "digits_cnn", "model.onnx")
CNN_QDQ = os.path.join(ROOT, "examples", "digits_cnn", "model_qdq_static.onnx")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ux") / "cnn.sir")
    assert main(["compile", CNN, "-o", path]) == 0
    return path


def _csdc(*argv: str) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess with stdout and stderr on pipes (as in `csdc run ... | cat` in CI)."""
    return subprocess.run([sys.executable, "-m", "csdc.cli", *argv], capture_output=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_run_under_a_pipe_has_no_progress_debris(cnn):
    r = _csdc("run", cnn, "--batch", "50")
    assert r.returncode == 0, r.stderr
    assert b"\r" not in r.stdout and b"\r" not in r.stderr
    assert b"SNN accuracy" in r.stdout
    assert b"numba: 450 images in " in r.stderr  # one summary line instead of the bar


def test_progress_flags(cnn):
    forced = _csdc("run", cnn, "--batch", "50", "--progress")
    assert forced.returncode == 0 and b"\r" in forced.stderr  # the bar, asked for
    quiet = _csdc("sweep", cnn, "--delays", "0,1", "--limit", "120", "--batch", "50", "--no-progress")
    assert quiet.returncode == 0 and b"\r" not in quiet.stderr and b"images in" not in quiet.stderr
    logged = _csdc("sweep", cnn, "--delays", "0,1", "--limit", "120", "--batch", "50")
    assert logged.returncode == 0 and b"\r" not in logged.stderr and b"\r" not in logged.stdout
    assert b"numba D=0: 120 images in " in logged.stderr and b"numba D=1: 120 images in " in logged.stderr
    as_json = _csdc("run", cnn, "--batch", "50", "--json")
    assert json.loads(as_json.stdout)["samples"] == 450 and b"\r" not in as_json.stderr


def test_images_per_second_exclude_the_warm_up():
    """The timed run starts after the warm-up (where numba compiles or loads its kernels) ended."""

    class Recording(NumbaBackend):
        def warm_up(self, net, x):
            compiled = super().warm_up(net, x)
            self.warm_end = time.perf_counter()
            return compiled

    from csdc.compiler.pipeline import compile_onnx

    net, _ = compile_onnx(CNN)
    x, y = load_digits_split("test")
    backend = Recording()
    out = run_dataset(net, backend, x[:100], y[:100], batch=50, progress=False)
    after = time.perf_counter()
    s = out.summary
    assert s.warmup_seconds is not None and s.seconds <= after - backend.warm_end
    assert s.kernel_cache and s.compile_seconds is not None and 0 <= s.compile_seconds <= s.warmup_seconds


def test_cached_kernels_report_no_compile(cnn, capsys):
    """Kernels cached by the runs above: no "kernel compile" line, the timing says it follows a warm-up."""
    main(["run", cnn, "--limit", "10"])
    warm = capsys.readouterr().out
    assert "kernel compile" not in warm and "after a warm-up" in warm  # cached by the runs above


def test_reference_backend_says_not_measured(cnn, capsys):
    assert main(["run", cnn, "--backend", "reference", "--limit", "20"]) == 0
    out = capsys.readouterr().out
    assert "synaptic operations   not measured" in out and "energy estimate       not measured" in out
    assert " 0 ACs" not in out and "0.000 uJ" not in out
    assert main(["run", cnn, "--backend", "reference", "--limit", "20", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["acs"] is None and s["macs"] is None and s["energy_uj_per_sample"] is None
    assert all(p["max_abs_v"] is None for p in s["per_population"].values())
    assert s["spikes"] > 0


def test_compile_and_run_count_the_same_spiking_nodes(cnn, tmp_path, capsys):
    assert main(["compile", CNN, "-o", str(tmp_path / "c.sir")]) == 0
    compiled = capsys.readouterr().out
    assert "populations           2 (1536 neurons) + 2 spiking max-pools: 4 spiking nodes" in compiled
    assert main(["run", cnn, "--limit", "10"]) == 0
    out = capsys.readouterr().out
    assert "4 spiking nodes (2 populations + 2 max-pools)" in out
    table = out[out.index("spiking node "):].splitlines()[1:]
    assert len([line for line in table if line.strip()]) == 4


def test_reversed_delay_range_says_so(cnn, capsys):
    assert main(["sweep", cnn, "--delays", "5..2"]) == 2
    err = capsys.readouterr().err
    assert "empty range" in err and "2..5" in err and ">= 0" not in err
    assert main(["sweep", cnn, "--delays=-1,2"]) == 2
    assert "negative delay -1" in capsys.readouterr().err


def test_compare_with_another_model_warns(cnn, capsys):
    assert main(["run", cnn, "--limit", "100", "--compare", CNN_QDQ]) == 0
    out = capsys.readouterr().out
    assert "warning: the logits of " in out and "differ by more than quantization explains" in out and "model_qdq_static.onnx" in out
    assert main(["run", cnn, "--limit", "100", "--compare", CNN]) == 0
    assert "warning" not in capsys.readouterr().out
    assert main(["run", cnn, "--limit", "100", "--compare", CNN_QDQ, "--json"]) == 0
    captured = capsys.readouterr()
    c = json.loads(captured.out)["comparison"]
    assert c["warning"] and c["max_abs_logit_diff"] > c["explainable_logit_diff"] > 0
    assert "warning" in captured.err


def test_inspect_columns_fit_long_names(tmp_path, capsys):
    long = "encoder/" + "very_long_layer_name/" * 3 + "q"
    net = Network(2)
    net.add("in", Encode((4,), 1.0, 0, 1))
    net.add(long + "_syn", DenseSynapse(np.ones((4, 4), dtype=np.int64)), ["in"])
    one = np.ones(4, dtype=np.int64)
    net.add(long, Neuron(one, one, one * 0, 2), [long + "_syn"])
    net.add("f", Reshape((4,)), [long])
    net.add("d", DenseSynapse(np.ones((2, 4), dtype=np.int64)), ["f"])
    net.add("out", Readout(np.ones(2), np.zeros(2)), ["d"])
    path = str(tmp_path / "long.sir")
    serialize.save(net, path)
    assert main(["inspect", path]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("node "))):]
    col = table[0].index(" op ") + 1
    for line in table[1:]:
        assert line[col - 2:col] == "  " and line[col] != " ", line  # the op column starts at the same place


def test_sweep_plot_has_whole_step_delay_ticks():
    rows = [SweepRow(d, 4 + 2 * d, 0.9, 0.95, 0.2, 0.1) for d in range(5)]
    fig = figure(rows, 4, "sweep")
    ax = fig.axes[0]
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)


@pytest.mark.slow
def test_first_run_reports_compile_time_apart(cnn, tmp_path):
    """With an empty kernel cache the first run reports numba's compile time apart from its timed
    run; the second run (kernels cached) reports none."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    argv = [sys.executable, "-m", "csdc.cli", "run", cnn, "--limit", "50", "--json"]
    first = json.loads(subprocess.run(argv, capture_output=True, timeout=900, env=env, check=True).stdout)
    assert first["compile_seconds"] > 0 and first["compile_seconds"] <= first["warmup_seconds"]
    assert first["kernel_cache"].startswith(str(tmp_path))
    text = subprocess.run(argv[:-1], capture_output=True, timeout=900, env=env, check=True, text=True).stdout
    assert "kernel compile" not in text and "after a warm-up" in text
