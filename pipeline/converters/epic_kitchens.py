"""EPIC-Kitchens-100 action anticipation (tasks verb / noun / action): the official CSVs of
github.com/epic-kitchens/epic-kitchens-100-annotations.

Files: ``EPIC_100_train.csv`` / ``EPIC_100_validation.csv`` (one line per narration:
:data:`EK100_COLUMNS`), ``EPIC_100_verb_classes.csv`` / ``EPIC_100_noun_classes.csv`` (``id``,
``key``), ``EPIC_100_video_info.csv`` (durations, optional) and the official evaluation
subsets (:data:`EK100_SUBSET_FILES`, optional). Only train and val have public labels.

Rows: every narration id of the split is kept (the official evaluation scores all of them).
For each action an observation window ending τa = ``anticipation_sec`` (1 s) before the
action starts: ``end_sec = start - τa``, ``start_sec = max(0, end_sec - observation_sec)``.
An action starting within τa of the video start (``end_sec`` under 1 ms) has nothing to
observe before it: its window is clamped to the video's first frame, ``[0, 0.001]`` (a clip
shorter than a frame samples the frame at its start), and its rows say
``observation_clamped = true``. Three rows per action (tasks verb, noun, action; answer =
the verb class name, the noun class name, ``"verb noun"``, each processed as the reference
processes classification labels, :func:`pipeline.metrics.pre_caption`: ``board:chopping`` →
``board chopping``). The EK100 protocol fixes τa only; the observed length is the method's
choice and MA-LMM's released code has no EK100 loader, so ``observation_sec`` defaults to
16 s (the registry's 32 uniform frames → 2 frames per second).

Columns (:data:`EK100_OUTPUT_COLUMNS`): the class keys as published in ``verb`` / ``noun``;
class ids in ``verb_class``, ``noun_class`` and ``action_class`` (``"{verb_class}_{noun_class}"``);
``unseen_participant`` = the participant is in
``EPIC_100_unseen_participant_ids_validation.csv``; ``tail_class`` = the row's class is a
tail class (verb: ``verb_class`` in ``EPIC_100_tail_verbs.csv``; noun: ``noun_class`` in
``EPIC_100_tail_nouns.csv``; action: either, as the official evaluation defines tail
actions). Values ``true`` / ``false``; empty when the list is not there (a note says so, and
`report` then leaves those recalls out). `infer` carries both columns into the predictions.
(The manifest contract: README, *Architecture* → *Data contracts*; manifests/README.md.)
"""
from __future__ import annotations

import re
from pathlib import Path

from pipeline.benchmarks import EK100_TASKS
from pipeline.converters.core import ConversionError, Context, read_csv, seconds
from pipeline.metrics import pre_caption

DATASET = "epic-kitchens-100"
EK100_FILES = {"train": "EPIC_100_train.csv", "val": "EPIC_100_validation.csv"}
CLASS_FILES = {"verbs": "EPIC_100_verb_classes.csv", "nouns": "EPIC_100_noun_classes.csv"}
VIDEO_INFO = "EPIC_100_video_info.csv"
EK100_SUBSET_FILES = {"unseen": ("EPIC_100_unseen_participant_ids_validation.csv", "participant_id"),
                      "tail_verbs": ("EPIC_100_tail_verbs.csv", "verb"),
                      "tail_nouns": ("EPIC_100_tail_nouns.csv", "noun")}
EK100_COLUMNS = ("narration_id", "participant_id", "video_id", "start_timestamp", "stop_timestamp", "verb_class",
                 "noun_class")  # required in the split CSVs (narration, verb and noun are read when present)
EK100_OUTPUT_COLUMNS = ("video_id", "participant_id", "narration_id", "action_start_sec", "action_end_sec",
                        "narration", "verb", "noun", "verb_class", "noun_class", "action_class", "narration_verb",
                        "narration_noun", "observation_clamped", "unseen_participant", "tail_class")
DEFAULT_OBSERVATION_SEC = 16.0
DEFAULT_ANTICIPATION_SEC = 1.0
FIRST_FRAME_END_SEC = 0.001  # the clamped EK100 window [0, 0.001]: the video's first frame only
_TS = re.compile(r"^(\d+):(\d{1,2}):(\d{1,2}(?:\.\d+)?)$")


# ============================================================================ the class lists and subsets

def classes(path: Path) -> dict[int, str]:
    """class id → key of ``EPIC_100_{verb,noun}_classes.csv``."""
    out = {}
    for line, row in read_csv(path, ("id", "key")):
        try:
            i = int(row["id"])
        except ValueError:
            raise ConversionError(path, f"'id' must be an integer, got {row['id']!r}", f"line {line}") from None
        if not row["key"]:
            raise ConversionError(path, "empty class name in 'key'", f"line {line}")
        out[i] = row["key"]
    return out


