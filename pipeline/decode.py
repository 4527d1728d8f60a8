"""Video probing and sampled-frame decoding, under a watchdog.

Public API
----------
* :class:`VideoInfo` — what a video really holds (``num_frames`` = frames that can be decoded).
* :class:`DecodedFrames` — frames of :func:`read_frames`, in the order of the requested indices.
* :class:`DecodeError` — a typed failure; ``reason`` is one of :data:`REASONS`.
* :func:`probe` and :func:`read_frames`.

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
All decoding runs in a **watchdog worker**: a separate process (``subprocess`` running this file, so no
``fork`` of the caller and no re-import of the caller's ``__main__``; works from inside Ray workers,
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

Error reasons: ``missing`` (no such path), ``empty`` (0 bytes), ``not_video`` (not a media file FFmpeg
recognises, no video stream, or a still image / text format), ``truncated`` (an MP4 whose boxes run
past the end of the file or that lacks its index), ``zero_frames``, ``frame_count_mismatch``,
``timeout`` (the watchdog killed the decoder; final, no fallback: ``timeout_s`` covers the whole call),
``decode_error`` (anything else, e.g. both engines failed or crashed).
"""
from __future__ import annotations

import atexit
import io
import mmap
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np

REASONS = ("missing", "empty", "not_video", "truncated", "zero_frames", "frame_count_mismatch", "timeout",
           "decode_error")
STRATEGIES = ("auto", "seek", "sequential", "get_batch")
DECODERS = ("auto", "pyav", "decord")
DEFAULT_TIMEOUT_S = 300.0
#: auto strategy: seek when the keyframe before the next wanted frame is at least this many frames ahead
SEEK_GAP = 4
#: decoder threads per decode (one Ray decode task = one CPU); overridden by $MALMM_DECODE_THREADS
DEFAULT_THREADS = 1
#: a warm worker is replaced after this many requests (bounds leaks in native code)
WORKER_MAX_REQUESTS = 200
#: a frame arena larger than this is given back after each request
ARENA_KEEP_BYTES = 256 << 20
#: at most this many idle workers are kept per process
POOL_MAX_IDLE = 4

# demuxers that read a still picture or text, not a video ("*_pipe" are single-image demuxers too);
# animated GIF/APNG/WebP are left as videos
_IMAGE_FORMATS = ("image2", "tty")


# ============================================================================ public types

@dataclass
class VideoInfo:
    num_frames: int  # frames that can actually be decoded
    fps: float
    duration_sec: float
    width: int  # display size of a decoded frame (after rotation), before any resize
    height: int
    keyframes: list  # frame indices (presentation order) of keyframes
    declared_num_frames: int  # the container header's count (the packet count when the header has none)
    decoder: str  # 'pyav' or 'decord'
    codec: str = ""
    notes: list = field(default_factory=list)  # e.g. frame-count mismatches that were clamped

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DecodedFrames:
    frames: np.ndarray  # uint8 [N, H, W, 3], row i is frame indices[i]
    indices: np.ndarray  # int64 [N]: frame actually used for each requested index (after clamping)
    timestamps_sec: np.ndarray  # float64 [N]: presentation time of each frame
    info: VideoInfo
    decoder: str
    strategy: str
    requested: np.ndarray = None  # int64 [N]: the indices as requested
    stats: dict = field(default_factory=dict)  # distinct frames, frames decoded, seeks, seconds …


class DecodeError(Exception):
    """A typed decoding failure: ``reason`` is one of :data:`REASONS`; the message names the file."""

    def __init__(self, reason: str, path, message: str = ""):
        if reason not in REASONS:
            reason = "decode_error"
        self.reason = reason
        self.path = str(path)
        self.detail = message
        super().__init__(f"{reason}: {self.path}" + (f": {message}" if message else ""))

    def __reduce__(self):  # picklable across Ray / multiprocessing
        return (DecodeError, (self.reason, self.path, self.detail))


# ============================================================================ public functions

def probe(path, timeout_s: float | None = DEFAULT_TIMEOUT_S, *, decoder: str = "auto") -> VideoInfo:
    """Describe a video (frame count that really decodes, fps, duration, size, keyframes).

    Raises :class:`DecodeError`. Runs in a watchdog worker unless ``timeout_s`` is None.
    """
    path = _normalise_path(path)
    _precheck(path)
    reply = _dispatch({"op": "probe", "path": path}, decoder, timeout_s, out_bytes=None)
    return _info_from_dict(reply["info"])


def read_frames(path, indices: Iterable[int], *, size: tuple[int, int] | None = None,
                timeout_s: float | None = DEFAULT_TIMEOUT_S, strategy: str = "auto", decoder: str = "auto",
                num_threads: int | None = None) -> DecodedFrames:
    """Decode the frames ``indices`` (any order, repeats allowed) of a video.

    ``size``: (height, width) to resize to (swscale bilinear, see the module doc) or None.
    ``strategy``: 'auto' | 'seek' | 'sequential' | 'get_batch' (module doc). ``decoder``: 'auto' (PyAV,
    falling back to decord), 'pyav' or 'decord' (that engine first, the other as fallback).
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
    path = _normalise_path(path)
    _precheck(path)
    if num_threads is None:
        num_threads = int(os.environ.get("MALMM_DECODE_THREADS", DEFAULT_THREADS))
    if strategy == "get_batch" and decoder == "auto":
        decoder = "decord"
    msg = {"op": "read", "path": path, "indices": req.tolist(), "size": size, "strategy": strategy,
           "threads": int(num_threads)}
    t0 = time.perf_counter()
    reply = _dispatch(msg, decoder, timeout_s, out_bytes=True)
    info = _info_from_dict(reply["info"])
    stats = dict(reply.get("stats", {}))
    stats["wall_s"] = time.perf_counter() - t0
    return DecodedFrames(frames=reply["frames"], indices=np.asarray(reply["indices"], dtype=np.int64),
                         timestamps_sec=np.asarray(reply["timestamps"], dtype=np.float64), info=info,
                         decoder=reply["decoder"], strategy=reply["strategy"], requested=req, stats=stats)


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


def shutdown_workers() -> None:
    """Stop this process's idle watchdog workers (they are also stopped at exit)."""
    _POOL.close_all()


