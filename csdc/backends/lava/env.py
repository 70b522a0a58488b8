"""The Lava environment: a virtualenv of its own where lava-nc 0.10.0 gets what it wants
(numpy < 2, networkx <= 2.8.7, Python < 3.11), apart from csdc's environment.

csdc never imports lava. :class:`csdc.backends.lava.LavaBackend` writes a deployment bundle
(:mod:`csdc.backends.lava.export`) and runs its ``run_lava.py`` with this environment's
Python in a subprocess; the bundle is self-contained, so csdc is not installed there.

Where the environment is (:func:`env_dir`): ``$CSDC_LAVA_ENV`` if set, else next to the
virtualenv csdc runs in, named after it with ``-lava`` (``.venv`` -> ``.venv-lava``), else
``$XDG_DATA_HOME/csdc/lava-env``. ``$CSDC_LAVA_PYTHON`` names an interpreter directly
(any Python with lava-nc importable) and then wins over the directory.

Which Python makes it (:func:`find_python`): a Python 3.10 (lava-nc installs there with its
normal dependency resolution), found on PATH or in pyenv's versions; only when there is none,
Python 3.11, where lava-nc is installed with ``--no-deps --ignore-requires-python`` and the
import hook of :mod:`csdc.backends.lava._hook` (copied into every bundle) makes it importable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from csdc.backends.lava.compat import LavaUnavailableError

ENV_VAR = "CSDC_LAVA_ENV"
PYTHON_VAR = "CSDC_LAVA_PYTHON"
REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"
STAMP = "csdc-lava-env.json"
#: Pythons lava-nc 0.10.0 runs on, best first: 3.10 without any help, 3.11 with the import hook.
PREFERRED = ((3, 10), (3, 11))
CREATE_HINT = "create it with `csdc lava-env` (see docs/lava.md)"

# Run by the environment's Python: imports lava through the bundle runtime's hook (standard
# library only, no csdc) and reports versions as JSON.
_PROBE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_hook", sys.argv[1])
_hook = importlib.util.module_from_spec(spec)
sys.modules["_hook"] = _hook
spec.loader.exec_module(_hook)
info = {"python": ".".join(map(str, sys.version_info[:3])), "executable": sys.executable,
        "hook": _hook.hook_needed()}
from importlib.metadata import version, PackageNotFoundError
for dist in ("lava-nc", "numpy", "networkx", "scipy", "scikit-learn", "asteval"):
    try:
        info[dist] = version(dist)
    except PackageNotFoundError:
        info[dist] = None
try:
    _hook.prepare_lava()
    import lava.magma.core.run_configs, lava.proc.dense.process, lava.proc.sparse.process, lava.proc.conv.process
    info["import"] = "ok"
except Exception as exc:
    info["import"] = f"{type(exc).__name__}: {exc}"
try:
    import csdc
    info["csdc"] = getattr(csdc, "__file__", "?")
except ImportError:
    info["csdc"] = None
print(json.dumps(info))
"""


@dataclass
class LavaEnv:
    """What :func:`probe` found: the interpreter, its versions and whether lava imports."""

    python: str
    location: str  # the environment directory, or where $CSDC_LAVA_PYTHON points
    versions: dict[str, str | None] = field(default_factory=dict)
    hook: bool = False  # the Python 3.11 import hook is in use
    error: str | None = None  # why the backend cannot run here (None: usable)

    @property
    def usable(self) -> bool:
        return self.error is None

    def summary(self) -> str:
        v = self.versions
        hook = "import hook in use" if self.hook else "no import hook needed"
        return (f"{self.location}: Python {v.get('python')}, lava-nc {v.get('lava-nc')}, numpy {v.get('numpy')}, "
                f"networkx {v.get('networkx')}, scipy {v.get('scipy')} ({hook})")

    def to_dict(self) -> dict:
        return {**asdict(self), "usable": self.usable}


