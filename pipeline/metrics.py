"""Scoring exact to the reference protocols (README, "Architecture"), with clustered bootstrap CIs.

Everything here is selected by name from the benchmark registry: a protocol's
``answer_rule`` field names its *comparison* (``exact``, ``first_word``, ``whole``,
``caption``), each of its ``metrics`` an entry of :data:`METRICS`; the *answer rule*
(:data:`ANSWER_RULES`: ``reference``, the default, or the opt-in ``lenient``) says how
that comparison treats beams and gold answers. Nothing about a benchmark is hard-coded here.

Public API
----------
- :func:`pre_caption` – the reference's label processing; :func:`normalize` – the lenient one.
- :func:`answer_rule`, :func:`comparison` – a named, versioned rule (``id`` = ``name@version``).
- :func:`scored_prediction` – the prediction string after the answer rule (stored by ``infer``).
- :func:`scored_predictions` – the same for a whole predictions table.
- :func:`beam_hits` – which of the first five beams of every row are correct.
- :func:`score` – tidy :class:`MetricRow` s for one protocol (value, n, 95 % CI).
- :func:`lvu_average` – the LVU average row over the tasks present.
- :func:`score_predictions` – :func:`score` for every (benchmark, task) of a table, plus the LVU average.
- :func:`metrics_frame` – rows as a DataFrame with the tidy metric columns.

Answer rules and where they come from
-------------------------------------
The reference is MA-LMM (github.com/boheumd/MA-LMM, LAVIS-based).

* Predictions there are the LLM's decoded beams with surrounding whitespace removed
  (``generate`` in ``blip2_vicuna_instruct.py``) and nothing else.
* Classification labels (LVU, Breakfast, COIN datasets) go through the text processor
  (``BlipCaptionProcessor.pre_caption``: lower case; each of ``. ! " ( ) * # : ; ~``
  replaced by a space; runs of two or more whitespace characters made one space; a trailing
  newline dropped; spaces stripped; at most 50 words) and the datasets assert that the label
  is unchanged by it. ``_report_metrics_cls`` compares each beam with that processed label.
* QA answers are compared as the annotation file holds them: ``_report_metrics_vqa`` reads
  ``annotation[question_id]['answer']`` (not the processed training target).

``reference`` (the default; version 1) does exactly that: the beam trimmed at both ends
(:func:`trim`) against :func:`pre_caption` of the label (``exact``) or the raw answer
(``first_word``, ``whole``). A beam differing from its gold by case, punctuation or inner
spacing is wrong, as in the reference. ``lenient`` (opt-in; version 1) applies
:func:`normalize` (lower case, the characters above blanked, every whitespace run collapsed)
to beams and gold answers alike, so "Make sandwich." or a capitalised gold answer count as
correct; its numbers are not comparable with the paper's. The rule's ``id`` is written into
``metrics.parquet`` and on the leaderboard; bump a rule's version whenever what it accepts
changes (`report` re-scores then).

* ``exact`` – classification (``lavis/tasks/classification.py``, ``_report_metrics_cls``):
  a beam is correct when it equals the label. Also used for EPIC-Kitchens-100 (the gold is
  the verb, the noun, or "verb noun", class names processed as labels by the converter).
* ``first_word`` – MSRVTT-QA, MSVD-QA (``lavis/tasks/vqa.py``, ``_report_metrics_vqa``:
  for dataset names containing msvd / msrvtt each beam is cut at its first space): the
  first word of the beam vs the whole answer.
* ``whole`` – ActivityNet-QA (same function, no cut): the whole beam vs the answer.
* ``caption`` – captions: beam 0 stripped, scored by pycocoevalcap (below); alike under
  every rule.
* top-1 = beam 0 correct; top-5 = any of the first five beams correct (``match[:, :1]`` and
  ``match[:, :5]`` in the reference). An empty scored prediction or gold is never correct.
* A row whose ``error`` is non-empty failed to predict: all its beams count as wrong, its
  caption is the empty string, and it is counted in the ``n_failed`` row.

Captions
--------
One caption per video (beam 0 of the video's first row by ``sample_id``) against all its
references, exactly as ``COCOEvalCap.evaluate`` does (``lavis/tasks/captioning.py``):
``PTBTokenizer`` on references and on captions, then ``Bleu(4)`` (BLEU-4 is its 4th
value), ``Meteor()``, ``Rouge()`` (ROUGE-L) and ``Cider()`` (CIDEr-D), reported ×100.
SPICE is not computed (not in the protocol; it downloads CoreNLP models). One METEOR
Java process is started per :func:`score` call and killed when it returns.

EPIC-Kitchens-100 anticipation
------------------------------
As the official evaluation (github.com/epic-kitchens/C3-Action-Anticipation,
``evaluate_anticipation_json_ek100.py``: ``topk_accuracy``, ``mean_topk_recall`` and
``compute_anticipation_metrics``): ``top5_acc`` = fraction of samples whose gold is among
the top 5 predictions; ``top5_recall`` = for every class present among the gold labels, the
fraction of its samples whose top 5 contain it, averaged over those classes with equal
weight (the "overall" mean top-5 recall); ``top5_recall_unseen`` and ``top5_recall_tail``
= the same over the samples of the unseen participants and of the tail classes only (for
the action task a tail action is one whose verb or noun is a tail class), the classes being
those present in that subset. Here a class is the gold string after the answer rule and the
top 5 are the first five beams. Subset membership is read from the predictions' columns
:data:`SUBSET_COLUMNS` (``unseen_participant``, ``tail_class``), which the EK100 converter
sets from the official lists and `infer` carries over; where any row's membership is
unknown the subset's recall is NaN with ``n = 0`` and a warning says how to get it.

Confidence intervals
--------------------
95 % percentile bootstrap, clustered by ``video``: each draw resamples the distinct
videos with replacement (multinomial counts) and keeps all samples of each drawn video.
Draws are seeded by ``seed`` and the (benchmark, task), shared by all metrics of a
protocol, and independent of row order. ``n_boot=0`` gives NaN intervals.

* Accuracies and EK100 recall are recomputed exactly on every draw (vectorised numpy).
* BLEU-4 is recomputed exactly on every draw from per-video sufficient statistics (test
  and closest-reference lengths, n-gram guesses and clipped matches, as pycocoevalcap's
  ``BleuScorer`` aggregates them).
* METEOR is recomputed exactly on every draw: the per-video METEOR statistics are summed
  with the draw's weights the way Meteor 1.5 aggregates them (``MeteorStats.addStats``,
  which drops the chunk of a perfectly matched single-chunk segment) and the jar scores each
  summed line; one call for all draws.
* ROUGE-L is a mean of per-video scores: exact per draw.
* CIDEr-D is the mean of per-video scores whose IDF comes from the references of the whole
  evaluated set; draws average the per-video scores with that IDF held fixed (a
  resampled set with duplicated videos has no well-defined IDF of its own).

The LVU average is the mean of top-1 (and of top-5) over the LVU tasks present (never a
constant); its task, ``average`` for all seven or e.g. ``average:director+genre``, names
the tasks it covers. Its interval is the percentile interval of the mean of the tasks' draws.
Each task is resampled on its own (LVU tasks are labelled on nearly disjoint sets of
movies), so the draws are treated as independent across tasks.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import shutil
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd

from pipeline.benchmarks import LVU_TASKS, Protocol, protocol as get_protocol, tasks_of

log = logging.getLogger(__name__)

TOP_K = 5
CI_LEVEL = 0.95
REQUIRED_COLUMNS = ("sample_id", "benchmark", "task", "video", "beams", "answer")
# cells per bootstrap chunk (draws × videos): bounds memory whatever n_boot and the set size
_CHUNK_CELLS = 2_000_000


# ============================================================================ answer rules

_REFERENCE_PUNCT = re.compile(r'[.!"()*#:;~]')  # the characters the reference's pre_caption blanks out
_REFERENCE_RUNS = re.compile(r"\s{2,}")
REFERENCE_MAX_WORDS = 50


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def pre_caption(text: Any, max_words: int = REFERENCE_MAX_WORDS) -> str:
    """The reference's label processing (``BlipCaptionProcessor.pre_caption``), step for step:
    lower case; each of ``. ! " ( ) * # : ; ~`` replaced by a space; runs of two or more
    whitespace characters replaced by one space; a trailing newline dropped; spaces stripped at
    both ends; cut to ``max_words`` space-separated words. ``None``/NaN give ``""``."""
    out = _REFERENCE_RUNS.sub(" ", _REFERENCE_PUNCT.sub(" ", _text(text).lower()))
    out = out.rstrip("\n").strip(" ")
    words = out.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else out


def normalize(text: Any) -> str:
    """The lenient normalisation: lower case, blank out ``. ! " ( ) * # : ; ~``, collapse every
    whitespace run (a single tab included), strip. ``None``/NaN give ``""``."""
    return " ".join(_REFERENCE_PUNCT.sub(" ", _text(text).lower()).split())


def trim(text: Any) -> str:
    """A beam as the reference scores it: surrounding whitespace removed, nothing else."""
    return _text(text).strip()


def _first_word_of(text: str) -> str:
    return text.split(" ", 1)[0]  # the reference cuts at the first space (not at any whitespace)


@dataclass(frozen=True)
class Comparison:
    """What one protocol comparison (the registry's ``Protocol.answer_rule``: ``exact``,
    ``first_word``, ``whole`` or ``caption``) compares under one answer rule."""
    name: str
    prediction: Callable[[Any], str]  # beam → the string that is scored
    gold: Callable[[Any], str]  # label / answer → the string it is compared with


@dataclass(frozen=True)
class AnswerRule:
    """A named, versioned way of matching beams with gold answers. ``id`` (``name@version``) is
    written in ``metrics.parquet`` and on the leaderboard, and keys the scores cached by
    ``report``: bump ``version`` whenever what the rule accepts changes."""
    name: str
    version: int
    description: str
    comparisons: Mapping[str, Comparison]

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    def comparison(self, kind: str | Protocol) -> Comparison:
        name = kind.answer_rule if isinstance(kind, Protocol) else kind
        try:
            return self.comparisons[name]
        except KeyError:
            raise KeyError(f"unknown comparison {name!r} (answer rule {self.id}); known: "
                           f"{', '.join(self.comparisons)}") from None


def _comparisons(**kinds: tuple[Callable[[Any], str], Callable[[Any], str]]) -> dict[str, Comparison]:
    return {k: Comparison(k, p, g) for k, (p, g) in kinds.items()}


ANSWER_RULES: dict[str, AnswerRule] = {
    "reference": AnswerRule(
        "reference", 1,
        "the reference implementation's: each beam trimmed at both ends only (MSRVTT/MSVD-QA: its first word) "
        "and compared with the processed label (classification, anticipation) or with the annotated answer "
        "as written (QA)",
        _comparisons(exact=(trim, pre_caption),
                     first_word=(lambda b: _first_word_of(trim(b)), _text),
                     whole=(trim, _text),
                     caption=(trim, trim))),
    "lenient": AnswerRule(
        "lenient", 1,
        "opt-in, not the paper's: beams and gold answers both lower-cased, the characters . ! \" ( ) * # : ; ~ "
        "blanked and whitespace collapsed, so 'Make sandwich.' matches 'make sandwich'",
        _comparisons(exact=(normalize, normalize),
                     first_word=(lambda b: _first_word_of(normalize(b)), normalize),
                     whole=(normalize, normalize),
                     caption=(trim, trim))),
}
DEFAULT_ANSWER_RULE = "reference"
#: what each protocol comparison can be (the registry's ``Protocol.answer_rule``)
COMPARISONS = tuple(ANSWER_RULES[DEFAULT_ANSWER_RULE].comparisons)


def answer_rule(rule: str | AnswerRule = DEFAULT_ANSWER_RULE) -> AnswerRule:
    """The answer rule named ``rule`` (``"reference"``, ``"lenient"``; ``"name@version"`` is
    accepted when the version is the current one)."""
    if isinstance(rule, AnswerRule):
        return rule
    name, _, version = str(rule).partition("@")
    r = ANSWER_RULES.get(name)
    if r is None:
        raise KeyError(f"unknown answer rule {rule!r}; known: {', '.join(ANSWER_RULES)} "
                       f"(default {DEFAULT_ANSWER_RULE})")
    if version and version != str(r.version):
        raise KeyError(f"answer rule {rule!r}: this version of the code has {r.id} only")
    return r


def comparison(kind: str | Protocol, rule: str | AnswerRule = DEFAULT_ANSWER_RULE) -> Comparison:
    """How a protocol's comparison (or a protocol) matches beams under an answer rule."""
    return answer_rule(rule).comparison(kind)


