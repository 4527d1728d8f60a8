"""`malmm-pipeline`: the command line (typer). Each command is a thin wrapper over a stage.

Options come from flags and from an optional ``--config`` file (TOML or YAML with one
table per stage); `pipeline/config.py` holds every default.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from pipeline.config import ExtractConfig, resolve
from pipeline.manifest import ManifestError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="MA-LMM offline pipeline: extract frozen ViT features once, train the memory Q-Former from them, "
         "run batched LLM inference and score every benchmark exactly as the paper does.\n\n"
         "Flow: manifest CSV → extract → feature shards → train → checkpoint → infer → predictions → report.",
)

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML or YAML file with a table per stage ([extract], [train] …).")
AddressOpt = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster).")


def _fail(message: str, code: int = 2):
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for videos/ and manifest.csv."),
    videos: int = typer.Option(200, "--videos", "-n", help="Number of videos to generate."),
    seconds: Optional[float] = typer.Option(None, "--seconds", "-s", help="Length of each video in seconds."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
    workers: int = typer.Option(2, "--workers", help="Processes used to encode videos."),
):
    """Generate the built-in synthetic long-video benchmark (real H.264 files + manifest)."""
    from pipeline import synth as synth_mod

    kwargs = {"videos": videos, "seed": seed, "workers": workers}
    if seconds is not None:
        kwargs["seconds"] = seconds
    res = synth_mod.generate(out, **kwargs)
    typer.echo(f"wrote {res}")


@app.command()
def extract(
    manifest: Optional[str] = typer.Option(None, "--manifest", "-m", help="Manifest CSV (see README: data contracts)."),
    video_root: Optional[str] = typer.Option(None, "--video-root", help="Folder that relative video paths start from (default: the manifest's folder)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output folder for shards, index.parquet and ledger.parquet."),
    model: Optional[str] = typer.Option(None, "--model", help="'tiny' (embedded default) or a local InstructBLIP directory."),
    sampling: Optional[str] = typer.Option(None, "--sampling", help="Override each benchmark's sampling, e.g. 'uniform:32' or 'fps:1'."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Extraction units per shard."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Frames per vision-model forward pass."),
    vision_workers: Optional[int] = typer.Option(None, "--vision-workers", help="Vision-model actors (one GPU each when there are GPUs)."),
    num_gpus: Optional[float] = typer.Option(None, "--num-gpus", help="GPUs per vision actor (default: 1 if the cluster has GPUs, else 0)."),
    decode_timeout: Optional[float] = typer.Option(None, "--decode-timeout", help="Seconds before the decode watchdog kills a video."),
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
    from stages import extract as stage

    cfg = resolve(ExtractConfig, "extract", config, manifest=manifest, video_root=video_root, out=out, model=model,
                  sampling=sampling, shard_size=shard_size, batch_size=batch_size, vision_workers=vision_workers,
                  num_gpus=num_gpus, decode_timeout=decode_timeout, dtype=dtype, strict=strict,
                  retry_failed=retry_failed, dry_run=dry_run, address=address)
    if not cfg.manifest:
        _fail("error: --manifest is required (or set manifest in the [extract] table of --config)")
    try:
        res = stage.run(cfg)
    except ManifestError as e:
        _fail(str(e))
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
def status(path: Path = typer.Argument(..., help="A features folder (from extract) or a run folder.")):
    """Summarise a features folder or a run: shards, ok / failed units by reason, what is left."""
    import json

    import pandas as pd

    if (path / "ledger.parquet").exists():
        ledger = pd.read_parquet(path / "ledger.parquet")
        shards = sorted(path.glob("shard-*.tar"))
        plan = json.loads((path / "extract.json").read_text()) if (path / "extract.json").exists() else {}
        typer.echo(f"{path}: {len(shards)} shard(s), {len(ledger)} units: "
                   f"{(ledger.status == 'ok').sum()} ok, {(ledger.status != 'ok').sum()} failed")
        staging = list((path / "_staging").glob("*.json")) if (path / "_staging").exists() else []
        if staging:
            typer.echo(f"  unfinished run: {len(staging)} video(s) staged; re-run extract to finish")
        bad = ledger[ledger.status != "ok"]
        for reason, n in bad.reason.value_counts().items():
            typer.echo(f"  {reason}: {n}  e.g. {bad[bad.reason == reason].video.iloc[0]}")
        if plan:
            typer.echo(f"  plan: {plan}")
        return
    _fail(f"{path}: no ledger.parquet here; nothing to report")


def main():  # pragma: no cover
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
