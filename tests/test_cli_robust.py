"""The CLI under hostile or clumsy use (issue 13, items 15-19): output paths, interrupted writes, file
modes, data files, flag validation, closed pipes, and the last line of defence for bugs."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from csdc import cli
from csdc.cli import main
from csdc.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
CNN = str(ROOT / "examples" / "digits_cnn" / "model.onnx")
CSDFORMER = str(ROOT / "examples" / "digits_csdformer" / "model.onnx")
CSDC = str(Path(sys.executable).with_name("csdc"))


@pytest.fixture(scope="module")
def sir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("sir") / "net.sir")
    assert main(["compile", CNN, "-o", path]) == 0
    return path


def fails(argv: list[str], capsys, *words: str, code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("csdc: error:") or "\ncsdc: error:" in err or err.startswith("csdc: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"
    return err


def temps(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".csdc-" in p.name or p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------- 15: output paths
def test_15_output_that_is_a_directory(sir, tmp_path, capsys) -> None:
    fails(["compile", CNN, "-o", str(tmp_path)], capsys, "is a directory")
    fails(["run", sir, "--limit", "2", "--no-progress", "--output", str(tmp_path)], capsys, "--output", "is a directory")


def test_15_unwritable_output_places(sir, tmp_path, capsys) -> None:
    fails(["compile", CNN, "-o", "/proc/x.sir"], capsys, "/proc/x.sir")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        fails(["compile", CNN, "-o", str(ro / "x.sir")], capsys, "not writable")


def test_15_one_policy_for_a_missing_folder(sir, tmp_path, capsys) -> None:
    missing = tmp_path / "missing"
    for argv in (["compile", CNN, "-o", str(missing / "x.sir")],
                 ["run", sir, "--limit", "2", "--no-progress", "--output", str(missing / "r.npz")],
                 ["sweep", sir, "--limit", "2", "--no-progress", "--delays", "0", "--plot", str(missing / "p.png")],
                 ["export", sir, "-o", str(missing / "bundle")],
                 ["train", "--model", "cnn", "-o", str(missing / "m.onnx")]):
        fails(argv, capsys, str(missing), "does not exist; create it first")
    assert not missing.exists()


# ------------------------------------------------------------ 16: interrupted writes, file modes
_CHILD = """
import os, signal, sys, time
from csdc.cli import _on_sigterm
from csdc.files import write_atomic
signal.signal(signal.SIGTERM, _on_sigterm)
def slow(fh):
    fh.write(b"partial")
    fh.flush()
    open(sys.argv[2], "w").close()
    time.sleep(60)
