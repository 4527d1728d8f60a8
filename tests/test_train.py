"""`train`: loss falls, frozen LLM unchanged, exact resume, 2 workers = 1 worker, LVU windows, bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from pipeline.config import TrainConfig


@pytest.fixture(scope="module")
def no_dropout_model(tiny_model, tmp_path_factory):
    """The tiny default with Q-Former dropout off: dropout masks depend on how a batch is split over
    workers, so only a dropout-free model can show that 2 workers compute what 1 worker does."""
    d = tmp_path_factory.mktemp("tiny_nodrop") / "model"
    shutil.copytree(tiny_model, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["qformer_config"]["hidden_dropout_prob"] = 0.0
    cfg["qformer_config"]["attention_probs_dropout_prob"] = 0.0
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _cfg(features, synth, out, **kw) -> TrainConfig:
    base = dict(features=str(features), manifest=str(synth / "manifest.csv"), benchmark="synthetic", out=str(out),
                epochs=2, batch_size=8, lr=2e-3, warmup_steps=2, checkpoint_every=4, keep_last=2, validate=False,
                seed=7)
    base.update(kw)
    return TrainConfig(**base)


def _losses(run_dir) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "metrics.parquet").sort_values("global_step").reset_index(drop=True)


@pytest.fixture(scope="module")
def full_run(features_small, synth_small, ray_local, tiny_model, tmp_path_factory):
    from stages import train
    out = tmp_path_factory.mktemp("train") / "run"
    cfg = _cfg(features_small, synth_small, out, epochs=3)
    res = train.run(cfg, progress=False)
    return cfg, out, res


@pytest.mark.slow
def test_loss_falls_and_checkpoints(full_run):
    cfg, out, res = full_run
    log = _losses(out)
    steps_per_epoch = len(log) // 3
    assert steps_per_epoch >= 4 and list(log.global_step) == list(range(1, len(log) + 1))
    assert {"global_step", "epoch", "loss", "lr", "samples_per_s", "data_wait_frac"} <= set(log.columns)
    first, last = log.loss.iloc[:3].mean(), log.loss.iloc[-3:].mean()
    assert last < 0.8 * first, (first, last)
    assert ((log.data_wait_frac >= 0) & (log.data_wait_frac < 1)).all()
    # warm-up then cosine to zero
    assert log.lr.iloc[0] < log.lr.iloc[1] == pytest.approx(2e-3) and log.lr.iloc[-1] < 0.05 * 2e-3
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 2 and ckpts[-1] == f"step-{len(log):08d}"  # keep_last=2: Ray Train deleted the others
    assert (out / "checkpoints" / "checkpoint_manager_snapshot.json").is_file()  # Ray Train's record of them
    latest = json.loads((out / "latest.json").read_text())
    assert latest["checkpoint"] == ckpts[-1] and latest["epoch"] == 3
    # progress and metrics came through Ray: the result's reported metrics, no file polled by the driver
    assert res["metrics"]["global_step"] == len(log) and res["metrics"]["loss"] == pytest.approx(log.loss.iloc[-1])
    assert not (out / "progress.json").exists()
    assert [a["resumed_step"] for a in res["attempts"]] == [0] and res["attempts"][0]["precision"] == "fp32"
    files = {p.name for p in (out / "checkpoints" / ckpts[-1]).iterdir()}
    assert {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng_rank0.pt", "state.json",
            "metrics.parquet"} <= files


@pytest.mark.slow
def test_frozen_llm_unchanged(full_run, tiny_model):
    from safetensors.torch import load_file

    _, out, _ = full_run
    frozen = json.loads((out / "frozen_llm.json").read_text())
    assert frozen["unchanged"] and frozen["sha256_before"] == frozen["sha256_after"]
    assert frozen["trainable_llm_params"] == 0
    ckpt = out / "checkpoints" / json.loads((out / "latest.json").read_text())["checkpoint"]
    keys = load_file(str(ckpt / "trainable.safetensors")).keys()
    assert keys and not any(k.startswith("llm.") for k in keys)


@pytest.mark.slow
def test_rerun_of_finished_run_does_nothing(full_run, capsys):
    from stages import train
    cfg, out, _ = full_run
    before = (out / "metrics.parquet").read_bytes()
    res = train.run(cfg, progress=False)
    assert res.get("skipped") and (out / "metrics.parquet").read_bytes() == before


@pytest.mark.slow
def test_resume_under_other_settings_is_refused(full_run):
    from stages import train
    cfg, out, _ = full_run
    before = (out / "metrics.parquet").read_bytes()
    # fewer epochs would report the 3-epoch run as finished; another lr would mix two schedules
    for change, named in ((dict(epochs=2), "epochs 3 -> 2"), (dict(lr=1e-3), "lr 0.002 -> 0.001"),
                          (dict(memory="fifo"), "memory 'mbc' -> 'fifo'")):
        with pytest.raises(train.TrainInputError, match=named) as e:
            train.run(replace(cfg, **change), progress=False)
        assert str(out) in str(e.value) and "--restart" in str(e.value)
    assert (out / "metrics.parquet").read_bytes() == before  # nothing of the finished run is touched
    # the worker count and checkpointing may change between attempts
    assert train.run(replace(cfg, num_workers=2, checkpoint_every=0), progress=False).get("skipped")


@pytest.mark.slow
def test_kill_and_resume_reproduces_trajectory(features_small, synth_small, ray_local, tiny_model, tmp_path):
    from stages import train
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    train.run(_cfg(features_small, synth_small, ref_dir), progress=False)
    # crash right after step 6 (last checkpoint: step 4), then resume from the checkpoint
    train.run(_cfg(features_small, synth_small, cut_dir), progress=False, stop_after_step=6)
    assert json.loads((cut_dir / "latest.json").read_text())["global_step"] == 4
    train.run(_cfg(features_small, synth_small, cut_dir), progress=False)
    ref, cut = _losses(ref_dir), _losses(cut_dir)
    assert list(cut.global_step) == list(ref.global_step)  # no step lost or logged twice
    np.testing.assert_allclose(cut.loss, ref.loss, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(cut.lr, ref.lr, rtol=1e-9)
    assert json.loads((cut_dir / "frozen_llm.json").read_text())["unchanged"]


@pytest.mark.slow
def test_two_workers_match_one(features_small, synth_small, ray_local, no_dropout_model, tmp_path):
    from stages import train
    kw = dict(task="first_color", epochs=2, batch_size=4, model=str(no_dropout_model), checkpoint_every=0)
    train.run(_cfg(features_small, synth_small, tmp_path / "one", num_workers=1, **kw), progress=False)
    train.run(_cfg(features_small, synth_small, tmp_path / "two", num_workers=2, **kw), progress=False)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) >= 4
    # same samples per step, gradients averaged by DDP: the same trajectory up to float rounding
    np.testing.assert_allclose(two.loss, one.loss, rtol=2e-3, atol=1e-4)


def test_lr_schedule_and_param_groups(tiny_model):
    from pipeline.model.checkpoint import load_malmm
    from stages.train import lr_lambda, param_groups

    f = lr_lambda(warmup=4, total=20)
    assert [round(f(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0)
    model = load_malmm(tiny_model)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(".bias") or "norm" in names[id(p)].lower() or p.ndim < 2
               for p in no_decay["params"])
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_trainable


def test_lvu_window_picks_cached_frames():
    """LVU samples read their 100 s window out of the video's cached 1 fps frames."""
    from pipeline.data import Sample, SampleDataset, select_frames
    from pipeline.units import sample_policy, unit_clip, unit_key

    row = {"start_sec": 100.0, "end_sec": 200.0}
    assert unit_clip(row, "lvu", "director") == (None, None)  # the whole video is the unit
    assert str(sample_policy("lvu", "director", None)) == "fps:1"
    assert unit_key("v.mp4", None, None, "fps:1") == unit_key("v.mp4", *unit_clip(row, "lvu", "genre"), "fps:1")

    ts = np.arange(300, dtype=float) + 0.5  # 1 fps frame times of a 300 s video
    pos = select_frames(ts, 20, window=(100.0, 200.0))
    assert len(pos) == 20 and ts[pos].min() >= 100 and ts[pos].max() < 200
    assert np.all(np.diff(pos) > 0) and ts[pos][0] < 105 and ts[pos][-1] > 195  # spread over the window
    rng = np.random.default_rng(0)
    pos_train = select_frames(ts, 20, window=(100.0, 200.0), rng=rng)
    assert ts[pos_train].min() >= 100 and ts[pos_train].max() < 200 and np.all(np.diff(pos_train) > 0)
    assert not np.array_equal(pos_train, pos)  # TSN: random within segments for training

    class Store:  # the cached unit: feature value = frame time, so we can read back which frames were picked
        def load(self, key):
            return {"features": ts[:, None, None].repeat(2, 1).repeat(3, 2).astype(np.float16), "timestamps": ts}

    s = Sample("v_100", "lvu", "director", "test", "v.mp4", "k", "p", "a", ["a"], 100.0, 200.0)
    ds = SampleDataset([s], "unused", 20, train=False)
    ds._store = Store()
    feats = ds[0]["features"]
    assert feats.shape == (20, 2, 3)
    np.testing.assert_allclose(feats[:, 0, 0], ts[pos].astype(np.float16), rtol=1e-3)


