"""Converters from the published annotation formats to the manifest (pipeline/converters/).

Two kinds of inputs: the real annotation files in ../shared/data/annotations (or
$MALMM_ANNOTATIONS; these tests skip when absent) and small hand-made files in each
official format, written by the tests.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from pipeline.converters import ConversionError, convert
from pipeline.manifest import read_manifest

ANNOTATIONS = Path(os.environ.get("MALMM_ANNOTATIONS")
                   or Path(__file__).resolve().parents[2] / "shared" / "data" / "annotations")
LVU_TASKS = ("relationship", "way_speaking", "scene", "director", "genre", "writer", "year")


@pytest.fixture(scope="module")
def real():
    if not (ANNOTATIONS / "malmm").is_dir():
        pytest.skip(f"real annotation files not found at {ANNOTATIONS} (set MALMM_ANNOTATIONS)")
    return ANNOTATIONS


def load(p):
    return json.loads(Path(p).read_text())


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_csv(path: Path, header, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def touch(root: Path, *rels: str) -> None:
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\0")


def reference_windows(duration: int, history: int = 100, stride: int = 20) -> list[int]:
    """The reference's window starts (lvu_cls_datasets.py), written independently of sampling.py."""
    return [0] + list(range(stride, duration - history + 1, stride))


# ============================================================================ real files

def test_real_lvu_windows_splits_and_labels(real, tmp_path):
    ann = real / "malmm" / "lvu"
    res = convert("lvu", ann, tmp_path / "videos", out=tmp_path / "lvu.csv")
    m = read_manifest(tmp_path / "lvu.csv")
    df = m.df
    expected, labels = {}, {t: set() for t in LVU_TASKS}
    for split in ("train", "test"):
        for vid, e in load(ann / "annotation" / f"{split}.json").items():
            for t in LVU_TASKS:
                if t in e:
                    expected[split] = expected.get(split, 0) + len(reference_windows(e["duration"]))
                    labels[t].add(e[t])
    assert res.splits == expected and res.rows == len(df) == sum(expected.values()) == 18722
    assert set(df.task) == set(LVU_TASKS)
    for t in LVU_TASKS:
        assert set(df.answer[df.task == t]) == labels[t]
    assert set(df.answer[df.task == "genre"]) == {"action", "comedy", "romance", "thriller"}
    assert df.sample_id.is_unique
    # windows: 100 s every 20 s while start + 100 <= duration, a single window for short videos
    assert (df.start_sec % 20 == 0).all() and ((df.end_sec - df.start_sec) <= 100).all()
    d = df[(df.video_id == "0Ij2veeSsE4") & (df.task == "director")]  # 162 s
    assert list(d.start_sec) == [0, 20, 40, 60] and list(d.end_sec) == [100, 120, 140, 160]
    assert list(d.sample_id) == [f"0Ij2veeSsE4_{s}_director" for s in (0, 20, 40, 60)]
    short = df[(df.video_id == "5v5JjUZpAPk") & (df.task == "way_speaking")]  # 42 s
    assert list(short.start_sec) == [0] and list(short.end_sec) == [42]
    assert set(df.video) == {f"{v}.mp4" for v in df.video_id}
    # a movie labelled for one task in train and another in test keeps distinct samples
    both = df[df.video_id == "-7uYlaqkkzw"]
    assert set(zip(both.split, both.task)) == {("train", "genre"), ("test", "way_speaking")}


def test_real_lvu_one_split_and_annotation_folder_forms(real, tmp_path):
    for ann in (real / "malmm", real / "malmm" / "lvu", real / "malmm" / "lvu" / "annotation"):
        res = convert("lvu", ann, None, split="test")
        assert res.splits == {"test": 3110}
    with pytest.raises(ConversionError, match="val.json"):
        convert("lvu", real / "malmm", None, split="val")


def test_real_breakfast(real, tmp_path):
    res = convert("breakfast", real / "malmm", tmp_path, out=tmp_path / "b.csv")
    df = read_manifest(tmp_path / "b.csv").df
    assert res.splits == {"train": 1354, "val": 355} and len(df) == 1709
    assert res.skipped == {"left out by the reference implementation": 3}
    assert set(df.answer) == {"cereal", "coffee", "fried egg", "juice", "milk", "pancake", "salat", "sandwich",
                              "scrambled egg", "tea"}
    assert df.start_sec.isna().all()
    row = df[df.sample_id == "P03-cam01-P03_cereals"].iloc[0]
    assert row.video == "P03/cam01/P03_cereals.avi" and row.video_duration == "56" and row.class_label == "0"


@pytest.mark.parametrize("benchmark,split,rows,videos", [("msrvtt-qa", "val", 12278, 497),
                                                         ("msvd-qa", "val", 6415, 245),
                                                         ("activitynet-qa", "test", 7960, 796)])
