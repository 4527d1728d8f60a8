"""`demo`: the whole chain on the built-in synthetic benchmark, showing that memory matters.

synth → extract → train (MBC memory, FIFO memory, no memory) on the same cached
features → infer on the test split → report. Every stage reuses what an earlier run
already computed, so a second `demo` re-scores in seconds.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ExtractConfig, InferConfig, TrainConfig
from pipeline.shards import write_json


@dataclass(frozen=True)
class DemoSize:
    videos: int
    seconds: float
    epochs: int
    batch_size: int
    lr: float
    warmup_steps: int
    variants: tuple[str, ...]
    #: torch threads of the training worker. One: at 8 samples a step a second thread gains ~10 % in
    #: a quiet process, and under Ray (whose controller and driver share the 2 cores) 2 threads ran at
    #: 0.21 s a step where 1 runs at 0.15 s (measured on the demo's features)
    train_threads: int = 1


# Sized for the 15-minute budget on 2 CPU cores (measured: tiny default ~2 min, synth + extract ~1.5 min,
# each memory variant ~3.5 min of training at ~0.16 s per step of 8 samples, no memory about 40 % of
# that, inference ~35 s a variant). Small batches: in equal time more, smaller steps learn more (see
# pipeline.benchmarks, the synthetic protocol).
FULL = DemoSize(videos=1000, seconds=30, epochs=3, batch_size=8, lr=1e-3, warmup_steps=50,
                variants=("mbc", "fifo", "none"))
QUICK = DemoSize(videos=24, seconds=16, epochs=1, batch_size=8, lr=1e-3, warmup_steps=2, variants=("mbc", "none"))

VARIANT_LABELS = {"mbc": "MA-LMM (MBC memory)", "fifo": "FIFO memory", "none": "no memory (last frame)"}


def _step(name: str, t0: float) -> None:
    print(f"demo: {name} done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)


def run(out: Path, *, videos: int | None = None, epochs: int | None = None, quick: bool = False,
        progress: bool = True, report_dir: Path | None = None) -> dict:
    from pipeline import synth
    from pipeline.defaults import ensure_tiny_default
    from stages import extract, infer, report, train

    size = QUICK if quick else FULL
    n_videos = videos or size.videos
    n_epochs = epochs or size.epochs
    out = Path(out)
    t0 = time.perf_counter()
    ensure_tiny_default()
    _step("tiny default model", t0)

    data = out / "synthetic"
    want = {"videos": n_videos, "seconds": size.seconds, "seed": 0}
    stamp = data / "demo.json"
    if not (stamp.exists() and json.loads(stamp.read_text()) == want):
        synth.generate(data, videos=n_videos, seconds=size.seconds, seed=0)
        write_json(stamp, want)
    _step("synth", t0)
    manifest = str(data / "manifest.csv")

    features = out / "features"
    res = extract.run(ExtractConfig(manifest=manifest, out=str(features)), progress=progress)
    if res.ok == 0:
        raise RuntimeError(f"extract produced no features (see {features}/ledger.parquet)")
    _step(f"extract ({res.ok} units)", t0)

    runs, record = [], {"extract": {"processed_videos": res.processed_videos, "reused_videos": res.skipped_videos}}
    for variant in size.variants:
        run_dir = out / "runs" / variant
        tcfg = TrainConfig(features=str(features), manifest=manifest, benchmark="synthetic", out=str(run_dir / "train"),
                           memory=variant, epochs=n_epochs, batch_size=size.batch_size, lr=size.lr,
                           warmup_steps=size.warmup_steps, checkpoint_every=0, validate=False)
        trained = train.run(tcfg, progress=progress, threads=size.train_threads)  # a finished run is not re-trained
        _step(f"train {variant}", t0)
        predicted = infer.run(InferConfig(checkpoint=str(run_dir / "train"), features=str(features),
                                          manifest=manifest, split="test", out=str(run_dir),
                                          label=VARIANT_LABELS[variant], batch_size=32), progress=progress)
        record[variant] = {"trained": not trained.get("skipped", False), "predicted": predicted["predicted"]}
        _step(f"infer {variant}", t0)
        runs.append(str(run_dir))

    rdir = report_dir or out / "reports"
    rep = report.run(runs, str(rdir))
    _step("report", t0)
    print((rdir / "leaderboard.md").read_text())
    return {"leaderboard": str(rdir / "leaderboard.md"), "metrics": rep["metrics"], "stages": record,
            "seconds": time.perf_counter() - t0}
