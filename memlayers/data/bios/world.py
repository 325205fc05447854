"""The bios world: the attributes, their value sets, and the invented universe (names,
cities, universities, companies: fixed words, independent of the run seed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memlayers.data.bios.render import BIO_TEMPLATES, COMPANY_TEMPLATES, QUESTIONS
from memlayers.data.tokenizer import WordTokenizer

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

UNIVERSE_SEED = 20240917  # fixes the invented words; the run seed never changes them

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
class Universe:
    first: list[str]
    last: list[str]
    cities: list[str]
    universities: list[str]
    employers: list[str]


def universe() -> Universe:
    n_stems = N_FIRST + N_LAST + N_CITIES + N_UNIVERSITIES + N_EMPLOYERS
    w = _invented_words(n_stems, UNIVERSE_SEED, _fixed_words())
    cuts = np.cumsum([N_FIRST, N_LAST, N_CITIES, N_UNIVERSITIES])
    first, last, cities, ustems, estems = (
        w[a:b] for a, b in zip([0, *cuts], [*cuts, None], strict=True)
    )
    unis = [_UNIVERSITY_FORMS[i % len(_UNIVERSITY_FORMS)].format(s) for i, s in enumerate(ustems)]
    emps = [_COMPANY_FORMS[i % len(_COMPANY_FORMS)].format(s) for i, s in enumerate(estems)]
    return Universe(first, last, cities, unis, emps)


def unique_names(n: int, rng: np.random.Generator) -> np.ndarray:
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