def processed_names(path: Path, classes: dict[int, str]) -> dict[int, str]:
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


def id_list(path: Path, column: str, integers: bool) -> set:
    """The values of an official one-column list (participant ids, or class ids)."""
    out = set()
    for line, row in read_csv(path, (column,)):
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


def timestamp(value: str) -> float:
    """``HH:MM:SS.ff`` (or plain seconds) → seconds; ValueError otherwise."""
    m = _TS.match(value)
    if m:
        return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    return float(value)


def flag(value: bool | None) -> str:
    return "" if value is None else ("true" if value else "false")


# ============================================================================ the converter

def ek100(ctx: Context) -> None:
    """The split CSVs → three rows per narration (the rules: this module's docstring)."""
    ctx.extras = EK100_OUTPUT_COLUMNS
    if ctx.split == "test":
        raise ConversionError(ctx.ann, "EPIC-Kitchens-100 test labels are not public (EPIC_100_test_timestamps.csv "
                                       "has no verb/noun); convert train and val, and evaluate on val")
    if ctx.observation_sec <= 0 or ctx.anticipation_sec < 0:
        raise ConversionError(None, f"observation_sec must be > 0 and anticipation_sec >= 0, got "
                                    f"{ctx.observation_sec} and {ctx.anticipation_sec}")
    names = {**EK100_FILES, **CLASS_FILES}
    d = ctx.folder(DATASET, names.values())
    for key in CLASS_FILES:
        if not (d / names[key]).is_file():
            raise ConversionError(d, f"{names[key]} is needed for the class names and is not in {d}")
    files = ctx.split_files(DATASET, EK100_FILES)
    verbs, nouns = classes(d / names["verbs"]), classes(d / names["nouns"])
    verb_names, noun_names = processed_names(d / names["verbs"], verbs), processed_names(d / names["nouns"], nouns)
    ctx.sources += [d / names["verbs"], d / names["nouns"]]

    durations: dict[str, float] = {}
    info = d / VIDEO_INFO
    if info.is_file():
        ctx.sources.append(info)
        for line, row in read_csv(info, ("video_id", "duration")):
            try:
                durations[row["video_id"]] = float(row["duration"])
            except ValueError:
                raise ConversionError(info, f"'duration' must be a number, got {row['duration']!r}",
                                      f"line {line}") from None

    # the official evaluation subsets (unseen participants, tail classes), when their lists are there
    lists: dict[str, set | None] = {}
    for key, (fname, column) in EK100_SUBSET_FILES.items():
        path = d / fname
        lists[key] = id_list(path, column, integers=key != "unseen") if path.is_file() else None
        if lists[key] is not None:
            ctx.sources.append(path)
    absent = [EK100_SUBSET_FILES[k][0] for k, v in lists.items() if v is None]
    if absent:
        ctx.notes.append(f"no {', '.join(absent)} in {d}: the unseen / tail subsets are left empty and report will "
                         "not give their recalls (copy the official lists there and convert again)")
    unseen, tail_verbs, tail_nouns = lists["unseen"], lists["tail_verbs"], lists["tail_nouns"]

    tau, obs = ctx.anticipation_sec, ctx.observation_sec
    ctx.notes.append(f"anticipation: observation window of {seconds(obs)} s ending τa = {seconds(tau)} s before "
                     "each action")
    clamped = 0
    for split, path in files:
        for line, row in read_csv(path, EK100_COLUMNS):
            where = f"line {line} (narration {row['narration_id']})"
            try:
                start, stop = timestamp(row["start_timestamp"]), timestamp(row["stop_timestamp"])
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
                        narration_id=row["narration_id"], action_start_sec=seconds(start),
                        action_end_sec=seconds(stop), narration=row.get("narration", ""), verb=verbs[vc],
                        noun=nouns[nc], verb_class=vc, noun_class=nc, action_class=f"{vc}_{nc}",
                        narration_verb=row.get("verb", ""), narration_noun=row.get("noun", ""),
                        observation_clamped=flag(is_clamped),
                        unseen_participant=flag(None if unseen is None else pid in unseen),
                        tail_class=flag(tail[task]))
    if clamped:
        ctx.notes.append(f"{clamped} action(s) start within τa = {seconds(tau)} s of their video's start: kept, with "
                         f"the observation clamped to the first frame [0, {seconds(FIRST_FRAME_END_SEC)}] "
                         "(observation_clamped = true)")
