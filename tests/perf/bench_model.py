"""MA-LMM model benchmark: memory and time per video against the number of frames, MBC against the
`concat` baseline, and training throughput with and without the no-autograd prefix.

    .venv/bin/python tests/perf/bench_model.py [--quick] [--frames 20,100,300,1000] [--chunk 10]

Model: a mid-size MA-LMM built in memory with the real classes (random weights): P = 257 tokens x
C = 256 per frame (a 224 px / 14 px-patch ViT's shape at a quarter of ViT-g's width), a 4-layer
Q-Former of width 128 (cross-attention every 2nd layer, 32 queries, instruction tokens alongside),
a 2-layer Llama of width 256 as the frozen LLM.

1. **Streaming inference** (``torch.inference_mode``, batch 1): a video of T frames is fed in chunks
   of ``--chunk`` frames through ``MALMM.step`` as a streaming user would (chunks are generated on
   the fly from a small pool, so the input is never held whole), then ``readout`` + projection.
   ``mbc`` (L = 20) against ``concat`` (every frame's tokens concatenated into cross-attention).
2. **Training** (batch 2, ``forward`` + ``backward`` + AdamW step, mbc): T = 20 (L = 10) and
   T = 100 (L = 20), with the no-autograd prefix (steps 0..T-2 under ``torch.no_grad``) and without.

Every configuration runs in a fresh subprocess. Peak memory = the process's peak resident set
during the timed run minus its resident set just before it (model, optimiser state and inputs
already allocated), from ``getrusage`` and a 2 ms /proc sampler, in a separate run with a fixed
glibc mmap threshold so that freed tensors leave the resident set (see ``run_worker``). Time: one untimed warm-up, then
the median of the timed repetitions. Results: reports/bench/model.json and reports/bench/model.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

P, C = 257, 256
PROMPT = "what colour was the first object ?"


# ----------------------------------------------------------------------------- worker side

def build_model(aggregation: str, memory: str, memory_length: int, max_frames: int, no_grad_prefix: bool = True):
    import torch
    from transformers import LlamaForCausalLM

    from pipeline.model.modeling_malmm import MALMM, MALMMConfig
    from pipeline.model.tiny import build_tokenizers, sample_corpus, tiny_config

    torch.manual_seed(0)
    tok, qtok = build_tokenizers(sample_corpus(200))
    base = tiny_config(len(tok), len(qtok), image_size=224, patch_size=14, vision_hidden=C, vision_layers=1,
                       qformer_hidden=128, qformer_layers=4, num_query_tokens=32, llm_hidden=256, llm_layers=2)
    cfg = MALMMConfig(memory=memory, memory_length=memory_length, max_frames=max_frames, aggregation=aggregation,
                      no_grad_prefix=no_grad_prefix)
    model = MALMM(cfg, base, LlamaForCausalLM(base.text_config), tok, qtok)
    with torch.no_grad():
        model.query_tokens.normal_(0, 0.02)
        model.frame_position_embedding.normal_(0, 0.02)
    return model


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakSampler:
    """Peak resident set during a block: getrusage high-water mark, or a 2 ms sampler if that was set earlier."""

    def __enter__(self):
        self.start = rss_mb()
        self.ru_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.peak, self._stop = self.start, False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        ru_end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak = max(self.peak, rss_mb(), ru_end if ru_end > self.ru_start else 0.0)
        self.delta_mb = peak - self.start


def worker_infer(spec: dict) -> dict:
    import torch

    T, chunk = spec["frames"], spec["chunk"]
    model = build_model(spec["aggregation"], "mbc", spec["memory_length"], max_frames=T).eval()
    g = torch.Generator().manual_seed(0)
    pool = [torch.randn(1, chunk, P, C, generator=g) for _ in range(8)]

    def run_video():
        with torch.inference_mode():
            state = model.init_state([PROMPT])
            for i, start in enumerate(range(0, T, chunk)):
                state = model.step(state, pool[i % len(pool)][:, : min(chunk, T - start)])
            return model.language_projection(model.readout(state))

    with torch.inference_mode():  # warm-up on a short video (kernels, allocator), outside the measurement
        s = model.init_state([PROMPT])
        s = model.step(s, pool[0][:, : min(chunk, T)])
        model.readout(s)
    times, peaks = [], []
    for _ in range(spec["reps"]):
        with PeakSampler() as m:
            t0 = time.perf_counter()
            out = run_video()
            times.append(time.perf_counter() - t0)
        peaks.append(m.delta_mb)
        del out
    return {"seconds_per_video": statistics.median(times), "peak_mb": max(peaks), "all_seconds": times}


def worker_train(spec: dict) -> dict:
    import torch

    T, B = spec["frames"], spec["batch"]
    model = build_model("memory", "mbc", spec["memory_length"], max_frames=T, no_grad_prefix=spec["prefix"]).train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    x = torch.randn(B, T, P, C, generator=torch.Generator().manual_seed(0))
    prompts, targets = [PROMPT] * B, ["red"] * B

    def iteration():
        loss = model(features=x, prompts=prompts, targets=targets).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    iteration()  # warm-up: allocates the optimiser state
    times, peaks = [], []
    for _ in range(spec["reps"]):
        with PeakSampler() as m:
            t0 = time.perf_counter()
            iteration()
            times.append(time.perf_counter() - t0)
        peaks.append(m.delta_mb)
    t = statistics.median(times)
    return {"seconds_per_step": t, "samples_per_s": B / t, "peak_mb": max(peaks), "all_seconds": times}


def worker_train_pair(spec: dict) -> dict:
    """Time the prefix and the all-autograd loop on one model, interleaved step by step (drift and
    load changes hit both alike); the flag only changes how steps 0..T-2 run, not the weights' use."""
    import torch

    T, B = spec["frames"], spec["batch"]
    model = build_model("memory", "mbc", spec["memory_length"], max_frames=T).train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    x = torch.randn(B, T, P, C, generator=torch.Generator().manual_seed(0))
    prompts, targets = [PROMPT] * B, ["red"] * B

    def iteration(prefix: bool) -> float:
        model.config.no_grad_prefix = prefix
        t0 = time.perf_counter()
        loss = model(features=x, prompts=prompts, targets=targets).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    iteration(True), iteration(False)  # warm-up: allocates the optimiser state
    times = {True: [], False: []}
    for _ in range(spec["reps"]):
        for prefix in (True, False):
            times[prefix].append(iteration(prefix))
    return {"prefix_s": statistics.median(times[True]), "all_autograd_s": statistics.median(times[False]),
            "prefix_all_s": times[True], "all_autograd_all_s": times[False]}


