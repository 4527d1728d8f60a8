"""The demo chain end to end (small): synth → extract → train (MBC, no memory) → infer → report, then a
second run that reuses everything and only re-renders the leaderboard."""
from __future__ import annotations

import pandas as pd
import pytest


@pytest.mark.slow
def test_demo_quick_chain_and_rerun_reuses_everything(tmp_path, tiny_model, ray_local, monkeypatch):
    from pathlib import Path

    from stages import demo

    # a relative --out, as the CLI's default `demo-out`: Ray's workers do not run in the driver's folder
    monkeypatch.chdir(tmp_path.parent)
    out = Path(tmp_path.name)
    res = demo.run(out, quick=True, progress=False)
    md = (tmp_path / "reports" / "leaderboard.md").read_text()
    for label in ("MA-LMM (MBC memory)", "no memory (last frame)"):
        assert label in md
    for title in ("Long-term video classification", "Video question answering", "Video captioning",
                  "Action anticipation"):
        assert title in md
    m = pd.read_parquet(tmp_path / "reports" / "metrics.parquet")
    assert set(m.run) == {"MA-LMM (MBC memory)", "no memory (last frame)"}
    assert set(m.task) == {"first_color", "qa", "caption", "next_event"}
    scored = m[m.metric.isin(["top1", "cider"])]
    assert scored.ci_low.notna().all() and scored.ci_high.notna().all()  # every score has its interval
    assert res["stages"]["extract"]["processed_videos"] > 0
    assert all(res["stages"][v]["trained"] and res["stages"][v]["predicted"] > 0 for v in ("mbc", "none"))
    (a0, a1), (b0, b1) = res["stages"]["mbc"]["train_seconds"], res["stages"]["none"]["train_seconds"]
    assert a0 < b1 and b0 < a1  # on 2 CPUs the two variants train side by side

    again = demo.run(out, quick=True, progress=False)
    assert again["stages"]["extract"]["processed_videos"] == 0
    assert not any(again["stages"][v]["trained"] or again["stages"][v]["predicted"] for v in ("mbc", "none"))
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "reports" / "metrics.parquet"), m)
