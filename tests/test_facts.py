"""Real facts: rendering is deterministic and leak-free; extractors work on the cached
packages (skipped when they are not cached; MEMLAYERS_NETWORK_TESTS=1 fetches them)."""

import os

import pytest

from memlayers.data import corpus
from memlayers.data.facts import EXTRACTORS, RELATIONS, Fact, load_facts, render_facts

FACTS = [
    Fact("Iron", "element_symbol", "Fe", "t"),
    Fact("Iron", "atomic_number", "26", "t"),
    Fact("Gold", "element_symbol", "Au", "t"),
    Fact("Gold", "atomic_number", "79", "t"),
    Fact("France", "country_capital", "Paris", "t"),
    Fact("France", "continent", "Europe", "t"),
    Fact("Ohio", "statehood_year", "1803", "t"),
    Fact("Lyon", "city_country", "France", "t"),
]


def test_render_deterministic_and_complete():
    a = render_facts(FACTS, exposures=5, seed=1)
    b = render_facts(FACTS, exposures=5, seed=1)
    assert a.train_docs == b.train_docs and a.qa_eval == b.qa_eval
    assert render_facts(FACTS, exposures=5, seed=2).train_docs != a.train_docs
    text = "\n".join(a.train_docs)
    for f in FACTS:  # every fact is stated in training (knowledge injection)
        assert any(t.format(s=f.subject, o=f.object) in text for t in RELATIONS[f.relation][0])
    n_statement_docs = 5 * len({f.subject for f in FACTS})
    assert len(a.train_docs) == n_statement_docs + len(a.qa_train) * max(1, 5 // 4)


def test_held_out_questions_never_in_training():
    d = render_facts(FACTS, exposures=3, seed=0, qa_train_frac=0.5)
    assert len(d.qa_eval) + len(d.qa_train) == len(FACTS)
    text = "\n".join(d.train_docs)
    for r in d.qa_eval:
        assert r["question"] not in text
        assert r["answers"] == [
            next(
                f.object for f in FACTS if f.subject == r["subject"] and f.relation == r["relation"]
            )
        ]
    for r in d.qa_train:
        assert f"{r['question']} {r['answers'][0]}" in text
    # questions are paraphrases: no question template is a statement template
    for stmts, qs in RELATIONS.values():
        assert not set(stmts) & set(qs)


def _cached() -> bool:
    root = corpus.cache_dir()
    have = all((root / "archives" / corpus.PACKAGES[p].filename).is_file() for p in EXTRACTORS)
    return have or os.environ.get("MEMLAYERS_NETWORK_TESTS") == "1"


@pytest.mark.skipif(not _cached(), reason="fact packages not cached (memlayers data fetch)")
def test_real_facts():
    facts = load_facts()
    got = {(f.subject, f.relation): f.object for f in facts}
    assert got[("Iron", "element_symbol")] == "Fe"
    assert got[("Gold", "atomic_number")] == "79"
    assert got[("Ohio", "statehood_year")] == "1803"
    assert got[("France", "country_capital")] == "Paris"
    assert got[("Japan", "highest_point")] == "Mount Fuji"
    assert ("Georgia", "state_capital") not in got  # a country and a state: ambiguous
    rels = {f.relation for f in facts}
    assert rels == set(RELATIONS)
    assert len(facts) > 2500
    assert len({(f.subject, f.relation) for f in facts}) == len(facts)


def test_one_qa_format_for_records_training_text_and_prompts():
    from memlayers.data.qa import qa_prompt, qa_record, qa_text

    rec = qa_record("What is the capital of France?", "Paris", subject="France")
    assert rec == {"question": rec["question"], "answers": ["Paris"], "subject": "France"}
    assert qa_text(rec) == "What is the capital of France? Paris"
    assert qa_text(rec).startswith(qa_prompt(rec["question"]))
    assert qa_prompt("Q?", "Ctx.") == "Ctx. Q?" and qa_prompt("Q?", "") == "Q?"
    d = render_facts(FACTS, exposures=2, seed=0, qa_train_frac=0.5)
    assert {qa_text(r) for r in d.qa_train} <= set(d.train_docs)


def test_split_shown_is_a_stable_partition():
    from memlayers.data.facts import split_shown

    many = [Fact(f"S{i}", "element_symbol", f"X{i}", "t") for i in range(400)] + FACTS
    shown, unseen = split_shown(many, 0.5, seed=3)
    assert sorted(shown + unseen, key=repr) == sorted(many, key=repr)
    assert not set(shown) & set(unseen)
    assert 150 < len(shown) < 250  # about half, by a hash
    # a fact's side depends on the fact and the seed alone, not on the rest of the list
    sub_shown, _ = split_shown(FACTS, 0.5, seed=3)
    assert sub_shown == [f for f in FACTS if f in set(shown)]
    assert split_shown(many, 0.5, seed=4)[0] != shown
    assert split_shown(many, 0.0)[0] == []
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=rf"in \[0, 1\), got {bad}"):
            split_shown(many, bad)


def test_qa_documents_ask_every_phrasing():
    from memlayers.data.facts import qa_documents

    docs = qa_documents(FACTS[:2])
    iron = [q.format(s="Iron") for q in RELATIONS["element_symbol"][1]]
    assert docs[: len(iron)] == [f"Q: {q}\nA: Fe" for q in iron]
    assert len(docs) == sum(len(RELATIONS[f.relation][1]) for f in FACTS[:2])


def test_a_fact_paired_by_a_shown_one_is_neither_shown_nor_unseen():
    # Paris in France shown as a QA pair answers France's capital: that question must not
    # be asked of a model trained on it
    from memlayers.data.facts import split_shown

    pair = [Fact("Paris", "city_country", "France", "t"),
            Fact("France", "country_capital", "Paris", "t")]  # fmt: skip
    one_shown = 0
    for seed in range(40):
        shown, unseen = split_shown(pair, 0.5, seed)
        if len(shown) == 1:  # the other fact is dropped
            one_shown += 1
            assert unseen == []
        else:
            assert len(shown) + len(unseen) == 2
    assert one_shown > 5