def test_real_qa(real, tmp_path, benchmark, split, rows, videos):
    res = convert(benchmark, real / "malmm", tmp_path, out=tmp_path / "qa.csv")
    df = read_manifest(tmp_path / "qa.csv").df
    assert res.splits == {split: rows} and res.videos == videos
    assert (df.question.str.len() > 0).all() and (df.answer.str.len() > 0).all()
    first = next(iter(load(res.sources[0]).values()))
    row = df.iloc[0]
    assert (row.question, row.answer) == (first["question"], str(first["answer"]))
    assert row.sample_id == f"{split}_{first['question_id']}"
    with pytest.raises(ConversionError, match="qa_train.json"):
        convert(benchmark, real / "malmm", None, split="train")


@pytest.mark.parametrize("benchmark,dataset,rows,refs", [("msrvtt-cap", "msrvtt", 497, 9940),
                                                         ("msvd-cap", "msvd", 100, 4290),
                                                         ("youcook2-cap", "youcook2", 3184, 3184)])
def test_real_captions_group_references(real, tmp_path, benchmark, dataset, rows, refs):
    res = convert(benchmark, real / "malmm", tmp_path, out=tmp_path / "cap.csv")
    m = read_manifest(tmp_path / "cap.csv")
    df = m.df
    assert res.splits == {"val": rows} and df.sample_id.is_unique
    lists = [m.references(r) for _, r in df.iterrows()]
    assert sum(map(len, lists)) == refs
    assert all(r.answer == refs_[0] for (_, r), refs_ in zip(df.iterrows(), lists))
    gt = load(real / "malmm" / dataset / "annotation" / "coco_gt" / "cap_val.json")
    first_id = gt["annotations"][0]["image_id"]
    assert lists[list(df.sample_id).index(first_id)] == [a["caption"] for a in gt["annotations"]
                                                         if a["image_id"] == first_id]
    if benchmark == "youcook2-cap":
        row = df[df.sample_id == "xHr8X2Wpmno_0047_0060"].iloc[0]
        assert (row.video, row.start_sec, row.end_sec, row.video_duration) == ("xHr8X2Wpmno.mp4", 47, 60, "206.86")
        assert (df.end_sec > df.start_sec).all()


def test_real_ek100_windows_and_class_names(real, tmp_path):
    from pipeline.metrics import pre_caption

    ann = real / "epic-kitchens-100"
    res = convert("ek100", ann, tmp_path, out=tmp_path / "ek.csv")
    df = read_manifest(tmp_path / "ek.csv").df
    n_actions = sum(1 for _ in open(ann / "EPIC_100_validation.csv")) - 1
    # every narration id is kept (the official evaluation scores all of them)
    assert (n_actions, res.skipped) == (9668, {})
    assert res.splits == {"val": 3 * n_actions} and res.tasks == {t: n_actions for t in ("verb", "noun", "action")}
    assert df.drop_duplicates("narration_id").shape[0] == n_actions
    early = df[df.observation_clamped == "true"]
    assert early.narration_id.nunique() == 28  # start within τa = 1 s of their video's start
    assert (early.start_sec == 0).all() and (early.end_sec == 0.001).all()
    assert (early.action_start_sec.astype(float) - 1 < 0.001).all()
    rows = df[df.narration_id == "P01_11_10"].set_index("task")  # take paper, starts at 00:00:49.15
    assert rows.loc["verb", "end_sec"] == pytest.approx(48.15) and rows.loc["verb", "start_sec"] == pytest.approx(32.15)
    assert (rows.loc["verb", "answer"], rows.loc["noun", "answer"], rows.loc["action", "answer"]) == \
        ("take", "paper", "take paper")
    assert (rows.loc["action", "verb_class"], rows.loc["action", "noun_class"], rows.loc["action", "action_class"]) \
        == ("0", "49", "0_49")
    assert rows.loc["verb", "video"] == "P01/videos/P01_11.MP4"
    assert float(rows.loc["verb", "video_duration"]) > 48
    verbs = {int(r["id"]): r["key"] for r in csv.DictReader(open(ann / "EPIC_100_verb_classes.csv"))}
    nouns = {int(r["id"]): r["key"] for r in csv.DictReader(open(ann / "EPIC_100_noun_classes.csv"))}
    v = df[df.task == "verb"]
    assert all(pre_caption(verbs[int(c)]) == a and verbs[int(c)] == k for c, a, k in zip(v.verb_class, v.answer, v.verb))
    n = df[df.task == "noun"]
    assert all(pre_caption(nouns[int(c)]) == a and nouns[int(c)] == k for c, a, k in zip(n.noun_class, n.answer, n.noun))
    obs = df.end_sec - df.start_sec
    assert (obs <= 16 + 1e-9).all() and (df.start_sec >= 0).all()
    late = df[df.observation_clamped == "false"]
    assert ((late.action_start_sec.astype(float) - late.end_sec).round(6) == 1).all()
    # no official tail / unseen lists in this folder: membership unknown, and the summary says so
    assert (df.unseen_participant == "").all() and (df.tail_class == "").all()
    assert any("EPIC_100_tail_verbs.csv" in note for note in res.notes)


