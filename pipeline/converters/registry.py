"""The registry (benchmark → converter) and :func:`convert`, which runs one converter and
turns what it read into a validated manifest: videos looked up, table validated, written
atomically (the manifest contract: README, *Architecture* → *Data contracts*)."""
from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Callable

import pandas as pd

from pipeline.benchmarks import BENCHMARKS, SPLITS
import pipeline.converters.coin as coin
import pipeline.converters.epic_kitchens as epic_kitchens
import pipeline.converters.malmm_json as malmm_json
from pipeline.converters.core import (CORE_COLUMNS, MISSING_SHOWN, SPLIT_ALIASES, ConversionError, ConvertResult,
                                      Context, Video, VideoFinder, atomic_write_text)
from pipeline.converters.epic_kitchens import DEFAULT_ANTICIPATION_SEC, DEFAULT_OBSERVATION_SEC
from pipeline.manifest import is_uri, validate

CONVERTERS: dict[str, Callable[[Context], None]] = {
    "lvu": malmm_json.lvu,
    "breakfast": malmm_json.breakfast,
    "coin": coin.coin,
    "msrvtt-qa": malmm_json.qa, "msvd-qa": malmm_json.qa, "activitynet-qa": malmm_json.qa,
    "msrvtt-cap": malmm_json.captions, "msvd-cap": malmm_json.captions, "youcook2-cap": malmm_json.captions,
    "ek100": epic_kitchens.ek100,
}


def _check_unique(ctx: Context) -> None:
    first: dict[str, str] = {}
    dups = []
    for r in ctx.rows:
        sid = r["sample_id"]
        if sid in first:
            dups.append(f"{sid!r} ({r['_source']}; first at {first[sid]})")
        else:
            first[sid] = r["_source"]
    if dups:
        raise ConversionError(None, f"{len(dups)} duplicate sample id(s) in the {ctx.benchmark} annotations: "
                                    + "; ".join(dups[:3]) + (" …" if len(dups) > 3 else ""))


