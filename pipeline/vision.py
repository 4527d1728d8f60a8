"""The vision front end: CLIP pixel normalisation and the frozen ViT's features before its post layer norm.

Used by `extract` (the feature cache) and by the tiny default's builder (Q-Former image pretraining),
so both see exactly the same features (DESIGN §2: the cache stores the hidden states *before* the
trainable ``post_layernorm`` / ``ln_vision``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

# CLIP normalisation used by InstructBLIP's image processor
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pixel_values(frames):
    """uint8 RGB frames ``[N, H, W, 3]`` (a tensor) -> CLIP-normalised float ``[N, 3, H, W]`` on their device."""
    import torch  # heavy: imported on use (keeps the CLI's start-up fast)
    mean = torch.tensor(CLIP_MEAN, device=frames.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=frames.device).view(1, 3, 1, 1)
    return (frames.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def pre_layernorm_features(vision_model, pixel_values):
    """Hidden states of the last encoder layer, before ``post_layernorm`` (the trainable ln_vision)."""
    emb = vision_model.embeddings(pixel_values)
    enc = vision_model.encoder(inputs_embeds=emb)
    return enc[0] if isinstance(enc, tuple) else enc.last_hidden_state


def model_identity(model, model_dir: str) -> dict:
    """Name, config hash and weights hash of the vision model (stored in every sample's metadata)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    cfg = model.config.to_dict()
    for k in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    return {"name": Path(model_dir).name, "class": type(model).__name__,
            "config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16],
            "weights_sha256": h.hexdigest()[:16]}
