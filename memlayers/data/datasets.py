"""The datasets a run can name (``data.dataset`` in the config), for the packed loader.

Each builder is ``fn(data_args) -> (train_tokens, val_tokens, vocab_size, tokenizer)``:
1-D integer arrays with documents separated by ``tokenizer.eos_id``. ``data_args`` is the
loader's ``DataArgs`` (``dataset``, ``path``: a cache folder or None for the default, a
free-form ``options`` dict); unknown options are errors. The content seed is
``options["seed"]`` (default 0), not ``data_args.seed``, which orders the loader's
sequences: reshuffling batches must not change who the bios people are.

================  =======================================================================
name              options (defaults)
================  =======================================================================
``bios``          any :class:`~memlayers.data.bios.BiosConfig` field (n_people=1000,
                  exposures=100, seed=0, ...), ``tokenizer`` (None: the closed word
                  vocabulary, or the path of a saved tokenizer)
``bios_compact``  the same, with ``compact=True``
``corpus``        ``sources`` ("default" = all), ``tokenizer`` ("bpe-8192" or a path),
                  ``val_frac`` (0.01)
``facts``         ``seed`` (0), ``exposures`` (20), ``qa_train_frac`` (0.5),
                  ``qa_exposures``, ``tokenizer`` ("bpe-4096", trained on the facts text,
                  or a path)
================  =======================================================================
"""

from __future__ import annotations

from typing import Any

import numpy as np

from memlayers.data.bios import BiosConfig, BiosData, build_bios
from memlayers.data.tokenizer import BPETokenizer, Tokenizer, load_tokenizer

Built = tuple[np.ndarray, np.ndarray, int, Tokenizer | None]


def _options(data_args: Any, allowed: set[str]) -> dict:
    opts = dict(getattr(data_args, "options", None) or {})
    unknown = sorted(set(opts) - allowed)
    if unknown:
        name = getattr(data_args, "dataset", None) or getattr(data_args, "name", "?")
        raise ValueError(
            f"unknown options {unknown} for dataset {name!r}; known: {sorted(allowed)}"
        )
    return opts


def _tokenizer_option(spec: str | None) -> Tokenizer | None:
    return None if spec in (None, "word") else load_tokenizer(spec)


def bios_from_args(data_args: Any, compact: bool = False) -> BiosData:
    """The :class:`BiosData` of a run's data config (eval rebuilds it: it is deterministic)."""
    allowed = set(BiosConfig.__dataclass_fields__) - {"compact"} | {"tokenizer"}
    opts = _options(data_args, allowed)
    tok = _tokenizer_option(opts.pop("tokenizer", None))
    return build_bios(compact=compact, tokenizer=tok, **opts)


def bios_dataset(data_args: Any) -> Built:
    d = bios_from_args(data_args)
    return d.tokens, d.val_tokens, d.tokenizer.vocab_size, d.tokenizer


def bios_compact_dataset(data_args: Any) -> Built:
    d = bios_from_args(data_args, compact=True)
    return d.tokens, d.val_tokens, d.tokenizer.vocab_size, d.tokenizer


def corpus_dataset(data_args: Any) -> Built:
    from memlayers.data.corpus import build

    opts = _options(data_args, {"sources", "tokenizer", "val_frac"})
    shards = build(
        opts.get("sources"),
        opts.get("tokenizer", "bpe-8192"),
        getattr(data_args, "path", None),
        opts.get("val_frac", 0.01),
    )
    return shards.train, shards.val, shards.tokenizer.vocab_size, shards.tokenizer


def encode_documents(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """Documents → one stream, each followed by EOS (uint16 when the vocabulary fits)."""
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    parts = [np.asarray([*ids, tok.eos_id], dtype=dtype) for ids in tok.encode_batch(docs)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def facts_dataset(data_args: Any) -> Built:
    from memlayers.data.facts import build_facts

    opts = _options(data_args, {"exposures", "qa_train_frac", "qa_exposures", "tokenizer", "seed"})
    spec = opts.pop("tokenizer", "bpe-4096")
    d = build_facts(getattr(data_args, "path", None), **opts)
    if str(spec).startswith("bpe-"):
        tok: Tokenizer = BPETokenizer.train(d.train_docs, vocab_size=int(spec[4:]))
    else:
        tok = load_tokenizer(spec)
    return (
        encode_documents(tok, d.train_docs),
        encode_documents(tok, d.val_docs),
        tok.vocab_size,
        tok,
    )


DATASETS = {
    "bios": bios_dataset,
    "bios_compact": bios_compact_dataset,
    "corpus": corpus_dataset,
    "facts": facts_dataset,
}


def register_datasets() -> None:
    """Register every dataset above with the packed loader's registry."""
    from memlayers.data.loader import register_dataset

    for name, fn in DATASETS.items():
        register_dataset(name, fn)
