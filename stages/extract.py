"""`extract`: manifest → sampled frames → frozen ViT features in WebDataset shards.

The flow, top to bottom (the README's architecture section):

1. **plan** – validate the manifest (with the root rule: every local video inside the
   video root unless ``allow_outside_root``), turn its samples into *extraction units*
   (one per distinct (video, clip, sampling policy); LVU's overlapping windows all
   map to one 1 fps unit of the whole video), give each unit a content-hash key and
   assign units to shards by sorted key. Shards already complete are skipped, and so
   are videos whose results were staged by an interrupted run. Video files still to process
   that do not exist are listed, all at once with their manifest lines (a dry run too); their
   units end as failed ``missing`` ledger rows, and when every one is missing nothing runs.
2. **decode** (Ray Data CPU tasks, one per video) – probe the video, compute every
   unit's frame indices, decode the union of those frames once under a watchdog.
3. **encode** (Ray Data actor pool, GPU when there is one) – the frozen vision model;
   features are the hidden states before its final layer norm.
4. **stage** (Ray Data CPU tasks) – each video's unit samples are written to
   ``_staging/`` atomically, with a ledger row per unit.
5. **finalize** (driver) – every shard whose videos are all staged is assembled in
   key order into ``shard-NNNNNN.tar`` (+ ``.stats.json`` beside it), then
   ``index.parquet`` and ``ledger.parquet`` are rewritten.

Because a video is always computed whole and shards are assembled in key order
with fixed tar headers, a killed run resumed later ends byte-identical to an
uninterrupted one; a finished run re-run decodes and encodes nothing.

Integrity (the README's architecture section, data contracts): each sample's JSON
carries the checksums of its arrays and each shard's stats those of every member,
which `train` and `infer` verify on read; a staged video whose arrays no longer match
its JSON is computed again. While it writes, a run holds the output folder's lock
(`pipeline.lock`): a second extract into the same folder is refused at once, a lock
left by a killed run is taken over.
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

STAGING = layout.STAGING


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


def _units_to_do(out: Path, units: list[Unit], retry_failed: bool) -> list[Unit]:
    """The units a run would process, from what ``out`` holds (read only, before anything is written):
    those of unfinished shards not staged yet, and with ``retry_failed`` those that failed."""
    retry: set[str] = set()
    if retry_failed:
        for stats in storage.listdir(out, layout.STATS_GLOB):
            retry |= {r["key"] for r in storage.read_json(stats)["ledger"] if r["status"] != "ok"}
    done = {s: shard_done(out, s) for s in {u.shard for u in units}}
    return [u for u in units if u.key in retry or not (done[u.shard] or staged(out, video_id(u.source)))]


def video_id(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()[:16]


def shard_done(out: Path, shard: int) -> bool:
    return storage.exists(layout.shard_stats_path(out, shard))


def staged(out: Path, vid: str) -> bool:
    return storage.exists(layout.staged_ledger(out, vid))


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
    row.setdefault("frame_index", np.zeros(0, np.int64))
    row["decode_s"] = time.perf_counter() - t0
    return row


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
        out = []
        param_dtype = next(self.model.parameters()).dtype
        with torch.inference_mode():
            for i in range(0, len(frames), self.batch_size):  # fixed chunks per video: deterministic bits
                x = pixel_values(torch.from_numpy(np.ascontiguousarray(frames[i:i + self.batch_size])).to(self.device))
                h = pre_layernorm_features(self.model, x.to(param_dtype))
                out.append(h.float().cpu().numpy().astype(self.dtype))
        return np.concatenate(out) if out else np.zeros((0,), self.dtype)

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


# ----------------------------------------------------------------------------- stage

def stage_video(row: dict, out: str, dtype: str, image_size: int) -> dict:
    """Ray Data task: write one video's unit samples and ledger rows to the staging folder."""
    units = json.loads(row["units"])
    info = json.loads(row["info"])
    model = json.loads(row["model"])
    members, ledger = [], []
    feats = row["features"]
    pos = {int(f): i for i, f in enumerate(row["frame_index"])}
    for u in units:
        rec = {"key": u["key"], "video": u["video"], "start_sec": u["start_sec"], "end_sec": u["end_sec"],
               "policy": u["policy"], "shard": u["shard"], "n_samples": len(u["sample_ids"]),
               "decode_s": float(row["decode_s"]), "encode_s": float(row["encode_s"]),
               "status": "ok", "reason": "", "message": "", "num_frames": 0}
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
            members += sh.sample_members(u["key"], x, idx, ts, meta)
            rec["num_frames"] = int(len(idx))
        ledger.append(rec)
    sh.write_tar(layout.staged_tar(out, row["vid"]), members)
    storage.write_json(layout.staged_ledger(out, row["vid"]), ledger)  # written last: marks the video staged
    return {"vid": row["vid"], "ok": sum(r["status"] == "ok" for r in ledger),
            "failed": sum(r["status"] != "ok" for r in ledger)}


