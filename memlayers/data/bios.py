"""The synthetic knowledge benchmark ("bios", after Allen-Zhu & Li, Physics of LMs 3.1/3.3).

N people with unique names, each with independent uniform attributes whose entropy is
exact (DATA.md):

=============  ==================  ==========
attribute      values              bits
=============  ==================  ==========
birth_date     12 × 28 × 200        16.04
birth_city     200                  7.64
university     300                  8.23
major          100                  6.64
employer       263                  8.04
work_city      employer's city      0 (derived: a 2-hop probe)
=============  ==================  ==========

Names, cities, universities and companies are invented words (fixed, independent of the
run seed, so the vocabulary is stable across seeds), which keeps any prior knowledge out.

What goes into the training text (the choices, documented):

- **Bios**: each person appears in ``exposures`` (E) documents; each document has one
  sentence per attribute, in a shuffled order, each from a re-sampled template, each
  with the full name ("bioS multi+permute+fullname" in Allen-Zhu & Li 3.1).
- **Company documents**: "<employer> is headquartered in <city>." — E per company
  (``company_exposures``). The bio
  names the employer but never the work city, so "Which city does X work in?" needs two
  hops (person → employer → city).
- **QA split** (Allen-Zhu & Li's "mixed training"): a random ``qa_train_frac`` of the
  people are *train-QA* people: their question→answer pairs (every attribute, work city
  included) are mixed into the training text as their own documents, ``qa_exposures``
  times each, so the model learns the question format. The other people are *held-out*:
  their bios are in the training text like everyone's, but their QA pairs are never:
  they are the evaluation set (``BiosData.qa_eval``), measuring knowledge *extraction*.
- **Knowledge stored in bits** needs the cross-entropy of every person's attribute
  values: :meth:`BiosData.probe_records` gives, for all N people, a bio-style prompt
  ("Anya Briar Forger was born on") and the value; sum the answer NLL in bits over people
  per attribute and pass it to :func:`memlayers.metrics.knowledge_bits` with
  ``BiosData.value_set_sizes``.

The **compact** variant (``compact=True``) drops the prose: each document is one record
``<first> <middle> <last> attr<k> v<j1> … v<jC>`` with K attributes of C single-token
chunks from a D-sized set, so the stored information is exactly N·K·C·log2 D bits. There
is no extraction split (the record *is* the question): ``qa_eval`` holds every record.

Speed: text is never generated and re-tokenised. Every fragment (template text, name
part, value) is tokenised once into a pool; a document is a row of fragment ids built
with vectorised numpy, and the token stream is one gather from the pool. The stream is
ready for a packed loader: documents separated by the tokenizer's EOS, each starting
with its first word without a leading space, exactly as ``tokenizer.encode(text)`` would.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from memlayers.data.tokenizer import Tokenizer, WordTokenizer

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer")
DERIVED = ("work_city",)

MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August",
    "September", "October", "November", "December",
)  # fmt: skip
N_DAYS = 28  # every month has a 28th: all 12 × 28 dates are valid, the entropy is exact
YEARS = tuple(range(1900, 2100))
N_CITIES, N_UNIVERSITIES, N_EMPLOYERS = 200, 300, 263
N_FIRST, N_LAST = 400, 1000  # middle names come from the first-name pool

MAJORS = (
    "Mathematics", "Physics", "Chemistry", "Biology", "Computer Science", "Economics",
    "History", "Philosophy", "Psychology", "Sociology", "Linguistics", "Literature",
    "Music", "Fine Arts", "Architecture", "Civil Engineering", "Mechanical Engineering",
    "Electrical Engineering", "Chemical Engineering", "Aerospace Engineering", "Astronomy",
    "Geology", "Oceanography", "Meteorology", "Ecology", "Genetics", "Neuroscience",
    "Biochemistry", "Statistics", "Accounting", "Finance", "Marketing", "Management",
    "Law", "Medicine", "Nursing", "Pharmacy", "Dentistry", "Veterinary Science",
    "Agriculture", "Forestry", "Anthropology", "Archaeology", "Political Science",
    "International Relations", "Journalism", "Education", "Theology", "Classics",
    "Art History", "Film Studies", "Theater", "Dance", "Graphic Design", "Industrial Design",
    "Urban Planning", "Geography", "Public Health", "Nutrition", "Kinesiology",
    "Materials Science", "Nuclear Engineering", "Biomedical Engineering",
    "Environmental Science", "Marine Biology", "Zoology", "Botany", "Microbiology",
    "Immunology", "Epidemiology", "Criminology", "Social Work", "Library Science",
    "Information Systems", "Data Science", "Robotics", "Cognitive Science", "Logic",
    "Rhetoric", "Creative Writing", "Comparative Literature", "Musicology",
    "Photography", "Sculpture", "Painting", "Economic History", "Game Design",
    "Hospitality Management", "Supply Chain Management", "Actuarial Science",
    "Operations Research", "Applied Mathematics", "Mathematical Physics", "Cryptography",
    "Software Engineering", "Petroleum Engineering", "Mining Engineering", "Textile Design",
    "Fashion Design", "Culinary Arts",
)  # fmt: skip
assert len(MAJORS) == 100 and len(set(MAJORS)) == 100

_UNIVERSITY_FORMS = (
    "University of {}", "{} University", "{} Institute of Technology", "{} College",
    "{} State University",
)  # fmt: skip
_COMPANY_FORMS = (
    "{} Systems", "{} Labs", "{} Industries", "{} Group", "{} Corporation", "{} Dynamics",
    "{} Partners",
)  # fmt: skip

# Bio templates: several per attribute, re-sampled per sentence. {value} never starts a
# template, so only the first name needs a document-initial (no leading space) form.
BIO_TEMPLATES = {
    "birth_date": (
        "{name} was born on {value}.",
        "{name} came into this world on {value}.",
        "{name}'s birthday is {value}.",
        "The birth date of {name} is {value}.",
        "{name} entered the world on {value}.",
        "On {value}, {name} was born.",
    ),
    "birth_city": (
        "{name} was born in {value}.",
        "{name} spent the early years in {value}.",
        "{name}'s birthplace is {value}.",
        "{name} originally comes from {value}.",
        "The hometown of {name} is {value}.",
        "{name} grew up in {value}.",
    ),
    "university": (
        "{name} studied at {value}.",
        "{name} graduated from {value}.",
        "{name} received an education at {value}.",
        "{name} is an alumnus of {value}.",
        "{name} attended {value}.",
        "{name} completed a degree at {value}.",
    ),
    "major": (
        "{name} majored in {value}.",
        "{name} specialized in {value}.",
        "{name}'s field of study was {value}.",
        "{name} earned a degree in {value}.",
        "The major of {name} was {value}.",
        "{name} focused on {value} in college.",
    ),
    "employer": (
        "{name} works for {value}.",
        "{name} is employed by {value}.",
        "{name} has a job at {value}.",
        "{name} is on the staff of {value}.",
        "{name} earns a living at {value}.",
        "The employer of {name} is {value}.",
    ),
}
COMPANY_TEMPLATES = (
    "{company} is headquartered in {value}.",
    "The headquarters of {company} are in {value}.",
    "{company} has its main office in {value}.",
)
# One question per attribute (Allen-Zhu & Li ask each attribute one way); the answer
# follows the question after one space.
QUESTIONS = {
    "birth_date": "What is the birth date of {name}?",
    "birth_city": "Which city was {name} born in?",
    "university": "Which university did {name} attend?",
    "major": "What did {name} study?",
    "employer": "Which company does {name} work for?",
    "work_city": "Which city does {name} work in?",
}

_UNIVERSE_SEED = 20240917  # fixes the invented words; the run seed never changes them


@dataclass
class BiosConfig:
    """Everything that determines a bios dataset (with the tokenizer)."""

    n_people: int = 1000
    exposures: int = 100  # E: documents per person (and per company)
    seed: int = 0
    compact: bool = False
    qa_train_frac: float = 0.5  # people whose QA pairs are mixed into the training text
    qa_exposures: int | None = None  # per train-QA pair; None: max(1, exposures // 10)
    company_exposures: int | None = None  # per company document; None: exposures
    n_templates: int | None = None  # templates used per attribute; None: all (6)
    val_exposures: int = 1  # validation stream: fresh bios of the same people
    # compact variant: K attributes × C chunks from a D-sized set
    compact_attributes: int = 5
    compact_chunks: int = 4
    compact_values: int = 256

    def __post_init__(self) -> None:
        if self.n_people <= 0 or self.exposures <= 0:
            raise ValueError(
                f"n_people and exposures must be positive, got n_people={self.n_people}, "
                f"exposures={self.exposures}"
            )
        max_people = N_FIRST * N_FIRST * N_LAST // 2
        if self.n_people > max_people:
            raise ValueError(f"n_people={self.n_people} > {max_people} (half the name space)")
        if not 0.0 <= self.qa_train_frac < 1.0:
            raise ValueError(f"qa_train_frac must be in [0, 1), got {self.qa_train_frac}")
        if self.n_templates is not None and not 1 <= self.n_templates <= 6:
            raise ValueError(f"n_templates must be in [1, 6], got {self.n_templates}")


@dataclass
class BiosData:
    """A built bios dataset: token streams, QA records, exact value-set sizes, tokenizer."""

    config: BiosConfig
    tokenizer: Tokenizer
    tokens: np.ndarray  # [n_train_tokens] uint16/uint32, documents separated by EOS
    val_tokens: np.ndarray  # [n_val_tokens]
    qa_eval: list[dict]  # held-out QA: {"question", "answers", "person", "attribute"}
    qa_train: list[dict]  # the QA pairs mixed into the training text
    value_set_sizes: dict[str, int]  # |V_a| per attribute that carries information
    names: list[str]  # [n_people]
    values: dict[str, np.ndarray] = field(repr=False)  # attribute -> [n_people] value index
    value_strings: dict[str, list[str]] = field(repr=False)  # attribute -> rendered values

    @property
    def capacity_bits(self) -> float:
        """N · Σ_a log2 |V_a|: the information in the dataset, the ceiling of bits stored."""
        n = self.config.n_people
        return n * sum(math.log2(v) for v in self.value_set_sizes.values())

    def answer(self, person: int, attribute: str) -> str:
        return self.value_strings[attribute][int(self.values[attribute][person])]

    def probe_records(self) -> list[dict]:
        """For every person and information-carrying attribute: a prompt that ends right
        before the value in the first bio template, and the value. Sum their answer NLL in
        bits per attribute for :func:`memlayers.metrics.knowledge_bits`."""
        if self.config.compact:
            return list(self.qa_eval)
        out = []
        for a in ATTRIBUTES:
            prefix = BIO_TEMPLATES[a][0].split("{value}")[0].rstrip()
            for i, name in enumerate(self.names):
                out.append(
                    {
                        "question": prefix.format(name=name),
                        "answers": [self.answer(i, a)],
                        "person": i,
                        "attribute": a,
                    }
                )
        return out

    def documents(self, max_docs: int | None = None, split: str = "train") -> list[str]:
        """Decoded documents of a stream (for inspection and tests)."""
        toks = self.tokens if split == "train" else self.val_tokens
        eos = self.tokenizer.eos_id
        ends = np.flatnonzero(toks == eos)
        if max_docs is not None:
            ends = ends[:max_docs]
        starts = np.concatenate([[0], ends[:-1] + 1])
        return [
            self.tokenizer.decode(toks[s:e].tolist()) for s, e in zip(starts, ends, strict=True)
        ]

    def save(self, out_dir: str | Path) -> Path:
        """Write ``train.bin``/``val.bin`` (raw arrays), ``tokenizer.json``,
        ``qa_eval.jsonl``, ``qa_train.jsonl`` and ``meta.json`` into ``out_dir``."""
        from memlayers.data.qa import write_qa_jsonl

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tokens.tofile(out / "train.bin")
        self.val_tokens.tofile(out / "val.bin")
        self.tokenizer.save(out / "tokenizer.json")
        write_qa_jsonl(out / "qa_eval.jsonl", self.qa_eval)
        write_qa_jsonl(out / "qa_train.jsonl", self.qa_train)
        meta = {
            "config": asdict(self.config),
            "dtype": str(self.tokens.dtype),
            "n_train_tokens": int(self.tokens.size),
            "n_val_tokens": int(self.val_tokens.size),
            "vocab_size": self.tokenizer.vocab_size,
            "eos_id": self.tokenizer.eos_id,
            "value_set_sizes": self.value_set_sizes,
            "capacity_bits": self.capacity_bits,
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=2))
        return out


# --------------------------------------------------------------------------------------
# The invented universe


def _invented_words(n: int, seed: int, exclude: set[str]) -> list[str]:
    """``n`` unique capitalised pronounceable words, deterministic in ``seed``."""
    onsets = ("b br c ch d dr f g gr h j k l m n p pr r s sh st t th tr v w z").split(" ")  # noqa: SIM905
    vowels = ["a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ea", "io", "ou"]
    codas = ["-", "-", "-", "n", "r", "l", "s", "th", "m", "x", "nd", "rt", "ck"]
    rng = np.random.default_rng(seed)
    words: list[str] = []
    seen = set(exclude)
    while len(words) < n:
        n_syl = int(rng.integers(2, 4))
        w = "".join(
            onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))]
            for _ in range(n_syl)
        )
        coda = codas[rng.integers(len(codas))]
        w = (w + ("" if coda == "-" else coda)).capitalize()
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def _fixed_words() -> set[str]:
    texts = [*MONTHS, *MAJORS, *_UNIVERSITY_FORMS, *_COMPANY_FORMS, *COMPANY_TEMPLATES]
    texts += [t for ts in BIO_TEMPLATES.values() for t in ts] + list(QUESTIONS.values())
    return {w.strip() for t in texts for w in WordTokenizer.pieces(t)}


@dataclass(frozen=True)
class _Universe:
    first: list[str]
    last: list[str]
    cities: list[str]
    universities: list[str]
    employers: list[str]


def _universe() -> _Universe:
    n_stems = N_FIRST + N_LAST + N_CITIES + N_UNIVERSITIES + N_EMPLOYERS
    w = _invented_words(n_stems, _UNIVERSE_SEED, _fixed_words())
    cuts = np.cumsum([N_FIRST, N_LAST, N_CITIES, N_UNIVERSITIES])
    first, last, cities, ustems, estems = (
        w[a:b] for a, b in zip([0, *cuts], [*cuts, None], strict=True)
    )
    unis = [_UNIVERSITY_FORMS[i % len(_UNIVERSITY_FORMS)].format(s) for i, s in enumerate(ustems)]
    emps = [_COMPANY_FORMS[i % len(_COMPANY_FORMS)].format(s) for i, s in enumerate(estems)]
    return _Universe(first, last, cities, unis, emps)


# --------------------------------------------------------------------------------------
# Fragment pool and vectorised assembly


class _Pool:
    """Fragments (strings) → token ids in one flat pool; a fragment is (start, length).

    Slots are contiguous runs of fragments (one per possible value), so the fragment of
    value ``v`` in slot ``s`` is ``slot_base[s] + v``."""

    def __init__(self) -> None:
        self.strings: list[str] = [""]  # fragment 0 is empty: padding
        self.slot_base: dict[str, int] = {}
        self.fixed: dict[str, int] = {"": 0}

    def add_slot(self, name: str, strings: Sequence[str]) -> None:
        self.slot_base[name] = len(self.strings)
        self.strings.extend(strings)

    def fixed_id(self, s: str) -> int:
        if s not in self.fixed:
            self.fixed[s] = len(self.strings)
            self.strings.append(s)
        return self.fixed[s]

    def tokenize(self, tok: Tokenizer) -> None:
        """Tokenise every fragment, plus one more holding the EOS token (``self.eos``)."""
        ids = tok.encode_batch(self.strings) + [[tok.eos_id]]
        self.eos = len(self.strings)
        self.length = np.array([len(x) for x in ids], dtype=np.int64)  # [n_fragments]
        self.start = np.concatenate([[0], np.cumsum(self.length)[:-1]])
        self.tokens = np.array([t for x in ids for t in x], dtype=np.int64)  # [pool]


def _gather(pool: _Pool, frags: np.ndarray) -> np.ndarray:
    """Tokens of the concatenation of fragments ``frags`` ([n] ids) in order."""
    lens = pool.length[frags]  # [n]
    total = int(lens.sum())
    # position j of fragment f's tokens sits at pool.start[f] + j: one repeat + arange
    out_starts = np.cumsum(lens) - lens  # [n]
    idx = np.repeat(pool.start[frags] - out_starts, lens) + np.arange(total)  # [total]
    return pool.tokens[idx]


def _parse(template: str, initial: bool) -> list[tuple[str, str]]:
    """A template → [("text", s) | ("slot", name)] where slots carry their leading space.

    Text before a slot loses its trailing space (the slot's fragment starts with one); a
    sentence not at the start of a document starts with a space."""
    t = template if initial else " " + template
    parts: list[tuple[str, str]] = []
    rest = t
    while rest:
        i = rest.find("{")
        if i < 0:
            parts.append(("text", rest))
            break
        j = rest.index("}", i)
        before = rest[:i]
        if before:
            if not before.endswith(" "):
                raise ValueError(f"template {template!r}: a slot must follow a space")
            if before[:-1]:
                parts.append(("text", before[:-1]))
        parts.append(("slot", rest[i + 1 : j]))
        rest = rest[j + 1 :]
    return parts


@dataclass
class _Kinds:
    """Sentence kinds as padded rows of (slot or fixed fragment) per position."""

    slot: np.ndarray  # [n_kinds, P] int64 slot index or -1
    fixed: np.ndarray  # [n_kinds, P] int64 fixed fragment id (0 where slot or padding)


def _build_kinds(pool: _Pool, patterns: list[list[tuple[str, str]]], slot_names: list[str]):
    width = max(len(p) for p in patterns)
    slot = np.full((len(patterns), width), -1, dtype=np.int64)
    fixed = np.zeros((len(patterns), width), dtype=np.int64)
    for k, pat in enumerate(patterns):
        for p, (what, s) in enumerate(pat):
            if what == "slot":
                slot[k, p] = slot_names.index(s)
            else:
                fixed[k, p] = pool.fixed_id(s)
    return _Kinds(slot, fixed)


def _assemble_docs(
    pool: _Pool,
    kinds: _Kinds,
    slot_base: np.ndarray,  # [n_slots] first fragment of each slot
    slot_values: np.ndarray,  # [n_slots, n_entities] value index per entity
    doc_kinds: np.ndarray,  # [n_docs, S] sentence kind per position, -1 = none
    doc_entity: np.ndarray,  # [n_docs] entity whose values fill the slots
    dtype: np.dtype,
    chunk: int = 1 << 17,
) -> np.ndarray:
    """All documents' tokens, each followed by EOS, in ``doc_kinds`` order."""
    out = []
    width = kinds.slot.shape[1]
    for lo in range(0, len(doc_kinds), chunk):
        dk = doc_kinds[lo : lo + chunk]  # [n, S]
        ent = doc_entity[lo : lo + chunk]  # [n]
        n, s = dk.shape
        k = np.maximum(dk, 0)
        slot = kinds.slot[k]  # [n, S, P]
        frag = np.where(
            slot >= 0,
            slot_base[np.maximum(slot, 0)] + slot_values[np.maximum(slot, 0), ent[:, None, None]],
            kinds.fixed[k],
        )  # [n, S, P]
        frag[dk < 0] = 0  # absent sentences are empty fragments
        frag = frag.reshape(n, s * width)
        frag = np.concatenate([frag, np.full((n, 1), pool.eos, dtype=np.int64)], axis=1)
        out.append(_gather(pool, frag.reshape(-1)).astype(dtype))  # chunked: peak memory
    return np.concatenate(out)


def _unique_names(n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, 3] (first, middle, last) indices, all triples distinct."""
    got = np.empty((0, 3), dtype=np.int64)
    while len(got) < n:
        draw = np.stack(
            [
                rng.integers(0, N_FIRST, 2 * n),
                rng.integers(0, N_FIRST, 2 * n),
                rng.integers(0, N_LAST, 2 * n),
            ],
            axis=1,
        )
        cand = np.concatenate([got, draw])
        key = (cand[:, 0] * N_FIRST + cand[:, 1]) * N_LAST + cand[:, 2]
        _, first_seen = np.unique(key, return_index=True)
        got = cand[np.sort(first_seen)]  # keep draw order: deterministic and unbiased
    return got[:n]


def _check_tokenization(tok: Tokenizer, tokens: np.ndarray, n_docs: int = 50):
    """Fragments were tokenised one by one: verify that equals tokenising whole documents
    (true by construction for the word tokenizer; a BPE must split at word starts)."""
    eos = tok.eos_id
    ends = np.flatnonzero(tokens == eos)[:n_docs]
    starts = np.concatenate([[0], ends[:-1] + 1])
    for s, e in zip(starts, ends, strict=True):
        doc = tokens[s:e].tolist()
        again = tok.encode(tok.decode(doc))
        if again != doc:
            raise ValueError(
                f"{type(tok).__name__} does not tokenise bios fragments compositionally: "
                f"{tok.decode(doc)!r} encodes to {again[:20]}…, assembled {doc[:20]}…"
            )


# --------------------------------------------------------------------------------------
# Build


def build_bios(
    n_people: int = 1000,
    exposures: int = 100,
    seed: int = 0,
    compact: bool = False,
    tokenizer: Tokenizer | None = None,
    **options,
) -> BiosData:
    """Build everything a bios run needs; ``options`` are the other :class:`BiosConfig`
    fields. ``tokenizer=None`` builds the closed :class:`WordTokenizer` of the universe."""
    cfg = BiosConfig(n_people=n_people, exposures=exposures, seed=seed, compact=compact, **options)
    return _build_compact(cfg, tokenizer) if cfg.compact else _build_prose(cfg, tokenizer)


def _token_dtype(tok: Tokenizer) -> type:
    return np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32


def _rng(cfg: BiosConfig, stream: int) -> np.random.Generator:
    # independent streams: changing e.g. exposures never changes who the people are
    return np.random.default_rng([cfg.seed, stream])


def _split_people(cfg: BiosConfig) -> np.ndarray:
    """[n_people] bool: True for train-QA people."""
    n_train = int(round(cfg.qa_train_frac * cfg.n_people))
    order = _rng(cfg, 2).permutation(cfg.n_people)
    is_train = np.zeros(cfg.n_people, dtype=bool)
    is_train[order[:n_train]] = True
    return is_train


def _build_prose(cfg: BiosConfig, tokenizer: Tokenizer | None) -> BiosData:
    u = _universe()
    n = cfg.n_people
    rng = _rng(cfg, 1)
    name_idx = _unique_names(n, rng)  # [N, 3]
    month = rng.integers(0, 12, n)
    day = rng.integers(0, N_DAYS, n)
    year = rng.integers(0, len(YEARS), n)
    bcity = rng.integers(0, N_CITIES, n)
    univ = rng.integers(0, N_UNIVERSITIES, n)
    major = rng.integers(0, len(MAJORS), n)
    employer = rng.integers(0, N_EMPLOYERS, n)
    hq = np.random.default_rng(_UNIVERSE_SEED + 1).integers(0, N_CITIES, N_EMPLOYERS)
    date = (month * N_DAYS + day) * len(YEARS) + year  # [N] one index in 12·28·200

    # Entities: people 0..N-1, then companies N..N+262 (company docs use slots too).
    n_ent = n + N_EMPLOYERS
    person_values = {
        "first0": name_idx[:, 0], "first": name_idx[:, 0], "middle": name_idx[:, 1],
        "last": name_idx[:, 2], "month": month, "day": day, "year": year,
        "birth_city": bcity, "university": univ, "major": major, "employer": employer,
        "work_city": hq[employer], "employer0": employer,
    }  # fmt: skip
    slot_names = list(person_values)
    vals = np.zeros((len(slot_names), n_ent), dtype=np.int64)  # [n_slots, n_ent]
    for s, v in person_values.items():
        vals[slot_names.index(s), :n] = v
    vals[slot_names.index("employer"), n:] = np.arange(N_EMPLOYERS)
    vals[slot_names.index("employer0"), n:] = np.arange(N_EMPLOYERS)
    vals[slot_names.index("work_city"), n:] = hq

    pool = _Pool()
    pool.add_slot("first0", u.first)
    pool.add_slot("first", [" " + w for w in u.first])
    pool.add_slot("middle", [" " + w for w in u.first])
    pool.add_slot("last", [" " + w for w in u.last])
    pool.add_slot("month", [" " + m for m in MONTHS])
    pool.add_slot("day", [f" {d + 1}" for d in range(N_DAYS)])
    pool.add_slot("year", [f" {y}" for y in YEARS])
    pool.add_slot("birth_city", [" " + c for c in u.cities])
    pool.add_slot("university", [" " + x for x in u.universities])
    pool.add_slot("major", [" " + x for x in MAJORS])
    pool.add_slot("employer", [" " + x for x in u.employers])
    pool.add_slot("work_city", [" " + c for c in u.cities])
    pool.add_slot("employer0", list(u.employers))

    def expand(parts, initial, value_slot):
        out: list[tuple[str, str]] = []
        for what, s in parts:
            if what == "slot" and s == "name":
                out += [
                    ("slot", "first0" if initial and not out else "first"),
                    ("slot", "middle"),
                    ("slot", "last"),
                ]
            elif what == "slot" and s == "value" and value_slot == "birth_date":
                out += [("slot", "month"), ("slot", "day"), ("text", ","), ("slot", "year")]
            elif what == "slot" and s in ("value", "company"):
                out.append(("slot", value_slot if s == "value" else "employer"))
            else:
                out.append((what, s))
        return out

    # Sentence kinds: bio (attribute, template, initial?), then QA (attribute), company.
    t_per = cfg.n_templates or 6
    patterns, kind_of = [], {}
    for a in ATTRIBUTES:
        for t, tpl in enumerate(BIO_TEMPLATES[a][:t_per]):
            for initial in (False, True):
                kind_of[("bio", a, t, initial)] = len(patterns)
                patterns.append(expand(_parse(tpl, initial), initial, a))
    qa_attrs = ATTRIBUTES + DERIVED
    for a in qa_attrs:
        kind_of[("qa", a)] = len(patterns)
        patterns.append(expand(_parse(QUESTIONS[a] + " {value}", True), True, a))
    for t, tpl in enumerate(COMPANY_TEMPLATES):
        kind_of[("company", t)] = len(patterns)
        pattern = []
        for what, s in _parse(tpl, True):
            if (what, s) == ("slot", "company"):
                # a company name opening the document has no leading space
                s = "employer" if pattern else "employer0"
            elif (what, s) == ("slot", "value"):
                s = "work_city"
            pattern.append((what, s))
        patterns.append(pattern)
    kinds = _build_kinds(pool, patterns, slot_names)
    slot_base = np.array([pool.slot_base[s] for s in slot_names], dtype=np.int64)

    if tokenizer is None:
        tokenizer = WordTokenizer.from_texts(pool.strings)
    pool.tokenize(tokenizer)

    # Bio documents: [n_docs, A] kinds, shuffled sentence order, re-sampled templates.
    n_attr = len(ATTRIBUTES)
    bio_kind = np.array(
        [[kind_of[("bio", a, t, i)] for t in range(t_per) for i in (0, 1)] for a in ATTRIBUTES]
    ).reshape(n_attr, t_per, 2)

    def bio_docs(rng: np.random.Generator, reps: int):
        people = np.tile(np.arange(n), reps)  # [D]
        order = np.argsort(rng.random((len(people), n_attr)), axis=1)  # [D, A] attributes
        tpl = rng.integers(0, t_per, (len(people), n_attr))  # [D, A]
        initial = np.zeros((len(people), n_attr), dtype=np.int64)
        initial[:, 0] = 1
        return bio_kind[order, tpl, initial], people

    is_train = _split_people(cfg)
    rng = _rng(cfg, 3)
    dk_bio, ent_bio = bio_docs(rng, cfg.exposures)
    qa_reps = cfg.qa_exposures if cfg.qa_exposures is not None else max(1, cfg.exposures // 10)
    train_people = np.flatnonzero(is_train)
    qa_k = np.array([kind_of[("qa", a)] for a in qa_attrs])
    ent_qa = np.tile(np.repeat(train_people, len(qa_attrs)), qa_reps)
    dk_qa = np.full((len(ent_qa), n_attr), -1, dtype=np.int64)
    dk_qa[:, 0] = np.tile(np.tile(qa_k, len(train_people)), qa_reps)
    co_reps = cfg.exposures if cfg.company_exposures is None else cfg.company_exposures
    ent_co = np.tile(np.arange(N_EMPLOYERS) + n, co_reps)
    dk_co = np.full((len(ent_co), n_attr), -1, dtype=np.int64)
    dk_co[:, 0] = rng.integers(0, len(COMPANY_TEMPLATES), len(ent_co)) + kind_of[("company", 0)]

    dk = np.concatenate([dk_bio, dk_qa, dk_co])
    ent = np.concatenate([ent_bio, ent_qa, ent_co])
    perm = rng.permutation(len(ent))
    dtype = _token_dtype(tokenizer)
    tokens = _assemble_docs(pool, kinds, slot_base, vals, dk[perm], ent[perm], dtype)
    dk_val, ent_val = bio_docs(_rng(cfg, 4), cfg.val_exposures)
    perm = _rng(cfg, 5).permutation(len(ent_val))
    val = _assemble_docs(pool, kinds, slot_base, vals, dk_val[perm], ent_val[perm], dtype)
    if not isinstance(tokenizer, WordTokenizer):
        _check_tokenization(tokenizer, tokens)

    names = [f"{u.first[f]} {u.first[m]} {u.last[la]}" for f, m, la in name_idx]
    value_strings = {
        "birth_date": [
            f"{MONTHS[v // (N_DAYS * len(YEARS))]} "
            f"{v // len(YEARS) % N_DAYS + 1}, {YEARS[v % len(YEARS)]}"
            for v in range(12 * N_DAYS * len(YEARS))
        ],
        "birth_city": u.cities,
        "university": u.universities,
        "major": list(MAJORS),
        "employer": u.employers,
        "work_city": u.cities,
    }
    values = {
        "birth_date": date,
        "birth_city": bcity,
        "university": univ,
        "major": major,
        "employer": employer,
        "work_city": hq[employer],
    }

    def qa_records(people: np.ndarray) -> list[dict]:
        return [
            {
                "question": QUESTIONS[a].format(name=names[i]),
                "answers": [value_strings[a][int(values[a][i])]],
                "person": int(i),
                "attribute": a,
            }
            for i in people
            for a in qa_attrs
        ]

    return BiosData(
        config=cfg,
        tokenizer=tokenizer,
        tokens=tokens,
        val_tokens=val,
        qa_eval=qa_records(np.flatnonzero(~is_train)),
        qa_train=qa_records(train_people),
        value_set_sizes={
            "birth_date": 12 * N_DAYS * len(YEARS),
            "birth_city": N_CITIES,
            "university": N_UNIVERSITIES,
            "major": len(MAJORS),
            "employer": N_EMPLOYERS,
        },
        names=names,
        values=values,
        value_strings=value_strings,
    )


def _build_compact(cfg: BiosConfig, tokenizer: Tokenizer | None) -> BiosData:
    u = _universe()
    n, k, c, d = cfg.n_people, cfg.compact_attributes, cfg.compact_chunks, cfg.compact_values
    rng = _rng(cfg, 1)
    name_idx = _unique_names(n, rng)  # [N, 3]
    chunks = rng.integers(0, d, (n, k, c))  # [N, K, C] value chunk per attribute

    pool = _Pool()
    pool.add_slot("first0", u.first)
    pool.add_slot("middle", [" " + w for w in u.first])
    pool.add_slot("last", [" " + w for w in u.last])
    pool.add_slot("chunk", [f" v{j}" for j in range(d)])
    slot_names = ["first0", "middle", "last"] + [f"c{j}" for j in range(c)]
    # one pattern per attribute: name, "attr<k>", its C chunks (slot c<j> reads chunk j of
    # the document's attribute: values are indexed by entity = person·K + attribute)
    patterns = [
        [("slot", "first0"), ("slot", "middle"), ("slot", "last"), ("text", f" attr{a}")]
        + [("slot", f"c{j}") for j in range(c)]
        for a in range(k)
    ]
    kinds = _build_kinds(pool, patterns, slot_names)
    slot_base = np.array(
        [pool.slot_base[s] for s in slot_names[:3]] + [pool.slot_base["chunk"]] * c, dtype=np.int64
    )
    ent_names = np.repeat(name_idx, k, axis=0)  # [N·K, 3]
    vals = np.concatenate([ent_names.T, chunks.reshape(n * k, c).T])  # [3 + C, N·K]

    if tokenizer is None:
        tokenizer = WordTokenizer.from_texts(pool.strings)
    pool.tokenize(tokenizer)

    def docs(rng: np.random.Generator, reps: int) -> np.ndarray:
        ent = rng.permutation(np.tile(np.arange(n * k), reps))  # [N·K·reps] record ids
        return _assemble_docs(pool, kinds, slot_base, vals, (ent % k)[:, None], ent, dtype)

    dtype = _token_dtype(tokenizer)
    tokens = docs(_rng(cfg, 3), cfg.exposures)
    val = docs(_rng(cfg, 4), cfg.val_exposures)
    if not isinstance(tokenizer, WordTokenizer):
        _check_tokenization(tokenizer, tokens)

    names = [f"{u.first[f]} {u.first[m]} {u.last[la]}" for f, m, la in name_idx]
    attrs = [f"attr{a}" for a in range(k)]
    # value index of an attribute: its chunks read as a base-D number
    values = (
        {a: (chunks[:, i, :] * d ** np.arange(c - 1, -1, -1)).sum(1) for i, a in enumerate(attrs)}
        if d**c < 1 << 62
        else {}
    )
    records = [
        {
            "question": f"{names[i]} {a}",
            "answers": [" ".join(f"v{j}" for j in chunks[i, ai])],
            "person": i,
            "attribute": a,
        }
        for i in range(n)
        for ai, a in enumerate(attrs)
    ]
    return BiosData(
        config=cfg,
        tokenizer=tokenizer,
        tokens=tokens,
        val_tokens=val,
        qa_eval=records,
        qa_train=[],
        value_set_sizes={a: d**c for a in attrs},
        names=names,
        values=values,
        value_strings={},
    )
