"""The MA-LMM reference's annotation JSON (GitHub ``boheumd/MA-LMM``, ``data/<dataset>/annotation/``):
LVU, Breakfast, the QA benchmarks (MSRVTT-QA, MSVD-QA, ActivityNet-QA) and the caption
benchmarks (MSRVTT, MSVD, YouCook2).

Each benchmark below declares its files, its rows and its own columns, then reads them
(the manifest contract: README, *Architecture* → *Data contracts*; the rules per benchmark:
manifests/README.md). Where a rule departs from the reference, the reason is given.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from pipeline.benchmarks import LVU_TASKS, SPLITS, protocol
from pipeline.converters.core import (SKIP_REFERENCE, ConversionError, Context, Entry, entries, read_json,
                                      type_name)
from pipeline.metrics import normalize
from pipeline.sampling import lvu_window_starts

SPLIT_FILES = {"train": "train.json", "val": "val.json", "test": "test.json"}


# ============================================================================ LVU

LVU_COLUMNS = ("video_id", "window_id", "choice")


def lvu(ctx: Context) -> None:
    """LVU, 7 tasks. Files: ``lvu/annotation/{train,val,test}.json``, one entry per movie
    (``duration``; for each task it is labelled for, ``{task}`` = label, ``{task}_answer`` = choice).

    Rows: one per (task, window): windows of ``window_sec`` (100 s) every ``stride_sec`` (20 s)
    from :func:`pipeline.sampling.lvu_window_starts` on the ``duration`` (the reference's
    ``range(stride, duration - history + 1, stride)`` plus the window at 0);
    ``end_sec = min(start + 100, duration)``. The label is the task's value normalised as the
    reference's text processor does (:func:`pipeline.metrics.normalize`).
    ``sample_id = {video}_{start}_{task}``: a movie can be labelled for several tasks, in
    different splits; the reference's ``{video}_{start}`` is ``window_id``.
    Columns: ``video_id``, ``window_id``, ``choice`` (the multiple-choice letter).
    """
    ctx.extras = LVU_COLUMNS
    for split, path in ctx.split_files("lvu", SPLIT_FILES):
        for label, vid, data in entries(path, read_json(path), "video"):
            e = Entry(path, label, data)
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


# ============================================================================ Breakfast

BREAKFAST_COLUMNS = ("video_id", "class_label")
# Videos the reference implementation leaves out of its dataset (hard-coded there).
BREAKFAST_EXCLUDED = ("P28-cam01-P28_cereals", "P27-stereo-P27_milk_ch0", "P28-cam02-P28_cereals")


def breakfast(ctx: Context) -> None:
    """Breakfast, 10 classes. Files: ``breakfast/annotation/{train,val,test}.json``, one entry per
    video (``class_name``, ``class_label``, ``duration``).

    Rows: one per video, label ``class_name``; the three videos the reference skips
    (:data:`BREAKFAST_EXCLUDED`) are skipped and counted. Videos: the official
    ``P03/cam01/P03_cereals.avi`` layout, or the reference's flat ``P03-cam01-P03_cereals``.
    Columns: ``video_id``, ``class_label``.
    """
    ctx.extras = BREAKFAST_COLUMNS
    for split, path in ctx.split_files("breakfast", SPLIT_FILES):
        for label, vid, data in entries(path, read_json(path), "video"):
            e = Entry(path, label, data)
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


# ============================================================================ QA

class Dataset(NamedTuple):
    """Where a benchmark's files are (``<folder>/annotation/``) and how its videos are named."""
    folder: str
    exts: tuple[str, ...]  # video extensions, preferred first
    names: tuple[str, ...] = ("{v}",)  # video file names without extension ({v}: the annotation's video id)


QA = {"msrvtt-qa": Dataset("msrvtt", (".mp4",)),
      "msvd-qa": Dataset("msvd", (".avi", ".mp4")),
      "activitynet-qa": Dataset("activitynet", (".mp4", ".mkv", ".webm"), ("{v}", "v_{v}"))}
QA_COLUMNS = ("video_id", "question_id", "answer_type")


