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
    with pytest.raises(NotImplementedError):
        storage.read_bytes("s3://bucket/key")


def test_layout_names(tmp_path):
    assert layout.shard_name(3) == "shard-000003.tar"
    assert layout.stats_name("shard-000003.tar") == "shard-000003.stats.json"
    assert layout.shard_stats_path(tmp_path, 3) == tmp_path / "shard-000003.stats.json"
    assert layout.staged_ledger(tmp_path, "v") == tmp_path / "_staging" / "v.json"
    assert layout.checkpoint_dir(tmp_path, 12) == tmp_path / "checkpoints" / "step-00000012"
    assert layout.predictions_path(tmp_path, "lvu") == tmp_path / "predictions" / "lvu.parquet"
    assert layout.lock_path(tmp_path).name == "malmm.lock"
