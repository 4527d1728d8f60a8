"""The manifest contract (DESIGN §4): one CSV row per sample, validated before any work.

Every problem is collected and reported at once, with the CSV line number of each
offending row and what to do about it; nothing runs on an invalid manifest.
"""
from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.benchmarks import BENCHMARKS, SPLITS, tasks_of

REQUIRED = ("sample_id", "benchmark", "task", "split", "video", "answer")
OPTIONAL = ("start_sec", "end_sec", "question", "references")
MAX_SHOWN = 50  # problems listed in full; the rest are counted


class ManifestError(ValueError):
    """A manifest that failed validation; ``problems`` lists every finding."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        shown = problems[:MAX_SHOWN]
        more = f"\n  … and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        super().__init__(f"{path}: {len(problems)} problem(s) in the manifest; nothing was run.\n  "
                         + "\n  ".join(shown) + more)


def is_uri(path: str) -> bool:
    return "://" in path


def resolve_video(video: str, video_root: str | None) -> str:
    """Absolute path or URI of a manifest's ``video`` entry."""
    if is_uri(video) or posixpath.isabs(video) or not video_root:
        return video
    if is_uri(video_root):
        return video_root.rstrip("/") + "/" + video
    return str(Path(video_root) / video)


def _escapes_root(video: str) -> bool:
    if is_uri(video) or posixpath.isabs(video):
        return False
    norm = posixpath.normpath(video.replace("\\", "/"))
    return norm == ".." or norm.startswith("../")


def _float_or_none(value: str) -> float | None:
    value = (value or "").strip()
    if not value:
        return None
    f = float(value)
    if math.isnan(f) or math.isinf(f):
        raise ValueError(value)
    return f


@dataclass
class Manifest:
    path: str
    df: pd.DataFrame  # all columns as strings; start_sec/end_sec as float (NaN when absent)

    def __len__(self) -> int:
        return len(self.df)

    def references(self, row) -> list[str]:
        """All references of a row: the JSON list in ``references`` if present, else [answer]."""
        refs = row.get("references", "") if hasattr(row, "get") else ""
        if isinstance(refs, str) and refs.strip():
            return list(json.loads(refs))
        return [row["answer"]]


def read_manifest(path: str | Path, video_root: str | None = None, *, check_files: bool = False) -> Manifest:
    """Read and validate a manifest CSV; raise :class:`ManifestError` listing every problem."""
    path = str(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[])
    except FileNotFoundError:
        raise ManifestError(path, [f"file not found: {path} (create one with `malmm-pipeline manifest` or `synth`)"]) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ManifestError(path, [f"not a readable CSV file: {e}"]) from None
    df.columns = [c.strip() for c in df.columns]
    problems = validate(df, video_root=video_root, check_files=check_files)
    if problems:
        raise ManifestError(path, problems)
    for col in OPTIONAL:
        if col not in df.columns:
            df[col] = ""
    for col in ("start_sec", "end_sec"):
        df[col] = [(_float_or_none(v) if v.strip() else float("nan")) for v in df[col]]
    return Manifest(path, df)


def validate(df: pd.DataFrame, *, video_root: str | None = None, check_files: bool = False) -> list[str]:
    """Every problem of a manifest table, as human-readable lines naming the CSV line and the fix."""
    problems: list[str] = []
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        problems.append(f"missing column(s) {', '.join(missing)}; required columns are {', '.join(REQUIRED)}")
        return problems
    if len(df) == 0:
        return ["the manifest has no rows"]
    line = lambda i: f"line {i + 2} (row {i + 1})"  # noqa: E731  header is line 1

    dup = df["sample_id"].duplicated(keep=False) & (df["sample_id"] != "")
    seen: dict[str, int] = {}
    for i in df.index[dup]:
        sid = df.at[i, "sample_id"]
        if sid in seen:
            problems.append(f"{line(i)}: duplicate sample_id {sid!r} (first at {line(seen[sid])}); sample ids must be unique")
        else:
            seen[sid] = i
    for i, row in df.iterrows():
        if not row["sample_id"].strip():
            problems.append(f"{line(i)}: empty sample_id")
        b = row["benchmark"].strip()
        if b not in BENCHMARKS:
            problems.append(f"{line(i)}: unknown benchmark {b!r}; use one of {', '.join(BENCHMARKS)}")
        else:
            tasks = tasks_of(b)
            if tasks != ("",) and row["task"].strip() not in tasks:
                problems.append(f"{line(i)}: unknown task {row['task']!r} for {b}; use one of {', '.join(tasks)}")
        if row["split"].strip() not in SPLITS:
            problems.append(f"{line(i)}: unknown split {row['split']!r}; use one of {', '.join(SPLITS)}")
        if not row["answer"].strip():
            problems.append(f"{line(i)}: empty target in column 'answer' (a label, answer or caption is required)")
        refs = row.get("references", "")
        if refs.strip():
            try:
                r = json.loads(refs)
                if not isinstance(r, list) or not r or not all(isinstance(x, str) and x.strip() for x in r):
                    raise ValueError
            except ValueError:
                problems.append(f"{line(i)}: 'references' must be a JSON list of non-empty strings, got {refs[:60]!r}")
        video = row["video"].strip()
        if not video:
            problems.append(f"{line(i)}: empty video path")
        elif _escapes_root(video):
            problems.append(f"{line(i)}: video path {video!r} escapes the video root; give a path inside --video-root or an absolute path")
        elif check_files and not is_uri(video) and not Path(resolve_video(video, video_root)).exists():
            problems.append(f"{line(i)}: video file not found: {resolve_video(video, video_root)}")
        bounds = []
        for col in ("start_sec", "end_sec"):
            try:
                bounds.append(_float_or_none(row.get(col, "")))
            except ValueError:
                problems.append(f"{line(i)}: {col} must be a number of seconds, got {row.get(col)!r}")
                bounds.append(None)
        s, e = bounds
        if s is not None and s < 0:
            problems.append(f"{line(i)}: start_sec is negative ({s})")
        if s is not None and e is not None and e <= s:
            problems.append(f"{line(i)}: end_sec ({e}) must be greater than start_sec ({s})")
    return problems
