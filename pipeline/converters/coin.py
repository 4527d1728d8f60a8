"""COIN (180 classes): the official ``COIN.json`` of the COIN project page (coin-dataset.github.io).

Files: one ``COIN.json`` (or ``coin.json``): ``database`` → YouTube id → ``class``,
``subset``, ``recipe_type``, ``duration``, step ``annotation`` … (``--annotations`` may
name the file itself).

Rows: one per video of the wanted ``subset`` (training → train, testing → test); the label
is the ``class`` name split into words and normalised (``MakeSandwich`` → ``make sandwich``:
the reference reads a pre-processed lower-case ``target`` that it does not publish). The two
videos the reference skips (:data:`COIN_EXCLUDED`) are skipped and counted. Videos:
``{id}.mp4``, or ``{recipe_type}/{id}.mp4``.

Columns: ``video_id``, ``class_name`` (as published), ``class_id`` (``recipe_type``).
(The manifest contract: README, *Architecture* → *Data contracts*; manifests/README.md.)
"""
from __future__ import annotations

import re

from pipeline.converters.core import SKIP_REFERENCE, ConversionError, Context, Entry, entries, read_json, type_name
from pipeline.metrics import normalize

FILE_NAMES = ("COIN.json", "coin.json")
COIN_SUBSETS = {"training": "train", "train": "train", "testing": "test", "test": "test",
                "validation": "val", "val": "val"}
COIN_COLUMNS = ("video_id", "class_name", "class_id")
# Videos the reference implementation leaves out of its dataset (hard-coded there).
COIN_EXCLUDED = ("AfiVmAjfTNs", "cjwtcDKTQM8")


def split_camel(name: str) -> str:
    """COIN class names: ``MakeRJ45Cable`` → ``Make RJ45 Cable``, ``ReplaceCDDrive`` → ``Replace CD Drive``."""
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)
    name = re.sub(r"(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
    return name.replace("_", " ")


def coin(ctx: Context) -> None:
    """COIN.json → one row per video of the wanted subset (the rules: this module's docstring)."""
    ctx.extras = COIN_COLUMNS
    if ctx.file is not None:
        path = ctx.file
    else:
        d = ctx.folder("coin", list(FILE_NAMES))
        path = d / "COIN.json" if (d / "COIN.json").is_file() else d / "coin.json"
    if not path.is_file():
        raise ConversionError(ctx.ann, "no COIN annotation file found: looked for COIN.json (the official "
                                       "annotation) in the folder and its annotation folders")
    ctx.sources.append(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("database"), dict):
        raise ConversionError(path, "expected an object with a 'database' object (video id → entry), as in the "
                                    f"official COIN.json; got {type_name(data)}"
                              + (f" with keys {', '.join(map(repr, list(data)[:5]))}" if isinstance(data, dict)
                                 else ""))
    for label, vid, entry in entries(path, data["database"], "video"):
        e = Entry(path, f"database[{label}]", entry)
        subset = e.text("subset")
        split = COIN_SUBSETS.get(subset.lower())
        if split is None:
            e.fail(f"unknown 'subset' {subset!r}; expected training or testing")
        cls = e.text("class")
        class_id = e.integer("recipe_type")
        duration = e.number("duration", required=False)
        if "annotation" in entry and not isinstance(entry["annotation"], list):
            e.fail(f"'annotation' must be a list of step segments, got {type_name(entry['annotation'])}")
        if ctx.split and split != ctx.split:
            continue
        if vid in COIN_EXCLUDED:
            ctx.skipped[SKIP_REFERENCE] += 1
            continue
        target = normalize(split_camel(cls))
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
