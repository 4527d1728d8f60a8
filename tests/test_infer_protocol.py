"""`infer` keeps each benchmark's protocol and each checkpoint's recorded settings: frames T and memory
length L per (benchmark, task) for zero-shot and LAVIS imports, the trained T and L of our checkpoints,
``--num-frames`` / ``--memory-length`` / ``--memory`` overrides that warn when they contradict a
checkpoint, and predictions that record what was used."""
from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest
import torch

from pipeline.config import InferConfig


@pytest.fixture(scope="module")
def our_run(tiny_model, tmp_path_factory):
    """A training run folder as `train` leaves it: FIFO memory, L = 4, trained with T = 10 frames."""
    from pipeline.model.checkpoint import load_malmm, save_checkpoint
    from pipeline.model.modeling_malmm import MALMMConfig

    run = tmp_path_factory.mktemp("runs") / "fifo"
    model = load_malmm(tiny_model, MALMMConfig(memory="fifo", memory_length=4, max_frames=10))
    save_checkpoint(model, run / "checkpoints" / "step-00000002")
    (run / "latest.json").write_text(json.dumps({"checkpoint": "step-00000002"}))
    (run / "run.json").write_text(json.dumps({"hp": {"num_frames": 10, "memory_length": 4}}))
    return run


@pytest.fixture(scope="module")
def lavis_files(tiny_model, tmp_path_factory):
    """LAVIS-style .pth files: one that records memory_bank_length 6 and num_frames 9, one with L = 0, one bare."""
    from pipeline.model.checkpoint import load_malmm
    from tests.test_model_checkpoint import to_lavis_names

    out = tmp_path_factory.mktemp("lavis")
    lavis = to_lavis_names(load_malmm(tiny_model))
    torch.save({"model": lavis, "config": {"model": {"memory_bank_length": 6, "num_frames": 9}}}, out / "mbc.pth")
    torch.save({"model": lavis, "config": {"model": {"memory_bank_length": 0, "num_frames": 9}}}, out / "none.pth")
    torch.save({"model": lavis}, out / "bare.pth")
    from safetensors.torch import save_file  # a release file with MALMM / HF names, not LAVIS'
    save_file({k: v.contiguous() for k, v in load_malmm(tiny_model).trainable_state_dict().items()},
              str(out / "hf.safetensors"))
    return out


KEYS = [("synthetic", "first_color"), ("lvu", "genre"), ("msrvtt-qa", ""), ("msrvtt-cap", "")]


def _settings(checkpoint, trust_pickle=False, **overrides):
    from stages.infer import _resolve_model, protocol_settings

    cfg = InferConfig(checkpoint=str(checkpoint), **overrides)
    spec = _resolve_model(cfg, trust_pickle=trust_pickle)
    settings, malmm, notes = protocol_settings(spec, cfg, KEYS)
    return spec, {k: (v["num_frames"], v["memory_length"]) for k, v in settings.items()}, malmm, notes


def test_zero_shot_uses_each_benchmarks_protocol(tiny_model):
    """An HF InstructBLIP directory (and the default base model) run each benchmark at its protocol's T and L."""
    for checkpoint in (tiny_model, ""):
        spec, tl, malmm, notes = _settings(checkpoint)
        assert tl == {("synthetic", "first_color"): (12, 8), ("lvu", "genre"): (100, 20),
                      ("msrvtt-qa", ""): (20, 10), ("msrvtt-cap", ""): (80, 40)}
        assert malmm["memory"] == "mbc" and malmm["max_frames"] >= 100 and not notes
    # overrides apply to every benchmark; nothing is recorded, so nothing to warn about
    _, tl, malmm, notes = _settings(tiny_model, num_frames=16, memory_length=5)
    assert set(tl.values()) == {(16, 5)} and not notes


def test_our_checkpoint_keeps_its_trained_T_and_L(our_run):
    spec, tl, malmm, notes = _settings(our_run)
    assert spec.kind == "checkpoint" and (spec.num_frames, spec.memory_length, spec.memory) == (10, 4, "fifo")
    assert set(tl.values()) == {(10, 4)} and malmm["memory"] == "fifo" and not notes
    # the checkpoint's trainable.safetensors file names the same checkpoint
    spec2, tl2, _, _ = _settings(our_run / "checkpoints" / "step-00000002" / "trainable.safetensors")
    assert spec2.checkpoint == spec.checkpoint and tl2 == tl


def test_a_checkpoint_folder_copied_alone_keeps_its_trained_T(tiny_model, tmp_path):
    """`save_checkpoint` records T in malmm_config.json: no run.json is needed to run a checkpoint at its T."""
    from pipeline.model.checkpoint import load_malmm, save_checkpoint
    from pipeline.model.modeling_malmm import MALMMConfig

    model = load_malmm(tiny_model, MALMMConfig(memory="mbc", memory_length=3, max_frames=7))
    ckpt = save_checkpoint(model, tmp_path / "step-00000005", num_frames=7)
    assert json.loads((ckpt / "malmm_config.json").read_text())["num_frames"] == 7
    spec, tl, _, notes = _settings(ckpt)
    assert spec.kind == "checkpoint" and set(tl.values()) == {(7, 3)} and not notes


def test_an_override_that_contradicts_the_checkpoint_warns(our_run):
    _, tl, malmm, notes = _settings(our_run, memory_length=2, memory="mbc")  # `run` warns with these notes
    assert set(tl.values()) == {(10, 2)} and malmm["memory_length"] == 2 and malmm["memory"] == "mbc"
    assert len(notes) == 2
    assert any("--memory-length 2" in n and "memory_length (L) = 4" in n for n in notes)
    assert any("--memory mbc" in n and "fifo" in n for n in notes)
    # the same value as recorded is no contradiction
    assert not _settings(our_run, memory_length=4, num_frames=10)[3]
    # more frames than the trained frame position table: a clear error naming the option
    with pytest.raises(ValueError, match="--num-frames 10 or fewer"):
        _settings(our_run, num_frames=12)
    with pytest.raises(ValueError, match="memory must be one of"):
        _settings(our_run, memory="lru")


