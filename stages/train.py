"""`train`: Ray Train of MA-LMM's trainable parts from cached features, resumable and fault tolerant.

The flow, top to bottom:

1. **join** (driver) – manifest samples of the benchmark's train (and val) split are
   joined to the feature shards; samples without features are counted by reason.
2. **fit** (Ray Train `TorchTrainer`, one process per worker) – each worker loads the
   model (frozen LLM, trainable Q-Former / query tokens / projection / ln_vision /
   frame PE), reads its slice of every global batch from the shards, and steps AdamW
   with linear warm-up then cosine decay (`pipeline.optim`) under the run's precision
   (`pipeline.precision`). Every N steps and at each epoch end the workers report a
   checkpoint through Ray Train (`ray.train.report`): rank 0 its weights, optimiser,
   scheduler, state and metrics log, every rank its RNG state; Ray Train persists it under
   ``checkpoints/step-N`` of the run folder (a local folder or an object-store URI) and keeps
   the last ``--keep-last``. After each epoch every rank validates its share of the val split
   and the predictions are gathered, so all ranks hold the same scores.
3. **recover** – a worker that dies (or raises) is restarted by Ray Train with the whole
   group (`FailureConfig(max_failures)`) from the last reported checkpoint, and a run folder
   that holds checkpoints is continued the same way by the next `train` (Ray Train restores
   from the run's checkpoint record): weights, optimiser, scheduler, RNG and data position
   (epoch, step in epoch), so the loss trajectory is the one an uninterrupted run gives.

Progress and metrics reach the driver through Ray: rank 0 sends each step's row to a small
progress actor that the driver's progress bar polls, and each checkpoint's metrics are Ray
Train's reported metrics. Every collective runs on the worker's device (NCCL on GPUs).

The sample order is a seeded permutation per epoch; global batch k is split evenly
across workers, so N workers see the same samples per step as one.

Every cached sample is verified as it is read (`FeatureStore.load`). A corrupt one stops
the run with `CorruptFeaturesError` naming its shard, key and member, rather than being
skipped: skipping would change the batches (and so the trajectory, and what N workers
compute against one) silently. A restarted worker group meets the same sample again, so the
first worker to meet it records it and the restarted groups stop at once. The fix is to
re-extract that shard; the run then resumes from its last checkpoint exactly. The run folder
is locked while train writes it (`pipeline.lock`).
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.benchmarks import protocol, tasks_of
from pipeline.config import TrainConfig
from pipeline.data import FeatureStore, SampleDataset, collate, join_samples
from pipeline.defaults import resolve_model_dir
from pipeline.lock import OutputLock
from pipeline.manifest import read_manifest
from pipeline import layout, metrics, precision, storage
from pipeline.model.hashing import module_digest
from pipeline.optim import adamw, lr_lambda, param_groups, warmup_cosine  # noqa: F401  (lr_lambda: re-exported)
from pipeline.runtime import init_ray
from pipeline.shards import ShardIntegrityError
from stages.infer import predict_samples

CKPT_DIR = layout.CKPT_DIR


class TrainInputError(ValueError):
    pass


class CorruptFeaturesError(TrainInputError):
    """Training stopped on a cached sample that failed verification; names the shard, key and member."""


def _integrity_error(e: BaseException, _seen=None):
    """The `ShardIntegrityError` behind a Ray Train failure (worker failures, causes), if any."""
    seen = _seen if _seen is not None else set()
    if e is None or id(e) in seen:
        return None
    seen.add(id(e))
    if isinstance(e, ShardIntegrityError):
        return e
    nested = [getattr(e, "__cause__", None), getattr(e, "__context__", None), getattr(e, "cause", None),
              getattr(e, "controller_failure", None)]
    nested += list((getattr(e, "worker_failures", None) or {}).values())
    for n in nested:
        if isinstance(n, BaseException):
            found = _integrity_error(n, seen)
            if found is not None:
                return found
    return None


def _raise_if_corrupt(e: BaseException, run_dir) -> None:
    err = _integrity_error(e)
    if err is not None:  # its message names the shard, key and member, and how to rebuild the shard
        raise CorruptFeaturesError(f"training stopped on a corrupt cached sample, nothing was trained on it: {err} "
                                   f"(checkpoints so far are kept in {layout.checkpoints_dir(run_dir)})") from e
    if "CorruptSampleError" in str(e) or "MalformedShardError" in str(e):  # wrapped beyond recognition: its text
        line = next((ln for ln in str(e).splitlines() if "SampleError" in ln or "ShardError" in ln), str(e))
        raise CorruptFeaturesError(f"training stopped on a corrupt cached sample: {line.strip()}") from e


# ----------------------------------------------------------------------------- plan

def plan(cfg: TrainConfig) -> dict:
    """Resolve per-benchmark defaults and join samples; raise TrainInputError with counts on bad input."""
    if not cfg.manifest:
        raise TrainInputError("--manifest is required")
    precision.check(cfg.precision, gpu=cfg.use_gpu)
    manifest = read_manifest(cfg.manifest)
    try:
        store = FeatureStore(cfg.features)
    except FileNotFoundError as e:
        raise TrainInputError(str(e)) from None
    tasks = [cfg.task] if cfg.task else list(tasks_of(cfg.benchmark))
    proto = protocol(cfg.benchmark, tasks[0])
    train_rep = join_samples(manifest, store, split="train", benchmark=cfg.benchmark, task=cfg.task)
    val_rep = join_samples(manifest, store, split="val", benchmark=cfg.benchmark, task=cfg.task)
    n_manifest = int(((manifest.df.benchmark == cfg.benchmark) & (manifest.df.split == "train")
                      & ((manifest.df.task == cfg.task) if cfg.task else True)).sum())
    if n_manifest == 0:
        raise TrainInputError(f"{cfg.manifest}: no training samples for benchmark {cfg.benchmark!r}"
                              + (f" task {cfg.task!r}" if cfg.task else "") + " (split 'train')")
    if not train_rep.samples:
        raise TrainInputError(f"none of the {n_manifest} training samples of {cfg.benchmark} has features in "
                              f"{cfg.features}: {train_rep.summary()}. Run `malmm-pipeline extract --manifest "
                              f"{cfg.manifest} --out {cfg.features}` first.")
    hp = {
        "num_frames": cfg.num_frames or proto.num_frames,
        "memory_length": cfg.memory_length or proto.memory_length,
        "frame_position_init": cfg.frame_position_init or proto.frame_position_init,
        "loss_reduction": cfg.loss_reduction or proto.loss_reduction,
        "epochs": cfg.epochs or proto.epochs,
        "batch_size": cfg.batch_size or proto.batch_size,
        "lr": cfg.lr or proto.lr,
    }
    return {"train": train_rep, "val": val_rep, "hp": hp, "tasks": tasks}


def malmm_config(cfg: TrainConfig, hp: dict):
    from pipeline.model.modeling_malmm import MALMMConfig  # heavy (torch): imported on use
    return MALMMConfig(memory=cfg.memory, visual_memory=cfg.visual_memory, query_memory=cfg.query_memory,
                       memory_length=hp["memory_length"], max_frames=max(hp["num_frames"], 1),
                       frame_position_init=hp["frame_position_init"], loss_reduction=hp["loss_reduction"],
                       aggregation=cfg.aggregation)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 7]).permutation(n)


# ----------------------------------------------------------------------------- progress, through Ray

class TrainProgress:
    """A Ray actor between the workers and the driver: rank 0 sends each step's row, each (re)start
    of the worker group and, once, a corrupt cached sample; the driver polls `state`."""

    def __init__(self):
        self.row: dict | None = None
        self.attempts: list[dict] = []
        self.corrupt: BaseException | None = None

    def step(self, row: dict) -> None:
        self.row = row

    def started(self, info: dict) -> None:
        self.attempts.append(info)

    def corrupt_sample(self, error: BaseException) -> None:
        self.corrupt = self.corrupt or error

    def state(self) -> dict:
        return {"row": self.row, "attempts": list(self.attempts)}

    def corrupt_error(self) -> BaseException | None:
        return self.corrupt


# ----------------------------------------------------------------------------- worker

def train_loop(loop_cfg: dict) -> None:
    """Ray Train worker: one process of the data-parallel group."""
    import ray  # heavy (ray, torch, the model package): imported in the worker
    import ray.train
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from pipeline.model.checkpoint import load_malmm  # heavy (torch): imported on use
    from pipeline.model.modeling_malmm import MALMMConfig

    _quiet_ray_train_worker()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = TrainConfig(**loop_cfg["cfg"])
    hp, run_dir, progress = loop_cfg["hp"], storage.path(loop_cfg["run_dir"]), loop_cfg["progress"]
    corrupt = ray.get(progress.corrupt_error.remote())
    if corrupt is not None:  # an earlier attempt met a corrupt cached sample: the restart would meet it again
        raise corrupt
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, int(loop_cfg.get("threads", 1))))
    device = torch.device("cpu")
    if cfg.use_gpu and torch.cuda.is_available():
        import ray.train.torch  # heavy: imported on use
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)  # object collectives (the validation gather) use the current device
    prec = precision.resolve(cfg.precision, device)

    model = load_malmm(loop_cfg["model_dir"], MALMMConfig(**loop_cfg["malmm"]))
    model.to(device)
    llm_before = llm_digest(model) if rank == 0 else None
    fwd = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False) if world > 1 else model

    samples = loop_cfg["train_samples"]
    dataset = SampleDataset(samples, cfg.features, hp["num_frames"], train=True, seed=cfg.seed)
    global_bs = hp["batch_size"]
    if global_bs % world:
        raise ValueError(f"batch size {global_bs} is not divisible by --num-workers {world}")
    local_bs = global_bs // world
    steps_per_epoch = len(samples) // global_bs or 1
    opt_steps_per_epoch = max(1, steps_per_epoch // cfg.grad_accum)
    total = opt_steps_per_epoch * hp["epochs"]
    # the fused kernel: one pass over all tensors (the default loops per tensor: 7 ms a step for the
    # tiny default's 112 tensors against 1.3 ms, measured on a CPU); the same update up to rounding
    optimizer = adamw(param_groups(model, cfg.weight_decay), hp["lr"], fused=device.type in ("cpu", "cuda"))
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, total)
    scaler = precision.grad_scaler(prec, device)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": None}
    log_rows: list[dict] = []
    resume = ray.train.get_checkpoint()
    if resume is not None:  # Ray Train's last reported checkpoint: a restarted group, or a run folder resumed
        with resume.as_directory() as d:
            state, log_rows = _restore(Path(d), model, optimizer, scheduler, scaler, rank, device)
    elif loop_cfg.get("legacy_resume"):  # a run folder checkpointed before Ray Train recorded its checkpoints
        state, log_rows = _restore(storage.local_path(loop_cfg["legacy_resume"]), model, optimizer, scheduler,
                                   scaler, rank, device)
    nodes = [ray.get_runtime_context().get_node_id()]
    if dist.is_initialized() and world > 1:
        nodes = [None] * world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if rank == 0:
        progress.started.remote({"resumed_step": state["global_step"], "world": world, "nodes": len(set(nodes)),
                                 "device": str(device), "precision": prec})

    def checkpoint(epoch_end: bool = False) -> None:
        _checkpoint(model, optimizer, scheduler, scaler, state, run_dir, rank, world, log_rows, hp["num_frames"],
                    epoch_end)

    model.train()
    try:
        for epoch in range(state["epoch"], hp["epochs"]):
            dataset.set_epoch(epoch)
            order = epoch_order(len(samples), cfg.seed, epoch)[: steps_per_epoch * global_bs]
            batches = order.reshape(steps_per_epoch, global_bs)[:, rank * local_bs:(rank + 1) * local_bs]
            start = state["step_in_epoch"] if epoch == state["epoch"] else 0
            loader = DataLoader(dataset, batch_sampler=[list(b) for b in batches[start:]], collate_fn=collate,
                                num_workers=loop_cfg.get("loader_workers", 0),
                                # its own generator: creating a loader must not draw from the global RNG, or a
                                # resumed epoch would shift every dropout mask after it
                                generator=torch.Generator().manual_seed(cfg.seed + epoch))
            t_wait = time.perf_counter()
            accum_loss, micro = 0.0, 0
            for step_in_epoch, batch in enumerate(loader, start=start):
                t_got = time.perf_counter()
                with precision.autocast(prec, device):
                    out = fwd(features=batch["features"].to(device), prompts=batch["prompts"],
                              targets=batch["answers"])
                scaler.scale(out.loss / cfg.grad_accum).backward()
                accum_loss += float(out.loss.detach())
                micro += 1
                if micro < cfg.grad_accum and step_in_epoch + 1 < steps_per_epoch:
                    continue
                lr_used = scheduler.get_last_lr()[0]
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["global_step"] += 1
                state["step_in_epoch"] = step_in_epoch + 1
                step_loss = global_mean(accum_loss / micro, device, world)  # the global batch's, not rank 0's share
                t_done = time.perf_counter()
                row = {"global_step": state["global_step"], "epoch": epoch, "loss": step_loss,
                       "lr": lr_used, "samples_per_s": global_bs * micro / max(1e-9, t_done - t_wait),
                       "data_wait_frac": (t_got - t_wait) / max(1e-9, t_done - t_wait)}
                accum_loss, micro = 0.0, 0
                log_rows.append(row)
                if rank == 0:
                    progress.step.remote(row)
                t_wait = time.perf_counter()
                if (cfg.checkpoint_every and state["global_step"] % cfg.checkpoint_every == 0
                        and state["step_in_epoch"] < steps_per_epoch):  # an epoch's last step: its end's checkpoint
                    checkpoint()
                if loop_cfg.get("stop_after_step") and state["global_step"] >= loop_cfg["stop_after_step"]:
                    return  # `run(stop_after_step=…)`: end here as a killed run would
            state["epoch"], state["step_in_epoch"] = epoch + 1, 0
            if cfg.validate and loop_cfg.get("val_samples"):
                val = _validate(model, loop_cfg["val_samples"], cfg, hp, device, rank, world)
                log_rows[-1].update({f"val_{k}": v for k, v in val.items()})
                model.train()
                score = val.get("top1", val.get("cider"))
                if score is not None and (state["best"] is None or score > state["best"]["score"]):
                    state["best"] = {"score": score, "global_step": state["global_step"]}
                    if rank == 0:  # the best weights on validation, for `infer --checkpoint RUN/best`
                        from pipeline.model.checkpoint import save_checkpoint
                        save_checkpoint(model, layout.best_dir(run_dir), num_frames=hp["num_frames"])
            checkpoint(epoch_end=True)
    except ShardIntegrityError as e:
        progress.corrupt_sample.remote(e)  # a restarted group stops at once instead of meeting it again
        raise
    if rank == 0:  # the frozen LLM must come out of training bit-identical
        after = llm_digest(model)
        storage.write_json(layout.frozen_llm_path(run_dir), {"sha256_before": llm_before, "sha256_after": after,
                                                             "unchanged": after == llm_before,
                                                             "trainable_llm_params": sum(p.requires_grad for p in
                                                                                         model.llm.parameters())})


def global_mean(value: float, device, world: int) -> float:
    """The mean of ``value`` over the ranks of the process group (``value`` itself without one). The
    all-reduced tensor lives on the worker's device: NCCL, the GPU backend, reduces only GPU tensors."""
    import torch  # heavy: imported on use
    import torch.distributed as dist
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world


