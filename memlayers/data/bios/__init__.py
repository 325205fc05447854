"""The synthetic knowledge benchmark ("bios", after Allen-Zhu & Li, Physics of LMs 3.1/3.3).

N people with unique names, each with independent uniform attributes whose entropy is
exact:

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

The package: ``world`` (attributes, value sets, the invented universe), ``render``
(templates, questions, the fragment pool), ``dataset`` (BiosConfig, BiosData,
build_bios). The public names are re-exported here.
"""

from memlayers.data.bios.dataset import BiosConfig, BiosData, build_bios
from memlayers.data.bios.render import BIO_TEMPLATES, COMPANY_TEMPLATES, QUESTIONS
from memlayers.data.bios.world import ATTRIBUTES, DERIVED, MAJORS, MONTHS, N_DAYS, YEARS

__all__ = [
    "ATTRIBUTES",
    "BIO_TEMPLATES",
    "COMPANY_TEMPLATES",
    "DERIVED",
    "MAJORS",
    "MONTHS",
    "N_DAYS",
    "QUESTIONS",
    "YEARS",
    "BiosConfig",
    "BiosData",
    "build_bios",
]
