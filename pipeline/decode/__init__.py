"""Video probing and sampled-frame decoding, under a watchdog (the README's architecture section).

Public API
----------
* :class:`VideoInfo` — what a video really holds (``num_frames`` = frames that can be decoded).
* :class:`DecodedFrames` — frames of :func:`read_frames`, in the order of the requested indices.
* :class:`DecodeError` — a typed failure; ``reason`` is one of :data:`REASONS`.
* :func:`probe` and :func:`read_frames`; :func:`plan_segments` (the plans); :class:`Fault` (simulated
  failures, for tests).

Modules, one job each (each imports only modules listed above it: no circles):

* ``results`` — the public types and error reasons.
* ``plan`` — decode plans: which wanted frames to seek to and which to decode forward to.
* ``probe`` — path checks, file classification, PyAV's packet index and true frame count.
* ``faults`` — fault injection (tests pass a :class:`Fault`; the pipeline never does).
* ``engines`` — the PyAV plan executor, decord, RGB conversion, one request with engine fallback.
* ``watchdog`` — the pool of warm worker processes, their socket protocol and shared frame buffer.
* ``api`` — :func:`probe` and :func:`read_frames`: checks, engine order, dispatch.

Options: ``$MALMM_DECODE_THREADS`` (decoder threads per decode, default 1: one Ray decode task is one
CPU) is read when ``read_frames`` is not given ``num_threads``.

Engines and strategies
----------------------
Two decoding engines produce bit-identical pictures (same FFmpeg H.264 decoder, same swscale
conversion; a test checks it):

* ``pyav`` (primary): demux the packet index once (presentation order, keyframes), then execute a
  *plan*: a list of segments, each either continuing forward from the current decoder position or
  starting with a seek to the keyframe before its first wanted frame. While decoding forward, packets
  whose frame is not wanted are decoded with ``skip_frame=NONREF``: a non-reference frame that nobody
  wants is never decoded at all (nothing depends on it), which removes roughly half of the B-frames
  from the work. When every wanted packet of a segment has been sent and the next segment seeks, the decoder is
  drained rather than fed the packets that follow. Only wanted frames are converted to RGB.
* ``decord``: ``VideoReader`` (FFmpeg 4.1 inside decord); used as the fallback when PyAV cannot open or
  decode a file (or its worker crashes), and for ``strategy='get_batch'`` (which tries decord first
  whatever ``decoder`` says).

Why PyAV first: measured on this project's benchmark (``tests/perf/bench_decode.py``), the PyAV plan
executor beats decord's ``get_batch`` on every sampling and GOP (decord cannot skip non-reference
frames, restarts its decoding thread on every seek, and runs an older FFmpeg), it reports damaged data
as Python exceptions instead of hanging, and its output is the same bytes.

Strategies (``read_frames(strategy=...)``) choose the plan:

* ``seek`` — every wanted frame that lies in a later GOP than the decoder position is reached by
  seeking to its keyframe (what decord's ``get_batch`` does).
* ``sequential`` — one forward pass from the first frame, never seeking.
* ``get_batch`` — decord's own ``VideoReader.get_batch`` on the sorted distinct indices.
* ``auto`` (default) — walk the sorted wanted frames; seek only when the keyframe before the next wanted
  frame is at least :data:`SEEK_GAP` frames ahead of the decoder position, otherwise keep decoding
  forward (decoding the frames in between costs less than a seek plus a restart of the decoder).
  Measured against decord ``get_batch`` and against sequential decoding in
  ``tests/perf/bench_decode.py``.

Resizing
--------
``size=(h, w)`` resizes with swscale **bilinear** interpolation applied to the YUV picture before the
YUV→RGB conversion — exactly what decord's ``VideoReader(width=, height=)`` filter graph does
(``scale=w:h`` then ``format=rgb24``); the PyAV engine builds the same libavfilter graph, so both
engines return the same bytes. The aspect ratio is not preserved (the target size is taken as given).
Without ``size`` frames keep the stream's coded size (after display rotation, as decord applies it).

Robustness
----------
All decoding runs in a **watchdog worker**: a separate process (``subprocess`` importing this package, so
no ``fork`` of the caller and no re-import of the caller's ``__main__``; works from inside Ray workers,
threads and Jupyter). Workers are kept warm in a small per-process pool and reused; a request that
exceeds ``timeout_s`` gets its worker killed (SIGKILL) and raises ``DecodeError('timeout')``; a worker
that dies (a crash in native code) is replaced and the request is retried with the other engine.
Frames come back through an anonymous shared-memory file (``memfd``) per worker, inherited at start and
reused from request to request: the worker writes each converted frame straight into it (in requested
order) and the parent copies the block out once (a fresh shared mapping per request costs more in page
faults than that copy). Requests and replies are small pickles on a Unix socket pair. A worker exits
when its parent goes away.

``timeout_s=None`` decodes in the calling process without a watchdog (trusted files only).

Frame counts that lie
---------------------
``num_frames`` counts frames that really exist. The packet index drops packets cut off by the end of
the file; when the header declares more frames than the index holds, or packets were cut, the tail is
decoded to find the last decodable frame. Requested indices are clamped to ``[0, num_frames - 1]``;
a requested frame that turns out not to decode (corrupt data) is replaced by the nearest decodable frame
before it (after it when there is none before), and ``DecodedFrames.indices`` says which frames were
used. Frames the decoder outputs with the "corrupt" flag (error concealment) count as not decodable,
so every strategy returns the same pictures for a damaged file. A file whose header declares frames of
which none decodes raises ``frame_count_mismatch``; one that declares none and has none raises
``zero_frames``.

A video may be a local path, a ``file://`` URI or an object-store URI (``s3://``, ``gs://``): an
object is fetched into the local object cache first (:func:`release` drops that copy).

Error reasons: ``missing`` (no such path or object), ``empty`` (0 bytes), ``not_video`` (not a media file FFmpeg
recognises, no video stream, or a still image / text format), ``truncated`` (an MP4 whose boxes run
past the end of the file or that lacks its index), ``zero_frames``, ``frame_count_mismatch``,
``timeout`` (the watchdog killed the decoder; final, no fallback: ``timeout_s`` covers the whole call),
``decode_error`` (anything else, e.g. both engines failed or crashed).
"""
from pipeline.decode.api import DECODERS, DEFAULT_THREADS, DEFAULT_TIMEOUT_S, probe, read_frames
from pipeline.decode.faults import Fault
from pipeline.decode.plan import SEEK_GAP, STRATEGIES, plan_segments
from pipeline.decode.probe import release
from pipeline.decode.results import REASONS, DecodedFrames, DecodeError, VideoInfo

__all__ = ["DECODERS", "DEFAULT_THREADS", "DEFAULT_TIMEOUT_S", "REASONS", "SEEK_GAP", "STRATEGIES", "DecodeError",
           "DecodedFrames", "Fault", "VideoInfo", "plan_segments", "probe", "read_frames",
           "release"]