write_atomic(sys.argv[1], slow)
"""


def _interrupted_write(tmp_path: Path, sig: int) -> subprocess.CompletedProcess:
    out, ready = tmp_path / "net.sir", tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(out), str(ready)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline and child.poll() is None, child.stderr.read() if child.poll() is not None else "timeout"
        time.sleep(0.02)
    child.send_signal(sig)
    child.wait(timeout=60)
    ready.unlink()
    return child


def test_16_sigterm_during_a_write_leaves_nothing(tmp_path) -> None:
    child = _interrupted_write(tmp_path, signal.SIGTERM)
    assert child.returncode == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_16_sigkill_leftovers_are_swept_by_the_next_write(tmp_path) -> None:
    child = _interrupted_write(tmp_path, signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL
    left = temps(tmp_path)
    assert len(left) == 1 and left[0].startswith(".net.sir.csdc-")
    write_atomic(tmp_path / "other.sir", b"x")
    assert temps(tmp_path) == [] and not (tmp_path / "net.sir").exists()


def test_16_sigterm_during_a_real_compile_leaves_no_temp_file(tmp_path) -> None:
    out = tmp_path / "net.sir"
    for delay in (0.8, 1.6, 2.4):
        child = subprocess.Popen([CSDC, "compile", CSDFORMER, "-o", str(out)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
        time.sleep(delay)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=120)
        assert temps(tmp_path) == [], f"after {delay} s: {temps(tmp_path)}"
        assert b"Traceback" not in err
        if out.exists():  # finished before the signal: then it is complete
            from csdc.ir import serialize

            serialize.load(out)
            out.unlink()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_16_outputs_get_the_usual_permissions(sir, tmp_path, umask, mode) -> None:
    old = os.umask(umask)
    try:
        assert main(["compile", CNN, "-o", str(tmp_path / "x.sir")]) == 0
        assert main(["run", sir, "--limit", "2", "--no-progress", "--output", str(tmp_path / "r.npz")]) == 0
    finally:
        os.umask(old)
    for name in ("x.sir", "r.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_16_export_bundle_folder_gets_the_usual_permissions(sir, tmp_path) -> None:
    # writing a bundle needs no Lava in this environment (it runs in the Lava environment)
    old = os.umask(0o022)
    try:
        assert main(["export", sir, "-o", str(tmp_path / "bundle")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "bundle").stat().st_mode) == 0o755


# ------------------------------------------------------------------------------ 17 and 18: --data
def _npz(path: Path, compressed: bool = False, **arrays) -> str:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return str(path)


def test_17_compressed_data_beyond_the_budget_is_refused_but_limit_reads_only_its_samples(sir, tmp_path, capsys,
                                                                                         monkeypatch) -> None:
    x = np.zeros((1 << 14, 1, 8, 8), np.float32)  # 4 MiB inflated, a few KB on disk
    p = _npz(tmp_path / "bomb.npz", compressed=True, x=x)
    assert os.path.getsize(p) < 64 << 10
    monkeypatch.setenv("CSDC_MEMORY_BUDGET", "1M")
    fails(["run", sir, "--data", p, "--no-progress"], capsys, "bomb.npz", "memory budget")
    assert main(["run", sir, "--data", p, "--limit", "2", "--no-progress", "--json"]) == 0
    assert '"samples": 2' in capsys.readouterr().out


def test_17_header_declaring_2_40_samples(sir, tmp_path, capsys) -> None:
    import zipfile

    head = {"descr": "<f4", "fortran_order": False, "shape": (1 << 40, 1, 8, 8)}
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, head)
    p = tmp_path / "huge.npz"
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", buf.getvalue() + b"\x00" * 1024)
    fails(["run", sir, "--data", str(p), "--no-progress"], capsys, "huge.npz", "'x' declares shape")


def test_18_nan_and_inf_inputs_name_the_first_bad_sample(sir, tmp_path, capsys) -> None:
    x = np.zeros((6, 1, 8, 8), np.float32)
    x[4, 0, 2, 2] = np.nan
    x[5, 0, 1, 1] = np.inf
    fails(["run", sir, "--data", _npz(tmp_path / "nan.npz", x=x), "--no-progress"], capsys, "nan.npz", "sample 4")
    big = np.zeros((3, 1, 8, 8), np.float64)
    big[1, 0, 0, 0] = 1e300  # finite in float64, infinite as the model's float32
    fails(["run", sir, "--data", _npz(tmp_path / "big.npz", x=big), "--no-progress"], capsys, "sample 1")


@pytest.mark.parametrize("label,index", [(-1, 2), (2**62, 0), (10, 1)])
def test_18_out_of_range_labels_name_the_sample(sir, tmp_path, capsys, label, index) -> None:
    y = np.zeros(4, np.int64)
    y[index] = label
    p = _npz(tmp_path / "y.npz", x=np.zeros((4, 1, 8, 8), np.float32), y=y)
    fails(["run", sir, "--data", p, "--no-progress"], capsys, "y.npz", f"sample {index}", "outside 0..9")


def test_18_data_names_the_real_problem(sir, tmp_path, capsys) -> None:
    txt = tmp_path / "data.txt"
    txt.write_text("0.1 0.2\n")
    fails(["run", sir, "--data", str(txt), "--no-progress"], capsys, "data.txt", "not a readable .npz", "numpy.savez")
    fails(["run", sir, "--data", "mnist", "--no-progress"], capsys, "mnist", "built-in: digits")


# ---------------------------------------------------------------------------------- 19: as a user
def test_19_sweep_batch_0_is_validated_as_run_does(sir, capsys) -> None:
    fails(["sweep", sir, "--batch", "0"], capsys, "--batch must be >= 1")
    fails(["run", sir, "--batch", "0"], capsys, "--batch must be >= 1")


def test_19_sweep_plot_in_a_missing_folder_fails_before_the_sweep(sir, tmp_path, capsys, monkeypatch) -> None:
    import csdc.runtime.sweep as sweep

    monkeypatch.setattr(sweep, "sweep_delays", lambda *a, **k: pytest.fail("the sweep ran"))
    fails(["sweep", sir, "--plot", str(tmp_path / "missing_dir" / "x.png")], capsys, "--plot", "missing_dir")


def test_19_sweep_prints_the_table_first_and_reports_the_plot_it_wrote(sir, tmp_path, capsys) -> None:
    assert main(["sweep", sir, "--limit", "8", "--delays", "0,15", "--no-progress", "--plot", str(tmp_path / "foo")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "foo.png").exists() and not (tmp_path / "foo").exists()
    assert out.index("| D |") < out.index(f"plot: {tmp_path / 'foo.png'}")
    assert temps(tmp_path) == []


@pytest.mark.parametrize("argv", [["inspect"], ["run", "--limit", "30", "--no-progress"]])
def test_19_closed_pipe_exits_quietly(sir, argv) -> None:
    r, w = os.pipe()
    os.close(r)  # the reader (head) is gone before csdc writes a byte
    child = subprocess.run([CSDC, argv[0], sir, *argv[1:]], stdout=w, stderr=subprocess.PIPE, timeout=300)
    os.close(w)
    assert child.returncode == 141 and child.stderr == b"", child.stderr.decode()


# -------------------------------------------------------------------------- last line of defence
def test_unexpected_exception_is_an_internal_error_with_exit_70(sir, capsys, monkeypatch) -> None:
    def boom(args):
        raise ZeroDivisionError("integer division or modulo by zero\nsecond line")

    monkeypatch.setattr(cli, "cmd_inspect", boom)
    assert main(["inspect", sir]) == 70
    err = capsys.readouterr().err
    assert "internal error in 'csdc inspect': ZeroDivisionError: integer division or modulo by zero" in err
    assert "second line" not in err and "Traceback" not in err and "--debug" in err
    assert main(["inspect", sir, "--debug"]) == 70
    assert "Traceback" in capsys.readouterr().err
    assert main(["--debug", "inspect", sir]) == 70
    assert "Traceback" in capsys.readouterr().err


def test_19_sweep_delays_beyond_the_maximum_are_refused_before_building_the_range(sir, capsys) -> None:
    fails(["sweep", sir, "--delays", "0..99999999999999"], capsys, "--delays", "maximum")
