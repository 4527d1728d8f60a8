"""The vision front end: CLIP pixel normalisation and the frozen ViT's features before its post layer norm.

Used by `extract` (the feature cache) and by the tiny default's builder (Q-Former image pretraining),
so both see exactly the same features (the cache stores the hidden states *before* the
trainable ``post_layernorm`` / ``ln_vision``).
"""
from __future__ import annotations

from pipeline.model.hashing import vision_model_identity

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
    """Name, config hash and weights hash of the vision model, stored in every sample's metadata
    (computed by `pipeline.model.hashing`, where every weight hash of the project lives)."""
    return vision_model_identity(model, model_dir)