# ============================================================================ hand-made files

def lvu_files(root: Path) -> Path:
    write_json(root / "lvu" / "annotation" / "train.json", {
        "vidA": {"subset": "train", "duration": 250, "num_frames": 3000, "genre": "Comedy.",
                 "genre_answer": "(a)", "relationship": "husband wife", "relationship_answer": "(c)"},
        "vidB": {"subset": "train", "duration": 100, "num_frames": 1200, "year": 8, "year_answer": "(i)"},
        "vidC": {"subset": "train", "duration": 42, "num_frames": 500, "scene": "prison"},
        "vidD": {"subset": "train", "duration": 60, "num_frames": 700},
    })
    write_json(root / "lvu" / "annotation" / "test.json", {
        "vidE": {"subset": "test", "duration": 119.5, "num_frames": 1400, "genre": "action"},
    })
    return root / "lvu"


def test_lvu_window_arithmetic_and_labels(tmp_path):
    ann = lvu_files(tmp_path / "ann")
    res = convert("lvu", ann, None)
    df = res.df.set_index("sample_id")
    a = df[(df.video_id == "vidA") & (df.task == "genre")]
    assert list(a.start_sec) == [str(s) for s in range(0, 151, 20)]  # 0 … 140 (140 + 100 <= 250 < 160 + 100)
    assert list(a.end_sec) == [str(s + 100) for s in range(0, 141, 20)]
    assert set(a.answer) == {"comedy"} and set(a.choice) == {"(a)"}
    assert list(a.window_id) == [f"vidA_{s}" for s in range(0, 141, 20)]
    assert len(df[(df.video_id == "vidA") & (df.task == "relationship")]) == 8
    assert df.loc["vidB_0_year", ["start_sec", "end_sec", "answer"]].tolist() == ["0", "100", "8"]
    assert df.loc["vidC_0_scene", ["start_sec", "end_sec", "choice"]].tolist() == ["0", "42", ""]
    e = df[df.video_id == "vidE"]
    assert list(e.start_sec) == ["0"] and list(e.end_sec) == ["100"] and set(e.split) == {"test"}
    assert e.video_duration.iloc[0] == "119.5"
    assert res.rows == 8 + 8 + 1 + 1 + 1 and res.skipped == {"entry without an LVU task label": 1}
    assert res.tasks == {"genre": 9, "relationship": 8, "year": 1, "scene": 1}
    assert not res.videos_checked and res.missing_list is None


def test_breakfast_official_layout_and_reference_exclusions(tmp_path):
    write_json(tmp_path / "bf" / "annotation" / "train.json", {
        "P03-cam01-P03_cereals": {"duration": 56, "frame_length": 558, "class_name": "cereal", "class_label": 0},
        "P28-cam01-P28_cereals": {"duration": 50, "frame_length": 500, "class_name": "cereal", "class_label": 0},
        "P27-stereo-P27_milk_ch0": {"duration": 50, "frame_length": 500, "class_name": "milk", "class_label": 8},
        "P04-webcam02-P04_tea": {"duration": 40, "frame_length": 400, "class_name": "Tea", "class_label": 2},
    })
    videos = tmp_path / "videos"
    touch(videos, "P03/cam01/P03_cereals.avi", "P04-webcam02-P04_tea.mp4")  # official nested, reference flat
    res = convert("breakfast", tmp_path / "bf", videos, out=tmp_path / "m" / "breakfast.csv")
    df = res.df.set_index("sample_id")
    assert list(df.index) == ["P03-cam01-P03_cereals", "P04-webcam02-P04_tea"]
    assert list(df.video) == ["P03/cam01/P03_cereals.avi", "P04-webcam02-P04_tea.mp4"]
    assert list(df.answer) == ["cereal", "tea"]
    assert res.skipped == {"left out by the reference implementation": 2} and res.missing_videos == 0
    # another camera's recording of the same breakfast is never taken for the missing one
    touch(videos, "P03/cam02/P03_cereals.avi")
    (videos / "P03/cam01/P03_cereals.avi").unlink()
    res = convert("breakfast", tmp_path / "bf", videos)
    assert res.missing_examples == ["P03/cam01/P03_cereals.avi"]


def coin_json(path: Path, database: dict) -> Path:
    return write_json(path, {"database": database})


COIN_DB = {
    "vid1": {"recipe_type": 7, "class": "MakeSandwich", "subset": "training", "duration": 120.5,
             "annotation": [{"id": "1", "segment": [1.0, 5.0], "label": "cut bread"}],
             "video_url": "https://www.youtube.com/embed/vid1"},
    "vid2": {"recipe_type": 9, "class": "ReplaceCDDriveWithSSD", "subset": "testing", "annotation": []},
    "vid3": {"recipe_type": 3, "class": "MakeRJ45Cable", "subset": "testing", "duration": 60},
    "AfiVmAjfTNs": {"recipe_type": 3, "class": "MakeRJ45Cable", "subset": "training"},
}


