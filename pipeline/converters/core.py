"""What every converter shares: the error, the typed readers of annotation files, the
video finder, the conversion context a converter fills and the atomic write of its output.

A converter (one function per benchmark, in the format modules beside this one) reads its
files with :func:`read_json` + :func:`entries` + :class:`Entry` (JSON) or :func:`read_csv`
(CSV), so that every problem names the file and the entry, and reports what it read to a
:class:`Context`: :meth:`Context.split_files` (which files), :meth:`Context.add` (one
manifest row), :meth:`Context.video` (how that row's video is named on disk).
:func:`pipeline.converters.registry.convert` does the rest (videos, validation, writing).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from pipeline import storage

# The manifest columns every converter writes, in this order; a converter's own columns follow.
CORE_COLUMNS = ("sample_id", "benchmark", "task", "split", "video", "start_sec", "end_sec", "question", "answer",
                "references", "video_duration")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".wmv", ".3gp", ".ts")
MISSING_SHOWN = 5  # missing videos named in the summary
SKIP_REFERENCE = "left out by the reference implementation"

# Folder names a dataset's annotations are found under (below --annotations); default: the dataset's name.
DATASET_FOLDERS = {"epic-kitchens-100": ("epic-kitchens-100", "epic-kitchens-100-annotations", "EPIC-KITCHENS-100",
                                         "ek100")}


class ConversionError(ValueError):
    """An annotation file that cannot be converted; names the file and the entry."""

    def __init__(self, path: str | Path | None, message: str, entry: str | None = None):
        self.path = None if path is None else str(path)
        self.entry = entry
        self.reason = message
        where = "" if self.path is None else self.path + (f", entry {entry}" if entry is not None else "") + ": "
        super().__init__(where + message)


@dataclass
class ConvertResult:
    """What a conversion produced (``str()`` is the CLI's summary)."""
    benchmark: str
    out: Path | None
    rows: int
    splits: dict[str, int]
    tasks: dict[str, int]
    videos: int  # distinct videos referenced
    videos_dir: str | None
    videos_checked: bool  # False without a videos folder or for remote storage
    missing_videos: int  # distinct videos not found under videos_dir
    missing_examples: list[str]  # the first few expected paths
    missing_list: Path | None  # <out>.missing.txt when videos are missing
    skipped: dict[str, int]  # annotated entries without a manifest row: reason → count
    sources: list[Path]
    notes: list[str] = field(default_factory=list)
    df: pd.DataFrame | None = field(default=None, repr=False)

    def __str__(self) -> str:
        per_split = ", ".join(f"{s} {n}" for s, n in self.splits.items())
        lines = [f"{self.benchmark}: {self.rows} samples ({per_split}) from {self.videos} videos"
                 + (f" → {self.out}" if self.out else " (not written)")]
        if any(self.tasks):
            lines.append("  tasks: " + ", ".join(f"{t} {n}" for t, n in self.tasks.items()))
        if not self.videos_checked:
            remote = f" ({self.videos_dir} is remote storage)" if self.videos_dir else ""
            lines.append("  videos: not checked" + remote)
        elif self.missing_videos:
            more = ", …" if self.missing_videos > len(self.missing_examples) else ""
            lines.append(f"  videos: {self.missing_videos} of {self.videos} not found under {self.videos_dir} "
                         f"(e.g. {', '.join(self.missing_examples)}{more})"
                         + (f"; full list: {self.missing_list}" if self.missing_list else ""))
        else:
            lines.append(f"  videos: all {self.videos} found under {self.videos_dir}")
        if self.skipped:
            lines.append("  skipped: " + "; ".join(f"{why}: {n}" for why, n in self.skipped.items()))
        lines += [f"  note: {n}" for n in self.notes]
        if self.out:
            root = f" --video-root {self.videos_dir}" if self.videos_dir else ""
            lines.append(f"  next: malmm-pipeline extract --manifest {self.out}{root}")
        return "\n".join(lines)


# ============================================================================ reading annotation files

def type_name(v: Any) -> str:
    """A JSON value's type in JSON's words (for error messages)."""
    return "null" if v is None else {dict: "object", list: "list", str: "string", bool: "boolean"}.get(
        type(v), type(v).__name__)


def read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConversionError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConversionError(path, f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None


def entries(path: Path, data: Any, what: str) -> list[tuple[str, str, dict]]:
    """(entry label, key, entry) of a JSON object of entries (or a list of entries)."""
    if isinstance(data, dict):
        items = [(repr(k), str(k), v) for k, v in data.items()]
    elif isinstance(data, list):
        items = [(f"[{i}]", str(i), v) for i, v in enumerate(data)]
    else:
        raise ConversionError(path, f"expected a JSON object of {what} entries, got {type_name(data)}")
    for label, _, v in items:
        if not isinstance(v, dict):
            raise ConversionError(path, f"expected an object, got {type_name(v)}", label)
    return items


class Entry:
    """Typed access to one annotation entry; every problem names the file and the entry."""

    def __init__(self, path: Path, label: str, data: dict):
        self.path, self.label, self.data = path, label, data

    def fail(self, message: str):
        raise ConversionError(self.path, message, self.label)

    def _get(self, key: str, required: bool):
        if key not in self.data or self.data[key] is None:
            if required:
                self.fail(f"missing key {key!r}")
            return None
        return self.data[key]

    def text(self, key: str, *, required: bool = True, numbers: bool = False) -> str | None:
        v = self._get(key, required)
        if v is None:
            return None
        if isinstance(v, str):
            return v.strip()
        if numbers and isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
        self.fail(f"{key!r} must be a string, got {type_name(v)} {v!r}"[:200])

    def number(self, key: str, *, required: bool = True, positive: bool = False) -> float | None:
        v = self._get(key, required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(f"{key!r} must be a number, got {type_name(v)} {v!r}"[:200])
        if v < 0 or (positive and v == 0):
            self.fail(f"{key!r} must be {'positive' if positive else 'non-negative'}, got {v!r}")
        return float(v)

    def integer(self, key: str, *, required: bool = False) -> int | None:
        v = self._get(key, required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(f"{key!r} must be an integer, got {type_name(v)} {v!r}"[:200])
        return v


def read_csv(path: Path, required: Iterable[str]) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV file with a header; missing columns are an error."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConversionError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in required if c not in header]
    if missing:
        raise ConversionError(path, f"missing column(s) {', '.join(missing)} (header: {', '.join(header) or 'empty'})")
    reader.fieldnames = header
    rows = []
    try:
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise ConversionError(path, f"expected {len(header)} fields, got a different number",
                                      f"line {reader.line_num}")
            rows.append((reader.line_num, {k: v.strip() for k, v in row.items()}))
    except csv.Error as e:
        raise ConversionError(path, f"not a readable CSV file ({e})", f"line {reader.line_num}") from None
    return rows


def seconds(x: float | int | None) -> str:
    """Seconds as written in the manifest: integers plain, others to the millisecond."""
    if x is None:
        return ""
    x = round(float(x), 3)
    return str(int(x)) if x == int(x) else f"{x:.3f}".rstrip("0")


# ============================================================================ videos

@dataclass(frozen=True)
class Video:
    """How one video is named: candidate paths without extension (first = documented layout),
    preferred extensions, and the file stems that identify it wherever it lies in the tree
    (the id itself; never a name shared by other videos such as Breakfast's ``P03_cereals``)."""
    vid: str
    candidates: tuple[str, ...]
    exts: tuple[str, ...]
    stems: tuple[str, ...]

    @property
    def expected(self) -> str:
        return self.candidates[0] + self.exts[0]


class VideoFinder:
    """Finds video files under a root: documented layouts first (one directory listing per
    folder, cached), then a file with the same name anywhere in the tree when unique."""

    PRUNE = {"frames", "rgb_frames", "flow_frames", "annotation", "annotations", "features", "__pycache__"}
    MAX_DEPTH = 6

    def __init__(self, root: Path):
        self.root = root
        self._lists: dict[str, dict[str, dict[str, str]]] = {}
        self._tree: dict[str, list[str]] | None = None
        self.ambiguous = 0

    def _listing(self, rel_dir: str) -> dict[str, dict[str, str]]:
        """stem → {lower-case extension → file name} of the video files in one folder."""
        if rel_dir not in self._lists:
            out: dict[str, dict[str, str]] = defaultdict(dict)
            try:
                with os.scandir(self.root / rel_dir if rel_dir else self.root) as it:
                    for e in it:
                        stem, ext = os.path.splitext(e.name)
                        if ext.lower() in VIDEO_EXTS and e.is_file():
                            out[stem][ext.lower()] = e.name
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                pass
            self._lists[rel_dir] = out
        return self._lists[rel_dir]

    def _walk(self) -> dict[str, list[str]]:
        """stem → relative paths of every video file in the tree (built once, on the first miss)."""
        if self._tree is None:
            tree: dict[str, list[str]] = defaultdict(list)
            seen: set[str] = set()
            for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
                rel = os.path.relpath(dirpath, self.root)
                depth = 0 if rel == "." else rel.count(os.sep) + 1
                real = os.path.realpath(dirpath)
                if real in seen:  # a symlink loop
                    dirnames[:] = []
                    continue
                seen.add(real)
                dirnames[:] = sorted(d for d in dirnames if d not in self.PRUNE and not d.startswith(".")
                                     and depth < self.MAX_DEPTH)
                for f in filenames:
                    stem, ext = os.path.splitext(f)
                    if ext.lower() in VIDEO_EXTS:
                        tree[stem].append(f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}")
            self._tree = tree
        return self._tree

    def find(self, v: Video) -> str | None:
        for cand in v.candidates:
            rel_dir, _, stem = cand.rpartition("/")
            by_ext = self._listing(rel_dir).get(stem)
            if by_ext:
                prefs = [e.lower() for e in v.exts] + sorted(by_ext)
                name = by_ext[next(e for e in prefs if e in by_ext)]
                return f"{rel_dir}/{name}" if rel_dir else name
        tree = self._walk()
        hits = sorted({p for stem in v.stems for p in tree.get(stem, ())})
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            self.ambiguous += 1
        return None


# ============================================================================ the conversion context

@dataclass
class Context:
    """State shared by a converter run: where to look, what was read, what was skipped."""
    benchmark: str
    ann: Path
    split: str | None
    observation_sec: float
    anticipation_sec: float
    file: Path | None = None  # --annotations named a file (COIN.json) rather than a folder
    rows: list[dict] = field(default_factory=list)
    videos: dict[str, Video] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    extras: tuple[str, ...] = ()  # the benchmark's own columns, after CORE_COLUMNS

    def folder(self, dataset: str, probe: Iterable[str]) -> Path:
        """The folder holding the dataset's annotation files: ``ann`` itself, its ``annotation/``
        folder, or ``<dataset>/annotation/`` below it (the first holding any of ``probe``)."""
        probe = list(probe)
        names = DATASET_FOLDERS.get(dataset, (dataset,))
        subs = ["", "annotation", "annotations"] + [f"{n}/{a}" for n in names for a in ("annotation", "annotations")]
        for sub in subs + list(names):
            d = self.ann / sub if sub else self.ann
            if any((d / p).is_file() for p in probe):
                return d
        return self.ann

    def split_files(self, dataset: str, names: dict[str, str]) -> list[tuple[str, Path]]:
        """(split, file) of the wanted split(s) that are present; a missing wanted split is an error."""
        d = self.folder(dataset, names.values())
        present = [(s, d / n) for s, n in names.items() if (d / n).is_file()]
        if self.split:
            if self.split not in names:
                raise ConversionError(d, f"{self.benchmark} has no {self.split!r} split; its splits are "
                                         f"{', '.join(names)}")
            if not (d / names[self.split]).is_file():
                have = ", ".join(f"{s} ({p.name})" for s, p in present) or "none"
                raise ConversionError(d, f"no {self.split} annotations for {self.benchmark}: "
                                         f"{names[self.split]} is not in {d} (splits found: {have})")
            present = [(s, p) for s, p in present if s == self.split]
        if not present:
            raise ConversionError(d, f"no {self.benchmark} annotation file found: looked for "
                                     f"{', '.join(names.values())} in {self.ann} and its annotation folders")
        self.sources += [p for _, p in present]
        return present

    def video(self, vid: str, candidates: Iterable[str], exts: tuple[str, ...], stems: Iterable[str] = ()) -> str:
        """Declares how video ``vid`` is named: ``candidates`` (paths without extension, the first
        the documented layout), ``exts`` (preferred first), ``stems`` (its file name anywhere)."""
        if vid not in self.videos:
            self.videos[vid] = Video(vid, tuple(dict.fromkeys(candidates)), exts, tuple(stems) or (vid,))
        return vid

    def add(self, *, sample_id: str, task: str, split: str, video: str, answer: str, start=None, end=None,
            question: str = "", references: list[str] | None = None, duration=None, source: str = "", **extra):
        """One manifest row; ``extra`` fills the benchmark's own columns (``extras``)."""
        self.rows.append({"sample_id": sample_id, "benchmark": self.benchmark, "task": task, "split": split,
                          "_video": video, "start_sec": seconds(start), "end_sec": seconds(end),
                          "question": question, "answer": answer,
                          "references": json.dumps(references, ensure_ascii=False) if references else "",
                          "video_duration": seconds(duration), "_source": source,
                          **{k: "" if v is None else str(v) for k, v in extra.items()}})


# ============================================================================ writing

def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, through the storage layer."""
    storage.write_text(path, text, encoding="utf-8")
