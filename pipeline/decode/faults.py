"""Fault injection: a picklable description of a failure for the decode worker to simulate.

Tests pass one to :func:`pipeline.decode.read_frames` / :func:`pipeline.decode.probe` (``fault=``); it
travels with the request into the watchdog worker (or the in-process call), which applies it just
before it uses an engine. The pipeline itself never passes one (the default is None).
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

KINDS = ("hang", "crash", "fail")


@dataclass(frozen=True)
class Fault:
    """``kind``: 'hang' (sleep ``seconds`` before decoding), 'crash' (the worker kills itself with SIGSEGV)
    or 'fail' (the engine raises as if it could not decode); ``engine``: 'pyav', 'decord' or 'any'."""

    kind: str
    engine: str = "any"
    seconds: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"fault kind must be one of {KINDS}, got {self.kind!r}")

    def apply(self, engine: str) -> None:
        """Simulate the fault before ``engine`` is used (nothing when it targets another engine)."""
        if self.engine not in ("any", engine):
            return
        if self.kind == "hang":
            time.sleep(self.seconds)
        elif self.kind == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        else:
            raise RuntimeError(f"simulated {engine} failure (test hook)")
