"""Small helpers every layer of the application may use: atomic file writing, one-line
messages, mean +- std, and lazily imported package attributes.

Nothing here imports torch or another part of convnn, so any module can depend on it without
an import running backwards (see tests/test_layering.py).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "describe_exception",
    "lazy_exports",
    "mean_std",
    "one_line",
    "unique_path",
    "warning_line",
]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers only ever see a complete file.

    A temporary file in the same folder, flush + fsync, ``os.replace``, then fsync of the
    folder: a reader sees the old file or the new one, never a mix, even after ``kill -9``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def unique_path(path: str | os.PathLike) -> str:
    """``path`` when nothing is there yet, else the first free ``stem-2.ext``, ``stem-3.ext``...

    For outputs that must never overwrite an earlier one (a second ``convnn compare``).
    """
    path = os.fspath(path)
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(path):
        n += 1
        path = f"{stem}-{n}{ext}"
    return path


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; NaNs for none)."""
    values = list(values)
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5


def one_line(text: object) -> str:
    """A message squeezed onto one line (messages convnn prints must stay one line)."""
    return " ".join(str(text).split())


def describe_exception(exc: BaseException) -> str:
    """``TypeName: message`` on one line (the type alone when there is no message)."""
    text = one_line(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def warning_line(text: str) -> str:
    """The one-line form of a warning a run prints and records (``WARNING: ...``)."""
    return f"WARNING: {one_line(text)}"


def lazy_exports(package: str, names: dict[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for a package whose attributes load on first use.

    ``names`` maps an attribute to the module (relative to ``package``, e.g. ``".runner"``)
    that defines it; a module itself is named by mapping it to ``""``. So ``import convnn``
    or ``import convnn.cli`` costs nothing until a name is used, and ``convnn --help`` never
    imports torch.
    """
    module = sys.modules[package]

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        where = names[name]
        if where == "":
            value = importlib.import_module(f"{package}.{name}")
        else:
            value = getattr(importlib.import_module(where, package), name)
        setattr(module, name, value)  # the next access is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(names))

    return __getattr__, __dir__
