import hashlib

import pytest

from memlayers.files import atomic_dir, atomic_open, sha256_file, write_atomic
from memlayers.report import si


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "results.json"
    write_atomic(p, "old\n")
    write_atomic(p, "néw\n")
    assert p.read_text(encoding="utf-8") == "néw\n"
    write_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert [f.name for f in tmp_path.iterdir()] == ["results.json"]


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    p = tmp_path / "latest"
    write_atomic(p, "step_000001\n")

    def broken(*_):
        raise OSError("disk full")

    monkeypatch.setattr("memlayers.files.os.replace", broken)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(p, "step_000002\n")
    assert p.read_text() == "step_000001\n"
    assert [f.name for f in tmp_path.iterdir()] == ["latest"]


def test_atomic_open_streams_and_an_error_inside_leaves_the_old_file(tmp_path):
    p = tmp_path / "train.bin"
    with atomic_open(p) as f:
        for i in range(3):
            f.write(bytes([i]) * 10)
    assert p.read_bytes() == b"\x00" * 10 + b"\x01" * 10 + b"\x02" * 10
    with pytest.raises(RuntimeError, match="tokenizer died"), atomic_open(p, "w") as f:
        f.write("half")
        raise RuntimeError("tokenizer died")
    assert p.read_bytes()[:10] == b"\x00" * 10  # untouched, no temporary left
    assert [f.name for f in tmp_path.iterdir()] == ["train.bin"]
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb', got 'a'"), atomic_open(p, "a"):
        pass


def test_sha256_file(tmp_path):
    p = tmp_path / "x.bin"
    data = bytes(range(256)) * 20_000  # > one 4 MiB block
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_si():
    assert [si(12), si(1_600_000), si(2.21e13), si(950_000, "M")] == [
        "12", "1.60M", "22.10T", "0.95M"
    ]  # fmt: skip


def test_atomic_dir_appears_whole_replaces_whole_and_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "sub" / "out"
    with atomic_dir(out) as d:
        (d / "a.txt").write_text("one")
        assert not out.exists()  # nothing at out until the block ends
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    with pytest.raises(RuntimeError, match="midway"), atomic_dir(out) as d:
        (d / "b.txt").write_text("two")
        raise RuntimeError("midway")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]  # as it was
    with atomic_dir(out) as d:
        (d / "b.txt").write_text("two")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # replaced whole
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no .tmp- / .old- left
