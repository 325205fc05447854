"""Files that are never seen half-written, and their checksums.

Every file the library writes into a run directory (checkpoint manifests, ``latest``,
eval results, compare tables) goes through :func:`write_atomic`: a reader sees the old
file or the new one, also after a crash or power loss.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def fsync_file(path: str | Path) -> None:
    """Flush a file written by another library (safetensors, torch.save) to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (POSIX; a no-op where directories can't be
    opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open ``path`` for writing so that it appears whole or not at all: the writes go to a
    temporary file in the same directory, which is fsynced and renamed into place (then the
    directory fsynced) when the block ends; an exception leaves ``path`` as it was. Text
    modes are UTF-8. For files written piece by piece (token shards, JSONL)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a new file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """A directory that appears at ``out`` whole or not at all: the block writes into a
    fresh hidden sibling (yielded), which then replaces ``out`` (an existing one is moved
    aside first and deleted after the swap, so no file of it stays); an exception leaves
    ``out`` as it was and removes the sibling. For outputs made of several files (a
    derived run, an export)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        yield tmp
        if out.exists():
            old = out.parent / f".old-{out.name}-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_open`). Text is UTF-8."""
    with atomic_open(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)
    return Path(path)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
