"""``csdc doctor`` (which backends are available here, and why not) and ``csdc lava-env``
(the Lava environment: which Python it is made with, refusals)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from csdc.backends.base import get_backend
from csdc.backends.lava import env as lava_env
from csdc.errors import CsdcError
from csdc.cli import main


def doctor_json(capsys) -> dict:
    assert main(["doctor", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_doctor_reports_every_backend(capsys) -> None:
    rep = doctor_json(capsys)
    assert set(rep["backends"]) == {"reference", "numba", "lava"}
    assert rep["backends"]["reference"]["available"]
    numba = rep["backends"]["numba"]
    assert numba["available"] and numba["numba"] and numba["target_cpu"]
    assert rep["core"]["numpy"] and rep["python"] == ".".join(map(str, sys.version_info[:3]))
    lava = rep["backends"]["lava"]
    if not lava["available"]:
        if os.environ.get("CSDC_ALLOW_NO_LAVA") != "1":
            pytest.fail(f"the Lava environment is not usable: {lava['detail']} (CSDC_ALLOW_NO_LAVA=1 accepts that)")
        assert "csdc lava-env" in lava["detail"]
        return
    v = lava["versions"]
    assert v["lava-nc"] == "0.10.0" and int(v["numpy"].split(".")[0]) < 2 and v["networkx"] == "2.8.7"
    assert v["python"].startswith(("3.10.", "3.11.")) and lava["import_hook"] == v["python"].startswith("3.11.")
    assert Path(lava["python"]).exists() and lava["location"] in lava["detail"]
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"lava-nc {v['lava-nc']}" in out and "NOT AVAILABLE" not in out


def test_doctor_says_why_lava_is_missing(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv(lava_env.PYTHON_VAR, raising=False)
    monkeypatch.setenv(lava_env.ENV_VAR, str(tmp_path / "nowhere"))
    lava = doctor_json(capsys)["backends"]["lava"]
    assert not lava["available"]
    assert lava["detail"] == f"no Lava environment at {tmp_path / 'nowhere'}; create it with `csdc lava-env` (see docs/lava.md)"
    assert main(["doctor"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("lava"))
    assert "NOT AVAILABLE" in line and "nowhere" in line
    # and the backend itself refuses with the same reason
    with pytest.raises(CsdcError, match="no Lava environment at .*nowhere; create it with `csdc lava-env`"):
        get_backend("lava")


def test_doctor_names_an_environment_without_lava(tmp_path: Path, monkeypatch, capsys) -> None:
    venv = tmp_path / "empty-env"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)], check=True)
    monkeypatch.delenv(lava_env.PYTHON_VAR, raising=False)
    monkeypatch.setenv(lava_env.ENV_VAR, str(venv))
    lava = doctor_json(capsys)["backends"]["lava"]
    assert not lava["available"] and lava["detail"].startswith(f"lava-nc is not installed in {venv}")
    assert lava["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))


def test_doctor_shows_numbas_target_cpu() -> None:
    env = {**os.environ, "NUMBA_CPU_NAME": "generic"}
    res = subprocess.run([sys.executable, "-m", "csdc.cli", "doctor", "--json"], capture_output=True, text=True,
                         env=env, check=True, timeout=300)
    assert json.loads(res.stdout)["backends"]["numba"]["target_cpu"] == "generic"


def _fake_python(folder: Path, name: str, version: str | None) -> Path:
    """An executable that answers the version query like Python ``version`` (None: fails, as a
    pyenv shim of a version that is not selected does)."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / name
    exe.write_text("#!/bin/sh\n" + (f"echo {' '.join(version.split('.'))}\n" if version else "exit 127\n"))
    exe.chmod(0o755)
    return exe


def test_lava_python_prefers_310_then_311(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "pyenv"))
    path_dir = tmp_path / "bin"
    py311 = _fake_python(path_dir, "python3.11", "3.11.7")
    _fake_python(path_dir, "python3.10", None)  # a shim that does not run
    monkeypatch.setenv("PATH", str(path_dir))
    assert lava_env.find_python() == (py311, (3, 11, 7))
    py310 = _fake_python(tmp_path / "pyenv" / "versions" / "3.10.13" / "bin", "python3.10", "3.10.13")
    assert lava_env.find_python() == (py310, (3, 10, 13))
    py312 = _fake_python(path_dir, "python3.12", "3.12.1")
    with pytest.raises(lava_env.LavaUnavailableError, match="lava-nc 0.10.0 runs on 3.10 or 3.11"):
        lava_env.find_python(str(py312))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "empty"))
    with pytest.raises(lava_env.LavaUnavailableError, match="no Python 3.10 or 3.11 found"):
        lava_env.find_python()


def test_lava_env_refusals(tmp_path: Path, capsys) -> None:
    assert main(["lava-env", "--python", str(tmp_path / "no-python"), "--path", str(tmp_path / "env")]) == 2
    assert "not a working Python interpreter" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["lava-env", "--path", str(tmp_path / "mine")]) == 2
    assert "is not a virtual environment" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert not (tmp_path / "env").exists()


def test_lava_env_up_to_date_is_left_alone(capsys) -> None:
    path = lava_env.env_dir()
    if not (path / lava_env.STAMP).exists():
        pytest.skip(f"no Lava environment made by `csdc lava-env` at {path}")
    before = (path / lava_env.STAMP).stat().st_mtime_ns
    assert main(["lava-env"]) == 0
    assert capsys.readouterr().out.strip().endswith(": up to date")
    assert (path / lava_env.STAMP).stat().st_mtime_ns == before


def test_core_dependencies_leave_numpy_2_and_current_networkx_alone() -> None:
    """csdc's own requirements (not lava-nc's) must not hold numpy below 2 or pin networkx:
    installing csdc into an environment with numpy 2 keeps it."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    core = [Requirement(r) for r in requires("csdc") or [] if "extra ==" not in r]
    by_name = {r.name.lower(): r for r in core}
    assert by_name["numpy"].specifier.contains("2.3.5") and by_name["numpy"].specifier.contains("2.4.6")
    assert by_name["networkx"].specifier.contains("3.6.1")
    assert "lava-nc" not in by_name
