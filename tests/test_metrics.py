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
        assert p.answer_rule in M.ANSWER_RULES, key
        for m in p.metrics:
            assert m in M.METRICS, (key, m)


# ----------------------------------------------------------------------------- answer rules

def test_normalize_follows_the_reference_text_processor():
    assert M.normalize("  Making  Coffee.\n") == "making coffee"
    assert M.normalize('"Fried (egg)!"') == "fried egg"
    assert M.normalize("a*b#c:d;e~f") == "a b c d e f"
    # the reference keeps commas, apostrophes, hyphens and question marks
    assert M.normalize("Yes, the man's T-shirt?") == "yes, the man's t-shirt?"
    assert M.normalize("") == "" and M.normalize(None) == "" and M.normalize(float("nan")) == ""
    assert M.normalize("9.75") == "9 75"


def test_exact_rule():
    assert M.is_correct("exact", "Cereals", "cereals")
    assert M.is_correct("exact", "  cereals. ", "cereals")
    assert M.is_correct("exact", "romantic   comedy", "Romantic Comedy")
    assert not M.is_correct("exact", "cereals please", "cereals")  # multi-word prediction: whole beam compared
    assert not M.is_correct("exact", "cereal", "cereals")
    assert not M.is_correct("exact", "cereals,", "cereals")  # comma is not removed by the reference either
    assert not M.is_correct("exact", "", "cereals")
    assert not M.is_correct("exact", "   ", "")  # empty never correct, even against an empty gold


def test_first_word_rule():
    assert M.is_correct("first_word", "Couch in the living room", "couch")
    assert M.is_correct("first_word", "  couch.  ", "couch")
    assert M.is_correct("first_word", "Couch: a big one", "couch")
    assert not M.is_correct("first_word", "the couch", "couch")
    assert not M.is_correct("first_word", "couch, sofa", "couch")
    assert not M.is_correct("first_word", "", "couch")
    assert not M.is_correct("first_word", "playing guitar", "playing guitar")  # gold compared whole
    assert M.scored_prediction("first_word", ["Couch in the room", "sofa"]) == "couch"


def test_whole_rule():
    assert M.is_correct("whole", "Playing Basketball", "playing basketball")
    assert M.is_correct("whole", "9.75", "9.75")
    assert not M.is_correct("whole", "basketball", "playing basketball")
    assert not M.is_correct("whole", "playing basketball outside", "playing basketball")
    assert not M.is_correct("whole", "", "no")


def test_scored_prediction_per_rule_and_failures():
    assert M.scored_prediction("exact", ["  Fried Egg. ", "x"]) == "fried egg"
    assert M.scored_prediction("whole", ["Yes it is"]) == "yes it is"
    assert M.scored_prediction("caption", ["  A man is cooking.  "]) == "A man is cooking."
    assert M.scored_prediction(protocol("msrvtt-qa"), np.array(["Music plays", "x"], dtype=object)) == "music"
    assert M.scored_prediction("exact", []) == ""
    assert M.scored_prediction("exact", None) == ""
    assert M.scored_prediction("exact", ["cereals"], error="CUDA OOM") == ""
    df = frame([{"beams": ["Couch now"], "answer": "couch"}, {"beams": [], "answer": "x"}], "msrvtt-qa")
    assert list(M.scored_predictions(protocol("msrvtt-qa"), df)) == ["couch", ""]


def test_top1_top5_beam_positions():
    df = frame([
        {"beams": ["Cereals", "a", "b", "c", "d"], "answer": "cereals"},  # beam 0
        {"beams": ["a", "b", "c", "Cereals.", "d"], "answer": "cereals"},  # only in beam 3
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
    qa = frame([{"beams": ["Couch in a room", "sofa"], "answer": "couch"},
                {"beams": ["a couch", "couch"], "answer": "couch"},
                {"beams": ["no", "yes"], "answer": "yes"}], "msrvtt-qa")
    v = values(M.score(protocol("msrvtt-qa"), qa, n_boot=0))
    assert v["top1"] == pytest.approx(100 / 3) and v["top5"] == pytest.approx(100)
    anet = frame([{"beams": ["Playing basketball", "x"], "answer": "playing basketball"},
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
        {"beams": ["open", "wash", "cut", "mix", "Put"], "answer": "put"},  # hit (beam 4)
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
    # a missing task: no average
    assert M.lvu_average([r for r in rows if r.task != "year"]) == []
    # without draws: the value, NaN interval
    nodraw = M.lvu_average([{**dict(r), "draws": None} for r in rows])
    assert nodraw[0].value == avg["top1"].value and math.isnan(nodraw[0].ci_low)


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