def test_bad_input_messages(features_small, synth_small, tmp_path):
    from stages.train import TrainInputError, plan

    with pytest.raises(TrainInputError, match="no training samples for benchmark 'lvu'"):
        plan(_cfg(features_small, synth_small, tmp_path / "x", benchmark="lvu"))
    # a manifest whose videos were never extracted into these shards
    df = pd.read_csv(synth_small / "manifest.csv")
    df["video"] = df["video"].str.replace("videos/", "other/")
    other = tmp_path / "other.csv"
    df.to_csv(other, index=False)
    with pytest.raises(TrainInputError, match=r"none of the \d+ training samples.*not extracted: \d+"):
        plan(replace(_cfg(features_small, synth_small, tmp_path / "x"), manifest=str(other)))
    with pytest.raises(TrainInputError, match="index.parquet|no such|not found|features"):
        plan(_cfg(tmp_path / "nowhere", synth_small, tmp_path / "x"))


def test_dry_run_writes_and_deletes_nothing(features_small, synth_small, tmp_path):
    """--dry-run plans only: even with --restart it keeps the run folder's checkpoints, and takes no lock."""
    from stages import train

    out = tmp_path / "run"
    (out / "checkpoints" / "step-00000004").mkdir(parents=True)
    res = train.run(replace(_cfg(features_small, synth_small, out), resume=False, dry_run=True), progress=False)
    assert res["plan"]["train"].samples
    assert (out / "checkpoints" / "step-00000004").exists() and sorted(p.name for p in out.iterdir()) == ["checkpoints"]
    assert not train.run(replace(_cfg(features_small, synth_small, tmp_path / "new"), dry_run=True),
                         progress=False)["resume_from"] and not (tmp_path / "new").exists()