def test_coin_official_format(tmp_path):
    coin_json(tmp_path / "coin" / "annotation" / "COIN.json", COIN_DB)
    videos = tmp_path / "videos"
    touch(videos, "9/vid2.mp4", "vid3.webm")
    res = convert("coin", tmp_path / "coin", videos)
    df = res.df.set_index("sample_id")
    assert res.splits == {"train": 1, "test": 2}
    assert df.loc["vid1", ["answer", "class_name", "class_id", "video_duration"]].tolist() == \
        ["make sandwich", "MakeSandwich", "7", "120.5"]
    assert df.loc["vid2", "answer"] == "replace cd drive with ssd" and df.loc["vid3", "answer"] == "make rj45 cable"
    assert df.loc["vid2", "video"] == "9/vid2.mp4" and df.loc["vid3", "video"] == "vid3.webm"
    assert res.missing_videos == 1 and res.missing_examples == ["vid1.mp4"]
    assert res.skipped == {"left out by the reference implementation": 1}
    assert convert("coin", tmp_path / "coin", None, split="testing").splits == {"test": 2}
    assert convert("coin", tmp_path / "coin" / "annotation" / "COIN.json", None).rows == 3  # the file itself


@pytest.mark.parametrize("data,match", [
    ({"vid1": {}}, "'database'"),
    ({"database": {"v": {"class": "A", "subset": "dev"}}}, r"entry database\['v'\]: unknown 'subset' 'dev'"),
    ({"database": {"v": {"subset": "training"}}}, r"entry database\['v'\]: missing key 'class'"),
    ({"database": {"v": {"class": 3, "subset": "training"}}}, "'class' must be a string"),
    ({"database": {"v": {"class": "A", "subset": "training", "annotation": "x"}}}, "'annotation' must be a list"),
])
def test_coin_malformed(tmp_path, data, match):
    path = write_json(tmp_path / "COIN.json", data)
    with pytest.raises(ConversionError, match=match) as e:
        convert("coin", tmp_path, None)
    assert e.value.path == str(path)


def test_qa_formats(tmp_path):
    ann = tmp_path / "activitynet" / "annotation"
    write_json(ann / "qa_train.json", {
        "v_abc_0": {"answer": "yes", "answer_type": 3, "question": "is it raining", "question_id": "v_abc_0",
                    "video": "abc", "frame_length": 100},
        "v_abc_1": {"answer": 2, "answer_type": 4, "question": "how many dogs", "question_id": "v_abc_1",
                    "video": "abc", "frame_length": 100},
    })
    write_json(ann / "qa_test.json", [  # a list of entries works too; ids restart in every split file
        {"answer": "red", "question": "what colour is the car", "question_id": "v_abc_0", "video": "def"},
        {"answer": " ", "question": "what is empty", "video": "def"},
    ])
    videos = tmp_path / "videos"
    touch(videos, "v_abc.mkv")
    res = convert("activitynet-qa", tmp_path, videos, out=tmp_path / "qa.csv")
    df = read_manifest(tmp_path / "qa.csv").df.set_index("sample_id")
    assert list(df.index) == ["train_v_abc_0", "train_v_abc_1", "test_v_abc_0"]
    assert df.loc["train_v_abc_1", ["question", "answer", "answer_type"]].tolist() == ["how many dogs", "2", "4"]
    assert df.loc["train_v_abc_0", "video"] == "v_abc.mkv" and df.loc["test_v_abc_0", "video"] == "def.mp4"
    assert res.skipped == {"empty question or answer": 1} and res.missing_videos == 1
    assert convert("activitynet-qa", tmp_path, None, split="test").rows == 1


def caption_entry(i, vid, caption, ext=".mp4"):
    return {"image_id": vid + ext, "caption": caption, "id": i, "video": vid, "frame_length": 100}


def test_captions_train_rows_and_eval_grouping(tmp_path):
    ann = tmp_path / "msvd" / "annotation"
    write_json(ann / "cap_train.json", {str(i): caption_entry(i, v, c, ".avi") for i, (v, c) in enumerate(
        [("a_1_5", "A man is Cooking."), ("a_1_5", "someone  cooks"), ("b_2_9", "a cat (sleeps)")])})
    val = [("c_0_4", "a dog runs"), ("d_3_8", "a bird sings"), ("c_0_4", "the dog is running"),
           ("d_3_8", "bird singing")]
    write_json(ann / "cap_val.json", {str(i): caption_entry(i, v, c, ".avi") for i, (v, c) in enumerate(val)})
    res = convert("msvd-cap", tmp_path / "msvd", None)
    df = res.df.set_index("sample_id")
    assert res.splits == {"train": 3, "val": 2}
    assert df.loc["a_1_5#0", "answer"] == "a man is cooking" and df.loc["a_1_5#1", "answer"] == "someone cooks"
    assert df.loc["b_2_9#2", ["answer", "references", "video"]].tolist() == ["a cat sleeps", "", "b_2_9.avi"]
    assert json.loads(df.loc["c_0_4", "references"]) == ["a dog runs", "the dog is running"]
    assert df.loc["c_0_4", "answer"] == "a dog runs" and df.loc["d_3_8", "n_references"] == "2"
    # with a COCO ground truth beside it, evaluation references come from there (what is scored)
    write_json(ann / "coco_gt" / "cap_val.json", {
        "annotations": [{"image_id": "c_0_4", "caption": "a dog runs fast", "id": 0},
                        {"image_id": "d_3_8", "caption": "a bird sings", "id": 1},
                        {"image_id": "c_0_4", "caption": "dog running", "id": 2}],
        "images": [{"id": "c_0_4"}, {"id": "d_3_8"}]})
    df = convert("msvd-cap", tmp_path / "msvd", None, split="val").df.set_index("sample_id")
    assert json.loads(df.loc["c_0_4", "references"]) == ["a dog runs fast", "dog running"]
    assert json.loads(df.loc["d_3_8", "references"]) == ["a bird sings"]


