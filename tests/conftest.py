"""Shared fixtures: an isolated model cache, the tiny default model, a small synthetic benchmark
and its extracted features (each built once per test session)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MALMM_SHARED", ROOT.parent / "shared"))


@pytest.fixture(scope="session", autouse=True)
def malmm_home(tmp_path_factory):
    """Every test session builds its own tiny default model (never the user's cache)."""
    home = os.environ.get("MALMM_TEST_HOME") or str(tmp_path_factory.mktemp("malmm_home"))
    os.environ["MALMM_HOME"] = home
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
def ray_local():
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
