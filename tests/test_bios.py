"""The bios benchmark: deterministic, exact entropies, no QA leakage, loader-ready streams."""

import math

import numpy as np
import pytest

from memlayers.data.bios import (
    ATTRIBUTES,
    BIO_TEMPLATES,
    QUESTIONS,
    BiosConfig,
    build_bios,
)
from memlayers.data.qa import read_qa_jsonl
from memlayers.data.tokenizer import BPETokenizer, load_tokenizer
from memlayers.metrics import exact_match


@pytest.fixture(scope="module")
def small():
    return build_bios(n_people=120, exposures=4, seed=3)


def test_deterministic_in_seed(small):
    again = build_bios(n_people=120, exposures=4, seed=3)
    assert np.array_equal(small.tokens, again.tokens)
    assert np.array_equal(small.val_tokens, again.val_tokens)
    assert small.qa_eval == again.qa_eval and small.qa_train == again.qa_train
    assert small.tokenizer.tokens == again.tokenizer.tokens
    other = build_bios(n_people=120, exposures=4, seed=4)
    assert not np.array_equal(small.tokens[:500], other.tokens[:500])
    # the vocabulary is the fixed universe's: it does not depend on the seed
    assert other.tokenizer.tokens == small.tokenizer.tokens


def test_people_do_not_depend_on_exposures(small):
    more = build_bios(n_people=120, exposures=6, seed=3)
    assert more.names == small.names and more.qa_eval == small.qa_eval


def test_value_set_sizes_exact_entropy(small):
    bits = {a: math.log2(v) for a, v in small.value_set_sizes.items()}
    assert small.value_set_sizes == {
        "birth_date": 12 * 28 * 200,
        "birth_city": 200,
        "university": 300,
        "major": 100,
        "employer": 263,
    }
    assert bits["birth_date"] == pytest.approx(16.04, abs=0.01)
    assert sum(bits.values()) == pytest.approx(46.59, abs=0.01)
    assert small.capacity_bits == pytest.approx(120 * sum(bits.values()))


def test_names_unique_and_values_in_range(small):
    assert len(set(small.names)) == len(small.names) == 120
    for a, size in small.value_set_sizes.items():
        assert small.values[a].min() >= 0 and small.values[a].max() < size


