"""`extract`: manifest → sampled frames → frozen ViT features in WebDataset shards.

The flow, top to bottom (the README's architecture section):

1. **plan** (driver) – validate the manifest (with the root rule: every local video inside the
   video root unless ``allow_outside_root``), turn its samples into *extraction units*
   (one per distinct (video, clip, sampling policy); LVU's overlapping windows all
   map to one 1 fps unit of the whole video), give each unit a content-hash key and
   assign units to shards by sorted key. Shards already complete are skipped. Video files
   still to process that do not exist are listed, all at once with their manifest lines (a dry
   run too); their units end as failed ``missing`` ledger rows, and when every one is missing
   nothing runs.
2. **decode** (Ray Data CPU tasks, a few videos per task) – probe each video, compute every
   unit's frame indices, decode the union of those frames once under a watchdog (an
   object-store video is fetched into the local object cache and dropped once decoded).
3. **encode** (Ray Data actor pool, GPU when there is one) – the frozen vision model;
   features are the hidden states before its final layer norm.
4. **write** (Ray Data CPU tasks → shard writer actors, `pipeline.shard_writer`) – each unit's
   sample goes straight to the writer owning its shard, which spills it to local scratch and
   writes the shard (key order, fixed tar headers, ``stats.json`` last) the moment its last unit
   arrives. Videos are processed in the order of the first shard they feed, so shards complete
   one after another. The driver handles metadata only; it ends by rewriting ``index.parquet``
   and ``ledger.parquet`` from the shards' stats.

No stage holds more than a few videos: decode, encode and write tasks take a few videos each,
and a writer holds one sample in memory at a time. Because a shard's bytes do not depend on the
order its samples arrived in, a killed run resumed later ends byte-identical to an
uninterrupted one (it computes again only the units of shards it had not finished); a
finished run re-run decodes and encodes nothing. ``--retry-failed`` reopens the shards holding
failed units: their ok samples are carried over from the shard, only the failed ones computed.

Integrity (the README's architecture section, data contracts): each sample's JSON carries
the checksums of its arrays and each shard's stats those of every member, which `train` and
`infer` verify on read. While it writes, a run holds the output folder's lock
(`pipeline.lock`): a second extract into the same folder is refused at once, a lock left by a
killed run is taken over.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline import decode, layout, storage
from pipeline import shards as sh
from pipeline.config import ExtractConfig
from pipeline.defaults import resolve_model_dir
from pipeline.lock import OutputLock
from pipeline.manifest import MAX_SHOWN, Manifest, ManifestError, find_missing, local_video_path, read_manifest
from pipeline.runtime import cluster_has_gpus, init_ray
from pipeline.sampling import SamplingPolicy, frame_indices
from pipeline.units import Unit, plan_units
from pipeline.vision import CLIP_MEAN, CLIP_STD, model_identity, pixel_values, pre_layernorm_features

# ----------------------------------------------------------------------------- plan

def _report_missing(manifest: Manifest, video_root: str | None, todo: list[Unit]) -> None:
    """Plan-time check of the video files still to be processed: every missing one is listed at once,
    with its manifest lines (a dry run too). The run then goes on and records their units as failed
    (reason ``missing``) in the ledger, so that ok + failed = units and ``--retry-failed`` picks them up
    once the files are there; when *every* video still to process is a missing local file (a wrong
    ``--video-root``, most likely), nothing runs: :class:`ManifestError`, exit 2."""
    todo_videos = {u.video.strip() for u in todo}
    if not todo_videos:
        return
    video = manifest.df["video"].reset_index(drop=True).str.strip()
    rows = find_missing(video, video_root, only=todo_videos)
    if not rows:
        return
    lines = [f"line {i + 2} (row {i + 1}): video file not found: {path}" for i, path in rows.items()]
    gone = {video.iat[i] for i in rows}
    if len(gone) == len(todo_videos) and all(local_video_path(v, video_root) for v in todo_videos):
        raise ManifestError(manifest.path, lines + [
            f"none of the {len(todo_videos)} video(s) to process exists (video root {video_root}): "
            f"check --video-root"])
    shown = "\n  ".join(lines[:MAX_SHOWN])
    more = f"\n  … and {len(lines) - MAX_SHOWN} more" if len(lines) > MAX_SHOWN else ""
    print(f"extract: {len(gone)} of {len(todo_videos)} video file(s) to process not found "
          f"({len(lines)} manifest row(s)); their units will be recorded as failed (missing):\n  {shown}{more}",
          file=sys.stderr, flush=True)


def video_id(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()[:16]


def shard_done(out: Path, shard: int) -> bool:
    return storage.exists(layout.shard_stats_path(out, shard))


# ----------------------------------------------------------------------------- decode

def decode_video(item: dict) -> dict:
    """Ray Data task: decode the union of every unit's frames of one video, once."""
    units = json.loads(item["units"])
    t0 = time.perf_counter()
    row = {"vid": item["vid"], "source": item["source"], "frames": np.zeros((0, 1, 1, 3), np.uint8),
           "error_reason": "", "error_message": "", "info": "{}", "units": item["units"], "decode_s": 0.0}
    try:
        info = decode.probe(item["source"], timeout_s=item["timeout"])
        per_unit = []
        for u in units:
            idx, _ = frame_indices(SamplingPolicy.parse(u["policy"]), info.num_frames, info.fps,
                                   u["start_sec"], u["end_sec"])
            per_unit.append(idx)
        union = np.unique(np.concatenate(per_unit))
        size = item["image_size"]
        dec = decode.read_frames(item["source"], union, size=(size, size), timeout_s=item["timeout"])
        # read_frames may clamp indices to frames that really exist: map back through it
        got = {int(r): int(u) for r, u in zip(union, dec.indices)}
        for u, idx in zip(units, per_unit):
            used = np.array([got[int(i)] for i in idx], dtype=np.int64)
            u["frame_indices"] = used.tolist()
        info_d = {"duration_sec": info.duration_sec, "fps": info.fps, "num_frames": info.num_frames,
                  "declared_num_frames": info.declared_num_frames, "width": info.width, "height": info.height,
                  "decoder": dec.decoder, "strategy": dec.strategy}
        row.update(frames=dec.frames, frame_index=np.asarray(dec.indices, dtype=np.int64),
                   info=json.dumps(info_d), units=json.dumps(units))
    except Exception as e:  # every failure becomes a typed ledger row, never a crashed run
        row["error_reason"] = getattr(e, "reason", "decode_error")
        row["error_message"] = f"{type(e).__name__}: {e}"[:2000]
    finally:
        decode.release(item["source"])  # an object-store video's local copy goes as soon as it is decoded
    row.setdefault("frame_index", np.zeros(0, np.int64))
    row["decode_s"] = time.perf_counter() - t0
    return row


