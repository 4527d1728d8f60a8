"""Frame sampling arithmetic, shared by `extract` (which frames to decode) and by
`train` / `infer` (which cached frames a sample sees).

Two extraction policies:

* ``uniform:N`` – N frames spread over the clip, one at the middle of each of N
  equal segments (the reference implementation's evaluation rule). Clips shorter
  than N frames repeat frames rather than failing.
* ``fps:R`` – one frame every 1/R seconds from the clip start (LVU caches the whole
  movie at 1 fps and cuts its 100 s windows from that cache).

The policy is part of a cached unit's identity, so it has a canonical string form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingPolicy:
    kind: str  # "uniform" | "fps"
    value: float  # number of frames (uniform) or frames per second (fps)

    def __post_init__(self):
        if self.kind not in ("uniform", "fps"):
            raise ValueError(f"unknown sampling kind {self.kind!r}: use 'uniform:N' or 'fps:R'")
        if self.value <= 0:
            raise ValueError(f"sampling value must be positive, got {self.value}")
        if self.kind == "uniform" and int(self.value) != self.value:
            raise ValueError(f"uniform sampling needs a whole number of frames, got {self.value}")

    @classmethod
    def parse(cls, text: str) -> "SamplingPolicy":
        try:
            kind, value = text.strip().split(":")
            return cls(kind.strip(), float(value))
        except ValueError as e:
            raise ValueError(f"bad sampling policy {text!r} ({e}); expected e.g. 'uniform:100' or 'fps:1'") from None

    def __str__(self) -> str:
        v = int(self.value) if float(self.value).is_integer() else self.value
        return f"{self.kind}:{v}"


def clip_frame_range(num_frames: int, fps: float, start_sec: float | None, end_sec: float | None) -> tuple[int, int]:
    """Frames [first, last) of a video that fall inside [start_sec, end_sec)."""
    first = 0 if start_sec is None else max(0, int(math.ceil(start_sec * fps - 1e-6)))
    last = num_frames if end_sec is None else min(num_frames, int(math.ceil(end_sec * fps - 1e-6)))
    if last <= first:  # clip shorter than a frame: take the frame at (or nearest to) the start
        first = min(first, num_frames - 1)
        last = first + 1
    return first, last


def segment_indices(n_available: int, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Pick ``n`` of ``n_available`` positions, one per equal segment (TSN style).

    With ``rng`` a random position in each segment (training), otherwise the
    segment's middle (evaluation). Positions repeat when n > n_available.
    """
    if n_available <= 0:
        raise ValueError("no frames to sample from")
    edges = np.linspace(0, n_available, n + 1)
    if rng is None:
        pos = (edges[:-1] + edges[1:]) / 2
    else:
        pos = edges[:-1] + rng.random(n) * (edges[1:] - edges[:-1])
    return np.clip(np.floor(pos).astype(np.int64), 0, n_available - 1)


def frame_indices(policy: SamplingPolicy, num_frames: int, fps: float,
                  start_sec: float | None = None, end_sec: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Frame indices (into the video) and their timestamps in seconds for a policy over a clip."""
    if num_frames <= 0:
        raise ValueError("video has no frames")
    first, last = clip_frame_range(num_frames, fps, start_sec, end_sec)
    if policy.kind == "uniform":
        idx = first + segment_indices(last - first, int(policy.value))
    else:
        t0 = first / fps
        t1 = last / fps
        ts = t0 + np.arange(0, max(1, int(math.floor((t1 - t0) * policy.value - 1e-9)) + 1)) / policy.value
        ts = ts[ts < t1] if (ts < t1).any() else ts[:1]
        idx = np.clip(np.round(ts * fps).astype(np.int64), first, last - 1)
    return idx, idx / fps


def lvu_window_starts(duration_sec: float, window_sec: int = 100, stride_sec: int = 20) -> list[int]:
    """LVU windows: start at 0, 20, 40 … while start + 100 ≤ duration;
    a video shorter than one window gives a single window at 0."""
    starts = list(range(0, int(math.floor(duration_sec - window_sec)) + 1, stride_sec)) if duration_sec >= window_sec else []
    return starts or [0]