def is_correct(kind: str | Protocol, prediction: str, gold: str, *,
               rule: str | AnswerRule = DEFAULT_ANSWER_RULE) -> bool:
    """Whether one beam is correct; an empty scored prediction never is."""
    c = comparison(kind, rule)
    scored = c.prediction(prediction)
    return bool(scored) and scored == c.gold(gold)


def _as_list(value: Any) -> list[str]:
    """Beams / references cell → list of str (Parquet gives numpy arrays; None → [])."""
    if value is None:
        return []
    if isinstance(value, float) and math.isnan(value):
        return []
    if isinstance(value, str):
        return [value]
    return ["" if v is None else str(v) for v in value]


def _failed(error: Any) -> bool:
    if error is None or (isinstance(error, float) and math.isnan(error)):
        return False
    return bool(str(error).strip())


def scored_prediction(kind: str | Protocol, beams: Any, error: Any = None, *,
                      rule: str | AnswerRule = DEFAULT_ANSWER_RULE) -> str:
    """The prediction after the answer rule (beam 0; e.g. its first word for MSRVTT-QA).
    ``""`` for a failed or empty prediction."""
    beams = _as_list(beams)
    if _failed(error) or not beams:
        return ""
    return comparison(kind, rule).prediction(beams[0])


def scored_predictions(kind: str | Protocol, predictions: pd.DataFrame, *,
                       rule: str | AnswerRule = DEFAULT_ANSWER_RULE) -> pd.Series:
    """:func:`scored_prediction` for every row of a predictions table."""
    errors = predictions["error"] if "error" in predictions else [None] * len(predictions)
    return pd.Series([scored_prediction(kind, b, e, rule=rule) for b, e in zip(predictions["beams"], errors)],
                     index=predictions.index, dtype=object)