def decode_videos(batch: dict) -> dict:
    """Ray Data task: :func:`decode_video` over a few videos (one task per batch, not per video)."""
    rows = [decode_video({k: batch[k][i] for k in batch}) for i in range(len(batch["vid"]))]
    return {k: _object_column([r[k] for r in rows]) if k in ("frames", "frame_index")
            else np.array([r[k] for r in rows]) for k in rows[0]}


# ----------------------------------------------------------------------------- encode

class VisionEncoder:
    """Ray Data actor: the frozen vision model, loaded once per actor."""

    def __init__(self, model_dir: str, batch_size: int, dtype: str):
        import torch  # heavy (the model package too: torch, transformers): imported where the actor starts

        from pipeline.model.checkpoint import load_vision_model

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_vision_model(model_dir).to(self.device).eval()
        if self.device == "cuda":
            self.model = self.model.half()
        self.batch_size = batch_size
        self.dtype = np.dtype(dtype)
        self.identity = model_identity(self.model, model_dir)

    def encode(self, frames: np.ndarray) -> np.ndarray:
        torch = self.torch
        if not len(frames):
            return np.zeros((0,), self.dtype)
        param_dtype = next(self.model.parameters()).dtype
        # cast to the stored dtype by torch, on the model's device: the same bits as numpy's cast (both round
        # to nearest even), many times faster, and half the bytes to copy back from a GPU
        stored = torch.from_numpy(np.zeros(0, self.dtype)).dtype
        out = None
        with torch.inference_mode():
            for i in range(0, len(frames), self.batch_size):  # fixed chunks per video: deterministic bits
                x = pixel_values(torch.from_numpy(np.ascontiguousarray(frames[i:i + self.batch_size])).to(self.device))
                h = pre_layernorm_features(self.model, x.to(param_dtype)).to(stored).cpu().numpy()
                if out is None:
                    out = np.empty((len(frames), *h.shape[1:]), self.dtype)
                out[i:i + len(h)] = h
        return out

    def __call__(self, batch: dict) -> dict:
        feats, secs = [], []
        for frames, reason in zip(batch["frames"], batch["error_reason"]):
            t0 = time.perf_counter()
            feats.append(self.encode(frames) if not reason and len(frames) else np.zeros((0,), self.dtype))
            secs.append(time.perf_counter() - t0)
        batch = dict(batch)
        del batch["frames"]
        batch["features"] = _object_column(feats)
        batch["encode_s"] = np.array(secs)
        batch["model"] = np.array([json.dumps(self.identity, sort_keys=True)] * len(feats), dtype=object)
        return batch


