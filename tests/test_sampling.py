import numpy as np
import pytest

from pipeline.data import select_frames
from pipeline.sampling import SamplingPolicy, frame_indices, lvu_window_starts, segment_indices


def test_policy_parse_roundtrip():
    assert str(SamplingPolicy.parse("uniform:100")) == "uniform:100"
    assert str(SamplingPolicy.parse(" fps:0.5 ")) == "fps:0.5"
    with pytest.raises(ValueError, match="expected e.g."):
        SamplingPolicy.parse("every:3")
    with pytest.raises(ValueError):
        SamplingPolicy.parse("uniform:2.5")


def test_uniform_takes_segment_middles():
    idx, ts = frame_indices(SamplingPolicy("uniform", 4), num_frames=100, fps=10.0)
    assert idx.tolist() == [12, 37, 62, 87]
    assert np.allclose(ts, idx / 10.0)


def test_uniform_repeats_on_short_clips():
    idx, _ = frame_indices(SamplingPolicy("uniform", 5), num_frames=3, fps=10.0)
    assert idx.tolist() == [0, 0, 1, 2, 2]


def test_uniform_within_clip_bounds():
    idx, ts = frame_indices(SamplingPolicy("uniform", 10), num_frames=300, fps=30.0, start_sec=2.0, end_sec=4.0)
    assert idx.min() >= 60 and idx.max() < 120
    assert (ts >= 2.0).all() and (ts < 4.0).all()


def test_fps_sampling():
    idx, ts = frame_indices(SamplingPolicy("fps", 1), num_frames=95, fps=10.0)
    assert idx.tolist() == list(range(0, 95, 10))
    idx, _ = frame_indices(SamplingPolicy("fps", 1), num_frames=100, fps=10.0, start_sec=2.5, end_sec=6)
    assert idx.tolist() == [25, 35, 45, 55]
    idx, _ = frame_indices(SamplingPolicy("fps", 2), num_frames=300, fps=29.97)
    assert len(idx) == 21 and idx[1] == 15


def test_lvu_windows():
    assert lvu_window_starts(150) == [0, 20, 40]
    assert lvu_window_starts(140) == [0, 20, 40]
    assert lvu_window_starts(139.9) == [0, 20]
    assert lvu_window_starts(100) == [0]
    assert lvu_window_starts(42) == [0]


def test_segment_indices_train_random_eval_middle():
    assert segment_indices(10, 5).tolist() == [1, 3, 5, 7, 9]
    rng = np.random.default_rng(0)
    r = segment_indices(100, 10, rng)
    assert len(r) == 10 and all(10 * i <= v < 10 * (i + 1) for i, v in enumerate(r))
    assert r.tolist() != segment_indices(100, 10).tolist()  # random within each segment, not the middles


def test_lvu_window_cut_from_cached_frames():
    ts = np.arange(0, 180, 1.0)  # a 3-minute movie cached at 1 fps
    pos = select_frames(ts, 100, window=(40.0, 140.0))
    assert ts[pos].min() >= 40 and ts[pos].max() < 140 and len(pos) == 100
    assert (np.diff(ts[pos]) == 1).all()  # exactly the window's 100 frames
    pos = select_frames(ts, 20, window=(40.0, 140.0))
    assert len(pos) == 20 and ts[pos][0] == 42 and ts[pos][-1] == 137
    rng = np.random.default_rng(1)
    pos = select_frames(ts, 20, window=(40.0, 140.0), rng=rng)
    assert len(pos) == 20 and ((ts[pos] >= 40) & (ts[pos] < 140)).all()
