"""`infer` and `report`: batched = one-at-a-time, resume without duplicates, errors per row,
checkpoint kinds, tidy metrics, leaderboard files, scores cached by predictions."""
from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest

from pipeline.config import InferConfig


def _infer_cfg(features, synth, out, checkpoint, **kw) -> InferConfig:
    return InferConfig(checkpoint=str(checkpoint), features=str(features), manifest=str(synth / "manifest.csv"),
                       split="test", out=str(out), batch_size=8, **kw)


@pytest.fixture(scope="module")
def test_samples(features_small, synth_small):
    from pipeline.data import FeatureStore, join_samples
    from pipeline.manifest import read_manifest
    rep = join_samples(read_manifest(synth_small / "manifest.csv"), FeatureStore(features_small), split="test",
                       benchmark="synthetic")
    assert len(rep.samples) >= 8
    return rep.samples


@pytest.fixture(scope="module")
def zero_shot(features_small, synth_small, tiny_model, ray_local, tmp_path_factory):
    """`infer` with the tiny InstructBLIP directory itself (zero-shot), through Ray Data."""
    from stages import infer
    out = tmp_path_factory.mktemp("infer") / "zero_shot"
    res = infer.run(_infer_cfg(features_small, synth_small, out, tiny_model, label="tiny zero-shot"), progress=False)
    return out, res


def test_batched_generation_equals_one_at_a_time(tiny_model, features_small, test_samples):
    import torch

    from pipeline.model.checkpoint import load_malmm
    from pipeline.model.modeling_malmm import MALMMConfig
    from stages.infer import predict_samples

    model = load_malmm(tiny_model, MALMMConfig(memory="mbc", memory_length=8, max_frames=12))
    one = predict_samples(model, test_samples, str(features_small), 12, batch_size=1, device=torch.device("cpu"))
    many = predict_samples(model, test_samples, str(features_small), 12, batch_size=8, device=torch.device("cpu"))
    assert [r["sample_id"] for r in one] == [r["sample_id"] for r in many]
    assert [r["beams"] for r in one] == [r["beams"] for r in many]
    assert all(len(r["beams"]) == (1 if r["task"] == "caption" else 5) for r in many)
    assert not any(r["error"] for r in many)


def test_error_on_one_sample_is_recorded_and_the_rest_predicted(tiny_model, features_small, test_samples):
    import torch

    from pipeline.model.checkpoint import load_malmm
    from stages.infer import predict_samples

    model = load_malmm(tiny_model)
    first_color = [s for s in test_samples if s.task == "first_color"]
    broken = replace(first_color[0], sample_id="broken", key="no-such-key")
    rows = predict_samples(model, first_color + [broken], str(features_small), 12, batch_size=8,
                           device=torch.device("cpu"))
    by_id = {r["sample_id"]: r for r in rows}
    assert by_id["broken"]["error"].startswith("KeyError") and by_id["broken"]["beams"] == []
    assert by_id["broken"]["prediction"] == ""
    assert all(not by_id[s.sample_id]["error"] and by_id[s.sample_id]["beams"] for s in first_color)


