"""The extraction unit and its key: one distinct (video, clip bounds, sampling policy) of a manifest.

`extract` computes one feature sample per unit; `data` (train / infer) maps each manifest sample
back to the unit, and so to the cached features, through the same key. Windowed benchmarks (LVU)
map all their overlapping windows to one unit of the whole video.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from pipeline.benchmarks import protocol
from pipeline.manifest import Manifest, resolve_video
from pipeline.sampling import SamplingPolicy


@dataclass
class Unit:
    key: str
    video: str  # as written in the manifest
    source: str  # resolved path / URI
    start_sec: float | None
    end_sec: float | None
    policy: str
    sample_ids: list[str] = field(default_factory=list)
    shard: int = -1


def unit_key(video: str, start_sec: float | None, end_sec: float | None, policy: str) -> str:
    """Content hash of (video identity, clip bounds, sampling policy): the sample key in the shards."""
    ident = json.dumps([video, start_sec, end_sec, str(policy)], separators=(",", ":"))
    return hashlib.sha1(ident.encode()).hexdigest()[:20]


def _nan_to_none(x) -> float | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x)


def unit_clip(row, policy_source_benchmark: str, task: str) -> tuple[float | None, float | None]:
    """Clip bounds of the unit a sample maps to. Windowed benchmarks (LVU) cache the whole video."""
    proto = protocol(policy_source_benchmark, task)
    if proto.window_sec:
        return None, None
    return _nan_to_none(row["start_sec"]), _nan_to_none(row["end_sec"])


def sample_policy(benchmark: str, task: str, override: str | None) -> SamplingPolicy:
    return SamplingPolicy.parse(override) if override else protocol(benchmark, task).extract_sampling


def plan_units(manifest: Manifest, video_root: str | None, sampling: str | None, shard_size: int) -> list[Unit]:
    """Every distinct unit of the manifest, sorted by key and assigned to shards of ``shard_size``."""
    units: dict[str, Unit] = {}
    for row in manifest.df.to_dict("records"):
        policy = str(sample_policy(row["benchmark"], row["task"], sampling))
        start, end = unit_clip(row, row["benchmark"], row["task"])
        key = unit_key(row["video"], start, end, policy)
        if key not in units:
            units[key] = Unit(key, row["video"], resolve_video(row["video"], video_root), start, end, policy)
        units[key].sample_ids.append(row["sample_id"])
    ordered = sorted(units.values(), key=lambda u: u.key)
    for i, u in enumerate(ordered):
        u.shard = i // shard_size
    return ordered