def test_youcook2_segments_clipped(tmp_path):
    def seg(i, vid, s, e, dur, caption):
        return {"video": vid, "segment": f"{vid}_{s:04d}_{e:04d}", "id": i, "duration": dur, "start_time": s,
                "end_time": e, "frame_length": int(dur * 10), "recipe": "pasta", "caption": caption}
    segs = [seg(0, "yA", 10, 20, 100.5, "boil water"), seg(1, "yA", 90, 120, 100.5, "drain the pasta"),
            seg(2, "yB", 130, 140, 100.0, "beyond the end")]
    write_json(tmp_path / "youcook2" / "annotation" / "cap_val.json", {s["segment"]: s for s in segs})
    videos = tmp_path / "raw_videos"
    touch(videos, "validation/113/yA.mkv")  # the official downloader's nested layout
    res = convert("youcook2-cap", tmp_path, videos)
    df = res.df.set_index("sample_id")
    assert df.loc["yA_0010_0020", ["start_sec", "end_sec", "answer", "segment"]].tolist() == \
        ["10", "20", "boil water", "yA_0010_0020"]
    assert df.loc["yA_0090_0120", ["start_sec", "end_sec"]].tolist() == ["90", "100.5"]
    assert df.loc["yA_0010_0020", "video"] == "validation/113/yA.mkv"
    assert res.skipped == {"empty segment (end <= start after clipping to the video)": 1}
    assert res.rows == 2 and res.missing_videos == 0


EK_HEADER = ["narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
             "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun", "noun_class",
             "all_nouns", "all_noun_classes"]


def ek_row(nid, pid, vid, start, stop, verb, vc, noun, nc):
    return [nid, pid, vid, start, start, stop, 1, 2, f"{verb} {noun}", verb, vc, noun, nc, f"['{noun}']", f"[{nc}]"]


def ek_files(root: Path, rows=None) -> Path:
    write_csv(root / "EPIC_100_verb_classes.csv", ["id", "key", "instances", "category"],
              [[0, "take", "['take', 'grab']", "retrieve"], [1, "put", "['put', 'put-down']", "leave"]])
    write_csv(root / "EPIC_100_noun_classes.csv", ["id", "key", "instances", "category"],
              [[0, "tap", "['tap']", "appliances"], [1, "board:chopping", "['board:chopping']", "utensils"]])
    write_csv(root / "EPIC_100_video_info.csv", ["video_id", "duration", "fps", "resolution"],
              [["P01_01", "600.5", "59.94", "1920x1080"], ["P02_03", "90", "50", "1920x1080"]])
    write_csv(root / "EPIC_100_train.csv", EK_HEADER, rows if rows is not None else [
        ek_row("P01_01_0", "P01", "P01_01", "00:00:00.50", "00:00:02.00", "take", 0, "tap", 0),
        ek_row("P01_01_1", "P01", "P01_01", "00:00:01.00", "00:00:03.00", "take", 0, "tap", 0),
        ek_row("P01_01_2", "P01", "P01_01", "00:00:05.25", "00:00:07.00", "put-down", 1, "board:chopping", 1),
        ek_row("P01_01_3", "P01", "P01_01", "00:01:30.00", "00:01:31.50", "grab", 0, "board:chopping", 1),
    ])
    write_csv(root / "EPIC_100_validation.csv", EK_HEADER, [
        ek_row("P02_03_0", "P02", "P02_03", "00:00:20.00", "00:00:21.00", "put", 1, "tap", 0)])
    return root