# ============================================================================ helpers (both sides)

def _normalise_path(path) -> str:
    p = os.fspath(path)
    if isinstance(p, bytes):
        p = p.decode()
    if p.startswith("file://"):
        p = p[len("file://"):]
    return os.path.abspath(p)


def _precheck(path: str) -> None:
    if not os.path.exists(path):
        raise DecodeError("missing", path, "no such file")
    if os.path.isdir(path):
        raise DecodeError("not_video", path, "is a directory")
    if os.path.getsize(path) == 0:
        raise DecodeError("empty", path, "0 bytes")


def _info_from_dict(d: dict) -> VideoInfo:
    return VideoInfo(**d)


_MP4_TOP = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"styp", b"sidx", b"uuid", b"moof",
            b"mfra", b"meta", b"pdin", b"prft", b"emsg"}


def _sniff(path: str) -> str:
    """What the bytes look like when FFmpeg cannot open a file: 'truncated', 'container' or 'unknown'."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) >= 8 and head[4:8] in _MP4_TOP:
                # walk the top-level ISO-BMFF boxes: one that runs past the end, or no moov, means cut short
                off, seen = 0, set()
                while off + 8 <= size:
                    f.seek(off)
                    hdr = f.read(16)
                    n = int.from_bytes(hdr[:4], "big")
                    kind = hdr[4:8]
                    if n == 1 and len(hdr) >= 16:
                        n = int.from_bytes(hdr[8:16], "big")
                    elif n == 0:
                        n = size - off
                    if n < 8 or kind not in _MP4_TOP and not kind.isalnum():
                        return "container"
                    seen.add(kind)
                    if off + n > size:
                        return "truncated"
                    off += n
                if off < size:
                    return "truncated"
                return "truncated" if b"moov" not in seen and b"moof" not in seen else "container"
            if head[:4] == b"\x1a\x45\xdf\xa3" or head[:4] == b"RIFF" or head[:3] == b"FLV" or head[:4] == b"OggS" \
                    or head[:4] == b"\x00\x00\x01\xba" or head[:4] == b"\x30\x26\xb2\x75" \
                    or (head[:1] == b"\x47" and size > 188 and _byte_at(f, 188) == b"\x47"):
                return "container"
    except OSError:
        pass
    return "unknown"


def _byte_at(f, off: int) -> bytes:
    f.seek(off)
    return f.read(1)


# ============================================================================ parent side: dispatch

def _engine_order(decoder: str, strategy: str | None) -> list[str]:
    if strategy == "get_batch":
        return ["decord", "pyav"]
    return ["decord", "pyav"] if decoder == "decord" else ["pyav", "decord"]


def _test_hooks() -> dict:
    """Test hooks, read from the environment of the caller at each call (see tests/test_decode.py).

    MALMM_DECODE_TEST_HANG="SECONDS[:ENGINE]"  the worker sleeps before decoding (ENGINE: pyav|decord|any)
    MALMM_DECODE_TEST_CRASH="ENGINE"           the worker kills itself (SIGSEGV) before using ENGINE
    MALMM_DECODE_TEST_FAIL="ENGINE"            ENGINE raises an error as if it could not decode
    """
    hooks = {}
    h = os.environ.get("MALMM_DECODE_TEST_HANG")
    if h:
        secs, _, eng = h.partition(":")
        hooks["hang"] = (float(secs), eng or "any")
    for key in ("crash", "fail"):
        v = os.environ.get(f"MALMM_DECODE_TEST_{key.upper()}")
        if v:
            hooks[key] = v
    return hooks


def _dispatch(msg: dict, decoder: str, timeout_s: float | None, out_bytes) -> dict:
    """Run ``msg`` with engine fallback, in a watchdog worker (or in-process when timeout_s is None)."""
    engines = _engine_order(decoder, msg.get("strategy"))
    # the worker keeps the packet index of its last few files (a probe then a read index once);
    # MALMM_DECODE_INDEX_CACHE=0 turns that off (benchmarks of a single read)
    msg = dict(msg, hooks=_test_hooks(), cache=os.environ.get("MALMM_DECODE_INDEX_CACHE", "1") != "0")
    path = msg["path"]
    if timeout_s is None:
        msg["engines"] = engines
        reply = _handle(msg, None)
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
            reply = _POOL.run(msg, deadline, want_frames=bool(out_bytes))
        except _WorkerDied as e:  # native crash: retry with the next engine in a fresh worker
            first_error = first_error or DecodeError("decode_error", path, str(e))
            engines = engines[1:]
            continue
        if not reply["ok"]:
            raise DecodeError(reply["reason"], path, reply["message"])
        return reply
    raise first_error


class _WorkerDied(Exception):
    pass


class _Worker:
    """One warm decode process, reached through a Unix socket pair."""

    def __init__(self):
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = parent
        self.log = tempfile.TemporaryFile(mode="a+b")
        # frames come back through this shared-memory file, reused (and grown) from request to request
        self.arena = _new_memfd()
        self._map = None
        boot = ("import importlib.util as u, sys; s = u.spec_from_file_location('_malmm_decode_worker', sys.argv[1]); "
                "m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m); "
                "m._worker_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))")
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        fds = (child.fileno(),) + ((self.arena,) if self.arena is not None else ())
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot, os.path.abspath(__file__), str(child.fileno()), str(os.getpid()),
             str(self.arena if self.arena is not None else -1)],
            pass_fds=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log,
            env=env, close_fds=True)
        child.close()
        self.requests = 0
        self.owner_pid = os.getpid()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._close()

    def stop(self) -> None:
        """Ask politely (EOF on its socket), then kill."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close()

    def _close(self) -> None:
        for f in (self.sock, self.log):
            try:
                f.close()
            except OSError:
                pass
        self._unmap()
        if self.arena is not None:
            try:
                os.close(self.arena)
            except OSError:
                pass
            self.arena = None

    def _unmap(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except (BufferError, ValueError):
                pass
            self._map = None

    def take_frames(self, reply: dict) -> np.ndarray:
        """Copy the frames of ``reply`` out of the arena (which the next request overwrites)."""
        shape = tuple(reply["shape"])
        nbytes = int(np.prod(shape))
        if reply.get("inline") is not None:
            return np.frombuffer(bytearray(reply.pop("inline")), dtype=np.uint8).reshape(shape)
        out = np.empty(shape, np.uint8)
        if nbytes == 0:
            return out
        size = os.fstat(self.arena).st_size
        if self._map is None or len(self._map) != size:
            self._unmap()
            self._map = mmap.mmap(self.arena, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        src = np.frombuffer(self._map, dtype=np.uint8, count=nbytes)
        np.copyto(out.reshape(-1), src)
        del src
        if size > ARENA_KEEP_BYTES:  # give a huge arena back (the worker maps it afresh next time)
            self._unmap()
            os.ftruncate(self.arena, 0)
        return out

    def log_tail(self, n: int = 600) -> str:
        try:
            self.log.seek(0, io.SEEK_END)
            size = self.log.tell()
            self.log.seek(max(0, size - n))
            return self.log.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def request(self, msg: dict, deadline: float) -> dict:
        self.requests += 1
        try:
            self.log.truncate(0)
        except OSError:
            pass
        payload = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        self.sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            self.sock.sendall(struct.pack("!Q", len(payload)) + payload)
            return pickle.loads(_recv_msg(self.sock, deadline))
        except (socket.timeout, TimeoutError):
            raise
        except (EOFError, ConnectionError, OSError) as e:
            raise _WorkerDied(self._death_message(e)) from None

    def _death_message(self, e: Exception) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        how = (f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}")
        tail = self.log_tail()
        return f"decoder process died ({how})" + (f": {tail}" if tail else "")


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("connection closed")
        got += k
    return bytes(buf)


def _recv_msg(sock: socket.socket, deadline: float | None) -> bytes:
    (n,) = struct.unpack("!Q", _recv_exact(sock, 8, deadline))
    return _recv_exact(sock, n, deadline)


class _Pool:
    """Warm workers of this process (re-created after fork: a child never uses its parent's workers)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.idle: list[_Worker] = []
        self.pid = os.getpid()

    def _check_fork(self):
        if os.getpid() != self.pid:  # we are a forked child: those workers belong to the parent
            self.idle = []
            self.lock = threading.Lock()
            self.pid = os.getpid()

    def acquire(self) -> _Worker:
        self._check_fork()
        with self.lock:
            while self.idle:
                w = self.idle.pop()
                if w.alive():
                    return w
                w._close()
        return _Worker()

    def release(self, w: _Worker) -> None:
        if w.owner_pid != os.getpid():
            return
        if not w.alive() or w.requests >= WORKER_MAX_REQUESTS:
            w.stop()
            return
        with self.lock:
            if len(self.idle) < POOL_MAX_IDLE:
                self.idle.append(w)
                return
        w.stop()

    def close_all(self) -> None:
        self._check_fork()
        with self.lock:
            ws, self.idle = self.idle, []
        for w in ws:
            w.stop()

    def pids(self) -> list[int]:
        with self.lock:
            return [w.pid for w in self.idle]

    def run(self, msg: dict, deadline: float, want_frames: bool) -> dict:
        if time.monotonic() >= deadline:
            raise DecodeError("timeout", msg["path"], "no time left for decoding")
        try:
            w = self.acquire()
        except OSError as e:
            raise DecodeError("decode_error", msg["path"], f"cannot start a decoder process: {e}") from None
        _LAST_WORKER["pid"] = w.pid
        try:
            reply = w.request(dict(msg, inline=w.arena is None), deadline)
        except (socket.timeout, TimeoutError):
            w.kill()
            raise DecodeError("timeout", msg["path"], "decoding did not finish in time; the decoder process "
                              "was killed") from None
        except _WorkerDied:
            w.kill()
            raise
        except BaseException:  # e.g. KeyboardInterrupt while waiting: the worker state is unknown
            w.kill()
            raise
        try:
            if reply.get("ok") and want_frames:
                reply["frames"] = w.take_frames(reply)
        finally:
            self.release(w)
        return reply


_POOL = _Pool()
_LAST_WORKER: dict = {}
atexit.register(_POOL.close_all)


def _new_memfd() -> int | None:
    if hasattr(os, "memfd_create"):
        try:
            return os.memfd_create("malmm-decode", os.MFD_CLOEXEC)
        except OSError:
            return None
    return None


# ============================================================================ worker side

def _worker_main(fd: int, parent_pid: int, arena_fd: int = -1) -> None:
    """Serve requests from the parent until it closes the socket (or goes away)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which kills us if needed
    sock = socket.socket(fileno=fd)

    def watch_parent():  # exit when the parent dies, even while decoding (native code releases the GIL)
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    try:  # warm imports before the first request
        import av
        import av.filter  # noqa: F401
        import av.video.reformatter  # noqa: F401
        av.logging.set_level(av.logging.ERROR)
    except Exception:  # noqa: BLE001  (a broken PyAV shows up as a decode error later, with fallback)
        pass
    arena = _Arena(arena_fd) if arena_fd >= 0 else None
    while True:
        try:
            msg = pickle.loads(_recv_msg(sock, None))
        except (EOFError, OSError):
            os._exit(0)
        reply = _handle(msg, arena)
        if "array" in reply:
            arr = reply.pop("array")
            if msg.get("inline"):
                reply["inline"] = arr.tobytes()
            del arr
        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            sock.sendall(struct.pack("!Q", len(data)) + data)
        except OSError:
            os._exit(0)


def _apply_hooks(hooks: dict, engine: str) -> None:
    hang = hooks.get("hang")
    if hang and hang[1] in ("any", engine):
        time.sleep(hang[0])
    if hooks.get("crash") in ("any", engine):
        os.kill(os.getpid(), signal.SIGSEGV)
    if hooks.get("fail") in ("any", engine):
        raise RuntimeError(f"simulated {engine} failure (test hook)")


class _Arena:
    """The worker's side of the shared frame buffer: grown when a request needs more, mapped once."""

    def __init__(self, fd: int):
        self.fd = fd
        self.mm = None

    def array(self, shape: tuple) -> np.ndarray:
        nbytes = int(np.prod(shape))
        size = os.fstat(self.fd).st_size
        if size < nbytes:
            os.ftruncate(self.fd, nbytes)
            size = nbytes
        if self.mm is None or len(self.mm) != size:
            old, self.mm = self.mm, None
            if old is not None:
                try:
                    old.close()
                except BufferError:
                    pass
            self.mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        return np.frombuffer(self.mm, dtype=np.uint8, count=nbytes).reshape(shape)


class _Out:
    """Output frames [N, H, W, 3] in requested order: in the shared arena, or a plain array (allocated
    when the output size is known: at once, or at the first converted frame)."""

    def __init__(self, n: int, arena: "_Arena | None", h: int | None = None, w: int | None = None):
        self.n = n
        self.arena = arena
        self.array = None
        self.shape = None
        if h is not None:
            self.ensure(h, w)

    def ensure(self, h: int, w: int) -> None:
        if self.array is not None:
            return
        self.shape = (self.n, int(h), int(w), 3)
        if self.arena is not None and self.n * int(h) * int(w) > 0:
            self.array = self.arena.array(self.shape)
        else:
            self.array = np.empty(self.shape, np.uint8)


def _handle(msg: dict, arena: "_Arena | None") -> dict:
    """Serve one request with engine fallback; never raises."""
    path = msg["path"]
    engines = msg.get("engines") or ["pyav", "decord"]
    hooks = msg.get("hooks") or {}
    errors = []
    for engine in engines:
        try:
            _apply_hooks(hooks, engine)
            if msg["op"] == "probe":
                info = (_ENGINES[engine].probe(path, use_cache=msg.get("cache", True)) if engine == "pyav"
                        else _ENGINES[engine].probe(path))
                return {"ok": True, "info": asdict(info)}
            return _ENGINES[engine].read(msg, arena)
        except DecodeError as e:
            errors.append(e)
            if e.reason != "decode_error":
                break  # a structural verdict on the file: the other engine would see the same
        except Exception as e:  # noqa: BLE001  (anything an engine raises is a decode failure)
            errors.append(DecodeError("decode_error", path, f"{engine}: {type(e).__name__}: {e}"[:1000]))
    e = errors[0] if errors else DecodeError("decode_error", path, "no engine")
    # prefer a specific reason over decode_error, whichever engine found it
    for cand in errors:
        if cand.reason != "decode_error":
            e = cand
            break
    message = e.detail
    if len(errors) > 1:
        message += " | " + " | ".join(x.detail for x in errors if x is not e)
    return {"ok": False, "reason": e.reason, "message": message[:2000]}


def _clamp(req: np.ndarray, num_frames: int) -> np.ndarray:
    return np.clip(req, 0, num_frames - 1)


# ---------------------------------------------------------------------------- PyAV engine

class _PyAVIndex:
    """Packet index of the video stream, in presentation order."""

    def __init__(self, pts: np.ndarray, keyframes: np.ndarray, ordered: bool, damaged: str, declared: int):
        self.pts = pts  # sorted pts of frames
        self.keyframes = keyframes
        self.ordered = ordered  # pts are usable (distinct, present); else frames are counted in output order
        self.damaged = damaged  # why the tail needs checking ('' when healthy)
        self.declared = declared
        self.rank = {int(p): i for i, p in enumerate(pts)} if ordered else {}


class _PyAVEngine:
    name = "pyav"

    def __init__(self):
        # (path, size, mtime) -> (index, info, rotation): a probe followed by a read reuses the index
        self._cache: dict = {}

    # -- opening and classification
    def _open(self, path: str, threads: int = 1):
        import av

        try:
            container = av.open(path, metadata_errors="ignore")
        except FileNotFoundError:
            raise DecodeError("missing", path, "no such file") from None
        except av.error.FFmpegError as e:
            if os.path.getsize(path) == 0:
                raise DecodeError("empty", path, "0 bytes") from None
            kind = _sniff(path)
            if kind == "truncated":
                raise DecodeError("truncated", path, f"the file is cut short ({e})") from None
            if kind == "container":
                raise DecodeError("decode_error", path, f"cannot open: {e}") from None
            raise DecodeError("not_video", path, f"not a recognised media file ({e})") from None
        fmt = container.format.name or ""
        if not container.streams.video or any(x in fmt.split(",") for x in _IMAGE_FORMATS) \
                or fmt.endswith("_pipe"):
            container.close()
            raise DecodeError("not_video", path, f"no video stream (format {fmt})")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            container.close()
            raise DecodeError("decode_error", path, "no decoder for the video codec")
        cc = stream.codec_context
        cc.thread_count = max(1, int(threads))  # (must be set before the decoder opens)
        cc.thread_type = "SLICE" if threads <= 1 else "AUTO"
        return container, stream

    def _index(self, path: str, container, stream) -> _PyAVIndex:
        import av

        file_size = os.path.getsize(path)
        pts, keys = [], []
        damaged = ""
        have_all_pts = True
        try:
            for pkt in container.demux(stream):
                if pkt.size == 0:
                    continue
                pos = pkt.pos
                if pkt.is_corrupt or (pos is not None and pos >= 0 and pos + pkt.size > file_size):
                    damaged = damaged or "packets cut off by the end of the file"
                    continue
                p = pkt.pts if pkt.pts is not None else pkt.dts
                if p is None:
                    have_all_pts = False
                    p = len(pts)
                pts.append(p)
                keys.append(bool(pkt.is_keyframe))
        except av.error.FFmpegError as e:
            damaged = f"demuxing stopped early ({e})"
        declared = int(stream.frames or 0)
        n = len(pts)
        if n == 0:
            return _PyAVIndex(np.zeros(0, np.int64), np.zeros(0, np.int64), True, damaged, declared)
        arr = np.asarray(pts, dtype=np.int64)
        order = np.argsort(arr, kind="stable")
        spts = arr[order]
        ordered = have_all_pts and bool(np.all(np.diff(spts) > 0))
        if not ordered:  # no usable timestamps: frames are known by their output order only
            spts = np.arange(n, dtype=np.int64)
            kf = np.nonzero(np.asarray(keys))[0]
        else:
            kf = np.sort(np.nonzero(np.asarray(keys)[order])[0])
        if declared > n and not damaged:
            damaged = f"the header declares {declared} frames, the file holds {n}"
        return _PyAVIndex(spts, kf.astype(np.int64), ordered, damaged, declared)

    def _prepare(self, path: str, container, stream, *, rotation: bool, use_cache: bool = True):
        """Index, base info (coded size) and display rotation (None until known), cached per file version.

        ``rotation``: find the rotation now (decodes the first frame) rather than leave it to the caller.
        Leaves the file at its start."""
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        hit = self._cache.get(key) if use_cache else None
        if hit is None:
            idx = self._index(path, container, stream)
            num = len(idx.pts)
            notes = []
            if idx.damaged and num > 0:
                num = self._decodable_prefix(container, stream, idx)
                if num < len(idx.pts) or (idx.declared and num < idx.declared):
                    notes.append(f"frame count mismatch: {idx.damaged}; {num} frames decode"
                                 + (f" of {idx.declared} declared" if idx.declared else
                                    f" of {len(idx.pts)} indexed"))
                else:
                    notes.append(idx.damaged)
            if num == 0:
                if idx.declared > 0:
                    raise DecodeError("frame_count_mismatch", path,
                                      f"the header declares {idx.declared} frames but none can be decoded")
                raise DecodeError("zero_frames", path, "the video stream holds no frame")
            self._rewind(container, stream)  # indexing read the whole file
            hit = [idx, self._info(stream, idx, num, notes), None]
            if use_cache:
                if len(self._cache) >= 8:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[key] = hit
        if rotation and hit[2] is None:
            hit[2] = self._first_frame_rotation(container, stream)
        return hit

    @staticmethod
    def _rotated(info: VideoInfo, rot: int | None) -> VideoInfo:
        import copy

        out = copy.deepcopy(info)
        if rot and rot % 2:
            out.width, out.height = info.height, info.width
        return out

    def _first_frame_rotation(self, container, stream) -> int:
        import av

        self._rewind(container, stream)
        k = 0
        try:
            for pkt in container.demux(stream):
                try:
                    frames = stream.codec_context.decode(pkt)
                except av.error.FFmpegError:
                    continue
                if frames:
                    k = _rotation_k(frames[0])
                    break
        except av.error.FFmpegError:
            pass
        self._rewind(container, stream)
        return k

    def _decodable_prefix(self, container, stream, idx: _PyAVIndex) -> int:
        """Frames that decode, assuming damage at the end: scan GOPs backwards from the last one, decoding
        each until the next GOP starts; the first GOP that yields a frame gives the answer."""
        import av

        cc = stream.codec_context
        kfs = [int(k) for k in idx.keyframes] or [0]
        if kfs[0] != 0:
            kfs = [0] + kfs
        bounds = kfs[1:] + [len(idx.pts)]
        count = -1
        for k, stop in reversed(list(zip(kfs, bounds))):
            try:
                if k == 0 or not idx.ordered:
                    self._rewind(container, stream)
                    count = -1
                else:
                    container.seek(int(idx.pts[k]), stream=stream, backward=True)
            except av.error.FFmpegError:
                continue
            best = -1
            try:
                for pkt in container.demux(stream):
                    try:
                        decoded = cc.decode(pkt)
                    except av.error.FFmpegError:
                        continue
                    beyond = False
                    for fr in decoded:
                        if idx.ordered:
                            r = idx.rank.get(fr.pts)
                        else:
                            count += 1
                            r = count
                        if fr.is_corrupt:
                            continue
                        if r is not None and r > best:
                            best = r
                        if r is not None and r >= stop:
                            beyond = True
                    if beyond:
                        break
            except av.error.FFmpegError:
                pass
            if best >= 0:
                self._rewind(container, stream)
                return min(best, len(idx.pts) - 1) + 1
        self._rewind(container, stream)
        return 0

    def _rewind(self, container, stream=None) -> None:
        try:
            container.seek(0, backward=True)  # (flushes the decoders)
        except Exception:  # noqa: BLE001
            if stream is not None:
                try:
                    stream.codec_context.flush_buffers()
                except Exception:  # noqa: BLE001
                    pass

    def _info(self, stream, idx: _PyAVIndex, num: int, notes: list) -> VideoInfo:
        rate = stream.average_rate or stream.guessed_rate
        tb = float(stream.time_base) if stream.time_base else 0.0
        fps = float(rate) if rate else 0.0
        if idx.ordered and tb > 0 and num > 1:
            span = (int(idx.pts[num - 1]) - int(idx.pts[0])) * tb
            step = span / (num - 1)
            if fps <= 0 and step > 0:
                fps = 1.0 / step
            duration = span + (1.0 / fps if fps > 0 else step)
        else:
            duration = num / fps if fps > 0 else 0.0
        if fps <= 0:
            fps = num / duration if duration > 0 else 0.0
        cc = stream.codec_context
        w, h = int(cc.width or 0), int(cc.height or 0)  # coded size; see _rotated
        kf = [int(k) for k in idx.keyframes if k < num] or [0]
        return VideoInfo(num_frames=int(num), fps=fps, duration_sec=float(duration), width=w, height=h,
                         keyframes=kf, declared_num_frames=int(idx.declared or len(idx.pts)), decoder="pyav",
                         codec=str(cc.name or ""), notes=notes)

    # -- public engine operations
    def probe(self, path: str, use_cache: bool = True) -> VideoInfo:
        container, stream = self._open(path)
        try:
            idx, info, rot = self._prepare(path, container, stream, rotation=True, use_cache=use_cache)
            return self._rotated(info, rot)
        finally:
            container.close()

    def read(self, msg: dict, arena: "_Arena | None") -> dict:
        import av

        path = msg["path"]
        t0 = time.perf_counter()
        container, stream = self._open(path, max(1, int(msg.get("threads") or 1)))
        try:
            size = msg.get("size")
            req = np.asarray(msg["indices"], dtype=np.int64)
            entry = self._prepare(path, container, stream, rotation=len(req) == 0 and not size,
                                  use_cache=msg.get("cache", True))
            idx, base, rot = entry
            info = self._rotated(base, rot)
            req = _clamp(req, info.num_frames)
            if len(req) == 0:
                out = _Out(0, arena, *(size or (info.height, info.width)))
                return {"ok": True, "info": asdict(info), "indices": [], "timestamps": [], "shape": out.shape,
                        "decoder": "pyav", "strategy": msg["strategy"], "stats": {}, "array": out.array}
            wanted = np.unique(req)
            strategy = msg["strategy"] if msg["strategy"] != "get_batch" else "seek"
            if not idx.ordered:
                strategy = "sequential"
            conv = _Converter(size, (base.height, base.width), rot_k=rot)
            out = _Out(len(req), arena)
            positions: dict[int, list[int]] = {}
            for i, r in enumerate(req.tolist()):
                positions.setdefault(r, []).append(i)
            stats = {"distinct": int(len(wanted)), "packets": 0, "decoded": 0, "converted": 0, "seeks": 0,
                     "drains": 0}
            segments = plan_segments(wanted.tolist(), info.keyframes, strategy)
            stats["segments"] = len(segments)
            got = self._run_plan(container, stream, idx, wanted, segments, conv, out, positions, stats)
            if rot is None and conv.rot is not None:  # learned from the first decoded frame
                entry[2] = rot = conv.rot
                info = self._rotated(base, rot)
            used = {t: t for t in got}
            missing = [int(t) for t in wanted.tolist() if int(t) not in got]
            if missing:  # undecodable frames (or an inexact seek): a careful pass, substitutes for the rest
                stats["recovery_pass"] = len(missing)
                used.update(self._recover(container, stream, idx, missing, conv, out, positions, stats))
                if not any(u is not None for u in used.values()):
                    raise DecodeError("frame_count_mismatch" if idx.declared else "zero_frames", path,
                                      "none of the requested frames can be decoded")
                gone = [t for t in missing if used.get(t) != t]
                if gone:
                    last_ok = max(u for u in used.values() if u is not None)
                    info.notes.append(f"{len(gone)} requested frame(s) do not decode and were replaced by the "
                                      f"nearest decodable frame")
                    if max(gone) > last_ok:
                        info.num_frames = min(info.num_frames, last_ok + 1)
                        info.notes.append(f"frame count mismatch: only {last_ok + 1} frames decode")
            used_idx = np.asarray([used[int(r)] for r in req.tolist()], dtype=np.int64)
            if idx.ordered:
                start = stream.start_time if stream.start_time is not None else int(idx.pts[0])
                ts = (idx.pts[used_idx] - start) * float(stream.time_base)
            else:
                ts = used_idx / info.fps if info.fps else np.zeros(len(used_idx))
            stats["decode_s"] = time.perf_counter() - t0
            return {"ok": True, "info": asdict(info), "indices": used_idx.tolist(), "timestamps": ts.tolist(),
                    "shape": out.shape, "decoder": "pyav", "strategy": strategy, "stats": stats,
                    "array": out.array}
        except av.error.FFmpegError as e:
            raise DecodeError("decode_error", path, f"pyav: {e}") from None
        finally:
            container.close()

    # -- decoding
    def _run_plan(self, container, stream, idx, wanted, segments, conv, out, positions, stats) -> set:
        """Execute the plan; returns the wanted frames that were decoded.

        Packets of frames nobody wants are sent with skip_frame=NONREF (a non-reference frame is then not
        decoded at all). When every wanted packet of a segment is in the decoder and the next segment
        starts with a seek (or there is none), the decoder is drained instead of fed further packets."""
        import av

        cc = stream.codec_context
        ordered = idx.ordered
        remaining = set(int(t) for t in wanted.tolist())
        wanted_pts = {int(idx.pts[t]) for t in remaining} if ordered else set()
        got: set[int] = set()
        demux = None
        started = False
        count = -1  # output counter (streams without usable timestamps only)
        mode = "DEFAULT"
        kf = np.asarray(sorted(set([0] + [int(k) for k in idx.keyframes])), dtype=np.int64)
        rank = idx.rank

        def take(frames) -> bool:
            """Handle decoded frames; True once the segment's last wanted frame has gone by."""
            nonlocal count
            passed = False
            for fr in frames:
                stats["decoded"] += 1
                if ordered:
                    r = rank.get(fr.pts)
                else:
                    count += 1
                    r = count
                if r is None or fr.is_corrupt:  # concealed garbage is not a frame of the video
                    continue
                if r in remaining:
                    conv.write(fr, r, out, positions)
                    stats["converted"] += 1
                    remaining.discard(r)
                    need.discard(r)
                    got.add(r)
                if r >= last:
                    passed = True
            return passed

        for si, (seek_kf, frames) in enumerate(segments):
            need = set(frames) & remaining
            if not need:
                continue
            if demux is None and started and seek_kf is None:  # the previous segment ended the stream
                seek_kf = int(kf[np.searchsorted(kf, min(need), side="right") - 1])
            if seek_kf is not None and (started or seek_kf > 0):
                if seek_kf > 0 and ordered:
                    container.seek(int(idx.pts[seek_kf]), stream=stream, backward=True)
                else:
                    self._rewind(container, stream)
                    count = -1
                stats["seeks"] += 1
                demux = None
            if demux is None:
                demux = container.demux(stream)
            started = True
            last = max(need)
            unsent = {int(idx.pts[t]) for t in need} if ordered else set()
            may_drain = ordered and (si + 1 == len(segments) or segments[si + 1][0] is not None)
            for pkt in demux:
                if ordered:
                    p = pkt.pts
                    want = pkt.size == 0 or p in wanted_pts
                    if want != (mode == "DEFAULT"):
                        mode = "DEFAULT" if want else "NONREF"
                        cc.skip_frame = mode
                    stats["packets"] += 1
                    unsent.discard(p)
                try:
                    decoded = cc.decode(pkt)
                except av.error.FFmpegError:
                    continue  # a corrupt packet: its frame is lost (a later keyframe recovers)
                if take(decoded) or not need:
                    break
                if may_drain and not unsent:
                    try:
                        take(cc.decode(None))  # all wanted packets are in: drain, feed nothing more
                    except av.error.FFmpegError:
                        pass
                    stats["drains"] += 1
                    demux = None
                    break
            else:
                demux = None  # end of file (the decoder was drained by the flush packet)
        if mode != "DEFAULT":
            cc.skip_frame = "DEFAULT"
        return got

    def _recover(self, container, stream, idx, missing, conv, out, positions, stats) -> dict:
        """One careful pass from the start (no frame skipping): decode the missing frames, or else use the
        nearest decodable frame before (after, when there is none before) each one."""
        import av

        cc = stream.codec_context
        cc.skip_frame = "DEFAULT"
        self._rewind(container, stream)
        pending = sorted(missing)
        used: dict[int, int] = {}
        prev = None  # (rank, frame) of the last decoded frame
        count = -1
        j = 0
        try:
            for pkt in container.demux(stream):
                try:
                    decoded = cc.decode(pkt)
                except av.error.FFmpegError:
                    continue
                for fr in decoded:
                    stats["decoded"] += 1
                    if idx.ordered:
                        r = idx.rank.get(fr.pts)
                    else:
                        count += 1
                        r = count
                    if r is None or fr.is_corrupt:
                        continue
                    while j < len(pending) and pending[j] < r:  # passed pending[j] without seeing it
                        src = prev if prev is not None else (r, fr)
                        conv.write(src[1], pending[j], out, positions)
                        stats["converted"] += 1
                        used[pending[j]] = src[0]
                        j += 1
                    if j < len(pending) and pending[j] == r:
                        conv.write(fr, r, out, positions)
                        stats["converted"] += 1
                        used[r] = r
                        j += 1
                    prev = (r, fr)
                if j >= len(pending):
                    break
        except av.error.FFmpegError:
            pass
        while j < len(pending):  # past the last decodable frame
            if prev is not None:
                conv.write(prev[1], pending[j], out, positions)
                stats["converted"] += 1
            used[pending[j]] = prev[0] if prev is not None else None
            j += 1
        return used


def _rotation_k(frame) -> int:
    """Quarter turns (counter-clockwise, as np.rot90) that display the frame upright, as decord does."""
    try:
        rot = float(getattr(frame, "rotation", 0) or 0)
    except (TypeError, ValueError):
        rot = 0.0
    return int(round(rot / 90.0)) % 4


class _Converter:
    """Decoded frame -> RGB at the output size, the way decord does it (see the module doc).

    ``size`` None keeps the coded size (after rotation); the rotation comes from the first frame when not
    given."""

    def __init__(self, size, coded_hw: tuple[int, int], rot_k: int | None = None):
        self.size = tuple(size) if size else None
        self.coded_hw = coded_hw
        self.rot = None
        self.h = self.w = None
        self.graph = None
        self.key = None
        self.reformatter = None
        if rot_k is not None:
            self._set_rotation(rot_k)

    def _set_rotation(self, k: int) -> None:
        self.rot = k
        if self.size:
            self.h, self.w = self.size
        else:
            h, w = self.coded_hw
            self.h, self.w = (w, h) if k % 2 else (h, w)

    def _build(self, frame):
        from av.filter import Graph

        g = Graph()
        src = g.add_buffer(width=frame.width, height=frame.height, format=frame.format.name,
                           time_base=frame.time_base or "1/30")
        # decord's order: transpose (display rotation) first, then scale, then the RGB conversion
        chain = {0: [], 1: [("transpose", "2")], 2: [("transpose", "1"), ("transpose", "1")],
                 3: [("transpose", "1")]}[self.rot]
        chain.append(("scale", f"{self.w}:{self.h}:flags=bilinear"))
        chain.append(("format", "rgb24"))
        prev = src
        for name, args in chain:
            node = g.add(name, args)
            prev.link_to(node)
            prev = node
        sink = g.add("buffersink")
        prev.link_to(sink)
        g.configure()
        self.graph = g
        self.key = (frame.width, frame.height, frame.format.name)

    def rgb(self, frame) -> np.ndarray:
        if self.rot is None:
            self._set_rotation(_rotation_k(frame))
        if not self.size and not self.rot and frame.width == self.w and frame.height == self.h:
            # same bytes as the scale+format graph at the same size; one reformatter keeps its swscale
            # context (frame.to_ndarray(format=...) builds a new one per frame: 10x slower at 224x224)
            if self.reformatter is None:
                from av.video.reformatter import VideoReformatter
                self.reformatter = VideoReformatter()
            return self.reformatter.reformat(frame, format="rgb24").to_ndarray()
        if self.graph is None or self.key != (frame.width, frame.height, frame.format.name):
            self._build(frame)
        self.graph.push(frame)
        return self.graph.pull().to_ndarray()

    def write(self, frame, r: int, out: _Out, positions: dict) -> None:
        img = self.rgb(frame)
        out.ensure(img.shape[0], img.shape[1])
        for p in positions.get(r, ()):
            out.array[p] = img


# ---------------------------------------------------------------------------- decord engine

class _DecordEngine:
    name = "decord"

    def _open(self, path: str, size=None, threads: int = 1):
        import decord

        try:
            kw = dict(ctx=decord.cpu(0), num_threads=threads)
            if size:
                kw.update(width=int(size[1]), height=int(size[0]))
            vr = decord.VideoReader(path, **kw)
        except Exception as e:  # noqa: BLE001
            raise DecodeError("decode_error", path, f"decord cannot open: {str(e).splitlines()[0][:300]}") from None
        if len(vr) == 0:
            raise DecodeError("zero_frames", path, "decord finds no frame")
        return vr

    def _info(self, vr, width: int, height: int) -> VideoInfo:
        n = len(vr)
        fps = float(vr.get_avg_fps() or 0.0)
        stop = vr.get_frame_timestamp(n - 1)
        duration = float(stop[1]) if len(stop) > 1 and stop[1] > 0 else (n / fps if fps else 0.0)
        kf = [int(k) for k in vr.get_key_indices()] or [0]
        return VideoInfo(num_frames=n, fps=fps, duration_sec=duration, width=int(width), height=int(height),
                         keyframes=kf, declared_num_frames=n, decoder="decord", codec="", notes=[])

    def probe(self, path: str) -> VideoInfo:
        vr = self._open(path)
        try:
            h, w = vr[0].shape[:2]
        except Exception as e:  # noqa: BLE001
            raise DecodeError("decode_error", path, f"decord: {str(e).splitlines()[0][:300]}") from None
        return self._info(vr, w, h)

    def read(self, msg: dict, arena: "_Arena | None") -> dict:
        path = msg["path"]
        t0 = time.perf_counter()
        size = msg.get("size")
        threads = max(1, int(msg.get("threads") or 1))
        vr = self._open(path, size, threads)
        n = len(vr)
        req = _clamp(np.asarray(msg["indices"], dtype=np.int64), n)
        wanted = np.unique(req)
        try:
            if len(wanted) == 0:
                frames = {}
            elif msg["strategy"] != "sequential":
                # decord's get_batch: forward within a GOP, seek to the keyframe otherwise
                batch = vr.get_batch(wanted.tolist()).asnumpy()
                frames = {int(t): batch[i] for i, t in enumerate(wanted.tolist())}
            else:  # sequential: decode (and convert) every frame up to the last wanted one
                frames = {}
                want = set(int(t) for t in wanted.tolist())
                for i in range(int(wanted[-1]) + 1):
                    f = vr.next()
                    if i in want:
                        frames[i] = f.asnumpy()
            ts = vr.get_frame_timestamp(wanted.tolist())[:, 0] if len(wanted) else []
            if size:
                w, h = self._native_size(path)
            else:
                h, w = (next(iter(frames.values())).shape[:2] if frames else vr[0].shape[:2])
        except DecodeError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DecodeError("decode_error", path, f"decord: {str(e).splitlines()[0][:300]}") from None
        info = self._info(vr, w, h)
        oh, ow = (size if size else (h, w))
        out = _Out(len(req), arena, oh, ow)
        tmap = {int(t): float(x) for t, x in zip(wanted.tolist(), ts)}
        for i, r in enumerate(req.tolist()):
            out.array[i] = frames[r]
        stats = {"distinct": int(len(wanted)), "converted": int(len(wanted)), "decode_s": time.perf_counter() - t0}
        return {"ok": True, "info": asdict(info), "indices": req.tolist(),
                "timestamps": [tmap[r] for r in req.tolist()], "shape": out.shape, "decoder": "decord",
                "strategy": "sequential" if msg["strategy"] == "sequential" else "get_batch", "stats": stats,
                "array": out.array}

    def _native_size(self, path: str) -> tuple[int, int]:
        """(width, height) of a frame at the stream's own size, after rotation."""
        vr = self._open(path)
        h, w = vr[0].shape[:2]
        return w, h


_ENGINES = {"pyav": _PyAVEngine(), "decord": _DecordEngine()}
