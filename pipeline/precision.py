"""Numeric precision of train and infer (``--precision bf16|fp16|fp32``), declared once.

- ``fp32``: no autocast; the default on a CPU.
- ``bf16``: autocast to bfloat16; the default on a GPU that supports it (Ampere and newer).
- ``fp16``: autocast to float16 with a dynamic loss scale (`torch.amp.GradScaler`) for training,
  for GPUs without bf16 (V100, T4).

Weights stay float32 (the trainable parts: AdamW keeps an fp32 master copy by construction);
autocast casts the matmuls. ``auto`` resolves to ``bf16`` on a bf16-capable GPU, ``fp16`` on any
other GPU, and ``fp32`` on a CPU.
"""
from __future__ import annotations

import contextlib

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def check(precision: str | None, gpu: bool) -> str:
    """Validation before any work starts: the option's value, and fp16 only where GPUs are asked for."""
    p = (precision or "auto").lower()
    if p not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if p == "fp16" and not gpu:
        raise ValueError("--precision fp16 needs a GPU (CPUs have no fast float16 autocast); use bf16 or fp32")
    return p


def resolve(precision: str | None, device) -> str:
    """The precision a run on ``device`` uses: ``precision`` itself, or what ``auto`` / None means there."""
    import torch  # heavy: imported on use
    dev = torch.device(device)
    p = check(precision, gpu=dev.type != "cpu")
    if p == "auto":
        if dev.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return p


def autocast(precision: str, device):
    """The autocast context of a resolved precision on ``device`` (a no-op for fp32)."""
    import torch  # heavy: imported on use
    dev = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(dev.type, dtype=dtype)


def grad_scaler(precision: str, device):
    """A `GradScaler` for fp16 training (enabled only then; for bf16 and fp32 it passes through)."""
    import torch  # heavy: imported on use
    dev = torch.device(device)
    return torch.amp.GradScaler(dev.type, enabled=(precision == "fp16"))