def beam_hits(kind: str | Protocol, predictions: pd.DataFrame, k: int = TOP_K, *,
              rule: str | AnswerRule = DEFAULT_ANSWER_RULE) -> np.ndarray:
    """Bool [rows, k]: beam j of each row is correct (missing beams and failed rows: False)."""
    c = comparison(kind, rule)
    cache: dict[str, str] = {}

    def scored(text: str) -> str:
        out = cache.get(text)
        if out is None:
            out = cache[text] = c.prediction(text)
        return out

    errors = predictions["error"] if "error" in predictions else [None] * len(predictions)
    hits = np.zeros((len(predictions), k), dtype=bool)
    for i, (beams, gold, err) in enumerate(zip(predictions["beams"], predictions["answer"], errors)):
        if _failed(err):
            continue
        g = c.gold(gold)
        if not g:
            continue
        for j, beam in enumerate(_as_list(beams)[:k]):
            hits[i, j] = scored(beam) == g
    return hits


# ============================================================================ result rows

@dataclass(frozen=True, eq=False)
class MetricRow(Mapping):
    """One tidy metric row (``run`` and ``fingerprint`` are added by the caller).

    A read-only mapping, so ``dict(row)`` and ``row["value"]`` work; ``draws`` holds the
    bootstrap draws (same scale as ``value``) for derived rows such as the LVU average."""
    benchmark: str
    task: str
    metric: str
    value: float
    n: int
    ci_low: float = math.nan
    ci_high: float = math.nan
    draws: np.ndarray | None = field(default=None, repr=False)

    def __getitem__(self, key: str) -> Any:
        if key in _ROW_KEYS:
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(_ROW_KEYS)

    def __len__(self) -> int:
        return len(_ROW_KEYS)


