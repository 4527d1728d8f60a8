"""The scale-out, end to end: every output in a bucket of a real S3-API server (moto, started by the
tests on 127.0.0.1), on the embedded cluster and on a 2-node Ray cluster (`ray.cluster_utils.Cluster`).

1. synth → extract → train → infer → report with every input and output in the bucket gives the
   same shard bytes, the same loss trajectory, the same predictions and the same leaderboard as the
   same chain on the local disk.
2. extract, train (2 workers) and infer on a 2-node cluster reached through ``--address``, with the
   project shipped to its workers in the runtime environment and all outputs in the bucket (no
   shared local output folder), give the same bytes and metrics as on one node.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline import storage
from pipeline.config import ExtractConfig, InferConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

#: prediction columns that name where a run lives or how long it took, not what it predicted (the fingerprint
#: hashes the checkpoint's and the features' locations among the rest)
WHERE = ["checkpoint", "latency_s", "fingerprint"]


def _train_cfg(features, manifest, out, **kw) -> TrainConfig:
    base = dict(features=str(features), manifest=str(manifest), benchmark="synthetic", out=str(out), epochs=1,
                batch_size=8, lr=2e-3, warmup_steps=2, checkpoint_every=2, keep_last=1, validate=False, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def _infer_cfg(checkpoint, features, manifest, out) -> InferConfig:
    return InferConfig(checkpoint=str(checkpoint), features=str(features), manifest=str(manifest), split="test",
                       out=str(out), batch_size=8, label="chain")


def _chain(root, features, manifest, **train_kw) -> dict:
    """train → infer → report under ``root`` (a local folder or a bucket URI)."""
    from stages import infer, report, train
    root = storage.path(root)
    train.run(_train_cfg(features, manifest, root / "run", **train_kw), progress=False)
    infer.run(_infer_cfg(root / "run", features, manifest, root / "test"), progress=False)
    report.run([str(root / "test")], out=str(root / "report"), n_boot=20, plots=False)
    return {"root": root}


def shard_bytes(d) -> dict[str, bytes]:
    return {p.name: storage.read_bytes(p) for p in storage.listdir(d, "shard-*.tar")}


def losses(run) -> pd.DataFrame:
    df = storage.read_parquet(storage.path(run) / "metrics.parquet")
    return df.sort_values("global_step").reset_index(drop=True)[["global_step", "loss", "lr"]]


def predictions(run) -> pd.DataFrame:
    df = storage.read_parquet(storage.path(run) / "predictions" / "synthetic.parquet")
    return df.drop(columns=WHERE).sort_values("sample_id").reset_index(drop=True)


def scores(report_dir) -> pd.DataFrame:
    df = storage.read_parquet(storage.path(report_dir) / "metrics.parquet")
    cols = [c for c in ("run", "benchmark", "task", "metric", "value", "n", "ci_low", "ci_high", "answer_rule")
            if c in df.columns]
    return df[cols].sort_values(["benchmark", "task", "metric"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def chain_bucket(s3_server):
    return s3_server.create_bucket(f"chain-{os.getpid()}")


@pytest.fixture(scope="module")
def local_chain(synth_small, features_small, tiny_model, ray_local, tmp_path_factory):
    return _chain(tmp_path_factory.mktemp("local_chain"), features_small, synth_small / "manifest.csv")


@pytest.fixture(scope="module")
def bucket_chain(chain_bucket, tiny_model, ray_local):
    """The same chain with every input and output in the bucket: the synthetic videos and manifest too."""
    from pipeline import synth
    from stages import extract
    b = storage.path(chain_bucket)
    synth.generate(b / "synth", videos=16, seconds=16, seed=3, workers=1, progress=False)  # as `synth_small`
    res = extract.run(ExtractConfig(manifest=str(b / "synth" / "manifest.csv"), out=str(b / "features"),
                                    shard_size=8), progress=False)
    assert res.failed == 0, res
    return {**_chain(b / "chain", b / "features", b / "synth" / "manifest.csv"), "bucket": b}


def test_object_store_chain_equals_the_local_one(bucket_chain, local_chain, features_small):
    b, local = bucket_chain["bucket"], local_chain["root"]
    assert shard_bytes(b / "features") == shard_bytes(features_small) and len(shard_bytes(features_small)) >= 4
    for name in ("index.parquet", "ledger.parquet"):
        cols = ["key", "shard_file", "status", "num_frames"]
        pd.testing.assert_frame_equal(storage.read_parquet(b / "features" / name)[cols],
                                      pd.read_parquet(features_small / name)[cols])
    pd.testing.assert_frame_equal(losses(b / "chain" / "run"), losses(local / "run"))
    pd.testing.assert_frame_equal(predictions(b / "chain" / "test"), predictions(local / "test"))
    pd.testing.assert_frame_equal(scores(b / "chain" / "report"), scores(local / "report"))
    assert storage.read_text(b / "chain" / "report" / "leaderboard.md") == (local / "report" / "leaderboard.md").read_text()
    # train and infer read the bucket's samples by ranged reads: no shard was copied into the object cache
    cached = [p.name for p in storage.cache_dir().rglob("*") if p.is_file()]
    assert "trainable.safetensors" in cached and not [n for n in cached if n.endswith(".tar")], cached
    # nothing of the bucket's runs was written to a local output folder
    assert not any(p.name == "chain" for p in Path.cwd().iterdir())


CLUSTER_SCRIPT = r"""
import json, os, subprocess, sys
from ray.cluster_utils import Cluster