def _quiet_ray_train_worker() -> None:
    """Ray Train V2 logs every ``ray.train.report`` call at INFO under a logger named by its file path."""
    import logging
    try:  # optional: Ray Train V2's private module, absent from other Ray versions
        from ray.train.v2._internal.execution import context
        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def llm_digest(model) -> str:
    """SHA-256 over the frozen LLM's parameters and buffers (names and bytes; `pipeline.model.hashing`)."""
    return module_digest(model.llm)


def _restore(d: Path, model, optimizer, scheduler, scaler, rank: int, device) -> tuple[dict, list[dict]]:
    """Load a checkpoint folder (local) into the model, optimiser, scheduler, scaler and this rank's RNG;
    returns the training state (data position) and the metrics log up to its step."""
    import torch  # heavy: imported on use
    from safetensors.torch import load_file

    from pipeline.model.checkpoint import CHECKPOINT_WEIGHTS, verify_weights

    verify_weights(d / CHECKPOINT_WEIGHTS)
    model.load_state_dict(load_file(str(d / CHECKPOINT_WEIGHTS)), strict=False)
    optimizer.load_state_dict(torch.load(d / layout.OPTIMIZER, map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(d / layout.SCHEDULER, weights_only=True))
    if (d / layout.SCALER).exists():
        scaler.load_state_dict(torch.load(d / layout.SCALER, weights_only=True))
    rng = d / layout.rng_name(rank)
    if rng.exists():
        saved = torch.load(rng, weights_only=True)
        torch.set_rng_state(saved["cpu"] if isinstance(saved, dict) else saved)
        if isinstance(saved, dict) and saved.get("cuda") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda"], device)
    state = storage.read_json(d / layout.STATE)
    log = d / layout.METRICS
    if not log.exists():  # checkpoints from before the log travelled with them
        log = layout.metrics_path(Path(d).parents[1])
    rows = []
    if storage.exists(log):
        df = storage.read_parquet(log)
        rows = [{k: v for k, v in r.items() if not _missing(v)} for r in
                df[df.global_step <= state["global_step"]].to_dict("records")]
    return state, rows


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def _checkpoint(model, optimizer, scheduler, scaler, state: dict, run_dir, rank: int, world: int,
                log_rows: list[dict], num_frames: int, epoch_end: bool) -> None:
    """Report a checkpoint through Ray Train: rank 0 writes the weights, optimiser, scheduler, scaler,
    state and metrics log, every rank its RNG state, into a local folder that Ray Train persists as
    ``checkpoints/step-N`` of the run folder (one folder, merged from every rank). Once every rank
    has reported, rank 0 writes the run's metrics log and ``latest.json`` (the completion marker
    `infer` and `status` read)."""
    import ray.train  # heavy (ray, torch, the model package): imported on use
    import torch
    import torch.distributed as dist

    from pipeline.model.checkpoint import save_checkpoint

    name = layout.step_name(state["global_step"])
    with tempfile.TemporaryDirectory(prefix=f"malmm-{name}-") as tmp:
        d = Path(tmp)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and next(model.parameters()).is_cuda:
            rng["cuda"] = torch.cuda.get_rng_state(next(model.parameters()).device)
        torch.save(rng if "cuda" in rng else rng["cpu"], d / layout.rng_name(rank))
        if rank == 0:
            save_checkpoint(model, d, num_frames=num_frames)
            torch.save(optimizer.state_dict(), d / layout.OPTIMIZER)
            torch.save(scheduler.state_dict(), d / layout.SCHEDULER)
            if scaler.is_enabled():
                torch.save(scaler.state_dict(), d / layout.SCALER)
            storage.write_json(d / layout.STATE, state, raw=True, mode=storage.UMASK, indent=1)
            write_log(d / layout.METRICS, log_rows)
        metrics_now = {k: v for k, v in (log_rows[-1] if log_rows else {}).items() if not isinstance(v, list)}
        ray.train.report({**metrics_now, "epoch_end": epoch_end}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=name)
    if dist.is_initialized() and world > 1:
        dist.barrier()  # every rank's files are persisted
    if rank == 0:
        write_log(layout.metrics_path(run_dir), log_rows)
        storage.write_json(layout.latest_path(run_dir), {"checkpoint": name, **state})  # last: marks it complete


def write_log(path, rows: list[dict]) -> None:
    """The metrics log as Parquet: one row per optimiser step, the validation columns on each epoch's
    last step (a column for every key any row has)."""
    import pyarrow as pa  # heavy: imported on use
    storage.write_parquet(path, pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False))


