"""`infer`: batched beam search over cached features on a Ray Data actor pool.

The flow, top to bottom:

1. **join** (driver) – manifest samples of the split are joined to the feature shards;
   each gets a fingerprint of (features – the checksum of its cached arrays included –,
   checkpoint, prompt, generation settings). Samples already in the run's predictions
   under the same fingerprint are skipped. The run folder is locked while infer writes
   it (`pipeline.lock`).
2. **generate** (Ray Data actor pool, GPU when there is one) – each actor loads the
   model once; a batch is grouped by (benchmark, task) and decoded with that
   protocol's beam search (DESIGN §5). An error is recorded on its sample's row – a
   cached sample that fails verification too (`CorruptSampleError`, naming its shard
   and key), so a re-extract then re-predicts just that sample.
3. **write** (driver) – rows are merged into ``predictions/{benchmark}.parquet``
   atomically every few seconds and at the end, so an interrupted run keeps its work.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.benchmarks import protocol
from pipeline.config import InferConfig
from pipeline.data import FeatureStore, Sample, SampleDataset, collate, join_samples
from pipeline.lock import OutputLock
from pipeline.manifest import read_manifest
from pipeline.metrics import scored_prediction
from pipeline.shards import write_parquet

PRED_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("benchmark", pa.string()), ("task", pa.string()), ("split", pa.string()),
    ("video", pa.string()), ("key", pa.string()), ("prompt", pa.string()), ("beams", pa.list_(pa.string())),
    ("prediction", pa.string()), ("answer", pa.string()), ("references", pa.list_(pa.string())),
    ("generation", pa.string()), ("num_frames", pa.int64()), ("tokens", pa.int64()), ("latency_s", pa.float64()),
    ("checkpoint", pa.string()), ("fingerprint", pa.string()), ("error", pa.string()),
])


# ----------------------------------------------------------------------------- model side

def generate_batch(model, features, prompts: list[str], proto, device) -> tuple[list[list[str]], list[int]]:
    """Beam search for one batch of one protocol; returns (beams per sample, generated tokens of beam 0)."""
    import torch

    g = proto.generation
    with torch.inference_mode():
        out = model.generate(features.to(device), prompts, num_beams=g.num_beams,
                             num_return_sequences=g.num_return_sequences, max_new_tokens=g.max_new_tokens,
                             min_new_tokens=g.min_new_tokens, repetition_penalty=g.repetition_penalty,
                             length_penalty=g.length_penalty)
    beams = [list(b) for b in out]
    tokens = [len(model.tokenizer(b[0], add_special_tokens=False)["input_ids"]) if b else 0 for b in beams]
    return beams, tokens


def predict_samples(model, samples: list[Sample], features_dir: str, num_frames: int, *, batch_size: int,
                    device, ckpt_id: str = "", fingerprints: list[str] | None = None) -> list[dict]:
    """Predict every sample (grouped by protocol, in batches); errors are recorded per row."""
    model.eval()
    ds = SampleDataset(samples, features_dir, num_frames, train=False)
    rows: list[dict] = []
    groups: dict[tuple[str, str], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((s.benchmark, s.task), []).append(i)
    for (b, t), idx in groups.items():
        proto = protocol(b, t)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            rows += _predict_chunk(model, ds, [samples[i] for i in chunk], chunk, proto, num_frames, device, ckpt_id,
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
    return [{"sample_id": s.sample_id, "benchmark": s.benchmark, "task": s.task, "split": s.split, "video": s.video,
             "key": s.key, "prompt": s.prompt, "beams": bm, "prediction": scored_prediction(proto, bm),
             "answer": s.answer, "references": list(s.references), "generation": gen, "num_frames": num_frames,
             "tokens": int(tk), "latency_s": latency, "checkpoint": ckpt_id, "fingerprint": fp, "error": err}
            for s, bm, tk, err, fp in zip(samples, beams, tokens, errors, fps)]


class Generator:
    """Ray Data actor: the model, loaded once per actor; a batch of sample rows in, prediction rows out."""

    def __init__(self, model_dir: str, checkpoint: str | None, malmm: dict, features_dir: str, num_frames: int,
                 ckpt_id: str, trust_pickle: bool = False):
        import torch

        from pipeline.model.checkpoint import load_malmm
        from pipeline.model.modeling_malmm import MALMMConfig

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_malmm(model_dir, MALMMConfig(**malmm), checkpoint=checkpoint, trust_pickle=trust_pickle)
        self.model.to(self.device).eval()
        self.features_dir, self.num_frames, self.ckpt_id = features_dir, num_frames, ckpt_id

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        samples = [Sample(**json.loads(s)) for s in batch["sample"]]
        rows = predict_samples(self.model, samples, self.features_dir, self.num_frames, batch_size=len(samples),
                               device=self.device, ckpt_id=self.ckpt_id, fingerprints=list(batch["fingerprint"]))
        return pd.DataFrame({"row": [json.dumps(r) for r in rows]})


# ----------------------------------------------------------------------------- driver

def checkpoint_identity(checkpoint: str | None, model_dir: str, malmm: dict) -> str:
    """A short hash naming the weights that produce the predictions."""
    h = hashlib.sha256(json.dumps(malmm, sort_keys=True).encode())
    for path in ([Path(checkpoint)] if checkpoint else []) + [Path(model_dir)]:
        files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file()
                       and p.suffix in (".safetensors", ".json", ".pth", ".bin"))
        for f in files:
            h.update(f.name.encode())
            if f.suffix == ".json" or f.stat().st_size < 64 << 20:
                h.update(f.read_bytes())
            else:  # large weight files: name, size and mtime-free head/tail bytes
                with open(f, "rb") as fh:
                    h.update(str(f.stat().st_size).encode() + fh.read(1 << 20))
                    fh.seek(-(1 << 20), 2)
                    h.update(fh.read())
    return h.hexdigest()[:16]


def fingerprint(s: Sample, features_id: str, ckpt_id: str, proto, num_frames: int, sample_checksum: str = "") -> str:
    """What a prediction was made from: the sample's features (its key, the extraction plan and the checksum of
    its cached arrays, so a re-extract that changes them re-predicts it), the checkpoint, prompt and generation."""
    ident = [s.key, features_id, ckpt_id, s.prompt, asdict(proto.generation), num_frames, s.start_sec, s.end_sec]
    if sample_checksum:  # shards written before checksums existed have none: their fingerprints stay as they were
        ident.append(sample_checksum)
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _resolve_model(cfg: InferConfig) -> tuple[str, str | None, dict, int | None]:
    """(base model dir, checkpoint path or None, MALMMConfig dict, num_frames trained with)."""
    from pipeline.defaults import resolve_model_dir
    from pipeline.model.modeling_malmm import MALMMConfig

    # absolute: the Ray actors that load them do not run in the driver's folder
    ckpt = Path(cfg.checkpoint).resolve() if cfg.checkpoint else None
    if ckpt and ckpt.is_dir() and (ckpt / "latest.json").exists():  # a training run folder: its latest checkpoint
        ckpt = ckpt / "checkpoints" / json.loads((ckpt / "latest.json").read_text())["checkpoint"]
    if ckpt and ckpt.is_dir() and (ckpt / "malmm_config.json").exists():  # our checkpoint
        info = json.loads((ckpt / "malmm_config.json").read_text())
        model_dir = info.get("base_model_dir") or str(resolve_model_dir(cfg.model))
        if not Path(model_dir).exists():
            model_dir = str(resolve_model_dir(cfg.model))
        run_json = ckpt.parents[1] / "run.json"
        frames = json.loads(run_json.read_text())["hp"]["num_frames"] if run_json.exists() else None
        return model_dir, str(ckpt), info["malmm"], frames
    if ckpt and ckpt.is_dir() and (ckpt / "config.json").exists():  # an HF InstructBLIP directory: zero-shot
        return str(ckpt), None, asdict(MALMMConfig()), None
    if ckpt and ckpt.is_file():  # a released MA-LMM / LAVIS checkpoint
        return str(resolve_model_dir(cfg.model)), str(ckpt), asdict(MALMMConfig()), None
    if ckpt:
        raise FileNotFoundError(f"--checkpoint {ckpt}: not a run folder, checkpoint folder, InstructBLIP "
                                f"directory or checkpoint file")
    return str(resolve_model_dir(cfg.model)), None, asdict(MALMMConfig()), None


def load_predictions(run_dir: Path) -> pd.DataFrame:
    files = sorted((run_dir / "predictions").glob("*.parquet"))
    if not files:
        return pd.DataFrame(columns=PRED_SCHEMA.names)
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def _write_predictions(run_dir: Path, rows: list[dict]) -> None:
    if not rows:
        return
    new = pd.DataFrame(rows)
    for b, df in new.groupby("benchmark"):
        path = run_dir / "predictions" / f"{b}.parquet"
        if path.exists():
            old = pd.read_parquet(path)
            df = pd.concat([old[~old.sample_id.isin(df.sample_id)], df], ignore_index=True)
        df = df.sort_values("sample_id").reset_index(drop=True)
        write_parquet(path, pa.Table.from_pandas(df[PRED_SCHEMA.names], schema=PRED_SCHEMA, preserve_index=False))


def run(cfg: InferConfig, *, progress: bool = True, trust_pickle: bool = False) -> dict:
    manifest = read_manifest(cfg.manifest)
    store = FeatureStore(cfg.features)
    rep = join_samples(manifest, store, split=cfg.split, benchmark=cfg.benchmark, task=cfg.task)
    if not rep.samples:
        raise ValueError(f"no {cfg.split} samples with features to predict ({rep.summary()})")
    model_dir, ckpt, malmm, trained_frames = _resolve_model(cfg)
    ckpt_id = checkpoint_identity(ckpt, model_dir, malmm)
    features_id = hashlib.sha1(json.dumps(store.plan, sort_keys=True).encode()).hexdigest()[:12]
    run_dir = Path(cfg.out)
    with ExitStack() as held:
        if not cfg.dry_run:  # one writer per run folder: a second infer into it is refused at once
            held.enter_context(OutputLock(run_dir, "infer"))
        return _predict(cfg, rep, store, run_dir, model_dir, ckpt, malmm, trained_frames, ckpt_id, features_id,
                        progress, trust_pickle)


def _predict(cfg: InferConfig, rep, store: FeatureStore, run_dir: Path, model_dir: str, ckpt: str | None,
             malmm: dict, trained_frames: int | None, ckpt_id: str, features_id: str, progress: bool,
             trust_pickle: bool) -> dict:
    import ray
    from tqdm import tqdm

    from pipeline.runtime import cluster_has_gpus, init_ray

    done = load_predictions(run_dir)
    done_fp = set(done.loc[done.error.fillna("") == "", "fingerprint"]) if len(done) else set()
    frames_of = {}
    todo, fps = [], []
    for s in rep.samples:
        proto = protocol(s.benchmark, s.task)
        nf = trained_frames or proto.num_frames
        frames_of[(s.benchmark, s.task)] = nf
        fp = fingerprint(s, features_id, ckpt_id, proto, nf, store.checksum(s.key))
        if fp not in done_fp:
            todo.append(s)
            fps.append(fp)
    print(f"infer: {rep.summary()}; {len(rep.samples) - len(todo)} already predicted, {len(todo)} to predict "
          f"(checkpoint {ckpt or model_dir}, id {ckpt_id})", file=sys.stderr, flush=True)
    if cfg.dry_run or not todo:
        return {"run_dir": str(run_dir), "predicted": 0, "skipped": len(rep.samples) - len(todo)}
    run_dir.mkdir(parents=True, exist_ok=True)
    init_ray(cfg.address)
    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else (1 if cluster_has_gpus() else 0)
    # one num_frames per run (a checkpoint is trained for one T); samples sorted so batches share a protocol
    nf = next(iter(frames_of.values()))
    order = sorted(range(len(todo)), key=lambda i: (todo[i].benchmark, todo[i].task, todo[i].sample_id))
    items = [{"sample": json.dumps(asdict(todo[i])), "fingerprint": fps[i]} for i in order]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // cfg.batch_size, 200)))
    ds = ds.map_batches(Generator, fn_constructor_kwargs={"model_dir": model_dir, "checkpoint": ckpt, "malmm": malmm,
                                                          "features_dir": str(Path(cfg.features).resolve()),
                                                          "num_frames": nf, "ckpt_id": ckpt_id,
                                                          "trust_pickle": trust_pickle},
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
    (run_dir / "infer.json").write_text(json.dumps({"config": asdict(cfg), "model_dir": model_dir, "checkpoint": ckpt,
                                                    "checkpoint_id": ckpt_id, "malmm": malmm, "num_frames": nf},
                                                   indent=1, default=str))
    return {"run_dir": str(run_dir), "predicted": len(items), "errors": n_err,
            "skipped": len(rep.samples) - len(todo)}