# ----------------------------------------------------------------------------- finalize

def finalize(out: Path, units: list[Unit], vid_of: dict[str, str]) -> list[int]:
    """Assemble every shard whose videos are all staged; return the shards written now.

    A staged video whose arrays no longer match the checksums in their sample JSON (or whose
    staged tar is unreadable) is unstaged with a message: its shard stays unfinished and the
    next run computes that video again.
    """
    by_shard: dict[int, list[Unit]] = defaultdict(list)
    for u in units:
        by_shard[u.shard].append(u)
    written = []
    cache: dict[str, tuple[dict, dict]] = {}

    def staged_video(vid):
        if vid not in cache:
            members = dict(sh.read_tar_members(layout.staged_tar(out, vid)))
            ledger = {r["key"]: r for r in storage.read_json(layout.staged_ledger(out, vid))}
            cache[vid] = (members, ledger)
        return cache[vid]

    for shard, us in sorted(by_shard.items()):
        if shard_done(out, shard) or not all(staged(out, vid_of[u.key]) for u in us):
            continue
        members, ledger, sums, bad = [], [], {}, None
        for u in sorted(us, key=lambda u: u.key):
            try:
                vmembers, vledger = staged_video(vid_of[u.key])
                rec = dict(vledger[u.key], shard=shard, sample_ids=json.dumps(u.sample_ids))
                if rec["status"] == "ok":
                    mine = [(n, d) for n, d in sorted(vmembers.items()) if n.split(".", 1)[0] == u.key]
                    sums[u.key] = _verified_checksums(layout.staged_tar(out, vid_of[u.key]), u.key, mine)
                    members += mine
            except (sh.ShardIntegrityError, KeyError, ValueError) as e:
                bad = (vid_of[u.key], e)
                break
            ledger.append(rec)
        if bad is not None:
            vid, e = bad
            storage.remove(layout.staged_ledger(out, vid))  # unstaged: the next run computes it again
            storage.remove(layout.staged_tar(out, vid))
            cache.pop(vid, None)
            print(f"extract: staged video {vid} is unusable ({e}); shard {shard} left unfinished, re-run extract to "
                  f"compute that video again", file=sys.stderr, flush=True)
            continue
        name = layout.shard_name(shard)
        size = sh.write_tar(out / name, members)
        stats = {"shard": name, "units": len(us), "ok": sum(r["status"] == "ok" for r in ledger),
                 "failed": sum(r["status"] != "ok" for r in ledger),
                 "frames": sum(r["num_frames"] for r in ledger), "bytes": size, "ledger": ledger,
                 # every member's checksum, the JSON too: what train and infer verify each sample against
                 "checksums": sums}
        storage.write_json(out / layout.stats_name(name), stats)  # written last: marks the shard complete
        written.append(shard)
    return written


def _verified_checksums(staged_tar: Path, key: str, members: list[tuple[str, bytes]]) -> dict[str, str]:
    """Checksums of one staged sample's members, checked against those its JSON recorded when it was staged."""
    sums = sh.member_checksums(members).get(key, {})
    missing = [ext for ext in sh.MEMBERS if ext not in sums]
    if missing:
        raise sh.CorruptSampleError(staged_tar, key, f"{key}.{missing[0]}", "member missing")
    meta = json.loads(dict(members)[f"{key}.json"])
    if "checksums" not in meta:
        raise sh.CorruptSampleError(staged_tar, key, f"{key}.json", "staged by an older version, without checksums")
    for ext in sh.ARRAY_MEMBERS:
        if meta.get("checksums", {}).get(ext) != sums[ext]:
            raise sh.CorruptSampleError(staged_tar, key, f"{key}.{ext}", "checksum mismatch with the sample's JSON")
    return sums


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
    video_root = cfg.video_root if cfg.video_root is not None else str(Path(cfg.manifest).resolve().parent)
    manifest = read_manifest(cfg.manifest, video_root, allow_outside_root=cfg.allow_outside_root)
    units = plan_units(manifest, video_root, cfg.sampling, cfg.shard_size)
    _report_missing(manifest, video_root, _units_to_do(Path(cfg.out), units, cfg.retry_failed))
    out = Path(cfg.out)
    if not cfg.dry_run:  # a dry run plans and checks only: it writes nothing
        storage.makedirs(out)
        held.enter_context(OutputLock(out, "extract"))  # one writer per folder, before anything is read or written
    vid_of = {u.key: video_id(u.source) for u in units}
    n_shards = max(u.shard for u in units) + 1

    if cfg.retry_failed and not cfg.dry_run:
        _reopen_failed_shards(out, units, vid_of)
    _check_previous_plan(out, cfg, units, video_root, write=not cfg.dry_run)

    pending: dict[str, list[Unit]] = defaultdict(list)
    for u in units:
        if not shard_done(out, u.shard) and not staged(out, vid_of[u.key]):
            pending[vid_of[u.key]].append(u)
    # a video is computed whole (all its units), so its frames are decoded and encoded once
    by_vid: dict[str, list[Unit]] = defaultdict(list)
    for u in units:
        if vid_of[u.key] in pending:
            by_vid[vid_of[u.key]].append(u)
    n_videos = len({vid_of[u.key] for u in units})
    print(f"extract: {len(manifest)} samples → {len(units)} units in {n_videos} videos, {n_shards} shard(s); "
          f"{len(by_vid)} video(s) to process, {n_videos - len(by_vid)} already done", file=sys.stderr, flush=True)
    if cfg.dry_run:
        return ExtractResult(str(out), len(units), 0, 0, 0, n_videos - len(by_vid), n_shards, 0.0)

    if by_vid:
        _process(cfg, out, by_vid, progress)
    finalize(out, units, vid_of)
    ok, failed = write_tables(out)
    complete = all(shard_done(out, s) for s in range(n_shards))
    if complete:
        storage.remove_tree(layout.staging_dir(out))
    ledger = storage.read_parquet(layout.ledger_path(out))
    failures = ledger[ledger.status != "ok"].reason.value_counts().to_dict()
    return ExtractResult(str(out), len(units), ok, failed, len(by_vid), n_videos - len(by_vid), n_shards,
                         time.perf_counter() - t_start, failures)


