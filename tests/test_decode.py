"""pipeline.decode: strategies agree, engines agree, indices are clamped, broken files end as typed
errors (never a hang), and the watchdog kills a hung decoder."""
from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pytest

from pipeline import decode as D
from pipeline.decode import DecodeError, Fault, plan_segments, probe, read_frames
from pipeline.decode.watchdog import LAST_WORKER
from tests.videos import frame_index_of, make_fault_corpus, make_video

pytestmark = pytest.mark.timeout(120)

SIZE = (96, 128)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("decode_videos")
    return {
        "short_gop": make_video(d / "short.mp4", 150, 30, SIZE, gop=10, seed=1),
        "long_gop": make_video(d / "long.mp4", 240, 25, SIZE, gop=200, seed=2),
        "no_bframes": make_video(d / "nob.mp4", 90, 30, SIZE, gop=30, seed=3, bframes=0),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_fault_corpus(tmp_path_factory.mktemp("faults"))


def codes(frames: np.ndarray) -> list[int]:
    return [frame_index_of(f) for f in frames]


# ----------------------------------------------------------------------------- helpers

def test_make_video_is_deterministic_and_self_describing(tmp_path):
    a = make_video(tmp_path / "a.mp4", 40, 30, SIZE, gop=12, seed=7)
    b = make_video(tmp_path / "b.mp4", 40, 30, SIZE, gop=12, seed=7)
    assert a.read_bytes() == b.read_bytes()
    got = read_frames(a, range(40))
    assert codes(got.frames) == list(range(40))


# ----------------------------------------------------------------------------- probing

def test_probe(videos):
    info = probe(videos["short_gop"])
    assert (info.num_frames, info.declared_num_frames) == (150, 150)
    assert info.fps == pytest.approx(30.0)
    assert info.duration_sec == pytest.approx(5.0, abs=1e-6)
    assert (info.height, info.width) == SIZE
    assert info.keyframes == list(range(0, 150, 10))
    assert info.decoder == "pyav" and info.codec == "h264" and info.notes == []
    long = probe(videos["long_gop"])
    assert long.keyframes == [0, 200] and long.fps == pytest.approx(25.0)
    dec = probe(videos["short_gop"], decoder="decord")
    assert dec.decoder == "decord"
    assert (dec.num_frames, dec.width, dec.height, dec.keyframes) == (150, SIZE[1], SIZE[0], info.keyframes)


# ----------------------------------------------------------------------------- planning

def test_plan_segments():
    kf = [0, 10, 20, 30, 40]
    assert plan_segments([1, 5, 25, 45], kf, "sequential") == [(None, [1, 5, 25, 45])]
    # seek: every wanted frame in a later GOP than the decoder position is reached by a seek
    assert plan_segments([1, 5, 11, 25, 45], kf, "seek") == [(None, [1, 5]), (10, [11]), (20, [25]), (40, [45])]
    # auto: the next GOP starts 2 frames after the position: keep decoding forward; far ones: seek
    assert plan_segments([8, 12, 25, 45], kf, "auto", seek_gap=4) == [(None, [8, 12]), (20, [25]), (40, [45])]
    assert plan_segments([0, 40], kf, "auto") == [(None, [0]), (40, [40])]
    assert plan_segments([2], [0, 100], "auto") == [(None, [2])]


# ----------------------------------------------------------------------------- strategies

@pytest.mark.parametrize("name", ["short_gop", "long_gop", "no_bframes"])
@pytest.mark.parametrize("size", [None, (48, 64)])
def test_strategies_return_identical_frames(videos, name, size):
    path = videos[name]
    n = probe(path).num_frames
    rng = np.random.default_rng(0)
    indices = [n - 1, 0, 7, 7, 3, n // 2, n // 2 + 1, 2 * n // 3] + rng.integers(0, n, 12).tolist()
    results = {s: read_frames(path, indices, size=size, strategy=s) for s in D.STRATEGIES}
    ref = results["auto"]
    exp_shape = (len(indices),) + (size or SIZE) + (3,)
    assert ref.frames.shape == exp_shape and ref.frames.dtype == np.uint8
    assert ref.indices.tolist() == indices  # order of the request, repeats kept
    assert codes(ref.frames) == indices
    for s, r in results.items():
        assert r.indices.tolist() == indices, s
        assert np.array_equal(r.frames, ref.frames), f"strategy {s} differs from auto"
        assert np.allclose(r.timestamps_sec, ref.timestamps_sec, atol=1e-4), s
    assert results["get_batch"].decoder == "decord" and results["get_batch"].strategy == "get_batch"
    assert ref.decoder == "pyav"
    # each distinct frame is converted once
    assert ref.stats["converted"] == ref.stats["distinct"] == len(set(indices))
    assert np.allclose(ref.timestamps_sec, np.asarray(indices) / probe(path).fps, atol=1e-6)


def test_pyav_and_decord_engines_are_bit_identical(videos):
    path = videos["short_gop"]
    idx = [0, 3, 11, 57, 149]
    for size in (None, (64, 64), (50, 200)):
        a = read_frames(path, idx, size=size, decoder="pyav")
        b = read_frames(path, idx, size=size, decoder="decord")
        assert (a.decoder, b.decoder) == ("pyav", "decord")
        assert np.array_equal(a.frames, b.frames), size
    c = read_frames(path, idx, decoder="decord", strategy="sequential")
    assert (c.decoder, c.strategy) == ("decord", "sequential")
    assert np.array_equal(c.frames, read_frames(path, idx).frames)


def test_corpus_covers_every_failure_reason(corpus):
    reasons = {r for _, r in corpus.values()}
    assert set(D.REASONS) - reasons == {"timeout", "decode_error"}  # those two come from the watchdog tests


def test_raw_h264_without_timestamps(tmp_path):
    """An elementary stream has no timestamps: frames are counted in output order, never sought."""
    path = make_video(tmp_path / "raw.h264", 60, 30, SIZE, gop=20, container="h264")
    assert probe(path).num_frames == 60
    for s in ("auto", "seek", "sequential"):
        r = read_frames(path, [59, 0, 25, 25, 40], strategy=s)
        assert r.strategy == "sequential" and codes(r.frames) == [59, 0, 25, 25, 40]


def test_more_decoder_threads_same_frames(videos):
    path = videos["long_gop"]
    idx = [5, 100, 199, 200, 239]
    a = read_frames(path, idx, num_threads=1)
    b = read_frames(path, idx, num_threads=2)
    assert np.array_equal(a.frames, b.frames)


@pytest.mark.parametrize("cache", [False, True])
def test_healthy_video_needs_no_recovery_pass(videos, cache):
    """Every frame comes from the planned pass (the careful fallback pass is for damaged files)."""
    for name in ("short_gop", "long_gop"):
        for s in ("auto", "seek", "sequential"):
            for timeout in (None, 60):
                r = read_frames(videos[name], [0, 1, 50, 120, 121], strategy=s, timeout_s=timeout, index_cache=cache)
                assert "recovery_pass" not in r.stats, (name, s, r.stats)
                assert codes(r.frames) == [0, 1, 50, 120, 121]


def test_auto_skips_whole_gops_and_sequential_does_not(videos):
    path = videos["short_gop"]
    idx = [5, 75, 145]
    auto = read_frames(path, idx, strategy="auto")
    seq = read_frames(path, idx, strategy="sequential")
    assert auto.stats["seeks"] == 2 and seq.stats["seeks"] == 0
    assert auto.stats["decoded"] < seq.stats["decoded"] / 3


def test_rotated_video(tmp_path):
    path = make_video(tmp_path / "rot.mp4", 20, 30, SIZE, gop=10, rotation=90)
    info = probe(path)
    assert (info.height, info.width) == (SIZE[1], SIZE[0])
    a = read_frames(path, [0, 13], decoder="pyav")
    b = read_frames(path, [0, 13], decoder="decord")
    assert a.frames.shape == (2, SIZE[1], SIZE[0], 3)
    assert np.array_equal(a.frames, b.frames)
    assert codes(np.rot90(a.frames, -1, axes=(1, 2))) == [0, 13]
    c = read_frames(path, [0, 13], size=(40, 30), decoder="pyav")
    d = read_frames(path, [0, 13], size=(40, 30), decoder="decord")
    assert np.array_equal(c.frames, d.frames)


# ----------------------------------------------------------------------------- indices

def test_indices_are_clamped_to_frames_that_exist(videos):
    path = videos["no_bframes"]
    r = read_frames(path, [-5, 0, 89, 90, 1000])
    assert r.indices.tolist() == [0, 0, 89, 89, 89]
    assert r.requested.tolist() == [-5, 0, 89, 90, 1000]
    assert codes(r.frames) == [0, 0, 89, 89, 89]


def test_empty_request(videos):
    r = read_frames(videos["no_bframes"], [], size=(32, 32))
    assert r.frames.shape == (0, 32, 32, 3) and r.indices.tolist() == []


def test_bad_arguments(videos):
    with pytest.raises(ValueError):
        read_frames(videos["no_bframes"], [0], strategy="fastest")
    with pytest.raises(ValueError):
        read_frames(videos["no_bframes"], [0], size=(0, 10))


def test_in_process_mode_matches_watchdog(videos):
    path = videos["long_gop"]
    idx = [3, 150, 220]
    a = read_frames(path, idx, timeout_s=None)
    b = read_frames(path, idx)
    assert np.array_equal(a.frames, b.frames) and a.indices.tolist() == b.indices.tolist()


# ----------------------------------------------------------------------------- broken files

@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["missing", "empty", "text_as_mp4", "audio_only", "image_as_mp4", "truncated",
                                  "zero_frames", "lying_header", "lying_header_empty", "mkv_as_mp4"])
def test_fault_corpus(corpus, name):
    path, expected = corpus[name]
    t0 = time.monotonic()
    if expected != "ok":
        with pytest.raises(DecodeError) as ei:
            probe(path, timeout_s=30)
        assert ei.value.reason == expected
        assert str(path) in str(ei.value)
        with pytest.raises(DecodeError) as ei:
            read_frames(path, [0, 5], timeout_s=30)
        assert ei.value.reason == expected
    else:
        info = probe(path, timeout_s=30)
        want = list(range(0, info.declared_num_frames, 7)) + [info.declared_num_frames - 1]
        r = read_frames(path, want, timeout_s=30)
        assert r.indices.max() <= info.num_frames - 1
        assert codes(r.frames) == r.indices.tolist()
        if name == "lying_header":
            assert 0 < info.num_frames < info.declared_num_frames == 90
            assert any("mismatch" in n for n in info.notes)
            assert r.indices.tolist() == [min(i, info.num_frames - 1) for i in want]
            for s in ("seek", "sequential", "get_batch"):
                other = read_frames(path, want, timeout_s=30, strategy=s)
                assert np.array_equal(other.frames, r.frames), s
    assert time.monotonic() - t0 < 30


def test_corrupt_payload_is_replaced_by_nearest_decodable_frame(tmp_path):
    """mdat bytes overwritten from 60 %: the header is intact, later frames do not decode."""
    from tests.videos import _mp4_boxes

    src = make_video(tmp_path / "ok.mp4", 120, 30, SIZE, gop=30, seed=4)
    data = bytearray(src.read_bytes())
    _, off, size = next(b for b in _mp4_boxes(bytes(data)) if b[0] == "mdat")
    a = off + 8 + int((size - 8) * 0.6)
    data[a:off + size] = np.random.default_rng(0).integers(0, 256, off + size - a, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    want = [0, 30, 60, 100, 119]
    results = [read_frames(bad, want, strategy=s) for s in ("auto", "seek", "sequential")]
    for r in results:
        assert codes(r.frames) == r.indices.tolist()  # what was used is what is shown
        assert r.indices[0] == 0 and r.indices[-1] < 119
        assert r.info.num_frames <= r.indices[-1] + 1
        assert np.array_equal(r.frames, results[0].frames)


# ----------------------------------------------------------------------------- fallback and watchdog

def test_pyav_fallback_when_decord_fails(videos):
    fault = Fault("fail", "decord")
    r = read_frames(videos["short_gop"], [4, 44], decoder="decord", fault=fault)
    assert r.decoder == "pyav" and codes(r.frames) == [4, 44]
    r = read_frames(videos["short_gop"], [4, 44], strategy="get_batch", fault=fault)
    assert r.decoder == "pyav" and codes(r.frames) == [4, 44]


def test_decord_fallback_when_pyav_fails(videos):
    fault = Fault("fail", "pyav")
    r = read_frames(videos["short_gop"], [4, 44], size=(48, 64), fault=fault)
    assert r.decoder == "decord" and codes(r.frames) == [4, 44]
    assert probe(videos["short_gop"], fault=fault).decoder == "decord"


def test_both_engines_failing_is_a_decode_error(videos):
    with pytest.raises(DecodeError) as ei:
        read_frames(videos["short_gop"], [1], fault=Fault("fail", "any"))
    assert ei.value.reason == "decode_error" and "simulated" in str(ei.value)


def test_crashed_worker_is_replaced_and_the_other_engine_used(videos):
    r = read_frames(videos["short_gop"], [9], timeout_s=60, fault=Fault("crash", "pyav"))
    assert r.decoder == "decord" and codes(r.frames) == [9]
    with pytest.raises(DecodeError) as ei:
        read_frames(videos["short_gop"], [9], timeout_s=60, fault=Fault("crash", "any"))
    assert ei.value.reason == "decode_error" and "signal" in str(ei.value)
    assert codes(read_frames(videos["short_gop"], [9]).frames) == [9]


@pytest.mark.timeout(60)
def test_watchdog_kills_a_hung_decode(videos):
    read_frames(videos["short_gop"], [0])  # warm a worker
    hang = Fault("hang", seconds=600)
    t0 = time.monotonic()
    with pytest.raises(DecodeError) as ei:
        read_frames(videos["short_gop"], [1, 2], timeout_s=2, fault=hang)
    elapsed = time.monotonic() - t0
    assert ei.value.reason == "timeout"
    assert 1.9 <= elapsed < 10
    pid = LAST_WORKER["pid"]
    assert not _alive(pid), "the hung worker must be killed"
    with pytest.raises(DecodeError) as ei:
        probe(videos["short_gop"], timeout_s=1, fault=hang)
    assert ei.value.reason == "timeout"
    assert codes(read_frames(videos["short_gop"], [1, 2], timeout_s=30).frames) == [1, 2]


def test_hang_in_one_engine_only_still_times_out(videos):
    """A timeout is final: the budget covers the whole call, fallbacks included."""
    with pytest.raises(DecodeError) as ei:
        read_frames(videos["short_gop"], [1], timeout_s=1.5, fault=Fault("hang", "pyav", seconds=600))
    assert ei.value.reason == "timeout"


def test_workers_are_reused(videos):
    read_frames(videos["short_gop"], [0])
    first = LAST_WORKER["pid"]
    read_frames(videos["short_gop"], [1])
    assert LAST_WORKER["pid"] == first


def test_decode_error_pickles():
    e = pickle.loads(pickle.dumps(DecodeError("truncated", "/x.mp4", "cut")))
    assert e.reason == "truncated" and "/x.mp4" in str(e)
    assert DecodeError("nonsense", "/x").reason == "decode_error"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_watchdog_inside_a_ray_worker(videos, ray_local):
    import ray

    @ray.remote
    def task(path, fault):
        from pipeline.decode import DecodeError, read_frames
        try:
            r = read_frames(path, [3, 30], timeout_s=3, fault=fault)
            return r.indices.tolist(), r.frames.shape
        except DecodeError as e:
            return e.reason

    assert ray.get(task.remote(str(videos["short_gop"]), None)) == ([3, 30], (2,) + SIZE + (3,))
    assert ray.get(task.remote(str(videos["short_gop"]), Fault("hang", seconds=600))) == "timeout"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_object_store_video_decodes_like_the_local_file(tmp_path, bucket, monkeypatch):
    """An s3:// video is fetched into the object cache, decoded bit-identically, and released after."""
    from pipeline import storage
    monkeypatch.setenv("MALMM_CACHE", str(tmp_path / "cache"))
    local = make_video(tmp_path / "v.mp4", 40, fps=10)
    uri = f"{bucket}/videos/v.mp4"
    storage.upload(local, uri)
    assert probe(uri, timeout_s=None) == probe(local, timeout_s=None)
    a, b = read_frames(uri, [0, 7, 39], timeout_s=60), read_frames(local, [0, 7, 39], timeout_s=60)
    assert np.array_equal(a.frames, b.frames)
    assert any((tmp_path / "cache").rglob("v.mp4"))
    D.release(uri)
    assert not any((tmp_path / "cache").rglob("v.mp4"))
    with pytest.raises(DecodeError) as e:
        probe(f"{bucket}/videos/gone.mp4", timeout_s=None)
    assert e.value.reason == "missing"