def _validate(model, samples, cfg: TrainConfig, hp: dict, device, rank: int, world: int) -> dict:
    """Score the val split with the same generation and scoring path as `infer` / `report`. Each rank
    predicts every ``world``-th sample; the predictions are gathered, so every rank gets the same scores."""
    import torch.distributed as dist  # heavy: imported on use

    mine = samples[rank::world]
    preds = predict_samples(model, mine, cfg.features, hp["num_frames"], batch_size=hp["batch_size"], device=device)
    counts = [len(mine)]
    if dist.is_initialized() and world > 1:
        parts: list = [None] * world
        dist.all_gather_object(parts, (len(mine), preds))
        counts = [n for n, _ in parts]
        preds = [p for _, ps in parts for p in ps]
    out: dict = {}
    for (b, t), df in pd.DataFrame(preds).groupby(["benchmark", "task"]):
        for m in metrics.score(protocol(b, t), df, n_boot=0):
            out.setdefault(m["metric"], []).append(m["value"])
    return {**{k: float(np.mean(v)) for k, v in out.items()}, "samples_per_rank": counts}


# ----------------------------------------------------------------------------- driver

def latest_checkpoint(run_dir):
    """The run's last complete checkpoint folder (named by ``latest.json``), or None."""
    latest = storage.read_json(layout.latest_path(run_dir), missing_ok=True)
    if latest is None:
        return None
    d = layout.checkpoint_dir(run_dir, latest["checkpoint"])
    return d if storage.exists(d / layout.STATE) else None


