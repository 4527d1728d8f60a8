"""The extract stage end to end on a small synthetic benchmark: shards, index, ledger, resume, faults."""
from __future__ import annotations

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
    """kill -9 in the middle of a run, re-run: the same shard bytes as the uninterrupted run."""
    out = tmp_path / "feat"
    cmd = [sys.executable, "-m", "stages", "extract", "--manifest", str(synth_small / "manifest.csv"),
           "--out", str(out), "--shard-size", "8"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    # every process of this run slows each video's decoding by 0.5 s (tests/hooks/slow_decode/sitecustomize.py)
    slow = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(SLOW_DECODE), env.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, env=slow, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "_staging").glob("*.json"))) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    staged = len(list((out / "_staging").glob("*.json")))
    assert 3 <= staged < 16, "the kill should land mid-run"
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # the re-run keeps what the killed run staged (at least those; its Ray workers may have staged more
    # before they were reaped) and computes only the rest
    counts = re.search(r"(\d+) video\(s\) to process, (\d+) already done", r.stderr)
    assert counts, r.stderr[-2000:]
    todo, done = int(counts[1]), int(counts[2])
    assert todo + done == 16 and done >= staged, (todo, done, staged)
    assert "taking over the stale lock" in r.stderr  # the killed run's lock file was left behind
    assert shard_bytes(out) == shard_bytes(features_small)
    assert not (out / "malmm.lock").exists()  # released at the end


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


def test_corrupt_staged_video_is_computed_again(tmp_path):
    """A staged video whose arrays no longer match the checksums of its JSON never reaches a shard."""
    from pipeline import shards as sh

    out = tmp_path / "feat"
    unit = extract.Unit("k0", "v.mp4", "/videos/v.mp4", None, None, "uniform:4", ["s0"], 0)
    members = sh.sample_members("k0", np.ones((4, 2, 3), np.float16), np.arange(4), np.arange(4) / 2.0,
                                {"key": "k0"})
    members = [(n, d[:-1] + bytes([d[-1] ^ 1]) if n.endswith("features.npy") else d) for n, d in members]
    sh.write_tar(out / extract.STAGING / "vid.tar", members)
    ledger = [{"key": "k0", "status": "ok", "reason": "", "message": "", "num_frames": 4}]
    sh.write_json(out / extract.STAGING / "vid.json", ledger)
    assert extract.finalize(out, [unit], {"k0": "vid"}) == []
    assert not list(out.glob("shard-*")) and not extract.staged(out, "vid")  # the next run computes it again
    # intact, it is assembled with the checksums of every member in the stats
    good = sh.sample_members("k0", np.ones((4, 2, 3), np.float16), np.arange(4), np.arange(4) / 2.0, {"key": "k0"})
    sh.write_tar(out / extract.STAGING / "vid.tar", good)
    sh.write_json(out / extract.STAGING / "vid.json", ledger)
    assert extract.finalize(out, [unit], {"k0": "vid"}) == [0]
    stats = json.loads((out / "shard-000000.stats.json").read_text())
    assert stats["checksums"] == sh.member_checksums(good)
    assert [k for k, _ in sh.iter_shard(out / "shard-000000.tar")] == ["k0"]
