"""Every option of every stage, with its default, in one place.

Values come from (lowest to highest precedence) these defaults, an optional config
file (TOML or YAML, one table per stage: ``[extract]``, ``[train]``, ``[infer]``,
``[report]``, ``[demo]``) and command-line flags.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import storage


def malmm_home() -> Path:
    """Cache directory for the embedded default models (``$MALMM_HOME``, else ~/.cache/malmm-pipeline)."""
    return Path(os.environ.get("MALMM_HOME") or Path.home() / ".cache" / "malmm-pipeline").expanduser().resolve()


@dataclass
class ExtractConfig:
    manifest: str = ""
    video_root: str | None = None  # default: the manifest's folder
    allow_outside_root: bool = False  # accept local videos outside video_root (absolute, file:// or ../ paths)
    out: str = "work/features"
    model: str = "tiny"  # 'tiny' (embedded default) or a local InstructBLIP / vision-model directory
    sampling: str | None = None  # override every benchmark's policy, e.g. 'uniform:32' or 'fps:1'
    shard_size: int = 64  # extraction units per shard
    batch_size: int = 64  # frames per vision-model forward pass
    dtype: str = "float16"  # stored feature dtype
    vision_workers: int = 1  # vision-model actors
    num_gpus: float | None = None  # GPUs per vision actor; default: 1 when the cluster has GPUs, else 0
    decode_cpus: float = 1.0  # CPUs per decode task (equal to the vision actor's: Ray Data then fuses decoding into the actor, measured faster on 2 CPUs than a separate decode pool)
    decode_timeout: float = 300.0  # seconds before the watchdog kills a decode
    videos_per_task: int = 4  # videos per decode / encode / write task (amortises Ray's per-task cost)
    shard_writers: int = 2  # shard writer actors (shard s belongs to writer s mod N)
    strict: bool = False  # exit non-zero when any unit failed
    retry_failed: bool = False  # re-try units that failed in an earlier run
    address: str | None = None  # Ray cluster address; default $RAY_ADDRESS or a local cluster
    dry_run: bool = False


@dataclass
class TrainConfig:
    features: str = "work/features"
    manifest: str = ""
    benchmark: str = "synthetic"
    task: str | None = None  # default: all tasks of the benchmark
    out: str = "work/runs/train"
    model: str = "tiny"
    memory: str = "mbc"  # mbc | fifo | none (last frame only) | per_frame (the reference's memory_bank_length=0)
    visual_memory: bool = True
    query_memory: bool = True
    aggregation: str = "memory"  # memory | concat | avgpool
    num_frames: int | None = None  # default: the benchmark's
    memory_length: int | None = None
    frame_position_init: str | None = None  # zeros | sinusoidal (default: the benchmark's)
    loss_reduction: str | None = None  # token | sample (default: the benchmark's)
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.05
    warmup_steps: int = 1000
    grad_accum: int = 1
    seed: int = 42
    num_workers: int = 1
    use_gpu: bool = False
    checkpoint_every: int = 500  # steps
    keep_last: int = 2  # checkpoints Ray Train keeps (0: all); the best on validation is also kept in best/
    max_failures: int = 3  # restarts of the worker group from the last checkpoint after a failure (-1: no limit)
    validate: bool = True
    resume: bool = True
    precision: str = "auto"  # pipeline.precision: auto | bf16 | fp16 | fp32
    address: str | None = None
    dry_run: bool = False


@dataclass
class InferConfig:
    checkpoint: str = ""
    features: str = "work/features"
    manifest: str = ""
    split: str = "test"
    benchmark: str | None = None
    task: str | None = None
    out: str = "work/runs/infer"
    label: str | None = None  # the run's name in the leaderboard (default: the folder name)
    model: str = "tiny"
    # T, L and the memory mode; None: what the checkpoint records (our checkpoints: how they were trained;
    # a LAVIS .pth: its saved config), else each benchmark's protocol. Contradicting a checkpoint warns.
    num_frames: int | None = None
    memory_length: int | None = None
    memory: str | None = None  # mbc | fifo | none | per_frame
    batch_size: int = 16
    workers: int = 1
    num_gpus: float | None = None
    precision: str = "auto"  # pipeline.precision: auto | bf16 | fp16 | fp32
    address: str | None = None
    dry_run: bool = False


@dataclass
class ReportConfig:
    runs: list[str] = field(default_factory=list)
    out: str = "reports"
    n_boot: int = 1000
    answer_rule: str = "reference"  # pipeline.metrics.ANSWER_RULES: "reference" (the paper's) or "lenient"


SECTIONS = {"extract": ExtractConfig, "train": TrainConfig, "infer": InferConfig, "report": ReportConfig}


def load_file(path: str | Path | None) -> dict:
    if not path:
        return {}
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml  # optional: only for YAML config files
        data = yaml.safe_load(text) or {}
    elif path.suffix == ".toml":
        data = tomllib.loads(text)
    else:
        raise ValueError(f"{path}: config files must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of stage sections")
    return data


def resolve(cls, section: str, config_file: str | Path | None = None, **flags):
    """Defaults ← config file section ← flags that were given (not None)."""
    values: dict = {}
    data = load_file(config_file).get(section, {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{config_file}: unknown option(s) in [{section}]: {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(names))}")
    values.update(data)
    values.update({k: v for k, v in flags.items() if v is not None})
    for name in LOCATION_FIELDS & names:  # an unsupported scheme is an error now, never "missing" later
        given = values.get(name)
        for v in (given if isinstance(given, list) else [given]):
            if isinstance(v, str) and "://" in v:
                storage.check(v, f"--{name.replace('_', '-')}")
    return cls(**values)


#: the options that name a location: a local path, file://, s3:// or gs:// (`pipeline.storage`)
LOCATION_FIELDS = {"manifest", "video_root", "out", "features", "checkpoint", "runs"}