def qa(ctx: Context) -> None:
    """MSRVTT-QA, MSVD-QA, ActivityNet-QA. Files: ``<folder>/annotation/qa_{train,val,test}.json``,
    one entry per question (``question``, ``answer``, ``video``, ``question_id``, ``answer_type``).

    Rows: one per question; question and answer verbatim (answers as strings);
    ``sample_id = {split}_{question_id}`` (question ids restart in every split file).
    Columns: ``video_id``, ``question_id``, ``answer_type``.
    """
    ds = QA[ctx.benchmark]
    ctx.extras = QA_COLUMNS
    for split, path in ctx.split_files(ds.folder, {s: f"qa_{s}.json" for s in SPLITS}):
        for label, key, data in entries(path, read_json(path), "question"):
            e = Entry(path, label, data)
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
            names = [t.format(v=vid) for t in ds.names]
            ctx.video(vid, names, ds.exts, stems=names)
            ctx.add(sample_id=f"{split}_{qid}", task="", split=split, video=vid, answer=answer, question=question,
                    source=f"{path}, entry {label}", video_id=vid, question_id=qid, answer_type=answer_type)


# ============================================================================ captions

CAPTIONS = {"msrvtt-cap": Dataset("msrvtt", (".mp4",)),
            "msvd-cap": Dataset("msvd", (".avi", ".mp4")),
            "youcook2-cap": Dataset("youcook2", (".mp4", ".mkv", ".webm"))}
SEGMENTED = ("youcook2-cap",)  # one sample per captioned segment rather than per video
CAPTION_COLUMNS = ("video_id", "caption_id", "n_references")
SEGMENT_COLUMNS = ("video_id", "segment", "recipe", "caption_id", "n_references")


def coco_references(path: Path) -> dict[str, list[str]]:
    """image_id → captions (in file order) of a COCO-style ground-truth file."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ConversionError(path, "expected a COCO caption ground truth: an object with an 'annotations' list")
    refs: dict[str, list[str]] = defaultdict(list)
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise ConversionError(path, f"expected an object, got {type_name(a)}", f"annotations[{i}]")
        e = Entry(path, f"annotations[{i}]", a)
        image_id = e.text("image_id", numbers=True)
        caption = e.text("caption")
        if caption:
            refs[image_id].append(caption)
    return refs


def captions(ctx: Context) -> None:
    """MSRVTT, MSVD, YouCook2 captions. Files: ``<folder>/annotation/cap_{train,val,test}.json``,
    one entry per caption (``caption``, ``video``, ``id``; YouCook2 also ``segment``, ``recipe``,
    ``start_time``, ``end_time``, ``duration``), and ``coco_gt/cap_{split}.json`` (what the
    reference scores against) for the references of evaluation splits.

    Rows: train – one per caption (target normalised as the reference's ``pre_caption``),
    ``sample_id = {key}#{caption id}``. Evaluation splits – one per video (YouCook2: per
    segment) whose ``answer`` is its first reference and whose ``references`` is the JSON
    list of all of them, from ``coco_gt/`` when present, else grouped from ``cap_{split}.json``.
    YouCook2 rows carry the segment bounds, clipped to ``[0, duration]``.
    Columns: ``video_id``, (YouCook2: ``segment``, ``recipe``), ``caption_id``, ``n_references``.
    """
    ds = CAPTIONS[ctx.benchmark]
    segments = ctx.benchmark in SEGMENTED
    ctx.extras = SEGMENT_COLUMNS if segments else CAPTION_COLUMNS
    for split, path in ctx.split_files(ds.folder, {s: f"cap_{s}.json" for s in SPLITS}):
        groups: dict[str, dict] = {}  # key (video or segment) → metadata + captions, in file order
        for label, key, data in entries(path, read_json(path), "caption"):
            e = Entry(path, label, data)
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
            refs = coco_references(coco)
            lacking = [k for k in groups if k not in refs]
            if lacking:
                ctx.notes.append(f"{len(lacking)} {split} videos have no references in {coco} "
                                 f"(e.g. {lacking[0]}); their captions in {path.name} are used")
        for gkey, g in groups.items():
            if segments and not g["end"] > g["start"]:
                ctx.skipped["empty segment (end <= start after clipping to the video)"] += len(g["captions"])
                continue
            ctx.video(g["vid"], [g["vid"]], ds.exts)
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
