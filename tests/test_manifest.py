import os
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
    r = subprocess.run([sys.executable, "-m", "stages", "extract", "--manifest", str(p), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "escapes the video root" in r.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------- the root rule

def _problems(path, *args, **kwargs) -> list[str]:
    with pytest.raises(ManifestError) as e:
        read_manifest(path, *args, **kwargs)
    return e.value.problems


def test_absolute_paths_and_file_uris_obey_the_video_root(tmp_path):
    root = tmp_path / "videos"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "elsewhere" / "x.mp4"
    body = (f"a,coin,,train,{root / 'sub' / 'ok.mp4'},y,,,\n"          # absolute, inside: fine
            f"b,coin,,train,{outside},y,,,\n"                          # absolute, outside
            f"c,coin,,train,file://{root / 'ok2.mp4'},y,,,\n"          # file:// inside: fine
            f"d,coin,,train,file://{outside},y,,,\n"                   # file:// outside
            f"e,coin,,train,{root}/../elsewhere/x.mp4,y,,,\n"          # absolute with .. out of the root
            f"f,coin,,train,file://localhost{outside},y,,,\n"          # file://localhost is local too
            f"g,coin,,train,file://server/share/x.mp4,y,,,\n"          # a remote host: not a local path
            "h,coin,,train,s3://bucket/x.mp4,y,,,\n"                   # object store: not confined (yet)
            "i,coin,,train,../x.mp4,y,,,\n")                           # relative, escaping (as before)
    probs = _problems(write(tmp_path, body), str(root))
    assert [p.split(":", 1)[0] for p in probs] == [f"line {n} (row {n - 1})" for n in (3, 5, 6, 7, 8, 10)]
    outside_msgs = [probs[i] for i in (0, 1, 2, 3)]
    assert all("is outside the video root" in p and "--allow-outside-root" in p and str(root) in p
               for p in outside_msgs), outside_msgs
    assert "names the host 'server'" in probs[4]
    assert "escapes the video root" in probs[5]
    # --allow-outside-root accepts every local path; a file:// URI with a host stays an error
    assert _problems(write(tmp_path, body), str(root), allow_outside_root=True) == [probs[4]]
    # file:// entries are opened as the plain path they name (percent-decoded)
    assert resolve_video("file:///data/a%20b.mp4", str(root)) == "/data/a b.mp4"


def test_symlinked_root_is_accepted_both_ways_and_symlinks_inside_are_not_followed(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    (tmp_path / "outside.mp4").write_bytes(b"x")
    (real / "alias.mp4").symlink_to(tmp_path / "outside.mp4")  # set up by whoever owns the root
    body = f"a,coin,,train,{link / 'v.mp4'},y,,,\nb,coin,,train,{real / 'v.mp4'},y,,,\nc,coin,,train,alias.mp4,y,,,\n"
    # the root given through a symlink: paths through the link and through its target are both inside
    assert len(read_manifest(write(tmp_path, body), str(link))) == 3
    # the root given as the real folder: a path through a symlink elsewhere is judged as written
    (prob,) = _problems(write(tmp_path, body), str(real))
    assert prob.startswith("line 2 (row 1): video path") and "outside the video root" in prob


def test_extract_refuses_paths_outside_the_root_unless_allowed(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    other = tmp_path / "other.mp4"
    other.write_bytes(b"not a video")
    (data / "in.mp4").write_bytes(b"not a video")
    m = data / "m.csv"
    m.write_text("sample_id,benchmark,task,split,video,answer\n"
                 f"a,coin,,train,in.mp4,y\nb,coin,,train,{other},y\nc,coin,,train,file://{other},y\n")
    out = tmp_path / "feat"
    cmd = [sys.executable, "-m", "stages", "extract", "--manifest", str(m), "--out", str(out), "--dry-run"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "line 3 (row 2)" in r.stderr and "line 4 (row 3)" in r.stderr and "outside the video root" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    r = subprocess.run(cmd + ["--allow-outside-root"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = tmp_path / "c.toml"  # also settable in a config file
    cfg.write_text("[extract]\nallow_outside_root = true\n")
    r = subprocess.run(cmd + ["--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not out.exists()  # a dry run writes nothing


# ----------------------------------------------------------------------------- missing videos

def test_missing_videos_are_listed_at_plan_time_by_a_dry_run(tmp_path):
    (tmp_path / "here.mp4").write_bytes(b"x")
    m = write(tmp_path, "a,coin,,train,here.mp4,y,,,\nb,coin,,train,gone1.mp4,y,,,\nc,coin,,test,here.mp4,z,,,\n"
                        "d,coin,,test,sub/gone2.mp4,z,,,\ne,coin,,val,gone1.mp4,z,,,\n")
    out = tmp_path / "feat"
    r = subprocess.run([sys.executable, "-m", "stages", "extract", "--manifest", str(m), "--out", str(out),
                        "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "2 of 3 video file(s) to process not found (3 manifest row(s))" in r.stderr
    for line in ("line 3 (row 2): video file not found: " + str(tmp_path / "gone1.mp4"),
                 "line 5 (row 4): video file not found: " + str(tmp_path / "sub" / "gone2.mp4"),
                 "line 6 (row 5): video file not found: " + str(tmp_path / "gone1.mp4")):
        assert line in r.stderr
    assert "recorded as failed (missing)" in r.stderr and not out.exists()


def test_every_video_missing_is_refused_before_anything_runs(tmp_path):
    m = write(tmp_path, "a,coin,,train,gone1.mp4,y,,,\nb,coin,,train,gone2.mp4,y,,,\n")
    out = tmp_path / "feat"
    r = subprocess.run([sys.executable, "-m", "stages", "extract", "--manifest", str(m), "--out", str(out)],
                       capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    assert r.returncode == 2, r.stderr
    assert "line 2 (row 1): video file not found" in r.stderr and "line 3 (row 2)" in r.stderr
    assert "none of the 2 video(s) to process exists" in r.stderr and "--video-root" in r.stderr
    assert not out.exists()


def test_check_files_reports_every_missing_file(tmp_path, bucket):
    (tmp_path / "ok.mp4").write_bytes(b"x")
    from pipeline import storage
    storage.write_bytes(f"{bucket}/v/yes.mp4", b"x")
    probs = _problems(write(tmp_path, "a,coin,,train,ok.mp4,y,,,\nb,coin,,train,no1.mp4,y,,,\n"
                                      f"c,coin,,train,{bucket}/v/no.mp4,y,,,\nd,coin,,train,no2.mp4,y,,,\n"
                                      f"e,coin,,train,{bucket}/v/yes.mp4,y,,,\n"),
                      str(tmp_path), check_files=True)
    assert probs == [f"line 3 (row 2): video file not found: {tmp_path / 'no1.mp4'}",
                     f"line 4 (row 3): video file not found: {bucket}/v/no.mp4",
                     f"line 5 (row 4): video file not found: {tmp_path / 'no2.mp4'}"]


def test_unsupported_video_scheme_is_a_validation_error(tmp_path):
    probs = _problems(write(tmp_path, "a,coin,,train,hdfs://nn/x.mp4,y,,,\n"), str(tmp_path))
    assert len(probs) == 1 and "line 2" in probs[0] and "unsupported storage scheme 'hdfs://'" in probs[0]


def test_manifest_in_an_object_store(tmp_path, bucket):
    from pipeline import storage
    storage.write_bytes(f"{bucket}/m.csv", write(tmp_path, "a,coin,,train,x.mp4,y,,,\n").read_bytes())
    m = read_manifest(f"{bucket}/m.csv", f"{bucket}/videos")
    assert resolve_video(m.df.video.iat[0], f"{bucket}/videos") == f"{bucket}/videos/x.mp4"


# ----------------------------------------------------------------------------- encodings

def test_non_utf8_manifest_names_the_lines_and_the_fix(tmp_path):
    p = tmp_path / "m.csv"
    p.write_bytes((HEADER + "a,coin,,train,Café.mp4,y,,,\nb,coin,,train,b.mp4,y,,,\nc,coin,,train,Müll.mp4,y,,,\n")
                  .encode("latin-1"))
    probs = _problems(p)
    offset = len((HEADER + "a,coin,,train,Caf").encode())
    assert probs[0] == f"line 2: not UTF-8 at byte offset {offset} (byte 0xe9 in 'a,coin,,train,Caf\ufffd.mp4,y,,,')"
    assert probs[1].startswith("line 4: not UTF-8 at byte offset")
    assert len(probs) == 3 and "iconv -f latin1 -t utf-8 m.csv > m.utf8.csv" in probs[2]
    r = subprocess.run([sys.executable, "-m", "stages", "extract", "--manifest", str(p), "--dry-run"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "line 2: not UTF-8" in r.stderr and "iconv" in r.stderr
    assert "Traceback" not in r.stderr


def test_utf16_and_utf8_with_bom(tmp_path):
    p = tmp_path / "m.csv"
    text = HEADER + "a,coin,,train,x.mp4,y,,,\n"
    p.write_bytes(text.encode("utf-16"))
    (prob,) = _problems(p)
    assert "UTF-16" in prob and "iconv -f utf-16 -t utf-8" in prob
    p.write_bytes(b"\xef\xbb\xbf" + text.encode())  # what spreadsheets write as 'CSV UTF-8'
    assert list(read_manifest(p).df.sample_id) == ["a"]


# ----------------------------------------------------------------------------- large manifests

def test_200000_rows_every_finding_with_its_line_in_line_order(tmp_path):
    """Column-wise validation finds exactly what the row-by-row rules say, at the right lines (timing:
    tests/perf/bench_manifest.py)."""
    n = 200_000
    root = tmp_path / "videos"
    rows = [f"s{i},lvu,genre,train,v{i % 5000}.mp4,comedy,,,\n" for i in range(n)]
    bad = {  # row -> (replacement, expected message after the line prefix)
        17: ("s3,lvu,genre,train,v17.mp4,comedy,,,\n", "duplicate sample_id 's3' (first at line 5 (row 4)); sample ids must be unique"),
        50_000: ("s50000,lvu,colour,train,v0.mp4,comedy,,,\n", "unknown task 'colour' for lvu; use one of"),
        99_999: ("s99999,lvu,genre,dev,v0.mp4,,,,\n", None),
        150_000: ("s150000,lvu,genre,train,/elsewhere/v.mp4,comedy,,,\n", "video path '/elsewhere/v.mp4' is outside the video root"),
        160_000: ("s160000,msrvtt-qa,,test,v0.mp4,dog,5,3,q\n", "end_sec (3.0) must be greater than start_sec (5.0)"),
        199_999: ("s199999,lvu,genre,train,../v.mp4,comedy,x,,\n", None),
    }
    for i, (row, msg) in bad.items():
        rows[i] = row
    p = tmp_path / "m.csv"
    p.write_text(HEADER + "".join(rows))
    probs = _problems(p, str(root))
    lines = [int(x.split(" ", 2)[1]) for x in probs]
    assert lines == sorted(lines)  # line order, whatever the check
    assert lines == [19, 50_002, 100_001, 100_001, 150_002, 160_002, 200_001, 200_001]
    for i, (_, msg) in bad.items():
        if msg:
            assert any(x.startswith(f"line {i + 2} (row {i + 1}): {msg}") for x in probs), (i, probs)
    assert [x.split(": ", 1)[1].split(" ")[1] for x in probs if x.startswith("line 100001 ")] == ["split", "target"]
    assert "escapes the video root" in probs[-2] and "start_sec must be a number" in probs[-1]
