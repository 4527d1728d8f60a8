"""The MA-LMM model (see the README's architecture section).

* :mod:`pipeline.model.modeling_malmm` – ``MALMMConfig``, ``MemoryQFormer``, ``MALMM`` (one readable file);
* :mod:`pipeline.model.memory` – memory banks, ``compress`` (memory bank compression), ``MemoryState``;
* :mod:`pipeline.model.checkpoint` – ``load_malmm``, ``load_vision_model``, ``save_checkpoint``,
  ``load_checkpoint``, ``lavis_to_hf_keys``, ``lavis_recorded_settings``, ``malmm_config_from_lavis``;
* :mod:`pipeline.model.tiny` – ``build_tiny_instructblip``, the embedded default model.

The names are re-exported lazily, so ``import pipeline.model`` does not import torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "MALMMConfig": "modeling_malmm", "MALMM": "modeling_malmm", "MemoryQFormer": "modeling_malmm",
    "MemoryState": "memory", "compress": "memory",
    "load_malmm": "checkpoint", "load_vision_model": "checkpoint", "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint", "lavis_to_hf_keys": "checkpoint",
    "lavis_recorded_settings": "checkpoint", "malmm_config_from_lavis": "checkpoint",
    "build_tiny_instructblip": "tiny",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
