"""Loading and saving MA-LMM weights.

Three sources of weights:

* a Hugging Face InstructBLIP directory (``InstructBlipForConditionalGeneration.save_pretrained``
  plus ``InstructBlipProcessor.save_pretrained``: LLM tokenizer in the root, Q-Former tokenizer in
  ``qformer_tokenizer/``) – the base model: Q-Former, learned queries, projection, vision layer
  norm and the frozen LLM (:func:`load_malmm`), or the frozen ViT (:func:`load_vision_model`);
* our checkpoints: ``trainable.safetensors`` (trainable tensors only) + ``malmm_config.json``
  (:func:`save_checkpoint` / :func:`load_checkpoint`);
* released MA-LMM / LAVIS checkpoints (``.pth`` pickles holding ``{"model": state_dict}`` with
  LAVIS names, and LAVIS' run configuration under ``"config"``), through the documented key mapping
  :func:`lavis_to_hf_keys`. Pickles can run code when loaded, so they are refused unless the caller
  passes ``trust_pickle=True``. Such weights run as LAVIS ran them: ``ln_vision`` with LAVIS'
  epsilon (1e-5), and the memory bank length and frame count the saved configuration records
  (:func:`lavis_recorded_settings`, :func:`malmm_config_from_lavis`).

Tensors are read selectively with ``safetensors.safe_open``: loading MA-LMM from a 7B InstructBLIP
checkpoint reads the Q-Former, the projection and the LLM, never the ViT body.
"""
from __future__ import annotations

import contextlib
import hashlib
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline import storage
from pipeline.model.hashing import base_model_identity  # noqa: F401  (re-exported: its home is hashing)
from pipeline.model.modeling_malmm import LAVIS_LN_VISION_EPS, MALMM, MALMMConfig

CHECKPOINT_WEIGHTS = "trainable.safetensors"
CHECKPOINT_CONFIG = "malmm_config.json"
CHECKPOINT_FORMAT = "malmm-trainable/1"

# Base-model tensors MA-LMM takes from an InstructBLIP checkpoint (HF names -> MALMM names).
_BASE_PREFIXES = {
    "qformer.": "qformer.",
    "query_tokens": "query_tokens",
    "language_projection.": "language_projection.",
    "vision_model.post_layernorm.": "ln_vision.",
}


# ----------------------------------------------------------------------------- helpers

def local_checkpoint(checkpoint: str | Path) -> Path:
    """A local path for a checkpoint given as a local path or an object-store URI. From an object store
    (into the local object cache, `pipeline.storage`): a file as it is; one of our checkpoint folders (or
    its weights file) only its weights and config, not the optimiser state beside them."""
    q = storage.path(checkpoint)
    if not storage.is_uri(q):
        return q
    ours = q if storage.is_dir(q) else q.parent
    if storage.exists(ours / CHECKPOINT_CONFIG):
        local = storage.local_path(ours, only=(CHECKPOINT_WEIGHTS, CHECKPOINT_CONFIG))
        return local if ours == q else local / q.name
    return storage.local_path(q)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load reports and progress bars (unexpected keys are expected here)."""
    from transformers.utils import logging as hf_logging  # heavy: transformers, imported on use

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _model_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not storage.exists(path):
        raise FileNotFoundError(f"{model_dir}: no config.json; expected a directory saved with save_pretrained")
    return storage.read_json(path)


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file holding it (safetensors, sharded or not; else PyTorch .bin shards)."""
    model_dir = Path(model_dir)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = model_dir / index_name
        if storage.exists(index):
            weight_map = storage.read_json(index)["weight_map"]
            return {k: model_dir / v for k, v in weight_map.items()}
        if storage.exists(model_dir / single):
            return {k: model_dir / single for k in _file_keys(model_dir / single)}
    raise FileNotFoundError(f"{model_dir}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")


def _file_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        with safe_open(str(storage.local_path(path)), framework="pt") as f:
            return list(f.keys())
    return list(torch.load(storage.local_path(path), map_location="meta", weights_only=True, mmap=True).keys())