# what decides a run's trajectory: a checkpoint is only resumed under the same values (paths to the data, the worker
# count, checkpointing, validation, precision and the cluster address may change between attempts)
TRAJECTORY_FIELDS = ("benchmark", "task", "model", "memory", "visual_memory", "query_memory",
                     "aggregation", "weight_decay", "warmup_steps", "grad_accum", "seed")


def _check_same_run(run_dir, cfg: TrainConfig, hp: dict) -> None:
    """Refuse to resume a run folder whose checkpoints were trained with other settings.

    Resuming under, say, another learning rate or epoch count would silently mix two schedules
    (and a smaller epoch count would report the longer run as finished).
    """
    info_path = layout.run_info_path(run_dir)
    if not storage.exists(info_path):
        return
    info = storage.read_json(info_path)
    before = {**{k: info.get("config", {}).get(k) for k in TRAJECTORY_FIELDS}, **info.get("hp", {})}
    now = {**{k: getattr(cfg, k) for k in TRAJECTORY_FIELDS}, **hp}
    diffs = [f"{k} {before[k]!r} -> {now[k]!r}" for k in now if k in before and before[k] != now[k]]
    if diffs:
        raise TrainInputError(
            f"{run_dir} holds checkpoints of a run with other settings ({'; '.join(diffs)}); give --out a new "
            f"folder, or pass --restart to train this one again from scratch")