# ----------------------------------------------------------------------------- driver side

def _spawn(spec: dict, env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT, env=env)
    if proc.returncode:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_worker(spec: dict) -> dict:
    """Time in one fresh process (default allocator), memory in another (1 repetition) with a fixed glibc
    mmap threshold: glibc otherwise raises the threshold after frees and serves later large tensors from
    the heap, where freed memory stays resident; with it the resident set follows the live tensors (at
    the price of slower allocation, hence the separate timing run)."""
    timing = _spawn(spec, dict(os.environ))
    memory = _spawn({**spec, "reps": 1}, {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(256 * 1024)})
    return {**timing, "peak_mb": memory["peak_mb"], "peak_mb_default_allocator": timing["peak_mb"]}


def machine() -> dict:
    import torch
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_start": os.getloadavg()}


def markdown(res: dict) -> str:
    lines = ["# MA-LMM model benchmark", "",
             f"Mid-size model: P={P} tokens x C={C} per frame, Q-Former 4 layers x 128 (cross-attention every 2nd), "
             f"32 queries, frozen 2-layer Llama (width 256). CPU, {res['machine']['torch_threads']} torch threads, "
             f"{res['machine']['platform']}; load average at start "
             f"{' '.join(f'{x:.2f}' for x in res['machine']['load_avg_start'])} (2 cores, shared).", "",
             f"## Streaming inference: one video, fed in chunks of {res['chunk']} frames", "",
             "| frames | mbc s/video | concat s/video | time concat/mbc | mbc ms/frame | mbc peak MB | concat peak MB "
             "| memory concat/mbc |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in res["inference"]:
        m, c = row["mbc"], row["concat"]
        lines.append(f"| {row['frames']} | {m['seconds_per_video']:.2f} | {c['seconds_per_video']:.2f} | "
                     f"{c['seconds_per_video'] / m['seconds_per_video']:.2f} | "
                     f"{1000 * m['seconds_per_video'] / row['frames']:.1f} | {m['peak_mb']:.0f} | {c['peak_mb']:.0f} | "
                     f"{c['peak_mb'] / max(m['peak_mb'], 1e-9):.1f} |")
    first, last = res["inference"][0], res["inference"][-1]
    lines += ["", f"Growth from {first['frames']} to {last['frames']} frames "
                  f"({last['frames'] / first['frames']:.0f}x): mbc peak memory x"
                  f"{last['mbc']['peak_mb'] / max(first['mbc']['peak_mb'], 1e-9):.1f}, concat peak memory x"
                  f"{last['concat']['peak_mb'] / max(first['concat']['peak_mb'], 1e-9):.1f}; mbc time x"
                  f"{last['mbc']['seconds_per_video'] / first['mbc']['seconds_per_video']:.1f}, concat time x"
                  f"{last['concat']['seconds_per_video'] / first['concat']['seconds_per_video']:.1f}.", "",
              f"## Training step (batch {res['train_batch']}, mbc, forward + backward + AdamW)", "",
              "| frames / L | samples/s with prefix | samples/s all-autograd | speed-up | peak MB with prefix | "
              "peak MB all-autograd | memory ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in res["training"]:
        a, b = row["prefix"], row["all_autograd"]
        lines.append(f"| {row['frames']} / {row['memory_length']} | {a['samples_per_s']:.2f} | "
                     f"{b['samples_per_s']:.2f} | {a['samples_per_s'] / b['samples_per_s']:.2f} | {a['peak_mb']:.0f} | {b['peak_mb']:.0f} | "
                     f"{b['peak_mb'] / max(a['peak_mb'], 1e-9):.1f} |")
    lines += ["", "Peak MB = peak resident set during the run minus the resident set just before it "
                  "(model, optimiser state and inputs excluded), measured in a separate fresh process with a fixed "
                  "glibc mmap threshold (freed tensors leave the resident set). Times: fresh process, default "
                  "allocator, median of the timed repetitions after a warm-up; training steps with and without the "
                  "prefix are timed on one model in one process, alternating step by step (9 each). The all-autograd loop also drops "
                  "each step's graph once the next step replaces its output (memory is detached), so the prefix "
                  "saves the autograd bookkeeping of one step at a time, not T steps of activations.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer frames and repetitions (a smoke run)")
    ap.add_argument("--frames", default=None, help="comma-separated frame counts (default 20,100,300,1000)")
    ap.add_argument("--chunk", type=int, default=10, help="frames per streaming step() call")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench"))
    ap.add_argument("--only", choices=("inference", "training"),
                    help="re-measure one part; the other is kept from the existing results file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        fn = {"infer": worker_infer, "train": worker_train, "train_pair": worker_train_pair}[spec["kind"]]
        print(json.dumps(fn(spec)))
        return

    frames = [int(f) for f in (args.frames or ("20,100,300" if args.quick else "20,100,300,1000")).split(",")]
    reps = 1 if args.quick else 3
    res = {"machine": machine(), "chunk": args.chunk, "quick": args.quick, "inference": [], "training": [],
           "train_batch": 2}
    t_start = time.perf_counter()
    previous = Path(args.out) / f"model{'-quick' if args.quick else ''}.json"
    if args.only and previous.exists():
        kept = json.loads(previous.read_text())
        res["kept_from_previous_run"] = "training" if args.only == "inference" else "inference"
        res[res["kept_from_previous_run"]] = kept[res["kept_from_previous_run"]]
    for T in (frames if args.only != "training" else []):
        row = {"frames": T}
        for agg in ("memory", "concat"):
            key = "mbc" if agg == "memory" else "concat"
            row[key] = run_worker({"kind": "infer", "aggregation": agg, "memory_length": 20, "frames": T,
                                   "chunk": args.chunk, "reps": reps if T < 1000 else max(1, reps - 1)})
        res["inference"].append(row)
        print(f"frames {T:5d}: mbc {row['mbc']['seconds_per_video']:.2f} s {row['mbc']['peak_mb']:.0f} MB | concat "
              f"{row['concat']['seconds_per_video']:.2f} s {row['concat']['peak_mb']:.0f} MB", flush=True)
    for T, L in (((20, 10), (100, 20)) if args.only != "inference" else ()):
        row = {"frames": T, "memory_length": L}
        pair = _spawn({"kind": "train_pair", "frames": T, "memory_length": L, "batch": res["train_batch"],
                       "reps": 3 if args.quick else 9}, dict(os.environ))
        for prefix in (True, False):
            key = "prefix" if prefix else "all_autograd"
            mem = _spawn({"kind": "train", "frames": T, "memory_length": L, "prefix": prefix,
                          "batch": res["train_batch"], "reps": 1},
                         {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(256 * 1024)})
            step = pair[f"{key}_s"]
            row[key] = {"seconds_per_step": step, "samples_per_s": res["train_batch"] / step,
                        "all_seconds": pair[f"{key}_all_s"], "peak_mb": mem["peak_mb"]}
        res["training"].append(row)
        print(f"train T={T}: {row['prefix']['samples_per_s']:.2f} vs {row['all_autograd']['samples_per_s']:.2f} "
              f"samples/s; {row['prefix']['peak_mb']:.0f} vs {row['all_autograd']['peak_mb']:.0f} MB", flush=True)
    res["wall_seconds"] = time.perf_counter() - t_start
    res["machine"]["load_avg_end"] = os.getloadavg()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (out / f"model{suffix}.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out / f"model{suffix}.md").write_text(md)
    print()
    print(md)


if __name__ == "__main__":
    main()
