"""Extraction memory benchmark at the real feature shape: peak memory of the driver and of each Ray
worker over N and 4N videos (flat when no stage holds more than a few videos).

    .venv/bin/python tests/perf/bench_extract_rss.py [--videos 8] [--layers 1]

A vision model of the paper's output shape (EVA ViT-g/14's width 1408 and 257 tokens per frame at
224 px; ``--layers`` encoder layers with random weights, so a CPU copes) is saved with
``save_pretrained`` and passed to ``extract --model``. The built-in synthetic benchmark of N and then
4N videos is extracted, each run in a fresh process with its own local Ray cluster, while this
script samples every process of that run's tree (``/proc``: ``VmHWM``, the kernel's peak resident
set, keyed by the Ray process title: the decode+encode actor, the shard writers, the task workers).
The driver reports its own peak (``ru_maxrss``) at the end.

Reported per role: peak RSS at N and at 4N and their ratio (the goal: within 10 %). Each video
yields 2 units × 4 frames × 257 × 1408 fp16 = 5.8 MB of features, so a stage that kept every video
would grow by about 3N × 5.8 MB between the runs.

Linux only (``/proc``). Results: reports/bench/extract_rss.json and reports/bench/extract_rss.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import machine, save  # noqa: E402

SECONDS = 12.0  # per synthetic video (the shortest the synthetic benchmark allows)
SAMPLING = "uniform:4"  # frames per unit
ROLES = (("encode actor (decode fused)", "MapWorker"), ("shard writer", "ShardWriter"),
         ("write tasks", "write_samples"), ("other Ray workers", "ray::"))

RUN = """
import json, resource, sys
from pipeline.config import ExtractConfig
from stages import extract
res = extract.run(ExtractConfig(manifest=sys.argv[1], out=sys.argv[2], model=sys.argv[3], sampling=sys.argv[4]),
                  progress=False)
assert res.failed == 0, res
print("RESULT", json.dumps({"ok": res.ok, "driver_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def real_shape_model(folder: Path, layers: int) -> Path:
    import torch
    from transformers import InstructBlipVisionConfig, InstructBlipVisionModel

    cfg = InstructBlipVisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=layers,
                                   num_attention_heads=16, image_size=224, patch_size=14)
    torch.manual_seed(0)
    InstructBlipVisionModel(cfg).save_pretrained(folder)
    return folder


def _tree(root: int) -> list[int]:
    """``root`` and every process below it (from ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _peak_and_title(pid: int) -> tuple[int, str] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    hwm = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return hwm, title


def measure(n: int, model: Path, tmp: Path) -> dict:
    from pipeline import synth

    data = tmp / f"synth-{n}"
    synth.generate(data, videos=n, seconds=SECONDS, seed=0, progress=False)
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(data / "manifest.csv"), str(tmp / f"feat-{n}"),
                             str(model), SAMPLING], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peaks: dict[int, tuple[int, str]] = {}
    t0 = time.perf_counter()
    while proc.poll() is None:
        for pid in _tree(proc.pid):
            if pid == proc.pid:
                continue
            got = _peak_and_title(pid)
            if got and got[1].startswith("ray::"):
                hwm, title = got
                best = peaks.get(pid, (0, title))
                # the title changes as a worker runs tasks: keep the most specific one seen
                peaks[pid] = (max(hwm, best[0]), title if len(title) > len(best[1]) else best[1])
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"extract of {n} videos failed:\n{err[-3000:]}")
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[len("RESULT "):])
    roles: dict[str, int] = {}
    for hwm, title in peaks.values():
        role = next(name for name, marker in ROLES if marker in title)
        roles[role] = max(roles.get(role, 0), hwm)
    feats = sum(p.stat().st_size for p in (tmp / f"feat-{n}").glob("shard-*.tar"))
    return {"videos": n, "units": result["ok"], "seconds": time.perf_counter() - t0, "feature_bytes": feats,
            "driver": result["driver_peak"], **roles}


def markdown(res: dict) -> str:
    a, b = res["runs"]
    m = res["machine"]
    lines = ["# Extraction memory at the real feature shape", "",
             f"`tests/perf/bench_extract_rss.py`: {m['cpus']} CPUs, {m['platform']}, torch {m['torch']}. A vision model "
             f"of width 1408 with 257 tokens per frame ({res['layers']} layer(s), random weights), {SAMPLING} per "
             f"unit, synthetic videos of {SECONDS:.0f} s; each run in a fresh process with its own local Ray cluster.",
             "",
             f"| peak RSS | {a['videos']} videos ({a['feature_bytes'] / 1e6:.0f} MB of shards) | {b['videos']} videos "
             f"({b['feature_bytes'] / 1e6:.0f} MB of shards) | ratio |", "|---|---:|---:|---:|"]
    for role in ["driver"] + [r for r, _ in ROLES]:
        if role in a and role in b:
            lines.append(f"| {role} | {a[role] / 2**20:.0f} MiB | {b[role] / 2**20:.0f} MiB | "
                         f"**{b[role] / a[role]:.2f}** |")
    lines += ["", f"Worst ratio: **{res['worst_ratio']:.2f}** (goal ≤ 1.10). Peaks are the kernel's VmHWM of each "
                  "process (the driver: its ru_maxrss), the largest over the processes of a role.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=8, help="N: the runs use N and 4N videos")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench"))
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-rss-"))
    try:
        model = real_shape_model(tmp / "vit-real-shape", args.layers)
        runs = [measure(n, model, tmp) for n in (args.videos, 4 * args.videos)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a, b = runs
    ratios = {k: b[k] / a[k] for k in a if k not in ("videos", "units", "seconds", "feature_bytes") and k in b}
    res = {"machine": machine(), "layers": args.layers, "sampling": SAMPLING, "runs": runs, "ratios": ratios,
           "worst_ratio": max(ratios.values())}
    for k, v in ratios.items():
        print(f"{k}: {a[k] / 2**20:.0f} MiB → {b[k] / 2**20:.0f} MiB ({v:.2f}x)", flush=True)
    save("extract_rss", res, markdown, args.out, False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
