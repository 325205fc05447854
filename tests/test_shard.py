"""The ``--shard I/N`` option of tests/conftest.py: the shards partition the suite."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import parse_shard

ROOT = Path(__file__).resolve().parent.parent


def collected(*args: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/test_shard.py", "tests/test_files.py", *args],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout  # fmt: skip
    return [line for line in out.splitlines() if "::" in line]


def test_shards_partition_the_collection():
    everything = collected()
    parts = [collected("--shard", f"{i}/2") for i in (1, 2)]
    assert all(parts), "a shard of a suite of more than 2 tests came back empty"
    assert sorted(sum(parts, [])) == sorted(everything)
    assert len(set(sum(parts, []))) == len(everything)  # no test in two shards


@pytest.mark.parametrize("bad", ["2", "0/2", "3/2", "a/b", "1/0"])
def test_bad_shard_is_refused_naming_the_value(bad):
    with pytest.raises(ValueError, match="--shard"):
        parse_shard(bad)
