"""The extract stage end to end on a small synthetic benchmark: shards, index, ledger, resume, faults."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.benchmarks import PROTOCOLS
from pipeline.config import ExtractConfig
from pipeline.shards import iter_shard
from stages import extract

ROOT = Path(__file__).resolve().parents[1]
#: a sitecustomize that slows decoding in every process of a run started with it first on PYTHONPATH
SLOW_DECODE = ROOT / "tests" / "hooks" / "slow_decode"


def shard_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*.tar"))}


def test_shards_index_ledger(features_small, synth_small):
    index = pd.read_parquet(features_small / "index.parquet")
    ledger = pd.read_parquet(features_small / "ledger.parquet")
    manifest = pd.read_csv(synth_small / "manifest.csv")
    assert (ledger.status == "ok").all()
    # one unit per (video, clip, policy): whole-video tasks share one unit per video, next_event has its own clip
    assert index.key.is_unique and len(index) < len(manifest)
    assert ledger.n_samples.sum() == len(manifest)
    shards = sorted(features_small.glob("shard-*.tar"))
    assert [p.name for p in shards] == [f"shard-{i:06d}.tar" for i in range(len(shards))]
    assert all((p.with_suffix(".stats.json")).exists() for p in shards)
    key, sample = next(iter_shard(shards[0]))
    meta = sample["meta"]
    assert sample["features"].dtype == np.float16
    t, p, c = sample["features"].shape
    n = int(PROTOCOLS["synthetic", "qa"].extract_sampling.value)  # the synthetic benchmark's whole-video policy
    assert t == n and len(sample["frame_indices"]) == t and len(sample["timestamps"]) == t
    assert np.allclose(sample["timestamps"], sample["frame_indices"] / meta["source"]["fps"])
    assert meta["sampling"] == f"uniform:{n}" and meta["dtype"] == "float16"
    assert meta["vision_model"]["weights_sha256"]
    assert not (features_small / "_staging").exists()


def test_shard_stats_record_where_each_member_lies(features_small):
    """Readers reach a sample by ranged reads at the offsets the stats record, without scanning the tar."""
    import tarfile
    from pipeline.data import FeatureStore
    shards = sorted(features_small.glob("shard-*.tar"))
    for shard in shards:
        stats = json.loads(shard.with_suffix(".stats.json").read_text())
        with tarfile.open(shard) as tar:
            scanned = {m.name: [m.offset_data, m.size] for m in tar.getmembers()}
        recorded = {f"{key}.{ext}": where for key, exts in stats["members"].items() for ext, where in exts.items()}
        assert recorded == scanned and len(recorded) == 4 * stats["ok"] > 0
    store = FeatureStore(features_small)
    key = sorted(store.offsets)[0]
    assert store.load(key)["features"].dtype == np.float16


def test_readable_with_webdataset_and_ray(features_small, ray_local):
    import ray
    import webdataset as wds

    urls = [str(p) for p in sorted(features_small.glob("shard-*.tar"))]
    n = 0
    for s in wds.WebDataset(urls, shardshuffle=False).decode():
        assert s["features.npy"].ndim == 3 and "key" in s["json"]
        n += 1
    index = pd.read_parquet(features_small / "index.parquet")
    assert n == (index.status == "ok").sum()
    ds = ray.data.read_webdataset(urls)
    assert ds.count() == n


def test_features_are_pre_layernorm_hidden_states(features_small, tiny_model):
    """Features equal the vision model's last encoder states (before post_layernorm) on the same frames."""
    import torch

    from pipeline.decode import read_frames
    from pipeline.manifest import resolve_video
    from pipeline.model.checkpoint import load_vision_model
    from pipeline.vision import CLIP_MEAN, CLIP_STD

    key, sample = next(iter_shard(sorted(features_small.glob("shard-*.tar"))[0]))
    meta = sample["meta"]
    video = Path(resolve_video(meta["video"], str(_synth_root(features_small))))
    frames = read_frames(str(video), sample["frame_indices"], size=(meta["image_size"],) * 2).frames
    model = load_vision_model(str(tiny_model)).eval()
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    ref = out.hidden_states[-1].numpy()
    assert np.allclose(sample["features"].astype(np.float32), ref, atol=2e-3, rtol=2e-3)
    # and they are not the post-layernorm output
    assert not np.allclose(sample["features"].astype(np.float32), out.last_hidden_state.numpy(), atol=1e-2)


