"""The embedded default model ("tiny"): built once into the cache, then loaded like any checkpoint."""
from __future__ import annotations

import fcntl
from pathlib import Path

from pipeline.benchmarks import protocol
from pipeline import storage
from pipeline.config import malmm_home
from pipeline.synth import frame_corpus, lm_corpus

TINY_NAME = "tiny-instructblip-v6"  # bump when the tiny build changes


def tiny_dir() -> Path:
    return malmm_home() / "models" / TINY_NAME


def ensure_tiny_default(*, pretrain_steps: int | None = None, quiet: bool = False) -> Path:
    """Return the tiny default's directory, building it on first use (about a minute on a CPU).

    ``pretrain_steps``: LLM pretraining steps of a build (the Q-Former's image pretraining then runs
    half as many, at least 50); None builds the default (the LLM's default steps, 800 Q-Former
    steps). A shorter build is for test suites; it applies only when this call builds the model.
    The build is guarded by a file lock so concurrent stages build it once.
    """
    target = tiny_dir()
    if storage.exists(target / "config.json"):
        return target
    storage.makedirs(target.parent)
    # flock needs a real local file: the build lock stays off the storage layer (the build's writes go through it)
    with open(target.parent / f".{TINY_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not storage.exists(target / "config.json"):
            from pipeline.model.tiny import build_tiny_instructblip  # heavy (torch, transformers): on use
            steps = pretrain_steps or None
            if not quiet:
                print(f"building the tiny default model into {target} (once) …", flush=True)
            # Q-Former image pretraining: 800 steps (its loss is ~0.01 after 600, measured)
            kwargs = {"pretrain_steps": steps, "qformer_steps": max(50, steps // 2)} if steps else {"qformer_steps": 800}
            # one learned query (one video token) per frame the synthetic protocol samples: the LLM
            # reads one word per frame (pipeline.synth.lm_corpus)
            frames = protocol("synthetic", "first_color").num_frames
            build_tiny_instructblip(target, lm_corpus(20000, seed=0, num_frames=frames), num_query_tokens=frames,
                                    image_corpus=frame_corpus(6000, seed=0), qformer_frame_positions=frames,
                                    **kwargs)
    return target


def resolve_model_dir(model: str) -> Path:
    """'tiny' → the embedded default; anything else must be a local model directory."""
    if model in ("tiny", "", None):
        return ensure_tiny_default()
    path = Path(model).expanduser()
    if not storage.exists(path / "config.json"):
        raise FileNotFoundError(
            f"model directory {path} has no config.json; pass a local InstructBLIP directory saved with "
            f"save_pretrained (e.g. a copy of Salesforce/instructblip-vicuna-7b) or 'tiny'")
    return path.resolve()  # absolute: Ray workers do not run in the driver's folder
