"""`malmm-pipeline`: the command line (typer). Each command is a thin wrapper over a stage.

Options come from flags and from an optional ``--config`` file (TOML or YAML with one
table per stage); `pipeline/config.py` holds every default.

Expected errors — a bad option value (click's usage errors included), an invalid manifest, a
missing file, a stage refusing its input (``ValueError``, ``FileNotFoundError`` and their kinds,
e.g. ``ManifestError``) — end every command with the message in red on stderr and exit status 2,
without a traceback
(``MALMM_TRACEBACK=1`` shows it); anything else is a bug and keeps its traceback. Before any
command runs, the Ray processes left by earlier commands that were killed are reaped
(`pipeline/runtime.py`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from pipeline import converters, layout, storage
from pipeline import synth as synth_mod
from pipeline.config import ExtractConfig, InferConfig, ReportConfig, TrainConfig, resolve
from pipeline.manifest import ManifestError
from pipeline.metrics import answer_rule as get_rule
from pipeline.runtime import reap_orphans
from stages import demo as demo_stage
from stages import extract as extract_stage
from stages import infer as infer_stage
from stages import report as report_stage
from stages import train as train_stage

EXPECTED_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
# click's UsageError (a bad or missing option value), whether typer vendors click or uses it
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _Commands(typer.core.TyperGroup):
    """The command group: turns a command's expected errors into one red line and exit status 2."""
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _USAGE_ERROR as e:
            where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            _fail(f"error: {e.format_message()}{where}")
        except EXPECTED_ERRORS as e:
            if os.environ.get("MALMM_TRACEBACK"):
                raise
            _fail(_message(e))


def _message(e: BaseException) -> str:
    text = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror}: {e.filename}"
    if isinstance(e, ManifestError):
        return text  # already names the file and lists every problem, one per line
    return f"error: {text or type(e).__name__}"


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    help="MA-LMM offline pipeline: extract frozen ViT features once, train the memory Q-Former from them, "
         "run batched LLM inference and score every benchmark exactly as the paper does.\n\n"
         "Flow: manifest CSV → extract → feature shards → train → checkpoint → infer → predictions → report.",
)

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML or YAML file with a table per stage ([extract], [train] …).")
AddressOpt = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster).")
PrecisionOpt = typer.Option(None, "--precision", help="auto (default: bf16 on a GPU that has it, fp16 on other GPUs, fp32 on a CPU) | bf16 | fp16 (with a loss scale) | fp32.")


def _fail(message: str, code: int = 2):
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.callback()
def _before_every_command():
    reap_orphans()


