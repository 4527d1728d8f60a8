"""Expected errors of every command: one red line on stderr (or the manifest's list of problems),
exit status 2, no traceback; an unexpected error keeps its traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stages.cli import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _own_ray_records(tmp_path, monkeypatch):
    monkeypatch.setenv("MALMM_RAY_RECORDS", str(tmp_path / "ray-records"))  # every command reaps first


def run(*args, color: bool = False):
    return CliRunner().invoke(app, [str(a) for a in args], color=color)


def one_red_line(r, *words):
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_synth_seconds_below_the_minimum(tmp_path):
    line = one_red_line(run("synth", "--out", tmp_path / "s", "--seconds", 8), "--seconds 8", "at least 12 s")
    assert line.startswith("error: ")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("args, words", [
    (("synth", "--out", "x", "--seconds", "abc"), ("Invalid value for '--seconds'", "synth --help")),
    (("extract", "--no-such-option"), ("No such option: --no-such-option",)),
    (("synth",), ("Missing option '--out'",)),
])
def test_usage_errors_are_one_line_too(args, words):
    one_red_line(run(*args), *words)


def test_messages_are_red(tmp_path):
    r = run("synth", "--out", tmp_path / "s", "--seconds", 8, color=True)
    assert r.exit_code == 2 and "\x1b[31m" in r.stderr


@pytest.mark.parametrize("args, words", [
    (("synth", "--out", "{tmp}/s", "--videos", 0, "--seconds", 12), ("videos must be at least 1",)),
    (("train", "--config", "{tmp}/nope.toml"), ("config file not found",)),
    (("extract", "--manifest", "m.csv", "--config", "{tmp}/c.ini"), ("must end in .toml, .yaml or .yml",)),
    (("infer", "--config", "{tmp}/bad.toml"), ("unknown option(s) in [infer]: batchsize",)),
    (("report", "{tmp}/no-run"), ("no predictions",)),
])
def test_stage_errors_are_one_line(tmp_path, args, words):
    (tmp_path / "c.ini").write_text("")
    (tmp_path / "bad.toml").write_text("[infer]\nbatchsize = 3\n")
    one_red_line(run(*[str(a).replace("{tmp}", str(tmp_path)) for a in args]), *words)


def test_extract_of_a_folder_holding_another_plan_exits_2(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"x")
    m = tmp_path / "m.csv"
    m.write_text("sample_id,benchmark,task,split,video,answer\na,coin,,train,v.mp4,y\n")
    out = tmp_path / "feat"
    out.mkdir()
    (out / "extract.json").write_text(json.dumps({"shard_size": 1}))
    one_red_line(run("extract", "--manifest", m, "--out", out, "--dry-run"), "holds shards of a different extraction")


def test_manifest_errors_list_every_problem(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("sample_id,benchmark,task,split,video,answer\na,nope,,train,v.mp4,y\nb,coin,,dev,v.mp4,\n")
    r = run("extract", "--manifest", m, "--dry-run")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "3 problem(s) in the manifest" in r.stderr and "line 2 (row 1)" in r.stderr and "line 3 (row 2)" in r.stderr


def test_malmm_traceback_shows_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MALMM_TRACEBACK", "1")
    r = run("synth", "--out", tmp_path / "s", "--videos", 0, "--seconds", 12)
    assert isinstance(r.exception, ValueError) and "videos must be at least 1" in str(r.exception)


def test_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch):
    from stages import report

    def bug(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(report, "run", bug)
    r = run("report", tmp_path)
    assert isinstance(r.exception, ZeroDivisionError)


def test_through_the_real_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "stages", "synth", "--out", str(tmp_path / "s"), "--seconds", "8"],
                       capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "MALMM_RAY_RECORDS": str(tmp_path / "r")})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --seconds 8 is too short: a video needs at least 12 s (6 events of 8 frames at 4 fps)"]


@pytest.mark.parametrize("args, words", [
    (["extract", "--manifest", "m.csv", "--out", "hdfs://nn/feats"], ["--out", "unsupported storage scheme 'hdfs://'"]),
    (["train", "--features", "ftp://h/feats"], ["--features", "unsupported storage scheme 'ftp://'"]),
    (["infer", "--checkpoint", "http://h/run", "--features", "f"], ["--checkpoint", "unsupported storage scheme"]),
    (["report", "azure://c/run"], ["--runs", "unsupported storage scheme 'azure://'"]),
])
def test_unsupported_storage_scheme_is_refused_at_validation(args, words):
    """Named by its option before anything runs: never a "missing file" later."""
    line = one_red_line(run(*args), *words)
    assert "s3://bucket/path" in line and "not found" not in line
