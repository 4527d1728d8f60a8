"""The one storage layer: every read and write of a project output (shards, Parquet tables,
JSON records, checkpoints, reports) goes through these functions.

Every function takes a path-like and goes through `_resolve`, the single place that maps it
to a location. Today only local paths exist, and a write completes with an atomic rename
(`atomic_path`): a reader sees the old file or the new one, never half of one. The next
step routes URIs (``s3://``, ``gs://`` …) through ``pyarrow.fs`` inside
`_resolve` and the functions below; on object stores completion is then marked by writing
a small marker last (shard stats, ``latest.json``), which is already the order the stages
write in. Stages never call ``open``/``os.replace`` on outputs themselves.

Not here on purpose: `pipeline/lock.py` (``flock`` needs a real local file) and the
Ray-cluster records in `pipeline/runtime.py`'s ``/proc`` reads.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import pyarrow as pa


def _resolve(path: str | os.PathLike) -> Path:
    """The one place a path-like becomes a location (local only today; a URI scheme would be
    routed to a ``pyarrow.fs`` filesystem here)."""
    p = os.fspath(path)
    if "://" in p and not p.startswith("file://"):
        raise NotImplementedError(f"{p}: only local paths are supported (URIs come with pyarrow.fs)")
    return Path(p[len("file://"):] if p.startswith("file://") else p)


# ------------------------------------------------------------------ atomic writes
#: ``mode=UMASK``: the file gets the permissions a plain ``open(path, "w")`` would give it
#: (0o666 less the umask) instead of the temporary file's private 0o600
UMASK = "umask"


def _umask_mode() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", *, mode: int | str | None = None) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; rename it onto ``path`` when the block succeeds.

    ``mode``: None keeps the temporary file's 0o600; `UMASK` what a plain write gives; an int sets it."""
    path = _resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        if mode is not None:
            os.chmod(tmp, _umask_mode() if mode == UMASK else mode)
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | str | None = None) -> None:
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str, encoding: str | None = None, *,
               mode: int | str | None = None) -> None:
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_text(text, encoding=encoding)


def dumps_json(obj, **kw) -> str:
    """The project's JSON record format (indent 1, sorted keys, a final newline) unless ``kw`` says otherwise."""
    kw = {"indent": 1, "sort_keys": True, "default": str, **kw}
    return json.dumps(obj, **kw) + "\n"


def write_json(path: str | os.PathLike, obj, *, raw: bool = False, mode: int | str | None = None, **kw) -> None:
    """Write ``obj`` as JSON atomically. Default format: `dumps_json`; ``raw=True`` writes
    ``json.dumps(obj, **kw)`` exactly (for files whose bytes predate this layer)."""
    write_text(path, json.dumps(obj, **kw) if raw else dumps_json(obj, **kw), mode=mode)


def write_parquet(path: str | os.PathLike, rows: "list[dict] | pa.Table", schema: "pa.Schema | None" = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path, ".parquet") as tmp:
        pq.write_table(table, tmp)


# ------------------------------------------------------------------ reads
def read_bytes(path: str | os.PathLike) -> bytes:
    return _resolve(path).read_bytes()


def read_text(path: str | os.PathLike, encoding: str | None = None) -> str:
    return _resolve(path).read_text(encoding=encoding)


def read_json(path: str | os.PathLike, default=None, *, missing_ok: bool = False):
    """Parsed JSON; with ``missing_ok``, ``default`` when the file does not exist."""
    p = _resolve(path)
    if missing_ok and not p.exists():
        return default
    return json.loads(p.read_text())


def read_parquet(path: str | os.PathLike, **kw):
    """A pandas DataFrame (``pd.read_parquet(**kw)``)."""
    import pandas as pd
    return pd.read_parquet(_resolve(path), **kw)


def read_table(path: str | os.PathLike, **kw) -> "pa.Table":
    import pyarrow.parquet as pq
    return pq.read_table(_resolve(path), **kw)


def read_range(path: str | os.PathLike, offset: int, size: int) -> bytes:
    """``size`` bytes from ``offset`` (fewer at the end of the file): one member of a shard."""
    with open(_resolve(path), "rb") as f:
        f.seek(offset)
        return f.read(size)


@contextmanager
def open_read(path: str | os.PathLike) -> Iterator:
    """A binary file object for streaming reads (tars, large weights)."""
    with open(_resolve(path), "rb") as f:
        yield f


def local_path(path: str | os.PathLike) -> Path:
    """The local file behind ``path``, for libraries that need a file name (tarfile, safetensors,
    decord, Hugging Face ``from_pretrained``)."""
    return _resolve(path)


# ------------------------------------------------------------------ the namespace
def exists(path: str | os.PathLike) -> bool:
    return _resolve(path).exists()


def is_dir(path: str | os.PathLike) -> bool:
    return _resolve(path).is_dir()


def is_file(path: str | os.PathLike) -> bool:
    return _resolve(path).is_file()


def size(path: str | os.PathLike) -> int:
    return _resolve(path).stat().st_size


def listdir(path: str | os.PathLike, pattern: str = "*", *, dirs: bool | None = None) -> list[Path]:
    """Entries of a folder matching a glob ``pattern``, sorted; ``dirs=True`` folders only,
    ``dirs=False`` files only. A missing folder lists nothing."""
    p = _resolve(path)
    if not p.is_dir():
        return []
    out = sorted(p.glob(pattern))
    if dirs is not None:
        out = [q for q in out if q.is_dir() == dirs]
    return out


def walk_files(path: str | os.PathLike) -> list[Path]:
    """Every file under a folder (recursively), or the file itself, sorted."""
    p = _resolve(path)
    return sorted(q for q in (p.rglob("*") if p.is_dir() else [p]) if q.is_file())


def makedirs(path: str | os.PathLike) -> Path:
    p = _resolve(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def remove(path: str | os.PathLike) -> None:
    """Remove a file (missing is fine)."""
    _resolve(path).unlink(missing_ok=True)


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a folder and everything under it (missing is fine)."""
    shutil.rmtree(_resolve(path), ignore_errors=True)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put a finished temporary folder in place of ``final`` (whatever was there is removed first)."""
    remove_tree(final)
    move(tmp, final)


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` onto ``dst`` (atomic locally)."""
    os.replace(_resolve(src), _resolve(dst))
