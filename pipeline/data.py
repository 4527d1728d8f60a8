"""From manifest samples to model inputs: join samples to cached features, pick frames.

`train` and `infer` never touch video: a sample's frames come from the feature shards
written by `extract`. A manifest row maps to its extraction unit by the same content
hash `extract` used; windowed benchmarks (LVU) cut the window from the unit's cached
1 fps frames by timestamp. When the cache holds more frames than the model's T, frames
are picked TSN-style — one random frame per equal segment for training, the segment
middle for evaluation — as the reference implementation does.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import layout, storage
from pipeline.benchmarks import protocol
from pipeline.manifest import Manifest
from pipeline.sampling import segment_indices
from pipeline.shards import (CorruptSampleError, MalformedShardError, ShardIntegrityError, decode_sample, load_index,
                             member_offsets, read_stats, sample_checksum, stats_checksums, stats_path)
from pipeline.units import sample_policy, unit_clip, unit_key


class FeatureStore:
    """Random access to the samples of a features folder (a local folder or an object-store URI), by
    key, through member offsets: each sample is one ranged read per member.

    Reads are verified (the README's architecture section, data contracts): member names are
    validated when the offsets are read (`MalformedShardError`), and every member a `load`
    returns matches the checksums of the shard's stats.json and of the sample's JSON
    (`CorruptSampleError`, naming the shard, key and member). Shards extracted before checksums
    existed load unverified, with one `UnverifiedFeaturesWarning`.
    """

    def __init__(self, features_dir):
        self.dir = storage.path(features_dir)
        self.index = load_index(self.dir)
        self.plan = storage.read_json(layout.plan_path(self.dir), {}, missing_ok=True)
        self._offsets: dict[str, dict[str, tuple[str, int, int]]] | None = None
        self._stats: dict[str, dict | None] = {}

    @property
    def offsets(self) -> dict[str, dict[str, tuple[str, int, int]]]:
        """``{key: {ext: (shard, offset, size)}}`` of every sample in the folder's finished shards."""
        if self._offsets is None:
            offsets: dict[str, dict[str, tuple[str, int, int]]] = {}
            for shard in sorted(set(self.index.shard_file.dropna())):
                if not re.fullmatch(layout.SHARD_RE, str(shard)):  # never a path out of the folder
                    raise MalformedShardError(layout.index_path(self.dir), None, None,
                                              f"names a shard file {shard!r}, not shard-NNNNNN.tar in {self.dir}")
                path = self.dir / shard
                if not storage.exists(path):
                    continue
                for key, ext, off, size in member_offsets(path, self._shard_stats(str(path))):
                    entry = offsets.setdefault(key, {})
                    other = next(iter(entry.values()))[0] if entry else str(path)
                    if other != str(path):
                        raise MalformedShardError(path, key, f"{key}.{ext}", f"the key is also in {other}")
                    if ext in entry:
                        raise MalformedShardError(path, key, f"{key}.{ext}", "member appears twice")
                    entry[ext] = (str(path), off, size)
            self._offsets = offsets
        return self._offsets

    def has(self, key: str) -> bool:
        return key in self.offsets

    def _shard_stats(self, shard: str) -> dict | None:
        if shard not in self._stats:
            self._stats[shard] = read_stats(shard)
        return self._stats[shard]

    def expected_checksums(self, key: str) -> dict[str, str] | None:
        """The stats.json checksums of a key's members; None for shards without checksums."""
        shard = next(iter(self.offsets[key].values()))[0]
        sums = stats_checksums(self._shard_stats(shard))
        if sums is None:
            return None
        if key not in sums:
            raise CorruptSampleError(shard, key, None, f"key not listed in {stats_path(shard).name}")
        return sums[key]

    def checksum(self, key: str) -> str:
        """One digest of the key's array members (features, frame indices, timestamps), read from the
        shard's stats.json without touching the tar; '' for shards without checksums."""
        try:
            return sample_checksum(self.expected_checksums(key))
        except ShardIntegrityError:
            return ""  # the load reports it, on that sample

    def load(self, key: str) -> dict:
        """{'features': [T,P,C], 'frame_indices': [T], 'timestamps': [T], 'meta': {...}}, verified.

        Raises `CorruptSampleError` (a ValueError naming the shard, key and member) when a member's
        bytes do not match their checksum, are truncated or missing.
        """
        entries = self.offsets[key]
        shard = next(iter(entries.values()))[0]
        members = {}
        for ext, (path, off, size) in entries.items():
            data = storage.read_range(path, off, size)
            if len(data) != size:
                raise CorruptSampleError(path, key, f"{key}.{ext}", f"truncated ({len(data)} of {size} bytes)")
            members[ext] = data
        return decode_sample(shard, key, members, self.expected_checksums(key))


@dataclass
class Sample:
    sample_id: str
    benchmark: str
    task: str
    split: str
    video: str
    key: str
    prompt: str
    answer: str
    references: list[str]
    start_sec: float | None = None  # window bounds (LVU)
    end_sec: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class JoinReport:
    samples: list[Sample]
    missing: dict[str, int]  # reason → count of samples without features

    def summary(self) -> str:
        skipped = sum(self.missing.values())
        if not skipped:
            return f"{len(self.samples)} samples with features"
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.missing.items()))
        return f"{len(self.samples)} samples with features; {skipped} skipped ({reasons})"


