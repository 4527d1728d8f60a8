"""Sampled-frame decoding: ours (`pipeline.decode.read_frames`, strategy 'auto', through the watchdog)
against decord's plain `VideoReader.get_batch` and against sequential decoding, side by side.

    .venv/bin/python tests/perf/bench_decode.py [--frames 1500] [--reps 5] [--quick]

Writes two H.264 videos per resolution (GOP 30 and GOP 250, x264 defaults otherwise: B-frames,
fixed keyframe interval) and times, for each sampling (uniform 16 / 32 / 100 frames with the project's
`uniform:N` rule, and 1 fps):

* ours            read_frames(path, idx, size=...) — strategy 'auto', watchdog worker (warm), 1 decoder thread,
                  the worker's index cache off (each call indexes the file, as each VideoReader does)
* ours in-process the same with timeout_s=None (no watchdog): shows the cost of the process boundary
* get_batch       decord.VideoReader(path[, width, height]).get_batch(sorted idx).asnumpy(); the faster of
                  decord's default threads (num_threads=0) and num_threads=1
* sequential      PyAV: decode every frame from the start up to the last wanted one, convert the wanted
                  ones (one reused swscale context); the faster of 1 decoder thread and FFmpeg's automatic
                  threading

Every method opens the file in every repetition; repetitions interleave the methods; the median is
reported. ratio = ours / best baseline (below 1: ours is faster). Frames of ours are checked to be
bit-identical to get_batch's. Results: reports/bench/decode.json and reports/bench/decode.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline import decode as D  # noqa: E402
from tests.videos import make_video  # noqa: E402


def sampling_indices(kind: str, num_frames: int, fps: float) -> np.ndarray:
    try:
        from pipeline.sampling import SamplingPolicy, frame_indices
        return frame_indices(SamplingPolicy.parse(kind), num_frames, fps)[0]
    except ImportError:  # pragma: no cover
        k, v = kind.split(":")
        if k == "uniform":
            n = int(v)
            return ((np.arange(n) + 0.5) * num_frames / n).astype(np.int64)
        return np.round(np.arange(0, num_frames / fps, 1 / float(v)) * fps).astype(np.int64)


# ----------------------------------------------------------------------------- methods

# every call of ours indexes the file, like every VideoReader does (no reuse of the worker's index)
NO_CACHE = dict(index_cache=False)


def ours(path, idx, size):
    return D.read_frames(path, idx, size=size, **NO_CACHE).frames


def ours_inproc(path, idx, size):
    return D.read_frames(path, idx, size=size, timeout_s=None, **NO_CACHE).frames


def decord_get_batch(path, idx, size, threads):
    import decord
    kw = {"num_threads": threads}
    if size:
        kw.update(width=size[1], height=size[0])
    vr = decord.VideoReader(str(path), **kw)
    return vr.get_batch(sorted(set(int(i) for i in idx))).asnumpy()


def pyav_sequential(path, idx, size, threads):
    import av
    from av.video.reformatter import VideoReformatter
    want = set(int(i) for i in idx)
    last = max(want)
    out = []
    conv = VideoReformatter()  # one swscale context for all frames (frame.to_ndarray(format=) makes one per frame)
    kw = {"width": size[1], "height": size[0], "interpolation": "BILINEAR"} if size else {}
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.codec_context.thread_count = threads
        s.codec_context.thread_type = "SLICE" if threads == 1 else "AUTO"
        for i, f in enumerate(c.decode(s)):
            if i in want:
                out.append(conv.reformat(f, format="rgb24", **kw).to_ndarray())
            if i >= last:
                break
    return np.stack(out)


METHODS = {
    "ours": ours,
    "ours_inproc": ours_inproc,
    "get_batch_t0": lambda p, i, s: decord_get_batch(p, i, s, 0),
    "get_batch_t1": lambda p, i, s: decord_get_batch(p, i, s, 1),
    "sequential_t1": lambda p, i, s: pyav_sequential(p, i, s, 1),
    "sequential_auto": lambda p, i, s: pyav_sequential(p, i, s, 0),
}


def timed(fn, *a):
    t0 = time.perf_counter()
    r = fn(*a)
    return time.perf_counter() - t0, r


def run(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_decode_"))
    configs = [("224x224", (224, 224), None)]
    if not args.quick:
        configs.append(("640x360->224", (360, 640), (224, 224)))
    samplings = ["uniform:16", "uniform:32", "uniform:100", "fps:1"]
    rows = []
    for label, hw, size in configs:
        for gop in (30, 250):
            path = tmp / f"v_{hw[0]}_{gop}.mp4"
            t0 = time.perf_counter()
            make_video(path, args.frames, args.fps, hw, gop=gop, seed=11)
            print(f"# wrote {path.name}: {args.frames} frames {hw[1]}x{hw[0]} GOP {gop}, "
                  f"{path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s", flush=True)
            info = D.probe(path, **NO_CACHE)
            for kind in samplings:
                idx = sampling_indices(kind, info.num_frames, info.fps)
                # warm-up (worker start, page cache) and correctness check
                a = ours(path, idx, size)
                b = decord_get_batch(path, idx, size, 1)
                order = np.searchsorted(np.unique(idx), idx)
                identical = bool(np.array_equal(a, b[order]))
                r = D.read_frames(path, idx, size=size, **NO_CACHE)
                times = {m: [] for m in METHODS}
                for _ in range(args.reps):
                    for m, fn in METHODS.items():
                        times[m].append(timed(fn, path, idx, size)[0])
                med = {m: statistics.median(v) for m, v in times.items()}
                gb = min(med["get_batch_t0"], med["get_batch_t1"])
                seq = min(med["sequential_t1"], med["sequential_auto"])
                best = min(gb, seq)
                row = {"video": label, "gop": gop, "sampling": kind, "n_frames": int(len(idx)),
                       "distinct": int(len(np.unique(idx))), "ours_ms": med["ours"] * 1e3,
                       "ours_inproc_ms": med["ours_inproc"] * 1e3, "get_batch_ms": gb * 1e3,
                       "sequential_ms": seq * 1e3, "best_baseline": "get_batch" if gb <= seq else "sequential",
                       "ratio": med["ours"] / best, "ratio_inproc": med["ours_inproc"] / best,
                       "identical_to_get_batch": identical, "seeks": r.stats.get("seeks"),
                       "segments": r.stats.get("segments"), "decoded": r.stats.get("decoded"),
                       "all_ms": {m: [round(x * 1e3, 2) for x in v] for m, v in times.items()}}
                rows.append(row)
                print(fmt_row(row), flush=True)
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    return {"rows": rows, "frames": args.frames, "fps": args.fps, "reps": args.reps, "machine": machine()}


def machine() -> dict:
    import av
    import decord
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "pyav": av.__version__, "decord": decord.__version__, "numpy": np.__version__,
            "decoder_threads_ours": D.DEFAULT_THREADS, "seek_gap": D.SEEK_GAP}


HEADER = ("| video | GOP | sampling | frames | ours (ms) | ours in-proc (ms) | decord get_batch (ms) | "
          "sequential (ms) | ours / best baseline | seeks | frames decoded | identical |")


def fmt_row(r: dict) -> str:
    return (f"| {r['video']} | {r['gop']} | {r['sampling']} | {r['n_frames']} | {r['ours_ms']:.1f} | "
            f"{r['ours_inproc_ms']:.1f} | {r['get_batch_ms']:.1f} | {r['sequential_ms']:.1f} | "
            f"**{r['ratio']:.2f}** (vs {r['best_baseline']}) | {r['seeks']} | {r['decoded']} | "
            f"{'yes' if r['identical_to_get_batch'] else 'NO'} |")


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Sampled-frame decoding benchmark",
        "",
        f"`tests/perf/bench_decode.py`: {res['frames']} frames at {res['fps']} fps, H.264 (x264 defaults, "
        f"B-frames), median of {res['reps']} interleaved repetitions; every call opens the file. "
        f"Machine: {m['cpus']} CPUs, {m['platform']}, PyAV {m['pyav']}, decord {m['decord']}.",
        "",
        "* **ours**: `read_frames(..., strategy='auto')` through the watchdog worker (warm), 1 decoder thread.",
        "* **ours in-proc**: the same without the watchdog (`timeout_s=None`).",
        "* **decord get_batch**: `VideoReader(...).get_batch(sorted indices)`, faster of num_threads 0 and 1.",
        "* **sequential**: PyAV decode from the start to the last wanted frame, converting wanted frames; "
        "faster of 1 thread and automatic threading.",
        "* **ratio** = ours / the better baseline (< 1: ours is faster). *identical*: ours returns the same "
        "bytes as get_batch.",
        "",
        HEADER,
        "|" + "---|" * (HEADER.count("|") - 1),
    ]
    lines += [fmt_row(r) for r in res["rows"]]
    worst = max(r["ratio"] for r in res["rows"])
    geo = float(np.exp(np.mean([np.log(r["ratio"]) for r in res["rows"]])))
    lines += ["", f"Worst ratio {worst:.2f}, geometric mean {geo:.2f} over {len(res['rows'])} cases."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1500)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="224x224 only")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench"))
    args = ap.parse_args(argv)
    print(HEADER, flush=True)
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(res, indent=1))
    (out / "decode.md").write_text(markdown(res))
    print(f"\nwrote {out / 'decode.json'} and {out / 'decode.md'}")
    worst = max(r["ratio"] for r in res["rows"])
    print(f"worst ratio ours / best baseline: {worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
