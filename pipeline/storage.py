"""The one storage layer: every read and write of a project output (shards, Parquet tables,
JSON records, checkpoints, reports) and of every input a user names (manifests, videos,
features, checkpoints) goes through these functions.

A location is a local path, a ``file://`` URI, or an object-store URI — ``s3://bucket/key``
(AWS S3, MinIO or any S3-compatible store) or ``gs://bucket/key`` (Google Cloud Storage) —
reached through ``pyarrow.fs``, the file-system layer Ray Data and Ray Train use. `path`
turns any of them into a path object: a `pathlib.Path` locally, a `URI` for an object store;
both support ``/``, ``.name``, ``.parent`` …, so layout code builds locations the same way
for both. Stages never call ``open`` / ``Path.exists`` / ``os.replace`` on outputs themselves.

S3 settings come from the standard variables: ``AWS_ENDPOINT_URL`` (``AWS_ENDPOINT_URL_S3``)
for MinIO / S3-compatible stores, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``. `cluster_env` lists the ones
set, for a Ray ``runtime_env``.

Completion. Locally a write completes with an atomic rename (`atomic_path`): a reader sees the
old file or the new one, never half of one. Object stores have no rename, but an object appears
whole or not at all when its upload completes, so every single-file write is atomic there too;
what spans several files (a shard and its stats, a checkpoint folder) is marked complete by a
small marker written last (shard stats, ``latest.json``), and readers trust only marked outputs.
`replace_dir` / `move` of a folder on an object store are a copy then a delete: callers mark
completion themselves.

Libraries that need a local file name (tarfile, safetensors, decord, ``from_pretrained``) get one
from `local_path`: the file itself locally, else a verified copy in the local object cache
(``$MALMM_CACHE``, else ``~/.cache/malmm-pipeline/objects``), fetched again when the object's
size or modification time changes.

Not here on purpose: `pipeline/lock.py` (``flock`` needs a real local file; a folder in an
object store is locked on the machine that writes it) and the Ray-cluster records in
`pipeline/runtime.py`'s ``/proc`` reads.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Union
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

#: object-store schemes reached through pyarrow.fs (``gcs`` is pyarrow's other name for ``gs``)
OBJECT_SCHEMES = ("s3", "gs", "gcs")
#: the S3 settings a process (a Ray worker) needs to reach the same store
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
          "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
          "AWS_SHARED_CREDENTIALS_FILE", "GOOGLE_APPLICATION_CREDENTIALS")


class StorageError(ValueError):
    """A location the storage layer cannot reach (unsupported scheme, malformed URI)."""


# ------------------------------------------------------------------ locations
class URI:
    """A location in an object store, ``scheme://bucket/key``: the `pathlib.PurePosixPath` operations
    layout code uses (``/``, ``name``, ``stem``, ``suffix``, ``parent``, ``parents``, ``with_name``,
    ``with_suffix``) and ``os.fspath`` giving the URI. It has no file methods (``exists``, ``open`` …)
    on purpose: those go through this module."""

    __slots__ = ("scheme", "key")

    def __init__(self, uri: "str | URI"):
        if isinstance(uri, URI):
            self.scheme, self.key = uri.scheme, uri.key
            return
        scheme, _, rest = str(uri).partition("://")
        scheme = scheme.lower()
        if scheme not in OBJECT_SCHEMES:
            raise StorageError(_unsupported(str(uri)))
        rest = posixpath.normpath("/" + rest.split("?", 1)[0]).lstrip("/")
        if not rest or rest == ".":
            raise StorageError(f"{uri}: an object-store URI names a bucket: {scheme}://BUCKET/path")
        self.scheme, self.key = ("gs" if scheme == "gcs" else scheme), rest

    # -- pure path operations
    def __truediv__(self, other) -> "URI":
        other = os.fspath(other)
        if "://" in other:
            return URI(other)
        return URI(f"{self.scheme}://{posixpath.join(self.key, other)}")

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def name(self) -> str:
        return posixpath.basename(self.key) if "/" in self.key else ""

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def suffixes(self) -> list[str]:
        return Path(self.name).suffixes

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def parent(self) -> "URI":
        head = posixpath.dirname(self.key)
        return URI(f"{self.scheme}://{head}") if head else self

    @property
    def parents(self) -> list["URI"]:
        out, p = [], self
        while p.parent != p:
            p = p.parent
            out.append(p)
        return out

    @property
    def parts(self) -> tuple[str, ...]:
        return (f"{self.scheme}://",) + tuple(self.key.split("/"))

    def with_name(self, name: str) -> "URI":
        return self.parent / name

    def with_suffix(self, suffix: str) -> "URI":
        return self.with_name(self.stem + suffix)

    def relative_to(self, other) -> Path:
        other = URI(other)
        if other.scheme != self.scheme or not (self.key + "/").startswith(other.key.rstrip("/") + "/"):
            raise ValueError(f"{self} is not under {other}")
        return Path(self.key[len(other.key):].lstrip("/"))

    def resolve(self) -> "URI":
        return self

    absolute = resolve

    def is_absolute(self) -> bool:
        return True

    def as_posix(self) -> str:
        return str(self)

    def __fspath__(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __repr__(self) -> str:
        return f"URI({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, URI) and (self.scheme, self.key) == (other.scheme, other.key)

    def __lt__(self, other) -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash((self.scheme, self.key))


PathLike = Union[str, os.PathLike, URI]


def _unsupported(p: str) -> str:
    scheme = p.split("://", 1)[0]
    return (f"{p}: unsupported storage scheme {scheme + '://'!r}; give a local path, file:///absolute/path, "
            f"s3://bucket/path or gs://bucket/path")


def is_uri(p: PathLike) -> bool:
    """An object-store location (``s3://``, ``gs://``), as opposed to a local path or ``file://``."""
    if isinstance(p, URI):
        return True
    s = os.fspath(p)
    return "://" in s and not s[:7].lower() == "file://"


def _file_uri_path(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise StorageError(f"file URI {uri!r} names the host {parts.netloc!r}; write file:///absolute/path "
                           f"(three slashes) or a plain path")
    return unquote(parts.path)


def path(p: PathLike) -> "Path | URI":
    """The location ``p`` names: a `pathlib.Path` for a local path or ``file://`` URI, a `URI` for an
    object store. `StorageError` (a ValueError) for any other scheme, naming the ones supported."""
    if isinstance(p, (URI, Path)):
        return p
    s = os.fspath(p)
    if "://" not in s:
        return Path(s)
    if s[:7].lower() == "file://":
        return Path(_file_uri_path(s))
    return URI(s)


def check(p: PathLike, what: str = "path") -> None:
    """Validation-time check of a user-given location: an unsupported scheme is an error here,
    naming the option (``what``), never a "missing file" later."""
    try:
        path(p)
    except StorageError as e:
        raise StorageError(f"{what}: {e}") from None


def join(base: PathLike, *names: str) -> "Path | URI":
    out = path(base)
    for n in names:
        out = out / n
    return out


def resolved(p: PathLike) -> "Path | URI":
    """An absolute form of ``p`` (a local path resolved; a URI as it is), for records and workers."""
    q = path(p)
    return q if isinstance(q, URI) else q.resolve()


# ------------------------------------------------------------------ pyarrow file systems
_FS: dict = {}
_FS_LOCK = threading.Lock()


def _s3_filesystem() -> "pafs.FileSystem":
    import pyarrow.fs as pafs
    kw = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else "https://" + endpoint)
        kw["endpoint_override"] = parts.netloc
        kw["scheme"] = parts.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kw["region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kw.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                  session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**kw)


def filesystem(u: URI) -> "pafs.FileSystem":
    """The ``pyarrow.fs`` file system behind an object-store URI (one per scheme and settings, per process)."""
    key = (u.scheme,) + tuple(os.environ.get(k) for k in S3_ENV)
    with _FS_LOCK:
        fs = _FS.get(key)
        if fs is None:
            if u.scheme == "s3":
                fs = _s3_filesystem()
            else:
                import pyarrow.fs as pafs
                fs = pafs.GcsFileSystem()
            _FS[key] = fs
    return fs


def arrow(p: PathLike) -> "tuple[pafs.FileSystem, str]":
    """``(pyarrow file system, path in it)`` for any location: what pyarrow, pandas, Ray Data and
    Ray Train take as ``filesystem=`` / ``storage_filesystem=``."""
    q = path(p)
    if isinstance(q, URI):
        return filesystem(q), q.key
    import pyarrow.fs as pafs
    return pafs.LocalFileSystem(), str(q.resolve())


def cluster_env() -> dict[str, str]:
    """The storage settings of this process that Ray workers need (for ``runtime_env['env_vars']``)."""
    return {k: os.environ[k] for k in S3_ENV if os.environ.get(k)}


def _info(u: URI):
    return filesystem(u).get_file_info(u.key)


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
def atomic_path(p: PathLike, suffix: str = "", *, mode: int | str | None = None) -> Iterator[Path]:
    """Yield a temporary local file path; when the block succeeds it becomes ``p`` at once — renamed
    onto it locally, uploaded as one object to an object store (an object appears whole or not at all).

    ``mode`` (local files): None keeps the temporary file's 0o600; `UMASK` what a plain write gives;
    an int sets it."""
    q = path(p)
    if isinstance(q, URI):
        fd, tmp = tempfile.mkstemp(prefix=f".{q.name}.", suffix=suffix + ".tmp")
        os.close(fd)
        try:
            yield Path(tmp)
            upload(tmp, q)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    q.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{q.name}.", suffix=suffix + ".tmp", dir=q.parent)
    os.close(fd)
    try:
        if mode is not None:
            os.chmod(tmp, _umask_mode() if mode == UMASK else mode)
        yield Path(tmp)
        os.replace(tmp, q)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def upload(local: str | os.PathLike, dest: PathLike) -> None:
    """Copy a local file to ``dest`` as one write (a local destination: atomically)."""
    q = path(dest)
    if not isinstance(q, URI):
        with atomic_path(q) as tmp:
            shutil.copyfile(local, tmp)
        return
    with open(local, "rb") as src, filesystem(q).open_output_stream(q.key, metadata={}) as out:
        shutil.copyfileobj(src, out, 8 << 20)


def write_bytes(p: PathLike, data: bytes, *, mode: int | str | None = None) -> None:
    q = path(p)
    if isinstance(q, URI):
        with filesystem(q).open_output_stream(q.key, metadata={}) as out:
            out.write(data)
        return
    with atomic_path(q, mode=mode) as tmp:
        tmp.write_bytes(data)


def write_text(p: PathLike, text: str, encoding: str | None = None, *, mode: int | str | None = None) -> None:
    write_bytes(p, text.encode(encoding or "utf-8"), mode=mode)


def dumps_json(obj, **kw) -> str:
    """The project's JSON record format (indent 1, sorted keys, a final newline) unless ``kw`` says otherwise."""
    kw = {"indent": 1, "sort_keys": True, "default": str, **kw}
    return json.dumps(obj, **kw) + "\n"


def write_json(p: PathLike, obj, *, raw: bool = False, mode: int | str | None = None, **kw) -> None:
    """Write ``obj`` as JSON atomically. Default format: `dumps_json`; ``raw=True`` writes
    ``json.dumps(obj, **kw)`` exactly (for files whose bytes predate this layer)."""
    write_text(p, json.dumps(obj, **kw) if raw else dumps_json(obj, **kw), mode=mode)


def write_parquet(p: PathLike, rows: "list[dict] | pa.Table", schema: "pa.Schema | None" = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(p, ".parquet") as tmp:
        pq.write_table(table, tmp)


# ------------------------------------------------------------------ reads
def read_bytes(p: PathLike) -> bytes:
    q = path(p)
    if isinstance(q, URI):
        try:
            with filesystem(q).open_input_stream(q.key) as f:
                return f.read()
        except (FileNotFoundError, OSError) as e:
            raise _not_found(q, e) from None
    return q.read_bytes()


def _not_found(q: URI, e: Exception) -> Exception:
    if isinstance(e, FileNotFoundError) or "not found" in str(e).lower() or "NoSuchKey" in str(e):
        return FileNotFoundError(f"{q}: no such object")
    return e


def read_text(p: PathLike, encoding: str | None = None) -> str:
    return read_bytes(p).decode(encoding or "utf-8")


def read_json(p: PathLike, default=None, *, missing_ok: bool = False):
    """Parsed JSON; with ``missing_ok``, ``default`` when the file does not exist."""
    if missing_ok and not exists(p):
        return default
    return json.loads(read_bytes(p))


def read_parquet(p: PathLike, **kw):
    """A pandas DataFrame (``pd.read_parquet(**kw)``)."""
    import pandas as pd
    q = path(p)
    if isinstance(q, URI):
        return pd.read_parquet(q.key, filesystem=filesystem(q), **kw)
    return pd.read_parquet(q, **kw)


def read_table(p: PathLike, **kw) -> "pa.Table":
    import pyarrow.parquet as pq
    q = path(p)
    if isinstance(q, URI):
        return pq.read_table(q.key, filesystem=filesystem(q), **kw)
    return pq.read_table(q, **kw)


def read_range(p: PathLike, offset: int, size: int) -> bytes:
    """``size`` bytes from ``offset`` (fewer at the end of the file): one member of a shard."""
    q = path(p)
    if isinstance(q, URI):
        with filesystem(q).open_input_file(q.key) as f:
            return f.read_at(max(0, min(size, f.size() - offset)), offset)
    with open(q, "rb") as f:
        f.seek(offset)
        return f.read(size)


@contextmanager
def open_read(p: PathLike) -> Iterator:
    """A seekable binary file object for streaming reads (tars, large weights)."""
    q = path(p)
    if isinstance(q, URI):
        with filesystem(q).open_input_file(q.key) as f:
            yield f
        return
    with open(q, "rb") as f:
        yield f


def cache_dir() -> Path:
    return Path(os.environ.get("MALMM_CACHE") or Path.home() / ".cache" / "malmm-pipeline" / "objects")


def local_path(p: PathLike, *, only: "tuple[str, ...] | None" = None) -> Path:
    """The local file (or folder) behind ``p``, for libraries that need a file name (tarfile,
    safetensors, decord, Hugging Face ``from_pretrained``): itself locally; for an object-store
    URI, a copy in the local object cache, fetched when missing or when the object changed.
    ``only``: of a folder, fetch just the files of these names (at its top level)."""
    q = path(p)
    if not isinstance(q, URI):
        return q
    import pyarrow.fs as pafs
    info = _info(q)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{q}: no such object")
    root = _cached(q)
    if info.type == pafs.FileType.File:
        return _fetch(q, info, root / q.name)
    for f in filesystem(q).get_file_info(pafs.FileSelector(q.key, recursive=only is None)):
        if f.type == pafs.FileType.File and (only is None or f.base_name in only):
            _fetch(URI(f"{q.scheme}://{f.path}"), f, root / q.name / f.path[len(q.key):].lstrip("/"))
    return root / q.name


def _cached(q: URI) -> Path:
    return cache_dir() / hashlib.sha256(str(q).encode()).hexdigest()[:24]


def evict(p: PathLike) -> None:
    """Remove the local object-cache copy of ``p`` (an object-store URI; anything else: nothing to do)."""
    q = path(p)
    if isinstance(q, URI):
        shutil.rmtree(_cached(q), ignore_errors=True)


def _fetch(q: URI, info, dest: Path) -> Path:
    stamp = dest.with_name(f".{dest.name}.stamp")
    want = f"{info.size} {info.mtime_ns}"
    if dest.is_file() and stamp.is_file() and stamp.read_text() == want:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, filesystem(q).open_input_stream(q.key) as src:
            shutil.copyfileobj(src, out, 8 << 20)
        os.replace(tmp, dest)
        stamp.write_text(want)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


# ------------------------------------------------------------------ the namespace
def _type(q: URI):
    import pyarrow.fs as pafs
    t = _info(q).type
    return "file" if t == pafs.FileType.File else "dir" if t == pafs.FileType.Directory else None


def exists(p: PathLike) -> bool:
    q = path(p)
    return _type(q) is not None if isinstance(q, URI) else q.exists()


def is_dir(p: PathLike) -> bool:
    q = path(p)
    return _type(q) == "dir" if isinstance(q, URI) else q.is_dir()


def is_file(p: PathLike) -> bool:
    q = path(p)
    return _type(q) == "file" if isinstance(q, URI) else q.is_file()


def size(p: PathLike) -> int:
    q = path(p)
    if isinstance(q, URI):
        info = _info(q)
        if info.size is None:
            raise FileNotFoundError(f"{q}: no such object")
        return info.size
    return q.stat().st_size


def _entries(q: URI, recursive: bool):
    import pyarrow.fs as pafs
    try:
        return filesystem(q).get_file_info(pafs.FileSelector(q.key, recursive=recursive, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []


def listdir(p: PathLike, pattern: str = "*", *, dirs: bool | None = None) -> "list[Path | URI]":
    """Entries of a folder matching a glob ``pattern``, sorted; ``dirs=True`` folders only,
    ``dirs=False`` files only. A missing folder lists nothing."""
    q = path(p)
    if isinstance(q, URI):
        import pyarrow.fs as pafs
        out = []
        for f in _entries(q, recursive=False):
            is_d = f.type == pafs.FileType.Directory
            if fnmatch.fnmatchcase(f.base_name, pattern) and (dirs is None or dirs == is_d):
                out.append(URI(f"{q.scheme}://{f.path}"))
        return sorted(out)
    if not q.is_dir():
        return []
    out = sorted(q.glob(pattern))
    if dirs is not None:
        out = [r for r in out if r.is_dir() == dirs]
    return out


def walk_files(p: PathLike) -> "list[Path | URI]":
    """Every file under a folder (recursively), or the file itself, sorted."""
    q = path(p)
    if isinstance(q, URI):
        import pyarrow.fs as pafs
        if _type(q) == "file":
            return [q]
        return sorted(URI(f"{q.scheme}://{f.path}") for f in _entries(q, recursive=True)
                      if f.type == pafs.FileType.File)
    return sorted(r for r in (q.rglob("*") if q.is_dir() else [q]) if r.is_file())


def makedirs(p: PathLike) -> "Path | URI":
    """Create a folder (and its parents). In an object store folders exist through their objects:
    nothing to create."""
    q = path(p)
    if not isinstance(q, URI):
        q.mkdir(parents=True, exist_ok=True)
    return q


def remove(p: PathLike) -> None:
    """Remove a file (missing is fine)."""
    q = path(p)
    if isinstance(q, URI):
        if _type(q) == "file":
            filesystem(q).delete_file(q.key)
        return
    q.unlink(missing_ok=True)


def remove_tree(p: PathLike) -> None:
    """Remove a folder and everything under it (missing is fine)."""
    q = path(p)
    if isinstance(q, URI):
        if _type(q) == "dir":
            filesystem(q).delete_dir(q.key)
        return
    shutil.rmtree(q, ignore_errors=True)


def copy_tree(src: PathLike, dst: PathLike) -> None:
    """Copy a file or folder between any two locations (local ↔ object store), file by file."""
    import pyarrow.fs as pafs
    sfs, spath = arrow(src)
    dfs, dpath = arrow(dst)
    if not isinstance(path(dst), URI):
        Path(dpath).parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)


def replace_dir(tmp: PathLike, final: PathLike) -> None:
    """Put a finished temporary folder in place of ``final`` (whatever was there is removed first).
    Locally a rename; on an object store a copy then a delete (not atomic: mark completion after it)."""
    remove_tree(final)
    move(tmp, final)


def move(src: PathLike, dst: PathLike) -> None:
    """Rename ``src`` onto ``dst``: atomic locally; on an object store a copy then a delete."""
    s, d = path(src), path(dst)
    if not isinstance(s, URI) and not isinstance(d, URI):
        os.replace(s, d)
        return
    copy_tree(s, d)
    if is_dir(s):
        remove_tree(s)
    else:
        remove(s)
