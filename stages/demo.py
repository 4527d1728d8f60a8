"""`demo`: the whole chain on the built-in synthetic benchmark, showing that memory matters.

synth → extract → train (MBC memory, FIFO memory, no memory) on the same cached
features, side by side when there are CPUs for it, each variant's inference on the test split as
soon as it is trained → report. Every stage reuses what an earlier run
already computed, so a second `demo` re-scores in seconds.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline import synth
from pipeline.config import ExtractConfig, InferConfig, TrainConfig
from pipeline import layout, storage
from pipeline.defaults import ensure_tiny_default
from pipeline.runtime import init_ray
from stages import extract, infer, report, train


@dataclass(frozen=True)
class DemoSize:
    videos: int
    seconds: float
    epochs: int
    batch_size: int
    lr: float
    warmup_steps: int
    variants: tuple[str, ...]
    #: torch threads of each training worker. One: at 8 samples a step a second thread gains ~10 % in
    #: a quiet process, and under Ray (whose controller and driver share the 2 cores) 2 threads ran at
    #: 0.21 s a step where 1 runs at 0.15 s (measured on the demo's features). The variants then train
    #: at the same time, one worker per CPU (see :func:`train_and_predict`).
    train_threads: int = 1


# Sized for the 15-minute budget on 2 CPU cores: MBC trains on one core while FIFO and then no memory
# train on the other. Measured side by side, a step of 8 samples took 0.21-0.24 s with MBC, 0.18-0.21 s
# with FIFO and 0.06 s without memory on the slower of two 2-core machines (13 min in all), and about
# 0.13 s / 0.12 s / 0.04 s on the faster one (9 min). The tiny default's build, synth and extract take
# 2.5-4 minutes before, inference and the report under a minute after. 5 epochs = 2000 steps a
# variant. The synthetic protocol's 7 epochs (`demo --epochs 7`) ran 17 min 55 s on the slower machine.
FULL = DemoSize(videos=1000, seconds=30, epochs=5, batch_size=8, lr=1.5e-3, warmup_steps=50,
                variants=("mbc", "fifo", "none"))
QUICK = DemoSize(videos=24, seconds=16, epochs=1, batch_size=8, lr=1e-3, warmup_steps=2, variants=("mbc", "none"))

VARIANT_LABELS = {"mbc": "MA-LMM (MBC memory)", "fifo": "FIFO memory", "none": "no memory (last frame)"}


def _step(name: str, t0: float) -> None:
    print(f"demo: {name} done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)


def train_and_predict(jobs: dict[str, tuple[TrainConfig, InferConfig]], *, threads: int, progress: bool = True,
                      done: Callable[[str, str], None] | None = None) -> dict[str, dict]:
    """Train each variant (``train.run``; a finished run is not re-trained), then predict its test
    split (``infer.run``; reused when unchanged), as many variants at the same time as the machine
    has CPUs for training workers of ``threads`` threads, starting in the given order.

    Each run is its own Ray Train run (its own worker and controller) on the one embedded
    cluster. On 2 CPUs two variants train side by side; when one ends, its inference and the
    next variant's training take its place. Returns per variant ``{"train": …, "infer": …,
    "train_started": …, "train_ended": …}`` (the stage results, and wall-clock times);
    the first failure is raised once every variant has ended, so what the others computed is kept.
    """
    cpus = int(init_ray().get("CPU", 1))  # once, before the variants' threads start; what Ray can schedule
    parallel = max(1, min(len(jobs), cpus // max(1, threads)))

    def one(i: int, variant: str, tcfg: TrainConfig, icfg: InferConfig) -> dict:
        started = time.time()
        trained = train.run(tcfg, progress=progress, threads=threads, progress_desc=f"train {variant}",
                            progress_position=i % parallel if parallel > 1 else None)
        trained_at = time.time()
        if done:
            done(variant, "train")
        predicted = infer.run(icfg, progress=progress and parallel == 1)
        if done:
            done(variant, "infer")
        return {"train": trained, "infer": predicted, "train_started": started, "train_ended": trained_at}

    results: dict[str, dict] = {}
    errors = []
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="variant") as pool:
        futures = {pool.submit(one, i, v, tcfg, icfg): v for i, (v, (tcfg, icfg)) in enumerate(jobs.items())}
        for fut in as_completed(futures):
            try:
                results[futures[fut]] = fut.result()
            except Exception as e:
                errors.append(e)
    if errors:
        raise errors[0]
    return results


def run(out: Path, *, videos: int | None = None, epochs: int | None = None, seed: int | None = None,
        quick: bool = False, progress: bool = True, report_dir: Path | None = None) -> dict:
    """Run the chain into ``out``. ``seed``: the training seed of every variant (default: train's).

    Runs with the default epochs and seed live in ``out/runs/{variant}``, others in
    ``out/runs/epochs{E}-seed{S}/{variant}``, so that changing either trains anew and switching
    back re-scores what is there.
    """
    size = QUICK if quick else FULL
    n_videos = videos or size.videos
    n_epochs = epochs or size.epochs
    n_seed = TrainConfig.seed if seed is None else seed
    out = Path(out)
    runs_root = out / "runs"
    if (n_epochs, n_seed) != (size.epochs, TrainConfig.seed):
        runs_root = runs_root / f"epochs{n_epochs}-seed{n_seed}"
    t0, t0_wall = time.perf_counter(), time.time()
    ensure_tiny_default()
    _step("tiny default model", t0)

    data = out / "synthetic"
    want = {"videos": n_videos, "seconds": size.seconds, "seed": 0}
    stamp = data / "demo.json"
    if storage.read_json(stamp, missing_ok=True) != want:
        synth.generate(data, videos=n_videos, seconds=size.seconds, seed=0)
        storage.write_json(stamp, want)
    _step("synth", t0)
    manifest = str(data / "manifest.csv")

    features = out / "features"
    res = extract.run(ExtractConfig(manifest=manifest, out=str(features)), progress=progress)
    if res.ok == 0:
        raise RuntimeError(f"extract produced no features (see {layout.ledger_path(features)})")
    _step(f"extract ({res.ok} units)", t0)

    record = {"extract": {"processed_videos": res.processed_videos, "reused_videos": res.skipped_videos}}
    jobs = {}
    for variant in size.variants:
        run_dir = runs_root / variant
        jobs[variant] = (
            TrainConfig(features=str(features), manifest=manifest, benchmark="synthetic", out=str(run_dir / "train"),
                        memory=variant, epochs=n_epochs, batch_size=size.batch_size, lr=size.lr,
                        warmup_steps=size.warmup_steps, seed=n_seed, checkpoint_every=0, validate=False),
            InferConfig(checkpoint=str(run_dir / "train"), features=str(features), manifest=manifest, split="test",
                        out=str(run_dir), label=VARIANT_LABELS[variant], batch_size=32))
    results = train_and_predict(jobs, threads=size.train_threads, progress=progress,
                                done=lambda v, stage: _step(f"{stage} {v}", t0))
    for variant, r in results.items():
        record[variant] = {"trained": not r["train"].get("skipped", False), "predicted": r["infer"]["predicted"],
                           "train_seconds": [r["train_started"] - t0_wall, r["train_ended"] - t0_wall]}
    runs = [str(runs_root / variant) for variant in size.variants]

    rdir = report_dir or out / "reports"
    rep = report.run(runs, str(rdir))
    _step("report", t0)
    print(storage.read_text(Path(rdir) / layout.LEADERBOARD_MD))
    return {"leaderboard": str(Path(rdir) / layout.LEADERBOARD_MD), "metrics": rep["metrics"], "stages": record,
            "seconds": time.perf_counter() - t0}
