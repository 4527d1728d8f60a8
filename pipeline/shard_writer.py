"""The shard writer: owns some shards of one features folder and writes each the moment it is complete.

`extract` starts a few of these as Ray actors (shard *s* belongs to writer *s* mod *W*); the tasks
that turn a video's features into samples send each unit's tar members straight to the writer of
its shard, so every sample travels once and is written once, and the driver sees only metadata.

Units reach a writer in any order (videos finish in any order, and one video's units may belong
to several shards). Each arriving sample is spilled to the writer's local scratch folder, one file
per member, so a writer holds at most one sample in memory whatever the shard size; the ledger
row and checksums stay in memory (small). When the last expected unit of a shard arrives, the
shard is written in key order with fixed tar headers (`pipeline.shards.write_tar`, atomically:
a local file, then moved or uploaded) and its ``stats.json`` last, which marks it complete; then
its scratch is removed. The bytes therefore never depend on arrival order, which is what lets a
killed run resumed later end byte-identical to an uninterrupted one.

A run killed mid-way loses only the samples of shards it had not finished (they are computed
again on resume); finished shards are kept and never computed again.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

from pipeline import layout, storage
from pipeline import shards as sh


def scratch_root(out) -> Path:
    """This machine's scratch folder for the writers of one features folder (beside the object cache)."""
    digest = hashlib.sha1(str(storage.resolved(out)).encode()).hexdigest()[:16]
    return storage.cache_dir().parent / "scratch" / digest


class ShardWriter:
    """Writes the shards ``expected`` names (``{shard: [unit key, …]}``) of the features folder ``out``."""

    def __init__(self, out: str, expected: dict[int, list[str]], index: int = 0):
        self.out = storage.path(out)
        self.expected = {int(s): set(keys) for s, keys in expected.items()}
        self.ledger: dict[int, dict[str, dict]] = {s: {} for s in self.expected}
        self.sums: dict[int, dict[str, dict]] = {s: {} for s in self.expected}
        self.scratch = scratch_root(out) / f"writer-{index}"
        shutil.rmtree(self.scratch, ignore_errors=True)  # what a killed run left here is not trusted
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.written: list[int] = []

    def add(self, shard: int, key: str, members: list[tuple[str, bytes]], ledger_row: dict) -> list[int]:
        """One unit's sample (``members``; none for a failed unit) and ledger row; returns the shards
        this call completed and wrote (``[]`` or ``[shard]``)."""
        shard = int(shard)
        if key not in self.expected.get(shard, ()):
            raise ValueError(f"unit {key} does not belong to a shard of this writer (shard {shard})")
        if shard in self.written or key in self.ledger[shard]:
            return []  # sent twice (a retried task): the first copy stands
        if members:
            self.sums[shard][key] = verified_checksums(key, members)
            folder = self.scratch / str(shard)
            folder.mkdir(exist_ok=True)
            for name, data in members:
                (folder / name).write_bytes(data)
        self.ledger[shard][key] = ledger_row
        if len(self.ledger[shard]) < len(self.expected[shard]):
            return []
        self._write(shard)
        return [shard]

    def adopt(self, shard: int, stats: dict) -> None:
        """Carry the ok samples of an existing shard (``stats``: its stats.json) over into this writing
        of it (``--retry-failed``: only its failed units are computed again). Each carried member is
        checked against the checksum its stats record."""
        shard = int(shard)
        path = self.out / layout.shard_name(shard)
        keep = {r["key"]: r for r in stats["ledger"] if r["status"] == "ok"}
        folder = self.scratch / str(shard)
        folder.mkdir(exist_ok=True)
        got: dict[str, dict[str, str]] = {}
        with tarfile.open(storage.local_path(path), "r") as tar:
            for m, key, ext in sh.iter_members(path, tar):
                if key not in keep:
                    continue
                data = tar.extractfile(m).read()
                if sh.checksum(data) != stats["checksums"].get(key, {}).get(ext):
                    raise sh.CorruptSampleError(path, key, m.name, "checksum mismatch with the shard's stats")
                (folder / m.name).write_bytes(data)
                got.setdefault(key, {})[ext] = sh.checksum(data)
        for key, rec in keep.items():
            if set(got.get(key, {})) != set(sh.MEMBERS):
                raise sh.CorruptSampleError(path, key, None, "sample listed ok in the stats is incomplete")
            self.ledger[shard][key] = rec
            self.sums[shard][key] = got[key]

    def pending(self) -> dict[int, int]:
        """``{shard: units still missing}`` of the shards not written yet."""
        return {s: len(self.expected[s]) - len(self.ledger[s]) for s in self.expected if s not in self.written}

    def _write(self, shard: int) -> None:
        folder = self.scratch / str(shard)
        ledger = [self.ledger[shard][k] for k in sorted(self.ledger[shard])]

        def members():  # one member in memory at a time, in key order (then member name)
            for rec in ledger:
                if rec["status"] != "ok":
                    continue
                for ext in sorted(sh.MEMBERS):
                    name = f"{rec['key']}.{ext}"
                    yield name, (folder / name).read_bytes()

        name = layout.shard_name(shard)
        storage.remove(self.out / layout.stats_name(name))  # a reopened shard is unfinished until its new stats land
        offsets: dict[str, tuple[int, int]] = {}
        size = sh.write_tar(self.out / name, members(), offsets)
        stats = {"shard": name, "units": len(ledger), "ok": sum(r["status"] == "ok" for r in ledger),
                 "failed": sum(r["status"] != "ok" for r in ledger),
                 "frames": sum(r["num_frames"] for r in ledger), "bytes": size, "ledger": ledger,
                 # every member's checksum, the JSON too: what train and infer verify each sample against
                 "checksums": {k: self.sums[shard][k] for k in sorted(self.sums[shard])},
                 # where each member's bytes lie: one ranged read per sample, no scan of the tar
                 "members": sh.members_record(offsets)}
        storage.write_json(self.out / layout.stats_name(name), stats)  # written last: marks the shard complete
        shutil.rmtree(folder, ignore_errors=True)
        self.ledger[shard], self.sums[shard] = {}, {}
        self.written.append(shard)

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def verified_checksums(key: str, members: list[tuple[str, bytes]]) -> dict[str, str]:
    """Checksums of one sample's members, checked against those its JSON records (the arrays arrived
    as they were made) and for completeness; `CorruptSampleError` otherwise."""
    sums = sh.member_checksums(members).get(key, {})
    where = f"(sample {key} in transit)"
    missing = [ext for ext in sh.MEMBERS if ext not in sums]
    if missing:
        raise sh.CorruptSampleError(where, key, f"{key}.{missing[0]}", "member missing")
    meta = json.loads(dict(members)[f"{key}.json"])
    for ext in sh.ARRAY_MEMBERS:
        if meta.get("checksums", {}).get(ext) != sums[ext]:
            raise sh.CorruptSampleError(where, key, f"{key}.{ext}", "checksum mismatch with the sample's JSON")
    return sums
