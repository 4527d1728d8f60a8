"""Extraction benchmark: the `extract` pipeline against its slowest stage run alone, and the vision
model's frames/s against the machine's measured matmul throughput.

    .venv/bin/python tests/perf/bench_extract.py [--quick] [--videos 48] [--seconds 30]

1. **Pipeline against its stages** – the built-in synthetic benchmark (``--videos`` videos of
   ``--seconds`` s at the demo's 4 fps, 64 px; 4 samples per video, the demo's sampling) is
   extracted by ``stages.extract.run`` into a fresh folder, on an already started local Ray
   cluster (Ray's start-up is reported apart). Then each Ray Data stage of that pipeline runs
   alone, as its own Ray Data program over the previous stage's materialised output: decode
   (CPU tasks), encode (the vision-model actor pool) and write (the tasks that send samples to
   the shard writer actors, the shards written, then the Parquet tables). Reported: the pipeline's
   wall time over the slowest stage alone (1.0 = the pipeline costs no more than its
   bottleneck) and over the sum of the stages (< 1: the stages overlap).
2. **Vision model against matmul** – the machine's fp32 matmul throughput (best of square
   matmuls of 1024 … 4096, the threads torch uses) against the frames/s of the vision model
   (``InstructBlipVisionModel``, through the extract stage's own encoder: normalisation,
   hidden states before the post layer norm) for the embedded tiny default and for a
   ViT-B/16-sized config at 224 px (random weights; ``--vit-g`` adds EVA ViT-g/14, the
   paper's, which needs ~5 GB and minutes on a CPU). Model FLOPs per frame are counted from
   the config (2 per multiply-add: patch embedding, q/k/v/output projections, attention
   scores and values, MLP); utilisation = achieved FLOP/s over the measured matmul FLOP/s.

Results: reports/bench/extract.json and reports/bench/extract.md.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import machine, save  # noqa: E402


# ----------------------------------------------------------------------------- 1. pipeline vs stages

def _plan(manifest: str, out: Path, model_dir: str):
    """What `extract` plans for a fresh run (the same planning code): config, units, videos, items."""
    from pipeline.config import ExtractConfig
    from pipeline.manifest import read_manifest
    from stages import extract as ex

    cfg = ExtractConfig(manifest=manifest, out=str(out))
    root = str(Path(manifest).resolve().parent)
    units = ex.plan_units(read_manifest(manifest, root), root, None, cfg.shard_size)
    by_vid: dict[str, list] = {}
    for u in units:
        by_vid.setdefault(ex.video_id(u.source), []).append(u)
    size = ex._image_size(model_dir)
    return cfg, units, by_vid, ex.video_items(by_vid, cfg, size), size


def bench_pipeline(args, model_dir: str) -> dict:
    import ray

    from pipeline import synth
    from pipeline.runtime import init_ray
    from stages import extract as ex

    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        data = tmp / "synthetic"
        synth.generate(data, videos=args.videos, seconds=args.seconds, seed=0, progress=False)
        manifest = str(data / "manifest.csv")
        t0 = time.perf_counter()
        init_ray(None)
        ray_start = time.perf_counter() - t0

        full = []
        for rep in range(args.reps):
            out = tmp / f"features-{rep}"
            t0 = time.perf_counter()
            res = ex.run(ex.ExtractConfig(manifest=manifest, out=str(out)), progress=False)
            full.append(time.perf_counter() - t0)
            assert res.failed == 0 and res.ok > 0, res
        frames = int(__import__("pandas").read_parquet(tmp / "features-0" / "ledger.parquet").num_frames.sum())

        stages = {"decode": [], "encode": [], "write": []}
        for rep in range(args.reps):
            out = tmp / f"alone-{rep}"
            out.mkdir()
            cfg, units, by_vid, items, size = _plan(manifest, out, model_dir)
            ex._check_previous_plan(out, cfg, units, str(data))
            per = cfg.videos_per_task
            t0 = time.perf_counter()
            decoded = ray.data.from_items(items, override_num_blocks=max(1, min(1000, -(-len(items) // per)))) \
                .map_batches(ex.decode_videos, batch_size=per, num_cpus=cfg.decode_cpus,
                             batch_format="numpy").materialize()
            stages["decode"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            encoded = decoded.map_batches(ex.VisionEncoder, fn_constructor_kwargs={
                "model_dir": model_dir, "batch_size": cfg.batch_size, "dtype": cfg.dtype},
                batch_size=per, compute=ray.data.ActorPoolStrategy(size=cfg.vision_workers), num_gpus=0,
                batch_format="numpy").materialize()
            stages["encode"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            writers = ex.start_writers(out, units, sorted({u.shard for u in units}), cfg.shard_writers, {})
            written = encoded.map_batches(ex.write_samples, batch_size=per, batch_format="numpy", fn_kwargs={
                "writers": writers, "dtype": cfg.dtype, "image_size": size}).materialize()
            ex.stop_writers(writers)
            ex.write_tables(out)
            stages["write"].append(time.perf_counter() - t0)
            assert written.count() == len(items)
            del decoded, encoded, written
        # the stages alone must produce the pipeline's bytes (same code, same order)
        same = all((tmp / "alone-0" / p.name).read_bytes() == p.read_bytes()
                   for p in sorted((tmp / "features-0").glob("shard-*.tar")))
        med = {k: statistics.median(v) for k, v in stages.items()}
        wall = statistics.median(full)
        slowest = max(med, key=med.get)
        return {"videos": args.videos, "seconds_per_video": args.seconds, "units": res.units, "frames": frames,
                "ray_start_s": ray_start, "pipeline_s": wall, "pipeline_all_s": full, "stages_s": med,
                "stages_all_s": stages, "slowest": slowest, "ratio_to_slowest": wall / med[slowest],
                "ratio_to_sum": wall / sum(med.values()), "same_shards": same,
                "videos_per_s": args.videos / wall, "frames_per_s": frames / wall}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- 2. ViT vs matmul

def matmul_flops(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    best = {}
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        reps = max(2, int(2e10 / (2 * n ** 3)))
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best[n] = 2 * n ** 3 * reps / (time.perf_counter() - t0)
    n = max(best, key=best.get)
    return {"flops": best[n], "best_n": n, "by_n": best}


def vit_flops_per_frame(cfg) -> float:
    """Multiply-adds x 2 of one frame through an InstructBLIP vision model (embedding + encoder)."""
    p = cfg.patch_size
    tokens = (cfg.image_size // p) ** 2 + 1
    c, inter = cfg.hidden_size, cfg.intermediate_size
    patch = 2 * (tokens - 1) * 3 * p * p * c
    per_layer = 2 * tokens * (4 * c * c + 2 * c * inter) + 2 * 2 * tokens * tokens * c
    return patch + cfg.num_hidden_layers * per_layer


VIT_CONFIGS = {
    "ViT-B/16 (224 px)": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=16),
    "EVA ViT-g/14 (224 px, the paper's)": dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                                                num_attention_heads=16, image_size=224, patch_size=14),
}


def bench_vit(args, model_dir: str) -> dict:
    import numpy as np
    import torch
    from transformers import InstructBlipVisionConfig, InstructBlipVisionModel

    from stages.extract import VisionEncoder

    threads = torch.get_num_threads()
    peak = matmul_flops(threads)
    models = [("tiny default (demo)", model_dir, None)]
    for name, kw in VIT_CONFIGS.items():
        if "ViT-g" in name and not args.vit_g:
            continue
        models.append((name, None, kw))
    rows = []
    for name, mdir, kw in models:
        if mdir:
            enc = VisionEncoder(mdir, batch_size=64, dtype="float16")
            cfg = enc.model.config
        else:  # same encoder code, a model built in memory with random weights
            cfg = InstructBlipVisionConfig(**kw, initializer_range=0.02)
            tmpd = Path(tempfile.mkdtemp(prefix="bench-vit-"))
            torch.manual_seed(0)
            InstructBlipVisionModel(cfg).save_pretrained(tmpd)
            enc = VisionEncoder(str(tmpd), batch_size=16, dtype="float16")
            shutil.rmtree(tmpd, ignore_errors=True)
        n = 256 if mdir else (32 if "ViT-B" in name else 4)
        frames = np.random.default_rng(0).integers(0, 255, (n, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
        enc.encode(frames[: min(n, 8)])  # warm-up
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            enc.encode(frames)
            times.append(time.perf_counter() - t0)
        fps = n / statistics.median(times)
        fl = vit_flops_per_frame(cfg)
        rows.append({"model": name, "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                     "image_size": cfg.image_size, "patch": cfg.patch_size, "frames": n,
                     "gflops_per_frame": fl / 1e9, "frames_per_s": fps, "achieved_gflops": fps * fl / 1e9,
                     "utilisation": fps * fl / peak["flops"]})
        print(f"{name}: {fps:.1f} frames/s, {fps * fl / 1e9:.1f} GFLOP/s = {100 * fps * fl / peak['flops']:.0f} % "
              f"of matmul", flush=True)
        del enc
    return {"threads": threads, "matmul": peak, "models": rows}


# ----------------------------------------------------------------------------- report

def markdown(res: dict) -> str:
    m, p, v = res["machine"], res["pipeline"], res["vit"]
    st = p["stages_s"]
    lines = ["# Extraction benchmark", "",
             f"`tests/perf/bench_extract.py`: {m['cpus']} CPUs, {m['platform']}, torch {m['torch']}; load average at "
             f"start {' '.join(f'{x:.2f}' for x in m['load_avg_start'])}. Median of {res['reps']} runs.", "",
             "## Pipeline against its stages alone", "",
             f"{p['videos']} synthetic videos of {p['seconds_per_video']:.0f} s ({p['units']} extraction units, "
             f"{p['frames']} frames), the embedded tiny vision model, a local Ray cluster already started "
             f"(start-up: {p['ray_start_s']:.1f} s, not counted).", "",
             "| pipeline | decode alone | encode alone | write alone | pipeline / slowest stage "
             "| pipeline / sum of stages |", "|---:|---:|---:|---:|---:|---:|",
             f"| {p['pipeline_s']:.1f} s | {st['decode']:.1f} s | {st['encode']:.1f} s | {st['write']:.1f} s | "
             f"**{p['ratio_to_slowest']:.2f}** (vs {p['slowest']}) | {p['ratio_to_sum']:.2f} |", "",
             f"Pipeline throughput: {p['videos_per_s']:.1f} videos/s, {p['frames_per_s']:.0f} frames/s. The stages "
             f"run alone wrote the same shard bytes as the pipeline: {'yes' if p['same_shards'] else 'NO'}.", "",
             "## Vision model against matmul throughput", "",
             f"Measured fp32 matmul: {v['matmul']['flops'] / 1e9:.1f} GFLOP/s ({v['matmul']['best_n']}² matrices, "
             f"{v['threads']} threads).", "",
             "| vision model | width x layers | GFLOP / frame | frames/s | achieved GFLOP/s | of matmul |",
             "|---|---|---:|---:|---:|---:|"]
    for r in v["models"]:
        lines.append(f"| {r['model']} | {r['hidden']} x {r['layers']} | {r['gflops_per_frame']:.3f} | "
                     f"{r['frames_per_s']:.1f} | {r['achieved_gflops']:.1f} | **{100 * r['utilisation']:.0f} %** |")
    lines += ["", "Frames/s through `stages.extract.VisionEncoder.encode` (uint8 frames in, float16 hidden states "
                  "before the post layer norm out). A GPU run (`--use-gpu` clusters) is not measured here: this "
                  "machine has none.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=48)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--vit-g", action="store_true", help="also time EVA ViT-g/14 (the paper's; slow on a CPU)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 8 videos, 1 rep")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench"))
    args = ap.parse_args(argv)
    if args.quick:
        args.videos, args.reps = 8, 1
    from pipeline.defaults import ensure_tiny_default
    model_dir = str(ensure_tiny_default())
    res = {"machine": machine(), "reps": args.reps}
    t0 = time.perf_counter()
    res["pipeline"] = bench_pipeline(args, model_dir)
    print(f"pipeline {res['pipeline']['pipeline_s']:.1f} s; stages alone {res['pipeline']['stages_s']}", flush=True)
    res["vit"] = bench_vit(args, model_dir)
    res["wall_seconds"] = time.perf_counter() - t0
    save("extract", res, markdown, args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
