"""Training benchmark: a training step from cached features against one from raw video (decode + ViT
every step), and the fraction of step time spent waiting for data.

    .venv/bin/python tests/perf/bench_train.py [--quick] [--videos 48] [--batch 16] [--steps 8]

Setup: the built-in synthetic benchmark (``--videos`` videos of 30 s, the demo's 4 fps and 64 px),
extracted once with `extract` (the embedded tiny vision model), and the tiny default MA-LMM under
the synthetic protocol (T = 12 frames, L = 8, MBC). Both paths run the same optimisation step
(``MALMM.forward`` on [video tokens][prompt][answer], backward, AdamW) on the same samples in the
same order, in this process (no Ray), one DataLoader process (``num_workers=0``):

* **cached** – `pipeline.data.SampleDataset`: a sample's unit features are read from the shards by
  tar offset, T frames picked TSN-style (random per segment);
* **raw video** – what training without the cache must do every step: probe the video, pick the
  same T frames TSN-style from the extraction policy's frame indices, decode them
  (`pipeline.decode.read_frames`, the extract stage's decoder) and run the vision model on them
  (`stages.extract.VisionEncoder.encode`).

Data time = time from asking the loader for a batch until it arrives; step time = data +
forward + backward + optimiser. Reported per path: median step time, samples/s and the data-wait
fraction, and the speed-up of cached over raw. The frozen ViT here is the tiny one (a few hundred
kFLOPs per frame); with the paper's EVA ViT-g/14 (~500 GFLOP per frame, see
``reports/bench/extract.md`` for this machine's ViT throughput) the raw path's data time grows by
that factor, which the table's last row estimates from the measured ViT-g-free numbers.

Also reported: the data-wait fraction that ``malmm-pipeline train`` itself logs (``metrics.parquet``,
column ``data_wait_frac``) for one epoch on the same features through Ray Train.

Results: reports/bench/train.json and reports/bench/train.md.
"""
from __future__ import annotations

import argparse
import json
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


class RawVideoDataset:
    """The same items as `SampleDataset`, computed from the video every time (decode + ViT)."""

    def __init__(self, samples, store, num_frames: int, encoder, image_size: int, seed: int = 0):
        self.samples, self.store, self.num_frames = samples, store, num_frames
        self.encoder, self.size, self.seed = encoder, image_size, seed
        self.rows = {r["key"]: r for r in store.index.to_dict("records")}
        self.decode_s = self.vit_s = 0.0

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        import numpy as np

        from pipeline import decode
        from pipeline.data import segment_indices
        from pipeline.sampling import SamplingPolicy, frame_indices

        s = self.samples[i]
        row = self.rows[s.key]
        t0 = time.perf_counter()
        path = str(Path(self.store.plan["video_root"]) / s.video)
        info = decode.probe(path)
        idx, _ = frame_indices(SamplingPolicy.parse(row["policy"]), info.num_frames, info.fps,
                               row["start_sec"] if row["start_sec"] == row["start_sec"] else None,
                               row["end_sec"] if row["end_sec"] == row["end_sec"] else None)
        rng = np.random.default_rng([self.seed, 0, i])
        pick = idx[segment_indices(len(idx), self.num_frames, rng)]
        frames = decode.read_frames(path, pick, size=(self.size, self.size)).frames
        t1 = time.perf_counter()
        feats = self.encoder.encode(frames).astype(np.float32)
        self.decode_s += t1 - t0
        self.vit_s += time.perf_counter() - t1
        return {"features": feats, "prompt": s.prompt, "answer": s.answer, "index": i}


