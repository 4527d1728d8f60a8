"""`infer`: batched beam search over cached features on a Ray Data actor pool.

The flow, top to bottom:

1. **join** (driver) – manifest samples of the split are joined to the feature shards;
   each (benchmark, task) gets its frames T and memory length L (:func:`protocol_settings`:
   ``--num-frames`` / ``--memory-length``, else what the checkpoint records, else the
   benchmark's protocol) and each sample a fingerprint of (features – the checksum of its
   cached arrays included –, checkpoint, prompt, generation settings, T, memory settings).
   Samples already in the run's predictions under the same fingerprint are skipped. The
   run folder is locked while infer writes it (`pipeline.lock`).
2. **generate** (Ray Data actor pool, GPU when there is one) – each actor loads the
   model once; a batch is grouped by (benchmark, task) and decoded with that
   protocol's T, L and beam search. An error is recorded on its sample's row – a
   cached sample that fails verification too (`CorruptSampleError`, naming its shard
   and key), so a re-extract then re-predicts just that sample.
3. **write** (driver) – rows are merged into ``predictions/{benchmark}.parquet``
   atomically every few seconds and at the end, so an interrupted run keeps its work.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from pipeline.benchmarks import protocol
from pipeline.config import InferConfig
from pipeline.data import FeatureStore, Sample, SampleDataset, collate, join_samples
from pipeline import layout, storage
from pipeline import precision as precision_mod  # `precision` names the option here
from pipeline.defaults import resolve_model_dir
from pipeline.lock import OutputLock
from pipeline.manifest import read_manifest
from pipeline.metrics import SUBSET_COLUMNS, membership, scored_prediction
from pipeline.model.hashing import checkpoint_identity  # noqa: F401  (its home is pipeline.model.hashing)
from pipeline.runtime import cluster_has_gpus, init_ray

PRED_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("benchmark", pa.string()), ("task", pa.string()), ("split", pa.string()),
    ("video", pa.string()), ("key", pa.string()), ("prompt", pa.string()), ("beams", pa.list_(pa.string())),
    ("prediction", pa.string()), ("answer", pa.string()), ("references", pa.list_(pa.string())),
    ("generation", pa.string()), ("num_frames", pa.int64()), ("memory", pa.string()), ("tokens", pa.int64()),
    ("latency_s", pa.float64()),
    ("checkpoint", pa.string()), ("fingerprint", pa.string()), ("error", pa.string()),
    # EPIC-Kitchens-100 evaluation subsets, from the manifest's columns of the same names (null: not known)
    ("unseen_participant", pa.bool_()), ("tail_class", pa.bool_()),
])


# ----------------------------------------------------------------------------- model side

def generate_batch(model, features, prompts: list[str], proto, device) -> tuple[list[list[str]], list[int]]:
    """Beam search for one batch of one protocol; returns (beams per sample, generated tokens of beam 0)."""
    import torch  # heavy: imported on use (keeps the CLI's start-up fast)

    g = proto.generation
    with torch.inference_mode():
        out = model.generate(features.to(device), prompts, num_beams=g.num_beams,
                             num_return_sequences=g.num_return_sequences, max_new_tokens=g.max_new_tokens,
                             min_new_tokens=g.min_new_tokens, repetition_penalty=g.repetition_penalty,
                             length_penalty=g.length_penalty)
    beams = [list(b) for b in out]
    tokens = [len(model.tokenizer(b[0], add_special_tokens=False)["input_ids"]) if b else 0 for b in beams]
    return beams, tokens


def memory_settings(config) -> dict:
    """The memory settings a prediction was made with (recorded in its row's ``memory`` column)."""
    return {"memory": config.memory, "memory_length": int(config.memory_length), "visual_memory": config.visual_memory,
            "query_memory": config.query_memory, "aggregation": config.aggregation}


@contextlib.contextmanager
def memory_length(model, length: int | None):
    """Run ``model`` with memory length L = ``length`` (None: its own) for the duration of the block."""
    if length is None or int(length) == model.config.memory_length:
        yield model
        return
    saved = model.config
    model.config = replace(saved, memory_length=int(length))
    try:
        yield model
    finally:
        model.config = saved


def predict_samples(model, samples: list[Sample], features_dir: str, num_frames: int | None, *, batch_size: int,
                    device, ckpt_id: str = "", fingerprints: list[str] | None = None,
                    settings: dict | None = None) -> list[dict]:
    """Predict every sample (grouped by protocol, in batches); errors are recorded per row.

    ``settings``: per (benchmark, task), ``{"num_frames": T, "memory_length": L}`` (see
    :func:`protocol_settings`); a protocol missing from it runs with ``num_frames`` frames and the
    model's own L.
    """
    model.eval()
    settings = settings or {}
    rows: list[dict] = []
    groups: dict[tuple[str, str], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((s.benchmark, s.task), []).append(i)
    for (b, t), idx in groups.items():
        proto = protocol(b, t)
        own = settings.get((b, t), {})
        nf = own.get("num_frames") or num_frames
        if not nf:
            raise ValueError(f"no frame count for {b}/{t}: pass num_frames or settings")
        ds = SampleDataset(samples, features_dir, nf, train=False)
        with memory_length(model, own.get("memory_length")):
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                rows += _predict_chunk(model, ds, [samples[i] for i in chunk], chunk, proto, nf, device, ckpt_id,
                                       [fingerprints[i] for i in chunk] if fingerprints else [""] * len(chunk))
    return rows


def _predict_chunk(model, ds, samples, chunk, proto, num_frames, device, ckpt_id, fps) -> list[dict]:
    t0 = time.perf_counter()
    try:
        batch = collate([ds[i] for i in chunk])
        beams, tokens = generate_batch(model, batch["features"], batch["prompts"], proto, device)
        errors = [""] * len(samples)
    except Exception as e:  # isolate the failing sample(s): retry one at a time
        if len(chunk) > 1:
            out = []
            for s, i, fp in zip(samples, chunk, fps):
                out += _predict_chunk(model, ds, [s], [i], proto, num_frames, device, ckpt_id, [fp])
            return out
        beams, tokens, errors = [[]], [0], [f"{type(e).__name__}: {e}"[:1000]]
    latency = (time.perf_counter() - t0) / len(samples)
    gen = json.dumps(asdict(proto.generation), sort_keys=True)
    mem = json.dumps(memory_settings(model.config), sort_keys=True)
    return [{"sample_id": s.sample_id, "benchmark": s.benchmark, "task": s.task, "split": s.split, "video": s.video,
             "key": s.key, "prompt": s.prompt, "beams": bm, "prediction": scored_prediction(proto, bm),
             "answer": s.answer, "references": list(s.references), "generation": gen, "num_frames": num_frames,
             "memory": mem, "tokens": int(tk), "latency_s": latency, "checkpoint": ckpt_id, "fingerprint": fp,
             "error": err, **{c: membership(s.extra.get(c), strict=False) for c in SUBSET_COLUMNS.values()}}
            for s, bm, tk, err, fp in zip(samples, beams, tokens, errors, fps)]


class Generator:
    """Ray Data actor: the model, loaded once per actor; a batch of sample rows in, prediction rows out."""

    def __init__(self, model_dir: str, checkpoint: str | None, malmm: dict, features_dir: str,
                 num_frames: int | None, ckpt_id: str, trust_pickle: bool = False, settings: dict | None = None,
                 precision: str = "auto"):
        import torch  # heavy (the model package too: torch, transformers): imported where the actor starts

        from pipeline.model.checkpoint import load_malmm
        from pipeline.model.modeling_malmm import MALMMConfig

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = precision_mod.resolve(precision, self.device)
        self.model = load_malmm(model_dir, MALMMConfig(**malmm), checkpoint=checkpoint, trust_pickle=trust_pickle)
        self.model.to(self.device).eval()
        self.features_dir, self.num_frames, self.ckpt_id = features_dir, num_frames, ckpt_id
        self.settings = settings or {}  # per (benchmark, task): T and L

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        samples = [Sample(**json.loads(s)) for s in batch["sample"]]
        with precision_mod.autocast(self.precision, self.device):
            rows = predict_samples(self.model, samples, self.features_dir, self.num_frames, batch_size=len(samples),
                                   device=self.device, ckpt_id=self.ckpt_id, fingerprints=list(batch["fingerprint"]),
                                   settings=self.settings)
        return pd.DataFrame({"row": [json.dumps(r) for r in rows]})


# ----------------------------------------------------------------------------- driver



def fingerprint(s: Sample, features_id: str, ckpt_id: str, proto, num_frames: int, memory: dict | None = None,
                sample_checksum: str = "") -> str:
    """What a prediction was made from: the sample's features (its key, the extraction plan and the checksum of
    its cached arrays, so a re-extract that changes them re-predicts it), the checkpoint, prompt, generation,
    T and the memory settings."""
    ident = [s.key, features_id, ckpt_id, s.prompt, asdict(proto.generation), num_frames, s.start_sec, s.end_sec]
    if memory is not None:  # the memory settings the sample runs with (L differs between protocols)
        ident.append(memory)
    if sample_checksum:  # shards written before checksums existed have none: their fingerprints stay as they were
        ident.append(sample_checksum)
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class ModelSpec:
    """What `infer` loads, and what the weights record about how they were trained.

    ``kind``: ``checkpoint`` (ours: a run folder or checkpoint folder), ``instructblip`` (an HF
    InstructBLIP directory, zero-shot), ``release`` (a LAVIS / MA-LMM release file) or ``base``
    (no ``--checkpoint``: the ``--model`` base model, zero-shot). ``num_frames``, ``memory_length``
    and ``memory``: the T, L and memory mode the weights were trained with, None where nothing
    records them (each protocol's then apply).
    """

    model_dir: str
    checkpoint: str | None
    malmm: dict
    kind: str
    num_frames: int | None = None
    memory_length: int | None = None
    memory: str | None = None


def _resolve_model(cfg: InferConfig, trust_pickle: bool = False) -> ModelSpec:
    """The base model, checkpoint and MALMMConfig (as a dict) that ``--checkpoint`` names, with its recorded T and L."""
    from pipeline.model.checkpoint import (CHECKPOINT_CONFIG, malmm_config_from_lavis,  # heavy (torch): on use
                                           release_info)
    from pipeline.model.modeling_malmm import LAVIS_LN_VISION_EPS, MALMMConfig

    # absolute: the Ray actors that load them do not run in the driver's folder (a URI stays as it is)
    ckpt = storage.resolved(cfg.checkpoint) if cfg.checkpoint else None
    if ckpt and storage.is_dir(ckpt) and storage.exists(layout.latest_path(ckpt)):  # a training run: its latest
        ckpt = layout.checkpoint_dir(ckpt, storage.read_json(layout.latest_path(ckpt))["checkpoint"])
    if ckpt and storage.is_file(ckpt) and storage.exists(ckpt.parent / CHECKPOINT_CONFIG):  # our trainable.safetensors
        ckpt = ckpt.parent
    if ckpt and storage.is_dir(ckpt) and storage.exists(ckpt / CHECKPOINT_CONFIG):  # our checkpoint
        info = storage.read_json(ckpt / CHECKPOINT_CONFIG)
        model_dir = info.get("base_model_dir") or str(resolve_model_dir(cfg.model))
        if not storage.exists(model_dir):
            model_dir = str(resolve_model_dir(cfg.model))
        malmm = asdict(MALMMConfig(**info["malmm"]))
        frames = info.get("num_frames")
        run_json = layout.run_info_path(ckpt.parents[1]) if len(ckpt.parents) > 1 else None
        if frames is None and run_json is not None and storage.exists(run_json):
            frames = storage.read_json(run_json).get("hp", {}).get("num_frames")
        return ModelSpec(model_dir, str(ckpt), malmm, "checkpoint", frames, malmm["memory_length"], malmm["memory"])
    if ckpt and storage.is_dir(ckpt) and storage.exists(ckpt / "config.json"):  # an HF InstructBLIP directory: zero-shot
        return ModelSpec(str(storage.local_path(ckpt)), None, asdict(MALMMConfig()), "instructblip")
    if ckpt and storage.is_file(ckpt):  # a released MA-LMM / LAVIS checkpoint
        recorded = release_info(ckpt, trust_pickle=trust_pickle)  # a .pth: its saved LAVIS run configuration
        malmm = asdict(replace(malmm_config_from_lavis(recorded),  # LAVIS weights: LAVIS' ln_vision epsilon
                               ln_vision_eps=LAVIS_LN_VISION_EPS if recorded["lavis_names"] else None))
        length = recorded.get("memory_bank_length")
        return ModelSpec(str(resolve_model_dir(cfg.model)), str(ckpt), malmm, "release", recorded.get("num_frames"),
                         length or None, None if length is None else malmm["memory"])
    if ckpt:
        raise FileNotFoundError(f"--checkpoint {ckpt}: not a run folder, checkpoint folder, InstructBLIP "
                                f"directory or checkpoint file")
    return ModelSpec(str(resolve_model_dir(cfg.model)), None, asdict(MALMMConfig()), "base")


def protocol_settings(spec: ModelSpec, cfg: InferConfig, keys) -> tuple[dict, dict, list[str]]:
    """Frames T and memory length L per (benchmark, task), the MALMMConfig to load, and warnings.

    Precedence, for T and for L alike: ``--num-frames`` / ``--memory-length`` (``cfg``), else what
    the weights record (our checkpoints: what they were trained with; a LAVIS ``.pth``: its saved
    ``num_frames`` / ``memory_bank_length``), else the protocol's (each benchmark its own). An
    override that contradicts a recorded value is used, with a warning; so is ``--memory``.
    Returns ``(settings, malmm, warnings)``; ``settings[(benchmark, task)]`` holds ``num_frames``,
    ``memory_length``, ``memory`` and where each came from.
    """
    from pipeline.model.modeling_malmm import MALMMConfig  # heavy (torch): imported on use

    source = "the checkpoint" if spec.kind == "checkpoint" else f"{Path(spec.checkpoint or '').name}'s saved config"
    notes = []
    for flag, given, recorded, what in (("--num-frames", cfg.num_frames, spec.num_frames, "num_frames (T)"),
                                        ("--memory-length", cfg.memory_length, spec.memory_length,
                                         "memory_length (L)"),
                                        ("--memory", cfg.memory, spec.memory, "memory")):
        if given is not None and recorded is not None and given != recorded:
            notes.append(f"{flag} {given} overrides {what} = {recorded} recorded by {source} ({spec.checkpoint}); "
                         f"the predictions record {given}")
    malmm = dict(spec.malmm)
    if cfg.memory is not None:
        malmm["memory"] = cfg.memory
    settings = {}
    for b, t in sorted(set(keys)):
        proto = protocol(b, t)
        nf, nf_from = ((cfg.num_frames, "--num-frames") if cfg.num_frames is not None else
                       (spec.num_frames, "checkpoint") if spec.num_frames is not None else
                       (proto.num_frames, "protocol"))
        L, L_from = ((cfg.memory_length, "--memory-length") if cfg.memory_length is not None else
                     (spec.memory_length, "checkpoint") if spec.memory_length is not None else
                     (proto.memory_length, "protocol"))
        settings[b, t] = {"num_frames": int(nf), "memory_length": int(L), "memory": malmm["memory"],
                          "source": {"num_frames": nf_from, "memory_length": L_from}}
    most = max((s["num_frames"] for s in settings.values()), default=1)
    if spec.kind == "checkpoint":
        if most > malmm["max_frames"] and malmm["memory"] != "per_frame":
            raise ValueError(f"{most} frames per sample (--num-frames or the protocol) but the checkpoint "
                             f"{spec.checkpoint} has a frame position table of max_frames={malmm['max_frames']} "
                             f"rows (trained with T={spec.num_frames}); pass --num-frames {malmm['max_frames']} "
                             f"or fewer")
    else:  # untrained frame positions start at zero: size the table for the longest protocol
        malmm["max_frames"] = max(int(malmm["max_frames"]), most)
    if cfg.memory_length is not None:
        malmm["memory_length"] = int(cfg.memory_length)
    if cfg.num_frames is not None and cfg.num_frames < 1:
        raise ValueError(f"--num-frames must be >= 1, got {cfg.num_frames}")
    try:  # a clear error for an invalid --memory / --memory-length, before Ray starts
        MALMMConfig(**malmm)
    except ValueError as e:
        raise ValueError(f"--memory {malmm['memory']} / --memory-length {malmm['memory_length']}: {e}") from None
    return settings, malmm, notes


def load_predictions(run_dir: Path) -> pd.DataFrame:
    files = storage.listdir(layout.predictions_dir(run_dir), "*.parquet")
    if not files:
        return pd.DataFrame(columns=PRED_SCHEMA.names)
    return pd.concat([storage.read_parquet(f) for f in files], ignore_index=True)


def _write_predictions(run_dir: Path, rows: list[dict]) -> None:
    if not rows:
        return
    new = pd.DataFrame(rows)
    for b, df in new.groupby("benchmark"):
        path = layout.predictions_path(run_dir, b)
        if storage.exists(path):
            old = storage.read_parquet(path)
            df = pd.concat([old[~old.sample_id.isin(df.sample_id)], df], ignore_index=True)
        df = df.sort_values("sample_id").reset_index(drop=True)
        storage.write_parquet(path, pa.Table.from_pandas(df[PRED_SCHEMA.names], schema=PRED_SCHEMA, preserve_index=False))


def _warn_loudly(message: str) -> None:
    """A warning both on stderr (visible in the CLI and in Ray logs) and as a Python ``UserWarning``."""
    print(f"infer: WARNING: {message}", file=sys.stderr, flush=True)
    warnings.warn(message, UserWarning, stacklevel=3)


def run(cfg: InferConfig, *, progress: bool = True, trust_pickle: bool = False) -> dict:
    precision_mod.check(cfg.precision, gpu=cfg.num_gpus != 0)
    manifest = read_manifest(cfg.manifest)
    store = FeatureStore(cfg.features)
    rep = join_samples(manifest, store, split=cfg.split, benchmark=cfg.benchmark, task=cfg.task)
    if not rep.samples:
        raise ValueError(f"no {cfg.split} samples with features to predict ({rep.summary()})")
    spec = _resolve_model(cfg, trust_pickle=trust_pickle)
    model_dir, ckpt = spec.model_dir, spec.checkpoint
    settings, malmm, notes = protocol_settings(spec, cfg, [(s.benchmark, s.task) for s in rep.samples])
    for note in notes:  # loud: results made with settings other than the checkpoint's own
        _warn_loudly(note)
    ckpt_id = checkpoint_identity(ckpt, model_dir, spec.malmm)
    features_id = hashlib.sha1(json.dumps(store.plan, sort_keys=True).encode()).hexdigest()[:12]
    run_dir = storage.resolved(cfg.out)
    with ExitStack() as held:
        if not cfg.dry_run:  # one writer per run folder: a second infer into it is refused at once
            held.enter_context(OutputLock(run_dir, "infer"))
        return _predict(cfg, rep, store, run_dir, spec, settings, malmm, notes, ckpt_id, features_id, progress,
                        trust_pickle)


def _predict(cfg: InferConfig, rep, store: FeatureStore, run_dir: Path, spec, settings: dict, malmm: dict,
             notes: list[str], ckpt_id: str, features_id: str, progress: bool, trust_pickle: bool) -> dict:
    model_dir, ckpt = spec.model_dir, spec.checkpoint
    import ray  # heavy: imported on use (keeps the CLI's start-up fast)

    done = load_predictions(run_dir)
    done_fp = set(done.loc[done.error.fillna("") == "", "fingerprint"]) if len(done) else set()
    todo, fps = [], []
    for s in rep.samples:
        proto = protocol(s.benchmark, s.task)
        own = settings[s.benchmark, s.task]
        memory = {"memory": own["memory"], "memory_length": own["memory_length"]}
        fp = fingerprint(s, features_id, ckpt_id, proto, own["num_frames"], memory, store.checksum(s.key))
        if fp not in done_fp:
            todo.append(s)
            fps.append(fp)
    print(f"infer: {rep.summary()}; {len(rep.samples) - len(todo)} already predicted, {len(todo)} to predict "
          f"(checkpoint {ckpt or model_dir}, id {ckpt_id}; memory {malmm['memory']}; "
          + ", ".join(f"{b}{'/' + t if t else ''}: T={v['num_frames']} L={v['memory_length']}"
                      for (b, t), v in settings.items()) + ")", file=sys.stderr, flush=True)
    protocols = {f"{b}/{t}" if t else b: v for (b, t), v in settings.items()}
    if cfg.dry_run or not todo:
        return {"run_dir": str(run_dir), "predicted": 0, "skipped": len(rep.samples) - len(todo),
                "protocols": protocols, "warnings": notes}
    storage.makedirs(run_dir)
    init_ray(cfg.address)
    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else (1 if cluster_has_gpus() else 0)
    # samples sorted so batches share a protocol (its T and L)
    order = sorted(range(len(todo)), key=lambda i: (todo[i].benchmark, todo[i].task, todo[i].sample_id))
    items = [{"sample": json.dumps(asdict(todo[i])), "fingerprint": fps[i]} for i in order]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // cfg.batch_size, 200)))
    ds = ds.map_batches(Generator, fn_constructor_kwargs={"model_dir": model_dir, "checkpoint": ckpt, "malmm": malmm,
                                                          "features_dir": str(storage.resolved(cfg.features)),
                                                          "num_frames": None, "ckpt_id": ckpt_id,
                                                          "trust_pickle": trust_pickle,
                                                          "precision": cfg.precision,
                                                          "settings": {k: {"num_frames": v["num_frames"],
                                                                           "memory_length": v["memory_length"]}
                                                                       for k, v in settings.items()}},
                        batch_size=cfg.batch_size, concurrency=cfg.workers, num_gpus=num_gpus, batch_format="pandas")
    bar = tqdm(total=len(items), unit="sample", desc="infer", disable=not progress, file=sys.stderr)
    pending, n_err, last_flush = [], 0, time.time()
    for r in ds.iter_rows():
        row = json.loads(r["row"])
        pending.append(row)
        n_err += bool(row["error"])
        bar.update(1)
        bar.set_postfix(errors=n_err)
        if time.time() - last_flush > 10:
            _write_predictions(run_dir, pending)
            pending, last_flush = [], time.time()
    _write_predictions(run_dir, pending)
    bar.close()
    # how the predictions were produced: per protocol T, L and where each came from; what the weights record
    recorded = {"kind": spec.kind, "num_frames": spec.num_frames, "memory_length": spec.memory_length,
                "memory": spec.memory}
    storage.write_json(layout.infer_info_path(run_dir),
                       {"config": asdict(cfg), "model_dir": model_dir, "checkpoint": ckpt, "checkpoint_id": ckpt_id,
                        "malmm": malmm, "recorded": recorded, "protocols": protocols, "warnings": notes},
                       raw=True, mode=storage.UMASK, indent=1, default=str)
    return {"run_dir": str(run_dir), "predicted": len(items), "errors": n_err,
            "skipped": len(rep.samples) - len(todo), "protocols": protocols, "warnings": notes}