def test_lavis_pth_uses_its_saved_config_and_lavis_eps(lavis_files):
    with pytest.raises(PermissionError, match="trust_pickle"):
        _settings(lavis_files / "mbc.pth")
    spec, tl, malmm, notes = _settings(lavis_files / "mbc.pth", trust_pickle=True)
    assert spec.kind == "release" and set(tl.values()) == {(9, 6)} and not notes
    assert malmm["memory"] == "mbc" and malmm["ln_vision_eps"] == 1e-5
    _, tl, _, notes = _settings(lavis_files / "mbc.pth", trust_pickle=True, memory_length=3)
    assert set(tl.values()) == {(9, 3)} and len(notes) == 1 and "mbc.pth's saved config" in notes[0]
    # memory_bank_length 0: the reference's no-memory path
    _, _, malmm, _ = _settings(lavis_files / "none.pth", trust_pickle=True)
    assert malmm["memory"] == "per_frame"
    # nothing recorded: each benchmark's protocol, as zero-shot
    _, tl, malmm, _ = _settings(lavis_files / "bare.pth", trust_pickle=True)
    assert tl[("lvu", "genre")] == (100, 20) and tl[("synthetic", "first_color")] == (12, 8)
    assert malmm["ln_vision_eps"] == 1e-5
    # weights with other names keep the base model's epsilon
    spec, tl, malmm, _ = _settings(lavis_files / "hf.safetensors")
    assert spec.kind == "release" and malmm["ln_vision_eps"] is None and tl[("lvu", "genre")] == (100, 20)


def test_several_benchmarks_in_one_batch_run_each_at_its_own_T_and_L(tiny_model, features_small, test_samples):
    """predict_samples groups by protocol: each group's features have its T frames and the model its L."""
    from pipeline.model.checkpoint import load_malmm
    from stages.infer import _resolve_model, predict_samples, protocol_settings

    first = [s for s in test_samples if s.task == "first_color"][:2]
    qa = [replace(s, benchmark="msrvtt-qa", task="", sample_id=s.sample_id + "-qa") for s in first]
    cfg = InferConfig(checkpoint=str(tiny_model))
    settings, malmm, _ = protocol_settings(_resolve_model(cfg), cfg, [(s.benchmark, s.task) for s in first + qa])
    from pipeline.model.modeling_malmm import MALMMConfig
    model = load_malmm(tiny_model, MALMMConfig(**malmm))
    seen, generate = [], model.generate

    def spy(features, prompts, **kw):
        seen.append((features.shape[1], model.config.memory_length))
        return generate(features, prompts, **kw)

    model.generate = spy
    rows = predict_samples(model, first + qa, str(features_small), None, batch_size=8, device=torch.device("cpu"),
                           settings={k: {"num_frames": v["num_frames"], "memory_length": v["memory_length"]}
                                     for k, v in settings.items()})
    assert sorted(seen) == [(12, 8), (20, 10)]
    assert model.config.memory_length == malmm["memory_length"]  # restored after the group
    by = {r["benchmark"]: r for r in rows}
    assert by["synthetic"]["num_frames"] == 12 and json.loads(by["synthetic"]["memory"])["memory_length"] == 8
    assert by["msrvtt-qa"]["num_frames"] == 20 and json.loads(by["msrvtt-qa"]["memory"])["memory_length"] == 10


def test_infer_records_what_was_used(our_run, features_small, synth_small, ray_local, tmp_path):
    """End to end: an override of the checkpoint's L warns, and predictions / infer.json say what was used;
    a re-run with the checkpoint's own L is a different fingerprint (predicted again)."""
    from stages import infer

    cfg = InferConfig(checkpoint=str(our_run), features=str(features_small), manifest=str(synth_small / "manifest.csv"),
                      split="test", task="first_color", out=str(tmp_path / "out"), batch_size=8, memory_length=2)
    with pytest.warns(UserWarning, match="--memory-length 2 overrides"):
        res = infer.run(cfg, progress=False)
    assert res["predicted"] > 0 and res["errors"] == 0
    df = pd.read_parquet(tmp_path / "out" / "predictions" / "synthetic.parquet")
    assert set(df.num_frames) == {10}
    assert {json.loads(m)["memory_length"] for m in df.memory} == {2}
    assert {json.loads(m)["memory"] for m in df.memory} == {"fifo"}
    info = json.loads((tmp_path / "out" / "infer.json").read_text())
    assert info["protocols"]["synthetic/first_color"]["memory_length"] == 2
    assert info["protocols"]["synthetic/first_color"]["source"] == {"num_frames": "checkpoint",
                                                                    "memory_length": "--memory-length"}
    assert info["recorded"] == {"kind": "checkpoint", "num_frames": 10, "memory_length": 4, "memory": "fifo"}
    assert info["warnings"] and "--memory-length 2" in info["warnings"][0]
    again = infer.run(replace(cfg, memory_length=None, dry_run=True), progress=False)
    assert again["skipped"] == 0 and again["protocols"]["synthetic/first_color"]["memory_length"] == 4


@pytest.fixture(scope="module")
def test_samples(features_small, synth_small):
    from pipeline.data import FeatureStore, join_samples
    from pipeline.manifest import read_manifest
    rep = join_samples(read_manifest(synth_small / "manifest.csv"), FeatureStore(features_small), split="test",
                       benchmark="synthetic")
    return rep.samples

