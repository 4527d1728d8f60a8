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

    # re-run: everything already predicted under the same fingerprint, the predictions file untouched
    written = path.read_bytes()
    again = infer.run(_infer_cfg(features_small, synth_small, out, tiny_model, label="tiny zero-shot"),
                      progress=False)
    assert again["predicted"] == 0 and again["skipped"] == len(test_samples)
    assert path.read_bytes() == written and len(pd.read_parquet(path)) == len(df)

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
                               "answer_rule", "fingerprint"]
    assert set(m.run) == {"tiny zero-shot"} and set(m.answer_rule) == {"reference@1"}
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


# ----------------------------------------------------------------------------- report on hand-made predictions

def _hand_run(root, name, rows, label=None):
    """A run folder holding predictions written by hand (no model): rows of (benchmark, task, beams, answer)."""
    run = root / name
    (run / "predictions").mkdir(parents=True)
    recs = [{"sample_id": f"s{i:03d}", "benchmark": b, "task": t, "video": f"v{i:03d}", "beams": beams,
             "answer": ans, "references": [], "error": None} for i, (b, t, beams, ans) in enumerate(rows)]
    df = pd.DataFrame(recs)
    for b, g in df.groupby("benchmark"):
        g.to_parquet(run / "predictions" / f"{b}.parquet")
    if label:
        (run / "infer.json").write_text(json.dumps({"config": {"label": label}}))
    return run


MESSY = [("coin", "", ["Make sandwich.", "x"], "make sandwich"), ("coin", "", ["make sandwich"], "make sandwich"),
         ("msrvtt-qa", "", ["couch in it"], "Couch"), ("msrvtt-qa", "", ["yes"], "yes")]


def test_report_answer_rule_recorded_and_keys_the_cache(tmp_path, monkeypatch):
    """The reference rule by default; the lenient rule on request; the rule (and its version) keys the cache."""
    from dataclasses import replace as dc_replace

    import pipeline.metrics as metrics
    from stages import report

    run = _hand_run(tmp_path, "r", MESSY, label="messy")
    rep = tmp_path / "rep"
    m = report.run([str(run)], str(rep), n_boot=0, plots=False)["metrics"]
    top1 = m[m.metric == "top1"].set_index("benchmark").value
    assert (top1["coin"], top1["msrvtt-qa"]) == (50, 50) and set(m.answer_rule) == {"reference@1"}
    assert set(pd.read_parquet(rep / "metrics.parquet").answer_rule) == {"reference@1"}
    md, page = (rep / "leaderboard.md").read_text(), (rep / "leaderboard.html").read_text()
    assert "Answer rule: reference@1" in md and "Answer rule: reference@1" in page

    m = report.run([str(run)], str(rep), n_boot=0, plots=False, answer_rule="lenient")["metrics"]
    top1 = m[m.metric == "top1"].set_index("benchmark").value
    assert (top1["coin"], top1["msrvtt-qa"]) == (100, 100) and set(m.answer_rule) == {"lenient@1"}
    assert "Answer rule: lenient@1" in (rep / "leaderboard.md").read_text()

    # the same rule again comes from the cache; a new version of the rule re-scores
    calls = []
    real_score = metrics.score
    monkeypatch.setattr(metrics, "score", lambda *a, **k: calls.append(1) or real_score(*a, **k))
    report.run([str(run)], str(rep), n_boot=0, plots=False, answer_rule="lenient")
    assert calls == []
    monkeypatch.setitem(metrics.ANSWER_RULES, "lenient", dc_replace(metrics.ANSWER_RULES["lenient"], version=2))
    m = report.run([str(run)], str(rep), n_boot=0, plots=False, answer_rule="lenient")["metrics"]
    assert calls and set(m.answer_rule) == {"lenient@2"}
    with pytest.raises(KeyError, match="unknown answer rule 'loose'"):
        report.run([str(run)], str(rep), n_boot=0, plots=False, answer_rule="loose")


def test_report_refuses_two_runs_with_one_label(tmp_path):
    from stages import report

    a = _hand_run(tmp_path / "a", "test", MESSY)  # no label: both are called after their folder, "test"
    b = _hand_run(tmp_path / "b", "test", MESSY)
    with pytest.raises(report.DuplicateRunLabel, match=rf"{a} and {b} are both labelled 'test'.*--label"):
        report.run([str(a), str(b)], str(tmp_path / "rep"), n_boot=0, plots=False)
    c = _hand_run(tmp_path, "c", MESSY, label="test")
    with pytest.raises(report.DuplicateRunLabel, match=rf"{a} and {c} are both labelled 'test'"):
        report.run([str(a), str(c)], str(tmp_path / "rep"), n_boot=0, plots=False)
    assert not (tmp_path / "rep" / "leaderboard.md").exists()
    # the same folder twice is one run
    m = report.run([str(a), str(a)], str(tmp_path / "rep"), n_boot=0, plots=False)["metrics"]
    assert set(m.run) == {"test"} and not m.duplicated(["benchmark", "task", "metric"]).any()