_ROW_KEYS = tuple(f.name for f in fields(MetricRow))
TIDY_COLUMNS = ("benchmark", "task", "metric", "value", "n", "ci_low", "ci_high")


def metrics_frame(rows: Sequence[Mapping]) -> pd.DataFrame:
    """Rows → DataFrame with the tidy columns (``draws`` dropped)."""
    return pd.DataFrame([{c: r[c] for c in TIDY_COLUMNS} for r in rows], columns=list(TIDY_COLUMNS))


def _percentile_ci(draws: np.ndarray | None) -> tuple[float, float]:
    if draws is None or len(draws) == 0 or np.all(np.isnan(draws)):
        return math.nan, math.nan
    tail = 100 * (1 - CI_LEVEL) / 2
    lo, hi = np.nanpercentile(draws, [tail, 100 - tail])
    return float(lo), float(hi)


# ============================================================================ bootstrap draws

def _rng(seed: int, benchmark: str, task: str) -> np.random.Generator:
    key = zlib.crc32(f"{benchmark}/{task}".encode())
    return np.random.default_rng(np.random.SeedSequence([int(seed), key]))


def _weight_chunks(n_videos: int, n_boot: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Multinomial video counts [draws, n_videos] (float64), in memory-bounded chunks.

    Each draw picks ``n_videos`` videos uniformly with replacement; entry (b, v) is how
    many times video v was picked in draw b."""
    per = max(1, _CHUNK_CELLS // max(n_videos, 1))
    done = 0
    while done < n_boot:
        b = min(per, n_boot - done)
        idx = rng.integers(0, n_videos, size=(b, n_videos))
        idx += (np.arange(b) * n_videos)[:, None]
        yield np.bincount(idx.ravel(), minlength=b * n_videos).reshape(b, n_videos).astype(np.float64)
        done += b


# ============================================================================ prepared inputs

#: evaluation subsets of EPIC-Kitchens-100 → the column of the predictions table (and of the
#: manifest) saying whether each row is in it: the participant is unseen in training, the row's
#: class is a tail class of its task; null (empty in the manifest) when not known
SUBSET_COLUMNS = {"unseen": "unseen_participant", "tail": "tail_class"}
SUBSETS = tuple(SUBSET_COLUMNS)


def membership(value: Any, *, strict: bool = True) -> bool | None:
    """A subset-membership cell (bool, ``"true"``/``"false"``, 1/0) → bool; empty/None/NaN → None.
    Any other value is an error, or unknown (None) when not ``strict``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    if text in ("", "nan", "none", "<na>") or not strict:
        return None
    raise ValueError(f"subset membership must be true or false, got {value!r}")


def _subset_masks(rows: pd.DataFrame) -> dict[str, np.ndarray | None]:
    """Row masks of each subset; None where any row's membership is unknown."""
    out: dict[str, np.ndarray | None] = {}
    for name, column in SUBSET_COLUMNS.items():
        if column not in rows.columns:
            out[name] = None
            continue
        vals = [membership(v) for v in rows[column]]
        out[name] = None if any(v is None for v in vals) else np.array(vals, dtype=bool)
    return out


@dataclass
class _Beams:
    """Per-sample correctness, clustered by video (classification, QA, anticipation)."""
    n_rows: int
    n_videos: int
    video: np.ndarray  # [rows] video index
    hits: np.ndarray  # [rows, TOP_K] bool
    gold: np.ndarray  # [rows] class index of the gold string (after the answer rule)
    subsets: dict[str, np.ndarray | None] = field(default_factory=dict)  # subset → row mask (None: unknown)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _video_codes(videos: pd.Series) -> tuple[np.ndarray, int]:
    codes, uniques = pd.factorize(videos.astype(str), sort=True)
    return codes.astype(np.int64), len(uniques)


def _prepare_beams(proto: Protocol, rows: pd.DataFrame, rule: str | AnswerRule = DEFAULT_ANSWER_RULE) -> _Beams:
    video, n_videos = _video_codes(rows["video"])
    c = comparison(proto, rule)
    gold, _ = pd.factorize(pd.Series([c.gold(a) for a in rows["answer"]], dtype=object), sort=True)
    return _Beams(len(rows), n_videos, video, beam_hits(proto, rows, rule=rule), gold.astype(np.int64),
                  _subset_masks(rows))


def _topk_accuracy(k: int) -> Callable[[_Beams, np.ndarray], np.ndarray]:
    def fn(p: _Beams, w: np.ndarray) -> np.ndarray:
        correct = np.bincount(p.video, weights=p.hits[:, :k].any(axis=1), minlength=p.n_videos)
        count = np.bincount(p.video, minlength=p.n_videos).astype(np.float64)
        return (w @ correct) / (w @ count)
    fn.__doc__ = f"Fraction of samples with a correct answer among the first {k} beam(s)."
    return fn


def _class_mean_topk_recall(k: int, subset: str | None = None) -> Callable[[_Beams, np.ndarray], np.ndarray]:
    def fn(p: _Beams, w: np.ndarray) -> np.ndarray:
        hits, gold, video = p.hits, p.gold, p.video
        if subset is not None:
            mask = p.subsets.get(subset)
            if mask is None or not mask.any():  # membership unknown, or no sample in the subset
                return np.full(len(w), np.nan)
            hits, gold, video = hits[mask], gold[mask], video[mask]
        # (video, class) cells: hits and sample counts, cells ordered by class
        hit = hits[:, :k].any(axis=1).astype(np.float64)
        cell, first = np.unique(gold * p.n_videos + video, return_inverse=True)
        cell_hits = np.bincount(first, weights=hit, minlength=len(cell))
        cell_count = np.bincount(first, minlength=len(cell)).astype(np.float64)
        cell_video, cell_class = cell % p.n_videos, cell // p.n_videos
        starts = np.flatnonzero(np.r_[True, cell_class[1:] != cell_class[:-1]])
        wc = w[:, cell_video]
        num = np.add.reduceat(wc * cell_hits, starts, axis=1)
        den = np.add.reduceat(wc * cell_count, starts, axis=1)
        present = den > 0  # classes present in the (resampled) gold labels
        recall = np.divide(num, den, out=np.zeros_like(num), where=present)
        with np.errstate(invalid="ignore", divide="ignore"):  # a draw without any sample of the subset: NaN
            return recall.sum(axis=1) / present.sum(axis=1)
    where = "" if subset is None else f" of the {subset!r} subset's samples"
    fn.__doc__ = (f"Class-mean top-{k} recall{where}: per gold class, the fraction of its samples whose first "
                  f"{k} beams contain it; mean over the classes present (EK100 official definition).")
    return fn


def _subset_count(subset: str) -> Callable[[_Beams], int]:
    def count(p: _Beams) -> int:
        mask = p.subsets.get(subset)
        return 0 if mask is None else int(mask.sum())
    return count


# ---------------------------------------------------------------------------- captions

def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("caption metrics need Java (pycocoevalcap runs the PTB tokenizer and METEOR in Java); "
                           "install a JRE (e.g. openjdk-17-jre-headless) and make `java` available on PATH")
    return java


def _caption_inputs(rows: pd.DataFrame) -> tuple[list[str], dict[str, list[str]], dict[str, str]]:
    """Videos (sorted), their references and their one caption (first row by sample_id)."""
    rows = rows.sort_values("sample_id", kind="stable")
    refs_col = rows["references"] if "references" in rows else pd.Series([None] * len(rows), index=rows.index)
    err_col = rows["error"] if "error" in rows else pd.Series([None] * len(rows), index=rows.index)
    refs: dict[str, list[list[str]]] = {}
    caption: dict[str, str] = {}
    for video, beams, answer, rl, err in zip(rows["video"].astype(str), rows["beams"], rows["answer"], refs_col,
                                              err_col):
        r = [x for x in _as_list(rl) if x.strip()]
        if not r and isinstance(answer, str) and answer.strip():
            r = [answer]  # no reference list: the row's own answer is its reference
        refs.setdefault(video, [])
        if r and r not in refs[video]:
            refs[video].append(r)
        if video not in caption:
            caption[video] = scored_prediction("caption", beams, err)
    merged = {}
    for v, lists in refs.items():
        # every row normally carries the video's full list; rows with different lists are concatenated
        merged[v] = [c for lst in lists for c in lst]
    videos = sorted(v for v in merged if merged[v])
    if len(videos) < len(merged):
        log.warning("%d video(s) without any reference caption are not scored", len(merged) - len(videos))
    return videos, {v: merged[v] for v in videos}, {v: caption[v] for v in videos}


# Meteor 1.5 statistics line: test len, ref len, test/ref function words, 4 stages × (test content,
# ref content, test function, ref function) matches, chunks, test/ref word matches
_METEOR_STATS = 23
_METEOR_CHUNKS = 20


def meteor_aggregate(stats: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted sums of per-segment METEOR statistics, aggregated as Meteor 1.5 does:
    element-wise sums, except that a segment matched perfectly in a single chunk
    contributes no chunk. ``stats`` [segments, 23], ``weights`` [draws, segments]."""
    stats = np.asarray(stats, dtype=np.float64)
    stages = stats[:, 4:20].reshape(len(stats), 4, 4)
    test_matches = stages[:, :, 0].sum(1) + stages[:, :, 2].sum(1)
    ref_matches = stages[:, :, 1].sum(1) + stages[:, :, 3].sum(1)
    perfect = (test_matches == stats[:, 0]) & (ref_matches == stats[:, 1]) & (stats[:, _METEOR_CHUNKS] == 1)
    adj = stats.copy()
    adj[perfect, _METEOR_CHUNKS] = 0
    return weights @ adj


def bleu4_from_sums(sums: np.ndarray) -> np.ndarray:
    """Corpus BLEU-4 from summed statistics [draws, 10] = (test length, closest reference
    length, guesses n=1..4, clipped matches n=1..4), with pycocoevalcap's smoothing."""
    small, tiny = 1e-9, 1e-15
    sums = np.atleast_2d(sums)
    bleu = np.ones(len(sums))
    for k in range(4):
        bleu = bleu * (sums[:, 6 + k] + tiny) / (sums[:, 2 + k] + small)
    bleu = bleu ** (1.0 / 4)
    ratio = (sums[:, 0] + tiny) / (sums[:, 1] + small)
    return np.where(ratio < 1, bleu * np.exp(1 - 1 / np.minimum(ratio, 1)), bleu)


@dataclass
class _Captions:
    """Per-video caption statistics, plus a live METEOR process while in use."""
    n_rows: int
    n_videos: int
    point: dict[str, float]  # corpus scores exactly as pycocoevalcap returns them
    bleu_stats: np.ndarray  # [videos, 10]
    meteor_stats: np.ndarray  # [videos, 23]
    rouge: np.ndarray  # [videos]
    cider: np.ndarray  # [videos] (IDF of the whole set)
    meteor: Any = None

    def meteor_eval(self, stat_lines: list[str]) -> tuple[list[float], float]:
        """Score statistics lines with the jar: (one score per line, aggregate)."""
        m = self.meteor
        with m.lock:
            m.meteor_p.stdin.write(("EVAL ||| " + " ||| ".join(stat_lines) + "\n").encode())
            m.meteor_p.stdin.flush()
            out = [m.meteor_p.stdout.readline() for _ in range(len(stat_lines) + 1)]
        try:
            vals = [float(x.strip()) for x in out]
        except ValueError:
            raise RuntimeError(f"METEOR (Java) stopped answering: {out[-1][:200]!r}") from None
        return vals[:-1], vals[-1]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _close_meteor(self.meteor)
        self.meteor = None
        return False


def _close_meteor(meteor) -> None:
    if meteor is None:
        return
    p = meteor.meteor_p
    with meteor.lock:
        for stream in (p.stdin, p.stdout, p.stderr):
            with contextlib.suppress(Exception):
                stream.close()
        if p.poll() is None:
            p.kill()
        p.wait()


def _prepare_captions(proto: Protocol, rows: pd.DataFrame, rule: str | AnswerRule = DEFAULT_ANSWER_RULE) -> _Captions:
    """Captions score alike under every answer rule (the beam trimmed; pycocoevalcap tokenizes)."""
    from pycocoevalcap.bleu.bleu import Bleu  # heavy, optional: imported on use
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer, cook_refs, cook_test
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    videos, refs, caption = _caption_inputs(rows)
    if not videos:
        return _Captions(len(rows), 0, {}, np.zeros((0, 10)), np.zeros((0, _METEOR_STATS)), np.zeros(0),
                         np.zeros(0))
    _java()
    # as COCOEvalCap.evaluate: references and captions tokenized separately
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({v: [{"caption": c} for c in refs[v]] for v in videos})
    res = tokenizer.tokenize({v: [{"caption": caption[v]}] for v in videos})
    res = {v: res.get(v, [""]) for v in videos}

    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge_point, rouge = Rouge().compute_score(gts, res)
    cider_point, cider = Cider().compute_score(gts, res)

    # BLEU sufficient statistics per video, as BleuScorer accumulates them (closest reference length)
    scorer = BleuScorer(n=4)
    bleu_stats = np.zeros((len(videos), 10))
    for i, v in enumerate(videos):
        cooked = cook_test(res[v][0], cook_refs(gts[v]))
        bleu_stats[i, 0] = cooked["testlen"]
        bleu_stats[i, 1] = scorer._single_reflen(cooked["reflen"], "closest", cooked["testlen"])
        bleu_stats[i, 2:6] = cooked["guess"]
        bleu_stats[i, 6:10] = cooked["correct"]

    out = _Captions(len(rows), len(videos), {}, bleu_stats, np.zeros((len(videos), _METEOR_STATS)),
                    np.asarray(rouge, dtype=np.float64), np.asarray(cider, dtype=np.float64))
    out.meteor = Meteor()
    try:
        # what Meteor.compute_score does: one statistics line per video, then one EVAL line
        with out.meteor.lock:
            lines = [out.meteor._stat(res[v][0], gts[v]) for v in videos]
        _, meteor_point = out.meteor_eval(lines)
        out.meteor_stats = np.array([[float(x) for x in line.split()] for line in lines]).reshape(-1, _METEOR_STATS)
    except BaseException:
        _close_meteor(out.meteor)
        raise
    out.point = {"bleu4": float(bleu[3]), "meteor": float(meteor_point), "rouge_l": float(rouge_point),
                 "cider": float(cider_point)}
    return out


def _bleu4(p: _Captions, w: np.ndarray) -> np.ndarray:
    return bleu4_from_sums(w @ p.bleu_stats)


def _meteor(p: _Captions, w: np.ndarray) -> np.ndarray:
    summed = meteor_aggregate(p.meteor_stats, w)
    scores, _ = p.meteor_eval([" ".join(repr(float(x)) for x in row) for row in summed])
    return np.asarray(scores)


def _rouge_l(p: _Captions, w: np.ndarray) -> np.ndarray:
    return (w @ p.rouge) / w.sum(axis=1)


def _cider(p: _Captions, w: np.ndarray) -> np.ndarray:
    return (w @ p.cider) / w.sum(axis=1)


# ============================================================================ metric registry

@dataclass(frozen=True)
class MetricSpec:
    """How a registry metric name is computed: ``fn(prepared, weights[draws, videos]) →
    [draws]`` (weights of all ones give the point estimate unless ``point`` is set),
    reported × ``scale``; ``count`` gives its ``n`` when that is not every sample (a subset)."""
    name: str
    kind: str  # "beams" | "captions": which prepared input it reads
    fn: Callable[[Any, np.ndarray], np.ndarray]
    scale: float = 100.0
    point: Callable[[Any], float] | None = None  # direct point estimate (captions: pycocoevalcap's own value)
    subset: str | None = None  # computed on the rows of this subset only (EK100 ``unseen`` / ``tail``)
    count: Callable[[Any], int] | None = None


def _caption_point(name: str) -> Callable[[_Captions], float]:
    return lambda p: p.point[name]


METRICS: dict[str, MetricSpec] = {
    "top1": MetricSpec("top1", "beams", _topk_accuracy(1)),
    "top5": MetricSpec("top5", "beams", _topk_accuracy(5)),
    "top5_acc": MetricSpec("top5_acc", "beams", _topk_accuracy(5)),
    "top5_recall": MetricSpec("top5_recall", "beams", _class_mean_topk_recall(5)),
    **{f"top5_recall_{s}": MetricSpec(f"top5_recall_{s}", "beams", _class_mean_topk_recall(5, s), subset=s,
                                      count=_subset_count(s)) for s in SUBSETS},
    "bleu4": MetricSpec("bleu4", "captions", _bleu4, point=_caption_point("bleu4")),
    "meteor": MetricSpec("meteor", "captions", _meteor, point=_caption_point("meteor")),
    "rouge_l": MetricSpec("rouge_l", "captions", _rouge_l, point=_caption_point("rouge_l")),
    "cider": MetricSpec("cider", "captions", _cider, point=_caption_point("cider")),
}
_PREPARE: dict[str, Callable[..., Any]] = {"beams": _prepare_beams, "captions": _prepare_captions}

_SUBSET_FIX = {"unseen": "EPIC_100_unseen_participant_ids_validation.csv",
               "tail": "EPIC_100_tail_verbs.csv and EPIC_100_tail_nouns.csv"}


# ============================================================================ scoring

def _rows_of(proto: Protocol, predictions: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in REQUIRED_COLUMNS if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions table lacks column(s) {', '.join(missing)} "
                         f"(needs {', '.join(REQUIRED_COLUMNS)}, optional references, error)")
    rows = predictions[predictions["benchmark"] == proto.benchmark]
    if tasks_of(proto.benchmark) != ("",):  # benchmarks with sub-tasks: only this task's rows
        rows = rows[rows["task"].fillna("").astype(str) == proto.task]
    return rows


def score(protocol: Protocol, predictions: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0,
          rule: str | AnswerRule = DEFAULT_ANSWER_RULE) -> list[MetricRow]:
    """Score one protocol's rows of ``predictions`` with the protocol's comparison under the
    answer rule ``rule`` and the protocol's metrics: one :class:`MetricRow` per metric
    (value ×100, ``n`` = samples, or videos for captions, or the subset's samples; 95 %
    clustered-bootstrap CI over videos), then an ``n_failed`` row (value = rows whose
    ``error`` is set, ``n`` = rows)."""
    unknown = [m for m in protocol.metrics if m not in METRICS]
    if unknown:
        raise KeyError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    rule = answer_rule(rule)
    rows = _rows_of(protocol, predictions)
    n_failed = int(sum(_failed(e) for e in rows["error"])) if "error" in rows else 0
    specs = [METRICS[m] for m in protocol.metrics]
    out: list[MetricRow] = []
    for kind in dict.fromkeys(s.kind for s in specs):
        kind_specs = [s for s in specs if s.kind == kind]
        if len(rows) == 0:
            out += [MetricRow(protocol.benchmark, protocol.task, s.name, math.nan, 0) for s in kind_specs]
            continue
        with _PREPARE[kind](protocol, rows, rule) as prep:
            n = prep.n_videos if kind == "captions" else prep.n_rows
            if prep.n_videos == 0:
                out += [MetricRow(protocol.benchmark, protocol.task, s.name, math.nan, 0) for s in kind_specs]
                continue
            for s in kind_specs:
                if s.subset is not None and prep.subsets.get(s.subset) is None:
                    log.warning("%s%s: %s not computed: the predictions do not say which samples are in the "
                                "%r subset. Convert the manifest with the official %s beside the annotation CSVs "
                                "(`malmm-pipeline manifest ek100`), then predict again into a fresh --out",
                                protocol.benchmark, f"/{protocol.task}" if protocol.task else "", s.name,
                                s.subset, _SUBSET_FIX.get(s.subset, "lists"))
            ones = np.ones((1, prep.n_videos))
            draws: dict[str, list[np.ndarray]] = {s.name: [] for s in kind_specs}
            for w in _weight_chunks(prep.n_videos, n_boot, _rng(seed, protocol.benchmark, protocol.task)):
                for s in kind_specs:
                    draws[s.name].append(s.fn(prep, w))
            for s in kind_specs:
                point = s.point(prep) if s.point is not None else float(s.fn(prep, ones)[0])
                d = np.concatenate(draws[s.name]) * s.scale if draws[s.name] else None
                lo, hi = _percentile_ci(d)
                out.append(MetricRow(protocol.benchmark, protocol.task, s.name, point * s.scale,
                                     s.count(prep) if s.count is not None else n, lo, hi, d))
    order = {m: i for i, m in enumerate(protocol.metrics)}
    out.sort(key=lambda r: order[r.metric])
    out.append(MetricRow(protocol.benchmark, protocol.task, "n_failed", float(n_failed), len(rows)))
    return out


LVU_AVERAGE = "average"  # the task of the LVU average row when all seven tasks are present


def lvu_average_task(tasks: Sequence[str]) -> str:
    """The task name of an LVU average over ``tasks``: ``"average"`` for all seven, else
    ``"average:"`` and the tasks covered (registry order, joined by ``+``)."""
    present = [t for t in LVU_TASKS if t in set(tasks)]
    return LVU_AVERAGE if len(present) == len(LVU_TASKS) else f"{LVU_AVERAGE}:" + "+".join(present)


def lvu_average_tasks(task: str) -> tuple[str, ...] | None:
    """The LVU tasks an average row covers (``None`` when ``task`` is not an average)."""
    if task == LVU_AVERAGE:
        return LVU_TASKS
    if task.startswith(f"{LVU_AVERAGE}:"):
        return tuple(t for t in task.split(":", 1)[1].split("+") if t)
    return None


def lvu_average(metric_rows: Sequence[Mapping], metrics: Sequence[str] = ("top1", "top5")) -> list[MetricRow]:
    """The LVU average: for each metric, the mean of its value over the LVU tasks present
    (those with a finite value), as a row whose task (:func:`lvu_average_task`) names the
    tasks covered: ``"average"`` for all seven, e.g. ``"average:director+genre"`` otherwise
    (``n`` = samples over those tasks). Its CI is the percentile interval of the mean of the
    tasks' bootstrap draws (NaN when draws are missing)."""
    out = []
    for metric in metrics:
        by_task = {r["task"]: r for r in metric_rows
                   if r["benchmark"] == "lvu" and r["metric"] == metric and r["task"] in LVU_TASKS
                   and r["value"] is not None and np.isfinite(r["value"])}
        if not by_task:
            continue
        tasks = [t for t in LVU_TASKS if t in by_task]
        if len(tasks) < len(LVU_TASKS):
            log.info("LVU average of %s over %d of 7 tasks (%s)", metric, len(tasks), ", ".join(tasks))
        rows = [by_task[t] for t in tasks]
        value = float(np.mean([r["value"] for r in rows]))
        draws = [r.get("draws") for r in rows]
        d = None
        if all(x is not None and len(x) for x in draws) and len({len(x) for x in draws}) == 1:
            d = np.mean(np.stack([np.asarray(x, dtype=np.float64) for x in draws]), axis=0)
        lo, hi = _percentile_ci(d)
        out.append(MetricRow("lvu", lvu_average_task(tasks), metric, value, int(sum(r["n"] for r in rows)), lo, hi,
                             d))
    return out


def score_predictions(predictions: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0,
                      rule: str | AnswerRule = DEFAULT_ANSWER_RULE) -> list[MetricRow]:
    """:func:`score` for every (benchmark, task) present in ``predictions`` (protocols from
    the registry), followed by the LVU average over the LVU tasks present."""
    rows: list[MetricRow] = []
    keys = predictions[["benchmark", "task"]].fillna("").astype(str).drop_duplicates()
    seen = set()
    for b, t in sorted(map(tuple, keys.itertuples(index=False))):
        proto = get_protocol(b, t)
        key = (proto.benchmark, proto.task if tasks_of(b) != ("",) else "")
        if key in seen:
            continue
        seen.add(key)
        rows += score(proto, predictions, n_boot=n_boot, seed=seed, rule=rule)
    rows += lvu_average([r for r in rows if r.benchmark == "lvu"])
    return rows
