"""Probing: what a file is and what a video really holds, before any frame is decoded for a caller.

Path normalisation and the checks that need no decoder (missing, empty, a directory); what the bytes
look like when FFmpeg cannot open a file (cut short, a damaged container, not media at all); and PyAV's
probe: the packet index (presentation order, keyframes), the frame count that really decodes when the
header or the packets lie, and the display rotation. See the package doc (:mod:`pipeline.decode`) and
the README's architecture section.
"""
from __future__ import annotations

import os

import numpy as np

from pipeline import storage
from pipeline.decode.results import DecodeError, VideoInfo

# demuxers that read a still picture or text, not a video ("*_pipe" are single-image demuxers too);
# animated GIF/APNG/WebP are left as videos
IMAGE_FORMATS = ("image2", "tty")


def normalise_path(path) -> str:
    """The local file to decode: a path made absolute, a ``file://`` URI's path, or for an object-store
    URI (``s3://``, ``gs://``) its copy in the local object cache (`pipeline.storage.local_path`,
    fetched once, again only when the object changes; :func:`release` removes it)."""
    p = os.fspath(path)
    if isinstance(p, bytes):
        p = p.decode()
    if storage.is_uri(p):
        try:
            return str(storage.local_path(p))
        except FileNotFoundError:
            raise DecodeError("missing", p, "no such object") from None
        except storage.StorageError as e:
            raise DecodeError("missing", p, str(e)) from None
    if p.startswith("file://"):
        p = p[len("file://"):]
    return os.path.abspath(p)


def release(path) -> None:
    """Drop the local copy of an object-store video once it is decoded (a local file is left alone)."""
    p = os.fspath(path)
    if storage.is_uri(p):
        storage.evict(p)


def precheck(path: str) -> None:
    if not os.path.exists(path):
        raise DecodeError("missing", path, "no such file")
    if os.path.isdir(path):
        raise DecodeError("not_video", path, "is a directory")
    if os.path.getsize(path) == 0:
        raise DecodeError("empty", path, "0 bytes")


_MP4_TOP = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"styp", b"sidx", b"uuid", b"moof",
            b"mfra", b"meta", b"pdin", b"prft", b"emsg"}


def sniff(path: str) -> str:
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


def rotation_k(frame) -> int:
    """Quarter turns (counter-clockwise, as np.rot90) that display the frame upright, as decord does."""
    try:
        rot = float(getattr(frame, "rotation", 0) or 0)
    except (TypeError, ValueError):
        rot = 0.0
    return int(round(rot / 90.0)) % 4


class PyAVIndex:
    """Packet index of the video stream, in presentation order."""

    def __init__(self, pts: np.ndarray, keyframes: np.ndarray, ordered: bool, damaged: str, declared: int):
        self.pts = pts  # sorted pts of frames
        self.keyframes = keyframes
        self.ordered = ordered  # pts are usable (distinct, present); else frames are counted in output order
        self.damaged = damaged  # why the tail needs checking ('' when healthy)
        self.declared = declared
        self.rank = {int(p): i for i, p in enumerate(pts)} if ordered else {}


class PyAVProber:
    """PyAV's side of probing (the PyAV engine, :class:`pipeline.decode.engines.PyAVEngine`, builds on it)."""

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
            kind = sniff(path)
            if kind == "truncated":
                raise DecodeError("truncated", path, f"the file is cut short ({e})") from None
            if kind == "container":
                raise DecodeError("decode_error", path, f"cannot open: {e}") from None
            raise DecodeError("not_video", path, f"not a recognised media file ({e})") from None
        fmt = container.format.name or ""
        if not container.streams.video or any(x in fmt.split(",") for x in IMAGE_FORMATS) \
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

    def _index(self, path: str, container, stream) -> PyAVIndex:
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
            return PyAVIndex(np.zeros(0, np.int64), np.zeros(0, np.int64), True, damaged, declared)
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
        return PyAVIndex(spts, kf.astype(np.int64), ordered, damaged, declared)

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
                    k = rotation_k(frames[0])
                    break
        except av.error.FFmpegError:
            pass
        self._rewind(container, stream)
        return k

    def _decodable_prefix(self, container, stream, idx: PyAVIndex) -> int:
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

    def _info(self, stream, idx: PyAVIndex, num: int, notes: list) -> VideoInfo:
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

