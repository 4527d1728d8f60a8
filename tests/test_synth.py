"""The built-in synthetic benchmark (pipeline/synth.py): determinism, decodability, task rules,
memory-only answerability (nothing in the last frame gives the answer away), corpus vocabulary."""
from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import synth
from pipeline.sampling import SamplingPolicy, clip_frame_range, frame_indices

N_VIDEOS, SECONDS, SEED = 12, 16, 5


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    res = synth.generate(out, videos=N_VIDEOS, seconds=SECONDS, seed=SEED, workers=1, progress=False)
    assert res.videos == N_VIDEOS and res.samples == N_VIDEOS * len(synth.TASKS)
    return out


@pytest.fixture(scope="module")
def manifest(bench) -> pd.DataFrame:
    return _read(bench / "manifest.csv")


@pytest.fixture(scope="module")
def events(bench) -> dict[str, dict]:
    return {v["video_id"]: v for v in synth.read_events(bench)}


def _video_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "videos").glob("*"))}


def test_same_seed_is_byte_identical_also_with_a_process_pool(bench, tmp_path):
    again = tmp_path / "again"
    synth.generate(again, videos=N_VIDEOS, seconds=SECONDS, seed=SEED, workers=2, progress=False)
    assert (again / "manifest.csv").read_bytes() == (bench / "manifest.csv").read_bytes()
    assert (again / "events.jsonl").read_bytes() == (bench / "events.jsonl").read_bytes()
    assert _video_bytes(again) == _video_bytes(bench)
    assert len(_video_bytes(bench)) == N_VIDEOS  # no temporary files left behind
    assert not list(bench.glob("*.tmp"))


def test_different_seed_gives_different_benchmark(bench, tmp_path):
    other = tmp_path / "other"
    synth.generate(other, videos=N_VIDEOS, seconds=SECONDS, seed=SEED + 1, workers=1, progress=False)
    assert (other / "manifest.csv").read_bytes() != (bench / "manifest.csv").read_bytes()
    a, b = _video_bytes(bench), _video_bytes(other)
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a) >= N_VIDEOS - 1


def test_videos_decode_with_expected_frames_fps_and_size(bench, events):
    import decord

    for vid, v in events.items():
        vr = decord.VideoReader(str(bench / v["video"]))
        assert len(vr) == SECONDS * synth.DEFAULT_FPS == v["num_frames"]
        assert vr.get_avg_fps() == pytest.approx(synth.DEFAULT_FPS)
        assert vr[0].shape == (synth.DEFAULT_SIZE, synth.DEFAULT_SIZE, 3)


def test_manifest_columns_tasks_and_splits(bench, manifest, events):
    from pipeline.manifest import read_manifest

    assert list(manifest.columns) == list(synth.MANIFEST_COLUMNS)
    read_manifest(bench / "manifest.csv", str(bench), check_files=True)  # the project's validator accepts it
    assert manifest.sample_id.is_unique
    assert set(manifest.benchmark) == {"synthetic"}
    assert collections.Counter(manifest.task) == {t: N_VIDEOS for t in synth.TASKS}
    per_video = manifest.groupby("video").split.agg(set)
    assert all(len(s) == 1 for s in per_video)  # split is by video
    splits = collections.Counter(s for (s,) in per_video)
    assert splits == {"test": round(N_VIDEOS * 0.2), "train": N_VIDEOS - round(N_VIDEOS * 0.2)}
    for row in manifest.itertuples():
        assert row.sample_id == f"{Path(row.video).stem}_{row.task}"
        assert row.video == f"videos/{Path(row.video).stem}.mp4"
        assert (bench / row.video).exists()
        assert (row.references != "") == (row.task == "caption")
        assert (row.end_sec != "") == (row.task == "next_event")


def test_answers_follow_events(manifest, events):
    for row in manifest.itertuples():
        v = events[Path(row.video).stem]
        evs = v["events"]
        assert row.split == v["split"]
        assert evs[-1]["colour"] == evs[1]["colour"] and evs[-1]["shape"] == evs[1]["shape"]  # the rule
        assert len({e["colour"] for e in evs[:-1]}) == len(evs) - 1
        if row.task == "first_color":
            assert row.answer == evs[0]["colour"]
        elif row.task == "qa":
            colour = row.question.split()[-1]
            assert row.question == f"what shape was the object coloured {colour}"
            refs = [e for e in evs if e["colour"] == colour]
            assert len(refs) == 1, "the question's referent must be unique"
            assert refs[0]["index"] not in (1, len(evs) - 1)
            assert row.answer == refs[0]["shape"]
        elif row.task == "caption":
            assert row.answer == " , ".join(f"{e['colour']} {e['shape']}" for e in evs)
            assert json.loads(row.references) == [row.answer]
        else:
            assert row.answer == f"{evs[-1]['colour']} {evs[-1]['shape']}"