def read_tensors(model_dir: str | Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Read only the tensors whose names start with one of ``prefixes`` (safetensors: lazily, by name)."""
    by_file: dict[Path, list[str]] = {}
    for name, file in _weight_files(Path(model_dir)).items():
        if name.startswith(prefixes):
            by_file.setdefault(file, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        if file.suffix == ".safetensors":
            with safe_open(str(storage.local_path(file)), framework="pt") as f:
                for n in names:
                    out[n] = f.get_tensor(n)
        else:  # PyTorch shard: weights_only unpickling accepts tensors only
            sd = torch.load(storage.local_path(file), map_location="cpu", weights_only=True, mmap=True)
            out.update({n: sd[n] for n in names})
    return out


def _resolve_dtype(dtype, saved: str | None) -> torch.dtype:
    """LLM dtype: explicit, else the checkpoint's half precision on a GPU machine, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype != "auto":
        return getattr(torch, dtype)
    if saved in ("float16", "bfloat16") and torch.cuda.is_available():
        return getattr(torch, saved)
    return torch.float32


# ----------------------------------------------------------------------------- base models

def load_vision_model(model_dir: str | Path, dtype: torch.dtype | None = None):
    """The frozen ViT (``transformers.InstructBlipVisionModel``) of an InstructBLIP or vision-only directory.

    ``InstructBlipVisionModel.from_pretrained(full_instructblip_dir)`` would silently keep random
    weights (the checkpoint's names carry a ``vision_model.`` prefix); here the prefix is mapped
    explicitly and any missing weight is an error.
    """
    from transformers import InstructBlipConfig, InstructBlipVisionModel  # heavy: imported on use

    model_dir = Path(model_dir)
    model_type = _model_config(model_dir).get("model_type")
    kwargs = {"output_loading_info": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    with _quiet_transformers():
        if model_type == "instructblip":
            vision_config = InstructBlipConfig.from_pretrained(model_dir).vision_config
            model, info = InstructBlipVisionModel.from_pretrained(
                model_dir, config=vision_config, key_mapping={r"^vision_model\.": ""}, **kwargs)
        elif model_type == "instructblip_vision_model":
            model, info = InstructBlipVisionModel.from_pretrained(model_dir, **kwargs)
        else:
            raise ValueError(f"{model_dir}: model_type {model_type!r} is neither 'instructblip' nor "
                             f"'instructblip_vision_model'")
    if info["missing_keys"]:
        raise ValueError(f"{model_dir}: vision weights missing from the checkpoint: "
                         f"{sorted(info['missing_keys'])[:8]} ...")
    return model.eval()


def _load_llm(model_dir: Path, text_config, dtype: torch.dtype):
    """The frozen LLM (``AutoModelForCausalLM``) from the checkpoint's ``language_model.*`` tensors."""
    from transformers import AutoModelForCausalLM  # heavy: imported on use

    with _quiet_transformers():
        llm, info = AutoModelForCausalLM.from_pretrained(
            model_dir, config=text_config, key_mapping={r"^language_model\.": ""}, dtype=dtype,
            output_loading_info=True)
    missing = [k for k in info["missing_keys"] if not k.endswith("inv_freq")]
    if missing:
        raise ValueError(f"{model_dir}: LLM weights missing from the checkpoint: {sorted(missing)[:8]} ...")
    return llm.eval()


def load_malmm(model_dir: str | Path, config: MALMMConfig | None = None, checkpoint: str | Path | None = None,
               trust_pickle: bool = False, dtype: torch.dtype | str | None = None) -> MALMM:
    """Build MA-LMM from an HF InstructBLIP directory, optionally applying a checkpoint.

    Args:
        model_dir: ``InstructBlipForConditionalGeneration.save_pretrained`` directory (safetensors,
            possibly sharded), with its tokenizers as ``InstructBlipProcessor.save_pretrained`` saves them.
        config: MA-LMM options (memory policy, L, max_frames, ...); default: the one recorded in
            ``checkpoint`` (ours, or a LAVIS ``.pth``'s saved configuration), else ``MALMMConfig()``.
        checkpoint: our checkpoint directory / ``trainable.safetensors``, or a LAVIS ``.pth``.
        trust_pickle: allow unpickling a ``.pth`` checkpoint (only for files you trust).
        dtype: LLM dtype; default float32, or the checkpoint's half precision when CUDA is available.
            Trainable parts stay float32.

    Returns:
        a :class:`MALMM` in eval mode on the CPU (``.to(device)`` it).
    """
    from transformers import AutoTokenizer, InstructBlipConfig  # heavy: imported on use

    model_dir = Path(model_dir)
    if checkpoint is not None:  # an object-store checkpoint: its local copy
        checkpoint = local_checkpoint(checkpoint)
    if config is None and checkpoint is not None:
        config = read_checkpoint_config(checkpoint)
        if config is None and _is_pickle(Path(checkpoint)):  # a LAVIS release: the settings it records
            config = malmm_config_from_lavis(lavis_recorded_settings(checkpoint, trust_pickle=trust_pickle))
    config = config or MALMMConfig()
    raw = _model_config(model_dir)
    if raw.get("model_type") != "instructblip":
        raise ValueError(f"{model_dir}: model_type is {raw.get('model_type')!r}; load_malmm needs an InstructBLIP "
                         f"directory saved with InstructBlipForConditionalGeneration.save_pretrained")
    base = InstructBlipConfig.from_pretrained(model_dir)
    if not base.use_decoder_only_language_model:
        raise ValueError(f"{model_dir}: MA-LMM needs a decoder-only LLM (e.g. Vicuna), not an encoder-decoder")
    saved_dtype = raw.get("text_config", {}).get("dtype") or raw.get("text_config", {}).get("torch_dtype")
    llm = _load_llm(model_dir, base.text_config, _resolve_dtype(dtype, saved_dtype))
    qformer_dir = model_dir / "qformer_tokenizer"
    if not storage.exists(qformer_dir):
        raise FileNotFoundError(f"{model_dir}: no qformer_tokenizer/ (save the InstructBlipProcessor beside the model)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    qformer_tokenizer = AutoTokenizer.from_pretrained(qformer_dir)

    model = MALMM(config, base, llm, tokenizer, qformer_tokenizer)
    base_tensors = hf_to_malmm_keys(read_tensors(model_dir, tuple(_BASE_PREFIXES)))
    expected = {n for n in model.state_dict() if not n.startswith(("llm.", "frame_position_embedding"))}
    missing = sorted(expected - set(base_tensors))
    if missing:
        raise ValueError(f"{model_dir}: Q-Former / projection tensors missing: {missing[:8]}")
    model.load_state_dict({k: v for k, v in base_tensors.items() if k in expected}, strict=False)
    model.base_model_dir = str(model_dir.resolve())
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, trust_pickle=trust_pickle)
    return model.eval()


# ----------------------------------------------------------------------------- key mappings

def hf_to_malmm_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``InstructBlipForConditionalGeneration`` names -> :class:`MALMM` names.

    ``qformer.*``, ``query_tokens``, ``language_projection.*`` are identical;
    ``vision_model.post_layernorm.*`` -> ``ln_vision.*``; ``language_model.*`` -> ``llm.*``;
    ``frame_position_embedding`` (MA-LMM's, absent from InstructBLIP) is kept. Other vision
    tensors are dropped (the ViT body is not part of MALMM).
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith("vision_model.post_layernorm."):
            out["ln_vision." + key[len("vision_model.post_layernorm."):]] = value
        elif key.startswith("vision_model."):
            continue
        elif key.startswith("language_model."):
            out["llm." + key[len("language_model."):]] = value
        elif key == "qformer.embeddings.position_ids":
            continue  # a buffer, rebuilt at construction
        else:
            out[key] = value
    return out


def lavis_to_hf_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS / MA-LMM names -> HF InstructBLIP names (the rules of transformers' InstructBLIP converter).

    ======================================================  ====================================================
    LAVIS (``blip2_vicuna_instruct_malmm``)                   HF ``InstructBlipForConditionalGeneration``
    ======================================================  ====================================================
    ``Qformer.bert.embeddings.LayerNorm.*``                   ``qformer.embeddings.layernorm.*``
    ``Qformer.bert.<rest>``                                   ``qformer.<rest>``
    ``...attention.self.{query,key,value}``                   ``...attention.attention.{query,key,value}``
    ``...crossattention.self.{query,key,value}``              ``...crossattention.attention.{query,key,value}``
    ``query_tokens``                                          ``query_tokens``
    ``llm_proj.*``                                            ``language_projection.*``
    ``ln_vision.*``                                           ``vision_model.post_layernorm.*``
    ``image_pe.weight`` (``nn.Embedding(120, 1408)``)          ``frame_position_embedding`` (MA-LMM's frame PE)
    ``llm_model.*``                                           ``language_model.*``
    ======================================================  ====================================================

    Dropped: ``Qformer.cls.*`` (LM head unused by InstructBLIP) and the
    ``Qformer.bert.embeddings.position_ids`` buffer. The LAVIS ViT (``visual_encoder.*``) is kept
    under its own name and ignored by MALMM (the feature cache holds its outputs).
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith("Qformer.cls.") or key == "Qformer.bert.embeddings.position_ids":
            continue
        if key.startswith("Qformer.bert.embeddings.LayerNorm."):
            key = "qformer.embeddings.layernorm." + key.rsplit(".", 1)[1]
        elif key.startswith("Qformer.bert."):
            key = "qformer." + key[len("Qformer.bert."):]
            key = key.replace(".attention.self.", ".attention.attention.")
            key = key.replace(".crossattention.self.", ".crossattention.attention.")
        elif key.startswith("llm_proj."):
            key = "language_projection." + key[len("llm_proj."):]
        elif key.startswith("ln_vision."):
            key = "vision_model.post_layernorm." + key[len("ln_vision."):]
        elif key in ("image_pe.weight", "image_pe"):
            key = "frame_position_embedding"
        elif key.startswith("llm_model."):
            key = "language_model." + key[len("llm_model."):]
        out[key] = value
    return out


def _looks_lavis(keys) -> bool:
    """LAVIS names that neither HF nor MALMM use (``ln_vision.*`` is MALMM's name too)."""
    return any(k.startswith(("Qformer.", "llm_proj.", "image_pe")) for k in keys)


# ----------------------------------------------------------------------------- our checkpoints

def save_checkpoint(model: MALMM, out_dir: str | Path, *, num_frames: int | None = None) -> Path:
    """Write ``trainable.safetensors`` (trainable tensors only) and ``malmm_config.json`` into ``out_dir``.

    ``num_frames``: the frames per sample T the weights were trained with, recorded so that a checkpoint
    folder copied on its own still runs with its T in ``infer``."""
    out_dir = storage.makedirs(out_dir)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.trainable_state_dict().items()}
    with storage.atomic_path(out_dir / CHECKPOINT_WEIGHTS, ".safetensors", mode=storage.UMASK) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "malmm_format": CHECKPOINT_FORMAT})
        digest = file_checksum(tmp)
    info = {"format": CHECKPOINT_FORMAT, "malmm": asdict(model.config), "base_model_dir": model.base_model_dir,
            "base_model": base_model_identity(model.base_model_dir), "num_query_tokens": model.num_query_tokens,
            "tensors": len(tensors), "weights_sha256": digest}
    if num_frames is not None:
        info["num_frames"] = int(num_frames)
    storage.write_json(out_dir / CHECKPOINT_CONFIG, info, raw=True, mode=storage.UMASK, indent=1, sort_keys=True)
    return out_dir


class CorruptCheckpointError(ValueError):
    """A checkpoint's weights file whose bytes do not match the checksum its config records."""


def file_checksum(path: str | Path) -> str:
    """SHA-256 of a local file's bytes (``sha256:…``), read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def verify_weights(weights: Path) -> None:
    """Check one of our ``trainable.safetensors`` (a local file) against the checksum its
    ``malmm_config.json`` records (checkpoints written before checksums existed pass unchecked)."""
    info_path = weights.parent / CHECKPOINT_CONFIG
    want = storage.read_json(info_path).get("weights_sha256") if storage.exists(info_path) else None
    if want and file_checksum(weights) != want:
        raise CorruptCheckpointError(f"{weights}: checksum mismatch with {info_path.name} (expected {want}): the "
                                     f"checkpoint is damaged or was partly overwritten; use another checkpoint of "
                                     f"the run (checkpoints/step-*) or train again")


def read_checkpoint_config(checkpoint: str | Path) -> MALMMConfig | None:
    """The :class:`MALMMConfig` recorded in one of our checkpoint directories (None for other formats)."""
    path = storage.path(checkpoint)
    path = path if storage.is_dir(path) else path.parent
    if not storage.exists(path / CHECKPOINT_CONFIG):
        return None
    return MALMMConfig(**storage.read_json(path / CHECKPOINT_CONFIG)["malmm"])


def _is_pickle(path: Path) -> bool:
    return path.is_file() and path.suffix != ".safetensors"


def _load_pickle(path: Path, trust_pickle: bool):
    if not trust_pickle:
        raise PermissionError(
            f"refusing to unpickle {path}: pickle files can execute arbitrary code when loaded. Pass "
            f"trust_pickle=True (CLI: --trust-pickle) only for a file from a source you trust, or convert it to "
            f"safetensors first")
    try:
        obj = torch.load(storage.local_path(path), map_location="cpu", weights_only=True)
    except Exception as e:  # e.g. LAVIS stores an OmegaConf config beside the weights
        warnings.warn(f"{path}: weights-only unpickling failed ({type(e).__name__}); unpickling fully because "
                      f"trust_pickle=True")
        obj = torch.load(storage.local_path(path), map_location="cpu", weights_only=False)
    return obj


def _read_pickle(path: Path, trust_pickle: bool) -> dict:
    obj = _load_pickle(path, trust_pickle)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (or {{'model': state_dict}}), got {type(obj).__name__}")
    return obj


def lavis_recorded_settings(checkpoint: str | Path, trust_pickle: bool = False) -> dict:
    """What a LAVIS / MA-LMM ``.pth`` records about how it ran: ``memory_bank_length`` and ``num_frames``.

    LAVIS' runner saves its whole run configuration beside the weights (``{"model": ..., "config":
    {"model": {...}, "datasets": {name: {...}}, "run": {...}}}``). ``memory_bank_length`` is read
    from ``config.model``; ``num_frames`` from ``config.model``, else from the datasets (when they
    agree). Each is None when the file does not record it (e.g. a bare state dict).
    """
    return _recorded_settings(_load_pickle(local_checkpoint(checkpoint), trust_pickle))


def release_info(checkpoint: str | Path, trust_pickle: bool = False) -> dict:
    """:func:`lavis_recorded_settings` of a release file (none for safetensors) and ``lavis_names``:
    whether its tensors carry LAVIS names (then it runs with LAVIS' ``ln_vision`` epsilon)."""
    path = local_checkpoint(checkpoint)
    if path.suffix == ".safetensors":
        return {"memory_bank_length": None, "num_frames": None, "lavis_names": _looks_lavis(_file_keys(path))}
    obj = _load_pickle(path, trust_pickle)
    state = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else {}
    return {**_recorded_settings(obj), "lavis_names": isinstance(state, dict) and _looks_lavis(state)}


def _recorded_settings(obj) -> dict:
    cfg = obj.get("config") if isinstance(obj, dict) else None
    cfg = cfg if isinstance(cfg, dict) else {}
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}

    def as_int(v):
        try:
            return None if v is None or isinstance(v, bool) else int(v)
        except (TypeError, ValueError):
            return None

    length = as_int(model.get("memory_bank_length"))
    frames = as_int(model.get("num_frames")) or None  # LAVIS' default 0 means "not set"
    if frames is None and isinstance(cfg.get("datasets"), dict):
        found = {as_int(d.get("num_frames")) for d in cfg["datasets"].values() if isinstance(d, dict)} - {None, 0}
        frames = found.pop() if len(found) == 1 else None
    return {"memory_bank_length": length, "num_frames": frames}