def _process(cfg: ExtractConfig, out: Path, by_vid: dict[str, list[Unit]], progress: bool) -> None:
    import ray  # heavy: imported on use (keeps the CLI's start-up fast)

    model_dir = str(resolve_model_dir(cfg.model))
    image_size = _image_size(model_dir)
    init_ray(cfg.address)
    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else (1 if cluster_has_gpus() else 0)
    items = [{"vid": vid, "source": us[0].source, "timeout": cfg.decode_timeout, "image_size": image_size,
              "units": json.dumps([{**asdict(u)} for u in us])} for vid, us in sorted(by_vid.items())]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 1000))
    ds = ds.map(decode_video, num_cpus=cfg.decode_cpus)
    ds = ds.map_batches(VisionEncoder, fn_constructor_kwargs={"model_dir": model_dir, "batch_size": cfg.batch_size,
                                                              "dtype": cfg.dtype},
                        batch_size=1, concurrency=cfg.vision_workers, num_gpus=num_gpus, batch_format="numpy")
    ds = ds.map(stage_video, fn_kwargs={"out": str(out.resolve()), "dtype": cfg.dtype, "image_size": image_size})
    bar = tqdm(total=len(items), unit="video", desc="extract", disable=not progress, file=sys.stderr)
    ok = failed = 0
    for r in ds.iter_rows():
        ok += r["ok"]
        failed += r["failed"]
        bar.update(1)
        bar.set_postfix(ok=ok, failed=failed)
    bar.close()


def _image_size(model_dir: str) -> int:
    cfg = storage.read_json(Path(model_dir) / "config.json")
    return int(cfg.get("vision_config", cfg).get("image_size", 224))


def _reopen_failed_shards(out: Path, units: list[Unit], vid_of: dict[str, str]) -> None:
    for stats in storage.listdir(out, layout.STATS_GLOB):
        s = storage.read_json(stats)
        if s["failed"]:
            storage.remove(stats)
            failed_keys = {r["key"] for r in s["ledger"] if r["status"] != "ok"}
            for u in units:
                if u.key in failed_keys:
                    storage.remove(layout.staged_ledger(out, vid_of[u.key]))


def _check_previous_plan(out: Path, cfg: ExtractConfig, units: list[Unit], video_root: str | None, *,
                         write: bool = True) -> None:
    """Refuse to mix shards of a different plan (other manifest, shard size or policy) into one folder."""
    plan = {"video_root": str(Path(video_root).resolve()) if video_root and "://" not in video_root else video_root,
            "shard_size": cfg.shard_size, "units": hashlib.sha1("".join(u.key for u in units).encode()).hexdigest(),
            "model": cfg.model, "dtype": cfg.dtype, "sampling": cfg.sampling}
    path = layout.plan_path(out)
    if storage.exists(path):
        prev = storage.read_json(path)
        diff = [k for k in plan if k != "video_root" and prev.get(k) != plan[k]]
        if diff:
            raise ValueError(f"{out} holds shards of a different extraction ({', '.join(diff)} changed); "
                             f"use another --out or delete {out}")
    elif write:
        storage.write_json(path, plan)