def test_next_event_clip_ends_before_the_final_event(manifest, events):
    rows = manifest[manifest.task == "next_event"]
    for row in rows.itertuples():
        v = events[Path(row.video).stem]
        final, observed = v["events"][-1], v["events"][-2]
        assert float(row.start_sec) == 0.0
        assert float(row.end_sec) < final["start_sec"]
        first, last = clip_frame_range(v["num_frames"], v["fps"], float(row.start_sec), float(row.end_sec))
        assert first == 0 and observed["start_frame"] < last <= final["start_frame"]


@pytest.mark.parametrize("n", [16, 20])
def test_uniform_sampling_sees_every_event_at_least_twice(manifest, events, n):
    for row in manifest.itertuples():
        v = events[Path(row.video).stem]
        start = float(row.start_sec) if row.start_sec else None
        end = float(row.end_sec) if row.end_sec else None
        idx, _ = frame_indices(SamplingPolicy("uniform", n), v["num_frames"], v["fps"], start, end)
        evs = v["events"][:-1] if row.task == "next_event" else v["events"]
        for e in evs:
            hits = ((idx >= e["start_frame"]) & (idx < e["end_frame"])).sum()
            assert hits >= 2, (row.sample_id, e, idx)


def _near(frame: np.ndarray, colour: str, tol: float = 60.0) -> int:
    rgb = np.array(synth.COLOURS[colour], np.float32)
    return int((np.linalg.norm(frame.astype(np.float32) - rgb, axis=-1) < tol).sum())


def test_last_frames_do_not_show_the_answers_colour(bench, manifest, events):
    """What a no-memory model sees (the last sampled frame of the row's clip) never shows the
    first object's colour (whole-video rows) nor the final event's colour (next_event rows)."""
    import decord

    policy = SamplingPolicy("uniform", 20)
    for vid, v in events.items():
        vr = decord.VideoReader(str(bench / v["video"]))
        first, second, final = v["events"][0], v["events"][1], v["events"][-1]
        whole_last = [len(vr) - 1, int(frame_indices(policy, len(vr), v["fps"])[0][-1])]
        for i in whole_last:
            frame = vr[i].asnumpy()
            assert _near(frame, first["colour"]) == 0, (vid, i)
            assert _near(frame, final["colour"]) > 100  # the object is visible and its colour detectable
        end = float(manifest.set_index("sample_id").at[f"{vid}_next_event", "end_sec"])
        i = int(frame_indices(policy, len(vr), v["fps"], 0.0, end)[0][-1])
        frame = vr[i].asnumpy()
        assert _near(frame, second["colour"]) == 0, (vid, i)  # the answer's colour
        assert _near(frame, v["events"][-2]["colour"]) > 100


def test_answers_are_balanced_within_each_split():
    videos = synth.plan(600, seconds=30, seed=11)
    rows = pd.DataFrame([r for v in videos for r in synth.samples_of(v)])
    sizes = {"first_color": len(synth.COLOURS), "qa": len(synth.SHAPES),
             "next_event": len(synth.COLOURS) * len(synth.SHAPES)}
    for task, k in sizes.items():
        for split in ("train", "test"):
            counts = rows[(rows.task == task) & (rows.split == split)].answer.value_counts()
            assert len(counts) == k and counts.max() - counts.min() <= 1, (task, split, counts)
    assert synth.CHANCE["first_color"] == pytest.approx(1 / 6)
    assert synth.CHANCE["next_event"] == pytest.approx(1 / 24)


def _visible(video: dict, task: str) -> tuple[str, str]:
    """The event on the last sampled frame of the row's clip."""
    e = video["events"][-2] if task == "next_event" else video["events"][-1]
    return e["colour"], e["shape"]


def test_no_memory_predictor_stays_near_the_documented_ceiling():
    """A Bayes-optimal predictor from (question, event on the last frame), fitted on one seed and
    scored on another, reaches the documented ceiling and no more (answers need memory)."""
    def table(seed):
        return [(r["task"], r["question"], _visible(v, r["task"]), r["answer"])
                for v in synth.plan(3000, seconds=30, seed=seed) for r in synth.samples_of(v)]

    fit = collections.defaultdict(collections.Counter)
    for task, q, seen, answer in table(1):
        fit[task, q, seen][answer] += 1
    hits = collections.defaultdict(list)
    for task, q, seen, answer in table(2):
        guess = fit[task, q, seen].most_common(1)[0][0] if fit[task, q, seen] else ""
        hits[task].append(guess == answer)
    for task in ("first_color", "qa", "next_event"):
        acc = float(np.mean(hits[task]))
        assert acc <= synth.NO_MEMORY_CEILING[task] + 0.03, (task, acc)
        assert synth.CHANCE[task] <= synth.NO_MEMORY_CEILING[task] <= 1.5 * synth.CHANCE[task]
    assert np.mean(hits["caption"]) < 0.01


def test_prompts_match_the_benchmark_registry():
    from pipeline.benchmarks import protocol

    for task in synth.TASKS:
        assert protocol("synthetic", task).prompt == synth.PROMPTS[task]
    # the qa prompt ends with the colour it asks about (the tiny LLM reads by content from there)
    assert synth.render_prompt("qa", synth.question("qa", "red")) == "what shape was the object coloured red"


