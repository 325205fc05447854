"""Bios text: the sentence templates and questions, and their vectorised rendering.

Every fragment (template text, name part, value) is tokenised once into a :class:`Pool`;
a document is a row of fragment ids built with numpy and the token stream is one gather
from the pool, so text is never generated and re-tokenised."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from memlayers.data.tokenizer import Tokenizer

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


# --------------------------------------------------------------------------------------
# Fragment pool and vectorised assembly


class Pool:
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


def gather(pool: Pool, frags: np.ndarray) -> np.ndarray:
    """Tokens of the concatenation of fragments ``frags`` ([n] ids) in order."""
    lens = pool.length[frags]  # [n]
    total = int(lens.sum())
    # position j of fragment f's tokens sits at pool.start[f] + j: one repeat + arange
    out_starts = np.cumsum(lens) - lens  # [n]
    idx = np.repeat(pool.start[frags] - out_starts, lens) + np.arange(total)  # [total]
    return pool.tokens[idx]


def parse_template(template: str, initial: bool) -> list[tuple[str, str]]:
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
class Kinds:
    """Sentence kinds as padded rows of (slot or fixed fragment) per position."""

    slot: np.ndarray  # [n_kinds, P] int64 slot index or -1
    fixed: np.ndarray  # [n_kinds, P] int64 fixed fragment id (0 where slot or padding)


def build_kinds(pool: Pool, patterns: list[list[tuple[str, str]]], slot_names: list[str]):
    width = max(len(p) for p in patterns)
    slot = np.full((len(patterns), width), -1, dtype=np.int64)
    fixed = np.zeros((len(patterns), width), dtype=np.int64)
    for k, pat in enumerate(patterns):
        for p, (what, s) in enumerate(pat):
            if what == "slot":
                slot[k, p] = slot_names.index(s)
            else:
                fixed[k, p] = pool.fixed_id(s)
    return Kinds(slot, fixed)


def assemble_docs(
    pool: Pool,
    kinds: Kinds,
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
        out.append(gather(pool, frag.reshape(-1)).astype(dtype))  # chunked: peak memory
    return np.concatenate(out)


def check_tokenization(tok: Tokenizer, tokens: np.ndarray, n_docs: int = 50):
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
