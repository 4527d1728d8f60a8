"""The public entry points, :func:`probe` and :func:`read_frames`: argument checks, the request, the engine
order, and its dispatch to a watchdog worker (or the calling process when ``timeout_s`` is None).
What they do: the package doc, :mod:`pipeline.decode`.
"""
from __future__ import annotations

import os
import time
from typing import Iterable

import numpy as np

from pipeline.decode.engines import handle
from pipeline.decode.faults import Fault
from pipeline.decode.plan import STRATEGIES
from pipeline.decode.probe import normalise_path, precheck
from pipeline.decode.results import DecodedFrames, DecodeError, VideoInfo
from pipeline.decode.watchdog import POOL, WorkerDied

DECODERS = ("auto", "pyav", "decord")
DEFAULT_TIMEOUT_S = 300.0
#: decoder threads per decode (one Ray decode task = one CPU); a user setting: $MALMM_DECODE_THREADS
DEFAULT_THREADS = 1


def probe(path, timeout_s: float | None = DEFAULT_TIMEOUT_S, *, decoder: str = "auto", index_cache: bool = True,
          fault: Fault | None = None) -> VideoInfo:
    """Describe a video (frame count that really decodes, fps, duration, size, keyframes).

    ``index_cache``: the worker keeps the packet index of its last few files, so a probe then a read
    index a file once (False: benchmarks of a single read). ``fault``: a simulated failure (tests only,
    :mod:`pipeline.decode.faults`). Raises :class:`DecodeError`. Runs in a watchdog worker unless
    ``timeout_s`` is None.
    """
    path = normalise_path(path)
    precheck(path)
    reply = _dispatch({"op": "probe", "path": path}, decoder, timeout_s, out_bytes=None, index_cache=index_cache,
                      fault=fault)
    return VideoInfo(**reply["info"])


def read_frames(path, indices: Iterable[int], *, size: tuple[int, int] | None = None,
                timeout_s: float | None = DEFAULT_TIMEOUT_S, strategy: str = "auto", decoder: str = "auto",
                num_threads: int | None = None, index_cache: bool = True, fault: Fault | None = None) -> DecodedFrames:
    """Decode the frames ``indices`` (any order, repeats allowed) of a video.

    ``size``: (height, width) to resize to (swscale bilinear, see the package doc) or None.
    ``strategy``: 'auto' | 'seek' | 'sequential' | 'get_batch' (package doc). ``decoder``: 'auto' (PyAV,
    falling back to decord), 'pyav' or 'decord' (that engine first, the other as fallback).
    ``num_threads``: decoder threads (default ``$MALMM_DECODE_THREADS``, else :data:`DEFAULT_THREADS`).
    ``index_cache``, ``fault``: as for :func:`probe`.
    Each distinct frame is decoded once. Indices outside the video are clamped to frames that exist.
    Raises :class:`DecodeError`.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    req = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices).astype(np.int64).ravel()
    if size is not None:
        size = (int(size[0]), int(size[1]))
        if size[0] <= 0 or size[1] <= 0:
            raise ValueError(f"size must be positive (height, width), got {size}")
    path = normalise_path(path)
    precheck(path)
    if num_threads is None:
        num_threads = int(os.environ.get("MALMM_DECODE_THREADS", DEFAULT_THREADS))
    if strategy == "get_batch" and decoder == "auto":
        decoder = "decord"
    msg = {"op": "read", "path": path, "indices": req.tolist(), "size": size, "strategy": strategy,
           "threads": int(num_threads)}
    t0 = time.perf_counter()
    reply = _dispatch(msg, decoder, timeout_s, out_bytes=True, index_cache=index_cache, fault=fault)
    info = VideoInfo(**reply["info"])
    stats = dict(reply.get("stats", {}))
    stats["wall_s"] = time.perf_counter() - t0
    return DecodedFrames(frames=reply["frames"], indices=np.asarray(reply["indices"], dtype=np.int64),
                         timestamps_sec=np.asarray(reply["timestamps"], dtype=np.float64), info=info,
                         decoder=reply["decoder"], strategy=reply["strategy"], requested=req, stats=stats)


# ---------------------------------------------------------------------------- dispatch

def _engine_order(decoder: str, strategy: str | None) -> list[str]:
    if strategy == "get_batch":
        return ["decord", "pyav"]
    return ["decord", "pyav"] if decoder == "decord" else ["pyav", "decord"]


def _dispatch(msg: dict, decoder: str, timeout_s: float | None, out_bytes, *, index_cache: bool = True,
              fault: Fault | None = None) -> dict:
    """Run ``msg`` with engine fallback, in a watchdog worker (or in-process when timeout_s is None)."""
    engines = _engine_order(decoder, msg.get("strategy"))
    msg = dict(msg, fault=fault, cache=bool(index_cache))
    path = msg["path"]
    if timeout_s is None:
        msg["engines"] = engines
        reply = handle(msg, None)
        if not reply["ok"]:
            raise DecodeError(reply["reason"], path, reply["message"])
        if out_bytes:
            reply["frames"] = reply.pop("array")
        return reply
    deadline = time.monotonic() + float(timeout_s)
    first_error = None
    while engines:
        msg["engines"] = engines
        try:
            reply = POOL.run(msg, deadline, want_frames=bool(out_bytes))
        except WorkerDied as e:  # native crash: retry with the next engine in a fresh worker
            first_error = first_error or DecodeError("decode_error", path, str(e))
            engines = engines[1:]
            continue
        if not reply["ok"]:
            raise DecodeError(reply["reason"], path, reply["message"])
        return reply
    raise first_error
