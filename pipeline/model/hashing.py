"""Weight hashing, declared once: every identity the project records for a set of weights.

- `tensors_digest`: SHA-256 over (name, float32 bytes) of named tensors — the frozen LLM
  before/after training (train's ``frozen_llm.json``) and the vision model's weights hash in
  every sample's metadata (extract).
- `vision_model_identity`: name, config hash and weights hash of the vision model.
- `base_model_identity`: a cheap identity of a base model folder (config bytes, weight file
  names and sizes), recorded in every checkpoint and checked when one is loaded.
- `checkpoint_identity`: the short hash naming the weights that produce predictions (infer's
  fingerprints).

The values are part of the outputs (shard metadata, checkpoints, prediction fingerprints):
changing a formula changes bytes on disk and re-predicts every sample.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from pipeline import storage

WEIGHT_SUFFIXES = (".safetensors", ".json", ".pth", ".bin")
_WHOLE_FILE_LIMIT = 64 << 20  # larger weight files are hashed by size, head and tail
_HEAD_TAIL = 1 << 20


def tensors_digest(named_tensors: Iterable[tuple[str, "object"]]) -> str:
    """SHA-256 hex over each tensor's name and its float32 bytes, in the order given."""
    h = hashlib.sha256()
    for name, t in named_tensors:
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def module_digest(module) -> str:
    """`tensors_digest` of a module's parameters then buffers (e.g. the frozen LLM)."""
    return tensors_digest(list(module.named_parameters()) + list(module.named_buffers()))


def vision_model_identity(model, model_dir: str) -> dict:
    """Name, config hash and weights hash of the vision model (stored in every sample's metadata)."""
    cfg = model.config.to_dict()
    for k in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    return {"name": Path(model_dir).name, "class": type(model).__name__,
            "config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16],
            "weights_sha256": tensors_digest(sorted(model.state_dict().items()))[:16]}


def base_model_identity(model_dir: str | Path | None) -> dict:
    """Cheap identity of a base model directory: name, config hash, weight file names and sizes."""
    if model_dir is None:
        return {}
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    h = hashlib.sha256(storage.read_bytes(config) if storage.exists(config) else b"")
    for p in storage.listdir(model_dir, "*.safetensors") + storage.listdir(model_dir, "*.bin"):
        h.update(f"{p.name}:{storage.size(p)}".encode())
    return {"name": model_dir.name, "sha256": h.hexdigest()[:16]}


def checkpoint_identity(checkpoint: str | None, model_dir: str, malmm: dict) -> str:
    """A short hash naming the weights that produce the predictions."""
    h = hashlib.sha256(json.dumps(malmm, sort_keys=True).encode())
    for path in ([storage.path(checkpoint)] if checkpoint else []) + [storage.path(model_dir)]:
        for f in (f for f in storage.walk_files(path) if f.suffix in WEIGHT_SUFFIXES):
            h.update(f.name.encode())
            size = storage.size(f)
            if f.suffix == ".json" or size < _WHOLE_FILE_LIMIT:
                h.update(storage.read_bytes(f))
            else:  # large weight files: name, size and mtime-free head/tail bytes
                with storage.open_read(f) as fh:
                    h.update(str(size).encode() + fh.read(_HEAD_TAIL))
                    fh.seek(-_HEAD_TAIL, 2)
                    h.update(fh.read())
    return h.hexdigest()[:16]