def run(cfg: TrainConfig, *, progress: bool = True, stop_after_step: int | None = None,
        threads: int | None = None, progress_desc: str = "train", progress_position: int | None = None) -> dict:
    """Train (or resume) one run; returns its folder, final metrics and checkpoint, and the attempts
    (one per start of the worker group: the step each resumed from).

    ``threads``: torch threads of each worker (default: the machine's CPUs over the workers).
    ``stop_after_step``: the workers end right after that optimiser step, without the epoch-end
    checkpoint, as a killed run would (the resume tests inject it); None trains to the end.
    ``progress_desc`` / ``progress_position``: the progress bar's label and line, so that runs
    trained at the same time from one driver (the demo's variants) each keep their own bar.

    The run folder is locked while it is written (`pipeline.lock`): a second train into it is
    refused at once. A corrupt cached sample stops the run with `CorruptFeaturesError` naming
    its shard and key (see the module docstring).
    """
    # the workers of a Ray cluster do not run in the driver's folder: local paths are made absolute here
    cfg = replace(cfg, features=str(storage.resolved(cfg.features)), out=str(storage.resolved(cfg.out)))
    p = plan(cfg)
    with ExitStack() as held:
        if not cfg.dry_run:  # one writer per run folder: a second train into it is refused at once
            held.enter_context(OutputLock(cfg.out, "train"))
        return _run(cfg, p, progress, stop_after_step, threads, progress_desc, progress_position)


