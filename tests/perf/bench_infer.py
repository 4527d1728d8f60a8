"""Inference benchmark: batched against one-at-a-time beam search, and re-scoring from cached predictions.

    .venv/bin/python tests/perf/bench_infer.py [--quick] [--samples 32] [--batch 16] [--features DIR]

1. **Generation** – the embedded default model (tiny InstructBLIP, LLM pretrained on the synthetic
   benchmark's text) decodes the same samples once at batch 1 and once at ``--batch`` (16), under the
   synthetic protocol's generation settings of each family (5 beams; classification 5 new tokens,
   QA 10, captions 30) and under LVU's (5 beams, repetition penalty 1.5, 5 new tokens). Inputs are
   the cached features of ``--features`` (a folder written by ``extract``, e.g. the demo's
   ``demo-out/features``) or, without it, ViT features of random frames. Reported: samples/s,
   generated tokens/s (beam 0, eos excluded), the ratio batch / one-at-a-time, and whether the
   batched beams equal the one-at-a-time beams (they must: padding is masked).
2. **Re-scoring** – predictions tables for every protocol of the registry (plus
   ``synthetic``): ``--rows`` rows each, beams drawn from each benchmark's label set with a known
   hit rate. ``report`` scores them (answer rules, pycocoevalcap, EK100 recall, 1000-draw bootstrap
   CIs) and renders the leaderboard; a second ``report`` over the unchanged predictions hits the
   score cache. Reported: both wall times and their ratio.

Times are medians of ``--reps`` runs after one warm-up; CPU threads as torch sets them. Results:
reports/bench/infer.json and reports/bench/infer.md.
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


# ----------------------------------------------------------------------------- generation

def load_inputs(model, n: int, num_frames: int, features_dir: str | None):
    """``n`` (features [T, P, C], prompt) pairs: cached features of the synthetic test split, or random frames."""
    import numpy as np
    import torch

    from pipeline import synth

    tasks = synth.TASKS
    if features_dir:
        from pipeline.data import FeatureStore
        from pipeline.sampling import segment_indices

        store = FeatureStore(features_dir)
        keys = sorted(k for k, s in zip(store.index.key, store.index.status) if s == "ok")[:n]
        if len(keys) < n:
            raise SystemExit(f"{features_dir} holds {len(keys)} ok samples; need {n}")
        feats = []
        for k in keys:
            x = store.load(k)["features"]
            feats.append(torch.from_numpy(x[segment_indices(len(x), num_frames)].astype(np.float32)))
    else:
        from pipeline.defaults import tiny_dir
        from pipeline.model.checkpoint import load_vision_model
        from stages.extract import VisionEncoder

        enc = VisionEncoder(str(tiny_dir()), batch_size=32, dtype="float16")
        size = load_vision_model(str(tiny_dir())).config.image_size
        rng = np.random.default_rng(0)
        feats = [torch.from_numpy(enc.encode(rng.integers(0, 255, (num_frames, size, size, 3), dtype=np.uint8))
                                  .astype(np.float32)) for _ in range(n)]
    prompts = [synth.render_prompt(tasks[i % len(tasks)], synth.question(tasks[i % len(tasks)], "red"))
               for i in range(n)]
    return feats, prompts


def timed_generate(model, feats, prompts, batch: int, gen) -> tuple[float, list, int]:
    import torch

    beams, tokens = [], 0
    t0 = time.perf_counter()
    for i in range(0, len(feats), batch):
        x = torch.stack(feats[i:i + batch])
        out, counts = model.generate(x, prompts[i:i + batch], num_beams=gen.num_beams,
                                     num_return_sequences=gen.num_return_sequences,
                                     max_new_tokens=gen.max_new_tokens, min_new_tokens=gen.min_new_tokens,
                                     repetition_penalty=gen.repetition_penalty, length_penalty=gen.length_penalty,
                                     return_num_tokens=True)
        beams += out
        tokens += sum(c[0] for c in counts)
    return time.perf_counter() - t0, beams, tokens


def bench_generation(args) -> list[dict]:
    import torch

    from pipeline.benchmarks import protocol
    from pipeline.defaults import ensure_tiny_default
    from pipeline.model.checkpoint import load_malmm
    from pipeline.model.modeling_malmm import MALMMConfig

    proto = protocol("synthetic", "first_color")
    model = load_malmm(ensure_tiny_default(), MALMMConfig(memory_length=proto.memory_length,
                                                           max_frames=proto.num_frames,
                                                           frame_position_init=proto.frame_position_init)).eval()
    feats, _ = load_inputs(model, args.samples, proto.num_frames, args.features)
    from pipeline import synth

    def prompts_of(task):
        return [synth.render_prompt(task, synth.question(task, "red"))] * len(feats)

    settings = [("synthetic classification", protocol("synthetic", "first_color").generation, prompts_of("first_color")),
                ("synthetic QA", protocol("synthetic", "qa").generation, prompts_of("qa")),
                ("synthetic caption", protocol("synthetic", "caption").generation, prompts_of("caption")),
                ("LVU settings (rep. penalty 1.5), caption prompt", protocol("lvu", "genre").generation,
                 prompts_of("caption"))]
    rows = []
    with torch.inference_mode():
        for name, gen, prompts in settings:
            timed_generate(model, feats[:args.batch], prompts[:args.batch], args.batch, gen)  # warm-up
            one, batched = [], []
            for _ in range(args.reps):
                t1, beams1, tok1 = timed_generate(model, feats, prompts, 1, gen)
                tb, beamsb, tokb = timed_generate(model, feats, prompts, args.batch, gen)
                one.append(t1)
                batched.append(tb)
            t1, tb = statistics.median(one), statistics.median(batched)
            row = {"setting": name, "generation": gen.__dict__, "samples": len(feats), "batch": args.batch,
                   "one_s": t1, "batched_s": tb, "one_samples_per_s": len(feats) / t1,
                   "batched_samples_per_s": len(feats) / tb, "tokens_beam0": tok1,
                   "one_tokens_per_s": tok1 / t1, "batched_tokens_per_s": tokb / tb, "speedup": t1 / tb,
                   "identical": beams1 == beamsb, "identical_beam0": [b[0] for b in beams1] == [b[0] for b in beamsb],
                   "differing_samples": sum(a != b for a, b in zip(beams1, beamsb))}
            rows.append(row)
            print(f"{name}: batch 1 {row['one_samples_per_s']:.1f} samples/s, batch {args.batch} "
                  f"{row['batched_samples_per_s']:.1f} samples/s (x{row['speedup']:.2f}); identical beams: "
                  f"{row['identical']}", flush=True)
    return rows


# ----------------------------------------------------------------------------- re-scoring

def fake_label_sets() -> dict[tuple[str, str], list[str]]:
    """Plausible label vocabularies per protocol (only their sizes and shapes matter for timing)."""
    from pipeline import synth
    from pipeline.benchmarks import PROTOCOLS

    words = "man woman dog car ball kitchen table person cooking playing running talking music food water".split()
    sets = {}
    for (b, t), p in PROTOCOLS.items():
        if p.family == "caption":
            sets[b, t] = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8)) for i in range(60)]
        elif b == "synthetic":
            sets[b, t] = list(synth.COLOURS) if t == "first_color" else list(synth.SHAPES) if t == "qa" else \
                [f"{c} {s}" for c in synth.COLOURS for s in synth.SHAPES]
        elif b == "ek100":
            sets[b, t] = [f"{words[i % 15]}-{i}" for i in range(97 if t == "verb" else 300)]
        else:
            sets[b, t] = [f"{words[i % 15]} {i}" for i in range(180 if b == "coin" else 40)]
    return sets


def write_predictions(run_dir: Path, n_rows: int, hit_rate: float = 0.5) -> int:
    """predictions/{benchmark}.parquet of every protocol: beam 0 correct with probability ``hit_rate``."""
    import numpy as np
    import pandas as pd

    from pipeline.benchmarks import PROTOCOLS

    rng = np.random.default_rng(0)
    by_bench: dict[str, list[dict]] = {}
    for (b, t), labels in fake_label_sets().items():
        p = PROTOCOLS[b, t]
        for i in range(n_rows):
            gold = labels[rng.integers(len(labels))]
            k = p.generation.num_return_sequences
            beams = [labels[rng.integers(len(labels))] for _ in range(k)]
            if rng.random() < hit_rate:
                beams[0] = gold
            refs = [gold, labels[rng.integers(len(labels))]] if p.family == "caption" else []
            video = f"{b}-{t}-v{i // (1 if p.family == 'caption' else 2):05d}"
            by_bench.setdefault(b, []).append({
                "sample_id": f"{b}-{t}-{i:05d}", "benchmark": b, "task": t, "split": "test", "video": video,
                "key": "", "prompt": p.render_prompt("q"), "beams": beams, "prediction": beams[0], "answer": gold,
                "references": refs, "generation": "{}", "num_frames": p.num_frames, "tokens": 1, "latency_s": 0.0,
                "checkpoint": "", "fingerprint": "", "error": ""})
    (run_dir / "predictions").mkdir(parents=True, exist_ok=True)
    for b, rows in by_bench.items():
        pd.DataFrame(rows).to_parquet(run_dir / "predictions" / f"{b}.parquet", index=False)
    return sum(len(r) for r in by_bench.values())


def bench_rescore(args) -> dict:
    from stages import report

    tmp = Path(tempfile.mkdtemp(prefix="bench-rescore-"))
    try:
        run_dir = tmp / "run"
        n = write_predictions(run_dir, args.rows)
        t0 = time.perf_counter()
        report.run([str(run_dir)], str(tmp / "reports"), n_boot=1000)
        cold = time.perf_counter() - t0
        warm = []
        for _ in range(max(1, args.reps)):
            t0 = time.perf_counter()
            report.run([str(run_dir)], str(tmp / "reports"), n_boot=1000)
            warm.append(time.perf_counter() - t0)
        from pipeline.benchmarks import PROTOCOLS
        res = {"protocols": len(PROTOCOLS), "rows": n, "score_s": cold, "cached_s": statistics.median(warm),
               "ratio": cold / statistics.median(warm)}
        print(f"re-score {n} rows of {res['protocols']} protocols: {cold:.1f} s scoring, "
              f"{res['cached_s']:.2f} s from the score cache", flush=True)
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- report

def markdown(res: dict) -> str:
    m = res["machine"]
    dev = m["cuda"] or f"CPU, {m['torch_threads']} torch threads"
    src = res["inputs"]
    lines = ["# Inference benchmark", "",
             f"`tests/perf/bench_infer.py`: the embedded default model (tiny InstructBLIP), {dev}, {m['platform']}; "
             f"load average at start {' '.join(f'{x:.2f}' for x in m['load_avg_start'])}. Inputs: {src}. "
             f"Median of {res['reps']} runs after a warm-up.", "",
             f"## Beam search: batch {res['batch']} against one at a time ({res['samples']} samples)", "",
             "| settings | beams / returned / max new | batch 1 samples/s | batch 1 tokens/s | "
             f"batch {res['batch']} samples/s | batch {res['batch']} tokens/s | speed-up | identical beams |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in res["generation"]:
        g = r["generation"]
        lines.append(f"| {r['setting']} | {g['num_beams']} / {g['num_return_sequences']} / {g['max_new_tokens']} | "
                     f"{r['one_samples_per_s']:.1f} | {r['one_tokens_per_s']:.0f} | {r['batched_samples_per_s']:.1f} | "
                     f"{r['batched_tokens_per_s']:.0f} | **x{r['speedup']:.2f}** | "
                     + ("yes |" if r["identical"] else
                        f"beam 0: {'yes' if r['identical_beam0'] else 'no'}; {r['differing_samples']} samples differ |"))
    s = res["rescore"]
    lines += ["", "Tokens: generated tokens of beam 0 (eos excluded). Identical: the batched run returns exactly "
                  "the beams of the one-at-a-time run.", "",
              "## Re-scoring from cached predictions", "",
              f"{s['rows']} prediction rows over all {s['protocols']} protocols of the registry (answer rules, "
              "pycocoevalcap with its Java METEOR, EK100 class-mean recall, 1000-draw clustered bootstrap):", "",
              "| report, scoring every run | report, predictions unchanged (score cache) | ratio |", "|---:|---:|---:|",
              f"| {s['score_s']:.1f} s | {s['cached_s']:.2f} s | x{s['ratio']:.0f} |", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=400, help="prediction rows per protocol for the re-scoring part")
    ap.add_argument("--features", default=None, help="a features folder (default: ViT features of random frames)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 16 samples, batch 8, 1 rep, 50 rows")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench"))
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.batch, args.reps, args.rows = 16, 8, 1, 50
    res = {"machine": machine(), "samples": args.samples, "batch": args.batch, "reps": args.reps,
           "inputs": (f"cached features of `{args.features}`" if args.features else
                      "ViT features of random frames (no features folder given)")}
    t0 = time.perf_counter()
    res["generation"] = bench_generation(args)
    res["rescore"] = bench_rescore(args)
    res["wall_seconds"] = time.perf_counter() - t0
    save("infer", res, markdown, args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
