"""Test helpers: real H.264 videos whose frames say which frame they are, and a corpus of broken files.

Every frame written by :func:`make_video` carries its own index as a 16-bit code drawn as two rows of
eight black/white blocks across the top quarter of the picture; the rest is a seeded smooth texture
that drifts a few pixels per frame, so the encoder produces realistic motion-compensated P/B frames
(flat frames would make decoding unrealistically cheap). :func:`frame_index_of` reads the code back,
also after the frame has been resized (blocks survive resizing down to about 16 pixels wide).

Files are written with PyAV (no ffmpeg binary needed) with one encoder thread, so a given set of
arguments always produces the same bytes.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np

CODE_ROWS, CODE_COLS = 2, 8  # 16 bits: frame indices up to 65535
_LO, _HI = 16, 235


def frame_code(index: int, h: int, w: int) -> np.ndarray:
    """The [h, w] uint8 code image of ``index`` (top quarter; rows below are left 0)."""
    img = np.zeros((h, w), np.uint8)
    bh = max(1, h // (4 * CODE_ROWS))
    for bit in range(CODE_ROWS * CODE_COLS):
        r, c = divmod(bit, CODE_COLS)
        x0, x1 = c * w // CODE_COLS, (c + 1) * w // CODE_COLS
        img[r * bh:(r + 1) * bh, x0:x1] = _HI if (index >> bit) & 1 else _LO
    return img


def frame_index_of(frame: np.ndarray) -> int:
    """Read back the index drawn by :func:`make_video` from an RGB (or grey) frame of any size."""
    f = np.asarray(frame, dtype=np.float32)
    if f.ndim == 3:
        f = f.mean(axis=2)
    h, w = f.shape
    bh = h / (4 * CODE_ROWS)
    v = 0
    for bit in range(CODE_ROWS * CODE_COLS):
        r, c = divmod(bit, CODE_COLS)
        y0, y1 = int(r * bh + bh * 0.3), int(r * bh + bh * 0.7) + 1
        x0, x1 = int((c + 0.3) * w / CODE_COLS), int((c + 0.7) * w / CODE_COLS) + 1
        if f[y0:y1, x0:x1].mean() > 128:
            v |= 1 << bit
    return v


def _texture(h: int, w: int, seed: int, margin: int) -> np.ndarray:
    """A smooth random RGB texture of size [h + margin, w + margin, 3] (bilinear upsampled noise)."""
    rng = np.random.default_rng(seed)
    H, W = h + margin, w + margin
    gh, gw = max(2, H // 12), max(2, W // 12)
    coarse = rng.uniform(30, 225, size=(gh, gw, 3)).astype(np.float32)
    ys = np.linspace(0, gh - 1, H)
    xs = np.linspace(0, gw - 1, W)
    y0 = np.floor(ys).astype(int).clip(0, gh - 2)
    x0 = np.floor(xs).astype(int).clip(0, gw - 2)
    fy = (ys - y0)[:, None, None]
    fx = (xs - x0)[None, :, None]
    a = coarse[y0][:, x0]
    b = coarse[y0][:, x0 + 1]
    c = coarse[y0 + 1][:, x0]
    d = coarse[y0 + 1][:, x0 + 1]
    out = (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy
    out += rng.normal(0, 6, size=out.shape).astype(np.float32)  # fine grain: some real residual to code
    return out.clip(0, 255).astype(np.uint8)


def render_frame(index: int, h: int, w: int, seed: int = 0, texture: np.ndarray | None = None) -> np.ndarray:
    """The RGB [h, w, 3] picture of frame ``index``."""
    margin = 64
    if texture is None:
        texture = _texture(h, w, seed, margin)
    # drift along a slow Lissajous path (stays inside the margin)
    dy = int(round((margin - 1) / 2 * (1 + np.sin(index / 23.0))))
    dx = int(round((margin - 1) / 2 * (1 + np.cos(index / 31.0))))
    img = texture[dy:dy + h, dx:dx + w].copy()
    code = frame_code(index, h, w)
    code_h = max(1, h // (4 * CODE_ROWS)) * CODE_ROWS
    img[:code_h] = code[:code_h, :, None]
    return img


def make_video(path, num_frames: int, fps: float = 30, size: tuple[int, int] = (96, 128), gop: int = 30,
               codec: str = "libx264", seed: int = 0, *, bframes: int | None = None, faststart: bool = False,
               crf: int = 23, preset: str = "medium", container: str | None = None, rotation: int = 0) -> Path:
    """Write a real video of ``num_frames`` frames whose frame ``i`` shows the code of ``i``.

    ``gop``: keyframe interval (fixed; scene-cut keyframes are disabled for libx264), ``bframes``:
    B-frames between references (x264's default, 3, when None), ``faststart``: put the mp4 index
    (moov) before the media data, ``container``: force a muxer (e.g. "matroska") whatever the suffix,
    ``rotation``: display rotation (degrees counter-clockwise) stored in the stream's display matrix.
    Deterministic for given arguments (single-threaded encoder).
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    options = {}
    if faststart:
        options["movflags"] = "+faststart"
    out = av.open(str(path), mode="w", format=container, options=options)
    try:
        rate = Fraction(fps).limit_denominator(1001)
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1
        copts = {}
        if codec == "libx264":
            params = [f"keyint={gop}", f"min-keyint={gop}", "scenecut=0", "threads=1", f"crf={crf}"]
            if bframes is not None:
                params.append(f"bframes={bframes}")
            copts = {"preset": preset, "x264-params": ":".join(params)}
        else:
            stream.codec_context.gop_size = gop
        stream.options = copts
        if rotation:
            stream.set_display_rotation(rotation)
        tex = _texture(h, w, seed, 64)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(render_frame(i, h, w, seed, tex), format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            for pkt in stream.encode(frame):
                out.mux(pkt)
        for pkt in stream.encode(None):
            out.mux(pkt)
    finally:
        out.close()
    return path


def make_zero_frame_video(path, size: tuple[int, int] = (96, 128), fps: float = 30) -> Path:
    """An AVI file with a declared H.264 video stream and not a single frame in it.

    (AVI, because FFmpeg's mp4 reader drops a track without samples: such an mp4 has no video stream.)
    """
    import av

    path = Path(path)
    out = av.open(str(path), mode="w", format="avi")
    try:
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = size[1], size[0]
        stream.pix_fmt = "yuv420p"
        out.start_encoding()  # write the container header, then no packet at all
    finally:
        out.close()
    return path


def make_audio_only(path, seconds: float = 1.0, rate: int = 16000) -> Path:
    """A valid media file (WAV/PCM muxed as given by the suffix-independent ``wav`` format) with no video."""
    import av

    path = Path(path)
    out = av.open(str(path), mode="w", format="wav")
    try:
        stream = out.add_stream("pcm_s16le", rate=rate)
        stream.layout = "mono"
        n = int(seconds * rate)
        t = np.arange(n) / rate
        samples = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = 0
        for pkt in stream.encode(frame):
            out.mux(pkt)
        for pkt in stream.encode(None):
            out.mux(pkt)
    finally:
        out.close()
    return path


def make_png(path, size: tuple[int, int] = (48, 64)) -> Path:
    """A single PNG picture (written at ``path`` whatever its suffix)."""
    import av

    path = Path(path)
    out = av.open(str(path), mode="w", format="image2pipe")
    try:
        stream = out.add_stream("png", rate=1)
        stream.width, stream.height = size[1], size[0]
        stream.pix_fmt = "rgb24"
        frame = av.VideoFrame.from_ndarray(render_frame(0, size[0], size[1]), format="rgb24")
        frame.pts = 0
        for pkt in stream.encode(frame):
            out.mux(pkt)
        for pkt in stream.encode(None):
            out.mux(pkt)
    finally:
        out.close()
    return path


def _mp4_boxes(data: bytes) -> list[tuple[str, int, int]]:
    """Top-level ISO-BMFF boxes of ``data`` as (type, offset, size)."""
    boxes, off = [], 0
    while off + 8 <= len(data):
        size = int.from_bytes(data[off:off + 4], "big")
        kind = data[off + 4:off + 8].decode("latin-1")
        if size == 1:
            size = int.from_bytes(data[off + 8:off + 16], "big")
        elif size == 0:
            size = len(data) - off
        boxes.append((kind, off, size))
        if size < 8:
            break
        off += size
    return boxes


def _cut(src: Path, dst: Path, n: int) -> None:
    dst.write_bytes(src.read_bytes()[:n])


def make_fault_corpus(directory, *, size: tuple[int, int] = (96, 128)) -> dict[str, tuple[Path, str]]:
    """Broken and tricky files: ``{name: (path, expected_reason)}``.

    ``expected_reason`` is a :class:`pipeline.decode.DecodeError` reason, or ``"ok"`` for files that
    must still decode (with indices clamped to the frames that really exist, or despite a misleading
    suffix):

    * ``missing``            — no such file                                          → missing
    * ``empty``              — 0 bytes                                               → empty
    * ``text_as_mp4``        — a text file named .mp4                                → not_video
    * ``audio_only``         — a valid WAV file named .mp4 (no video stream)         → not_video
    * ``image_as_mp4``       — a PNG picture named .mp4                              → not_video
    * ``truncated``          — an mp4 (index at the end) cut in the middle of mdat   → truncated
    * ``zero_frames``        — an AVI with a video stream and no frames              → zero_frames
    * ``lying_header``       — faststart mp4 (index first) with mdat cut at 60 %:
                               the header declares 90 frames, about 54 exist         → ok (clamped)
    * ``lying_header_empty`` — faststart mp4 cut right after the index: the header
                               declares 90 frames, none exists                       → frame_count_mismatch
    * ``mkv_as_mp4``         — a Matroska file named .mp4                            → ok
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, str]] = {}

    out["missing"] = (d / "missing.mp4", "missing")

    p = d / "empty.mp4"
    p.write_bytes(b"")
    out["empty"] = (p, "empty")

    p = d / "text_as_mp4.mp4"
    p.write_text("this is not a video\n" * 50)
    out["text_as_mp4"] = (p, "not_video")

    p = make_audio_only(d / "audio_only.mp4")
    out["audio_only"] = (p, "not_video")

    p = make_png(d / "image_as_mp4.mp4")
    out["image_as_mp4"] = (p, "not_video")

    full = make_video(d / "_full.mp4", 90, 30, size, gop=30, seed=1)
    data = full.read_bytes()
    mdat = next(b for b in _mp4_boxes(data) if b[0] == "mdat")
    p = d / "truncated.mp4"
    _cut(full, p, mdat[1] + mdat[2] // 2)
    out["truncated"] = (p, "truncated")

    p = make_zero_frame_video(d / "zero_frames.avi", size)
    out["zero_frames"] = (p, "zero_frames")

    fast = make_video(d / "_faststart.mp4", 90, 30, size, gop=30, seed=2, faststart=True)
    data = fast.read_bytes()
    mdat = next(b for b in _mp4_boxes(data) if b[0] == "mdat")
    p = d / "lying_header.mp4"
    _cut(fast, p, mdat[1] + 8 + int((mdat[2] - 8) * 0.6))
    out["lying_header"] = (p, "ok")

    p = d / "lying_header_empty.mp4"
    _cut(fast, p, mdat[1] + 8)
    out["lying_header_empty"] = (p, "frame_count_mismatch")

    p = make_video(d / "mkv_as_mp4.mp4", 60, 30, size, gop=30, seed=3, container="matroska")
    out["mkv_as_mp4"] = (p, "ok")

    for tmp in ("_full.mp4", "_faststart.mp4"):
        os.unlink(d / tmp)
    return out
