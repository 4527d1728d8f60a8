"""Engines: decode the wanted frames of one file, in the calling process (the watchdog runs them in its
workers).

* :class:`PyAVEngine` (primary) executes a plan (:mod:`pipeline.decode.plan`) over the packet index its
  probe built (:mod:`pipeline.decode.probe`): frames nobody wants are skipped when nothing depends on
  them, the decoder is drained before a seek, only wanted frames are converted to RGB.
* :class:`DecordEngine`: decord's ``VideoReader`` (fallback, and ``get_batch``).
* :class:`Converter`: decoded frame → RGB at the output size, the way decord does it, so both engines
  return the same bytes; :class:`Out`: the output frames, in requested order.
* :func:`handle`: one request, trying the engines in order (the fallback rules: the package doc,
  :mod:`pipeline.decode`).
"""
from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np

from pipeline.decode.plan import plan_segments
from pipeline.decode.probe import PyAVProber, rotation_k
from pipeline.decode.results import DecodeError, VideoInfo

# ``arena`` below: the watchdog's shared frame buffer (:class:`pipeline.decode.watchdog.Arena`; engines only
# call its ``.array(shape)``), or None for a plain array. (Not imported: the watchdog imports this module.)


def clamp(req: np.ndarray, num_frames: int) -> np.ndarray:
    return np.clip(req, 0, num_frames - 1)


class Out:
    """Output frames [N, H, W, 3] in requested order: in the shared arena, or a plain array (allocated
    when the output size is known: at once, or at the first converted frame)."""

    def __init__(self, n: int, arena: "Arena | None", h: int | None = None, w: int | None = None):  # noqa: F821  (not imported: see above)
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


class Converter:
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
            self._set_rotation(rotation_k(frame))
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

    def write(self, frame, r: int, out: Out, positions: dict) -> None:
        img = self.rgb(frame)
        out.ensure(img.shape[0], img.shape[1])
        for p in positions.get(r, ()):
            out.array[p] = img


# ---------------------------------------------------------------------------- PyAV engine

class PyAVEngine(PyAVProber):
    """PyAV: probe (:class:`pipeline.decode.probe.PyAVProber`) and the plan executor."""

    def read(self, msg: dict, arena: "Arena | None") -> dict:  # noqa: F821
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
            req = clamp(req, info.num_frames)
            if len(req) == 0:
                out = Out(0, arena, *(size or (info.height, info.width)))
                return {"ok": True, "info": asdict(info), "indices": [], "timestamps": [], "shape": out.shape,
                        "decoder": "pyav", "strategy": msg["strategy"], "stats": {}, "array": out.array}
            wanted = np.unique(req)
            strategy = msg["strategy"] if msg["strategy"] != "get_batch" else "seek"
            if not idx.ordered:
                strategy = "sequential"
            conv = Converter(size, (base.height, base.width), rot_k=rot)
            out = Out(len(req), arena)
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


# ---------------------------------------------------------------------------- decord engine

class DecordEngine:
    """decord's ``VideoReader``: the fallback engine, and the one ``strategy='get_batch'`` tries first."""

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

    def read(self, msg: dict, arena: "Arena | None") -> dict:  # noqa: F821
        path = msg["path"]
        t0 = time.perf_counter()
        size = msg.get("size")
        threads = max(1, int(msg.get("threads") or 1))
        vr = self._open(path, size, threads)
        n = len(vr)
        req = clamp(np.asarray(msg["indices"], dtype=np.int64), n)
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
        out = Out(len(req), arena, oh, ow)
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


ENGINES = {"pyav": PyAVEngine(), "decord": DecordEngine()}


def handle(msg: dict, arena: "Arena | None") -> dict:  # noqa: F821
    """Serve one request with engine fallback; never raises (in the worker, or in-process)."""
    path = msg["path"]
    engines = msg.get("engines") or ["pyav", "decord"]
    fault = msg.get("fault")
    errors = []
    for engine in engines:
        try:
            if fault is not None:
                fault.apply(engine)
            if msg["op"] == "probe":
                info = (ENGINES[engine].probe(path, use_cache=msg.get("cache", True)) if engine == "pyav"
                        else ENGINES[engine].probe(path))
                return {"ok": True, "info": asdict(info)}
            return ENGINES[engine].read(msg, arena)
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
