"""The built-in synthetic long-video benchmark: real H.264 videos whose
questions can only be answered with long-term memory.

Every video is a sequence of K events (K = 4 … 6 by default) of equal length that fill
the whole video. An event shows one object — a colour from :data:`COLOURS` and a shape
from :data:`SHAPES`, drawn with numpy — drifting in one of four directions over a plain
grey background. Events are long enough that uniform sampling of 16 or more frames over
the video (or over an anticipation clip) hits every event at least twice.

Rules of a video (they make the tasks below answerable with memory only):

* the first K-1 events have K-1 *distinct* colours (so "the red object" is unique);
* **the final event repeats the second event** (same colour and shape; direction,
  position and size drawn afresh). The final event copies the *second* event, not the
  first, so that the first object's colour never appears at the end of the video.

Tasks (one manifest row per video and task; one task of each benchmark family):

=============  ==============  ===========================================  ===================
task           family          question (manifest ``question`` column)      answer
=============  ==============  ===========================================  ===================
first_color    classification  what colour was the first object ?           colour of event 0
qa             qa              what shape was the object coloured {colour}  shape of event i,
                                                                            i in {0, 2 … K-2}
caption        caption         what does the video describe ?               "red circle , blue
                                                                            square , …" (all K)
next_event     anticipation    what happens next ?                          "colour shape" of
                                                                            the final event
=============  ==============  ===========================================  ===================

Why each task needs memory — a model that sees only the last sampled frame of the row's
clip (MA-LMM's "no memory" ablation) sees the final event (whole-video rows) or event
K-2 (``next_event`` rows, whose clip ends ``anticipation_sec`` before the final event
starts, as EPIC-Kitchens' τa):

* ``first_color``: the last frame shows the second event's copy; the first colour is
  never the same (colours differ), so the last frame only rules out one colour:
  best no-memory accuracy 1/5 against chance 1/6.
* ``qa``: asks about event 0 or an event 2 … K-2, never about event 1 (visible again at
  the end) nor the final one; shapes are drawn independently of everything visible, so
  the last frame and the question together carry no information: 1/4 = chance.
* ``caption``: the ordered list of all K events; the last frame shows one of them.
* ``next_event``: the answer is the second event, seen long before the clip ends; the
  clip's last frame (event K-2) has another colour, which rules out one of six colours:
  best no-memory accuracy 1/20 against chance 1/24.

Answers are balanced within each split (every colour / shape / colour-shape pair equally
often, up to one). :data:`CHANCE` gives the accuracy of a uniform guess and
:data:`NO_MEMORY_CEILING` the best accuracy a model can reach from the last frame and
the question (Bayes-optimal, from the rules above).

Text is lower case with punctuation as separate, space-separated tokens, so that a
word-level tokenizer reads every prompt, answer and :func:`lm_corpus` text with the
words of :func:`vocabulary`.

Files written by :func:`generate` into ``out_dir``: ``videos/{video_id}.mp4`` (libx264,
yuv420p, one encoder thread: the same seed gives byte-identical files), ``manifest.csv``
(the README's data contracts) and ``events.jsonl`` (each video's ground-truth events), each written under
a temporary name and renamed when complete.
"""
from __future__ import annotations

import csv
import io
import json
import multiprocessing as mp
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.sampling import SamplingPolicy, frame_indices

from pipeline import storage

# ----------------------------------------------------------------------------------------------
# Vocabulary, questions and prompts
# ----------------------------------------------------------------------------------------------

BENCHMARK = "synthetic"
TASKS = ("first_color", "qa", "caption", "next_event")

#: colour word → RGB; six clearly distinct saturated colours (they survive 4:2:0 chroma subsampling)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 60, 235),
    "yellow": (240, 225, 30),
    "purple": (190, 40, 220),
    "cyan": (30, 215, 215),
}
SHAPES = ("circle", "square", "triangle", "cross")
DIRECTIONS = ("left", "right", "up", "down")  # motion only; never part of a question or answer

#: the ``question`` column of each task ({colour} is filled in for qa)
QUESTIONS = {
    "first_color": "what colour was the first object ?",
    # the key word ends the question: see PROMPTS
    "qa": "what shape was the object coloured {colour}",
    "caption": "what does the video describe ?",
    "next_event": "what happens next ?",
}

