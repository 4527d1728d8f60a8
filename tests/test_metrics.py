"""Scoring: answer rules, top-k, EK100 recall, captions against pycocoevalcap, clustered bootstrap."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import metrics as M
from pipeline.benchmarks import LVU_TASKS, PROTOCOLS, protocol

SHARED = Path(os.environ.get("MALMM_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def frame(rows: list[dict], benchmark: str = "breakfast", task: str = "") -> pd.DataFrame:
    base = {"benchmark": benchmark, "task": task, "references": [], "error": None}
    out = []
    for i, r in enumerate(rows):
        row = {**base, "sample_id": f"s{i:05d}", "video": f"v{i:05d}", **r}
        out.append(row)
    return pd.DataFrame(out)


def values(rows) -> dict[str, float]:
    return {r.metric: r.value for r in rows}


# ----------------------------------------------------------------------------- registry

def test_every_registry_rule_and_metric_has_code():
    for key, p in PROTOCOLS.items():
        assert p.answer_rule in M.COMPARISONS, key
        for m in p.metrics:
            assert m in M.METRICS, (key, m)
    for rule in M.ANSWER_RULES.values():
        assert set(rule.comparisons) == set(M.COMPARISONS) and rule.id == f"{rule.name}@{rule.version}"


# ----------------------------------------------------------------------------- answer rules

def test_normalize_is_the_lenient_processing():
    assert M.normalize("  Making  Coffee.\n") == "making coffee"
    assert M.normalize('"Fried (egg)!"') == "fried egg"
    assert M.normalize("a*b#c:d;e~f") == "a b c d e f"
    # the reference keeps commas, apostrophes, hyphens and question marks
    assert M.normalize("Yes, the man's T-shirt?") == "yes, the man's t-shirt?"
    assert M.normalize("") == "" and M.normalize(None) == "" and M.normalize(float("nan")) == ""
    assert M.normalize("9.75") == "9 75"
    assert M.normalize("a\tb") == "a b"  # every whitespace run, a single tab included


def test_pre_caption_is_the_reference_text_processor_step_for_step():
    assert M.pre_caption("  Making  Coffee.\n") == "making coffee"
    assert M.pre_caption('"Fried (egg)!"') == "fried egg"
    assert M.pre_caption("board:chopping") == "board chopping"
    assert M.pre_caption("Yes, the man's T-shirt?") == "yes, the man's t-shirt?"
    assert M.pre_caption("a\tb") == "a\tb"  # only runs of two or more whitespace characters are replaced
    assert M.pre_caption("a\t\tb") == "a b"
    assert M.pre_caption(" ".join(f"w{i}" for i in range(60))) == " ".join(f"w{i}" for i in range(50))
    assert M.pre_caption(None) == "" and M.pre_caption(float("nan")) == ""


def test_answer_rules_are_named_and_versioned():
    assert M.DEFAULT_ANSWER_RULE == "reference"
    assert M.answer_rule().id == "reference@1" and M.answer_rule("lenient").id == "lenient@1"
    assert M.answer_rule("lenient@1") is M.ANSWER_RULES["lenient"]
    with pytest.raises(KeyError, match="unknown answer rule 'loose'; known: reference, lenient"):
        M.answer_rule("loose")
    with pytest.raises(KeyError, match="has lenient@1 only"):
        M.answer_rule("lenient@7")


def test_reference_rule_classification_trims_the_beam_and_processes_the_label():
    """The reference compares the raw beam, trimmed at the ends only, with the processed label."""
    assert M.is_correct("exact", "  make sandwich \n", "make sandwich")
    assert M.is_correct("exact", "make sandwich", "Make Sandwich.")  # the label is processed
    assert not M.is_correct("exact", "Make sandwich.", "make sandwich")  # the beam is not
    assert not M.is_correct("exact", "Make sandwich", "make sandwich")
    assert not M.is_correct("exact", "make  sandwich", "make sandwich")
    assert not M.is_correct("exact", "cereals please", "cereals")
    assert not M.is_correct("exact", "", "cereals") and not M.is_correct("exact", "   ", "")
    # through score, as the default
    df = frame([{"beams": ["Make sandwich.", "make sandwich"], "answer": "make sandwich"},
                {"beams": ["make sandwich"], "answer": "make sandwich"}], "coin")
    v = values(M.score(protocol("coin"), df, n_boot=0))
    assert (v["top1"], v["top5"]) == (pytest.approx(50), pytest.approx(100))
    v = values(M.score(protocol("coin"), df, n_boot=0, rule="lenient"))
    assert (v["top1"], v["top5"]) == (pytest.approx(100), pytest.approx(100))


def test_reference_rule_qa_compares_with_the_raw_answer():
    """QA: the trimmed beam (its first word for MSRVTT/MSVD-QA) against the annotation's answer as written."""
    assert M.is_correct("first_word", " couch in the room ", "couch")
    assert not M.is_correct("first_word", "Couch in the room", "couch")
    assert not M.is_correct("first_word", "couch in the room", "Couch")  # a capitalised gold answer
    assert not M.is_correct("first_word", "couch. yes", "couch")
    assert M.is_correct("first_word", "couch\tsofa", "couch\tsofa")  # cut at the first space only
    assert M.is_correct("whole", "playing basketball", "playing basketball")
    assert not M.is_correct("whole", "Playing basketball", "playing basketball")
    assert not M.is_correct("whole", "yes", "Yes")
    qa = frame([{"beams": ["couch in a room", "Couch"], "answer": "Couch"},
                {"beams": ["yes"], "answer": "yes"}], "msvd-qa")
    assert values(M.score(protocol("msvd-qa"), qa, n_boot=0))["top1"] == pytest.approx(50)
    assert values(M.score(protocol("msvd-qa"), qa, n_boot=0, rule="lenient"))["top1"] == pytest.approx(100)
    anet = frame([{"beams": ["Yes"], "answer": "yes"}, {"beams": ["no"], "answer": "No"}], "activitynet-qa")
    assert values(M.score(protocol("activitynet-qa"), anet, n_boot=0))["top1"] == 0
    assert values(M.score(protocol("activitynet-qa"), anet, n_boot=0, rule="lenient"))["top1"] == 100