def join_samples(manifest: Manifest, store: FeatureStore, *, split: str | None, benchmark: str | None,
                 task: str | None = None) -> JoinReport:
    """Manifest rows of (split, benchmark, task) that have features; the others counted by reason."""
    df = manifest.df
    if split:
        df = df[df.split == split]
    if benchmark:
        df = df[df.benchmark == benchmark]
    if task:
        df = df[df.task == task]
    status = dict(zip(store.index.key, store.index.status))
    reasons = {}
    if "reason" in store.index.columns:
        reasons = dict(zip(store.index.key, store.index.reason))
    else:
        ledger_path = layout.ledger_path(store.dir)
        if storage.exists(ledger_path):
            led = storage.read_parquet(ledger_path, columns=["key", "reason"])
            reasons = dict(zip(led.key, led.reason))
    samples, missing = [], {}
    override = store.plan.get("sampling")
    for row in df.to_dict("records"):
        policy = str(sample_policy(row["benchmark"], row["task"], override))
        start, end = unit_clip(row, row["benchmark"], row["task"])
        key = unit_key(row["video"], start, end, policy)
        st = status.get(key)
        if st != "ok" or not store.has(key):
            why = "not extracted" if st is None else (f"extract failed: {reasons.get(key) or st}" if st != "ok"
                                                    else "shard missing")
            missing[why] = missing.get(why, 0) + 1
            continue
        proto = protocol(row["benchmark"], row["task"])
        refs = json.loads(row["references"]) if str(row.get("references", "")).strip() else [row["answer"]]
        win_s = row["start_sec"] if proto.window_sec and not np.isnan(row["start_sec"]) else None
        win_e = row["end_sec"] if proto.window_sec and not np.isnan(row["end_sec"]) else None
        known = {"sample_id", "benchmark", "task", "split", "video", "answer", "references", "question",
                 "start_sec", "end_sec"}
        samples.append(Sample(row["sample_id"], row["benchmark"], row["task"], row["split"], row["video"], key,
                              proto.render_prompt(row.get("question", "")), row["answer"], refs, win_s, win_e,
                              {k: v for k, v in row.items() if k not in known}))
    return JoinReport(samples, missing)


def select_frames(timestamps: np.ndarray, num_frames: int, *, window: tuple[float | None, float | None] = (None, None),
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Positions (into a unit's cached frames) of the T frames a sample sees.

    Window bounds cut by timestamp (LVU); then TSN-style segment sampling: random in each
    segment with ``rng`` (training), segment middles without (evaluation); repeats when
    the cache holds fewer than T frames.
    """
    pos = np.arange(len(timestamps))
    start, end = window
    if start is not None or end is not None:
        keep = np.ones(len(timestamps), bool)
        if start is not None:
            keep &= timestamps >= start - 1e-6
        if end is not None:
            keep &= timestamps < end - 1e-6
        if keep.any():
            pos = pos[keep]
        else:  # window beyond the cached frames (e.g. rounding at the end): nearest frame
            pos = pos[[int(np.argmin(np.abs(timestamps - (start or 0.0))))]]
    return pos[segment_indices(len(pos), num_frames, rng)]


class SampleDataset:
    """Map-style dataset of (features [T,P,C] float32, prompt, answer) for a list of samples.

    Deterministic: training frames come from an RNG seeded by (seed, epoch, index), so a
    resumed run sees exactly the frames the uninterrupted one would have seen.
    """

    def __init__(self, samples: list[Sample], features_dir: str | Path, num_frames: int, *, train: bool,
                 seed: int = 0):
        self.samples = samples
        self.features_dir = str(features_dir)
        self.num_frames = num_frames
        self.train = train
        self.seed = seed
        self.epoch = 0
        self._store: FeatureStore | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def store(self) -> FeatureStore:
        if self._store is None:  # opened lazily: one per loader process
            self._store = FeatureStore(self.features_dir)
        return self._store

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        unit = self.store.load(s.key)
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.train else None
        pos = select_frames(unit["timestamps"], self.num_frames, window=(s.start_sec, s.end_sec), rng=rng)
        return {"features": np.asarray(unit["features"][pos], dtype=np.float32), "prompt": s.prompt,
                "answer": s.answer, "index": i}


def collate(items: list[dict]) -> dict:
    import torch  # heavy: imported on use (the CLI imports this module)
    return {"features": torch.from_numpy(np.stack([it["features"] for it in items])),
            "prompts": [it["prompt"] for it in items], "answers": [it["answer"] for it in items],
            "index": [it["index"] for it in items]}