def default_env_dir() -> Path:
    """Next to the virtualenv csdc runs in (``.venv`` -> ``.venv-lava``), else a per-user folder."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix + "-lava")
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "csdc" / "lava-env"


def env_dir() -> Path:
    """The Lava environment csdc uses: ``$CSDC_LAVA_ENV`` or :func:`default_env_dir`."""
    chosen = os.environ.get(ENV_VAR)
    return Path(chosen).expanduser() if chosen else default_env_dir()


def env_python(path: Path) -> Path:
    return Path(path) / "bin" / "python"


def _python_version(python: str | os.PathLike) -> tuple[int, int, int] | None:
    """The version of an interpreter, or None if it does not run (e.g. a pyenv shim of a
    version that is not selected)."""
    try:
        res = subprocess.run([str(python), "-c", "import sys; print(*sys.version_info[:3])"], capture_output=True,
                             text=True, timeout=30, check=False, env=_clean_env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    try:
        major, minor, micro = (int(p) for p in res.stdout.split())
    except ValueError:
        return None
    return major, minor, micro


def _candidates(minor: tuple[int, int]) -> list[Path]:
    """Interpreters that may be Python ``minor``: on PATH, then pyenv's installed versions."""
    name = f"python{minor[0]}.{minor[1]}"
    found: list[Path] = []
    on_path = shutil.which(name)
    if on_path:
        found.append(Path(on_path))
    roots = [os.environ.get("PYENV_ROOT"), str(Path.home() / ".pyenv")]
    for root in dict.fromkeys(r for r in roots if r):
        versions = Path(root) / "versions"
        if versions.is_dir():
            for v in sorted(versions.glob(f"{minor[0]}.{minor[1]}.*"), reverse=True):
                found.append(v / "bin" / name)
    return [p for p in dict.fromkeys(found) if p.exists()]


def find_python(requested: str | None = None) -> tuple[Path, tuple[int, int, int]]:
    """The interpreter to make the Lava environment with: ``requested`` (checked), else the
    first working Python 3.10, else 3.11. Raises :class:`LavaUnavailableError` if none works."""
    if requested:
        path = Path(shutil.which(requested) or requested)
        version = _python_version(path)
        if version is None:
            raise LavaUnavailableError(f"--python {requested}: not a working Python interpreter")
        if version[:2] not in PREFERRED:
            raise LavaUnavailableError(
                f"--python {requested} is Python {'.'.join(map(str, version))}; lava-nc 0.10.0 runs on "
                + " or ".join(f"{a}.{b}" for a, b in PREFERRED))
        return path, version
    for minor in PREFERRED:
        for path in _candidates(minor):
            version = _python_version(path)
            if version is not None and version[:2] == minor:
                return path, version
    raise LavaUnavailableError(
        "no Python 3.10 or 3.11 found for the Lava environment (looked on PATH and in pyenv's versions); "
        "install one, or name it with `csdc lava-env --python PATH`")