@app.command()
def synth(
    out: str = typer.Option(..., "--out", "-o", help="Folder for videos/ and manifest.csv (a local folder or an s3:// / gs:// URI)."),
    videos: int = typer.Option(200, "--videos", "-n", help="Number of videos to generate."),
    seconds: Optional[float] = typer.Option(None, "--seconds", "-s", help="Length of each video in seconds."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
    workers: int = typer.Option(2, "--workers", help="Processes used to encode videos."),
):
    """Generate the built-in synthetic long-video benchmark (real H.264 files + manifest)."""
    kwargs = {"videos": videos, "seed": seed, "workers": workers}
    if seconds is not None:
        k, fps = synth_mod.DEFAULT_EVENTS[1], synth_mod.DEFAULT_FPS
        shortest = 8 * k / fps  # 8 frames per event, up to k events (synth.plan's rule, with its rounding)
        if not (seconds > 0 and round(seconds * fps) >= 8 * k):
            _fail(f"error: --seconds {seconds:g} is too short: a video needs at least {shortest:g} s "
                  f"({k} events of 8 frames at {fps:g} fps)")
        kwargs["seconds"] = seconds
    if workers < 1:
        _fail(f"error: --workers must be at least 1, got {workers}")
    storage.check(out, "--out")
    res = synth_mod.generate(out, **kwargs)
    typer.echo(f"wrote {res}")


@app.command()
def extract(
    manifest: Optional[str] = typer.Option(None, "--manifest", "-m", help="Manifest CSV (see README: data contracts)."),
    video_root: Optional[str] = typer.Option(None, "--video-root", help="Folder that relative video paths start from and that every local video must lie in (default: the manifest's folder)."),
    allow_outside_root: Optional[bool] = typer.Option(None, "--allow-outside-root", help="Accept local videos outside --video-root (absolute paths, file:// URIs, ../ paths)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output folder for shards, index.parquet and ledger.parquet."),
    model: Optional[str] = typer.Option(None, "--model", help="'tiny' (embedded default) or a local InstructBLIP directory."),
    sampling: Optional[str] = typer.Option(None, "--sampling", help="Override each benchmark's sampling, e.g. 'uniform:32' or 'fps:1'."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Extraction units per shard."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Frames per vision-model forward pass."),
    vision_workers: Optional[int] = typer.Option(None, "--vision-workers", help="Vision-model actors (one GPU each when there are GPUs)."),
    num_gpus: Optional[float] = typer.Option(None, "--num-gpus", help="GPUs per vision actor (default: 1 if the cluster has GPUs, else 0)."),
    decode_timeout: Optional[float] = typer.Option(None, "--decode-timeout", help="Seconds before the decode watchdog kills a video."),
    videos_per_task: Optional[int] = typer.Option(None, "--videos-per-task", help="Videos per decode / encode / write task (default 4)."),
    shard_writers: Optional[int] = typer.Option(None, "--shard-writers", help="Shard writer actors (default 2)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Stored feature dtype (float16 or float32)."),
    strict: Optional[bool] = typer.Option(None, "--strict/--no-strict", help="Exit 1 when any unit failed."),
    retry_failed: Optional[bool] = typer.Option(None, "--retry-failed", help="Re-try units that failed in an earlier run."),
    dry_run: Optional[bool] = typer.Option(None, "--dry-run", help="Validate and plan only; print what would run."),
    address: Optional[str] = AddressOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Decode and sample frames, run the frozen vision model, write WebDataset feature shards.

    Resumable: re-running redoes only unfinished work; a finished run re-run decodes nothing.
    Exits 2 on an invalid manifest, 1 when nothing succeeded (or any failure with --strict).
    """
    cfg = resolve(ExtractConfig, "extract", config, manifest=manifest, video_root=video_root,
                  allow_outside_root=allow_outside_root, out=out, model=model,
                  sampling=sampling, shard_size=shard_size, batch_size=batch_size, vision_workers=vision_workers,
                  num_gpus=num_gpus, decode_timeout=decode_timeout, videos_per_task=videos_per_task,
                  shard_writers=shard_writers, dtype=dtype, strict=strict,
                  retry_failed=retry_failed, dry_run=dry_run, address=address)
    if not cfg.manifest:
        _fail("error: --manifest is required (or set manifest in the [extract] table of --config)")
    res = extract_stage.run(cfg)  # expected errors: exit 2 (see the module docstring)
    if cfg.dry_run:
        return
    typer.echo(f"extract: {res.ok} ok, {res.failed} failed of {res.units} units in {res.shards} shard(s) "
               f"→ {res.out} ({res.seconds:.1f}s; {res.processed_videos} videos processed, "
               f"{res.skipped_videos} reused)")
    if res.failures:
        typer.echo("failures by reason: " + ", ".join(f"{k}={v}" for k, v in sorted(res.failures.items()))
                   + f"  (details: {res.out}/ledger.parquet)")
    if res.ok == 0 or (cfg.strict and res.failed):
        raise typer.Exit(1)


@app.command()
def manifest(
    benchmark: str = typer.Argument(..., help="lvu, breakfast, coin, msrvtt-qa, msvd-qa, activitynet-qa, msrvtt-cap, msvd-cap, youcook2-cap or ek100."),
    annotations: Path = typer.Option(..., "--annotations", "-a", help="Folder with the benchmark's official annotation files."),
    videos: str = typer.Option(..., "--videos", help="Folder holding (or that will hold) the videos; manifest paths are relative to it (pass it to extract as --video-root)."),
    split: Optional[str] = typer.Option(None, "--split", help="Only this split (train / val / test)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Manifest CSV to write (default manifests/BENCHMARK.csv)."),
    observation_sec: float = typer.Option(16.0, "--observation-sec", help="EPIC-Kitchens-100: seconds observed before the anticipation gap."),
    anticipation_sec: float = typer.Option(1.0, "--anticipation-sec", help="EPIC-Kitchens-100: τa, the gap between the observed clip and the action's start."),
):
    """Convert a benchmark's published annotations into a manifest CSV (next: `extract --manifest`)."""
    try:
        res = converters.convert(benchmark, annotations, videos, split=split,
                                 out=out or Path("manifests") / f"{benchmark}.csv",
                                 observation_sec=observation_sec, anticipation_sec=anticipation_sec)
    except (converters.ConversionError, KeyError, FileNotFoundError) as e:
        _fail(f"error: {e}")
    typer.echo(str(res))


@app.command()
def train(
    features: Optional[str] = typer.Option(None, "--features", "-f", help="Features folder written by extract."),
    manifest: Optional[str] = typer.Option(None, "--manifest", "-m", help="The manifest the features were extracted from."),
    benchmark: Optional[str] = typer.Option(None, "--benchmark", "-b", help="Benchmark to train on."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="One task (e.g. an LVU task); default: all tasks of the benchmark."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run folder (checkpoints, metrics.parquet); a folder with a checkpoint is resumed."),
    model: Optional[str] = typer.Option(None, "--model", help="'tiny' or a local InstructBLIP directory (Q-Former, projection, LLM)."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Memory: mbc | fifo | none (last frame only) | per_frame (the reference's no-memory path, memory_bank_length=0: every frame through the Q-Former alone, all T x Nq query outputs to the LLM, no frame position embedding)."),
    visual_memory: Optional[bool] = typer.Option(None, "--visual-memory/--no-visual-memory", help="Use the visual memory bank."),
    query_memory: Optional[bool] = typer.Option(None, "--query-memory/--no-query-memory", help="Use the query memory bank."),
    aggregation: Optional[str] = typer.Option(None, "--aggregation", help="memory | concat | avgpool (Table 8 baselines)."),
    num_frames: Optional[int] = typer.Option(None, "--num-frames", help="Frames per sample (default: the benchmark's)."),
    memory_length: Optional[int] = typer.Option(None, "--memory-length", "-L", help="Memory bank length L (default: the benchmark's)."),
    frame_position_init: Optional[str] = typer.Option(None, "--frame-position-init", help="Initial frame position embedding: zeros (the paper's code; memory then holds no frame order, since PE of stored frames never gets a gradient) | sinusoidal (default: the benchmark's)."),
    loss_reduction: Optional[str] = typer.Option(None, "--loss-reduction", help="token (the reference's: mean over all target tokens of a batch) | sample (mean of per-sample means; for batches mixing tasks). Default: the benchmark's."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (default: the benchmark's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch size (split across workers)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: the benchmark's)."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warm-up steps before cosine decay."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Gradient accumulation steps."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed: the same seed gives the same loss trajectory."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Ray Train workers (data parallel)."),
    use_gpu: Optional[bool] = typer.Option(None, "--use-gpu", help="One GPU per worker (NCCL between workers)."),
    precision: Optional[str] = PrecisionOpt,
    max_failures: Optional[int] = typer.Option(None, "--max-failures", help="Restarts of the worker group from the last checkpoint after a worker dies or fails (default 3; -1: no limit)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Checkpoint every N steps (and at each epoch end)."),
    keep_last: Optional[int] = typer.Option(None, "--keep-last", help="Checkpoints kept (default 2; 0: all); the best on validation is also kept, in RUN/best."),
    validate: Optional[bool] = typer.Option(None, "--validate/--no-validate", help="Score the val split after each epoch."),
    resume: Optional[bool] = typer.Option(None, "--resume/--restart", help="Continue from the run folder's last checkpoint (default) or start over."),
    dry_run: Optional[bool] = typer.Option(None, "--dry-run", help="Join samples to features and print the plan only."),
    address: Optional[str] = AddressOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Train MA-LMM's memory Q-Former (and projection, ln_vision, frame PE) from cached features on Ray Train."""
    cfg = resolve(TrainConfig, "train", config, features=features, manifest=manifest, benchmark=benchmark, task=task,
                  out=out, model=model, memory=memory, visual_memory=visual_memory, query_memory=query_memory,
                  aggregation=aggregation, num_frames=num_frames, memory_length=memory_length,
                  frame_position_init=frame_position_init, loss_reduction=loss_reduction, epochs=epochs, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, grad_accum=grad_accum, seed=seed,
                  num_workers=num_workers, use_gpu=use_gpu, precision=precision, max_failures=max_failures,
                  checkpoint_every=checkpoint_every, keep_last=keep_last,
                  validate=validate, resume=resume, dry_run=dry_run, address=address)
    res = train_stage.run(cfg)  # expected errors: exit 2 (see the module docstring)
    if not cfg.dry_run:
        typer.echo(f"train: done → {res['checkpoint']}")


@app.command()
def infer(
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", "-k", help="A train run folder or checkpoint, an HF InstructBLIP directory (zero-shot) or a MA-LMM release file."),
    features: Optional[str] = typer.Option(None, "--features", "-f", help="Features folder written by extract."),
    manifest: Optional[str] = typer.Option(None, "--manifest", "-m", help="The manifest the features were extracted from."),
    split: Optional[str] = typer.Option(None, "--split", help="Split to predict (default test)."),
    benchmark: Optional[str] = typer.Option(None, "--benchmark", "-b", help="Only this benchmark."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Only this task."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run folder for predictions/{benchmark}.parquet."),
    label: Optional[str] = typer.Option(None, "--label", help="The run's name in the leaderboard (default: the folder name)."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model when the checkpoint does not name one ('tiny' or a directory)."),
    num_frames: Optional[int] = typer.Option(None, "--num-frames", help="Frames T per sample, for every benchmark. Default: what the checkpoint was trained with (a LAVIS .pth: its saved num_frames), else each benchmark's protocol. Contradicting the checkpoint warns; the predictions record what was used."),
    memory_length: Optional[int] = typer.Option(None, "--memory-length", "-L", help="Memory bank length L. Default: the checkpoint's (a LAVIS .pth: its memory_bank_length), else each benchmark's protocol. Contradicting the checkpoint warns."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Memory mode mbc | fifo | none | per_frame (default: the checkpoint's; mbc zero-shot; a LAVIS .pth with memory_bank_length 0: per_frame)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per generation batch."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Generator actors (one GPU each when there are GPUs)."),
    num_gpus: Optional[float] = typer.Option(None, "--num-gpus", help="GPUs per generator actor."),
    precision: Optional[str] = PrecisionOpt,
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow loading a pickled (.pth) MA-LMM release checkpoint."),
    dry_run: Optional[bool] = typer.Option(None, "--dry-run", help="Join and count what would be predicted."),
    address: Optional[str] = AddressOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Batched beam search with each benchmark's generation settings; re-runs skip what is already predicted.

    Frames T and memory length L per benchmark: --num-frames / --memory-length, else what the checkpoint
    records (a training run: what it was trained with; a LAVIS .pth: its saved memory_bank_length and
    num_frames), else each benchmark's protocol. infer.json and each prediction row record what was used.
    """
    cfg = resolve(InferConfig, "infer", config, checkpoint=checkpoint, features=features, manifest=manifest,
                  split=split, benchmark=benchmark, task=task, out=out, label=label, model=model,
                  num_frames=num_frames, memory_length=memory_length, memory=memory, batch_size=batch_size,
                  workers=workers, num_gpus=num_gpus, precision=precision, dry_run=dry_run, address=address)
    res = infer_stage.run(cfg, trust_pickle=trust_pickle)  # expected errors: exit 2 (see the module docstring)
    typer.echo(f"infer: {res}")


@app.command()
def report(
    runs: Optional[list[str]] = typer.Argument(None, help="Run folders holding predictions/ (from infer)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Folder for metrics.parquet, leaderboard.md/.html and plots."),
    n_boot: Optional[int] = typer.Option(None, "--n-boot", help="Bootstrap resamples for the 95 % intervals."),
    answer_rule: Optional[str] = typer.Option(
        None, "--answer-rule",
        help="How beams are matched with answers: 'reference' (default; the reference implementation's, "
             "comparable with the paper) or 'lenient' (case, punctuation and spacing ignored; opt-in)."),
    config: Optional[Path] = ConfigOpt,
):
    """Score cached predictions (no model call) and write the leaderboard beside the paper's numbers."""
    cfg = resolve(ReportConfig, "report", config, runs=runs or None, out=out, n_boot=n_boot, answer_rule=answer_rule)
    if not cfg.runs:
        _fail("error: give at least one run folder (e.g. `malmm-pipeline report work/runs/infer`)")
    try:
        get_rule(cfg.answer_rule)
    except KeyError as e:
        _fail(f"error: --answer-rule: {e.args[0]}")
    res = report_stage.run(cfg.runs, cfg.out, cfg.n_boot, answer_rule=cfg.answer_rule)  # duplicate labels: exit 2
    typer.echo("report: wrote " + ", ".join(res["files"]))


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Folder for the demo's data, features, runs and reports."),
    videos: Optional[int] = typer.Option(None, "--videos", help="Synthetic videos to generate."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs per variant."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Training seed of every variant (default: train's)."),
    quick: bool = typer.Option(False, "--quick", help="A small, fast version of the chain (what CI runs)."),
):
    """The whole chain on the built-in synthetic benchmark: synth → extract → train (MBC, FIFO, no memory) → infer → report."""
    res = demo_stage.run(out, videos=videos, epochs=epochs, seed=seed, quick=quick)
    typer.echo(f"demo: leaderboard → {res['leaderboard']}")


@app.command()
def status(path: str = typer.Argument(..., help="A features folder (from extract) or a run folder (local or a URI).")):
    """Summarise a features folder or a run: shards, ok / failed units by reason, what is left."""
    if storage.exists(layout.ledger_path(path)):
        ledger = storage.read_parquet(layout.ledger_path(path))
        shards = storage.listdir(path, layout.SHARD_GLOB)
        plan = storage.read_json(layout.plan_path(path), {}, missing_ok=True)
        typer.echo(f"{path}: {len(shards)} shard(s), {len(ledger)} units: "
                   f"{(ledger.status == 'ok').sum()} ok, {(ledger.status != 'ok').sum()} failed")
        complete = len(storage.listdir(path, layout.STATS_GLOB))
        if plan.get("shards") and complete < plan["shards"]:
            typer.echo(f"  unfinished run: {complete} of {plan['shards']} shard(s) complete; re-run extract to finish")
        bad = ledger[ledger.status != "ok"]
        for reason, n in bad.reason.value_counts().items():
            typer.echo(f"  {reason}: {n}  e.g. {bad[bad.reason == reason].video.iloc[0]}")
        if plan:
            typer.echo(f"  plan: {plan}")
        return
    if storage.exists(layout.run_info_path(path)):  # a train run
        run = storage.read_json(layout.run_info_path(path))
        latest = storage.read_json(layout.latest_path(path), missing_ok=True)
        typer.echo(f"{path}: train run of {run['config']['benchmark']} ({run['config']['memory']} memory), "
                   f"{run['train_samples']} training samples, hp {run['hp']}")
        if latest is None:
            typer.echo("  no checkpoint yet; `malmm-pipeline train` with the same --out starts it")
        else:
            done = latest["epoch"] >= run["hp"]["epochs"]
            typer.echo(f"  latest checkpoint {latest['checkpoint']}: epoch {latest['epoch']}/{run['hp']['epochs']}, "
                       f"step {latest['global_step']}" + ("; finished" if done else "; re-run train to resume"))
        if storage.exists(layout.metrics_path(path)):
            log = storage.read_parquet(layout.metrics_path(path))
            if len(log):
                typer.echo(f"  last logged loss {log.loss.iloc[-1]:.4f} at step {int(log.global_step.iloc[-1])}")
        if not storage.exists(layout.predictions_dir(path)):
            return
    if storage.exists(layout.predictions_dir(path)):  # an infer run
        for f in storage.listdir(layout.predictions_dir(path), "*.parquet"):
            p = storage.read_parquet(f, columns=["task", "error"])
            failed = int((p.error.fillna("") != "").sum())
            typer.echo(f"{f}: {len(p)} predictions ({failed} failed) over tasks "
                       f"{', '.join(sorted(set(p.task.fillna('')) - {''})) or '-'}")
        return
    _fail(f"{path}: neither a features folder (ledger.parquet) nor a run folder (run.json or predictions/)")


def main():  # pragma: no cover
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