def test_lenient_exact_rule():
    def ok(p, g):
        return M.is_correct("exact", p, g, rule="lenient")
    assert ok("Cereals", "cereals") and ok("  cereals. ", "cereals") and ok("romantic   comedy", "Romantic Comedy")
    assert not ok("cereals please", "cereals")  # multi-word prediction: whole beam compared
    assert not ok("cereal", "cereals")
    assert not ok("cereals,", "cereals")  # comma is not removed either
    assert not ok("", "cereals")
    assert not ok("   ", "")  # empty never correct, even against an empty gold


def test_lenient_first_word_rule():
    def ok(p, g):
        return M.is_correct("first_word", p, g, rule="lenient")
    assert ok("Couch in the living room", "couch") and ok("  couch.  ", "couch") and ok("Couch: a big one", "couch")
    assert not ok("the couch", "couch") and not ok("couch, sofa", "couch") and not ok("", "couch")
    assert not ok("playing guitar", "playing guitar")  # gold compared whole
    assert M.scored_prediction("first_word", ["Couch in the room", "sofa"], rule="lenient") == "couch"


def test_lenient_whole_rule():
    def ok(p, g):
        return M.is_correct("whole", p, g, rule="lenient")
    assert ok("Playing Basketball", "playing basketball") and ok("9.75", "9.75")
    assert not ok("basketball", "playing basketball") and not ok("playing basketball outside", "playing basketball")
    assert not ok("", "no")


def test_scored_prediction_per_rule_and_failures():
    assert M.scored_prediction("exact", ["  Fried Egg. ", "x"]) == "Fried Egg."
    assert M.scored_prediction("exact", ["  Fried Egg. ", "x"], rule="lenient") == "fried egg"
    assert M.scored_prediction("whole", ["Yes it is"]) == "Yes it is"
    assert M.scored_prediction("caption", ["  A man is cooking.  "]) == "A man is cooking."
    assert M.scored_prediction("caption", ["  A man is cooking.  "], rule="lenient") == "A man is cooking."
    assert M.scored_prediction(protocol("msrvtt-qa"), np.array(["Music plays", "x"], dtype=object)) == "Music"
    assert M.scored_prediction("exact", []) == ""
    assert M.scored_prediction("exact", None) == ""
    assert M.scored_prediction("exact", ["cereals"], error="CUDA OOM") == ""
    df = frame([{"beams": ["couch now"], "answer": "couch"}, {"beams": [], "answer": "x"}], "msrvtt-qa")
    assert list(M.scored_predictions(protocol("msrvtt-qa"), df)) == ["couch", ""]


