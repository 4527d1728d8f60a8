import subprocess
import sys

import pytest

from pipeline.manifest import ManifestError, read_manifest, resolve_video

HEADER = "sample_id,benchmark,task,split,video,answer,start_sec,end_sec,question\n"


def write(tmp_path, body, header=HEADER):
    p = tmp_path / "m.csv"
    p.write_text(header + body)
    return p


def test_valid_manifest_reads(tmp_path):
    m = read_manifest(write(tmp_path, "a,lvu,genre,train,v/a.mp4,comedy,,,\nb,msrvtt-qa,,test,b.mp4,dog,1.5,4,what?\n"))
    assert len(m) == 2
    assert m.df.start_sec.isna().iloc[0] and m.df.start_sec.iloc[1] == 1.5
    assert m.references(m.df.iloc[0]) == ["comedy"]


def test_every_problem_reported_at_once_with_lines(tmp_path):
    body = ("a,lvu,genre,train,x.mp4,comedy,,,\n"
            "a,lvu,colour,dev,../x.mp4,,5,3,\n"
            "b,nope,,test,,x,abc,,\n")
    with pytest.raises(ManifestError) as e:
        read_manifest(write(tmp_path, body))
    probs = e.value.problems
    text = str(e.value)
    assert "line 3" in text and "duplicate sample_id 'a'" in text
    assert any("unknown task 'colour'" in p for p in probs)
    assert any("unknown split 'dev'" in p for p in probs)
    assert any("empty target" in p for p in probs)
    assert any("escapes the video root" in p for p in probs)
    assert any("end_sec" in p and "greater" in p for p in probs)
    assert any("unknown benchmark 'nope'" in p and p.startswith("line 4") for p in probs)
    assert any("start_sec must be a number" in p for p in probs)
    assert len(probs) == 9


def test_missing_columns(tmp_path):
    with pytest.raises(ManifestError, match="missing column.*answer"):
        read_manifest(write(tmp_path, "a,lvu,genre,train,x.mp4\n", header="sample_id,benchmark,task,split,video\n"))


def test_references_must_be_json_list(tmp_path):
    hdr = "sample_id,benchmark,task,split,video,answer,references\n"
    with pytest.raises(ManifestError, match="references"):
        read_manifest(write(tmp_path, 'a,msvd-cap,,test,x.mp4,a cat,"[""a cat"", 3]"\n', header=hdr))
    m = read_manifest(write(tmp_path, 'a,msvd-cap,,test,x.mp4,a cat,"[""a cat"", ""cat""]"\n', header=hdr))
    assert m.references(m.df.iloc[0]) == ["a cat", "cat"]


def test_absolute_and_uri_paths_allowed(tmp_path):
    m = read_manifest(write(tmp_path, "a,coin,,train,/data/x.mp4,y,,,\nb,coin,,train,s3://b/x.mp4,y,,,\n"))
    assert resolve_video("/data/x.mp4", "/root") == "/data/x.mp4"
    assert resolve_video("s3://b/x.mp4", "/root") == "s3://b/x.mp4"
    assert resolve_video("x.mp4", "s3://bucket/videos/") == "s3://bucket/videos/x.mp4"
    assert len(m) == 2


def test_cli_exits_2_and_runs_nothing(tmp_path):
    p = write(tmp_path, "a,lvu,genre,train,../x.mp4,comedy,,,\n")
    out = tmp_path / "feat"
    r = subprocess.run([sys.executable, "-m", "pipeline", "extract", "--manifest", str(p), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "escapes the video root" in r.stderr
    assert not out.exists()