def _clean_env() -> dict[str, str]:
    """The environment for a child interpreter: nothing of csdc's own venv leaks in."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "__PYVENV_LAUNCHER__")
    return {k: v for k, v in os.environ.items() if k not in drop}


def requirements_digest() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()


def probe(python: str | os.PathLike, location: str | os.PathLike | None = None) -> LavaEnv:
    """Run ``python`` and report what it has; ``error`` says why the Lava backend cannot use it."""
    loc = str(location if location is not None else python)
    if not Path(python).exists():
        return LavaEnv(python=str(python), location=loc, error=f"no Lava environment at {loc}; {CREATE_HINT}")
    try:
        res = subprocess.run([str(python), "-c", _PROBE, str(Path(__file__).resolve().parent / "_hook.py")], capture_output=True,
                             text=True, timeout=120, check=False, env=_clean_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        return LavaEnv(python=str(python), location=loc, error=f"{python} does not run: {exc}")
    if res.returncode != 0:
        tail = res.stderr.strip().splitlines()[-1:] or ["no output"]
        return LavaEnv(python=str(python), location=loc, error=f"{python} failed: {tail[0]}")
    info = json.loads(res.stdout.strip().splitlines()[-1])
    versions = {k: info.get(k) for k in ("python", "lava-nc", "numpy", "networkx", "scipy", "scikit-learn", "asteval")}
    env = LavaEnv(python=str(python), location=loc, versions=versions, hook=bool(info["hook"]))
    if info["lava-nc"] is None:
        env.error = f"lava-nc is not installed in {loc}; {CREATE_HINT}"
    elif info["import"] != "ok":
        env.error = f"lava-nc does not import in {loc} ({info['import']}); re-create it with `csdc lava-env`"
    return env


_USABLE: dict[tuple[str, str], LavaEnv] = {}  # probed and usable, per (interpreter, location), for this process


def locate() -> LavaEnv:
    """The Lava environment csdc would use, probed (``$CSDC_LAVA_PYTHON``, else :func:`env_dir`).
    A usable one is probed once per process (a probe starts Python and imports lava, ~1.5 s)."""
    python = os.environ.get(PYTHON_VAR)
    if python:
        key = (python, f"${PYTHON_VAR}={python}")
    else:
        path = env_dir()
        key = (str(env_python(path)), str(path))
    if key in _USABLE:
        return _USABLE[key]
    env = probe(*key)
    if env.usable:
        _USABLE[key] = env
    return env


def require() -> LavaEnv:
    """:func:`locate`, raising :class:`LavaUnavailableError` (with the fix) if it is not usable."""
    env = locate()
    if not env.usable:
        raise LavaUnavailableError(f"the Lava backend needs its own environment: {env.error}")
    return env


def _up_to_date(path: Path) -> bool:
    stamp = path / STAMP
    if not stamp.exists():
        return False
    try:
        return json.loads(stamp.read_text()).get("requirements_sha256") == requirements_digest()
    except (OSError, ValueError):
        return False


def create(path: str | os.PathLike | None = None, python: str | None = None, *, force: bool = False,
           say: Callable[[str], None] = print) -> LavaEnv:
    """Make (or bring up to date) the Lava environment at ``path`` (default :func:`env_dir`)
    with ``python`` (default :func:`find_python`) and return it probed. One line per step
    with its time goes to ``say``; pip's log is kept in ``<path>/pip.log`` and its end is
    part of the error when a step fails."""
    path = Path(path).expanduser().resolve() if path is not None else env_dir()
    if path.exists() and not env_python(path).exists() and any(path.iterdir()):
        raise LavaUnavailableError(f"{path} exists and is not a virtual environment; choose another --path")
    if not force and env_python(path).exists() and _up_to_date(path):
        env = probe(env_python(path), path)
        if env.usable:
            say(f"Lava environment {env.summary()}: up to date")
            return env
    exe, version = find_python(python)
    if path.exists() and env_python(path).exists():
        have = _python_version(env_python(path))
        if force or have is None or have[:2] != version[:2]:
            shutil.rmtree(path)
    hook = version[:2] >= (3, 11)
    vtext = ".".join(map(str, version))
    why = ("lava-nc installs with its own dependency resolution" if not hook
           else ("Python 3.11 as asked" if python else "no Python 3.10 found")
           + ": lava-nc is installed without its Python pin and run with the import hook")
    say(f"Lava environment {path}: Python {vtext} ({exe}); {why}")

    path.mkdir(parents=True, exist_ok=True)
    log = path / "pip.log"

    def step(label: str, cmd: list[str]) -> None:
        t0 = time.perf_counter()
        with open(log, "a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_clean_env(), check=False).returncode
        if rc != 0:
            tail = "\n".join(log.read_text().splitlines()[-25:])
            raise LavaUnavailableError(f"making the Lava environment failed at '{label}' (exit code {rc}); "
                                       f"the end of {log}:\n{tail}")
        say(f"  {label:<52} {time.perf_counter() - t0:6.1f} s")

    if not env_python(path).exists():
        step("create the virtualenv", [str(exe), "-m", "venv", str(path)])
    pip = [str(env_python(path)), "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    reqs = [line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
    reqs = [r for r in reqs if r]
    if hook:
        deps = [r for r in reqs if not r.startswith("lava-nc")]
        lava = [r for r in reqs if r.startswith("lava-nc")]
        step("install lava-nc's dependencies", pip + deps)
        step("install lava-nc (--no-deps --ignore-requires-python)", pip + ["--no-deps", "--ignore-requires-python"] + lava)
    else:
        step("install lava-nc 0.10.0 and its dependencies", pip + ["-r", str(REQUIREMENTS)])
    t0 = time.perf_counter()
    env = probe(env_python(path), path)
    if not env.usable:
        raise LavaUnavailableError(f"the Lava environment at {path} does not work: {env.error}; "
                                   "`csdc lava-env --force` makes it anew")
    (path / STAMP).write_text(json.dumps({"requirements_sha256": requirements_digest(), **env.to_dict()}, indent=1))
    say(f"  {'check that lava imports':<52} {time.perf_counter() - t0:6.1f} s")
    say(f"Lava environment {env.summary()}")
    return env


def run_bundle(python: str, bundle: Path, args: list[str], *, timeout: float | None = None) -> str:
    """Run a bundle's ``run_lava.py`` with the Lava environment's Python; returns its stdout.
    A failure raises :class:`csdc.errors.CsdcError` with the end of its stderr."""
    from csdc.errors import CsdcError

    cmd = [python, str(Path(bundle) / "run_lava.py"), *args]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=str(bundle), env=_clean_env(), timeout=timeout,
                             check=False)
    except subprocess.TimeoutExpired:
        raise CsdcError(f"the Lava run did not finish within {timeout} s ({' '.join(cmd)})") from None
    if res.returncode != 0:
        tail = "\n".join(res.stderr.strip().splitlines()[-15:])
        raise CsdcError(f"the Lava run failed (exit code {res.returncode}) in the Lava environment ({python}):\n{tail}")
    return res.stdout


__all__ = ["ENV_VAR", "PYTHON_VAR", "REQUIREMENTS", "LavaEnv", "create", "default_env_dir", "env_dir", "env_python",
           "find_python", "locate", "probe", "require", "run_bundle"]