#: prompt templates (task → template over {question}); the same as pipeline.benchmarks declares.
#: Every prompt is the bare question. The qa question ends with the colour it asks about, because
#: the tiny default's 2-layer LLM reads an answer out of its context by content from the last
#: prompt token: with the colour last it answered 100 % of qa texts with the true context after
#: pretraining; with the colour 1 or 5 tokens before the end (``… coloured red ?`` or
#: ``Question: what shape was the red object ? Short answer:``) 66 % and 55-61 % (measured; the
#: extra positional hop is not learnt in a pretraining of minutes).
PROMPTS = {
    "first_color": "{question}",
    "qa": "{question}",
    "caption": "{question}",
    "next_event": "{question}",
}

#: accuracy (top-1 exact match) of a uniform guess over each task's answers
CHANCE = {
    "first_color": 1 / len(COLOURS),               # 1/6
    "qa": 1 / len(SHAPES),                         # 1/4
    "next_event": 1 / (len(COLOURS) * len(SHAPES)),  # 1/24
    "caption": 0.0,                                # exact match of a guessed caption: < 1e-4 (scored by METEOR/CIDEr)
}

#: best top-1 accuracy reachable from the last sampled frame of the row's clip plus the question
#: (the "no memory" ablation's ceiling), following from the rules in the module docstring
NO_MEMORY_CEILING = {
    "first_color": 1 / (len(COLOURS) - 1),               # 1/5: the visible colour is never the answer
    "qa": 1 / len(SHAPES),                               # 1/4: nothing visible says anything about the shape
    "next_event": 1 / ((len(COLOURS) - 1) * len(SHAPES)),  # 1/20: the visible colour is never the answer's
    "caption": 0.0,                                      # only the final event of K is visible
}

# Demo / CLI defaults (a few fps of tiny frames keep 2000 videos within minutes on 2 cores)
DEFAULT_VIDEOS = 200
DEFAULT_SECONDS = 30.0
DEFAULT_FPS = 4
DEFAULT_SIZE = 64
DEFAULT_EVENTS = (4, 6)  # min, max events per video
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_ANTICIPATION_SEC = 1.0  # observation ends this long before the final event (capped, see generate)


def question(task: str, colour: str | None = None) -> str:
    """The question of ``task`` (qa needs the referent's ``colour``)."""
    return QUESTIONS[task].format(colour=colour) if task == "qa" else QUESTIONS[task]


def render_prompt(task: str, question_text: str) -> str:
    """The prompt the LLM reads for a manifest row: ``PROMPTS[task]`` filled with its question."""
    return PROMPTS[task].format(question=question_text)


def object_token(colour: str, shape: str) -> str:
    """The one word that names an object in the tiny LLM's context (``red_circle``): one video
    token per sampled frame (see :func:`lm_corpus`)."""
    return f"{colour}_{shape}"


def describe(events) -> str:
    """Events as the caption words use them: ``red circle , blue square , …``."""
    return " , ".join(f"{e['colour']} {e['shape']}" for e in events)


def vocabulary() -> list[str]:
    """Every word (space-separated token) that can occur in a prompt, answer or :func:`lm_corpus` text.

    Besides those exact tokens ("Question:", "answer:" …) the list also holds their lower-case
    and punctuation-split pieces ("question", "answer", ":"), so a word-level tokenizer built from
    it works with either whitespace-only or punctuation-splitting pre-tokenization.
    """
    words: dict[str, None] = {}
    texts = [*COLOURS, *SHAPES, ",", ".", *(object_token(c, sh) for c in COLOURS for sh in SHAPES)]
    for task in TASKS:
        for colour in COLOURS:
            texts.append(render_prompt(task, question(task, colour)))
    for text in texts:
        for w in text.split():
            words[w] = None
    for w in list(words):
        for piece in re.findall(r"\w+|[^\w\s]", w.lower()):
            words[piece] = None
        words[w.lower()] = None
    return list(words)


# ----------------------------------------------------------------------------------------------
# Planning: events and answers of every video (cheap, done up front in the parent process)
# ----------------------------------------------------------------------------------------------