def test_infer_writes_predictions_and_resume_adds_no_duplicates(zero_shot, features_small, synth_small, tiny_model,
                                                                 test_samples):
    from stages import infer
    out, res = zero_shot
    assert res["predicted"] == len(test_samples) and res["errors"] == 0
    path = out / "predictions" / "synthetic.parquet"
    df = pd.read_parquet(path)
    assert len(df) == len(test_samples) and df.sample_id.is_unique
    assert {"beams", "prediction", "fingerprint", "checkpoint", "error", "generation"} <= set(df.columns)
    info = json.loads((out / "infer.json").read_text())
    assert info["config"]["label"] == "tiny zero-shot"
    # zero-shot: the synthetic protocol's T = 12 and L = 8 (not MALMMConfig's default L = 20), recorded per row
    assert set(df.num_frames) == {12} and {json.loads(m)["memory_length"] for m in df.memory} == {8}
    assert {v["memory_length"] for v in info["protocols"].values()} == {8}

    # re-run: everything already predicted under the same fingerprint
    again = infer.run(_infer_cfg(features_small, synth_small, out, tiny_model, label="tiny zero-shot"),
                      progress=False)
    assert again["predicted"] == 0 and again["skipped"] == len(test_samples)
    assert path.read_bytes() == path.read_bytes() and len(pd.read_parquet(path)) == len(df)

    # an interrupted run: drop some rows, re-run predicts exactly those, no duplicates, same beams
    from pipeline.shards import write_parquet
    import pyarrow as pa
    kept = df.iloc[: len(df) // 2]
    write_parquet(path, pa.Table.from_pandas(kept, schema=infer.PRED_SCHEMA, preserve_index=False))
    part = infer.run(_infer_cfg(features_small, synth_small, out, tiny_model, label="tiny zero-shot"),
                     progress=False)
    assert part["predicted"] == len(df) - len(kept)
    final = pd.read_parquet(path).sort_values("sample_id").reset_index(drop=True)
    ref = df.sort_values("sample_id").reset_index(drop=True)
    assert final.sample_id.is_unique and list(final.sample_id) == list(ref.sample_id)
    assert [list(b) for b in final.beams] == [list(b) for b in ref.beams]


def test_checkpoint_kinds_resolve(tiny_model, tmp_path):
    from pipeline.model.checkpoint import load_malmm, save_checkpoint
    from pipeline.model.modeling_malmm import MALMMConfig
    from stages.infer import _resolve_model

    # our training run folder → its latest checkpoint, the MALMM config and T it was trained with
    run = tmp_path / "run"
    model = load_malmm(tiny_model, MALMMConfig(memory="fifo", memory_length=4, max_frames=12))
    save_checkpoint(model, run / "checkpoints" / "step-00000003")
    (run / "latest.json").write_text(json.dumps({"checkpoint": "step-00000003"}))
    (run / "run.json").write_text(json.dumps({"hp": {"num_frames": 12}}))
    spec = _resolve_model(InferConfig(checkpoint=str(run)))
    assert spec.checkpoint.endswith("step-00000003") and spec.malmm["memory"] == "fifo"
    assert spec.malmm["memory_length"] == 4 and spec.memory_length == 4 and spec.kind == "checkpoint"
    assert spec.num_frames == 12 and spec.model_dir == str(tiny_model)
    # an HF InstructBLIP directory → zero-shot: nothing recorded, each protocol's T and L apply
    spec = _resolve_model(InferConfig(checkpoint=str(tiny_model)))
    assert spec.model_dir == str(tiny_model) and spec.checkpoint is None and spec.kind == "instructblip"
    assert spec.num_frames is None and spec.memory_length is None
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        _resolve_model(InferConfig(checkpoint=str(tmp_path / "nothing")))


def test_report_metrics_leaderboard_and_cache(zero_shot, tmp_path, monkeypatch):
    from stages import report
    out, _ = zero_shot
    rep_dir = tmp_path / "reports"
    res = report.run([str(out)], str(rep_dir), n_boot=50)
    m = pd.read_parquet(rep_dir / "metrics.parquet")
    assert list(m.columns) == ["run", "benchmark", "task", "metric", "value", "n", "ci_low", "ci_high",
                               "fingerprint"]
    assert set(m.run) == {"tiny zero-shot"}
    assert {"top1", "top5", "bleu4", "meteor", "rouge_l", "cider"} <= set(m.metric)
    acc = m[m.metric == "top1"]
    assert ((acc.value >= 0) & (acc.value <= 100) & (acc.ci_low <= acc.value) & (acc.value <= acc.ci_high)).all()
    md = (rep_dir / "leaderboard.md").read_text()
    html = (rep_dir / "leaderboard.html").read_text()
    for title in ("Long-term video classification", "Video question answering", "Video captioning",
                  "Action anticipation"):
        assert title in md and title in html
    assert "tiny zero-shot" in md and "scores_by_run.png" in md
    assert all(p.endswith(".png") or (rep_dir / p.split("/")[-1]).exists() for p in res["files"])
    assert (rep_dir / "scores_by_run.png").read_bytes()[:4] == b"\x89PNG"

    # unchanged predictions are not re-scored: a second report never calls the scorer
    import pipeline.metrics as metrics
    monkeypatch.setattr(metrics, "score", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-scored")))
    again = report.run([str(out)], str(rep_dir), n_boot=50)
    pd.testing.assert_frame_equal(again["metrics"].reset_index(drop=True), m.reset_index(drop=True))


def test_report_leaderboard_paper_rows_and_best_marked():
    from stages.report import render

    rows = []
    for run, top1 in (("A", 60.0), ("MA-LMM (MBC memory)", 70.0)):  # a run may carry the model's name
        for task in ("director", "genre"):
            rows.append({"run": run, "benchmark": "lvu", "task": task, "metric": "top1", "value": top1, "n": 10,
                         "ci_low": top1 - 5, "ci_high": top1 + 5, "fingerprint": "x"})
    md, page = render(pd.DataFrame(rows))
    line_b = next(line for line in md.splitlines() if line.startswith("| MA-LMM (MBC memory) |"))
    line_a = next(line for line in md.splitlines() if line.startswith("| A |"))
    assert "**70.0 [65.0, 75.0]**" in line_b and "**" not in line_a
    assert "MA-LMM (paper)" in md and "class='best'" in page
    paper = next(line for line in md.splitlines() if line.startswith("| MA-LMM (paper) |"))
    assert "**" not in paper and "74.6" in paper  # LVU director's published top-1, never marked best
