"""Feature shard I/O (the README's architecture section, data contracts): deterministic
WebDataset tars, written atomically, verified on read.

A sample in a shard is a group of tar members sharing the sample key:

    {key}.features.npy       float16 [T, P, C]  ViT hidden states before the post layer norm
    {key}.frame_indices.npy  int64   [T]        frame numbers in the source video
    {key}.timestamps.npy     float64 [T]        seconds from the start of the video
    {key}.json               metadata (source, duration, fps, decoder, policy, model, dtype …)
                             and ``checksums``: ``{"features.npy": "sha256:…", …}`` of the
                             three array members' bytes

Members are written with fixed tar headers (mtime 0, uid/gid 0, sorted by key), so the
same inputs always give the same bytes – which is what lets an interrupted run
resume and end byte-identical to an uninterrupted one. The shard's ``stats.json``
carries the checksum of every member (the JSON too) under ``checksums[key]`` and where each
member's bytes lie in the tar under ``members[key]`` (``{ext: [offset, size]}``), so a reader
reaches any sample with one ranged read, also in an object store, without scanning the tar.

Reading is strict: a member name (in the tar, or recorded in the stats) must be ``{key}.{ext}`` with a non-empty key free of
``/``, ``\\`` and ``..`` and one of the four extensions above (`MalformedShardError`),
and every member must match its checksum (`CorruptSampleError`). Both name the shard,
the key and the member.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from pipeline import layout, storage
from pipeline.storage import atomic_path, write_json, write_parquet  # noqa: F401  (their home is storage)

SHARD_PATTERN = layout.SHARD_PATTERN
ARRAY_MEMBERS = ("features.npy", "frame_indices.npy", "timestamps.npy")
MEMBERS = ARRAY_MEMBERS + ("json",)  # the extensions of one sample, every one required


class ShardIntegrityError(ValueError):
    """A feature shard that cannot be trusted: names the shard and, where known, the key and member."""

    def __init__(self, shard: str | Path, key: str | None, member: str | None, problem: str):
        self.shard, self.key, self.member, self.problem = str(shard), key, member, problem
        where = f"shard {self.shard}" + (f", key {key!r}" if key is not None else "") + \
                (f", member {member!r}" if member is not None else "")
        super().__init__(f"{where}: {problem}" + (f"; to repair it, {self.hint}" if self.hint else ""))

    @property
    def hint(self) -> str:
        """How to rebuild the shard ('' for files that are not finished shards, e.g. staged videos)."""
        name = Path(self.shard).name
        return REEXTRACT_HINT.format(stats=stats_path(self.shard)) if name.startswith("shard-") else ""

    def __reduce__(self):  # picklable across Ray workers
        return (self.__class__, (self.shard, self.key, self.member, self.problem))


class MalformedShardError(ShardIntegrityError):
    """A shard whose tar structure or member names break the contract (unreadable tar, bad name,
    unexpected extension, non-file or duplicate member)."""


class CorruptSampleError(ShardIntegrityError):
    """A sample whose bytes do not match their checksum, are truncated, missing or do not decode."""


class UnverifiedFeaturesWarning(UserWarning):
    """Shards written before checksums existed: read, but without verification."""


REEXTRACT_HINT = ("delete {stats} and re-run the same `malmm-pipeline extract` to rebuild that shard "
                  "(a train run then resumes from its last checkpoint; infer re-predicts what failed)")


def checksum(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def stats_path(shard: str | Path) -> Path:
    shard = storage.path(shard)
    return shard.with_name(layout.stats_name(shard.name))


def member_key(shard: str | Path, name: str) -> tuple[str, str]:
    """``(key, ext)`` of a member name, or `MalformedShardError` naming the shard and member."""
    key, dot, ext = name.partition(".")
    if "/" in name or "\\" in name:
        problem = "member names must not contain '/' or '\\' (no folders in a shard)"
    elif ".." in name:
        problem = "member names must not contain '..'"
    elif not dot or not key:
        problem = "empty sample key" if dot else "no extension"
    elif ext not in MEMBERS:
        problem = f"unexpected extension {ext!r} (expected one of {', '.join(MEMBERS)})"
    else:
        return key, ext
    raise MalformedShardError(shard, key or None, name, f"malformed member name: {problem}")


def iter_members(shard: str | Path, tar: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    """Validated ``(member, key, ext)`` of an open shard: every member a regular file named
    ``{key}.{ext}``, no name twice."""
    seen = set()
    try:
        members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise MalformedShardError(shard, None, None, f"not a readable tar ({type(e).__name__}: {e})") from None
    for m in members:
        key, ext = member_key(shard, m.name)
        if not m.isfile():
            raise MalformedShardError(shard, key, m.name, "member is not a regular file (links and folders are "
                                                          "not allowed in a shard)")
        if m.name in seen:
            raise MalformedShardError(shard, key, m.name, "member appears twice")
        seen.add(m.name)
        yield m, key, ext


def read_stats(shard: str | Path) -> dict | None:
    """The shard's stats.json; None when there is none (the shard is unfinished)."""
    path = stats_path(shard)
    try:
        stats = storage.read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise MalformedShardError(shard, None, None, f"{path.name} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(stats, dict):
        raise MalformedShardError(shard, None, None, f"{path.name} is not a JSON object")
    return stats


def stats_checksums(stats: dict | None) -> dict[str, dict[str, str]] | None:
    """Per-key member checksums of a shard's stats; None when it has none (shards written before
    checksums existed, or no stats file)."""
    sums = stats.get("checksums") if stats else None
    return sums if isinstance(sums, dict) else None


def read_stats_checksums(shard: str | Path) -> dict[str, dict[str, str]] | None:
    return stats_checksums(read_stats(shard))


def member_offsets(shard: str | Path, stats: dict | None) -> Iterator[tuple[str, str, int, int]]:
    """``(key, ext, offset, size)`` of every member of a shard: from its stats' ``members`` record
    when it has one (no read of the tar), else by scanning the tar's headers (shards written before
    the record existed; an object-store shard is then fetched into the local object cache). Names
    are validated either way (`MalformedShardError`)."""
    recorded = stats.get("members") if stats else None
    if isinstance(recorded, dict):
        for key in sorted(recorded):
            if not isinstance(recorded[key], dict):
                raise MalformedShardError(shard, key, None, f"{stats_path(shard).name}: members[{key!r}] is not "
                                                            f"an object")
            for ext, where in sorted(recorded[key].items()):
                name = f"{key}.{ext}"
                member_key(shard, name)
                try:
                    offset, size = (int(v) for v in where)
                except (TypeError, ValueError):
                    raise MalformedShardError(shard, key, name, f"{stats_path(shard).name}: its [offset, size] "
                                                                f"is {where!r}") from None
                yield key, ext, offset, size
        return
    try:
        tar = tarfile.open(storage.local_path(shard), "r")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise MalformedShardError(shard, None, None, f"not a readable tar ({type(e).__name__}: {e})") from None
    with tar:
        for m, key, ext in iter_members(shard, tar):
            yield key, ext, m.offset_data, m.size


def members_record(offsets: dict[str, tuple[int, int]]) -> dict[str, dict[str, list[int]]]:
    """``{name: (offset, size)}`` (from `write_tar`) as a stats ``members`` record: ``{key: {ext: [offset, size]}}``."""
    out: dict[str, dict[str, list[int]]] = {}
    for name in sorted(offsets):
        key, ext = name.split(".", 1)
        out.setdefault(key, {})[ext] = [int(offsets[name][0]), int(offsets[name][1])]
    return out


_warned: set[str] = set()


def warn_unverified(where: str | Path) -> None:
    where = str(where)
    if where not in _warned:
        _warned.add(where)
        warnings.warn(f"{where}: shards without checksums (extracted by an older version) are read unverified; "
                      f"re-extract into a new --out to have every sample verified on read",
                      UnverifiedFeaturesWarning, stacklevel=3)


def decode_sample(shard: str | Path, key: str, members: dict[str, bytes],
                  expected: dict[str, str] | None) -> dict:
    """Verify and decode one sample's members (extension → bytes).

    ``expected``: the stats.json checksums of this key (every member, the JSON too), or None.
    The array members are also checked against the checksums in the sample's own JSON, so a
    sample stays verifiable without its stats. Raises `CorruptSampleError`.
    """
    missing = [ext for ext in MEMBERS if ext not in members]
    if missing:
        raise CorruptSampleError(shard, key, f"{key}.{missing[0]}",
                                 f"member missing (the sample has {', '.join(sorted(members)) or 'no members'})")
    sums: dict[str, str] = {}

    def got_sum(ext: str) -> str:  # each member hashed once
        if ext not in sums:
            sums[ext] = checksum(members[ext])
        return sums[ext]

    if expected is not None:
        for ext in MEMBERS:
            want = expected.get(ext)
            if want is None:
                raise CorruptSampleError(shard, key, f"{key}.{ext}", "no checksum for this member in "
                                                                      f"{stats_path(shard).name}")
            got = got_sum(ext)
            if got != want:
                raise CorruptSampleError(shard, key, f"{key}.{ext}", f"checksum mismatch (expected {want}, read "
                                                                      f"{got})")
    try:
        meta = json.loads(members["json"])
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise CorruptSampleError(shard, key, f"{key}.json", f"metadata does not decode ({e})") from None
    if "key" in meta and meta["key"] != key:
        raise CorruptSampleError(shard, key, f"{key}.json", f"metadata names another key ({meta['key']!r})")
    inner = meta.get("checksums")
    if inner is None and expected is None:
        warn_unverified(Path(shard).parent)
    if inner is not None and not isinstance(inner, dict):
        raise CorruptSampleError(shard, key, f"{key}.json", "metadata 'checksums' is not an object")
    for ext in ARRAY_MEMBERS if inner is not None else ():
        got = got_sum(ext)
        if inner.get(ext) != got:
            raise CorruptSampleError(shard, key, f"{key}.{ext}", f"checksum mismatch with the sample's JSON "
                                                                  f"(expected {inner.get(ext)}, read {got})")
    out = {"meta": meta}
    for ext in ARRAY_MEMBERS:
        try:
            out[ext[:-4]] = np.load(io.BytesIO(members[ext]), allow_pickle=False)
        except Exception as e:  # an old, unverified sample with bad bytes
            raise CorruptSampleError(shard, key, f"{key}.{ext}", f"not a readable .npy ({type(e).__name__}: "
                                                                  f"{e})") from None
    return out


def sample_checksum(checksums: dict[str, str] | None) -> str:
    """One digest of a sample's array members (what a prediction's fingerprint remembers); '' when unknown."""
    if not checksums:
        return ""
    return checksum(json.dumps({ext: checksums.get(ext) for ext in ARRAY_MEMBERS}, sort_keys=True).encode())


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def sample_members(key: str, features: np.ndarray, frame_indices: np.ndarray, timestamps: np.ndarray,
                   meta: dict) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in a fixed order; the JSON carries the arrays' checksums."""
    member_key("(new sample)", f"{key}.json")  # never write a name the readers refuse
    arrays = {"features.npy": npy_bytes(features),
              "frame_indices.npy": npy_bytes(np.asarray(frame_indices, dtype=np.int64)),
              "timestamps.npy": npy_bytes(np.asarray(timestamps, dtype=np.float64))}
    meta = {**meta, "checksums": {ext: checksum(data) for ext, data in arrays.items()}}
    return [
        (f"{key}.features.npy", arrays["features.npy"]),
        (f"{key}.frame_indices.npy", arrays["frame_indices.npy"]),
        (f"{key}.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()),
        (f"{key}.timestamps.npy", arrays["timestamps.npy"]),
    ]


def member_checksums(members: Iterable[tuple[str, bytes]]) -> dict[str, dict[str, str]]:
    """``{key: {ext: checksum}}`` of tar members (what a shard's stats.json records)."""
    out: dict[str, dict[str, str]] = {}
    for name, data in members:
        key, ext = name.split(".", 1)
        out.setdefault(key, {})[ext] = checksum(data)
    return out


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_tar(path: str | Path, members: Iterable[tuple[str, bytes]],
              offsets: dict[str, tuple[int, int]] | None = None) -> int:
    """Write members to a tar atomically; return its size in bytes. ``offsets``, when given, gets
    ``{name: (offset of the member's bytes in the tar, size)}``."""
    with storage.atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = _tarinfo(name, len(data))
                start = tar.offset
                tar.addfile(info, io.BytesIO(data))
                if offsets is not None:
                    header = len(info.tobuf(tarfile.USTAR_FORMAT, tar.encoding, tar.errors))
                    offsets[name] = (start + header, len(data))
    return storage.size(path)


def read_tar_members(path: str | Path) -> list[tuple[str, bytes]]:
    """Every member of a shard (or staged video), names validated (`MalformedShardError`)."""
    try:
        tar = tarfile.open(storage.local_path(path), "r")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise MalformedShardError(path, None, None, f"not a readable tar ({type(e).__name__}: {e})") from None
    with tar:
        out = []
        for m, key, _ext in iter_members(path, tar):
            data = tar.extractfile(m).read()
            if len(data) != m.size:
                raise CorruptSampleError(path, key, m.name, f"truncated ({len(data)} of {m.size} bytes)")
            out.append((m.name, data))
        return out


def iter_shard(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(key, sample) pairs of one shard, read with the standard library (no webdataset needed).

    Member names are validated and every sample verified against its checksums (the shard's
    stats.json and the sample's JSON): `MalformedShardError` / `CorruptSampleError`.
    """
    groups: dict[str, dict[str, bytes]] = {}
    for name, data in read_tar_members(path):
        key, ext = name.split(".", 1)
        groups.setdefault(key, {})[ext] = data
    sums = read_stats_checksums(path)
    for key in sorted(groups):
        expected = None
        if sums is not None:
            expected = sums.get(key)
            if expected is None:
                raise CorruptSampleError(path, key, None, f"key not listed in {stats_path(path).name}")
        yield key, decode_sample(path, key, groups[key], expected)


def load_index(features_dir: str | Path):
    path = layout.index_path(features_dir)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} not found: run `malmm-pipeline extract --out {features_dir}` first")
    return storage.read_parquet(path)