def test_top1_top5_beam_positions():
    df = frame([
        {"beams": ["cereals", "a", "b", "c", "d"], "answer": "cereals"},  # beam 0
        {"beams": ["a", "b", "c", " cereals ", "d"], "answer": "cereals"},  # only in beam 3
        {"beams": ["a", "b", "c", "d", "e", "cereals"], "answer": "cereals"},  # only in beam 5: not in top-5
        {"beams": ["cereals please", "a cereals"], "answer": "cereals"},  # multi-word: wrong
        {"beams": [], "answer": "cereals"},  # empty output
        {"beams": ["", "", ""], "answer": "cereals"},  # empty strings
        {"beams": None, "answer": "cereals"},  # missing
    ])
    hits = M.beam_hits("exact", df)
    assert hits.shape == (7, 5)
    assert hits[0].tolist() == [True, False, False, False, False]
    assert hits[1].tolist() == [False, False, False, True, False]
    assert not hits[2:].any()
    v = values(M.score(protocol("breakfast"), df, n_boot=0))
    assert v["top1"] == pytest.approx(100 / 7)
    assert v["top5"] == pytest.approx(200 / 7)
    assert v["n_failed"] == 0


def test_qa_rules_through_score():
    qa = frame([{"beams": ["couch in a room", "sofa"], "answer": "couch"},
                {"beams": ["a couch", "couch"], "answer": "couch"},
                {"beams": ["no", "yes"], "answer": "yes"}], "msrvtt-qa")
    v = values(M.score(protocol("msrvtt-qa"), qa, n_boot=0))
    assert v["top1"] == pytest.approx(100 / 3) and v["top5"] == pytest.approx(100)
    anet = frame([{"beams": ["playing basketball", "x"], "answer": "playing basketball"},
                  {"beams": ["playing", "playing basketball"], "answer": "playing basketball"}], "activitynet-qa")
    v = values(M.score(protocol("activitynet-qa"), anet, n_boot=0))
    assert v["top1"] == pytest.approx(50) and v["top5"] == pytest.approx(100)


def test_failed_rows_count_as_wrong_and_are_counted():
    df = frame([{"beams": ["cereals"], "answer": "cereals"},
                {"beams": ["cereals"], "answer": "cereals", "error": "RuntimeError: decode failed"},
                {"beams": [], "answer": "cereals", "error": "timeout"},
                {"beams": ["cereals"], "answer": "cereals", "error": ""}])
    rows = M.score(protocol("breakfast"), df, n_boot=0)
    v = values(rows)
    assert v["top1"] == pytest.approx(50) and v["top5"] == pytest.approx(50)
    failed = [r for r in rows if r.metric == "n_failed"][0]
    assert failed.value == 2 and failed.n == 4


def test_rows_of_other_tasks_and_benchmarks_are_ignored():
    df = pd.concat([frame([{"beams": ["drama"], "answer": "drama"}], "lvu", "genre"),
                    frame([{"beams": ["x"], "answer": "steven"}] * 3, "lvu", "director"),
                    frame([{"beams": ["x"], "answer": "cereals"}], "breakfast")], ignore_index=True)
    r = M.score(protocol("lvu", "genre"), df, n_boot=0)
    assert values(r)["top1"] == 100 and r[0].n == 1 and r[0].task == "genre"
    empty = M.score(protocol("coin"), df, n_boot=10)
    assert math.isnan(values(empty)["top1"]) and empty[0].n == 0


def test_missing_columns_are_reported():
    with pytest.raises(ValueError, match="video"):
        M.score(protocol("breakfast"), pd.DataFrame({"sample_id": [], "benchmark": [], "task": [], "beams": [],
                                                     "answer": []}))


# ----------------------------------------------------------------------------- EPIC-Kitchens-100

def test_ek100_top5_accuracy_and_class_mean_recall_by_hand():
    # gold verb classes: take ×3, put ×1, open ×2
    rows = [
        {"beams": ["take", "put", "open", "wash", "cut"], "answer": "take"},  # hit
        {"beams": ["put", "open", "wash", "cut", "mix"], "answer": "take"},  # miss
        {"beams": ["put", "open", "wash", "cut", "mix", "take"], "answer": "take"},  # beam 5: miss
        {"beams": ["open", "wash", "cut", "mix", "put"], "answer": "put"},  # hit (beam 4)
        {"beams": ["take", "open"], "answer": "open"},  # hit
        {"beams": ["take"], "answer": "open", "error": "failed"},  # failed: miss
    ]
    v = values(M.score(protocol("ek100", "verb"), frame(rows, "ek100", "verb"), n_boot=0))
    assert v["top5_acc"] == pytest.approx(100 * 3 / 6)
    # recall: take 1/3, put 1/1, open 1/2 → mean over the 3 classes present
    assert v["top5_recall"] == pytest.approx(100 * (1 / 3 + 1 + 1 / 2) / 3)
    assert v["n_failed"] == 1


