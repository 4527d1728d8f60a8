"""Corrupt and hostile input: per-sample checksums verified on read, member names validated,
predictions that remember their features, one writer per output folder."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import shards as sh

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers

@pytest.fixture
def features_copy(features_small, tmp_path):
    """A private copy of the session's features folder, to damage."""
    d = tmp_path / "features"
    shutil.copytree(features_small, d)
    return d


def _members_by_key(shard: Path) -> dict[str, dict[str, bytes]]:
    groups: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            groups.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return groups


def _flip_byte(shard: Path, member: str, at: int = 200) -> None:
    """Flip one byte of a member in place, as a bad disk or a bad copy would."""
    with tarfile.open(shard) as tar:
        m = tar.getmember(member)
    with open(shard, "r+b") as f:
        f.seek(m.offset_data + min(at, m.size - 1))
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def _first_ok_key(features: Path) -> tuple[str, Path]:
    index = pd.read_parquet(features / "index.parquet")
    row = index[index.status == "ok"].sort_values("key").iloc[0]
    return row.key, features / row.shard_file


def _stats_file(shard: Path) -> Path:
    return shard.with_name(shard.name.replace(".tar", ".stats.json"))


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _rewrite_shard(shard: Path, change) -> None:
    """Rewrite a shard as a re-extract would, with ``change(key, sample) -> sample | None`` applied
    (with the shard writer's own functions, and the checksums of every member in the stats)."""
    members = []
    for key, group in sorted(_members_by_key(shard).items()):
        s = {ext[:-4]: np.load(io.BytesIO(group[ext])) for ext in group if ext.endswith(".npy")}
        s["meta"] = json.loads(group["json"])
        s = change(key, s) or s
        meta = {k: v for k, v in s["meta"].items() if k != "checksums"}
        members += sh.sample_members(key, s["features"], s["frame_indices"], s["timestamps"], meta)
    offsets: dict = {}
    sh.write_tar(shard, members, offsets)
    stats = json.loads(_stats_file(shard).read_text())
    stats["members"] = sh.members_record(offsets)
    stats["checksums"] = {}
    for name, data in members:
        key, ext = name.split(".", 1)
        stats["checksums"].setdefault(key, {})[ext] = _sha(data)
    sh.write_json(_stats_file(shard), stats)


