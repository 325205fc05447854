"""Metrics against hand-computed values: normalisation, EM/F1, answer NLL, bits stored."""

import math

import pytest
import torch
import torch.nn as nn

from memlayers.data.qa import QAFormatError, read_qa_jsonl, write_qa_jsonl
from memlayers.data.tokenizer import WordTokenizer
from memlayers.metrics import (
    answer_nll,
    answer_nll_batch,
    bits_per,
    ce_bits_by_attribute,
    exact_match,
    f1,
    greedy_answer,
    input_device,
    knowledge_bits,
    min_answer_nll,
    normalize_answer,
    qa_scores,
)


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  a  Cat,  an APPLE and the dog. ", "cat apple and dog"),
        ("May 3, 1954", "may 3 1954"),
        ("Theory of the atom", "theory of atom"),  # "the" only as a whole word
        ("Rock'n'roll", "rocknroll"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Eiffel tower.", ["Eiffel Tower", "Paris"]) == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    # pred {cat, sat} vs gold {cat, sat, on, mat}: P = 1, R = 1/2, F1 = 2/3
    assert f1("The cat sat", "cat sat on the mat") == pytest.approx(2 / 3)
    # tokens count with multiplicity: pred [x, x, y], gold [x, z]: overlap 1,
    # P = 1/3, R = 1/2, F1 = 2·(1/3)(1/2) / (1/3 + 1/2) = 0.4
    assert f1("x x y", "x z") == pytest.approx(0.4)
    assert f1("nothing", ["x", "nothing here"]) == pytest.approx(2 / 3)  # max over answers
    assert f1("", "") == 1.0 and f1("the", "cat") == 0.0
    s = qa_scores(["Paris", "Lyon"], [{"answers": ["paris"]}, {"answers": ["Nice"]}])
    assert s == {"exact_match": 0.5, "f1": 0.5, "n": 2.0}


# A toy model: a bigram table over a 6-token word vocabulary. logits[b, t] depends only on
# ids[b, t], so every probability below is computed by hand from the table.
TOK = WordTokenizer(["<|endoftext|>", "Q", "?", " yes", " no", "\n"])
EOS, Q, QM, YES, NO, NL = range(6)
PROBS = torch.full((6, 6), 0.1)
PROBS[EOS] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
PROBS[QM] = torch.tensor([0.1, 0.1, 0.1, 0.4, 0.2, 0.1])  # after "?": yes 0.4, no 0.2
PROBS[YES] = torch.tensor([0.5, 0.1, 0.1, 0.05, 0.05, 0.2])  # after "yes": EOS 0.5
PROBS[NO] = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
PROBS[Q] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
LOGITS = torch.log(PROBS.clamp_min(1e-30))


def bigram(ids: torch.Tensor) -> torch.Tensor:
    return LOGITS[ids]  # [B, T] -> [B, T, V]


def test_answer_nll_by_hand():
    r = answer_nll(bigram, TOK, "Q?", "yes")
    assert r["n_tokens"] == 1
    assert r["nll"] == pytest.approx(-math.log(0.4))
    assert r["bits"] == pytest.approx(-math.log2(0.4))
    r = answer_nll(bigram, TOK, "Q?", "yes yes no")  # p = 0.4 · 0.05 · 0.05
    assert r["n_tokens"] == 3
    assert r["nll"] == pytest.approx(-math.log(0.4 * 0.05 * 0.05), rel=1e-5)
    assert r["nll_per_token"] == pytest.approx(r["nll"] / 3)


def test_answer_nll_batch_padding_invariant():
    qs, ans = ["Q?", "Q?", "Q?"], ["no", "yes yes no", "yes"]
    batched = answer_nll_batch(bigram, TOK, qs, ans, batch_size=3)
    single = [answer_nll(bigram, TOK, q, a) for q, a in zip(qs, ans, strict=True)]
    for b, s in zip(batched, single, strict=True):
        assert b["nll"] == pytest.approx(s["nll"], rel=1e-6)
    assert batched[0]["nll"] == pytest.approx(-math.log(0.2))


def test_answer_nll_prefix_eos():
    # without the EOS prefix the first question token is not scored either way: same NLL
    a = answer_nll(bigram, TOK, "Q?", "no", prefix_eos=False)
    assert a["nll"] == pytest.approx(-math.log(0.2))
    best = min_answer_nll(bigram, TOK, {"question": "Q?", "answers": ["no", "yes"]})
    assert best["nll"] == pytest.approx(-math.log(0.4))


def test_single_answer_helpers_put_ids_on_the_given_device(monkeypatch):
    # answer_nll / min_answer_nll pass ``device`` through, so a GPU model gets GPU ids.
    import memlayers.metrics as metrics

    seen = []
    real = metrics.answer_nll_batch

    def spy(*args, device="cpu", **kwargs):
        seen.append(device)
        return real(*args, device=device, **kwargs)

    monkeypatch.setattr(metrics, "answer_nll_batch", spy)
    answer_nll(bigram, TOK, "Q?", "no", device="cpu:0")
    min_answer_nll(bigram, TOK, {"question": "Q?", "answers": ["no"]}, device="cpu:0")
    assert seen == ["cpu:0", "cpu:0"]


def test_greedy_answer_stops_at_eos():
    # after "?" the argmax is " yes", after " yes" it is EOS
    assert greedy_answer(bigram, TOK, "Q?") == "yes"
    assert exact_match(greedy_answer(bigram, TOK, "Q?"), ["Yes."]) == 1.0


def test_knowledge_bits_by_hand():
    sizes = {"a": 8, "b": 2, "c": 1}
    # a: 4·3 − 4 = 8; b: max(0, 4·1 − 10) = 0; c: a single value carries 0 bits
    r = knowledge_bits({"a": 4.0, "b": 10.0, "c": 0.0}, n_people=4, value_set_sizes=sizes)
    assert r["a"] == pytest.approx(8.0) and r["b"] == 0.0 and r["c"] == 0.0
    assert r["total"] == pytest.approx(8.0) and r["capacity"] == pytest.approx(16.0)
    perfect = knowledge_bits({"a": 0.0, "b": 0.0, "c": 0.0}, 4, sizes)
    assert perfect["total"] == perfect["capacity"]
    with pytest.raises(ValueError, match="no cross-entropy"):
        knowledge_bits({"a": 1.0}, 4, sizes)


def test_ce_bits_from_nll_records_and_normalisations():
    recs = [{"attribute": "a"}, {"attribute": "b"}, {"attribute": "a"}]
    ce = ce_bits_by_attribute(recs, [{"bits": 1.0}, {"bits": 2.0}, {"bits": 0.5}])
    assert ce == {"a": 1.5, "b": 2.0}
    r = bits_per(
        1000.0, total_params=500, non_embedding_params=250, active_params=100, train_flops=1e6
    )
    assert r["bits_per_param"] == 2.0 and r["bits_per_non_embedding_param"] == 4.0
    assert r["bits_per_active_param"] == 10.0 and r["bits_per_flop"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="active_params"):
        bits_per(1.0, 1, 1, 0, 1.0)


def test_qa_jsonl_round_trip_and_errors(tmp_path):
    recs = [
        {"question": "Q?", "answers": ["yes"]},
        {"question": "Who?", "answers": ["A", "B"], "context": "ctx", "person": 3},
    ]
    path = write_qa_jsonl(tmp_path / "qa.jsonl", recs)
    assert read_qa_jsonl(path) == recs
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok?", "answers": ["a"]}\n\n{"question": "x", "answers": []}\n')
    with pytest.raises(QAFormatError, match=r"bad.jsonl:3: \"answers\""):
        read_qa_jsonl(bad)
    bad.write_text('{"question": "ok?", "answers": ["a"]}\n{not json\n')
    with pytest.raises(QAFormatError, match=r"bad.jsonl:2: invalid JSON"):
        read_qa_jsonl(bad)
    bad.write_text('{"question": "", "answers": ["a"]}\n')
    with pytest.raises(QAFormatError, match=r":1: \"question\""):
        read_qa_jsonl(bad)
    with pytest.raises(QAFormatError, match="record 0"):
        write_qa_jsonl(tmp_path / "w.jsonl", [{"question": "q", "answers": "a"}])
    assert list(tmp_path.glob("w.jsonl*")) == []  # nothing half-written


def test_token_ids_go_where_the_model_is():
    meta = nn.Linear(2, 2, device="meta")
    assert input_device(meta, None) == torch.device("meta")  # a module: its parameters'
    assert input_device(meta, "cpu") == torch.device("cpu")  # an explicit device wins
    assert input_device(lambda ids: ids, None) == torch.device("cpu")  # a plain function
    assert input_device(nn.Identity(), None) == torch.device("cpu")  # no parameters