def test_ek100_window_arithmetic_and_classes(tmp_path):
    ann = ek_files(tmp_path / "ann" / "epic-kitchens-100-annotations")  # a clone of the official repository
    assert convert("ek100", tmp_path / "ann", None).rows == 15  # found below a parent folder too
    videos = tmp_path / "EPIC-KITCHENS"
    touch(videos, "P01/videos/P01_01.MP4", "P02/P02_03.mp4")
    res = convert("ek100", ann, videos, out=tmp_path / "ek.csv")
    df = read_manifest(tmp_path / "ek.csv").df.set_index("sample_id")
    # every narration id is kept: the two starting within τa = 1 s (0.5 s and 1.0 s) observe the first frame only
    assert res.skipped == {} and res.splits == {"train": 12, "val": 3} and res.missing_videos == 0
    for nid in ("P01_01_0", "P01_01_1"):
        r = df.loc[f"{nid}_verb"]
        assert (r.start_sec, r.end_sec, r.observation_clamped) == (0, 0.001, "true")
    assert any("2 action(s) start within τa" in note for note in res.notes)
    r = df.loc["P01_01_2_verb"]  # starts 5.25 s: observe [0, 4.25]
    assert (r.start_sec, r.end_sec, r.answer, r.verb_class, r.narration_verb) == (0, 4.25, "put", "1", "put-down")
    assert r.observation_clamped == "false"
    # answers are class names processed as the reference's labels; the published keys stay in verb / noun
    assert df.loc["P01_01_2_noun", ["answer", "noun"]].tolist() == ["board chopping", "board:chopping"]
    assert df.loc["P01_01_2_action", ["answer", "action_class"]].tolist() == ["put board chopping", "1_1"]
    r = df.loc["P01_01_3_action"]  # starts 90 s: observe [73, 89]
    assert (r.start_sec, r.end_sec, r.action_start_sec, r.action_end_sec, r.video_duration) == \
        (73, 89, "90", "91.5", "600.5")
    assert (r.answer, r.verb, r.noun) == ("take board chopping", "take", "board:chopping")
    assert df.loc["P02_03_0_verb", "video"] == "P02/P02_03.mp4" and df.loc["P01_01_3_verb", "video"] == \
        "P01/videos/P01_01.MP4"
    # a shorter observation and τa are options
    df = convert("ek100", ann, None, split="val", observation_sec=8, anticipation_sec=2).df
    assert set(zip(df.start_sec, df.end_sec)) == {("10", "18")}


def test_ek100_window_clamped_under_a_millisecond(tmp_path):
    """An action 0.4 ms after τa would round to an empty window: it is clamped as well."""
    ann = ek_files(tmp_path, [ek_row("P01_01_0", "P01", "P01_01", "00:00:01.0004", "00:00:03.00", "take", 0, "tap", 0)])
    df = convert("ek100", ann, None, split="train").df
    assert set(zip(df.start_sec, df.end_sec, df.observation_clamped)) == {("0", "0.001", "true")}


def test_ek100_unseen_and_tail_subsets_from_the_official_lists(tmp_path):
    """Membership as the official evaluation defines it: unseen = participant in the validation list;
    tail verb / noun = class id in the tail list; tail action = tail verb or tail noun."""
    ann = ek_files(tmp_path, [
        ek_row("P01_01_5", "P01", "P01_01", "00:00:10.00", "00:00:12.00", "take", 0, "tap", 0),
        ek_row("P01_01_6", "P01", "P01_01", "00:00:20.00", "00:00:22.00", "put", 1, "tap", 0),
        ek_row("P01_01_7", "P01", "P01_01", "00:00:30.00", "00:00:32.00", "take", 0, "board:chopping", 1),
    ])
    write_csv(ann / "EPIC_100_validation.csv", EK_HEADER, [
        ek_row("P02_03_0", "P02", "P02_03", "00:00:20.00", "00:00:21.00", "put", 1, "tap", 0),
        ek_row("P01_01_9", "P01", "P01_01", "00:00:40.00", "00:00:41.00", "take", 0, "tap", 0)])
    write_csv(ann / "EPIC_100_unseen_participant_ids_validation.csv", ["participant_id"], [["P02"]])
    write_csv(ann / "EPIC_100_tail_verbs.csv", ["verb"], [[1]])
    write_csv(ann / "EPIC_100_tail_nouns.csv", ["noun"], [[1]])
    res = convert("ek100", ann, None)
    df = res.df.set_index("sample_id")
    assert not any("EPIC_100_tail" in n for n in res.notes)
    flags = {sid: (r.unseen_participant, r.tail_class) for sid, r in df.iterrows()}
    assert flags["P02_03_0_verb"] == ("true", "true") and flags["P02_03_0_noun"] == ("true", "false")
    assert flags["P02_03_0_action"] == ("true", "true")  # tail verb
    assert flags["P01_01_7_verb"] == ("false", "false") and flags["P01_01_7_noun"] == ("false", "true")
    assert flags["P01_01_7_action"] == ("false", "true")  # tail noun
    assert flags["P01_01_5_action"] == ("false", "false") and flags["P01_01_9_verb"] == ("false", "false")
    # a malformed list names the file and line
    write_csv(ann / "EPIC_100_tail_nouns.csv", ["noun"], [[1], ["x"]])
    with pytest.raises(ConversionError, match=r"EPIC_100_tail_nouns.csv, entry line 3: 'noun' must be a class id"):
        convert("ek100", ann, None)
    # one list missing: what it decides is unknown (empty: tail nouns and actions), the rest still set
    (ann / "EPIC_100_tail_nouns.csv").unlink()
    res = convert("ek100", ann, None)
    tail = res.df.groupby("task").tail_class.agg(set)
    assert (tail["noun"], tail["action"], tail["verb"]) == ({""}, {""}, {"true", "false"})
    assert set(res.df.unseen_participant) == {"true", "false"}
    assert any("EPIC_100_tail_nouns.csv" in n for n in res.notes)