def _synth_root(features_dir: Path) -> Path:
    plan = json.loads((features_dir / "extract.json").read_text())
    return Path(plan["video_root"])


def test_rerun_of_finished_job_does_no_work(features_small, synth_small):
    before = shard_bytes(features_small)
    res = extract.run(ExtractConfig(manifest=str(synth_small / "manifest.csv"), out=str(features_small),
                                    shard_size=8), progress=False)
    assert res.processed_videos == 0 and res.skipped_videos > 0
    assert shard_bytes(features_small) == before


def test_fault_corpus_ends_as_typed_ledger_rows(tmp_path, synth_small, tiny_model, ray_local):
    from tests.videos import make_fault_corpus

    faults = make_fault_corpus(tmp_path / "faults")
    good = sorted((synth_small / "videos").glob("*.mp4"))[0]
    rows = [f"good,synthetic,first_color,train,{good},red,,,q"]
    for i, (name, (path, _reason)) in enumerate(sorted(faults.items())):
        rows.append(f"f{i},synthetic,first_color,train,{path},red,,,q")
    m = tmp_path / "m.csv"
    m.write_text("sample_id,benchmark,task,split,video,answer,start_sec,end_sec,question\n" + "\n".join(rows) + "\n")
    out = tmp_path / "feat"
    # the good video lies outside the manifest's folder (the default video root)
    res = extract.run(ExtractConfig(manifest=str(m), out=str(out), decode_timeout=60, allow_outside_root=True),
                      progress=False)
    ledger = pd.read_parquet(out / "ledger.parquet")
    assert res.ok + res.failed == res.units == len(rows)
    by_video = dict(zip(ledger.video, zip(ledger.status, ledger.reason)))
    assert by_video[str(good)] == ("ok", "")
    for name, (path, reason) in faults.items():
        status, got = by_video[str(path)]
        if reason == "ok":  # e.g. a header that lies about the frame count: clamped, usable frames
            assert status == "ok", (name, got)
        else:
            assert (status, got) == ("failed", reason), name
    assert (ledger[ledger.status == "failed"].message.str.len() > 0).all()