def _ray_train_worker_pids() -> list[int]:
    from ray.util.state import list_actors
    return [a.pid for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                                       detail=True)]


@pytest.mark.slow
def test_a_killed_worker_is_restarted_from_the_last_checkpoint(features_small, synth_small, ray_local, tiny_model,
                                                              tmp_path):
    """Ray Train's FailureConfig: a worker killed with SIGKILL mid-training restarts the group from the last
    reported checkpoint, and the run ends with the loss trajectory of a run that was never killed."""
    from stages import train
    kw = dict(num_workers=2, epochs=3, checkpoint_every=2, max_failures=2)
    ref = train.run(_cfg(features_small, synth_small, tmp_path / "ref", **kw), progress=False)
    cut_dir = tmp_path / "cut"
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(res=train.run(_cfg(features_small, synth_small, cut_dir, **kw),
                                                                      progress=False)))
    thread.start()
    killed, deadline = None, time.monotonic() + 300
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        latest = cut_dir / "latest.json"
        if latest.exists() and json.loads(latest.read_text())["global_step"] >= 4:  # a checkpoint to restart from
            pids = _ray_train_worker_pids()
            if len(pids) == 2:
                killed = max(pids)
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    thread.join(600)
    assert killed is not None, "the run ended before a worker could be killed"
    res, total = box["res"], len(_losses(tmp_path / "ref"))
    resumed = [a["resumed_step"] for a in res["attempts"]]
    # restarted once, from a checkpoint Ray Train had registered (every 2 steps), not from the start
    assert len(resumed) == 2 and resumed[0] == 0 and 0 < resumed[1] < total and resumed[1] % 2 == 0, resumed
    assert [a["resumed_step"] for a in ref["attempts"]] == [0]
    ref_log, cut_log = _losses(tmp_path / "ref"), _losses(cut_dir)
    assert list(cut_log.global_step) == list(ref_log.global_step)  # no step lost or logged twice
    np.testing.assert_allclose(cut_log.loss, ref_log.loss, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(cut_log.lr, ref_log.lr, rtol=1e-9)
    assert json.loads((cut_dir / "latest.json").read_text())["global_step"] == total


@pytest.mark.slow
def test_validation_is_spread_over_the_ranks(features_small, synth_small, ray_local, no_dropout_model, tmp_path):
    """Each rank predicts its share of the val split; the gathered scores equal one worker's."""
    from stages import train
    df = pd.read_csv(synth_small / "manifest.csv")
    df.loc[df.split == "test", "split"] = "val"  # the synthetic benchmark has no val split: its test rows serve
    manifest = tmp_path / "with_val.csv"
    df.to_csv(manifest, index=False)
    n_val = int(((df.split == "val") & (df.task == "first_color")).sum())
    # a vanishing learning rate: the weights stay as loaded, so 1 and 2 workers validate the same model
    kw = dict(task="first_color", epochs=1, batch_size=4, lr=1e-12, model=str(no_dropout_model), checkpoint_every=0,
              validate=True, manifest=str(manifest))
    rows = {}
    for n in (1, 2):
        cfg = replace(_cfg(features_small, synth_small, tmp_path / f"w{n}", num_workers=n), **kw)
        train.run(cfg, progress=False)
        rows[n] = _losses(tmp_path / f"w{n}").iloc[-1]
    assert list(rows[1].val_samples_per_rank) == [n_val]
    assert list(rows[2].val_samples_per_rank) == [(n_val + 1) // 2, n_val // 2]
    assert rows[2].val_top1 == pytest.approx(rows[1].val_top1) and rows[2].val_top5 == pytest.approx(rows[1].val_top5)
    best = json.loads((tmp_path / "w2" / "latest.json").read_text())["best"]
    assert best["score"] == pytest.approx(rows[2].val_top1)
    assert (tmp_path / "w2" / "best" / "trainable.safetensors").is_file()  # the best weights, for infer


@pytest.mark.slow
def test_precision_bf16_trains_and_fp16_needs_a_gpu(features_small, synth_small, ray_local, tiny_model, tmp_path):
    from stages import train
    cfg = _cfg(features_small, synth_small, tmp_path / "bf16", task="first_color", epochs=1, batch_size=4,
               checkpoint_every=0, precision="bf16")
    res = train.run(cfg, progress=False)
    assert res["attempts"][0]["precision"] == "bf16"
    assert np.isfinite(_losses(tmp_path / "bf16").loss).all()
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        train.run(replace(cfg, out=str(tmp_path / "fp16"), precision="fp16"), progress=False)
    assert not (tmp_path / "fp16").exists()