def test_ek100_action_gold_is_verb_noun_string():
    rows = [{"beams": ["take plate", "put plate"], "answer": "take plate"},
            {"beams": ["open cupboard"], "answer": "open board:chopping"},
            {"beams": ["wash board:chopping", "open board chopping"], "answer": "open board:chopping"}]
    v = values(M.score(protocol("ek100", "action"), frame(rows, "ek100", "action"), n_boot=0))
    assert v["top5_acc"] == pytest.approx(200 / 3)
    assert v["top5_recall"] == pytest.approx(100 * (1 + 1 / 2) / 2)


def test_ek100_recall_bootstrap_matches_a_loop():
    rng = np.random.default_rng(1)
    classes = [f"c{i}" for i in range(7)]
    rows = []
    for i in range(60):
        g = classes[rng.integers(0, 7)]
        beams = [classes[rng.integers(0, 7)] for _ in range(5)]
        rows.append({"beams": beams, "answer": g, "video": f"vid{i % 9}"})
    df = frame(rows, "ek100", "noun")
    prep = M._prepare_beams(protocol("ek100", "noun"), df)
    w = np.vstack([np.ones(prep.n_videos)] + [rng.integers(0, 3, prep.n_videos) for _ in range(20)]).astype(float)
    w[5] = 0
    w[5, 0] = 1  # a draw with a single video: only its classes are present
    got = M.METRICS["top5_recall"].fn(prep, w)
    hit = prep.hits.any(1)
    for b in range(len(w)):
        sw = w[b, prep.video]
        recalls = [sw[prep.gold == c] @ hit[prep.gold == c] / sw[prep.gold == c].sum()
                   for c in np.unique(prep.gold) if sw[prep.gold == c].sum() > 0]
        assert got[b] == pytest.approx(np.mean(recalls))


def _official_mean_top5_recall(gold: list[str], top5: list[list[str]]) -> float:
    """The official evaluation's mean_topk_recall, restated: per class present, the top-5 accuracy of its
    samples; mean over the classes."""
    recalls = []
    for c in sorted(set(gold)):
        idx = [i for i, g in enumerate(gold) if g == c]
        recalls.append(np.mean([c in top5[i] for i in idx]))
    return 100 * float(np.mean(recalls))


def _ek_rows(task: str, rng: np.random.Generator, n: int = 80):
    verbs, nouns = [f"v{i}" for i in range(6)], [f"n{i}" for i in range(5)]
    tail_v, tail_n, unseen = {"v4", "v5"}, {"n3", "n4"}, {"P09"}
    rows = []
    for i in range(n):
        v, no = verbs[rng.integers(0, 6)], nouns[rng.integers(0, 5)]
        pid = f"P0{rng.integers(7, 10)}"
        gold = {"verb": v, "noun": no, "action": f"{v} {no}"}[task]
        pool = {"verb": verbs, "noun": nouns, "action": [f"{a} {b}" for a in verbs for b in nouns]}[task]
        beams = [gold] if rng.random() < 0.3 else []
        beams += [pool[rng.integers(0, len(pool))] for _ in range(6 - len(beams))]
        rng.shuffle(beams)
        tail = {"verb": v in tail_v, "noun": no in tail_n, "action": v in tail_v or no in tail_n}[task]
        rows.append({"beams": beams, "answer": gold, "video": f"{pid}_{i % 11}", "unseen_participant": pid in unseen,
                     "tail_class": tail})
    return rows


@pytest.mark.parametrize("task", ["verb", "noun", "action"])
def test_ek100_unseen_and_tail_recall_as_the_official_evaluation(task):
    """Class-mean top-5 recall overall, over unseen participants and over tail classes (tail action: tail verb
    or tail noun), each over the classes present in its subset."""
    rows = _ek_rows(task, np.random.default_rng({"verb": 1, "noun": 2, "action": 3}[task]))
    df = frame(rows, "ek100", task)
    got = {r.metric: r for r in M.score(protocol("ek100", task), df, n_boot=200)}
    assert set(got) == {"top5_acc", "top5_recall", "top5_recall_unseen", "top5_recall_tail", "n_failed"}
    gold = [r["answer"] for r in rows]
    top5 = [r["beams"][:5] for r in rows]
    assert got["top5_acc"].value == pytest.approx(100 * np.mean([g in t for g, t in zip(gold, top5)]))
    assert got["top5_recall"].value == pytest.approx(_official_mean_top5_recall(gold, top5))
    for subset, col in (("unseen", "unseen_participant"), ("tail", "tail_class")):
        idx = [i for i, r in enumerate(rows) if r[col]]
        m = got[f"top5_recall_{subset}"]
        assert 0 < len(idx) < len(rows) and m.n == len(idx)
        assert m.value == pytest.approx(_official_mean_top5_recall([gold[i] for i in idx], [top5[i] for i in idx]))
        assert m.ci_low <= m.value <= m.ci_high