def _rng(seed: int, *path: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, *path]))


def _balanced(values: list, m: int, rng: np.random.Generator) -> list:
    """``m`` items of ``values``, each equally often (up to one), in random order."""
    out = list(values) * (m // len(values))
    extra = rng.choice(len(values), size=m % len(values), replace=False)
    out += [values[i] for i in extra]
    return [out[i] for i in rng.permutation(m)]


def _plan_events(rng: np.random.Generator, k: int, *, first_colour: str | None = None,
                 second: tuple[str, str] | None = None, qa_shape: str | None = None) -> tuple[list[dict], int]:
    """Colours, shapes and directions of the ``k`` events of a video, and the qa referent's index.

    Events 0 … k-2 get distinct colours; the final event repeats event 1 (colour and shape).
    ``first_colour``, ``second`` = (colour, shape) and ``qa_shape`` pin the answers (balancing).
    """
    names = list(COLOURS)
    if not 4 <= k <= len(names) + 1:
        raise ValueError(f"a video needs 4 … {len(names) + 1} events, got {k}")
    c0 = first_colour or names[rng.integers(len(names))]
    if second is None:
        rest = [c for c in names if c != c0]
        second = (rest[rng.integers(len(rest))], SHAPES[rng.integers(len(SHAPES))])
    c1, s1 = second
    if c1 == c0:
        raise ValueError("the second event must not have the first event's colour")
    rest = [c for c in names if c not in (c0, c1)]
    others = [rest[i] for i in rng.permutation(len(rest))[:k - 3]]
    colours = [c0, c1, *others]
    shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=k - 1)]
    shapes[1] = s1
    candidates = [0, *range(2, k - 1)]  # never event 1 (seen again at the end) nor the final event
    qa_index = candidates[rng.integers(len(candidates))]
    if qa_shape is not None:
        shapes[qa_index] = qa_shape
    colours.append(c1)
    shapes.append(s1)
    directions = [DIRECTIONS[i] for i in rng.integers(len(DIRECTIONS), size=k)]
    events = [{"colour": c, "shape": s, "direction": d} for c, s, d in zip(colours, shapes, directions)]
    return events, qa_index


def _fix_collisions(first: list[str], second: list[tuple[str, str]], rng: np.random.Generator) -> None:
    """Swap entries of ``second`` (in place) until no video has first colour == second colour."""
    m = len(first)
    for j in range(m):
        if first[j] != second[j][0]:
            continue
        for k in rng.permutation(m):
            if first[k] != second[j][0] and second[k][0] != first[j]:
                second[j], second[k] = second[k], second[j]
                break
        else:  # tiny splits only: give up exact balance
            rest = [c for c in COLOURS if c != first[j]]
            second[j] = (rest[rng.integers(len(rest))], second[j][1])


def _frame_count(seconds: float, fps: float) -> int:
    return int(round(seconds * fps))


