"""BiosConfig, BiosData and build_bios: people drawn from the world (world.py), rendered
into token streams and QA records (render.py)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from memlayers.data.bios.render import (
    BIO_TEMPLATES,
    COMPANY_TEMPLATES,
    QUESTIONS,
    Pool,
    assemble_docs,
    build_kinds,
    check_tokenization,
    parse_template,
)
from memlayers.data.bios.world import (
    ATTRIBUTES,
    DERIVED,
    MAJORS,
    MONTHS,
    N_CITIES,
    N_DAYS,
    N_EMPLOYERS,
    N_FIRST,
    N_LAST,
    N_UNIVERSITIES,
    UNIVERSE_SEED,
    YEARS,
    unique_names,
    universe,
)
from memlayers.data.qa import qa_record
from memlayers.data.tokenizer import Tokenizer, WordTokenizer


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
        # 0 is an ablation for these two (no QA documents, no company documents); the
        # validation stream (eval's perplexity) and the compact records need at least 1
        for name, least in (
            ("qa_exposures", 0), ("company_exposures", 0), ("val_exposures", 1),
            ("compact_attributes", 1), ("compact_chunks", 1), ("compact_values", 1),
        ):  # fmt: skip
            v = getattr(self, name)
            if v is not None and v < least:
                raise ValueError(f"{name} must be >= {least}, got {v}")
        if not self.compact and _n_qa_train(self) == self.n_people:
            raise ValueError(
                f"qa_train_frac={self.qa_train_frac} leaves no held-out people of "
                f"n_people={self.n_people} (round({self.qa_train_frac} * {self.n_people}) = "
                f"{self.n_people}): the held-out QA set would be empty"
            )


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
                    qa_record(prefix.format(name=name), self.answer(i, a), person=i, attribute=a)
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


def _n_qa_train(cfg: BiosConfig) -> int:
    """How many people are train-QA people."""
    return int(round(cfg.qa_train_frac * cfg.n_people))


def _split_people(cfg: BiosConfig) -> np.ndarray:
    """[n_people] bool: True for train-QA people."""
    n_train = _n_qa_train(cfg)
    order = _rng(cfg, 2).permutation(cfg.n_people)
    is_train = np.zeros(cfg.n_people, dtype=bool)
    is_train[order[:n_train]] = True
    return is_train


def _build_prose(cfg: BiosConfig, tokenizer: Tokenizer | None) -> BiosData:
    u = universe()
    n = cfg.n_people
    rng = _rng(cfg, 1)
    name_idx = unique_names(n, rng)  # [N, 3]
    month = rng.integers(0, 12, n)
    day = rng.integers(0, N_DAYS, n)
    year = rng.integers(0, len(YEARS), n)
    bcity = rng.integers(0, N_CITIES, n)
    univ = rng.integers(0, N_UNIVERSITIES, n)
    major = rng.integers(0, len(MAJORS), n)
    employer = rng.integers(0, N_EMPLOYERS, n)
    hq = np.random.default_rng(UNIVERSE_SEED + 1).integers(0, N_CITIES, N_EMPLOYERS)
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

    pool = Pool()
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
                patterns.append(expand(parse_template(tpl, initial), initial, a))
    qa_attrs = ATTRIBUTES + DERIVED
    for a in qa_attrs:
        kind_of[("qa", a)] = len(patterns)
        # a QA document is memlayers.data.qa.qa_text of the record, from fragments
        patterns.append(expand(parse_template(QUESTIONS[a] + " {value}", True), True, a))
    for t, tpl in enumerate(COMPANY_TEMPLATES):
        kind_of[("company", t)] = len(patterns)
        pattern = []
        for what, s in parse_template(tpl, True):
            if (what, s) == ("slot", "company"):
                # a company name opening the document has no leading space
                s = "employer" if pattern else "employer0"
            elif (what, s) == ("slot", "value"):
                s = "work_city"
            pattern.append((what, s))
        patterns.append(pattern)
    kinds = build_kinds(pool, patterns, slot_names)
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
    tokens = assemble_docs(pool, kinds, slot_base, vals, dk[perm], ent[perm], dtype)
    dk_val, ent_val = bio_docs(_rng(cfg, 4), cfg.val_exposures)
    perm = _rng(cfg, 5).permutation(len(ent_val))
    val = assemble_docs(pool, kinds, slot_base, vals, dk_val[perm], ent_val[perm], dtype)
    if not isinstance(tokenizer, WordTokenizer):
        check_tokenization(tokenizer, tokens)

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
            qa_record(
                QUESTIONS[a].format(name=names[i]),
                value_strings[a][int(values[a][i])],
                person=int(i),
                attribute=a,
            )
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
    u = universe()
    n, k, c, d = cfg.n_people, cfg.compact_attributes, cfg.compact_chunks, cfg.compact_values
    rng = _rng(cfg, 1)
    name_idx = unique_names(n, rng)  # [N, 3]
    chunks = rng.integers(0, d, (n, k, c))  # [N, K, C] value chunk per attribute

    pool = Pool()
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
    kinds = build_kinds(pool, patterns, slot_names)
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
        return assemble_docs(pool, kinds, slot_base, vals, (ent % k)[:, None], ent, dtype)

    dtype = _token_dtype(tokenizer)
    tokens = docs(_rng(cfg, 3), cfg.exposures)
    val = docs(_rng(cfg, 4), cfg.val_exposures)
    if not isinstance(tokenizer, WordTokenizer):
        check_tokenization(tokenizer, tokens)

    names = [f"{u.first[f]} {u.first[m]} {u.last[la]}" for f, m, la in name_idx]
    attrs = [f"attr{a}" for a in range(k)]
    # value index of an attribute: its chunks read as a base-D number
    values = (
        {a: (chunks[:, i, :] * d ** np.arange(c - 1, -1, -1)).sum(1) for i, a in enumerate(attrs)}
        if d**c < 1 << 62
        else {}
    )
    records = [
        qa_record(
            f"{names[i]} {a}", " ".join(f"v{j}" for j in chunks[i, ai]), person=i, attribute=a
        )
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
