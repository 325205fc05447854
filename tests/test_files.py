import hashlib

import pytest

from memlayers.files import sha256_file, write_atomic
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


def test_sha256_file(tmp_path):
    p = tmp_path / "x.bin"
    data = bytes(range(256)) * 20_000  # > one 4 MiB block
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_si():
    assert [si(12), si(1_600_000), si(2.21e13), si(950_000, "M")] == [
        "12", "1.60M", "22.10T", "0.95M"
    ]  # fmt: skip