cfg = json.loads(sys.argv[1])
# the nodes must not find the project on their own: they start without PYTHONPATH (the drivers have it), and
# the drivers run in a folder of their own (Ray adds a driver's folder to its workers' import path)
driver_env = {**os.environ, "RAY_ADDRESS": ""}
os.environ.pop("PYTHONPATH", None)
# one CPU a node: the 2 training workers and the 2 generator actors each take one, so they span both nodes
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()

def cli(*args):
    r = subprocess.run([sys.executable, "-m", "stages", *args, "--address", cluster.address], env=driver_env,
                       capture_output=True, text=True, timeout=900)
    if r.returncode:
        print(r.stdout[-3000:], r.stderr[-5000:], file=sys.stderr)
        raise SystemExit(f"{args[0]} exited {r.returncode}")
    return r

b = cfg["bucket"]
# the project reaches the workers of a cluster through the runtime environment
import ray
from pipeline.runtime import init_ray
init_ray(cluster.address)

@ray.remote(num_cpus=1)
def where():
    import pipeline, ray
    return pipeline.__file__, ray.get_runtime_context().get_node_id()

files = ray.get([where.options(scheduling_strategy="SPREAD").remote() for _ in range(4)])
print("SHIPPED", json.dumps(sorted({f for f, _ in files})), "NODES", len({n for _, n in files}))
ray.shutdown()

cli("extract", "--manifest", f"{b}/synth/manifest.csv", "--out", f"{b}/cluster/features", "--shard-size", "8")
r = cli("train", "--features", f"{b}/cluster/features", "--manifest", f"{b}/synth/manifest.csv",
    "--benchmark", "synthetic", "--out", f"{b}/cluster/run", "--epochs", "1", "--batch-size", "8", "--lr", "2e-3",
    "--warmup-steps", "2", "--checkpoint-every", "2", "--keep-last", "1", "--no-validate", "--seed", "7",
    "--num-workers", "2")
print("\n".join("TRAIN " + ln for ln in r.stderr.splitlines() if ln.startswith("train: started")))
cli("infer", "--checkpoint", f"{b}/cluster/run", "--features", f"{b}/cluster/features",
    "--manifest", f"{b}/synth/manifest.csv", "--split", "test", "--out", f"{b}/cluster/test",
    "--batch-size", "8", "--workers", "2", "--label", "chain")
cluster.shutdown()
print("CLUSTER OK")
"""


def test_two_node_cluster_with_outputs_in_the_bucket(bucket_chain, tmp_path):
    b = bucket_chain["bucket"]
    r = subprocess.run([sys.executable, "-c", CLUSTER_SCRIPT, json.dumps({"bucket": str(b)})], cwd=tmp_path,
                       capture_output=True, text=True, timeout=1500,
                       env={**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "CLUSTER OK" in r.stdout, (r.stdout[-3000:], r.stderr[-6000:])
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("SHIPPED"))
    shipped, nodes = json.loads(line.split(" NODES ")[0][len("SHIPPED "):]), int(line.rsplit(" ", 1)[1])
    assert nodes == 2, line  # tasks ran on both nodes
    assert all("runtime_resources" in f for f in shipped), shipped  # the workers import the shipped package
    started = [ln for ln in r.stdout.splitlines() if ln.startswith("TRAIN ")]
    assert len(started) == 1 and "2 worker(s) on 2 node(s)" in started[0], started  # one worker a node
    # extract: the same shards as one node
    assert shard_bytes(b / "cluster" / "features") == shard_bytes(b / "features")
    # train on 2 workers over 2 nodes, then infer on 2 actors: what 2 workers and 2 actors give on one node
    # (dropout masks depend on how a batch is split over workers: the reference splits it the same way)
    from stages import infer, train
    ref, manifest = b / "one-node", b / "synth" / "manifest.csv"
    train.run(_train_cfg(b / "features", manifest, ref / "run", num_workers=2), progress=False)
    infer.run(_infer_cfg(ref / "run", b / "features", manifest, ref / "test"), progress=False)
    pd.testing.assert_frame_equal(losses(b / "cluster" / "run"), losses(ref / "run"))
    pd.testing.assert_frame_equal(predictions(b / "cluster" / "test"), predictions(ref / "test"))
    # no shared local output folder: the runs' markers are in the bucket
    assert storage.exists(b / "cluster" / "run" / "latest.json")