def test_ek100_subset_recall_bootstrap_matches_a_loop():
    rng = np.random.default_rng(4)
    rows = _ek_rows("noun", rng, 50)
    df = frame(rows, "ek100", "noun")
    prep = M._prepare_beams(protocol("ek100", "noun"), df)
    w = np.vstack([np.ones(prep.n_videos)] + [rng.integers(0, 3, prep.n_videos) for _ in range(20)]).astype(float)
    got = M.METRICS["top5_recall_tail"].fn(prep, w)
    mask = prep.subsets["tail"]
    hit = prep.hits.any(1)
    for b in range(len(w)):
        sw = w[b, prep.video] * mask
        recalls = [sw[prep.gold == c] @ hit[prep.gold == c] / sw[prep.gold == c].sum()
                   for c in np.unique(prep.gold) if sw[prep.gold == c].sum() > 0]
        assert (math.isnan(got[b]) and not recalls) or got[b] == pytest.approx(np.mean(recalls))


def test_ek100_subset_recall_unknown_membership_is_nan_and_said(caplog):
    rows = [{"beams": ["take"], "answer": "take"}, {"beams": ["put"], "answer": "take"}]
    with caplog.at_level("WARNING", logger="pipeline.metrics"):
        got = {r.metric: r for r in M.score(protocol("ek100", "verb"), frame(rows, "ek100", "verb"), n_boot=10)}
    for m in ("top5_recall_unseen", "top5_recall_tail"):
        assert math.isnan(got[m].value) and got[m].n == 0 and math.isnan(got[m].ci_low)
    assert got["top5_recall"].value == 50
    assert "EPIC_100_unseen_participant_ids_validation.csv" in caplog.text and "EPIC_100_tail_verbs.csv" in caplog.text
    # one unknown row makes the subset unknown; strings from a manifest are read too
    rows = [{"beams": ["take"], "answer": "take", "unseen_participant": "true", "tail_class": None},
            {"beams": ["put"], "answer": "take", "unseen_participant": "false", "tail_class": False}]
    got = {r.metric: r for r in M.score(protocol("ek100", "verb"), frame(rows, "ek100", "verb"), n_boot=0)}
    assert got["top5_recall_unseen"].value == 100 and got["top5_recall_unseen"].n == 1
    assert math.isnan(got["top5_recall_tail"].value)
    # a subset without any sample: NaN with n = 0
    rows[0]["unseen_participant"] = "false"
    got = {r.metric: r for r in M.score(protocol("ek100", "verb"), frame(rows, "ek100", "verb"), n_boot=0)}
    assert math.isnan(got["top5_recall_unseen"].value) and got["top5_recall_unseen"].n == 0
    with pytest.raises(ValueError, match="must be true or false"):
        M.membership("maybe")
    assert M.membership("maybe", strict=False) is None


# ----------------------------------------------------------------------------- bootstrap

def synthetic(n: int, acc: float, per_video: int = 1, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    correct = rng.random(n) < acc
    return pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "benchmark": "coin", "task": "",
                         "video": [f"v{i // per_video}" for i in range(n)],
                         "beams": [["yes"] if c else ["no"] for c in correct], "answer": "yes",
                         "references": [[]] * n})


def test_bootstrap_ci_contains_point_is_deterministic_and_shrinks_with_n():
    p = protocol("coin")
    small = M.score(p, synthetic(200, 0.6), n_boot=500, seed=3)[0]
    assert small.ci_low <= small.value <= small.ci_high and small.ci_low < small.ci_high
    again = M.score(p, synthetic(200, 0.6), n_boot=500, seed=3)[0]
    assert (again.ci_low, again.ci_high) == (small.ci_low, small.ci_high)
    assert np.array_equal(again.draws, small.draws)
    other = M.score(p, synthetic(200, 0.6), n_boot=500, seed=4)[0]
    assert not np.array_equal(other.draws, small.draws)
    big = M.score(p, synthetic(20000, 0.6), n_boot=500, seed=3)[0]
    assert big.ci_low <= big.value <= big.ci_high
    assert (big.ci_high - big.ci_low) < (small.ci_high - small.ci_low) / 5
    assert len(small.draws) == 500