def test_ek100_class_names_that_collide_once_processed(tmp_path):
    ann = ek_files(tmp_path)
    write_csv(ann / "EPIC_100_noun_classes.csv", ["id", "key", "instances", "category"],
              [[0, "board:chopping", "[]", "x"], [1, "board chopping", "[]", "x"]])
    with pytest.raises(ConversionError, match=r"EPIC_100_noun_classes.csv: classes 0 .* and 1 .* both become"):
        convert("ek100", ann, None, split="train")


@pytest.mark.parametrize("mutate,match", [
    (lambda rows: rows[0].__setitem__(4, "1:xx"), r"line 2 \(narration P01_01_0\): bad timestamp"),
    (lambda rows: rows[0].__setitem__(10, "7"), r"line 2 \(narration P01_01_0\): verb_class 7 is not in"),
    (lambda rows: rows[0].__setitem__(12, "x"), r"noun_class must be integers"),
])
def test_ek100_malformed_rows(tmp_path, mutate, match):
    rows = [ek_row("P01_01_0", "P01", "P01_01", "00:00:10.00", "00:00:12.00", "take", 0, "tap", 0)]
    mutate(rows)
    ann = ek_files(tmp_path, rows)
    with pytest.raises(ConversionError, match=match) as e:
        convert("ek100", ann, None, split="train")
    assert e.value.path == str(ann / "EPIC_100_train.csv")


def test_ek100_missing_column_missing_classes_and_no_test_labels(tmp_path):
    ann = ek_files(tmp_path)
    with pytest.raises(ConversionError, match="test labels are not public"):
        convert("ek100", ann, None, split="test")
    write_csv(ann / "EPIC_100_validation.csv", [c for c in EK_HEADER if c != "noun_class"], [])
    with pytest.raises(ConversionError, match=r"EPIC_100_validation.csv: missing column\(s\) noun_class"):
        convert("ek100", ann, None)
    (ann / "EPIC_100_noun_classes.csv").unlink()
    with pytest.raises(ConversionError, match="EPIC_100_noun_classes.csv is needed"):
        convert("ek100", ann, None, split="train")


# ============================================================================ missing videos

def test_missing_videos_reported_listed_and_manifest_still_written(tmp_path):
    ann = lvu_files(tmp_path / "ann")
    videos = tmp_path / "videos"
    touch(videos, "vidA.mp4", "vidB.MKV", "movies/vidE.webm", "frames/vidC.mp4")  # frames/ is not searched
    out = tmp_path / "manifests" / "lvu.csv"
    res = convert("lvu", ann, videos, out=out)
    assert res.videos == 4 and res.missing_videos == 1 and res.missing_examples == ["vidC.mp4"]
    assert res.missing_list == Path(str(out) + ".missing.txt")
    lines = res.missing_list.read_text().splitlines()
    assert lines[0].startswith("# 1 of 4 lvu videos not found") and lines[1:] == ["vidC\tvidC.mp4"]
    df = read_manifest(out, str(videos)).df
    assert len(df) == res.rows == 19  # every annotated sample, found or not
    assert dict(zip(df.video_id, df.video)) == {"vidA": "vidA.mp4", "vidB": "vidB.MKV", "vidC": "vidC.mp4",
                                               "vidE": "movies/vidE.webm"}
    text = str(res)
    assert "1 of 4 not found" in text and "vidC.mp4" in text and str(res.missing_list) in text
    assert f"malmm-pipeline extract --manifest {out} --video-root {videos}" in text
    # once the video is there, the list goes away; absolute paths on request
    touch(videos, "vidC.mp4")
    res = convert("lvu", ann, videos, out=out, absolute_paths=True)
    assert res.missing_videos == 0 and res.missing_list is None
    assert not Path(str(out) + ".missing.txt").exists()
    df = read_manifest(out).df
    assert set(df.video) == {str(videos.resolve() / p) for p in ("vidA.mp4", "vidB.MKV", "vidC.mp4",
                                                                  "movies/vidE.webm")}


def test_same_name_in_two_folders_is_not_guessed(tmp_path):
    ann = lvu_files(tmp_path / "ann")
    videos = tmp_path / "videos"
    touch(videos, "x/vidA.mp4", "y/vidA.mp4")
    res = convert("lvu", ann, videos)
    assert res.missing_videos == 4 and "vidA.mp4" in res.missing_examples
    assert any("several files of the same name" in n for n in res.notes)