def plan(videos: int, *, seconds: float = DEFAULT_SECONDS, seed: int = 0, fps: float = DEFAULT_FPS,
         size: int = DEFAULT_SIZE, test_fraction: float = DEFAULT_TEST_FRACTION,
         events: tuple[int, int] = DEFAULT_EVENTS, anticipation_sec: float = DEFAULT_ANTICIPATION_SEC) -> list[dict]:
    """Everything about every video except its pixels: id, split, timeline, events, answers.

    Deterministic in its arguments; :func:`generate` renders and writes what this returns.
    """
    n_frames = _frame_count(seconds, fps)
    k_min, k_max = events
    if videos < 1:
        raise ValueError(f"videos must be at least 1, got {videos}")
    if not 4 <= k_min <= k_max <= len(COLOURS) + 1:
        raise ValueError(f"events must satisfy 4 <= min <= max <= {len(COLOURS) + 1}, got {events}")
    if n_frames < 8 * k_max:
        raise ValueError(f"{seconds} s at {fps} fps gives {n_frames} frames; need at least {8 * k_max} "
                         f"(8 per event) so that sampling sees every event: use longer videos or a higher fps")
    if not 0 <= test_fraction <= 1:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")

    order = _rng(seed, 1).permutation(videos)
    n_test = int(round(videos * test_fraction))
    split_of = {int(i): ("test" if r < n_test else "train") for r, i in enumerate(order)}

    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    pinned: dict[int, tuple] = {}
    for si, split in enumerate(("train", "test")):
        members = sorted(i for i, s in split_of.items() if s == split)
        if not members:
            continue
        rng = _rng(seed, 2, si)
        first = _balanced(list(COLOURS), len(members), rng)
        second = _balanced(pairs, len(members), rng)
        qa = _balanced(list(SHAPES), len(members), rng)
        _fix_collisions(first, second, rng)
        for j, i in enumerate(members):
            pinned[i] = (first[j], second[j], qa[j])

    out = []
    for i in range(videos):
        rng = _rng(seed, 3, i)
        k = int(rng.integers(k_min, k_max + 1))
        first, second, qa_shape = pinned[i]
        evs, qa_index = _plan_events(rng, k, first_colour=first, second=second, qa_shape=qa_shape)
        observe_end = _lay_out(evs, n_frames, fps, anticipation_sec)
        vid = f"v{i:05d}"
        out.append({
            "video_id": vid, "video": f"videos/{vid}.mp4", "split": split_of[i], "index": i, "seed": seed,
            "fps": fps, "num_frames": n_frames, "seconds": n_frames / fps, "size": size,
            "events": evs, "qa_index": qa_index,
            "observe_end_frame": observe_end, "observe_end_sec": observe_end / fps,
        })
    return out