def malmm_config_from_lavis(recorded: dict, base: MALMMConfig | None = None) -> MALMMConfig:
    """The memory settings a LAVIS checkpoint ran with: ``memory_bank_length`` L > 0 is MA-LMM's MBC
    with both banks at L; 0 is the reference's no-memory path, ``memory="per_frame"``. Settings it
    does not record come from ``base``. (LAVIS' ``ln_vision`` epsilon is set by :func:`load_checkpoint`
    when it finds LAVIS names.)"""
    cfg = base or MALMMConfig()
    length = recorded.get("memory_bank_length")
    if length is None:
        return cfg
    if length == 0:
        return replace(cfg, memory="per_frame")
    return replace(cfg, memory="mbc", visual_memory=True, query_memory=True, aggregation="memory",
                   memory_length=int(length))


def _fit_frame_table(table: torch.Tensor, rows: int, source: str) -> torch.Tensor:
    """Adapt a frame position embedding table to ``max_frames`` rows (truncate, or pad with zeros)."""
    if table.shape[0] == rows:
        return table
    if table.shape[0] > rows:
        return table[:rows]
    warnings.warn(f"{source}: frame position embedding has {table.shape[0]} rows but max_frames={rows}; "
                  f"rows {table.shape[0]}.. start at zero")
    return torch.cat([table, table.new_zeros(rows - table.shape[0], table.shape[1])])


