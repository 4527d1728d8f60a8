"""Manifest validation of a large manifest: the column-wise validator against the original
row-by-row one (``pipeline/manifest.py`` at a given git revision), on the same CSV, side by side.

    .venv/bin/python tests/perf/bench_manifest.py [--rows 200000] [--reps 3] [--old-rev 4128277]

Writes a manifest of ``--rows`` rows (LVU, QA and caption rows, 1 % of them with a problem),
reads it with both versions of ``read_manifest`` (CSV parsing included; the new one ``--reps``
times, the median reported; the old one once) and prints seconds and the ratio; both must
report the same problems (up to the escape message's new advice). Results:
reports/bench/manifest.json and reports/bench/manifest.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import machine, save  # noqa: E402


def write_manifest(path: Path, rows: int) -> None:
    lines = ["sample_id,benchmark,task,split,video,answer,start_sec,end_sec,question,references"]
    tasks = ("genre", "scene", "director", "writer", "year", "relationship", "way_speaking")
    for i in range(rows):
        kind = i % 3
        if kind == 0:
            row = f"s{i},lvu,{tasks[i % 7]},train,movies/v{i // 10}.mp4,comedy,{i % 50 * 20},,,"
        elif kind == 1:
            row = f"s{i},msrvtt-qa,,test,v{i // 10}.mp4,dog,1.5,4,what is it?,"
        else:
            row = f's{i},msvd-cap,,val,clips/c{i}.avi,a cat,,,,"[""a cat"", ""cat""]"'
        if i % 100 == 99:  # 1 % with a problem of some kind
            row = [row.replace(f"s{i},", "s1,", 1), row.replace(",train,", ",dev,"), row.replace("movies/", "../"),
                   row.replace(",1.5,4,", ",5,3,"), row.replace("[", "")][i // 100 % 5]
        lines.append(row)
    path.write_text("\n".join(lines) + "\n")


def load_old(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:pipeline/manifest.py"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "manifest_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("manifest_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["manifest_old"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def timed(fn, *args):
    t0 = time.perf_counter()
    try:
        fn(*args)
        problems = []
    except Exception as e:  # ManifestError of either version
        problems = list(getattr(e, "problems", [str(e)]))
    return time.perf_counter() - t0, problems


def markdown(res: dict) -> str:
    return ("| rows | problems | row by row (" + res["old_rev"] + ") | column-wise | ratio | same problems |\n"
            "|---|---|---|---|---|---|\n"
            f"| {res['rows']} | {res['problems']} | {res['old_s']:.2f} s | {res['new_s']:.2f} s | "
            f"x{res['old_s'] / res['new_s']:.0f} | {res['same']} |\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--old-rev", default="4128277", help="git revision of the row-by-row validator")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench"))
    args = ap.parse_args()
    from pipeline import manifest as new

    res = {"machine": machine(), "rows": args.rows, "old_rev": args.old_rev}
    old = load_old(args.old_rev)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.csv"
        write_manifest(path, args.rows)
        runs = [timed(new.read_manifest, path, d) for _ in range(args.reps)]
        t_new, p_new = sorted(runs)[len(runs) // 2][0], runs[0][1]
        t_old, p_old = timed(old.read_manifest, path, d)
    # the escape message's advice changed (it now names --allow-outside-root): compare up to it
    norm = lambda ps: sorted(p.split("; give a path inside --video-root")[0] for p in ps)  # noqa: E731
    same = norm(p_new) == norm(p_old)
    if not same:
        print("only old:", sorted(set(norm(p_old)) - set(norm(p_new)))[:5])
        print("only new:", sorted(set(norm(p_new)) - set(norm(p_old)))[:5])
    res.update(problems=len(p_new), old_s=t_old, new_s=t_new, new_runs_s=[t for t, _ in runs], same=same)
    save("manifest", res, markdown, args.out)


if __name__ == "__main__":
    main()
