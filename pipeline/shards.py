"""Feature shard I/O (DESIGN §4): deterministic WebDataset tars, written atomically.

A sample in a shard is a group of tar members sharing the sample key:

    {key}.features.npy       float16 [T, P, C]  ViT hidden states before the post layer norm
    {key}.frame_indices.npy  int64   [T]        frame numbers in the source video
    {key}.timestamps.npy     float64 [T]        seconds from the start of the video
    {key}.json               metadata (source, duration, fps, decoder, policy, model, dtype …)

Members are written with fixed tar headers (mtime 0, uid/gid 0, sorted by key), so the
same inputs always give the same bytes – which is what lets an interrupted run
resume and end byte-identical to an uninterrupted one.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHARD_PATTERN = "shard-{:06d}.tar"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def sample_members(key: str, features: np.ndarray, frame_indices: np.ndarray, timestamps: np.ndarray,
                   meta: dict) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in a fixed order."""
    return [
        (f"{key}.features.npy", npy_bytes(features)),
        (f"{key}.frame_indices.npy", npy_bytes(np.asarray(frame_indices, dtype=np.int64))),
        (f"{key}.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()),
        (f"{key}.timestamps.npy", npy_bytes(np.asarray(timestamps, dtype=np.float64))),
    ]


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_tar(path: str | Path, members: Iterable[tuple[str, bytes]]) -> int:
    """Write members to a tar atomically; return its size in bytes."""
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
    return Path(path).stat().st_size


def read_tar_members(path: str | Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path, "r") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def write_parquet(path: str | Path, rows: list[dict] | pa.Table, schema: pa.Schema | None = None) -> None:
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path, ".parquet") as tmp:
        pq.write_table(table, tmp)


def read_sample(members: dict[str, bytes]) -> dict:
    """Decode one WebDataset sample dict (extension → bytes, as `webdataset` yields it)."""
    out = {}
    for ext, data in members.items():
        if ext.endswith(".npy"):
            out[ext[:-4]] = np.load(io.BytesIO(data), allow_pickle=False)
        elif ext == "json":
            out["meta"] = json.loads(data)
    return out


def iter_shard(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(key, sample) pairs of one shard, read with the standard library (no webdataset needed)."""
    groups: dict[str, dict[str, bytes]] = {}
    for name, data in read_tar_members(path):
        key, ext = name.split(".", 1)
        groups.setdefault(key, {})[ext] = data
    for key in sorted(groups):
        yield key, read_sample(groups[key])


def load_index(features_dir: str | Path):
    import pandas as pd
    path = Path(features_dir) / "index.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `malmm-pipeline extract --out {features_dir}` first")
    return pd.read_parquet(path)