def test_report_lvu_average_of_the_tasks_present_beside_the_paper_mean(tmp_path):
    """The LVU average covers the tasks present and says which; the paper row is the paper's mean over those."""
    from stages import report

    rows = [("lvu", "director", ["x"], "x"), ("lvu", "director", ["y"], "x"), ("lvu", "genre", ["drama"], "drama")]
    run = _hand_run(tmp_path, "r", rows, label="two tasks")
    m = report.run([str(run)], str(tmp_path / "rep"), n_boot=0, plots=False)["metrics"]
    avg = m[(m.task == "average:director+genre") & (m.metric == "top1")]
    assert len(avg) == 1 and avg.value.iloc[0] == pytest.approx((50 + 100) / 2)
    md = (tmp_path / "rep" / "leaderboard.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| run |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    i = cols.index("lvu / average of 2 tasks (director, genre) / top1")
    paper = next(line for line in md.splitlines() if line.startswith("| MA-LMM (paper) |"))
    assert [c.strip() for c in paper.strip("|").split("|")][i] == "67.8"  # (74.6 + 61.0) / 2
    assert "63.0" not in paper


def test_report_paper_lvu_average_of_all_seven_tasks():
    from stages.report import render

    rows = [{"run": "A", "benchmark": "lvu", "task": "average", "metric": "top1", "value": 60.0, "n": 70,
             "ci_low": 55.0, "ci_high": 65.0, "answer_rule": "reference@1", "fingerprint": "x"}]
    md, _ = render(pd.DataFrame(rows))
    assert "lvu / average of 7 tasks / top1" in md
    paper = next(line for line in md.splitlines() if line.startswith("| MA-LMM (paper) |"))
    assert "63.0" in paper  # mean of 58.2 / 44.8 / 80.3 / 74.6 / 61.0 / 70.4 / 51.9


def test_report_ek100_subset_recalls_reach_the_leaderboard(tmp_path):
    from stages import report

    run = tmp_path / "ek"
    (run / "predictions").mkdir(parents=True)
    pd.DataFrame([{"sample_id": f"n{i}_verb", "benchmark": "ek100", "task": "verb", "video": f"P0{i}_01",
                   "beams": beams, "answer": gold, "references": [], "error": None, "unseen_participant": i == 0,
                   "tail_class": gold == "open"}
                  for i, (beams, gold) in enumerate([(["take"], "take"), (["put"], "take"), (["open"], "open")])]
                 ).to_parquet(run / "predictions" / "ek100.parquet")
    m = report.run([str(run)], str(tmp_path / "rep"), n_boot=0, plots=False)["metrics"].set_index("metric")
    assert (m.loc["top5_recall", "value"], m.loc["top5_recall_unseen", "value"], m.loc["top5_recall_tail", "value"]) \
        == (pytest.approx(75), 100, 100)
    assert (m.loc["top5_recall_unseen", "n"], m.loc["top5_recall_tail", "n"]) == (1, 1)
    md = (tmp_path / "rep" / "leaderboard.md").read_text()
    assert "ek100 / verb / top5_recall_unseen" in md and "ek100 / verb / top5_recall_tail" in md


def test_cli_report_answer_rule_option(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    run = _hand_run(tmp_path, "r", MESSY, label="messy")
    res = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "rep"), "--n-boot", "0",
                                   "--answer-rule", "lenient"])
    assert res.exit_code == 0, res.output
    assert set(pd.read_parquet(tmp_path / "rep" / "metrics.parquet").answer_rule) == {"lenient@1"}
    res = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "rep"), "--answer-rule", "loose"])
    assert res.exit_code == 2 and "unknown answer rule 'loose'" in res.output
    twin = _hand_run(tmp_path / "x", "r", MESSY, label="messy")
    res = CliRunner().invoke(app, ["report", str(run), str(twin), "--out", str(tmp_path / "rep2")])
    assert res.exit_code == 2 and "both labelled 'messy'" in res.output


def test_infer_rows_carry_the_ek100_subsets_from_the_manifest(tmp_path, monkeypatch):
    """`infer` copies the manifest's unseen_participant / tail_class cells into the predictions (null: unknown)."""
    from pipeline.benchmarks import protocol
    from pipeline.data import Sample
    from stages import infer

    monkeypatch.setattr(infer, "collate", lambda items: {"features": None, "prompts": [""] * len(items)})
    monkeypatch.setattr(infer, "generate_batch", lambda model, f, prompts, proto, device: ([["take"]] * len(prompts),
                                                                                           [1] * len(prompts)))
    extras = [{"unseen_participant": "true", "tail_class": "false"}, {"unseen_participant": "", "tail_class": "true"},
              {}]
    samples = [Sample(f"n{i}_verb", "ek100", "verb", "val", f"P01_0{i}", f"k{i}", "p", "take", ["take"], extra=e)
               for i, e in enumerate(extras)]
    from types import SimpleNamespace

    from pipeline.model.modeling_malmm import MALMMConfig
    model = SimpleNamespace(config=MALMMConfig())  # generate_batch is replaced: only the config is read
    rows = infer._predict_chunk(model, {0: {}, 1: {}, 2: {}}, samples, [0, 1, 2], protocol("ek100", "verb"), 32, "cpu",
                                "ck", ["f0", "f1", "f2"])
    assert [(r["unseen_participant"], r["tail_class"]) for r in rows] == [(True, False), (None, True), (None, None)]
    infer._write_predictions(tmp_path, rows)
    back = pd.read_parquet(tmp_path / "predictions" / "ek100.parquet")
    assert back.unseen_participant.tolist() == [True, None, None] and back.tail_class.tolist() == [False, True, None]