def _lay_out(evs: list[dict], n_frames: int, fps: float, anticipation_sec: float) -> int:
    """Give the events equal consecutive spans of the video's frames (in place); return the frame
    where ``next_event`` observation ends: ``anticipation_sec`` (at most a quarter of event K-2)
    before the final event starts."""
    k = len(evs)
    bounds = [round(j * n_frames / k) for j in range(k + 1)]
    for j, e in enumerate(evs):
        e.update(index=j, start_frame=bounds[j], end_frame=bounds[j + 1],
                 start_sec=bounds[j] / fps, end_sec=bounds[j + 1] / fps)
    observed_last = bounds[k - 1] - bounds[k - 2]  # length of event K-2, the last one observed
    gap = min(int(round(anticipation_sec * fps)), observed_last // 4)
    return bounds[k - 1] - max(0, gap)


def samples_of(video: dict) -> list[dict]:
    """The manifest rows of one planned video, one per task."""
    evs = video["events"]
    rows = []
    for task in TASKS:
        start = end = ""
        refs = ""
        if task == "first_color":
            q, a = question(task), evs[0]["colour"]
        elif task == "qa":
            ref = evs[video["qa_index"]]
            q, a = question(task, ref["colour"]), ref["shape"]
        elif task == "caption":
            q, a = question(task), describe(evs)
            refs = json.dumps([a])
        else:  # next_event: observe events 0 … K-2 only; the answer is the final event
            q, a = question(task), f"{evs[-1]['colour']} {evs[-1]['shape']}"
            start, end = repr(0.0), repr(video["observe_end_sec"])
        rows.append({"sample_id": f"{video['video_id']}_{task}", "benchmark": BENCHMARK, "task": task,
                     "split": video["split"], "video": video["video"], "start_sec": start, "end_sec": end,
                     "question": q, "answer": a, "references": refs})
    return rows


MANIFEST_COLUMNS = ("sample_id", "benchmark", "task", "split", "video", "start_sec", "end_sec",
                    "question", "answer", "references")


# ----------------------------------------------------------------------------------------------
# Rendering and encoding
# ----------------------------------------------------------------------------------------------

def shape_mask(shape: str, s: int) -> np.ndarray:
    """Boolean [s, s] mask of ``shape`` filling an s×s box."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    c = s / 2
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= (s / 2) ** 2
    if shape == "square":
        m = np.zeros((s, s), bool)
        b = max(1, s // 10)
        m[b:s - b, b:s - b] = True
        return m
    if shape == "triangle":  # apex up, base at the bottom
        return (yy >= 0) & (np.abs(xx - c) <= yy / 2)
    if shape == "cross":  # a plus sign with arms a third of the box wide
        t = s / 6
        return (np.abs(xx - c) <= t) | (np.abs(yy - c) <= t)
    raise ValueError(f"unknown shape {shape!r}")


#: object size as a fraction of the frame side (drawn per event)
OBJECT_SIZE = (0.50, 0.55)
#: how far an object drifts during its event, as a fraction of the free space around it. Small on
#: purpose: a frozen random ViT (the tiny default) encodes shape only where the object is, so a
#: shape that wanders over the whole frame is not linearly readable from its features (measured
#: with linear probes on the tiny ViT's tokens, mean-pooled: 36 % shape accuracy at full travel, 78 % at
#: 0.25, 93 % at 0.1; colour is 100 % at any travel).
MOTION = 0.1


def _draw_event(frames: np.ndarray, e: dict, rng: np.random.Generator) -> None:
    """Draw event ``e`` (its object drifting in its direction) into ``frames[start_frame:end_frame]``."""
    size = frames.shape[1]
    s = int(round(size * rng.uniform(*OBJECT_SIZE)))
    mask = shape_mask(e["shape"], s)
    colour = np.array(COLOURS[e["colour"]], np.uint8)
    lo, hi = 1, size - s - 1  # top-left corner range that keeps the object inside the frame
    mid = (lo + hi) / 2
    travel = MOTION * (hi - lo) / 2
    across = mid + rng.uniform(-0.5, 0.5) * travel
    n = e["end_frame"] - e["start_frame"]
    sign = -1 if e["direction"] in ("left", "up") else 1
    for j in range(n):
        along = mid + sign * travel * (2 * (j + 0.5) / n - 1)
        y, x = (across, along) if e["direction"] in ("left", "right") else (along, across)
        y, x = int(round(y)), int(round(x))
        frames[e["start_frame"] + j, y:y + s, x:x + s][mask] = colour


def render_frames(video: dict) -> np.ndarray:
    """The RGB frames [T, size, size, 3] uint8 of a planned video (deterministic)."""
    size = video["size"]
    rng = _rng(video["seed"], 4, video["index"])
    grey = int(rng.integers(50, 91))
    frames = np.full((video["num_frames"], size, size, 3), grey, np.uint8)
    for e in video["events"]:
        _draw_event(frames, e, rng)
    return frames


def frame_corpus(n: int, *, seed: int = 0, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """``n`` single frames of random objects with (prompt, answer) pairs about them, for pretraining
    the tiny default's Q-Former on images (as InstructBLIP is pretrained before MA-LMM starts from it).

    An image is a static video of one event: its questions are the benchmark's, answered from the
    one object: the first colour, the caption ``colour shape``, and the shape of the object of that
    colour. Returns (frames ``[n, size, size, 3]`` uint8, [(prompt, answer)]).
    """
    rng = _rng(seed, 6)
    frames = np.empty((n, size, size, 3), np.uint8)
    pairs = []
    kinds = ("first_color", "caption", "qa")
    for i in range(n):
        colour, shape = list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
        e = {"colour": colour, "shape": shape, "direction": DIRECTIONS[rng.integers(len(DIRECTIONS))],
             "start_frame": 0, "end_frame": int(rng.integers(2, 12))}
        clip = np.full((e["end_frame"], size, size, 3), int(rng.integers(50, 91)), np.uint8)
        _draw_event(clip, e, rng)
        frames[i] = clip[rng.integers(len(clip))]
        task = kinds[i % len(kinds)]
        answer = {"first_color": colour, "caption": f"{colour} {shape}", "qa": shape}[task]
        pairs.append((render_prompt(task, question(task, colour)), answer))
    return frames, pairs


def _encode(path: Path, frames: np.ndarray, fps: float, gop: int) -> int:
    """Write frames as H.264 (libx264, yuv420p, one thread) mp4 to ``path`` atomically; return its size."""
    import av  # heavy: imported on use (only when videos are written)

    with storage.atomic_path(path, ".mp4", mode=storage.UMASK) as tmp:
        rate = Fraction(fps).limit_denominator(1001)
        out = av.open(str(tmp), mode="w", format="mp4")
        try:
            stream = out.add_stream("libx264", rate=rate)
            stream.width = stream.height = frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.thread_count = 1
            # mbtree=0: with macroblock-tree rate control x264 output at these tiny sizes depends on
            # uninitialised memory (measured: the same frames gave up to 5 different files in 30 runs);
            # without it the encoder is byte-deterministic. Fixed GOP, no scene-cut keyframes.
            params = f"keyint={gop}:min-keyint={gop}:scenecut=0:threads=1:crf=20:mbtree=0"
            stream.options = {"preset": "fast", "x264-params": params}
            for i, img in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                frame.pts = i
                frame.time_base = 1 / rate
                for pkt in stream.encode(frame):
                    out.mux(pkt)
            for pkt in stream.encode(None):
                out.mux(pkt)
        finally:
            out.close()
    return storage.size(path)


def _write_videos(out_dir: str, videos: list[dict], gop: int) -> list[int]:
    """Render and encode a batch of planned videos (runs in a worker process)."""
    sizes = []
    for v in videos:
        path = storage.path(out_dir) / v["video"]
        sizes.append(_encode(path, render_frames(v), v["fps"], gop))
    return sizes


# ----------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SynthResult:
    out_dir: Path
    manifest: Path
    events: Path
    videos: int
    samples: int
    train_videos: int
    test_videos: int
    bytes: int
    seconds: float  # wall time of generate

    def __str__(self) -> str:
        return (f"{self.videos} videos ({self.train_videos} train, {self.test_videos} test; "
                f"{self.bytes / 1e6:.1f} MB) and {self.samples} samples → {self.manifest} "
                f"in {self.seconds:.1f}s")


def _atomic_write_text(path: Path, text: str) -> None:
    storage.write_text(path, text, encoding="utf-8", mode=storage.UMASK)


def generate(out_dir, *, videos: int = DEFAULT_VIDEOS, seconds: float = DEFAULT_SECONDS, seed: int = 0,
             fps: float = DEFAULT_FPS, size: int = DEFAULT_SIZE, test_fraction: float = DEFAULT_TEST_FRACTION,
             events: tuple[int, int] = DEFAULT_EVENTS, anticipation_sec: float = DEFAULT_ANTICIPATION_SEC,
             gop_sec: float = 5.0, workers: int | None = None, progress: bool = True) -> SynthResult:
    """Write the synthetic benchmark into ``out_dir``: ``videos/*.mp4``, ``manifest.csv``, ``events.jsonl``.

    ``videos`` videos of ``seconds`` s at ``fps`` frames per second, ``size``×``size`` pixels, each
    with between ``events[0]`` and ``events[1]`` events; ``test_fraction`` of the videos (chosen by
    the seed) form the test split, the rest train. ``next_event`` rows observe the video up to
    ``anticipation_sec`` (at most a quarter of an event) before the final event starts. ``gop_sec``:
    keyframe interval. ``workers``: encoding processes (default: the CPU count, at most 8; 1 encodes
    in this process; workers are *spawned*, so a script calling this with workers > 1 needs the usual
    ``if __name__ == "__main__":`` guard). The same arguments always give byte-identical files,
    whatever the number of workers.
    """
    t0 = time.perf_counter()
    out = storage.path(out_dir)  # a local folder or an object-store URI
    planned = plan(videos, seconds=seconds, seed=seed, fps=fps, size=size, test_fraction=test_fraction,
                   events=events, anticipation_sec=anticipation_sec)
    storage.makedirs(out / "videos")
    gop = max(1, int(round(gop_sec * fps)))
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    workers = max(1, min(workers, len(planned)))

    total_bytes = 0
    bar = tqdm(total=len(planned), desc="synth videos", unit="video", disable=not progress)
    try:
        if workers == 1:
            for v in planned:
                total_bytes += _write_videos(str(out), [v], gop)[0]
                bar.update(1)
        else:
            chunk = max(1, min(16, len(planned) // (workers * 8)))
            batches = [planned[i:i + chunk] for i in range(0, len(planned), chunk)]
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(_write_videos, str(out), b, gop): len(b) for b in batches}
                for fut in as_completed(futures):
                    total_bytes += sum(fut.result())
                    bar.update(futures[fut])
    finally:
        bar.close()

    rows = [r for v in planned for r in samples_of(v)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write_text(out / "events.jsonl",
                       "".join(json.dumps(v, sort_keys=True) + "\n" for v in planned))
    _atomic_write_text(out / "manifest.csv", buf.getvalue())  # last: its presence means complete
    n_test = sum(v["split"] == "test" for v in planned)
    return SynthResult(out_dir=out, manifest=out / "manifest.csv", events=out / "events.jsonl",
                       videos=len(planned), samples=len(rows), train_videos=len(planned) - n_test,
                       test_videos=n_test, bytes=total_bytes, seconds=time.perf_counter() - t0)


def read_events(out_dir) -> list[dict]:
    """The ground truth written by :func:`generate` (one dict per video, as :func:`plan` returns)."""
    text = storage.read_text(storage.path(out_dir) / "events.jsonl", encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# Text corpus for pretraining the tiny frozen LLM
# ----------------------------------------------------------------------------------------------

def sampled_events(video: dict, task: str, num_frames: int) -> list[dict]:
    """The event shown at each of the ``num_frames`` frames a model sees of a row's clip.

    The frames are those of uniform sampling over the clip (``uniform:num_frames``, the synthetic
    protocol's extraction policy): the whole video, or for ``next_event`` the observed part.
    """
    end = video["observe_end_sec"] if task == "next_event" else None
    idx, _ = frame_indices(SamplingPolicy("uniform", num_frames), video["num_frames"], video["fps"],
                           0.0 if end is not None else None, end)
    starts = [e["start_frame"] for e in video["events"]]
    return [video["events"][int(np.searchsorted(starts, i, side="right")) - 1] for i in idx]


def lm_corpus(n: int, *, seed: int = 0, events: tuple[int, int] = DEFAULT_EVENTS, num_frames: int = 12,
              seconds: tuple[float, ...] = (16.0, 20.0, 24.0, 30.0), fps: float = DEFAULT_FPS) -> list[str]:
    """``n`` texts that teach a language model to read and copy from its context.

    Each text is ``{frames} <s> {prompt} {answer}``: ``{frames}`` names the object of each of the
    ``num_frames`` frames the model sees of a random video, one word per frame
    (:func:`object_token`, in order: what the Q-Former has to write into the LLM's context, one
    video token per frame), then the rendered prompt of a random task and its answer, e.g.
    ``red_circle red_circle red_circle blue_square … <s> what colour was the first object ? red``.
    The ``<s>`` marks where the video tokens end and the prompt begins (see
    :func:`pipeline.model.tiny.encode_lm_text`). Videos follow the rules of :func:`plan` (so the
    LLM also learns that the final event repeats the second one), with durations drawn from
    ``seconds``; for ``next_event`` the frames cover the observed clip only, as the row's clip does.

    One word per frame, not ``colour shape``: the qa answer is then read by content (the frame
    word that contains the asked colour), where two words per frame need an induction circuit
    (find the colour, copy the word after it) that a 2-layer LLM did not learn in minutes of
    pretraining (measured: 55 % qa accuracy with the true context, 100 % with one word per frame).
    """
    rng = _rng(seed, 5)
    k_min, k_max = events
    texts = []
    for _ in range(n):
        k = int(rng.integers(k_min, k_max + 1))
        n_frames = _frame_count(float(seconds[int(rng.integers(len(seconds)))]), fps)
        evs, qa_index = _plan_events(rng, k)
        observe_end = _lay_out(evs, n_frames, fps, DEFAULT_ANTICIPATION_SEC)
        video = {"video_id": "x", "video": "", "split": "", "events": evs, "qa_index": qa_index,
                 "num_frames": n_frames, "fps": fps, "observe_end_sec": observe_end / fps}
        row = samples_of(video)[int(rng.integers(len(TASKS)))]
        seen = " ".join(object_token(e["colour"], e["shape"]) for e in sampled_events(video, row["task"], num_frames))
        texts.append(f"{seen} <s> {render_prompt(row['task'], row['question'])} {row['answer']}")
    return texts