def test_videos_folder_absent(tmp_path):
    ann = lvu_files(tmp_path / "ann")
    res = convert("lvu", ann, tmp_path / "nope", out=tmp_path / "lvu.csv")
    assert res.missing_videos == 4 and any("does not exist" in n for n in res.notes)
    assert (tmp_path / "lvu.csv").exists()


# ============================================================================ malformed files and errors

@pytest.mark.parametrize("text,match", [
    ('{"vidA": {"duration": 10, "genre": "comedy"', r"not valid JSON: .* at line 1"),
    ('["a", "b"]', r"entry \[0\]: expected an object, got string"),
    ('"just text"', "expected a JSON object of video entries, got string"),
    ('{"vidA": {"genre": "comedy"}}', r"entry 'vidA': missing key 'duration'"),
    ('{"vidA": {"duration": "162", "genre": "comedy"}}', r"entry 'vidA': 'duration' must be a number, got string"),
    ('{"vidA": {"duration": 0, "genre": "comedy"}}', "'duration' must be positive"),
    ('{"vidA": {"duration": 120, "genre": ["comedy"]}}', r"entry 'vidA': 'genre' must be a string, got list"),
])
def test_malformed_json_names_file_and_entry(tmp_path, text, match):
    path = tmp_path / "annotation" / "train.json"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(ConversionError, match=match) as e:
        convert("lvu", tmp_path, None)
    assert str(path) in str(e.value) and e.value.path == str(path)


def test_malformed_caption_and_qa_entries(tmp_path):
    write_json(tmp_path / "msrvtt" / "annotation" / "cap_val.json",
               {"0": {"image_id": "video1.mp4", "caption": "a cat", "id": 0}})
    with pytest.raises(ConversionError, match=r"cap_val.json, entry '0': missing key 'video'"):
        convert("msrvtt-cap", tmp_path, None)
    write_json(tmp_path / "msrvtt" / "annotation" / "qa_val.json",
               {"0000007": {"question": "what?", "answer": ["a", "b"], "video": "video1"}})
    with pytest.raises(ConversionError, match=r"qa_val.json, entry '0000007': 'answer' must be a string, got list"):
        convert("msrvtt-qa", tmp_path, None)
    write_json(tmp_path / "msrvtt" / "annotation" / "coco_gt" / "cap_val.json", {"images": []})
    write_json(tmp_path / "msrvtt" / "annotation" / "cap_val.json",
               {"0": {"image_id": "video1.mp4", "caption": "a cat", "id": 0, "video": "video1"}})
    with pytest.raises(ConversionError, match="coco_gt/cap_val.json: expected a COCO caption ground truth"):
        convert("msrvtt-cap", tmp_path, None)


def test_failed_conversion_leaves_an_existing_manifest_alone(tmp_path):
    out = tmp_path / "qa.csv"
    out.write_text("previous\n")
    write_json(tmp_path / "qa_val.json", [{"question": "q?", "answer": "a", "question_id": "1", "video": "v"},
                                          {"question": "r?", "answer": "b", "question_id": "1", "video": "v"}])
    with pytest.raises(ConversionError, match=r"duplicate sample id.*'val_1'.*entry \[1\].*entry \[0\]"):
        convert("msvd-qa", tmp_path, None, out=out)
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qa.csv", "qa_val.json"]  # no temp files left


def test_unknown_benchmark_split_and_folders(tmp_path):
    with pytest.raises(KeyError, match="synth"):
        convert("synthetic", tmp_path, None)
    with pytest.raises(KeyError, match="no converter"):
        convert("kinetics", tmp_path, None)
    with pytest.raises(ConversionError, match="unknown split 'dev'"):
        convert("lvu", tmp_path, None, split="dev")
    with pytest.raises(FileNotFoundError, match="annotations folder not found"):
        convert("lvu", tmp_path / "nope", None)
    with pytest.raises(ConversionError, match="must be a folder"):
        convert("lvu", write_json(tmp_path / "x" / "train.json", {}), None)
    with pytest.raises(ConversionError, match="no lvu annotation file found"):
        convert("lvu", tmp_path, None)
    with pytest.raises(ConversionError, match="no COIN annotation file found"):
        convert("coin", tmp_path, None)


def test_cli_manifest_command(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    ann = lvu_files(tmp_path / "ann")
    out = tmp_path / "lvu.csv"
    r = CliRunner().invoke(app, ["manifest", "lvu", "--annotations", str(ann), "--videos", str(tmp_path / "v"),
                                 "--split", "test", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "lvu: 1 samples (test 1)" in r.output and "next: malmm-pipeline extract" in r.output
    assert len(read_manifest(out)) == 1
    r = CliRunner().invoke(app, ["manifest", "lvu", "--annotations", str(ann), "--videos", str(tmp_path),
                                 "--split", "val"])
    assert r.exit_code != 0 and "val.json" in r.output
