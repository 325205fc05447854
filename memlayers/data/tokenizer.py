"""Tokenizers behind one small interface: encode / decode / vocab_size / eos_id / save / load.

Three kinds:

- :class:`BPETokenizer`: a byte-level BPE trained with the `tokenizers` library on the
  project's corpus. Byte-level means every string round-trips exactly. A 16k vocabulary
  on 76 MB of text trained in ~12 s on 2 CPU cores (measured when the data pipeline was
  planned; those notes are not in the repository); CPU-sized models want 4k–8k (a 32k
  vocabulary halves CPU throughput and dominates a tiny model's parameters).
- :class:`WordTokenizer`: a closed word-level vocabulary for synthetic data (bios), so
  every attribute value is a known, short token sequence and nothing is ever split in a
  data-dependent way. Pieces are GPT-2-style words with their leading space (``" Paris"``
  and ``"Paris"`` are different tokens), so decode(encode(s)) == s for any text made of
  known pieces.
- :class:`SentencePieceTokenizer`: a `.model` file, e.g. the 32k Llama-2-style model that
  ships in the `mistral-common` wheel (:func:`memlayers.data.corpus.fetch_sentencepiece`);
  needs the optional ``sentencepiece`` package.

:func:`load_tokenizer` reloads any of them from the file written by ``save``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from memlayers.files import write_atomic

EOS = "<|endoftext|>"
EOS_NAMES = (EOS, "</s>", "<|end_of_text|>")

# GPT-2-like pieces: an optional single leading space, then a run of word characters or one
# punctuation character; runs of spaces and any other whitespace character are their own
# pieces, so the pieces of a string always concatenate back to it.
_WORD_PIECE = re.compile(r" ?\w+| ?[^\w\s]| +(?! ?\S)|\s")


class Tokenizer:
    """The interface every tokenizer here implements."""

    kind: str = "base"

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eos_id(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class BPETokenizer(Tokenizer):
    """Byte-level BPE (a `tokenizers.Tokenizer`) with one special token, ``<|endoftext|>``."""

    kind = "bpe"

    def __init__(self, tok) -> None:  # tok: tokenizers.Tokenizer
        # The first of these in the vocabulary ends a document: ours and GPT-2's / SmolLM2's
        # (<|endoftext|>), Llama 2's (</s>), Llama 3's (<|end_of_text|>): a pretrained
        # model's tokenizer (memlayers.hf.tokenizer_file) keeps its own separator.
        eos = next((i for t in EOS_NAMES if (i := tok.token_to_id(t)) is not None), None)
        if eos is None:
            raise ValueError(
                f"a BPETokenizer needs one of the tokens {EOS_NAMES} in its vocabulary"
            )
        self.tok = tok
        self._eos = int(eos)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 8192,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> BPETokenizer:
        """Train on an iterable of documents. ``vocab_size`` counts the 256 byte tokens and
        the EOS token, so it must be at least 257 (+ merges)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 258:
            raise ValueError(f"vocab_size must be >= 258 (256 bytes + EOS + 1), got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def eos_id(self) -> int:
        return self._eos

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | Path) -> Path:
        return _save(path, self.tok.to_str(pretty=True))

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)))


class WordTokenizer(Tokenizer):
    """A closed vocabulary of word pieces; id 0 is EOS. Unknown pieces raise ``KeyError``
    (a closed vocabulary that silently maps to ``<unk>`` would corrupt the bits count)."""

    kind = "word"

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if not tokens or tokens[0] != EOS:
            raise ValueError(f"WordTokenizer tokens must start with {EOS!r}")
        self.tokens = tokens
        self.index = {t: i for i, t in enumerate(tokens)}
        if len(self.index) != len(tokens):
            raise ValueError("WordTokenizer tokens must be unique")

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> WordTokenizer:
        """The vocabulary of every piece in ``texts``, sorted for a deterministic order."""
        pieces: set[str] = set()
        for t in texts:
            pieces.update(_WORD_PIECE.findall(t))
        pieces.discard(EOS)
        return cls([EOS, *sorted(pieces)])

    @staticmethod
    def pieces(text: str) -> list[str]:
        """Split text into word pieces (no vocabulary look-up)."""
        return _WORD_PIECE.findall(text)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def eos_id(self) -> int:
        return 0

    def encode(self, text: str) -> list[int]:
        pieces = _WORD_PIECE.findall(text)
        try:
            return [self.index[p] for p in pieces]
        except KeyError as e:
            raise KeyError(f"piece {e.args[0]!r} is not in the WordTokenizer vocabulary") from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.tokens[int(i)] for i in ids)

    def save(self, path: str | Path) -> Path:
        return _save(path, json.dumps({"kind": "word", "tokens": self.tokens}, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        return cls(json.loads(Path(path).read_text())["tokens"])


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file; EOS is the model's ``</s>`` (id 2 in Llama-2's)."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path) -> None:
        try:
            import sentencepiece as spm
        except ImportError as e:
            raise ImportError(
                "SentencePieceTokenizer needs the optional package: pip install sentencepiece"
            ) from e
        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def save(self, path: str | Path) -> Path:
        return _save(path, self.path.read_bytes())


def _save(path: str | Path, data: str | bytes) -> Path:
    """Every tokenizer's ``save``: atomically (a run rewrites its tokenizer.json at each
    start, ``--resume`` too: a crash there must not leave a cut file), its folder made."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, data)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Reload a tokenizer saved by any ``save`` above; the kind is read from the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"the tokenizer file {path} is empty")
    # A run saves any tokenizer as run_dir/tokenizer.json: a SentencePiece model there is
    # its protobuf bytes, not JSON.
    if path.suffix == ".model" or not data.lstrip().startswith(b"{"):
        try:
            return SentencePieceTokenizer(path)
        except RuntimeError as e:  # sentencepiece's parse error names no file
            raise ValueError(f"{path} is not a tokenizer file (as SentencePiece: {e})") from None
    try:
        head = json.loads(data)
    except ValueError as e:
        raise ValueError(f"{path} is not a tokenizer file (cut short?): {e}") from None
    if head.get("kind") == "word":
        return WordTokenizer(head["tokens"])
    if isinstance(head.get("model"), dict) and head["model"].get("type") == "BPE":
        return BPETokenizer.load(path)
    raise ValueError(f"{path} is not a tokenizer saved by memlayers (word, BPE or .model)")
