"""Converters: the benchmarks' published annotation files → a manifest CSV (DESIGN §4).

``convert(benchmark, annotations_dir, videos_dir, split=None, out=None)`` reads the
annotation files of one benchmark, writes one manifest row per sample (validated with
:func:`pipeline.manifest.validate` before anything is written; temp file + rename) and
reports the videos it could not find under ``videos_dir`` (``<out>.missing.txt``). The
CLI's ``malmm-pipeline manifest BENCHMARK --annotations DIR --videos DIR`` calls it;
``malmm-pipeline extract --manifest OUT --video-root VIDEOS_DIR`` is the next step
(``video`` entries are relative to ``videos_dir`` unless ``absolute_paths=True``).

Inputs (``annotations_dir`` may be the benchmark's folder, its ``annotation/`` folder,
or a parent holding ``<dataset>/annotation/``):

============== =========================================================================
benchmark      files
============== =========================================================================
lvu            MA-LMM ``lvu/annotation/{train,val,test}.json``
breakfast      MA-LMM ``breakfast/annotation/{train,val,test}.json``
coin           the official ``COIN.json`` (``database`` → video id → {class, subset, …})
msrvtt-qa      MA-LMM ``msrvtt/annotation/qa_{train,val,test}.json`` (also msvd-qa,
               activitynet-qa with ``msvd/``, ``activitynet/``)
msrvtt-cap     MA-LMM ``msrvtt/annotation/cap_{split}.json`` (+ ``coco_gt/cap_{split}.json``
               for the references of evaluation splits); also msvd-cap, youcook2-cap
ek100          the official ``EPIC_100_{train,validation}.csv``,
               ``EPIC_100_{verb,noun}_classes.csv`` (+ ``EPIC_100_video_info.csv``)
============== =========================================================================

Conversion rules (where they depart from the MA-LMM reference, the reason is given):

* **LVU** – one row per (task, window): windows of ``window_sec`` (100 s) every
  ``stride_sec`` (20 s) from :func:`pipeline.sampling.lvu_window_starts` on the
  annotation's ``duration`` (the reference's ``range(stride, duration - history + 1,
  stride)`` plus the window at 0); ``end_sec = min(start + 100, duration)``. The label is
  the value of the task's key, normalised as the reference's text processor does
  (:func:`pipeline.metrics.normalize`); ``{task}_answer`` (the multiple-choice letter) is
  kept in ``choice``. ``sample_id = {video}_{start}_{task}`` (the reference's
  ``{video}_{start}`` is in ``window_id``; a movie can be labelled for several tasks, in
  different splits).
* **Breakfast** – one row per video, label ``class_name``; the three videos the reference
  skips (``P28-cam01-P28_cereals``, ``P27-stereo-P27_milk_ch0``, ``P28-cam02-P28_cereals``)
  are skipped and counted.
* **COIN** – one row per video of the wanted ``subset`` (training → train, testing →
  test); the label is the ``class`` name split into words and normalised
  (``MakeSandwich`` → ``make sandwich``: the reference reads a pre-processed lower-case
  ``target`` that it does not publish). The two videos the reference skips are skipped.
* **QA** – one row per question; question and answer verbatim from the file (answers as
  strings); ``sample_id = {split}_{question_id}`` (question ids restart in every split
  file).
* **Captions** – train: one row per caption (target normalised as the reference's
  ``pre_caption``), ``sample_id = {key}#{caption id}``. Evaluation splits: one row per
  video (YouCook2: per segment) whose ``answer`` is its first reference and whose
  ``references`` is the JSON list of all of them, taken from ``coco_gt/cap_{split}.json``
  (what the reference scores against) when present, else grouped from ``cap_{split}.json``.
  YouCook2 rows carry the segment bounds, clipped to ``[0, duration]``.
* **EPIC-Kitchens-100 anticipation** – every narration id of the split is kept (the
  official evaluation scores all of them). For each action segment an observation window
  ending τa = ``anticipation_sec`` (1 s) before the action starts: ``end_sec = start - τa``,
  ``start_sec = max(0, end_sec - observation_sec)``. An action starting within τa of the
  video start (``end_sec`` under 1 ms) has nothing to observe before it: its window is
  clamped to the video's first frame, ``[0, 0.001]`` (a clip shorter than a frame samples
  the frame at its start), and its rows say ``observation_clamped = true``. Three rows per
  action (tasks verb, noun, action; answer = the verb class name, the noun class name,
  ``"verb noun"``, each processed as the reference processes classification labels,
  :func:`pipeline.metrics.pre_caption`: ``board:chopping`` → ``board chopping``; the class
  keys as published are in ``verb`` / ``noun``); class ids are kept in ``verb_class``,
  ``noun_class`` and ``action_class`` (``"{verb_class}_{noun_class}"``). The evaluation
  subsets come from the official lists beside the CSVs: ``unseen_participant`` = the
  participant is in ``EPIC_100_unseen_participant_ids_validation.csv``; ``tail_class`` = the
  row's class is a tail class (verb: ``verb_class`` in ``EPIC_100_tail_verbs.csv``; noun: ``noun_class`` in
  ``EPIC_100_tail_nouns.csv``; action: either, as the official evaluation defines tail
  actions). Values ``true`` / ``false``; empty when the list is not there (a note says so,
  and `report` then leaves those recalls out). `infer` carries both columns into the
  predictions. The EK100 protocol fixes τa only; the observed length is the method's choice and
  MA-LMM's released code has no EK100 loader, so ``observation_sec`` defaults to 16 s
  (the registry's 32 uniform frames → 2 frames per second). Only train and val have
  public labels.

Video files are looked up under ``videos_dir`` by the reference's naming (``{id}.mp4`` …,
see ``_naming``), any common video extension, and by a unique file name anywhere in the
tree (e.g. YouCook2's ``raw_videos/validation/113/{id}.mkv``); a video not found keeps its
documented path in the manifest and is listed in ``<out>.missing.txt``.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from pipeline.benchmarks import BENCHMARKS, EK100_TASKS, LVU_TASKS, SPLITS, protocol
from pipeline.manifest import is_uri, validate
from pipeline.metrics import normalize, pre_caption
from pipeline.sampling import lvu_window_starts

CORE_COLUMNS = ("sample_id", "benchmark", "task", "split", "video", "start_sec", "end_sec", "question", "answer",
                "references", "video_duration")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".wmv", ".3gp", ".ts")
MISSING_SHOWN = 5  # missing videos named in the summary
DEFAULT_OBSERVATION_SEC = 16.0
DEFAULT_ANTICIPATION_SEC = 1.0
FIRST_FRAME_END_SEC = 0.001  # the clamped EK100 window [0, 0.001]: the video's first frame only

# Videos the reference implementation leaves out of its datasets (hard-coded there).
BREAKFAST_EXCLUDED = ("P28-cam01-P28_cereals", "P27-stereo-P27_milk_ch0", "P28-cam02-P28_cereals")
COIN_EXCLUDED = ("AfiVmAjfTNs", "cjwtcDKTQM8")
SKIP_REFERENCE = "left out by the reference implementation"


# Folder names a dataset's annotations are found under (below --annotations).
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


# ============================================================================ reading helpers

def _tname(v: Any) -> str:
    return "null" if v is None else {dict: "object", list: "list", str: "string", bool: "boolean"}.get(
        type(v), type(v).__name__)


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConversionError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConversionError(path, f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None


def _records(path: Path, data: Any, what: str) -> list[tuple[str, str, dict]]:
    """(entry label, key, entry) of a JSON object of entries (or a list of entries)."""
    if isinstance(data, dict):
        items = [(repr(k), str(k), v) for k, v in data.items()]
    elif isinstance(data, list):
        items = [(f"[{i}]", str(i), v) for i, v in enumerate(data)]
    else:
        raise ConversionError(path, f"expected a JSON object of {what} entries, got {_tname(data)}")
    for label, _, v in items:
        if not isinstance(v, dict):
            raise ConversionError(path, f"expected an object, got {_tname(v)}", label)
    return items


class _Entry:
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
        self.fail(f"{key!r} must be a string, got {_tname(v)} {v!r}"[:200])

    def number(self, key: str, *, required: bool = True, positive: bool = False) -> float | None:
        v = self._get(key, required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(f"{key!r} must be a number, got {_tname(v)} {v!r}"[:200])
        if v < 0 or (positive and v == 0):
            self.fail(f"{key!r} must be {'positive' if positive else 'non-negative'}, got {v!r}")
        return float(v)

    def integer(self, key: str, *, required: bool = False) -> int | None:
        v = self._get(key, required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(f"{key!r} must be an integer, got {_tname(v)} {v!r}"[:200])
        return v


def _num(x: float | int | None) -> str:
    """Seconds as written in the manifest: integers plain, others to the millisecond."""
    if x is None:
        return ""
    x = round(float(x), 3)
    return str(int(x)) if x == int(x) else f"{x:.3f}".rstrip("0")


def _split_camel(name: str) -> str:
    """COIN class names: ``MakeRJ45Cable`` → ``Make RJ45 Cable``, ``ReplaceCDDrive`` → ``Replace CD Drive``."""
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)
    name = re.sub(r"(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
    return name.replace("_", " ")


# ============================================================================ videos

@dataclass(frozen=True)
class _Video:
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


class _VideoFinder:
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

    def find(self, v: _Video) -> str | None:
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
class _Ctx:
    """State shared by a converter run: where to look, what was read, what was skipped."""
    benchmark: str
    ann: Path
    split: str | None
    observation_sec: float
    anticipation_sec: float
    file: Path | None = None  # --annotations named a file (COIN.json) rather than a folder
    rows: list[dict] = field(default_factory=list)
    videos: dict[str, _Video] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    extras: tuple[str, ...] = ()

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
        if vid not in self.videos:
            self.videos[vid] = _Video(vid, tuple(dict.fromkeys(candidates)), exts, tuple(stems) or (vid,))
        return vid

    def add(self, *, sample_id: str, task: str, split: str, video: str, answer: str, start=None, end=None,
            question: str = "", references: list[str] | None = None, duration=None, source: str = "", **extra):
        self.rows.append({"sample_id": sample_id, "benchmark": self.benchmark, "task": task, "split": split,
                          "_video": video, "start_sec": _num(start), "end_sec": _num(end), "question": question,
                          "answer": answer,
                          "references": json.dumps(references, ensure_ascii=False) if references else "",
                          "video_duration": _num(duration), "_source": source,
                          **{k: "" if v is None else str(v) for k, v in extra.items()}})


# ============================================================================ classification

def _lvu(ctx: _Ctx) -> None:
    ctx.extras = ("video_id", "window_id", "choice")
    files = ctx.split_files("lvu", {"train": "train.json", "val": "val.json", "test": "test.json"})
    for split, path in files:
        for label, vid, data in _records(path, _read_json(path), "video"):
            e = _Entry(path, label, data)
            duration = e.number("duration", positive=True)
            tasks = [t for t in LVU_TASKS if t in data]
            if not tasks:
                ctx.skipped["entry without an LVU task label"] += 1
                continue
            ctx.video(vid, [vid], (".mp4", ".mkv", ".webm"))
            for task in tasks:
                target = normalize(e.text(task, numbers=True))
                choice = e.text(f"{task}_answer", required=False)
                if not target:
                    ctx.skipped["empty label"] += 1
                    continue
                proto = protocol("lvu", task)
                for start in lvu_window_starts(duration, proto.window_sec, proto.stride_sec):
                    end = min(start + proto.window_sec, duration)
                    ctx.add(sample_id=f"{vid}_{start}_{task}", task=task, split=split, video=vid, answer=target,
                            start=start, end=end, duration=duration, source=f"{path}, entry {label}",
                            video_id=vid, window_id=f"{vid}_{start}", choice=choice)


def _breakfast(ctx: _Ctx) -> None:
    ctx.extras = ("video_id", "class_label")
    files = ctx.split_files("breakfast", {"train": "train.json", "val": "val.json", "test": "test.json"})
    for split, path in files:
        for label, vid, data in _records(path, _read_json(path), "video"):
            e = _Entry(path, label, data)
            name = e.text("class_name")
            duration = e.number("duration", required=False)
            class_label = e.integer("class_label")
            if vid in BREAKFAST_EXCLUDED:
                ctx.skipped[SKIP_REFERENCE] += 1
                continue
            target = normalize(name)
            if not target:
                ctx.skipped["empty label"] += 1
                continue
            parts = vid.split("-", 2)  # P03-cam01-P03_cereals ↔ the official P03/cam01/P03_cereals.avi
            nested = ["/".join(parts)] if len(parts) == 3 and all(parts) else []
            ctx.video(vid, nested + [vid], (".avi", ".mp4", ".mkv"))
            ctx.add(sample_id=vid, task="", split=split, video=vid, answer=target, duration=duration,
                    source=f"{path}, entry {label}", video_id=vid, class_label=class_label)


COIN_SUBSETS = {"training": "train", "train": "train", "testing": "test", "test": "test",
                "validation": "val", "val": "val"}


def _coin(ctx: _Ctx) -> None:
    ctx.extras = ("video_id", "class_name", "class_id")
    if ctx.file is not None:
        path = ctx.file
    else:
        d = ctx.folder("coin", ["COIN.json", "coin.json"])
        path = d / "COIN.json" if (d / "COIN.json").is_file() else d / "coin.json"
    if not path.is_file():
        raise ConversionError(ctx.ann, "no COIN annotation file found: looked for COIN.json (the official "
                                       "annotation) in the folder and its annotation folders")
    ctx.sources.append(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("database"), dict):
        raise ConversionError(path, "expected an object with a 'database' object (video id → entry), as in the "
                                    f"official COIN.json; got {_tname(data)}"
                              + (f" with keys {', '.join(map(repr, list(data)[:5]))}" if isinstance(data, dict)
                                 else ""))
    for label, vid, entry in _records(path, data["database"], "video"):
        e = _Entry(path, f"database[{label}]", entry)
        subset = e.text("subset")
        split = COIN_SUBSETS.get(subset.lower())
        if split is None:
            e.fail(f"unknown 'subset' {subset!r}; expected training or testing")
        cls = e.text("class")
        class_id = e.integer("recipe_type")
        duration = e.number("duration", required=False)
        if "annotation" in entry and not isinstance(entry["annotation"], list):
            e.fail(f"'annotation' must be a list of step segments, got {_tname(entry['annotation'])}")
        if ctx.split and split != ctx.split:
            continue
        if vid in COIN_EXCLUDED:
            ctx.skipped[SKIP_REFERENCE] += 1
            continue
        target = normalize(_split_camel(cls))
        if not target:
            ctx.skipped["empty label"] += 1
            continue
        cands = [vid] + ([f"{class_id}/{vid}"] if class_id is not None else [])
        ctx.video(vid, cands, (".mp4", ".mkv", ".webm"))
        ctx.add(sample_id=vid, task="", split=split, video=vid, answer=target, duration=duration,
                source=f"{path}, entry database[{label}]", video_id=vid, class_name=cls, class_id=class_id)
    if not ctx.rows and ctx.split:
        raise ConversionError(path, f"no video of subset {ctx.split!r} "
                                    f"({'/'.join(k for k, v in COIN_SUBSETS.items() if v == ctx.split)})")


# ============================================================================ QA

_QA = {"msrvtt-qa": ("msrvtt", (".mp4",), ("{v}",)),
       "msvd-qa": ("msvd", (".avi", ".mp4"), ("{v}",)),
       "activitynet-qa": ("activitynet", (".mp4", ".mkv", ".webm"), ("{v}", "v_{v}"))}


def _qa(ctx: _Ctx) -> None:
    dataset, exts, templates = _QA[ctx.benchmark]
    ctx.extras = ("video_id", "question_id", "answer_type")
    files = ctx.split_files(dataset, {s: f"qa_{s}.json" for s in SPLITS})
    for split, path in files:
        for label, key, data in _records(path, _read_json(path), "question"):
            e = _Entry(path, label, data)
            question = e.text("question")
            answer = e.text("answer", numbers=True)
            vid = e.text("video", numbers=True)
            qid = e.text("question_id", required=False, numbers=True) or key
            answer_type = e.text("answer_type", required=False, numbers=True)
            if not vid:
                e.fail("empty 'video'")
            if not question or not answer:
                ctx.skipped["empty question or answer"] += 1
                continue
            ctx.video(vid, [t.format(v=vid) for t in templates], exts, stems=[t.format(v=vid) for t in templates])
            ctx.add(sample_id=f"{split}_{qid}", task="", split=split, video=vid, answer=answer, question=question,
                    source=f"{path}, entry {label}", video_id=vid, question_id=qid, answer_type=answer_type)


# ============================================================================ captions

_CAP = {"msrvtt-cap": ("msrvtt", (".mp4",)),
        "msvd-cap": ("msvd", (".avi", ".mp4")),
        "youcook2-cap": ("youcook2", (".mp4", ".mkv", ".webm"))}


def _coco_references(path: Path) -> dict[str, list[str]]:
    """image_id → captions (in file order) of a COCO-style ground-truth file."""
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ConversionError(path, "expected a COCO caption ground truth: an object with an 'annotations' list")
    refs: dict[str, list[str]] = defaultdict(list)
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise ConversionError(path, f"expected an object, got {_tname(a)}", f"annotations[{i}]")
        e = _Entry(path, f"annotations[{i}]", a)
        image_id = e.text("image_id", numbers=True)
        caption = e.text("caption")
        if caption:
            refs[image_id].append(caption)
    return refs


def _captions(ctx: _Ctx) -> None:
    dataset, exts = _CAP[ctx.benchmark]
    segments = ctx.benchmark == "youcook2-cap"
    ctx.extras = ("video_id",) + (("segment", "recipe") if segments else ()) + ("caption_id", "n_references")
    files = ctx.split_files(dataset, {s: f"cap_{s}.json" for s in SPLITS})
    for split, path in files:
        groups: dict[str, dict] = {}  # key (video or segment) → metadata + captions, in file order
        for label, key, data in _records(path, _read_json(path), "caption"):
            e = _Entry(path, label, data)
            caption = e.text("caption")
            vid = e.text("video", numbers=True)
            if not vid:
                e.fail("empty 'video'")
            cid = e.integer("id")
            meta = {"vid": vid, "source": f"{path}, entry {label}"}
            if segments:
                meta["segment"] = e.text("segment", required=False) or key
                meta["recipe"] = e.text("recipe", required=False)
                start, end = e.number("start_time"), e.number("end_time")
                duration = e.number("duration", required=False)
                meta["duration"] = duration
                meta["start"] = max(0.0, start)
                meta["end"] = min(end, duration) if duration is not None else end
            gkey = meta["segment"] if segments else vid
            g = groups.setdefault(gkey, {**meta, "captions": []})
            g["captions"].append((cid if cid is not None else key, caption))
        coco = path.parent / "coco_gt" / path.name
        refs = {}
        if split != "train" and coco.is_file():
            ctx.sources.append(coco)
            refs = _coco_references(coco)
            lacking = [k for k in groups if k not in refs]
            if lacking:
                ctx.notes.append(f"{len(lacking)} {split} videos have no references in {coco} "
                                 f"(e.g. {lacking[0]}); their captions in {path.name} are used")
        for gkey, g in groups.items():
            if segments and not g["end"] > g["start"]:
                ctx.skipped["empty segment (end <= start after clipping to the video)"] += len(g["captions"])
                continue
            ctx.video(g["vid"], [g["vid"]], exts)
            common = dict(task="", split=split, video=g["vid"], start=g.get("start"), end=g.get("end"),
                          duration=g.get("duration"), source=g["source"], video_id=g["vid"],
                          **({"segment": gkey, "recipe": g["recipe"]} if segments else {}))
            if split == "train":
                for cid, caption in g["captions"]:
                    target = normalize(caption)
                    if not target:
                        ctx.skipped["empty caption"] += 1
                        continue
                    ctx.add(sample_id=f"{gkey}#{cid}", answer=target, caption_id=cid, n_references=1, **common)
            else:
                references = [c for c in refs.get(gkey) or [c for _, c in g["captions"]] if c.strip()]
                if not references:
                    ctx.skipped["no non-empty reference caption"] += 1
                    continue
                ctx.add(sample_id=gkey, answer=references[0], references=references,
                        n_references=len(references), **common)


# ============================================================================ EPIC-Kitchens-100

EK100_FILES = {"train": "EPIC_100_train.csv", "val": "EPIC_100_validation.csv"}
EK100_COLUMNS = ("narration_id", "participant_id", "video_id", "start_timestamp", "stop_timestamp", "verb_class",
                 "noun_class")
_TS = re.compile(r"^(\d+):(\d{1,2}):(\d{1,2}(?:\.\d+)?)$")


def _read_csv(path: Path, required: Iterable[str]) -> list[tuple[int, dict]]:
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


def _classes(path: Path) -> dict[int, str]:
    out = {}
    for line, row in _read_csv(path, ("id", "key")):
        try:
            i = int(row["id"])
        except ValueError:
            raise ConversionError(path, f"'id' must be an integer, got {row['id']!r}", f"line {line}") from None
        if not row["key"]:
            raise ConversionError(path, "empty class name in 'key'", f"line {line}")
        out[i] = row["key"]
    return out


def _timestamp(value: str) -> float:
    m = _TS.match(value)
    if m:
        return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    return float(value)  # plain seconds; ValueError otherwise


EK100_SUBSET_FILES = {"unseen": ("EPIC_100_unseen_participant_ids_validation.csv", "participant_id"),
                      "tail_verbs": ("EPIC_100_tail_verbs.csv", "verb"),
                      "tail_nouns": ("EPIC_100_tail_nouns.csv", "noun")}


def _id_list(path: Path, column: str, integers: bool) -> set:
    """The values of an official one-column list (participant ids, or class ids)."""
    out = set()
    for line, row in _read_csv(path, (column,)):
        v = row[column]
        if not v:
            raise ConversionError(path, f"empty {column!r}", f"line {line}")
        if integers:
            try:
                v = int(v)
            except ValueError:
                raise ConversionError(path, f"{column!r} must be a class id (an integer), got {v!r}",
                                      f"line {line}") from None
        out.add(v)
    return out


def _processed_names(path: Path, classes: dict[int, str]) -> dict[int, str]:
    """Class names as answers: the key processed like the reference's labels; two keys that
    become the same answer are an error (their classes could not be told apart)."""
    out, seen = {}, {}
    for i, key in classes.items():
        name = pre_caption(key)
        if not name:
            raise ConversionError(path, f"class {i} ({key!r}) is empty once processed as a label")
        if name in seen:
            raise ConversionError(path, f"classes {seen[name]} ({classes[seen[name]]!r}) and {i} ({key!r}) both "
                                        f"become the answer {name!r}; their scores could not be told apart")
        seen[name] = i
        out[i] = name
    return out


def _flag(value: bool | None) -> str:
    return "" if value is None else ("true" if value else "false")


def _ek100(ctx: _Ctx) -> None:
    ctx.extras = ("video_id", "participant_id", "narration_id", "action_start_sec", "action_end_sec", "narration",
                  "verb", "noun", "verb_class", "noun_class", "action_class", "narration_verb", "narration_noun",
                  "observation_clamped", "unseen_participant", "tail_class")
    if ctx.split == "test":
        raise ConversionError(ctx.ann, "EPIC-Kitchens-100 test labels are not public (EPIC_100_test_timestamps.csv "
                                       "has no verb/noun); convert train and val, and evaluate on val")
    if ctx.observation_sec <= 0 or ctx.anticipation_sec < 0:
        raise ConversionError(None, f"observation_sec must be > 0 and anticipation_sec >= 0, got "
                                    f"{ctx.observation_sec} and {ctx.anticipation_sec}")
    names = {**EK100_FILES, "verbs": "EPIC_100_verb_classes.csv", "nouns": "EPIC_100_noun_classes.csv"}
    d = ctx.folder("epic-kitchens-100", names.values())
    for key in ("verbs", "nouns"):
        if not (d / names[key]).is_file():
            raise ConversionError(d, f"{names[key]} is needed for the class names and is not in {d}")
    files = ctx.split_files("epic-kitchens-100", EK100_FILES)
    verbs, nouns = _classes(d / names["verbs"]), _classes(d / names["nouns"])
    verb_names, noun_names = _processed_names(d / names["verbs"], verbs), _processed_names(d / names["nouns"], nouns)
    ctx.sources += [d / names["verbs"], d / names["nouns"]]
    durations: dict[str, float] = {}
    info = d / "EPIC_100_video_info.csv"
    if info.is_file():
        ctx.sources.append(info)
        for line, row in _read_csv(info, ("video_id", "duration")):
            try:
                durations[row["video_id"]] = float(row["duration"])
            except ValueError:
                raise ConversionError(info, f"'duration' must be a number, got {row['duration']!r}",
                                      f"line {line}") from None
    # the official evaluation subsets (unseen participants, tail classes), when their lists are there
    lists: dict[str, set | None] = {}
    for key, (fname, column) in EK100_SUBSET_FILES.items():
        path = d / fname
        lists[key] = _id_list(path, column, integers=key != "unseen") if path.is_file() else None
        if lists[key] is not None:
            ctx.sources.append(path)
    absent = [EK100_SUBSET_FILES[k][0] for k, v in lists.items() if v is None]
    if absent:
        ctx.notes.append(f"no {', '.join(absent)} in {d}: the unseen / tail subsets are left empty and report will "
                         "not give their recalls (copy the official lists there and convert again)")
    unseen, tail_verbs, tail_nouns = lists["unseen"], lists["tail_verbs"], lists["tail_nouns"]
    tau, obs = ctx.anticipation_sec, ctx.observation_sec
    ctx.notes.append(f"anticipation: observation window of {_num(obs)} s ending τa = {_num(tau)} s before each action")
    clamped = 0
    for split, path in files:
        for line, row in _read_csv(path, EK100_COLUMNS):
            where = f"line {line} (narration {row['narration_id']})"
            try:
                start, stop = _timestamp(row["start_timestamp"]), _timestamp(row["stop_timestamp"])
            except ValueError:
                raise ConversionError(path, f"bad timestamp {row['start_timestamp']!r} / {row['stop_timestamp']!r}; "
                                            "expected HH:MM:SS.ff", where) from None
            try:
                vc, nc = int(row["verb_class"]), int(row["noun_class"])
            except ValueError:
                raise ConversionError(path, f"verb_class / noun_class must be integers, got "
                                            f"{row['verb_class']!r} / {row['noun_class']!r}", where) from None
            if vc not in verbs or nc not in nouns:
                bad, listing = (f"verb_class {vc}", "verbs") if vc not in verbs else (f"noun_class {nc}", "nouns")
                raise ConversionError(path, f"{bad} is not in the class list ({names[listing]})", where)
            if not row["narration_id"] or not row["video_id"] or not row["participant_id"]:
                raise ConversionError(path, "empty narration_id, participant_id or video_id", where)
            end = start - tau
            is_clamped = round(end, 3) < FIRST_FRAME_END_SEC  # nothing (or under 1 ms) to observe before τa
            if is_clamped:
                begin, end = 0.0, FIRST_FRAME_END_SEC
                clamped += 1
            else:
                begin = max(0.0, end - obs)
            vid, pid = row["video_id"], row["participant_id"]
            ctx.video(vid, [f"{pid}/videos/{vid}", f"{pid}/{vid}", vid], (".MP4", ".mp4"))
            verb, noun = verb_names[vc], noun_names[nc]
            answers = {"verb": verb, "noun": noun, "action": f"{verb} {noun}"}
            tail_verb = None if tail_verbs is None else vc in tail_verbs
            tail_noun = None if tail_nouns is None else nc in tail_nouns
            tail = {"verb": tail_verb, "noun": tail_noun,
                    "action": None if tail_verb is None or tail_noun is None else tail_verb or tail_noun}
            for task in EK100_TASKS:
                ctx.add(sample_id=f"{row['narration_id']}_{task}", task=task, split=split, video=vid,
                        answer=answers[task], start=begin, end=end, duration=durations.get(vid),
                        source=f"{path}, {where}", video_id=vid, participant_id=pid,
                        narration_id=row["narration_id"], action_start_sec=_num(start), action_end_sec=_num(stop),
                        narration=row.get("narration", ""), verb=verbs[vc], noun=nouns[nc], verb_class=vc,
                        noun_class=nc, action_class=f"{vc}_{nc}", narration_verb=row.get("verb", ""),
                        narration_noun=row.get("noun", ""), observation_clamped=_flag(is_clamped),
                        unseen_participant=_flag(None if unseen is None else pid in unseen),
                        tail_class=_flag(tail[task]))
    if clamped:
        ctx.notes.append(f"{clamped} action(s) start within τa = {_num(tau)} s of their video's start: kept, with the "
                         f"observation clamped to the first frame [0, {_num(FIRST_FRAME_END_SEC)}] "
                         "(observation_clamped = true)")


CONVERTERS: dict[str, Callable[[_Ctx], None]] = {
    "lvu": _lvu, "breakfast": _breakfast, "coin": _coin,
    "msrvtt-qa": _qa, "msvd-qa": _qa, "activitynet-qa": _qa,
    "msrvtt-cap": _captions, "msvd-cap": _captions, "youcook2-cap": _captions,
    "ek100": _ek100,
}


# ============================================================================ convert

def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_unique(ctx: _Ctx) -> None:
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
    """Convert one benchmark's published annotations into a manifest (DESIGN §4).

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
    ctx = _Ctx(benchmark, ann, split, float(observation_sec), float(anticipation_sec), file=file)
    CONVERTERS[benchmark](ctx)
    if not ctx.rows:
        raise ConversionError(ctx.sources[0] if ctx.sources else ann,
                              f"no {benchmark} samples in the annotations"
                              + (f" (skipped: {dict(ctx.skipped)})" if ctx.skipped else ""))
    _check_unique(ctx)

    # videos: the documented path of each, or the file found under videos_dir
    vdir = None if videos_dir is None else str(videos_dir)
    paths: dict[str, str] = {}
    missing: list[_Video] = []
    if vdir is None or is_uri(vdir):
        for vid, v in ctx.videos.items():
            paths[vid] = v.expected if vdir is None or not absolute_paths else vdir.rstrip("/") + "/" + v.expected
    else:
        root = Path(vdir)
        if not root.is_dir():
            ctx.notes.append(f"the videos folder {root} does not exist: every video is reported missing")
        finder = _VideoFinder(root)
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
        _atomic_write(out_path, buf.getvalue())
        list_path = Path(str(out_path) + ".missing.txt")
        if missing:
            lines = [f"# {len(missing)} of {len(ctx.videos)} {benchmark} videos not found under {vdir}; "
                     "video id <TAB> expected path (relative to that folder)"]
            lines += [f"{v.vid}\t{v.expected}" for v in missing]
            _atomic_write(list_path, "\n".join(lines) + "\n")
            missing_list = list_path
        elif list_path.exists():  # a stale list from an earlier run
            list_path.unlink()
    return ConvertResult(benchmark=benchmark, out=out_path, rows=len(df), splits=splits, tasks=tasks,
                         videos=len(ctx.videos), videos_dir=vdir,
                         videos_checked=vdir is not None and not is_uri(vdir),
                         missing_videos=len(missing), missing_examples=[v.expected for v in missing[:MISSING_SHOWN]],
                         missing_list=missing_list, skipped=dict(ctx.skipped), sources=list(ctx.sources),
                         notes=ctx.notes, df=df)