def test_corpus_uses_only_vocabulary_words_and_the_manifest_forms(manifest):
    vocab = set(synth.vocabulary())
    texts = synth.lm_corpus(400, seed=1)
    assert texts == synth.lm_corpus(400, seed=1) and texts != synth.lm_corpus(400, seed=2)
    prompts = {t: synth.render_prompt(t, synth.question(t, "{colour}")).split("{colour}")[0] for t in synth.TASKS}
    seen = collections.Counter()
    for text in texts:
        assert set(text.split()) - {"<s>"} <= vocab, text
        frames, rest = text.split(" <s> ", 1)  # the frames stand where the video tokens go
        words = frames.split()
        assert len(words) == 12  # one word per frame the model sees: its object, colour_shape
        assert all(w.split("_")[0] in synth.COLOURS and w.split("_")[1] in synth.SHAPES for w in words)
        # each text goes on with a prompt exactly as the pipeline renders it
        seen.update(t for t, p in prompts.items() if rest.startswith(p))
    assert set(seen) == set(synth.TASKS) and min(seen.values()) > 50
    for row in manifest.itertuples():
        prompt = synth.render_prompt(row.task, row.question)
        assert set(prompt.split()) | set(row.answer.split()) <= vocab
        assert all(w == w.lower() for w in prompt.split())
    for text in texts:
        frames, rest = text.split(" <s> ", 1)
        pairs = [w.replace("_", " ") for w in frames.split()]
        events = [p for i, p in enumerate(pairs) if i == 0 or p != pairs[i - 1]]
        if rest.startswith("what happens next ?"):  # the rule: the final event repeats the second
            assert rest.split("? ")[1] == events[1]
        elif rest.startswith("what colour was the first object ?"):
            assert rest.split("? ")[1] == pairs[0].split()[0]
        elif rest.startswith("what does the video describe ?"):
            assert rest.split("? ")[1] == " , ".join(events)
        else:  # qa: the shape of the one frame object of the colour the prompt ends with
            prompt, answer = rest.rsplit(" ", 1)
            assert prompt.startswith("what shape was the object coloured ")
            assert {p.split()[1] for p in pairs if p.split()[0] == prompt.split()[-1]} == {answer}


def test_sampled_events_follow_the_uniform_frames_of_the_rows_clip():
    video = synth.plan(4, seconds=16, seed=2)[0]
    whole = synth.sampled_events(video, "first_color", 12)
    assert len(whole) == 12 and whole[0] is video["events"][0] and whole[-1] is video["events"][-1]
    assert [e["index"] for e in whole] == sorted(e["index"] for e in whole)  # in order
    assert {e["index"] for e in whole} == set(range(len(video["events"])))  # every event is seen
    observed = synth.sampled_events(video, "next_event", 12)
    assert observed[-1] is video["events"][-2]  # the anticipation clip stops before the final event


def test_frame_corpus_pairs_answer_the_drawn_object():
    frames, pairs = synth.frame_corpus(60, seed=4)
    assert frames.shape == (60, synth.DEFAULT_SIZE, synth.DEFAULT_SIZE, 3) and frames.dtype == np.uint8
    again, _ = synth.frame_corpus(60, seed=4)
    assert np.array_equal(frames, again)
    for frame, (prompt, answer) in zip(frames, pairs):
        if prompt.startswith("what colour"):  # the frame holds pixels of exactly that colour
            assert (frame == np.array(synth.COLOURS[answer], np.uint8)).all(-1).sum() > 50
        elif prompt.startswith("what does"):
            colour, shape = answer.split()
            assert colour in synth.COLOURS and shape in synth.SHAPES
        else:
            colour = prompt.split()[-1]
            assert answer in synth.SHAPES and prompt == synth.render_prompt("qa", synth.question("qa", colour))
            assert (frame == np.array(synth.COLOURS[colour], np.uint8)).all(-1).sum() > 50


def test_too_short_videos_are_refused_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="frames"):
        synth.generate(tmp_path, videos=2, seconds=2, workers=1, progress=False)


def test_generate_into_an_object_store_gives_the_same_bytes(tmp_path, bucket):
    from pipeline import storage
    synth.generate(tmp_path / "local", videos=3, seconds=12, seed=5, workers=1, progress=False)
    res = synth.generate(f"{bucket}/synth", videos=3, seconds=12, seed=5, workers=1, progress=False)
    assert str(res.manifest) == f"{bucket}/synth/manifest.csv"
    local = {p.relative_to(tmp_path / "local").as_posix(): p.read_bytes()
             for p in (tmp_path / "local").rglob("*") if p.is_file()}
    remote = {str(p)[len(f"{bucket}/synth/"):]: storage.read_bytes(p) for p in storage.walk_files(f"{bucket}/synth")}
    assert remote == local and len(local) == 5
    assert synth.read_events(f"{bucket}/synth") == synth.read_events(tmp_path / "local")