def _run(cfg: TrainConfig, p: dict, progress: bool, stop_after_step: int | None, threads: int | None,
         progress_desc: str, progress_position: int | None) -> dict:
    import ray  # heavy: imported on use (keeps the CLI's start-up fast)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    hp = p["hp"]
    run_dir = storage.path(cfg.out)
    resume_from = latest_checkpoint(run_dir) if cfg.resume else None
    if resume_from is not None:
        _check_same_run(run_dir, cfg, hp)
        st = storage.read_json(resume_from / layout.STATE)
        if st.get("epoch", 0) >= hp["epochs"]:
            print(f"train: {run_dir} already holds the final checkpoint ({resume_from.name}, {hp['epochs']} epochs); "
                  f"nothing to do", file=sys.stderr, flush=True)
            return {"run_dir": str(run_dir), "metrics": None, "checkpoint": str(resume_from), "skipped": True}
    print(f"train: {cfg.benchmark} tasks={','.join(p['tasks'])} train: {p['train'].summary()}; "
          f"val: {p['val'].summary()}; hp={hp}" + (f"; resuming from {resume_from.name}" if resume_from else ""),
          file=sys.stderr, flush=True)
    if cfg.dry_run:  # plans only: nothing is written or deleted
        return {"plan": p, "resume_from": resume_from}
    storage.makedirs(run_dir)
    if not cfg.resume:  # --restart: Ray Train's checkpoint record goes with the checkpoints
        storage.remove_tree(layout.checkpoints_dir(run_dir))
        for f in (layout.metrics_path(run_dir), layout.latest_path(run_dir)):
            storage.remove(f)
        storage.remove_tree(layout.best_dir(run_dir))
    model_dir = str(resolve_model_dir(cfg.model))
    mcfg = malmm_config(cfg, hp)
    run_info = {"config": asdict(cfg), "hp": hp, "malmm": asdict(mcfg), "model_dir": model_dir,
                "train_samples": len(p["train"].samples), "val_samples": len(p["val"].samples),
                "skipped": p["train"].missing}
    storage.write_json(layout.run_info_path(run_dir), run_info)
    init_ray(cfg.address)
    tracker = ray.remote(num_cpus=0)(TrainProgress).remote()
    n_cpus = max(1, (os.cpu_count() or 1) // max(1, cfg.num_workers))
    # Ray Train restores from its own checkpoint record; a run folder checkpointed before it kept one
    # resumes from its latest.json instead
    legacy = resume_from if resume_from is not None and not storage.exists(
        layout.checkpoints_dir(run_dir) / layout.RAY_TRAIN_RECORD) else None
    loop_cfg = {"cfg": asdict(cfg), "hp": hp, "run_dir": str(run_dir), "model_dir": model_dir, "malmm": asdict(mcfg),
                "train_samples": p["train"].samples, "val_samples": p["val"].samples, "progress": tracker,
                "legacy_resume": str(legacy) if legacy else None, "stop_after_step": stop_after_step,
                "threads": threads or n_cpus}
    fs, ray_path = storage.arrow(run_dir)
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": 1, **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=RunConfig(storage_path=ray_path, storage_filesystem=fs if storage.is_uri(run_dir) else None,
                             name=CKPT_DIR,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_last if cfg.keep_last > 0 else None),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    total_steps = max(1, (len(p["train"].samples) // hp["batch_size"]) // cfg.grad_accum) * hp["epochs"]
    try:
        result, attempts = _fit_with_progress(trainer, tracker, total_steps, progress, progress_desc,
                                              progress_position)
    except Exception as e:
        _raise_if_corrupt(e, run_dir)
        raise
    finally:
        ray.kill(tracker)
    if result.error:
        _raise_if_corrupt(result.error, run_dir)
        raise result.error
    return {"run_dir": str(run_dir), "metrics": result.metrics, "checkpoint": str(latest_checkpoint(run_dir)),
            "attempts": attempts}


def _fit_with_progress(trainer, tracker, total_steps: int, progress: bool, desc: str = "train",
                       position: int | None = None):
    """Run ``trainer.fit()`` while a tqdm bar follows the rows rank 0 sends the progress actor."""
    import ray  # heavy: imported on use

    box: dict = {}

    def fit():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the driver thread below
            box["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    bar = tqdm(total=total_steps, unit="step", desc=desc, file=sys.stderr, disable=not progress, position=position)
    attempts: list[dict] = []
    while True:
        thread.join(0.5)
        try:
            st = ray.get(tracker.state.remote(), timeout=10)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            st = None
        if st is not None:
            for a in st["attempts"][len(attempts):]:  # each start of the worker group, a restart included
                print(f"train: {'restarted' if attempts else 'started'} {a['world']} worker(s) on {a['nodes']} "
                      f"node(s) ({a['device']}, {a['precision']})"
                      + (f", from the checkpoint of step {a['resumed_step']}" if a["resumed_step"] else ""),
                      file=sys.stderr, flush=True)
                attempts = attempts + [a]
            row = st["row"]
            if row is not None and row["global_step"] != bar.n:
                bar.n = row["global_step"]
                bar.set_postfix(epoch=row["epoch"], loss=f"{row['loss']:.3f}",
                                **({"restarts": len(attempts) - 1} if len(attempts) > 1 else {}))
                bar.refresh()
        if not thread.is_alive():
            break
    bar.close()
    if "error" in box:
        raise box["error"]
    return box["result"], attempts
