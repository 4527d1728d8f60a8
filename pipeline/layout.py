"""The on-disk layout: folder and file names of a features folder and of a run folder
(the README's data contracts). Stages and shared parts build paths with these, never with
string literals, so the layout is declared once.

Features folder (written by ``extract``)::

    shard-NNNNNN.tar  shard-NNNNNN.stats.json   (stats written last: the shard is complete)
    index.parquet  ledger.parquet  extract.json
    malmm.lock

Run folder (``train`` / ``infer``)::

    checkpoints/step-NNNNNNNN/   trainable.safetensors, malmm_config.json, optimizer.pt,
                                 scheduler.pt, [scaler.pt], rng_rank{r}.pt, state.json, metrics.parquet
    checkpoints/checkpoint_manager_snapshot.json   (Ray Train's record of the checkpoints)
    best/                        trainable.safetensors, malmm_config.json (best on validation)
    latest.json  run.json  metrics.parquet  frozen_llm.json
    predictions/{benchmark}.parquet  infer.json  malmm.lock

Report folder: metrics.parquet, leaderboard.md, leaderboard.html, PNGs.

Every function takes a local path or an object-store URI alike and returns the location
`pipeline.storage.path` gives (a `Path`, or a `storage.URI` that joins with ``/`` the same way).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.storage import path as _location

LOCK_NAME = "malmm.lock"

# ---------------------------------------------------------------- features folder
SHARD_PATTERN = "shard-{:06d}.tar"
SHARD_GLOB = "shard-*.tar"
SHARD_RE = r"shard-\d+\.tar"  # what a shard file name must match (index.parquet names nothing else)
STATS_SUFFIX = ".stats.json"
STATS_GLOB = "shard-*" + STATS_SUFFIX
INDEX = "index.parquet"
LEDGER = "ledger.parquet"
EXTRACT_PLAN = "extract.json"


def shard_name(shard: int) -> str:
    return SHARD_PATTERN.format(shard)


def stats_name(shard_file: str) -> str:
    """``shard-N.tar`` → ``shard-N.stats.json`` (any other name gets the suffix appended)."""
    return (shard_file[:-len(".tar")] if shard_file.endswith(".tar") else shard_file) + STATS_SUFFIX


def shard_stats_path(features_dir, shard: int) -> Path:
    return _location(features_dir) / stats_name(shard_name(shard))


def index_path(features_dir) -> Path:
    return _location(features_dir) / INDEX


def ledger_path(features_dir) -> Path:
    return _location(features_dir) / LEDGER


def plan_path(features_dir) -> Path:
    return _location(features_dir) / EXTRACT_PLAN


# ---------------------------------------------------------------- run folder
CKPT_DIR = "checkpoints"
STEP_GLOB = "step-*"
LATEST = "latest.json"
RUN_INFO = "run.json"
METRICS = "metrics.parquet"
FROZEN_LLM = "frozen_llm.json"
PREDICTIONS_DIR = "predictions"
INFER_INFO = "infer.json"

# inside one checkpoint folder (the weights / config names are `pipeline.model.checkpoint`'s)
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
STATE = "state.json"
SCALER = "scaler.pt"  # the fp16 loss scale (`pipeline.precision`)
#: Ray Train's record of a run's checkpoints, in ``checkpoints/``: what it restores a run from
RAY_TRAIN_RECORD = "checkpoint_manager_snapshot.json"
BEST_DIR = "best"


def step_name(global_step: int) -> str:
    return f"step-{global_step:08d}"


def rng_name(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def checkpoints_dir(run_dir) -> Path:
    return _location(run_dir) / CKPT_DIR


def checkpoint_dir(run_dir, name_or_step: str | int) -> Path:
    name = step_name(name_or_step) if isinstance(name_or_step, int) else name_or_step
    return checkpoints_dir(run_dir) / name


def latest_path(run_dir) -> Path:
    """Written last after a checkpoint: the run's completion marker."""
    return _location(run_dir) / LATEST


def run_info_path(run_dir) -> Path:
    return _location(run_dir) / RUN_INFO


def best_dir(run_dir) -> Path:
    """The best weights on validation (an inference checkpoint: weights and config only)."""
    return _location(run_dir) / BEST_DIR


def metrics_path(run_dir) -> Path:
    return _location(run_dir) / METRICS


def frozen_llm_path(run_dir) -> Path:
    return _location(run_dir) / FROZEN_LLM


def predictions_dir(run_dir) -> Path:
    return _location(run_dir) / PREDICTIONS_DIR


def predictions_path(run_dir, benchmark: str) -> Path:
    return predictions_dir(run_dir) / f"{benchmark}.parquet"


def infer_info_path(run_dir) -> Path:
    return _location(run_dir) / INFER_INFO


def lock_path(folder) -> Path:
    return _location(folder) / LOCK_NAME


# ---------------------------------------------------------------- report folder
LEADERBOARD_MD = "leaderboard.md"
LEADERBOARD_HTML = "leaderboard.html"

