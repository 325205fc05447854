"""The datasets a run can name (``data.dataset``): one table, and each one's typed options.

:data:`DATASETS` maps a name to ``fn(data_args) -> (train_tokens, val_tokens, vocab_size,
tokenizer_or_None)``: 1-D integer arrays with documents separated by the tokenizer's EOS.
``data_args`` is the loader's ``DataArgs``; a dataset's knobs are its own section of it,
``data.<dataset>.<option>`` (e.g. ``data.bios.n_people=200``), a dataclass below, so
unknown options and wrong types are config errors. The content seed is the section's
``seed``, not ``data.seed``, which orders the loader's sequences: reshuffling batches must
not change who the bios people are. Nothing adds to the table at run time; a new dataset
is a row here and a section in ``DataArgs``.

================  =======================================================================
name              options: ``data.<name>.*``
================  =======================================================================
``synthetic``     :class:`SyntheticArgs`: records ``key v1 … vC``, each key with fixed
                  random values (a tiny fact store: C of C+1 tokens are predictable only
                  by memorising the key; the loss floor is ``ln(n_keys) / (C + 1)``)
``text``          none: a UTF-8 file, or every ``*.txt`` under a directory (``data.path``),
                  as bytes: token = byte value, 256 = end of document, vocabulary 257; the
                  last ``data.val_fraction`` of the stream is the validation split
``bios``          :class:`BiosArgs`: any :class:`~memlayers.data.bios.BiosConfig` field but
                  ``compact``, and ``tokenizer``; defaults are the main job's CPU size
``bios_compact``  the same, its own section (``BiosConfig`` defaults), ``compact=True``
``corpus``        :class:`CorpusArgs` (``memlayers data build``'s shards; ``facts_qa``: question-
                  answer pairs of a share of the real facts mixed into the training stream)
``facts``         :class:`FactsArgs`
================  =======================================================================
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memlayers.data.bios import BiosConfig, BiosData, build_bios
from memlayers.data.tokenizer import BPETokenizer, Tokenizer, load_tokenizer

Built = tuple[np.ndarray, np.ndarray, int, Tokenizer | None]


@dataclass
class SyntheticArgs:
    """``data.synthetic``."""

    vocab_size: int = 512  # keys in [0, V/2), values in [V/2, V)
    values_per_key: int = 3  # C
    n_tokens: int = 1_000_000
    seed: int = 1234


@dataclass
class BiosArgs(BiosConfig):
    """``data.bios`` / ``data.bios_compact``: the :class:`BiosConfig` of the run (its
    ``compact`` comes from the dataset's name) and the tokenizer."""

    # None or "word": the closed word vocabulary; a path; or hf:<model> (model.hf's own)
    tokenizer: str | None = None


@dataclass
class CorpusArgs:
    """``data.corpus``: shards of ``memlayers data build`` (cache folder: ``data.path``)."""

    sources: str | None = None  # comma-separated source names; None or "default": all
    tokenizer: str = "bpe-8192"  # "bpe-<vocab>" (trained on the corpus), a path or hf:<model>
    val_frac: float = 0.01
    # Questions and answers of real facts (memlayers.data.facts) in the training stream:
    # this share of the facts, picked by a hash (facts_qa_seed), each in every question
    # phrasing (``Q: ...\nA: ...``, a document each), repeated to facts_qa_share of the
    # training tokens; the validation split stays corpus text. 0: the corpus alone. The
    # facts not shown are what bench_retrofit asks about (facts.split_shown).
    facts_qa: float = 0.0
    facts_qa_share: float = 0.25
    facts_qa_seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.facts_qa < 1:  # 1 would leave no fact unseen to ask about
            raise ValueError(f"data.corpus.facts_qa must be in [0, 1), got {self.facts_qa}")
        if not 0 < self.facts_qa_share < 1:
            raise ValueError(
                f"data.corpus.facts_qa_share must be in (0, 1), got {self.facts_qa_share}"
            )
        if self.facts_qa_seed < 0:
            raise ValueError(f"data.corpus.facts_qa_seed must be >= 0, got {self.facts_qa_seed}")


@dataclass
class FactsArgs:
    """``data.facts`` (package cache folder: ``data.path``)."""

    seed: int = 0
    exposures: int = 20
    qa_train_frac: float = 0.5
    qa_exposures: int | None = None
    tokenizer: str = "bpe-4096"  # "bpe-<vocab>" (trained on the facts text), a path or hf:<model>

    def __post_init__(self) -> None:
        check_facts_options(self.exposures, self.qa_train_frac, self.qa_exposures, "data.facts.")


def check_facts_options(
    exposures: int, qa_train_frac: float, qa_exposures: int | None, prefix: str = ""
) -> None:
    """Raise a ValueError naming the first bad option of
    :func:`memlayers.data.facts.render_facts` (``prefix`` + its name)."""
    if exposures < 1:
        raise ValueError(f"{prefix}exposures must be >= 1, got {exposures}")
    # qa_train_frac >= 1 would leave no held-out facts to evaluate
    if not 0 <= qa_train_frac < 1:
        raise ValueError(f"{prefix}qa_train_frac must be in [0, 1), got {qa_train_frac}")
    if qa_exposures is not None and qa_exposures < 0:
        raise ValueError(f"{prefix}qa_exposures must be >= 0, got {qa_exposures}")


# ---- synthetic and text ------------------------------------------------------------------


def synthetic_dataset(data_args: Any) -> Built:
    """Records ``key v1 … vC``; see the module docstring."""
    opt: SyntheticArgs = data_args.synthetic
    V, C = opt.vocab_size, opt.values_per_key
    if V < 4 or C < 1:
        raise ValueError(
            f"synthetic needs vocab_size >= 4 and values_per_key >= 1, got data.synthetic={opt}"
        )
    n_keys = V // 2  # keys in [0, V/2), values in [V/2, V)
    rng = np.random.default_rng(opt.seed)
    facts = rng.integers(n_keys, V, size=(n_keys, C))  # [n_keys, C]

    def stream(n_records: int) -> np.ndarray:
        keys = rng.integers(0, n_keys, size=n_records)  # [R]
        return np.concatenate([keys[:, None], facts[keys]], axis=1).reshape(-1)  # [R*(C+1)]

    n_records = max(2, opt.n_tokens // (C + 1))
    n_val = int(n_records * data_args.val_fraction)
    train = stream(n_records - n_val).astype(np.uint16 if V <= 65536 else np.uint32)
    val = stream(n_val).astype(train.dtype)
    return train, val, V, None


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, ``eos_id = 256``. Not a :class:`Tokenizer` subclass:
    it has no ``save`` (a text run writes no tokenizer file), but the rest of the interface."""

    vocab_size, eos_id = 257, 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    encode_batch = Tokenizer.encode_batch  # every text, one by one

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def text_dataset(data_args: Any) -> Built:
    """A UTF-8 file or a directory of ``*.txt`` files as byte tokens; see the module docs."""
    if not data_args.path:
        raise ValueError("data.dataset=text needs data.path (a text file or a directory)")
    path = Path(data_args.path).expanduser()
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise ValueError(f"data.path={data_args.path!r}: no such file, or no *.txt under it")
    eos = np.array([ByteTokenizer.eos_id], dtype=np.uint16)
    parts = []
    for f in files:
        parts += [np.frombuffer(f.read_bytes(), dtype=np.uint8).astype(np.uint16), eos]
    tokens = np.concatenate(parts)
    n_val = int(len(tokens) * data_args.val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :], 257, ByteTokenizer()


# ---- bios, corpus, facts -----------------------------------------------------------------


HF_TOKENIZER = "hf:"  # "hf:<model.hf>": the pretrained model's own tokenizer


def tokenizer_path(spec: str) -> str:
    """A tokenizer option as the path of a file: ``hf:<model>`` names the tokenizer of a
    pretrained model (:func:`memlayers.hf.tokenizer_file`; the config sets it when
    ``model.hf`` is given), anything else is a path already."""
    if str(spec).startswith(HF_TOKENIZER):
        from memlayers.hf import tokenizer_file

        return str(tokenizer_file(spec[len(HF_TOKENIZER) :]))
    return spec


def _tokenizer_option(spec: str | None) -> Tokenizer | None:
    return None if spec in (None, "word") else load_tokenizer(tokenizer_path(spec))


def bios_from_args(data_args: Any, compact: bool = False) -> BiosData:
    """The :class:`BiosData` of a run's data config (eval rebuilds it: it is deterministic)."""
    name = "bios_compact" if compact else "bios"
    opt: BiosArgs = getattr(data_args, name)
    if opt.compact:
        raise ValueError(
            f"data.{name}.compact is set by the dataset's name: use data.dataset=bios_compact"
        )
    config = {f.name: getattr(opt, f.name) for f in dataclasses.fields(BiosConfig)}
    config["compact"] = compact
    return build_bios(tokenizer=_tokenizer_option(opt.tokenizer), **config)


def bios_dataset(data_args: Any) -> Built:
    d = bios_from_args(data_args)
    return d.tokens, d.val_tokens, d.tokenizer.vocab_size, d.tokenizer


def bios_compact_dataset(data_args: Any) -> Built:
    d = bios_from_args(data_args, compact=True)
    return d.tokens, d.val_tokens, d.tokenizer.vocab_size, d.tokenizer


def corpus_dataset(data_args: Any) -> Built:
    from memlayers.data.corpus import build

    opt: CorpusArgs = data_args.corpus
    tok = opt.tokenizer if opt.tokenizer.startswith("bpe-") else tokenizer_path(opt.tokenizer)
    shards = build(opt.sources, tok, data_args.path, opt.val_frac)
    train = shards.train
    if opt.facts_qa:
        from memlayers.data.facts import load_facts, qa_documents, split_shown

        facts = load_facts(data_args.path)
        shown, _ = split_shown(facts, opt.facts_qa, opt.facts_qa_seed)
        if not shown:
            raise ValueError(
                f"data.corpus.facts_qa={opt.facts_qa} (facts_qa_seed={opt.facts_qa_seed}) "
                f"picks none of the {len(facts)} facts: a larger share"
            )
        qa = qa_documents(shown)
        train = mix_documents(train, shards.tokenizer, qa, opt.facts_qa_share, opt.facts_qa_seed)
    return train, shards.val, shards.tokenizer.vocab_size, shards.tokenizer


def mix_documents(
    stream: np.ndarray, tok: Tokenizer, docs: list[str], share: float, seed: int = 0
) -> np.ndarray:
    """``stream`` followed by ``docs`` (each ended by EOS), reshuffled and repeated until
    they make ``share`` of the result's tokens (whole documents: a little over). The
    packed loader shuffles sequences, so an appended block is mixed in as well as any."""
    if not docs:
        raise ValueError("no documents to mix into the training stream")
    if not 0 < share < 1:
        raise ValueError(f"the documents' share of the stream must be in (0, 1), got {share}")
    encoded = encoded_documents(tok, docs, stream.dtype)
    # the block's tokens n: n / (len + n) >= share (less a rounding error: 0.9 / 0.1 > 9)
    target = math.ceil(share / (1 - share) * len(stream) - 1e-6)
    rng = np.random.default_rng([seed, 11])
    parts, n = [], 0
    while n < target:
        for i in rng.permutation(len(encoded)):
            parts.append(encoded[i])
            n += len(encoded[i])
            if n >= target:
                break
    return np.concatenate([stream, *parts])  # one copy, in the stream's dtype


def encoded_documents(tok: Tokenizer, docs: list[str], dtype) -> list[np.ndarray]:
    """Each of ``docs`` encoded and followed by EOS, as ``dtype``; an id that does not fit
    ``dtype`` is refused, not wrapped."""
    dtype = np.dtype(dtype)
    encoded = [np.asarray([*ids, tok.eos_id]) for ids in tok.encode_batch(docs)]
    top = max((int(e.max()) for e in encoded), default=0)
    if top > np.iinfo(dtype).max:
        raise ValueError(f"token id {top} does not fit the stream's {dtype}")
    return [e.astype(dtype) for e in encoded]


def encode_documents(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """Documents → one stream, each followed by EOS (uint16 when the vocabulary fits)."""
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    parts = encoded_documents(tok, docs, dtype)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def facts_from_args(data_args: Any):
    """The :class:`~memlayers.data.facts.FactsData` of a run's data config (its held-out
    QA for evaluation; deterministic)."""
    from memlayers.data.facts import build_facts

    opt: FactsArgs = data_args.facts
    return build_facts(data_args.path, opt.exposures, opt.seed, opt.qa_train_frac, opt.qa_exposures)


def facts_dataset(data_args: Any) -> Built:
    d = facts_from_args(data_args)
    spec = data_args.facts.tokenizer
    if str(spec).startswith("bpe-"):
        from memlayers.data.corpus.shards import bpe_vocab

        vocab = bpe_vocab(spec, "data.facts.tokenizer")
        tok: Tokenizer = BPETokenizer.train(d.train_docs, vocab_size=vocab)
    else:
        tok = load_tokenizer(tokenizer_path(spec))
    return (
        encode_documents(tok, d.train_docs),
        encode_documents(tok, d.val_docs),
        tok.vocab_size,
        tok,
    )


DATASETS = {
    "synthetic": synthetic_dataset,
    "text": text_dataset,
    "bios": bios_dataset,
    "bios_compact": bios_compact_dataset,
    "corpus": corpus_dataset,
    "facts": facts_dataset,
}