def _use_lavis_ln_vision_eps(model: MALMM, source: str) -> None:
    """LAVIS weights: ``ln_vision`` with LAVIS' epsilon, recorded in ``model.config`` (and so in a
    checkpoint saved from the model); an explicit other ``ln_vision_eps`` is kept, with a warning."""
    eps = model.config.ln_vision_eps
    if eps is None:
        model.config = replace(model.config, ln_vision_eps=LAVIS_LN_VISION_EPS)
        model.ln_vision.eps = LAVIS_LN_VISION_EPS
    elif float(eps) != LAVIS_LN_VISION_EPS:
        warnings.warn(f"{source}: LAVIS weights were trained with ln_vision eps {LAVIS_LN_VISION_EPS}; keeping the "
                      f"configured ln_vision_eps={eps}")


def load_checkpoint(model: MALMM, checkpoint: str | Path, trust_pickle: bool = False) -> dict[str, list[str]]:
    """Apply a checkpoint to ``model`` in place; returns ``{"loaded": [...], "ignored": [...]}``.

    Accepts our checkpoint directory (or its ``trainable.safetensors``), any safetensors file with
    MALMM / HF / LAVIS names, and LAVIS ``.pth`` pickles (only with ``trust_pickle=True``; tried
    with ``torch.load(weights_only=True)`` first). LLM tensors are never taken from a checkpoint.
    Weights with LAVIS names switch ``ln_vision`` to LAVIS' epsilon (1e-5) unless
    ``model.config.ln_vision_eps`` is set; the memory settings a ``.pth`` records are applied by
    :func:`load_malmm` (or :func:`malmm_config_from_lavis`), not here.
    """
    path = local_checkpoint(checkpoint)
    if path.is_dir():
        if not storage.exists(path / CHECKPOINT_WEIGHTS):
            raise FileNotFoundError(f"{path}: no {CHECKPOINT_WEIGHTS}")
        path = path / CHECKPOINT_WEIGHTS
    if not storage.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    info_path = path.parent / CHECKPOINT_CONFIG
    if path.name == CHECKPOINT_WEIGHTS and storage.exists(info_path) and model.base_model_dir:
        recorded = storage.read_json(info_path).get("base_model") or {}
        current = base_model_identity(model.base_model_dir)
        if recorded.get("sha256") and recorded.get("sha256") != current.get("sha256"):
            warnings.warn(f"{path} was trained on base model {recorded.get('name')!r} ({recorded['sha256']}), "
                          f"applying it to {current.get('name')!r} ({current.get('sha256')})")
    if path.suffix == ".safetensors":
        if path.name == CHECKPOINT_WEIGHTS:
            verify_weights(path)
        state = load_file(str(storage.local_path(path)))
    else:  # .pth / .pt / .bin ...: a pickle
        state = _read_pickle(path, trust_pickle)
    lavis = _looks_lavis(state)
    if lavis:
        state = lavis_to_hf_keys(state)
    state = hf_to_malmm_keys(state)

    own = model.state_dict()
    loadable, ignored = {}, []
    for key, value in state.items():
        if key.startswith("llm.") or key not in own:
            ignored.append(key)
            continue
        if key == "frame_position_embedding":
            value = _fit_frame_table(value, own[key].shape[0], str(path))
        if value.shape != own[key].shape:
            raise ValueError(f"{path}: tensor {key} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(own[key].shape)} (a different base model or MALMMConfig?)")
        loadable[key] = value
    if not loadable:
        raise ValueError(f"{path}: no tensor of the checkpoint matches MA-LMM ({len(state)} tensors, e.g. "
                         f"{sorted(state)[:4]})")
    trainable = {n for n, _ in model.named_trainable_parameters()}
    missing = sorted(trainable - set(loadable))
    if missing and path.name == CHECKPOINT_WEIGHTS:
        raise ValueError(f"{path}: trainable tensors missing from the checkpoint: {missing[:8]}")
    if missing:
        warnings.warn(f"{path}: {len(missing)} trainable tensors not in the checkpoint keep the base model's values "
                      f"(e.g. {missing[:4]})")
    if ignored:
        warnings.warn(f"{path}: ignored {len(ignored)} tensors that are not MA-LMM's trainable part "
                      f"(e.g. {ignored[:4]})")
    model.load_state_dict(loadable, strict=False)
    if lavis:
        _use_lavis_ln_vision_eps(model, str(path))
    return {"loaded": sorted(loadable), "ignored": sorted(ignored)}