def test_cli_strict_and_summary(tmp_path, synth_small, tiny_model):
    m = tmp_path / "m.csv"
    good = sorted((synth_small / "videos").glob("*.mp4"))[0]
    m.write_text("sample_id,benchmark,task,split,video,answer\n"
                 f"a,synthetic,first_color,train,{good},red\nb,synthetic,first_color,train,missing.mp4,red\n")
    env = {**os.environ, "RAY_ADDRESS": ""}
    r = subprocess.run([sys.executable, "-m", "stages", "extract", "--manifest", str(m), "--out",
                        str(tmp_path / "f"), "--allow-outside-root"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "1 ok, 1 failed" in r.stdout and "missing=1" in r.stdout
    assert "line 3 (row 2): video file not found" in r.stderr  # reported at plan time, before the run
    r = subprocess.run([sys.executable, "-m", "stages", "extract", "--manifest", str(m), "--out",
                        str(tmp_path / "f"), "--strict", "--allow-outside-root"], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    assert r.returncode == 1 and "0 videos processed" in r.stdout


@pytest.mark.slow
def test_kill_and_resume_is_byte_identical(tmp_path, synth_small, features_small, tiny_model):
    """kill -9 in the middle of a run, re-run: the same shard bytes as the uninterrupted run; the
    shards the killed run finished are kept and only the videos of the others are computed again."""
    out = tmp_path / "feat"
    cmd = [sys.executable, "-m", "stages", "extract", "--manifest", str(synth_small / "manifest.csv"),
           "--out", str(out), "--shard-size", "8"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    # every process of this run slows each video's decoding by 0.5 s (tests/hooks/slow_decode/sitecustomize.py)
    slow = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(SLOW_DECODE), env.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, env=slow, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("shard-*.stats.json")):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)
    finished = {p.name for p in out.glob("shard-*.stats.json")}
    assert 1 <= len(finished) < 4, "the kill should land mid-run, after a shard is complete"
    kept = {n: (out / n).read_bytes() for n in finished}
    ledger = pd.read_parquet(features_small / "ledger.parquet")
    unfinished = ledger[~ledger.shard_file.str.replace(".tar", ".stats.json").isin(finished)]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    counts = re.search(r"(\d+) video\(s\) to process, (\d+) already done", r.stderr)
    assert counts, r.stderr[-2000:]
    todo, done = int(counts[1]), int(counts[2])
    # only the videos feeding an unfinished shard are computed again
    assert todo == unfinished.video.nunique() and todo + done == 16, (todo, done, len(finished))
    assert "taking over the stale lock" in r.stderr  # the killed run's lock file was left behind
    assert shard_bytes(out) == shard_bytes(features_small)
    assert {n: (out / n).read_bytes() for n in finished} == kept  # finished shards were not written again
    assert not (out / "malmm.lock").exists()  # released at the end


def test_retry_failed_recomputes_only_the_failed_units(tmp_path, synth_small, tiny_model, ray_local):
    """--retry-failed reopens a shard with a failed unit: its ok samples are carried over, the failed
    one is computed now that its video is there, and the shard equals a clean extraction's."""
    import shutil

    videos = sorted((synth_small / "videos").glob("*.mp4"))[:3]
    (tmp_path / "v").mkdir()
    for v in videos[:2]:
        shutil.copy(v, tmp_path / "v" / v.name)
    m = tmp_path / "v" / "m.csv"
    m.write_text("sample_id,benchmark,task,split,video,answer\n"
                 + "".join(f"s{i},synthetic,first_color,train,{v.name},red\n" for i, v in enumerate(videos)))
    cfg = ExtractConfig(manifest=str(m), out=str(tmp_path / "feat"))
    res = extract.run(cfg, progress=False)
    assert (res.ok, res.failed, res.failures) == (2, 1, {"missing": 1})
    shutil.copy(videos[2], tmp_path / "v" / videos[2].name)
    again = extract.run(cfg, progress=False)
    assert again.processed_videos == 0 and again.failed == 1  # without the flag, a failure stays recorded
    res = extract.run(dataclasses.replace(cfg, retry_failed=True), progress=False)
    assert (res.ok, res.failed, res.processed_videos) == (3, 0, 1)
    clean = extract.run(dataclasses.replace(cfg, out=str(tmp_path / "clean")), progress=False)
    assert clean.ok == 3 and shard_bytes(tmp_path / "feat") == shard_bytes(tmp_path / "clean")


@pytest.mark.slow
def test_two_node_cluster_writes_same_shards(tmp_path, synth_small, features_small, tiny_model):
    script = f"""
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1}})
cluster.add_node(num_cpus=1)
from pipeline.config import ExtractConfig
from stages import extract
import ray
res = extract.run(ExtractConfig(manifest={str(synth_small / 'manifest.csv')!r}, out={str(tmp_path / 'feat')!r},
                                shard_size=8, address=cluster.address), progress=False)
nodes = len([n for n in ray.nodes() if n["Alive"]])
print("NODES", nodes, "OK", res.ok)
ray.shutdown(); cluster.shutdown()
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "RAY_ADDRESS": ""}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "NODES 2" in r.stdout
    assert shard_bytes(tmp_path / "feat") == shard_bytes(features_small)


def test_dry_run_plans_without_writing(synth_small, tmp_path):
    out = tmp_path / "never"
    res = extract.run(ExtractConfig(manifest=str(synth_small / "manifest.csv"), out=str(out), dry_run=True),
                      progress=False)
    assert res.units > 0 and res.ok == 0 and not out.exists()


def _sample(key: str, value: float = 1.0):
    from pipeline import shards as sh
    return sh.sample_members(key, np.full((4, 2, 3), value, np.float16), np.arange(4), np.arange(4) / 2.0,
                             {"key": key})


def _row(key: str, shard: int = 0, status: str = "ok") -> dict:
    return {"key": key, "status": status, "reason": "" if status == "ok" else "missing", "message": "",
            "num_frames": 4 if status == "ok" else 0, "shard": shard}


def test_shard_writer_bytes_do_not_depend_on_arrival_order(tmp_path, monkeypatch):
    """A shard is written once, the moment its last unit arrives, in key order whatever the order of
    arrival; a unit sent twice counts once; its scratch is gone once the shard is written."""
    from pipeline import shards as sh
    from pipeline.shard_writer import ShardWriter

    monkeypatch.setenv("MALMM_CACHE", str(tmp_path / "cache"))
    keys = ["k3", "k0", "k2", "k1"]
    outs = {}
    for name, order in (("sorted", sorted(keys)), ("shuffled", keys)):
        out = tmp_path / name
        w = ShardWriter(str(out), {0: keys, 1: ["k9"]})
        got = [w.add(0, k, _sample(k, float(k[1])), _row(k)) for k in order]
        assert got == [[], [], [], [0]] and w.pending() == {1: 1}
        assert w.add(0, order[0], _sample(order[0]), _row(order[0])) == []  # a retried task's copy
        assert not list(w.scratch.glob("0/*"))  # spilled samples removed once the shard is written
        outs[name] = (out / "shard-000000.tar").read_bytes()
        assert [k for k, _ in sh.iter_shard(out / "shard-000000.tar")] == sorted(keys)
        stats = json.loads((out / "shard-000000.stats.json").read_text())
        assert [r["key"] for r in stats["ledger"]] == sorted(keys) and stats["ok"] == 4
    assert outs["sorted"] == outs["shuffled"]


def test_shard_writer_refuses_a_sample_damaged_in_transit_and_foreign_units(tmp_path, monkeypatch):
    from pipeline import shards as sh
    from pipeline.shard_writer import ShardWriter

    monkeypatch.setenv("MALMM_CACHE", str(tmp_path / "cache"))
    w = ShardWriter(str(tmp_path / "feat"), {0: ["k0"]})
    members = [(n, d[:-1] + bytes([d[-1] ^ 1]) if n.endswith("features.npy") else d) for n, d in _sample("k0")]
    with pytest.raises(sh.CorruptSampleError, match="k0.*features.npy.*checksum mismatch"):
        w.add(0, "k0", members, _row("k0"))
    with pytest.raises(ValueError, match="does not belong"):
        w.add(1, "k7", _sample("k7"), _row("k7", 1))
    assert not list((tmp_path / "feat").glob("shard-*"))  # nothing written


def test_shard_writer_adopts_the_ok_samples_of_a_reopened_shard(tmp_path, monkeypatch):
    from pipeline import shards as sh
    from pipeline.shard_writer import ShardWriter

    monkeypatch.setenv("MALMM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "feat"
    w = ShardWriter(str(out), {0: ["a", "b"]})
    w.add(0, "a", _sample("a"), _row("a"))
    w.add(0, "b", [], _row("b", status="failed"))
    stats = json.loads((out / "shard-000000.stats.json").read_text())
    assert stats["failed"] == 1
    w2 = ShardWriter(str(out), {0: ["a", "b"]})
    w2.adopt(0, stats)
    assert w2.pending() == {0: 1}
    assert w2.add(0, "b", _sample("b", 2.0), _row("b")) == [0]
    assert [k for k, _ in sh.iter_shard(out / "shard-000000.tar")] == ["a", "b"]
    # a carried-over sample must match the checksums the shard's stats record
    stats = json.loads((out / "shard-000000.stats.json").read_text())
    stats["ledger"][1] = _row("b", status="failed")
    stats["checksums"]["a"]["features.npy"] = "sha256:" + "0" * 64
    with pytest.raises(sh.CorruptSampleError, match="checksum mismatch"):
        ShardWriter(str(out), {0: ["a", "b"]}).adopt(0, stats)