def convert(benchmark: str, annotations_dir: str | Path, videos_dir: str | Path | None, *,
            split: str | None = None, out: str | Path | None = None,
            observation_sec: float = DEFAULT_OBSERVATION_SEC, anticipation_sec: float = DEFAULT_ANTICIPATION_SEC,
            absolute_paths: bool = False) -> ConvertResult:
    """Convert one benchmark's published annotations into a manifest (the contract: README,
    *Architecture* → *Data contracts*; the rules per benchmark: manifests/README.md).

    ``split`` keeps one split (train / val / test; official names such as
    ``validation`` are accepted); ``out`` is the CSV to write (nothing is written when
    ``None``; the table is in ``result.df``). ``videos_dir`` is where the videos are (or
    will be): manifest ``video`` entries are relative to it (absolute with
    ``absolute_paths``), videos not found there are counted and listed in
    ``<out>.missing.txt``; ``None`` skips the check. ``observation_sec`` /
    ``anticipation_sec`` set the EPIC-Kitchens-100 observation window.

    Raises :class:`ConversionError` (naming the file and entry) for malformed or missing
    annotation files, ``KeyError`` for a benchmark without a converter.
    """
    if benchmark not in CONVERTERS:
        hint = " (its manifest is written by `malmm-pipeline synth`)" if benchmark == "synthetic" else ""
        raise KeyError(f"no converter for benchmark {benchmark!r}{hint}; converters exist for "
                       f"{', '.join(CONVERTERS)}")
    assert benchmark in BENCHMARKS, benchmark
    if split is not None:
        if str(split).strip().lower() not in SPLIT_ALIASES:
            raise ConversionError(None, f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        split = SPLIT_ALIASES[str(split).strip().lower()]
    ann, file = Path(annotations_dir), None
    if ann.is_file() and benchmark == "coin":  # the single official file may be named directly
        ann, file = ann.parent, ann
    elif ann.is_file():
        raise ConversionError(ann, f"--annotations must be a folder for {benchmark} (the one holding its "
                                   "annotation files, or a parent of it)")
    if not ann.is_dir():
        raise FileNotFoundError(f"annotations folder not found: {ann}")
    ctx = Context(benchmark, ann, split, float(observation_sec), float(anticipation_sec), file=file)
    CONVERTERS[benchmark](ctx)
    if not ctx.rows:
        raise ConversionError(ctx.sources[0] if ctx.sources else ann,
                              f"no {benchmark} samples in the annotations"
                              + (f" (skipped: {dict(ctx.skipped)})" if ctx.skipped else ""))
    _check_unique(ctx)

    # videos: the documented path of each, or the file found under videos_dir
    vdir = None if videos_dir is None else str(videos_dir)
    paths: dict[str, str] = {}
    missing: list[Video] = []
    if vdir is None or is_uri(vdir):
        for vid, v in ctx.videos.items():
            paths[vid] = v.expected if vdir is None or not absolute_paths else vdir.rstrip("/") + "/" + v.expected
    else:
        root = Path(vdir)
        if not root.is_dir():
            ctx.notes.append(f"the videos folder {root} does not exist: every video is reported missing")
        finder = VideoFinder(root)
        for vid, v in ctx.videos.items():
            found = finder.find(v) if root.is_dir() else None
            if found is None:
                missing.append(v)
            rel = found or v.expected
            paths[vid] = os.path.join(os.path.abspath(root), rel) if absolute_paths else rel
        if finder.ambiguous:
            ctx.notes.append(f"{finder.ambiguous} video(s) matched several files of the same name in different "
                             "folders and were counted missing; give the documented layout")

    extras = [c for c in ctx.extras if c not in CORE_COLUMNS]
    columns = list(CORE_COLUMNS) + extras
    records = []
    for r in ctx.rows:
        rec = {c: r.get(c, "") for c in columns}
        rec["video"] = paths[r["_video"]]
        records.append(rec)
    df = pd.DataFrame.from_records(records, columns=columns).astype(str)

    problems = validate(df)
    if problems:
        def where(p: str) -> str:
            m = re.search(r"\(row (\d+)\)", p)
            return f" [{ctx.rows[int(m.group(1)) - 1]['_source']}]" if m and int(m.group(1)) <= len(ctx.rows) else ""
        raise ConversionError(None, f"the converted {benchmark} manifest fails validation ({len(problems)} "
                                    "problem(s)); nothing was written:\n  "
                              + "\n  ".join(p + where(p) for p in problems[:10]))

    splits = {s: int(n) for s, n in df["split"].value_counts().items()}
    splits = {s: splits[s] for s in SPLITS if s in splits}
    tasks = {t: int(n) for t, n in df["task"].value_counts().items()} if (df["task"] != "").any() else {}
    out_path = Path(out) if out is not None else None
    missing_list = None
    if out_path is not None:
        buf = io.StringIO()
        df.to_csv(buf, index=False, lineterminator="\n")
        atomic_write_text(out_path, buf.getvalue())
        list_path = Path(str(out_path) + ".missing.txt")
        if missing:
            lines = [f"# {len(missing)} of {len(ctx.videos)} {benchmark} videos not found under {vdir}; "
                     "video id <TAB> expected path (relative to that folder)"]
            lines += [f"{v.vid}\t{v.expected}" for v in missing]
            atomic_write_text(list_path, "\n".join(lines) + "\n")
            missing_list = list_path
        elif list_path.exists():  # a stale list from an earlier run
            list_path.unlink()
    return ConvertResult(benchmark=benchmark, out=out_path, rows=len(df), splits=splits, tasks=tasks,
                         videos=len(ctx.videos), videos_dir=vdir,
                         videos_checked=vdir is not None and not is_uri(vdir),
                         missing_videos=len(missing), missing_examples=[v.expected for v in missing[:MISSING_SHOWN]],
                         missing_list=missing_list, skipped=dict(ctx.skipped), sources=list(ctx.sources),
                         notes=ctx.notes, df=df)