def _object_column(arrays: list) -> np.ndarray:
    col = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        col[i] = a
    return col


# ----------------------------------------------------------------------------- write

def unit_samples(row: dict, dtype: str, image_size: int) -> list[tuple[dict, list[tuple[str, bytes]]]]:
    """One video's units as (ledger row, tar members) pairs: a failed video gives failed rows and no members."""
    units = json.loads(row["units"])
    info = json.loads(row["info"])
    model = json.loads(row["model"])
    feats = row["features"]
    pos = {int(f): i for i, f in enumerate(row["frame_index"])}
    out = []
    for u in units:
        rec = {"key": u["key"], "video": u["video"], "start_sec": u["start_sec"], "end_sec": u["end_sec"],
               "policy": u["policy"], "shard": u["shard"], "n_samples": len(u["sample_ids"]),
               "sample_ids": json.dumps(u["sample_ids"]),
               "decode_s": float(row["decode_s"]), "encode_s": float(row["encode_s"]),
               "status": "ok", "reason": "", "message": "", "num_frames": 0}
        members: list[tuple[str, bytes]] = []
        if row["error_reason"]:
            rec.update(status="failed", reason=row["error_reason"], message=row["error_message"])
        else:
            idx = np.asarray(u["frame_indices"], dtype=np.int64)
            x = feats[[pos[int(i)] for i in idx]]
            ts = idx / info["fps"]
            meta = {"key": u["key"], "video": u["video"], "clip": [u["start_sec"], u["end_sec"]],
                    "sampling": u["policy"], "source": info, "vision_model": model, "dtype": dtype,
                    "image_size": image_size, "normalize": {"mean": CLIP_MEAN, "std": CLIP_STD},
                    "features": "vision hidden states before post_layernorm", "shape": list(x.shape)}
            members = sh.sample_members(u["key"], x, idx, ts, meta)
            rec["num_frames"] = int(len(idx))
        out.append((rec, members))
    return out


def write_samples(batch: dict, writers: list, dtype: str, image_size: int) -> dict:
    """Ray Data task: send each unit's sample of a few videos to the writer owning its shard
    (`pipeline.shard_writer`); only metadata comes back to the driver."""
    import ray  # heavy: imported where the task runs

    n = len(batch["vid"])
    ok, failed = np.zeros(n, np.int64), np.zeros(n, np.int64)
    shards_written = []
    for i in range(n):
        row = {k: batch[k][i] for k in batch}
        calls = []
        for rec, members in unit_samples(row, dtype, image_size):
            w = writers[rec["shard"] % len(writers)]
            calls.append(w.add.remote(rec["shard"], rec["key"], members, rec))
            ok[i] += rec["status"] == "ok"
            failed[i] += rec["status"] != "ok"
        done = [s for written in ray.get(calls) for s in written]  # waits: at most a few videos in flight
        shards_written.append(json.dumps(done))
    return {"vid": batch["vid"], "ok": ok, "failed": failed, "shards": np.array(shards_written, dtype=object)}


def write_tables(out: Path) -> tuple[int, int]:
    """Rebuild index.parquet and ledger.parquet from the per-shard stats; return (ok, failed)."""
    ledger = []
    for stats in storage.listdir(out, layout.STATS_GLOB):
        s = storage.read_json(stats)
        for r in s["ledger"]:
            ledger.append({**r, "shard_file": s["shard"]})
    ledger.sort(key=lambda r: r["key"])
    cols = ["key", "video", "start_sec", "end_sec", "policy", "shard", "shard_file", "status", "reason", "message",
            "num_frames", "n_samples", "sample_ids", "decode_s", "encode_s"]
    rows = [{c: r.get(c) for c in cols} for r in ledger]
    schema = pa.schema([("key", pa.string()), ("video", pa.string()), ("start_sec", pa.float64()),
                        ("end_sec", pa.float64()), ("policy", pa.string()), ("shard", pa.int64()),
                        ("shard_file", pa.string()), ("status", pa.string()), ("reason", pa.string()),
                        ("message", pa.string()), ("num_frames", pa.int64()), ("n_samples", pa.int64()),
                        ("sample_ids", pa.string()), ("decode_s", pa.float64()), ("encode_s", pa.float64())])
    storage.write_parquet(layout.ledger_path(out), rows, schema)
    index_cols = ["key", "video", "start_sec", "end_sec", "policy", "shard_file", "status", "num_frames"]
    index_schema = pa.schema([schema.field(c) for c in index_cols])
    storage.write_parquet(layout.index_path(out), [{c: r[c] for c in index_cols} for r in rows], index_schema)
    ok = sum(r["status"] == "ok" for r in rows)
    return ok, len(rows) - ok


