"""Output files: one path policy for every command, and atomic writes that leave nothing behind.

Policy (docs/robustness.md): an output file's folder must already exist and be writable (csdc
never creates folders, so a typo does not silently make one); a file path that is a directory,
or a folder path that is a file, is an error. Every check runs before any work starts.

Writes go to a temporary file in the target folder, named ``.<name>.csdc-<pid>-<hex>.tmp``, renamed
into place when complete. An exception or SIGTERM (the CLI turns it into ``SystemExit``) removes
the temporary file; after SIGKILL or a power cut it is left, and the next write into that folder
removes every such file whose process is gone. Files are created with the usual permissions
(``0666`` minus the umask), not ``mkstemp``'s ``0600``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from typing import Callable

from csdc.errors import CsdcError

_TEMP = re.compile(r"^\..+\.csdc-(\d+)-[0-9a-f]{16}\.tmp(\.[A-Za-z0-9]+)?$")


def _folder(path: str) -> str:
    return os.path.dirname(os.path.abspath(path)) or os.sep


def _check_folder_writable(folder: str, path: str, option: str) -> None:
    if not os.path.exists(folder):
        raise CsdcError(f"{option} {path}: folder '{folder}' does not exist; create it first (csdc does not create folders)")
    if not os.path.isdir(folder):
        raise CsdcError(f"{option} {path}: '{folder}' is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CsdcError(f"{option} {path}: folder '{folder}' is not writable")


def check_output_file(path: str | os.PathLike, option: str = "-o") -> str:
    """Check that ``path`` can be written as a file (see the module's policy); return it as a str."""
    path = os.fspath(path)
    if not path:
        raise CsdcError(f"{option}: the output path is empty")
    if os.path.isdir(path):
        raise CsdcError(f"{option} {path} is a directory; give the file to write, e.g. {os.path.join(path, 'out')}")
    _check_folder_writable(_folder(path), path, option)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise CsdcError(f"{option} {path}: the file exists and is not writable")
    return path


def check_output_folder(path: str | os.PathLike, option: str = "-o") -> str:
    """Check that ``path`` can be created (or replaced) as a folder; return it as a str."""
    path = os.fspath(path)
    if not path:
        raise CsdcError(f"{option}: the output path is empty")
    if os.path.exists(path) and not os.path.isdir(path):
        raise CsdcError(f"{option} {path} exists and is not a folder")
    _check_folder_writable(_folder(path.rstrip(os.sep) or path), path, option)
    return path


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def sweep_stale_temps(folder: str) -> list[str]:
    """Remove the temporary files of csdc writes into ``folder`` whose process is gone; return their names."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TEMP.match(name)
        if m and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
                removed.append(name)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path (same folder and extension as ``path``, created empty with the usual
    permissions) to write; on success it is renamed to ``path``, on any exception removed."""
    path = os.fspath(path)
    folder = _folder(path)
    if not os.path.isdir(folder):
        raise CsdcError(f"cannot write '{path}': folder '{folder}' does not exist")
    if os.path.isdir(path):
        raise CsdcError(f"cannot write '{path}': it is a directory")
    sweep_stale_temps(folder)
    ext = os.path.splitext(path)[1]
    ext = ext if re.fullmatch(r"\.[A-Za-z0-9]+", ext or "") else ""
    tmp = os.path.join(folder, f".{os.path.basename(path)}.csdc-{os.getpid()}-{secrets.token_hex(8)}.tmp{ext}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any new file
    except OSError as exc:
        raise CsdcError(f"cannot write '{path}': {exc.strerror}") from None
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | Callable) -> None:
    """Write ``data`` (bytes, or a function writing to a binary file object) to ``path`` through a
    temporary file renamed into place (see the module docstring)."""
    with atomic_path(path) as tmp:
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as fh:
                if callable(data):
                    data(fh)
                else:
                    fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise CsdcError(f"cannot write '{os.fspath(path)}': {exc.strerror or exc}") from None


def read_npy_header(fh) -> tuple[tuple[int, ...], bool, "np.dtype"]:
    """(shape, Fortran order, dtype) from the header of an .npy stream positioned at its start; the
    stream is left at the first data byte. Reads the header only: nothing is allocated for the data.
    An unknown format version is a ValueError."""
    import numpy as np

    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version in ((2, 0), (3, 0)):
        return np.lib.format.read_array_header_2_0(fh)
    raise ValueError(f".npy format version {version} is not supported")