def test_stream_is_eos_separated_and_retokenises(small):
    tok, toks = small.tokenizer, small.tokens
    assert toks.dtype == np.uint16 and toks[-1] == tok.eos_id
    docs = small.documents()
    n_qa_docs = len(small.qa_train) * max(1, 4 // 10)
    assert len(docs) == 120 * 4 + n_qa_docs + 263 * 4  # bios + QA + company documents
    # assembling fragments equals tokenising the whole document
    for d in docs[:200]:
        assert tok.decode(tok.encode(d)) == d
    ends = np.flatnonzero(toks == tok.eos_id)
    first = toks[: ends[0]].tolist()
    assert first == tok.encode(docs[0])


def test_every_bio_states_all_true_attributes(small):
    bios = [d for d in small.documents() if "?" not in d]  # bios and company documents
    by_name = {}
    for d in bios:
        for i, name in enumerate(small.names):
            if name in d:
                by_name.setdefault(i, []).append(d)
                break
    assert len(by_name) == 120  # every person has bios
    for i, docs in list(by_name.items())[:30]:
        assert len(docs) == 4  # E exposures
        for d in docs:
            assert d.count(small.names[i]) == 5  # full name in every sentence
            for a in ATTRIBUTES:
                assert small.answer(i, a) in d
            # the work city is never in a bio: it is the 2-hop probe
            assert small.answer(i, "work_city") not in d.replace(small.answer(i, "birth_city"), "")


def test_sentence_order_and_templates_vary(small):
    bios = [d for d in small.documents() if "?" not in d and d.count(".") >= 5]
    firsts = {d.split(" ")[3] for d in bios[:200]}  # word after the name: varies with order
    assert len(firsts) > 5
    used = sum(
        any(t.split("{value}")[0].replace("{name}", "").strip(" '") in d for d in bios)
        for ts in BIO_TEMPLATES.values()
        for t in ts
    )
    assert used >= 25


def test_no_leakage_of_held_out_qa(small):
    text = "\n".join(small.documents())
    held = {r["person"] for r in small.qa_eval}
    train = {r["person"] for r in small.qa_train}
    assert held and train and not held & train
    assert len(held) + len(train) == 120
    for r in small.qa_eval:
        assert r["question"] not in text  # no held-out question anywhere in training
        assert small.names[r["person"]] in text  # but the person's bios are
    for r in small.qa_train:
        assert f"{r['question']} {r['answers'][0]}" in text
    assert {r["attribute"] for r in small.qa_eval} == set(QUESTIONS)


def test_qa_records_answers(small):
    for r in small.qa_eval[:60]:
        assert exact_match(small.answer(r["person"], r["attribute"]), r["answers"]) == 1.0
    tok = small.tokenizer
    for r in small.probe_records()[::97]:  # prompts and answers are in the vocabulary
        tok.encode(r["question"])
        tok.encode(" " + r["answers"][0])
    assert len(small.probe_records()) == 120 * len(ATTRIBUTES)


def test_work_city_is_employer_hq():
    d = build_bios(n_people=400, exposures=1, seed=0)
    hq = {}
    for i in range(400):
        e, c = d.answer(i, "employer"), d.answer(i, "work_city")
        assert hq.setdefault(e, c) == c  # a function of the employer


def test_compact_records():
    d = build_bios(
        n_people=50,
        exposures=3,
        seed=1,
        compact=True,
        compact_attributes=3,
        compact_chunks=2,
        compact_values=16,
    )
    assert d.capacity_bits == pytest.approx(50 * 3 * 2 * 4)
    docs = d.documents()
    assert len(docs) == 50 * 3 * 3
    assert all(len(d.tokenizer.encode(x)) == 3 + 1 + 2 for x in docs)
    text = set(docs)
    for r in d.qa_eval:
        assert f"{r['question']} {r['answers'][0]}" in text
    assert d.probe_records() == d.qa_eval


def test_bpe_tokenizer_compositional():
    sample = build_bios(n_people=30, exposures=2, seed=0)
    bpe = BPETokenizer.train(sample.documents(), vocab_size=400)
    d = build_bios(n_people=30, exposures=2, seed=0, tokenizer=bpe)
    assert d.documents() == sample.documents()


def test_save(tmp_path, small):
    out = small.save(tmp_path / "bios")
    toks = np.fromfile(out / "train.bin", dtype=small.tokens.dtype)
    assert np.array_equal(toks, small.tokens)
    assert read_qa_jsonl(out / "qa_eval.jsonl") == small.qa_eval
    assert load_tokenizer(out / "tokenizer.json").tokens == small.tokenizer.tokens


def test_config_errors():
    with pytest.raises(ValueError, match="n_people"):
        BiosConfig(n_people=0)
    with pytest.raises(ValueError, match="qa_train_frac"):
        BiosConfig(qa_train_frac=1.5)
    with pytest.raises(TypeError):
        build_bios(10, 1, 0, not_an_option=1)


def test_registered_with_the_packed_loader():
    loader = pytest.importorskip("memlayers.data.loader")
    from memlayers.data.datasets import BiosArgs

    args = loader.DataArgs(dataset="bios", seq_len=32, batch_size=4,
                           bios=BiosArgs(n_people=50, exposures=2, seed=5))  # fmt: skip
    ds = loader.load_dataset(args)
    assert np.array_equal(ds.train, build_bios(50, 2, seed=5).tokens)
    x, y = next(loader.PackedLoader(ds.train, 4, 32))
    assert x.shape == y.shape == (4, 32)
    bad = loader.DataArgs(dataset="bios_compact", bios_compact=BiosArgs(compact=True))
    with pytest.raises(ValueError, match="data.bios_compact.compact"):
        loader.load_dataset(bad)
