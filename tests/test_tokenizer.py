"""Tokenizers round-trip, reload identically, and fail loudly on what they cannot encode."""

import os

import pytest

from memlayers.data.tokenizer import (
    EOS,
    BPETokenizer,
    WordTokenizer,
    load_tokenizer,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Memory layers add parameters without adding FLOPs; product keys make lookup cheap.",
    "Numbers 1,048,576 and 3.35 TB/s, tabs\tand\nnewlines\n\n  double  spaces.",
    "Unicode: café, naïve, Ελληνικά, 日本語, emoji 🙂 and a zero-width\u200bjoiner.",
] * 20

ODD = ["", " ", "  leading", "trailing  ", "\n\n\t", "ünïcödé 🙂🙂", "a" * 300, "<|endoftext"]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(TEXTS, vocab_size=320)


@pytest.mark.parametrize("text", TEXTS[:4] + ODD, ids=lambda t: repr(t[:12]))
def test_bpe_round_trip(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_vocab_and_eos(bpe):
    assert 258 <= bpe.vocab_size <= 320
    assert bpe.eos_id == bpe.tok.token_to_id(EOS)
    assert bpe.decode([bpe.eos_id]) == EOS
    assert bpe.encode_batch(TEXTS[:4]) == [bpe.encode(t) for t in TEXTS[:4]]


def test_bpe_save_load(bpe, tmp_path):
    path = bpe.save(tmp_path / "tok.json")
    again = load_tokenizer(path)
    assert isinstance(again, BPETokenizer)
    assert again.vocab_size == bpe.vocab_size and again.eos_id == bpe.eos_id
    for t in TEXTS[:4]:
        assert again.encode(t) == bpe.encode(t)


def test_bpe_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(TEXTS, vocab_size=100)


def test_word_round_trip_and_closed_vocab(tmp_path):
    corpus = ["Anya Briar Forger was born on May 3, 1954.", "Meet Anya's major: Physics!\n"]
    tok = WordTokenizer.from_texts(corpus)
    assert tok.eos_id == 0 and tok.tokens[0] == EOS
    for t in corpus:
        assert tok.decode(tok.encode(t)) == t
    # a leading space is part of the piece: " Anya" and "Anya" are different tokens
    assert tok.encode("Anya") != tok.encode(" Anya")
    assert len(tok.encode(" May 3, 1954")) == 4
    with pytest.raises(KeyError, match="Zed"):
        tok.encode("Zed")
    again = load_tokenizer(tok.save(tmp_path / "word.json"))
    assert isinstance(again, WordTokenizer) and again.tokens == tok.tokens


def test_word_pieces_cover_any_text():
    for text in ODD + TEXTS[:4]:
        assert "".join(WordTokenizer.pieces(text)) == text


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text('{"something": 1}')
    with pytest.raises(ValueError, match="not a tokenizer"):
        load_tokenizer(tmp_path / "x.json")


def test_a_cut_empty_or_foreign_tokenizer_file_is_refused_naming_it(bpe, tmp_path):
    whole = bpe.save(tmp_path / "whole.json").read_bytes()
    for name, data in (("empty.json", b""), ("cut.json", whole[: len(whole) // 2]),
                       ("foreign.json", b"\x00\x01 not a model")):  # fmt: skip
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name):
            load_tokenizer(tmp_path / name)


@pytest.mark.parametrize("kind", ["bpe", "word"])
def test_a_save_that_fails_leaves_the_old_file_whole(bpe, tmp_path, monkeypatch, kind):
    # A run rewrites its tokenizer.json at every start (--resume too): a crash mid-write
    # must not leave the run with a cut tokenizer.
    tok = bpe if kind == "bpe" else WordTokenizer([EOS, " a", " b"])
    path = tok.save(tmp_path / "run" / "tokenizer.json")
    before = path.read_bytes()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr("memlayers.files.os.fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        tok.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokenizer.json"]


def _cached_sentencepiece():
    from memlayers.data.corpus import PACKAGES, cache_dir

    model = cache_dir() / "tokenizers" / "mistral-v1.model"
    archive = cache_dir() / "archives" / PACKAGES["mistral-common"].filename
    if model.is_file() or archive.is_file() or os.environ.get("MEMLAYERS_NETWORK_TESTS") == "1":
        from memlayers.data.corpus import fetch_sentencepiece

        return fetch_sentencepiece()
    return None


def test_a_sentencepiece_model_saved_as_a_runs_tokenizer_json_loads_back(tmp_path):
    # The trainer saves every tokenizer as run_dir/tokenizer.json (memlayers.run.Run): a
    # SentencePiece model there is protobuf bytes, read back by content, not by suffix.
    spm = pytest.importorskip("sentencepiece")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"the cat number {i} sat on the mat {i * 7}" for i in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=60, minloglevel=2
    )
    tok = load_tokenizer(tmp_path / "sp.model")
    back = load_tokenizer(tok.save(tmp_path / "run" / "tokenizer.json"))
    assert type(back) is type(tok) and back.vocab_size == tok.vocab_size == 60
    assert back.encode("the cat sat") == tok.encode("the cat sat")


def test_sentencepiece_llama2_model():
    pytest.importorskip("sentencepiece")
    path = _cached_sentencepiece()
    if path is None:
        pytest.skip("mistral-common wheel not cached (MEMLAYERS_NETWORK_TESTS=1 fetches it)")
    tok = load_tokenizer(path)
    assert tok.vocab_size == 32000 and tok.eos_id == 2
    text = "Memory layers at scale, 2024."
    assert tok.decode(tok.encode(text)) == text