def test_bootstrap_independent_of_row_order():
    df = synthetic(300, 0.5, per_video=3)
    a = M.score(protocol("coin"), df, n_boot=200)[0]
    b = M.score(protocol("coin"), df.sample(frac=1, random_state=1), n_boot=200)[0]
    assert np.array_equal(a.draws, b.draws)


def test_bootstrap_resamples_whole_videos():
    # 10 videos × 100 samples; every sample of a video has the same outcome (4 videos right)
    n_videos, per = 10, 100
    df = synthetic(n_videos * per, 0.0, per_video=per)
    right = df.video.isin([f"v{i}" for i in (0, 3, 5, 8)])
    df.loc[right, "beams"] = pd.Series([["yes"]] * right.sum(), index=df.index[right])
    r = M.score(protocol("coin"), df, n_boot=1000, seed=0)[0]
    assert r.value == pytest.approx(40)
    # a draw picks 10 whole videos: its accuracy is a multiple of 10 %
    assert np.allclose(r.draws / 10, np.round(r.draws / 10))
    assert r.ci_high - r.ci_low > 40  # ~ binomial(10, 0.4), not binomial(1000, 0.4)
    # the same outcomes with one video per sample: an interval an order of magnitude narrower
    iid = df.assign(video=[f"u{i}" for i in range(len(df))])
    r_iid = M.score(protocol("coin"), iid, n_boot=1000, seed=0)[0]
    assert r_iid.value == pytest.approx(40)
    assert (r_iid.ci_high - r_iid.ci_low) * 3 < r.ci_high - r.ci_low


def test_no_bootstrap_gives_nan_interval():
    r = M.score(protocol("coin"), synthetic(50, 0.5), n_boot=0)[0]
    assert math.isnan(r.ci_low) and math.isnan(r.ci_high) and r.draws is None
    assert r.value == pytest.approx(100 * synthetic(50, 0.5).beams.map(lambda b: b == ["yes"]).mean())


def test_metric_rows_are_mappings_and_frame():
    rows = M.score(protocol("coin"), synthetic(50, 0.5), n_boot=20)
    d = dict(rows[0])
    assert d["metric"] == "top1" and d["n"] == 50 and "draws" in d
    f = M.metrics_frame(rows)
    assert list(f.columns) == list(M.TIDY_COLUMNS) and list(f.metric) == ["top1", "top5", "n_failed"]


# ----------------------------------------------------------------------------- LVU average

def lvu_predictions(n_per_task: int = 40) -> pd.DataFrame:
    frames = []
    for k, t in enumerate(LVU_TASKS):
        df = synthetic(n_per_task, 0.3 + 0.05 * k, per_video=4, seed=k)
        df["benchmark"], df["task"] = "lvu", t
        df["sample_id"] = t + "_" + df.sample_id
        df["video"] = t + "_" + df.video
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def test_lvu_average_of_seven_tasks():
    preds = lvu_predictions()
    rows = []
    for t in LVU_TASKS:
        rows += M.score(protocol("lvu", t), preds, n_boot=300)
    avg = {r.metric: r for r in M.lvu_average(rows)}
    assert set(avg) == {"top1", "top5"}
    top1 = [r.value for r in rows if r.metric == "top1"]
    assert avg["top1"].task == "average" and avg["top1"].value == pytest.approx(np.mean(top1))
    assert avg["top1"].n == len(preds)
    assert avg["top1"].ci_low <= avg["top1"].value <= avg["top1"].ci_high
    # works on plain dicts too (as the report stage passes them)
    again = M.lvu_average([dict(r) for r in rows])
    assert again[0].value == avg["top1"].value and again[0].ci_low == avg["top1"].ci_low
    # the same through score_predictions
    allrows = M.score_predictions(preds, n_boot=300)
    assert [r for r in allrows if r.task == "average"][0].value == pytest.approx(avg["top1"].value)
    # without draws: the value, NaN interval
    nodraw = M.lvu_average([{**dict(r), "draws": None} for r in rows])
    assert nodraw[0].value == avg["top1"].value and math.isnan(nodraw[0].ci_low)


