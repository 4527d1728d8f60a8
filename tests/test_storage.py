"""The storage layer and the layout (no Ray, no model)."""
import os
import stat

import pytest

from pipeline import layout, storage


def test_atomic_writes_leave_only_the_file(tmp_path):
    storage.write_json(tmp_path / "a" / "x.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "a" / "x.json").read_text() == '{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}\n'
    storage.write_json(tmp_path / "a" / "y.json", {"b": 1}, raw=True)
    assert storage.read_text(tmp_path / "a" / "y.json") == '{"b": 1}'
    storage.write_parquet(tmp_path / "a" / "t.parquet", [{"k": "v"}])
    assert storage.read_parquet(tmp_path / "a" / "t.parquet").k.tolist() == ["v"]
    assert sorted(p.name for p in storage.listdir(tmp_path / "a")) == ["t.parquet", "x.json", "y.json"]
    with pytest.raises(RuntimeError):
        with storage.atomic_path(tmp_path / "a" / "x.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert storage.read_json(tmp_path / "a" / "x.json") == {"a": [1, 2], "b": 1}  # the old file, whole
    assert len(os.listdir(tmp_path / "a")) == 3  # no temporary left behind


def test_modes_reads_and_namespace(tmp_path):
    storage.write_bytes(tmp_path / "private", b"1")
    storage.write_text(tmp_path / "plain", "2", mode=storage.UMASK)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "private").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == 0o666 & ~umask
    assert storage.read_range(tmp_path / "plain", 0, 5) == b"2"
    assert storage.read_json(tmp_path / "missing.json", {}, missing_ok=True) == {}
    storage.remove(tmp_path / "missing.json")  # missing is fine
    storage.makedirs(tmp_path / "d" / "e")
    storage.write_text(tmp_path / "d" / "e" / "f", "x")
    assert storage.walk_files(tmp_path / "d") == [tmp_path / "d" / "e" / "f"]
    storage.remove_tree(tmp_path / "d")
    assert not storage.exists(tmp_path / "d")


def test_layout_names(tmp_path):
    assert layout.shard_name(3) == "shard-000003.tar"
    assert layout.stats_name("shard-000003.tar") == "shard-000003.stats.json"
    assert layout.shard_stats_path(tmp_path, 3) == tmp_path / "shard-000003.stats.json"

    assert layout.checkpoint_dir(tmp_path, 12) == tmp_path / "checkpoints" / "step-00000012"
    assert layout.predictions_path(tmp_path, "lvu") == tmp_path / "predictions" / "lvu.parquet"
    assert layout.lock_path(tmp_path).name == "malmm.lock"


# ------------------------------------------------------------------ object stores (a real S3-API server)
def test_uri_paths_are_pure_paths():
    u = storage.path("s3://b/x//y/shard-000001.tar")
    assert isinstance(u, storage.URI) and str(u) == "s3://b/x/y/shard-000001.tar"
    assert u.name == "shard-000001.tar" and u.stem == "shard-000001" and u.suffix == ".tar"
    assert u.parent == storage.path("s3://b/x/y") and str(u.parent / "z.json") == "s3://b/x/y/z.json"
    assert os.fspath(u) == "s3://b/x/y/shard-000001.tar"
    assert str(layout.index_path(storage.path("s3://b/feats"))) == "s3://b/feats/index.parquet"
    assert storage.path("file:///tmp/a") == storage.path("/tmp/a")
    assert storage.path("gcs://b/k") == storage.path("gs://b/k")


@pytest.mark.parametrize("bad", ["hdfs://nn/x", "http://host/x.mp4", "ftp://h/f", "s3://"])
def test_unsupported_scheme_is_a_clear_error(bad):
    with pytest.raises(storage.StorageError) as e:
        storage.check(bad, "--out")
    assert "--out" in str(e.value)
    with pytest.raises(ValueError):  # StorageError is a ValueError: the CLI's one red line, exit 2
        storage.exists(bad)


def test_object_store_reads_writes_and_namespace(bucket, tmp_path):
    root = storage.path(bucket) / "run"
    storage.write_json(root / "a" / "x.json", {"b": 1, "a": [1, 2]})
    assert storage.read_text(root / "a" / "x.json") == '{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}\n'
    storage.write_parquet(root / "a" / "t.parquet", [{"k": "v"}])
    assert storage.read_parquet(root / "a" / "t.parquet").k.tolist() == ["v"]
    assert storage.read_table(root / "a" / "t.parquet").num_rows == 1
    storage.write_bytes(root / "b" / "blob", bytes(range(256)) * 10)
    assert storage.read_range(root / "b" / "blob", 250, 10) == bytes([250, 251, 252, 253, 254, 255, 0, 1, 2, 3])
    assert storage.read_range(root / "b" / "blob", 2555, 100) == bytes([251, 252, 253, 254, 255])
    assert storage.size(root / "b" / "blob") == 2560
    assert [p.name for p in storage.listdir(root / "a", "*.json")] == ["x.json"]
    assert [p.name for p in storage.listdir(root, dirs=True)] == ["a", "b"]
    assert storage.is_dir(root / "a") and storage.is_file(root / "a" / "x.json")
    assert not storage.exists(root / "a" / "nope") and storage.listdir(root / "nope") == []
    assert storage.read_json(root / "nope.json", {}, missing_ok=True) == {}
    with pytest.raises(FileNotFoundError, match="no such object"):
        storage.read_bytes(root / "nope.json")
    # a failed block leaves the old object whole, and no temporary object
    with pytest.raises(RuntimeError):
        with storage.atomic_path(root / "a" / "x.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert storage.read_json(root / "a" / "x.json") == {"a": [1, 2], "b": 1}
    assert [p.name for p in storage.walk_files(root)] == ["t.parquet", "x.json", "blob"]
    # local copies for libraries that need a file name, refreshed when the object changes
    os.environ["MALMM_CACHE"] = str(tmp_path / "cache")
    try:
        local = storage.local_path(root / "b" / "blob")
        assert local.read_bytes() == bytes(range(256)) * 10
        storage.write_bytes(root / "b" / "blob", b"new")
        assert storage.local_path(root / "b" / "blob").read_bytes() == b"new"
        d = storage.local_path(root / "a")
        assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == ["t.parquet", "x.json"]
    finally:
        del os.environ["MALMM_CACHE"]
    # folders across stores
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "w.bin").write_bytes(b"w")
    storage.copy_tree(tmp_path / "ck", root / "ck-tmp")
    storage.replace_dir(root / "ck-tmp", root / "ck")
    assert storage.read_bytes(root / "ck" / "w.bin") == b"w" and not storage.exists(root / "ck-tmp")
    storage.remove(root / "a" / "x.json")
    storage.remove_tree(root / "b")
    assert not storage.exists(root / "a" / "x.json") and not storage.exists(root / "b")
