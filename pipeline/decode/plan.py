"""Decode plans: which frames to reach by seeking and which by decoding forward (pure arithmetic, no I/O).

The strategies are described in the package doc (:mod:`pipeline.decode`); measured in
``tests/perf/bench_decode.py``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

STRATEGIES = ("auto", "seek", "sequential", "get_batch")
#: auto strategy: seek when the keyframe before the next wanted frame is at least this many frames ahead
SEEK_GAP = 4


def plan_segments(wanted: Sequence[int], keyframes: Sequence[int], strategy: str = "auto",
                  seek_gap: int = SEEK_GAP) -> list[tuple[int | None, list[int]]]:
    """Split sorted distinct ``wanted`` frames into decode segments ``(seek_keyframe or None, frames)``.

    A segment with a keyframe starts by seeking there; one with None continues forward from where the
    previous segment stopped (the first segment continues from the start of the file).
    """
    kf = np.asarray(sorted(set(int(k) for k in keyframes)) or [0], dtype=np.int64)
    if kf[0] != 0:
        kf = np.concatenate([[0], kf])
    segs: list[tuple[int | None, list[int]]] = []
    pos = 0  # the next frame the decoder would produce
    for t in wanted:
        t = int(t)
        k = int(kf[np.searchsorted(kf, t, side="right") - 1])
        if strategy == "sequential":
            seek = t < pos
        elif strategy in ("seek", "get_batch"):
            seek = t < pos or k > pos
        else:
            seek = t < pos or k - pos >= seek_gap
        if seek or not segs:
            segs.append((k if seek else None, [t]))
        else:
            segs[-1][1].append(t)
        pos = t + 1
    return segs