def test_lvu_average_of_the_tasks_present():
    """Fewer than seven tasks: the mean of those present, under a task name that says which."""
    preds = lvu_predictions()
    rows = []
    for t in ("director", "genre", "year"):
        rows += M.score(protocol("lvu", t), preds, n_boot=100)
    avg = {r.metric: r for r in M.lvu_average(rows)}
    top1 = {r.task: r.value for r in rows if r.metric == "top1"}
    assert avg["top1"].task == "average:director+genre+year"
    assert avg["top1"].value == pytest.approx(np.mean(list(top1.values())))
    assert avg["top1"].n == sum(r.n for r in rows if r.metric == "top1")
    assert M.lvu_average_tasks(avg["top1"].task) == ("director", "genre", "year")
    assert M.lvu_average_tasks("average") == LVU_TASKS and M.lvu_average_tasks("genre") is None
    # a task whose value is NaN (no rows) is not present
    nan_row = {**dict(rows[0]), "task": "writer", "value": math.nan, "n": 0}
    assert M.lvu_average(rows + [nan_row])[0].task == "average:director+genre+year"
    # through score_predictions, on a table holding those three tasks only
    some = preds[preds.task.isin(["director", "genre", "year"])]
    got = [r for r in M.score_predictions(some, n_boot=0) if r.task.startswith("average")]
    assert [r.task for r in got] == ["average:director+genre+year"] * 2
    assert got[0].value == pytest.approx(avg["top1"].value)


# ----------------------------------------------------------------------------- captions (pure parts)

def test_caption_inputs_one_caption_per_video_and_all_references():
    df = pd.DataFrame([
        {"sample_id": "b", "video": "v1", "beams": ["second row"], "answer": "r1", "references": ["r1", "r2"]},
        {"sample_id": "a", "video": "v1", "beams": ["  first row "], "answer": "r1", "references": ["r1", "r2"]},
        {"sample_id": "c", "video": "v2", "beams": ["x"], "answer": "only", "references": None, "error": "oom"},
        {"sample_id": "d", "video": "v3", "beams": ["y"], "answer": "c1", "references": ["c1"]},
        {"sample_id": "e", "video": "v3", "beams": ["z"], "answer": "c2", "references": ["c2"]},
    ])
    videos, refs, caps = M._caption_inputs(df)
    assert videos == ["v1", "v2", "v3"]
    assert caps == {"v1": "first row", "v2": "", "v3": "y"}
    assert refs == {"v1": ["r1", "r2"], "v2": ["only"], "v3": ["c1", "c2"]}


