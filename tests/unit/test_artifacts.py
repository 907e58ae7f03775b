from __future__ import annotations

import errno

import pytest

from compresskit.engine.artifacts import (
    DiskFullError,
    atomic_path,
    inside,
    read_json,
    write_json,
    write_text,
)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_disk_full_is_reported_plainly(tmp_path):
    target = tmp_path / "b.bin"
    with pytest.raises(DiskFullError) as e, atomic_path(target):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert "no space left" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_json_roundtrip_and_unreadable(tmp_path):
    write_json(tmp_path / "m.json", {"a": 1})
    assert read_json(tmp_path / "m.json") == {"a": 1}
    (tmp_path / "bad.json").write_text('{"a": ')
    assert read_json(tmp_path / "bad.json") is None
    assert read_json(tmp_path / "none.json") is None


def test_paths_cannot_escape_the_run_folder(tmp_path):
    assert inside(tmp_path, "artifacts/x.onnx") == tmp_path.resolve() / "artifacts" / "x.onnx"
    for bad in ("../x", "/etc/passwd", "artifacts/../../x"):
        with pytest.raises(ValueError):
            inside(tmp_path, bad)
