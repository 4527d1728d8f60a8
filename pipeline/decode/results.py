"""What decoding returns and how it fails: :class:`VideoInfo`, :class:`DecodedFrames`, :class:`DecodeError`
and its :data:`REASONS` (what each reason means: the package doc, :mod:`pipeline.decode`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

REASONS = ("missing", "empty", "not_video", "truncated", "zero_frames", "frame_count_mismatch", "timeout",
           "decode_error")


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