def test_bleu4_from_sums_brevity_and_smoothing():
    # test length 4 vs closest reference 8 → brevity penalty exp(1 - 2)
    s = np.array([[4, 8, 4, 3, 2, 1, 4, 3, 2, 1]], dtype=float)
    assert M.bleu4_from_sums(s)[0] == pytest.approx(math.exp(-1), rel=1e-9)
    zero = np.array([[0, 5, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=float)
    assert M.bleu4_from_sums(zero)[0] == pytest.approx(0, abs=1e-12)


# ----------------------------------------------------------------------------- captions vs pycocoevalcap

CAPTION_REFS = {
    "video7010": ["A man is cooking in a kitchen.", "someone cooks food", "a chef prepares a meal in the kitchen",
                  "a man is cooking"],
    "video7011": ["A dog runs on the grass!", "a dog is running", "a brown dog runs across a field"],
    "video7012": ["a cat, sleeping on a sofa", "the cat sleeps"],
    "video7013": ["people dance at a party", "a group of people are dancing", "people are dancing"],
    "video7014": ["a woman is talking about makeup", "a lady explains how to apply make-up"],
    "video7015": ["two men play tennis", "men are playing tennis on a court", "a tennis match"],
    "video7016": ["a car drives on a road", "a red car is driving fast"],
}
CAPTIONS = {"video7010": "  A man is cooking in the kitchen. ", "video7011": "a dog is running on the grass",
            "video7012": "", "video7013": "people are dancing", "video7014": "a woman is talking (about) makeup",
            "video7015": "two men are playing tennis", "video7016": "a man is driving a car"}
FAILED = {"video7016"}


@pytest.fixture(scope="module")
def caption_scores():
    if shutil.which("java") is None:
        pytest.skip("Java is needed by pycocoevalcap")
    df = pd.DataFrame([{"sample_id": v, "benchmark": "msrvtt-cap", "task": "", "video": v, "beams": [CAPTIONS[v]],
                        "answer": CAPTION_REFS[v][0], "references": CAPTION_REFS[v],
                        "error": "CUDA error" if v in FAILED else None} for v in CAPTION_REFS])
    before = _java_children()
    rows = M.score(protocol("msrvtt-cap"), df, n_boot=200, seed=0)
    left = _java_children() - before
    return {r.metric: r for r in rows}, left


def _java_children() -> set[int]:
    me, out = os.getpid(), set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == me and "java" in (d / "comm").read_text():
                out.add(int(d.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


@pytest.fixture(scope="module")
def direct_pycocoevalcap():
    """The scorers called directly, as COCOEvalCap.evaluate does (without SPICE)."""
    if shutil.which("java") is None:
        pytest.skip("Java is needed by pycocoevalcap")
    import contextlib
    import io

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({v: [{"caption": c} for c in refs] for v, refs in CAPTION_REFS.items()})
    res = tok.tokenize({v: [{"caption": "" if v in FAILED else CAPTIONS[v]}] for v in CAPTION_REFS})
    meteor = Meteor()
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res)
    out = {"bleu4": bleu[3], "meteor": meteor.compute_score(gts, res)[0], "rouge_l": Rouge().compute_score(gts, res)[0],
           "cider": Cider().compute_score(gts, res)[0]}
    yield out, gts, res, meteor
    M._close_meteor(meteor)


def test_caption_metrics_equal_direct_pycocoevalcap(caption_scores, direct_pycocoevalcap):
    ours, _ = caption_scores
    direct, *_ = direct_pycocoevalcap
    for m in ("bleu4", "meteor", "rouge_l", "cider"):
        assert ours[m].value == pytest.approx(100 * direct[m], rel=1e-12, abs=1e-12), m
        assert ours[m].n == len(CAPTION_REFS)
    assert ours["n_failed"].value == 1


def test_caption_intervals_contain_the_point_estimate(caption_scores):
    ours, _ = caption_scores
    for m in ("bleu4", "meteor", "rouge_l", "cider"):
        r = ours[m]
        assert len(r.draws) == 200
        assert r.ci_low <= r.value <= r.ci_high and r.ci_low < r.ci_high, m


def test_caption_scoring_leaves_no_java_process(caption_scores):
    _, left = caption_scores
    assert not left


def test_caption_resample_statistics_are_exact(direct_pycocoevalcap):
    """BLEU from summed statistics and METEOR from summed statistics equal the scorers run
    on a resampled corpus (videos repeated as drawn)."""
    import contextlib
    import io

    from pycocoevalcap.bleu.bleu import Bleu

    _, gts, res, meteor = direct_pycocoevalcap
    videos = sorted(CAPTION_REFS)
    prep = M._Captions(len(videos), len(videos), {}, np.zeros((len(videos), 10)), np.zeros((len(videos), 23)),
                       np.zeros(len(videos)), np.zeros(len(videos)), meteor)
    lines = [meteor._stat(res[v][0], gts[v]) for v in videos]
    stats = np.array([[float(x) for x in line.split()] for line in lines])
    rng = np.random.default_rng(5)
    weights = np.vstack([np.ones(len(videos))] + [np.bincount(rng.integers(0, len(videos), len(videos)),
                                                              minlength=len(videos)) for _ in range(6)])
    summed = M.meteor_aggregate(stats, weights)
    per_draw, _ = prep.meteor_eval([" ".join(repr(float(x)) for x in row) for row in summed])
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer, cook_refs, cook_test
    sc = BleuScorer(n=4)
    bstats = []
    for v in videos:
        c = cook_test(res[v][0], cook_refs(gts[v]))
        bstats.append([c["testlen"], sc._single_reflen(c["reflen"], "closest", c["testlen"])] + c["guess"]
                      + c["correct"])
    bleu_draws = M.bleu4_from_sums(weights @ np.array(bstats, dtype=float))
    for b, w in enumerate(weights):
        drawn = [v for v, k in zip(videos, w) for _ in range(int(k))]
        # corpus METEOR of the resampled corpus: the jar's aggregate over the repeated lines
        _, agg = prep.meteor_eval([lines[videos.index(v)] for v in drawn])
        assert per_draw[b] == pytest.approx(agg, rel=1e-12)
        # corpus BLEU-4 of the resampled corpus (keys made unique per copy)
        g = {f"{v}#{i}": gts[v] for i, v in enumerate(drawn)}
        r = {f"{v}#{i}": res[v] for i, v in enumerate(drawn)}
        with contextlib.redirect_stdout(io.StringIO()):
            bleu, _ = Bleu(4).compute_score(g, r, verbose=0)
        assert bleu_draws[b] == pytest.approx(bleu[3], rel=1e-9, abs=1e-15)


# ----------------------------------------------------------------------------- real annotations

def test_lvu_labels_are_fixed_points_of_normalize():
    """The reference asserts its LVU labels are unchanged by its text processor; so is normalize."""
    path = SHARED / "data/annotations/malmm/lvu/annotation/test.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    ann = json.loads(path.read_text())
    labels = {v[t] for v in ann.values() for t in LVU_TASKS if t in v}
    assert labels and all(M.normalize(x) == x for x in labels)