# ----------------------------------------------------------------------------- run

@dataclass
class ExtractResult:
    out: str
    units: int
    ok: int
    failed: int
    processed_videos: int
    skipped_videos: int
    shards: int
    seconds: float
    failures: dict = field(default_factory=dict)


def run(cfg: ExtractConfig, *, progress: bool = True) -> ExtractResult:
    """Extract (or resume); while it writes it holds the output folder's lock (`pipeline.lock`), so a
    second extract into the same folder is refused at once. A dry run writes and locks nothing."""
    with ExitStack() as held:
        return _run(cfg, progress, held)


def _run(cfg: ExtractConfig, progress: bool, held: ExitStack) -> ExtractResult:
    t_start = time.perf_counter()
    video_root = cfg.video_root if cfg.video_root is not None else str(storage.resolved(cfg.manifest).parent)
    manifest = read_manifest(cfg.manifest, video_root, allow_outside_root=cfg.allow_outside_root)
    units = plan_units(manifest, video_root, cfg.sampling, cfg.shard_size)
    out = storage.resolved(cfg.out)  # the workers of a cluster do not run in the driver's folder
    todo, reopen = _work(out, units, cfg.retry_failed)
    _report_missing(manifest, video_root, todo)
    if not cfg.dry_run:  # a dry run plans and checks only: it writes nothing
        storage.makedirs(out)
        held.enter_context(OutputLock(out, "extract"))  # one writer per folder, before anything is read or written
    n_shards = max(u.shard for u in units) + 1
    _check_previous_plan(out, cfg, units, video_root, write=not cfg.dry_run)

    # a video is computed whole (all its units still to do), so its frames are decoded and encoded once
    by_vid: dict[str, list[Unit]] = defaultdict(list)
    for u in todo:
        by_vid[video_id(u.source)].append(u)
    n_videos = len({video_id(u.source) for u in units})
    print(f"extract: {len(manifest)} samples → {len(units)} units in {n_videos} videos, {n_shards} shard(s); "
          f"{len(by_vid)} video(s) to process, {n_videos - len(by_vid)} already done", file=sys.stderr, flush=True)
    if cfg.dry_run:
        return ExtractResult(str(out), len(units), 0, 0, 0, n_videos - len(by_vid), n_shards, 0.0)

    if by_vid:
        _process(cfg, out, units, by_vid, reopen, progress)
    ok, failed = write_tables(out)
    ledger = storage.read_parquet(layout.ledger_path(out))
    failures = ledger[ledger.status != "ok"].reason.value_counts().to_dict()
    return ExtractResult(str(out), len(units), ok, failed, len(by_vid), n_videos - len(by_vid), n_shards,
                         time.perf_counter() - t_start, failures)


def _work(out, units: list[Unit], retry_failed: bool) -> tuple[list[Unit], dict[int, dict]]:
    """What a run has to compute, from what ``out`` holds (read only): the units of unfinished shards,
    and with ``retry_failed`` the failed units of finished shards; those shards are *reopened*
    (``{shard: its stats}``): their ok samples are carried over from the shard, not computed again."""
    reopen: dict[int, dict] = {}
    if retry_failed:
        for path in storage.listdir(out, layout.STATS_GLOB):
            stats = storage.read_json(path)
            if stats["failed"]:
                reopen[int(stats["ledger"][0]["shard"])] = stats
    done = {s for s in {u.shard for u in units} if s not in reopen and shard_done(out, s)}
    kept = {r["key"] for st in reopen.values() for r in st["ledger"] if r["status"] == "ok"}
    return [u for u in units if u.shard not in done and u.key not in kept], reopen