def _strip_checksums(features: Path) -> None:
    """Make a features folder look like one extracted before checksums existed."""
    for shard in sorted(features.glob("shard-*.tar")):
        members = []
        for key, group in sorted(_members_by_key(shard).items()):
            meta = json.loads(group["json"])
            meta.pop("checksums", None)
            group = {**group, "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()}
            members += [(f"{key}.{ext}", group[ext]) for ext in sorted(group)]
        sh.write_tar(shard, members)
        stats = json.loads(_stats_file(shard).read_text())
        stats.pop("checksums", None)
        stats.pop("members", None)  # older than the checksums, so older than the offsets record too
        sh.write_json(_stats_file(shard), stats)


# ----------------------------------------------------------------------------- checksums

def test_every_sample_carries_checksums_in_its_json_and_the_shard_stats(features_small):
    shards = sorted(features_small.glob("shard-*.tar"))
    assert shards
    for shard in shards:
        stats = json.loads(_stats_file(shard).read_text())
        groups = _members_by_key(shard)
        assert groups and set(stats.get("checksums", {})) == set(groups)
        for key, group in groups.items():
            meta = json.loads(group["json"])
            for ext in ("features.npy", "frame_indices.npy", "timestamps.npy"):  # the sample's JSON: its arrays
                assert meta["checksums"][ext] == _sha(group[ext])
            for ext in ("features.npy", "frame_indices.npy", "json", "timestamps.npy"):  # the stats: every member
                assert stats["checksums"][key][ext] == _sha(group[ext])


@pytest.mark.parametrize("member", ["features.npy", "timestamps.npy", "json"])
def test_flipped_byte_is_a_typed_error_naming_shard_key_and_member(features_copy, member):
    from pipeline.data import FeatureStore

    key, shard = _first_ok_key(features_copy)
    store = FeatureStore(features_copy)
    clean = store.load(key)
    _flip_byte(shard, f"{key}.{member}", at=200 if member != "json" else 5)
    store = FeatureStore(features_copy)
    with pytest.raises(ValueError) as e:
        store.load(key)  # today: NaN / 65504 in the features, silently (and a bare JSONDecodeError for the JSON)
    assert type(e.value).__name__ == "CorruptSampleError"
    assert e.value.shard == str(shard) and e.value.key == key and e.value.member == f"{key}.{member}"
    assert shard.name in str(e.value) and key in str(e.value) and "checksum mismatch" in str(e.value)
    # the shard's other samples still load, and the standard-library reader refuses the bad one too
    others = [k for k in _members_by_key(shard) if k != key]
    assert others
    for k in others:
        assert store.load(k)["features"].shape[1:] == clean["features"].shape[1:]
    with pytest.raises(ValueError, match=key):
        list(sh.iter_shard(shard))


def test_sample_json_checksums_hold_without_the_stats(features_copy):
    """A sample stays verifiable from its own JSON when its shard's stats are gone."""
    from pipeline.data import FeatureStore

    key, shard = _first_ok_key(features_copy)
    _stats_file(shard).unlink()
    _flip_byte(shard, f"{key}.features.npy")
    with pytest.raises(ValueError, match="checksum mismatch with the sample's JSON"):
        FeatureStore(features_copy).load(key)


def test_truncated_shard_is_a_corrupt_sample(features_copy):
    from pipeline.data import FeatureStore

    key, shard = _first_ok_key(features_copy)
    store = FeatureStore(features_copy)  # offsets read before the cut, as a long-running reader has them
    last = max((k for k in store.offsets if store.offsets[k]["json"][0] == str(shard)),
               key=lambda k: max(off for _, off, _ in store.offsets[k].values()))
    with open(shard, "r+b") as f:
        f.truncate(max(off + size for _, off, size in store.offsets[last].values()) - 100)
    with pytest.raises(ValueError, match="truncated|checksum") as e:
        store.load(last)  # today: numpy's own error at best
    assert type(e.value).__name__ == "CorruptSampleError" and shard.name in str(e.value)


def test_old_shards_without_checksums_load_with_a_warning(features_copy):
    from pipeline.data import FeatureStore

    _strip_checksums(features_copy)
    getattr(sh, "_warned", set()).clear()
    key, _ = _first_ok_key(features_copy)
    store = FeatureStore(features_copy)
    with pytest.warns(UserWarning, match="without checksums.*re-extract"):
        sample = store.load(key)
    assert sample["features"].ndim == 3 and store.checksum(key) == ""


# ----------------------------------------------------------------------------- member names

def _fake_features(tmp_path: Path, names: list[str], *, link: str | None = None) -> Path:
    """A features folder whose one shard holds members of the given names."""
    d = tmp_path / "hostile"
    d.mkdir(parents=True)
    with tarfile.open(d / "shard-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in names:
            data = b"{}" if name.endswith("json") else sh.npy_bytes(np.zeros(2))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    pd.DataFrame({"key": ["k"], "shard_file": ["shard-000000.tar"], "status": ["ok"]}).to_parquet(
        d / "index.parquet")
    return d


GOOD = ["k.features.npy", "k.frame_indices.npy", "k.json", "k.timestamps.npy"]


@pytest.mark.parametrize("bad, why", [
    (".features.npy", "empty sample key"),
    ("../k.json", "'/'"),
    ("sub/k.json", "'/'"),
    ("k..json", "'..'"),
    ("k.exe", "unexpected extension"),
    ("k.features.npy.bak", "unexpected extension"),
    ("k", "no extension"),
])
def test_malformed_member_names_are_a_clear_error(tmp_path, bad, why):
    from pipeline.data import FeatureStore

    d = _fake_features(tmp_path, GOOD + [bad])
    with pytest.raises(ValueError) as e:
        FeatureStore(d).has("k")  # today: accepted (key '' or 'sub/k', extension anything)
    assert type(e.value).__name__ == "MalformedShardError"
    assert e.value.member == bad and "shard-000000.tar" in str(e.value) and why in str(e.value)
    with pytest.raises(ValueError, match="malformed member name"):
        list(sh.iter_shard(d / "shard-000000.tar"))


def test_links_duplicates_and_unreadable_tars_are_a_clear_error(tmp_path):
    from pipeline.data import FeatureStore

    with pytest.raises(ValueError, match="not a regular file"):
        FeatureStore(_fake_features(tmp_path / "a", GOOD, link="k2.json")).has("k")
    with pytest.raises(ValueError, match="appears twice"):
        FeatureStore(_fake_features(tmp_path / "b", GOOD + ["k.json"])).has("k")
    d = _fake_features(tmp_path / "c", GOOD)
    (d / "shard-000000.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ValueError, match="shard-000000.tar.*not a readable tar"):
        FeatureStore(d).has("k")


def test_index_naming_a_shard_outside_the_folder_is_refused(tmp_path):
    from pipeline.data import FeatureStore

    d = _fake_features(tmp_path, GOOD)
    pd.DataFrame({"key": ["k"], "shard_file": ["../elsewhere/shard-000000.tar"], "status": ["ok"]}).to_parquet(
        d / "index.parquet")
    with pytest.raises(ValueError, match="index.parquet.*not shard-NNNNNN.tar"):
        FeatureStore(d).has("k")  # today: opened wherever it points


def test_a_sample_missing_a_member_is_corrupt(tmp_path):
    from pipeline.data import FeatureStore

    d = _fake_features(tmp_path, [n for n in GOOD if "timestamps" not in n])
    with pytest.raises(ValueError, match="k.timestamps.npy.*member missing"):
        FeatureStore(d).load("k")  # today: a sample without timestamps, a KeyError later


# ----------------------------------------------------------------------------- infer and train on corrupt samples

def _test_samples(features, synth, task=None):
    from pipeline.data import FeatureStore, join_samples
    from pipeline.manifest import read_manifest
    return join_samples(read_manifest(synth / "manifest.csv"), FeatureStore(features), split="test",
                        benchmark="synthetic", task=task).samples


def test_infer_records_a_corrupt_sample_on_its_row(features_copy, synth_small, tiny_model):
    import torch

    from pipeline.model.checkpoint import load_malmm
    from stages.infer import predict_samples

    samples = _test_samples(features_copy, synth_small, "first_color")
    bad = samples[0]
    shard = features_copy / pd.read_parquet(features_copy / "index.parquet").set_index("key").shard_file[bad.key]
    _flip_byte(shard, f"{bad.key}.features.npy")
    rows = predict_samples(load_malmm(tiny_model), samples, str(features_copy), 12, batch_size=8,
                           device=torch.device("cpu"))
    by_id = {r["sample_id"]: r for r in rows}
    err = by_id[bad.sample_id]["error"]
    assert err.startswith("CorruptSampleError") and shard.name in err and bad.key in err, err
    assert by_id[bad.sample_id]["beams"] == []
    assert all(not by_id[s.sample_id]["error"] and by_id[s.sample_id]["beams"] for s in samples[1:])


def test_train_stops_on_a_corrupt_sample_naming_shard_and_key(features_copy, synth_small, ray_local, tiny_model,
                                                            tmp_path):
    from pipeline.config import TrainConfig
    from stages import train

    for shard in sorted(features_copy.glob("shard-*.tar")):  # every sample: the first batch meets one
        for key in _members_by_key(shard):
            _flip_byte(shard, f"{key}.features.npy")
    cfg = TrainConfig(features=str(features_copy), manifest=str(synth_small / "manifest.csv"), benchmark="synthetic",
                      task="first_color", out=str(tmp_path / "run"), epochs=1, batch_size=4, validate=False)
    with pytest.raises(ValueError) as e:  # today: it trains on NaN / 65504 features
        train.run(cfg, progress=False)
    assert type(e.value).__name__ == "CorruptFeaturesError" and isinstance(e.value, train.TrainInputError)
    msg = str(e.value)
    assert "shard-" in msg and "key '" in msg and ".features.npy" in msg and "checksum mismatch" in msg, msg
    assert "nothing was trained on it" in msg and "re-run the same `malmm-pipeline extract`" in msg, msg
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))  # no step was taken


# ----------------------------------------------------------------------------- predictions remember their features

def test_reextracted_features_are_predicted_again(features_copy, synth_small, tiny_model, ray_local, tmp_path):
    from pipeline.config import InferConfig
    from stages import infer

    cfg = InferConfig(checkpoint=str(tiny_model), features=str(features_copy), manifest=str(synth_small / "manifest.csv"),
                      split="test", task="first_color", out=str(tmp_path / "pred"), batch_size=8)
    first = infer.run(cfg, progress=False)
    n = first["predicted"]
    assert n >= 2 and first["errors"] == 0
    assert infer.run(replace(cfg, dry_run=True), progress=False)["skipped"] == n
    # a re-extract that changes one unit's features (say, another vision model build): same key, other bytes
    target = _test_samples(features_copy, synth_small, "first_color")[0].key
    shard = features_copy / pd.read_parquet(features_copy / "index.parquet").set_index("key").shard_file[target]

    def change(key, s):
        if key == target:
            return {**s, "features": (s["features"].astype(np.float32) * 0.5).astype(s["features"].dtype)}

    _rewrite_shard(shard, change)
    again = infer.run(replace(cfg, dry_run=True), progress=False)
    assert again["skipped"] == n - 1  # today: every sample skipped, the stale prediction kept


# ----------------------------------------------------------------------------- one writer per output folder

HOLD = ("import sys, time\nfrom pipeline.lock import OutputLock\nOutputLock(sys.argv[1], 'holder').acquire()\n"
        "print('held', flush=True)\ntime.sleep(300)\n")


@contextmanager
def _holder(folder: Path):
    """A real second process holding the folder's lock."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert p.stdout.readline().strip() == "held"
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_lock_refuses_a_second_writer_and_takes_over_after_kill_9(tmp_path, capsys):
    from pipeline.lock import LOCK_NAME, OutputLock, OutputLockedError

    folder = tmp_path / "out"
    with _holder(folder) as p:
        t0 = time.perf_counter()
        with pytest.raises(OutputLockedError) as e:
            OutputLock(folder, "extract").acquire()
        assert time.perf_counter() - t0 < 5  # at once, not after a wait
        msg = str(e.value)
        assert f"pid {p.pid}" in msg and socket.gethostname() in msg and str(folder / LOCK_NAME) in msg
        assert e.value.holder["command"] == "holder" and e.value.holder["started"]
        os.kill(p.pid, signal.SIGKILL)  # no clean-up runs: the lock file stays behind
        p.wait()
    assert (folder / LOCK_NAME).exists()
    lock = OutputLock(folder, "train").acquire()
    assert lock.took_over["pid"] == p.pid
    assert "stale lock" in capsys.readouterr().err
    held = json.loads((folder / LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["command"] == "train"
    with pytest.raises(OutputLockedError):  # even from the same process: one writer
        OutputLock(folder, "infer").acquire()
    lock.release()
    assert not (folder / LOCK_NAME).exists()
    with OutputLock(folder, "infer") as again:  # released: free for the next writer, nothing stale
        assert again.took_over is None


def test_stale_lock_without_flock_is_recognised_by_its_dead_pid(tmp_path, monkeypatch):
    """On a file system without flock, a lock of a dead pid on this host is stale; a live one is not."""
    from pipeline import lock as lk

    folder = tmp_path / "out"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (folder / lk.LOCK_NAME).write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(),
                                                    "command": "extract", "started": "then"}))
    monkeypatch.setattr(lk, "_flock", lambda fd: None)
    with lk.OutputLock(folder, "extract") as got:
        assert got.took_over["pid"] == int(dead)
    (folder / lk.LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                                    "command": "extract", "started": "now"}))
    with pytest.raises(lk.OutputLockedError, match=f"pid {os.getppid()}"):
        lk.OutputLock(folder, "extract").acquire()
    (folder / lk.LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "train",
                                                    "started": "now"}))
    monkeypatch.setattr(lk, "_flock", lambda fd: True)
    with pytest.raises(lk.OutputLockedError, match="another host.*delete"):
        lk.OutputLock(folder, "extract").acquire()


def test_extract_train_infer_refuse_a_locked_folder(tmp_path, synth_small, features_small, tiny_model):
    from pipeline.config import ExtractConfig, InferConfig, TrainConfig
    from pipeline.lock import LOCK_NAME, OutputLockedError
    from stages import extract, infer, train

    manifest = str(synth_small / "manifest.csv")
    out = tmp_path / "out"
    with _holder(out) as p:
        for run in (lambda: extract.run(ExtractConfig(manifest=manifest, out=str(out)), progress=False),
                    lambda: train.run(TrainConfig(features=str(features_small), manifest=manifest,
                                                  benchmark="synthetic", out=str(out)), progress=False),
                    lambda: infer.run(InferConfig(checkpoint=str(tiny_model), features=str(features_small),
                                                  manifest=manifest, out=str(out)), progress=False)):
            with pytest.raises(OutputLockedError, match=f"pid {p.pid} on host {socket.gethostname()}"):
                run()
        assert sorted(os.listdir(out)) == [LOCK_NAME]  # nothing read-modified or written
        # a dry run writes nothing, so it does not need the lock
        assert extract.run(ExtractConfig(manifest=manifest, out=str(out), dry_run=True), progress=False).units > 0
        # the command line: exit 1 with the message
        r = subprocess.run([sys.executable, "-m", "stages", "extract", "--manifest", manifest, "--out", str(out)],
                           capture_output=True, text=True, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": ""})
        assert r.returncode == 1 and f"pid {p.pid}" in r.stderr and LOCK_NAME in r.stderr, r.stderr[-2000:]


def test_the_error_hint_rebuilds_a_corrupt_shard(features_copy, synth_small, tiny_model, ray_local):
    """What the error says to do (delete the shard's stats, re-run extract) restores the very same bytes."""
    from pipeline.config import ExtractConfig
    from pipeline.data import FeatureStore
    from stages import extract

    key, shard = _first_ok_key(features_copy)
    before = shard.read_bytes()
    _flip_byte(shard, f"{key}.features.npy")
    with pytest.raises(ValueError) as e:
        FeatureStore(features_copy).load(key)
    stats = _stats_file(shard)
    assert f"delete {stats} and re-run the same `malmm-pipeline extract`" in str(e.value)
    stats.unlink()
    res = extract.run(ExtractConfig(manifest=str(synth_small / "manifest.csv"), out=str(features_copy), shard_size=8),
                      progress=False)
    assert 0 < res.processed_videos < res.units and res.failed == 0
    assert shard.read_bytes() == before
    assert FeatureStore(features_copy).load(key)["features"].ndim == 3
