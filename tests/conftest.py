"""Shared fixtures: an isolated model cache, the tiny default model, a small synthetic benchmark
and its extracted features (each built once per test session)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MALMM_SHARED", ROOT.parent / "shared"))


#: where S3 requests go unless a test starts the S3 server: a closed port on this machine, so that no
#: test can ever reach a real object store
NO_S3 = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "none", "AWS_SECRET_ACCESS_KEY": "none",
         "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
for _k, _v in NO_S3.items():
    os.environ[_k] = _v


@pytest.fixture(scope="session", autouse=True)
def malmm_home(tmp_path_factory):
    """Every test session builds its own tiny default model (never the user's cache)."""
    home = os.environ.get("MALMM_TEST_HOME") or str(tmp_path_factory.mktemp("malmm_home"))
    os.environ["MALMM_HOME"] = home
    # the local object cache and shard-writer scratch of the session, never the user's
    os.environ["MALMM_CACHE"] = str(tmp_path_factory.mktemp("malmm_cache") / "objects")
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    yield Path(home)


@pytest.fixture(scope="session")
def tiny_model(malmm_home):
    """The tiny default, built (when the cache lacks it) with a short pretraining: 300 LLM steps.

    Every test that needs the default model takes this fixture, so the session builds it here,
    before any stage (in this process or a subprocess) looks for it."""
    from pipeline.defaults import ensure_tiny_default
    return ensure_tiny_default(pretrain_steps=300, quiet=True)


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """An embedded Ray cluster for the session; started after the S3 server so that its workers
    see the server's settings."""
    import ray

    from pipeline.runtime import init_ray
    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory):
    """A small synthetic benchmark: 16 videos of 16 s."""
    from pipeline import synth
    out = tmp_path_factory.mktemp("synth")
    synth.generate(out, videos=16, seconds=16, seed=3, workers=1)
    return out


@pytest.fixture(scope="session")
def features_small(synth_small, tiny_model, ray_local, tmp_path_factory):
    from pipeline.config import ExtractConfig
    from stages import extract
    out = tmp_path_factory.mktemp("features")
    res = extract.run(ExtractConfig(manifest=str(synth_small / "manifest.csv"), out=str(out), shard_size=8),
                      progress=False)
    assert res.failed == 0, res
    return out


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 for this session; its AWS variables set in this process
    (workers of an embedded Ray cluster inherit them)."""
    from tests.s3server import S3Server
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log").start()
    os.environ.update(server.env())
    yield server
    server.stop()
    os.environ.update(NO_S3)


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket per test: ``s3://<name>``."""
    import re
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid()}"
    return s3_server.create_bucket(name)