def _process(cfg: ExtractConfig, out, units: list[Unit], by_vid: dict[str, list[Unit]], reopen: dict[int, dict],
             progress: bool) -> None:
    """decode → encode → write over the videos to process, on Ray Data; shard writers are Ray actors."""
    import ray  # heavy: imported on use (keeps the CLI's start-up fast)

    model_dir = str(resolve_model_dir(cfg.model))
    image_size = _image_size(model_dir)
    init_ray(cfg.address)
    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else (1 if cluster_has_gpus() else 0)
    open_shards = sorted({u.shard for us in by_vid.values() for u in us} | set(reopen))
    writers = start_writers(out, units, open_shards, cfg.shard_writers, reopen)
    items = video_items(by_vid, cfg, image_size)
    per = max(1, cfg.videos_per_task)
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(1000, -(-len(items) // per))))
    ds = ds.map_batches(decode_videos, batch_size=per, num_cpus=cfg.decode_cpus, batch_format="numpy")
    ds = ds.map_batches(VisionEncoder, fn_constructor_kwargs={"model_dir": model_dir, "batch_size": cfg.batch_size,
                                                              "dtype": cfg.dtype},
                        batch_size=per, compute=ray.data.ActorPoolStrategy(size=cfg.vision_workers), num_gpus=num_gpus,
                        batch_format="numpy")
    ds = ds.map_batches(write_samples, batch_size=per, batch_format="numpy",
                        fn_kwargs={"writers": writers, "dtype": cfg.dtype, "image_size": image_size})
    bar = tqdm(total=len(items), unit="video", desc="extract", disable=not progress, file=sys.stderr)
    ok = failed = shards = 0
    for r in ds.iter_rows():
        ok += int(r["ok"])
        failed += int(r["failed"])
        shards += len(json.loads(r["shards"]))
        bar.update(1)
        bar.set_postfix(ok=ok, failed=failed, shards=f"{shards}/{len(open_shards)}")
    bar.close()
    stop_writers(writers)


def video_items(by_vid: dict[str, list[Unit]], cfg: ExtractConfig, image_size: int) -> list[dict]:
    """The decode items, one per video, in the order of the first shard each feeds: shards then
    complete one after another, not all at the end."""
    order = sorted(by_vid, key=lambda vid: (min(u.shard for u in by_vid[vid]), vid))
    return [{"vid": vid, "source": by_vid[vid][0].source, "timeout": cfg.decode_timeout, "image_size": image_size,
             "units": json.dumps([asdict(u) for u in by_vid[vid]])} for vid in order]


def start_writers(out, units: list[Unit], open_shards: list[int], n: int, reopen: dict[int, dict]) -> list:
    """Shard writer actors for the shards to write (shard s belongs to writer s mod N); a reopened
    shard's ok samples are carried over first."""
    import ray  # heavy: imported on use

    from pipeline.shard_writer import ShardWriter

    n = max(1, min(n, len(open_shards)))
    expected: list[dict[int, list[str]]] = [{} for _ in range(n)]
    for u in units:
        if u.shard in open_shards:
            expected[u.shard % n].setdefault(u.shard, []).append(u.key)
    Writer = ray.remote(num_cpus=0, max_restarts=0)(ShardWriter)
    writers = [Writer.remote(str(out), exp, i) for i, exp in enumerate(expected)]
    ray.get([writers[s % n].adopt.remote(s, st) for s, st in sorted(reopen.items())])
    return writers


def stop_writers(writers: list) -> None:
    """End the writers; a shard still missing units (which would be a bug: every video sends every
    unit, failed ones as ledger rows) is an error, and the next run computes it again."""
    import ray  # heavy: imported on use

    left = {s: n for p in ray.get([w.pending.remote() for w in writers]) for s, n in p.items()}
    ray.get([w.close.remote() for w in writers])
    for w in writers:
        ray.kill(w)
    if left:
        raise RuntimeError(f"extract: shard(s) {sorted(left)} still miss units after every video was processed "
                           f"({left}); re-run extract to finish them")


def _image_size(model_dir: str) -> int:
    cfg = storage.read_json(Path(model_dir) / "config.json")
    return int(cfg.get("vision_config", cfg).get("image_size", 224))


def _check_previous_plan(out: Path, cfg: ExtractConfig, units: list[Unit], video_root: str | None, *,
                         write: bool = True) -> None:
    """Refuse to mix shards of a different plan (other manifest, shard size or policy) into one folder."""
    plan = {"video_root": str(Path(video_root).resolve()) if video_root and "://" not in video_root else video_root,
            "shard_size": cfg.shard_size, "units": hashlib.sha1("".join(u.key for u in units).encode()).hexdigest(),
            "model": cfg.model, "dtype": cfg.dtype, "sampling": cfg.sampling,
            "shards": max(u.shard for u in units) + 1}  # derived from units and shard_size: never compared
    path = layout.plan_path(out)
    if storage.exists(path):
        prev = storage.read_json(path)
        diff = [k for k in plan if k not in ("video_root", "shards") and prev.get(k) != plan[k]]
        if diff:
            raise ValueError(f"{out} holds shards of a different extraction ({', '.join(diff)} changed); "
                             f"use another --out or delete {out}")
    elif write:
        storage.write_json(path, plan)