def run_path(model, optimizer, dataset, order, batch: int, steps: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from pipeline.data import collate

    batches = [list(order[k * batch:(k + 1) * batch]) for k in range(steps + 1)]
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=0)
    model.train()
    data, total, losses = [], [], []
    t_wait = time.perf_counter()
    for k, b in enumerate(loader):
        t_got = time.perf_counter()
        out = model(features=b["features"], prompts=b["prompts"], targets=b["answers"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t_done = time.perf_counter()
        if k > 0:  # step 0 is the warm-up
            data.append(t_got - t_wait)
            total.append(t_done - t_wait)
            losses.append(float(out.loss))
        t_wait = time.perf_counter()
    step = statistics.median(total)
    return {"step_s": step, "data_s": statistics.median(data), "samples_per_s": batch / step,
            "data_wait_frac": sum(data) / sum(total), "losses": losses}


def bench(args) -> dict:
    import numpy as np
    import pandas as pd
    import torch

    from pipeline import synth
    from pipeline.benchmarks import protocol
    from pipeline.config import ExtractConfig, TrainConfig
    from pipeline.data import FeatureStore, SampleDataset, join_samples
    from pipeline.defaults import ensure_tiny_default
    from pipeline.manifest import read_manifest
    from pipeline.model.checkpoint import load_malmm
    from stages import extract, train
    from stages.extract import VisionEncoder

    model_dir = str(ensure_tiny_default())
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        data = tmp / "synthetic"
        synth.generate(data, videos=args.videos, seconds=30, seed=0, progress=False)
        manifest = str(data / "manifest.csv")
        features = tmp / "features"
        t0 = time.perf_counter()
        res = extract.run(ExtractConfig(manifest=manifest, out=str(features)), progress=False)
        extract_s = time.perf_counter() - t0
        assert res.failed == 0, res
        store = FeatureStore(features)
        samples = join_samples(read_manifest(manifest), store, split="train", benchmark="synthetic").samples
        need = (args.steps + 1) * args.batch
        if len(samples) < need:
            raise SystemExit(f"{len(samples)} training samples; need {need}: raise --videos")
        order = np.random.default_rng(0).permutation(len(samples))
        proto = protocol("synthetic", "first_color")
        tcfg = TrainConfig(features=str(features), manifest=manifest, benchmark="synthetic")
        hp = train.plan(tcfg)["hp"]
        mcfg = train.malmm_config(tcfg, hp)

        enc = VisionEncoder(model_dir, batch_size=64, dtype="float16")
        size = extract._image_size(model_dir)
        paths = {}
        for name, ds in (("cached", SampleDataset(samples, features, proto.num_frames, train=True)),
                         ("raw", RawVideoDataset(samples, store, proto.num_frames, enc, size))):
            torch.manual_seed(0)
            model = load_malmm(model_dir, mcfg)
            opt = torch.optim.AdamW(train.param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.999))
            paths[name] = run_path(model, opt, ds, order, args.batch, args.steps)
            if name == "raw":
                n = (args.steps + 1) * args.batch
                paths[name]["decode_s_per_sample"] = ds.decode_s / n
                paths[name]["vit_s_per_sample"] = ds.vit_s / n
            print(f"{name}: {paths[name]['step_s']:.2f} s/step, data wait {100 * paths[name]['data_wait_frac']:.0f} %",
                  flush=True)
            del model, opt

        # the real stage: one epoch of `malmm-pipeline train` on the same features (Ray Train)
        run_dir = tmp / "run"
        t0 = time.perf_counter()
        train.run(TrainConfig(features=str(features), manifest=manifest, benchmark="synthetic", out=str(run_dir),
                              epochs=1, batch_size=args.batch, checkpoint_every=0, validate=False), progress=False)
        stage_s = time.perf_counter() - t0
        log = pd.read_parquet(run_dir / "metrics.parquet")
        stage = {"steps": len(log), "wall_s": stage_s, "median_samples_per_s": float(log.samples_per_s.median()),
                 "data_wait_frac_median": float(log.data_wait_frac.median()),
                 "data_wait_frac_mean": float(log.data_wait_frac.mean())}
        # estimate for the paper's ViT: the raw path's ViT time scaled by the FLOP ratio of ViT-g to tiny
        from tests.perf.bench_extract import VIT_CONFIGS, vit_flops_per_frame
        from transformers import InstructBlipVisionConfig
        tiny_flops = vit_flops_per_frame(enc.model.config)
        g_flops = vit_flops_per_frame(InstructBlipVisionConfig(**VIT_CONFIGS["EVA ViT-g/14 (224 px, the paper's)"]))
        # this machine's measured ViT rate at a realistic width (bench_extract's ViT-B/16), if measured
        vit_rate = None
        ext = ROOT / "reports" / "bench" / "extract.json"
        if ext.exists():
            rows = [r for r in json.loads(ext.read_text())["vit"]["models"] if r["hidden"] >= 768]
            if rows:
                vit_rate = {"model": rows[0]["model"], "gflops_per_s": rows[0]["achieved_gflops"]}
        return {"videos": args.videos, "train_samples": len(samples), "batch": args.batch, "steps": args.steps,
                "num_frames": proto.num_frames, "memory_length": proto.memory_length, "extract_once_s": extract_s,
                "cached": paths["cached"], "raw": paths["raw"], "speedup": paths["raw"]["step_s"] / paths["cached"]["step_s"],
                "train_stage": stage, "vit_flops_ratio_g_over_tiny": g_flops / tiny_flops,
                "vit_g_gflops_per_frame": g_flops / 1e9, "vit_rate": vit_rate}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def markdown(res: dict) -> str:
    m, c, r, s = res["machine"], res["cached"], res["raw"], res["train_stage"]
    lines = ["# Training benchmark", "",
             f"`tests/perf/bench_train.py`: {m['cpus']} CPUs, {m['torch_threads']} torch threads, {m['platform']}; "
             f"load average at start {' '.join(f'{x:.2f}' for x in m['load_avg_start'])}. Tiny default MA-LMM, "
             f"synthetic protocol (T = {res['num_frames']}, L = {res['memory_length']}, MBC), batch {res['batch']}, "
             f"median of {res['steps']} steps after a warm-up step; {res['train_samples']} training samples of "
             f"{res['videos']} videos (extracted once in {res['extract_once_s']:.1f} s).", "",
             "| input | s / step | samples/s | data s / step | data-wait fraction |", "|---|---:|---:|---:|---:|",
             f"| cached features (`SampleDataset`) | {c['step_s']:.3f} | {c['samples_per_s']:.1f} | {c['data_s']:.3f} | "
             f"{100 * c['data_wait_frac']:.1f} % |",
             f"| raw video (decode + ViT each step) | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | {r['data_s']:.3f} | "
             f"{100 * r['data_wait_frac']:.1f} % |", "",
             f"**Cached is x{res['speedup']:.2f} faster per step** with the tiny ViT (raw path per sample: decode "
             f"{1000 * r['decode_s_per_sample']:.1f} ms, ViT {1000 * r['vit_s_per_sample']:.2f} ms)." +
             (f" The paper's EVA ViT-g/14 needs {res['vit_g_gflops_per_frame']:.0f} GFLOP per frame; at the "
              f"{res['vit_rate']['gflops_per_s']:.0f} GFLOP/s this CPU reaches on {res['vit_rate']['model']} "
              f"(reports/bench/extract.md), recomputing it for one step of {res['batch']} x {res['num_frames']} frames "
              f"would take about {res['vit_g_gflops_per_frame'] * res['batch'] * res['num_frames'] / res['vit_rate']['gflops_per_s'] / 60:.0f} "
              f"minutes, against {c['step_s']:.2f} s from the cache." if res.get("vit_rate") else ""), "",
             f"`malmm-pipeline train` itself (Ray Train, 1 worker, one epoch, {s['steps']} steps, {s['wall_s']:.0f} s "
             f"with start-up): {s['median_samples_per_s']:.1f} samples/s median, data-wait fraction "
             f"{100 * s['data_wait_frac_median']:.1f} % median ({100 * s['data_wait_frac_mean']:.1f} % mean) as logged "
             f"in its `metrics.parquet`.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 16 videos, batch 4, 3 steps")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench"))
    args = ap.parse_args(argv)
    if args.quick:
        args.videos, args.batch, args.steps = 16, 4, 3
    res = {"machine": machine()}
    t0 = time.perf_counter()
    res.update(bench(args))
    res["wall_seconds"] = time.perf_counter() - t0
    save("train", res, markdown, args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
