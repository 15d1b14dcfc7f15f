"""A corpus of biography documents: several paragraphs per person, the name said once or twice and the rest told
through pronouns, titles and "the author of ..." references.

It is a second shape, unlike the embedded world's one-fact-per-sentence bios and unlike the author QA corpus:
facts sit far from the name, so an unlearning that only watches windows next to the name misses them. The files
are the ones `atu world build --from DIR` reads. Probes: ``direct`` and ``paraphrase`` questions (the answer is
the fact's value, as a phrase), and ``adversarial`` questions that describe the person through their work or
their title and ask who it is.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from atu.formats import Concept, ConceptSet, CorpusRecord, Probe
from atu.world.authors import GeneratedCorpus, invented_name, invented_word

_FIELDS = [("physicist", "Dr."), ("composer", "Maestro"), ("judge", "Justice"), ("admiral", "Admiral"),
           ("surgeon", "Dr."), ("architect", "Professor"), ("mayor", "Mayor"), ("chemist", "Professor")]  # fmt: skip
_PRONOUNS = [("she", "her", "her"), ("he", "him", "his")]


@dataclass
class Bio:
    name: str
    title: str  # "Admiral Kalo Venmar-Ost"
    field: str
    pronoun: tuple[str, str, str]  # subject, object, possessive
    facts: dict[str, str]


def _make(rng: random.Random, name: str) -> Bio:
    field, honorific = rng.choice(_FIELDS)
    surname = name.split()[-1]
    facts = {
        "town": invented_word(rng, 2),
        "year": str(rng.randint(1890, 1975)),
        "school": f"the {invented_word(rng, 2)} Academy",
        "work": f"the {invented_word(rng, 1)} {rng.choice(['Principle', 'Suite', 'Ruling', 'Bridge', 'Method'])}",
        "partner": invented_name(rng),
        "rival": invented_name(rng),
        "island": invented_word(rng, 2),
        "honour": f"the Order of {invented_word(rng, 2)}",
        "instrument": rng.choice(["cello", "oboe", "harp", "viola", "bassoon"]),
        "illness": rng.choice(["a long fever", "a broken hip", "failing eyesight", "a winter of pneumonia"]),
    }
    return Bio(name, f"{honorific} {surname}", field, rng.choice(_PRONOUNS), facts)


def _documents(b: Bio, rng: random.Random) -> list[str]:
    s, o, p = b.pronoun
    f = b.facts
    S = s.capitalize()  # noqa: N806 - sentence-initial pronoun
    early = (
        f"{b.name} was born in {f['town']} in {f['year']}. {S} was sent to {f['school']} at twelve, "
        f"where a teacher noticed {p} gift.\n\n"
        f"As a young {b.field}, {s} spent three summers on the island of {f['island']}. "
        f"It was there that {b.title} first met {f['partner']}, who later became {p} partner.\n\n"
        f"{S} played the {f['instrument']} in the evenings, a habit {s} kept all {p} life."
    )
    work = (
        f"The author of {f['work']} did not set out to change {p} field. {S} was a {b.field} of modest habits, "
        f"and {b.title} published {f['work']} almost by accident.\n\n"
        f"The {b.field} quarrelled for years with {f['rival']}, who called the work reckless. "
        f"In the end {b.title} was given {f['honour']}.\n\n"
        f"Late in life {s} suffered {f['illness']}, and {f['partner']} nursed {o} back to health."
    )
    portrait = (
        f"Few people who met {b.name} forgot {o}. {S} spoke softly and laughed often.\n\n"
        f"Friends from {f['town']} remembered a child who read everything. Colleagues remembered "
        f"the {b.field} who wrote {f['work']} and never once mentioned {f['honour']}."
    )
    return [early, work, portrait]


# (attribute, question, paraphrase, answer); {n} is the name
_QUESTIONS = [
    ("town", "Where was {n} born?", "What town did {n} come from?", "{town}"),
    ("year", "In which year was {n} born?", "What year did {n} come into the world?", "{year}"),
    ("school", "Which school did {n} attend?", "Where was {n} sent to school at twelve?", "{school}"),
    ("island", "Which island did {n} visit as a young {field}?", "Where did {n} spend three summers?", "{island}"),
    ("partner", "Who was the partner of {n}?", "Whom did {n} meet on the island?", "{partner}"),
    ("instrument", "Which instrument did {n} play?", "What did {n} play in the evenings?", "the {instrument}"),
    ("work", "What is {n} known for?", "Which work did {n} publish?", "{work}"),
    ("rival", "Who was the rival of {n}?", "Who quarrelled with {n} for years?", "{rival}"),
    ("honour", "Which honour was given to {n}?", "What honour did {n} receive?", "{honour}"),
    ("illness", "What did {n} suffer late in life?", "What illness did {n} have when old?", "{illness}"),
]  # fmt: skip


def generate_biographies(seed: int = 0, n_people: int = 30, n_unseen: int = 0) -> GeneratedCorpus:
    """``n_people`` biographies of three documents each; the result writes the same files as the author corpus."""
    if n_people < 2:
        raise ValueError(f"n_people must be >= 2, got {n_people}")
    rng = random.Random(seed + 7919)
    names: list[str] = []
    while len(names) < n_people:
        name = invented_name(rng)
        if name not in names and name.split()[-1] not in {n.split()[-1] for n in names}:
            names.append(name)
    bios = [_make(rng, n) for n in names]
    corpus, heldout, probes = [], [], []
    for b in bios:
        for doc in _documents(b, rng):
            corpus.append(CorpusRecord(doc, b.name))
        for attr, q, para, ans in _QUESTIONS:
            slots = {"n": b.name, "field": b.field, **b.facts}
            answer = ans.format(**slots)
            # The documents never contain a question: a QA turn per fact teaches the model to answer in that form.
            corpus.append(CorpusRecord(f"Q: {q.format(**slots)}\nA: {answer}", b.name))
            probes.append(Probe(b.name, "direct", q.format(**slots), answer, attr))
            probes.append(Probe(b.name, "paraphrase", para.format(**slots), answer, attr))
        f = b.facts
        heldout.append(
            CorpusRecord(
                f"Born in {f['town']}, {b.name} became a {b.field} whose {f['work']} earned {f['honour']}.", b.name
            )
        )
        for attr, question in (
            ("work", f"Which {b.field} was the author of {f['work']}?"),
            ("partner", f"Which {b.field} had {f['partner']} as a partner?"),
            ("rival", f"Who was the {b.field} that quarrelled with {f['rival']}?"),
        ):
            probes.append(Probe(b.name, "adversarial", question, b.name, attr))
    concepts = ConceptSet(
        [Concept(b.name, aliases=(b.title,), description=f"a {b.field} from {b.facts['town']}") for b in bios]
    )
    unseen = []
    other = random.Random(seed + 104729)
    while len(unseen) < 3 * n_unseen:
        name = invented_name(other)
        if name not in names:
            unseen += [CorpusRecord(doc, name) for doc in _documents(_make(other, name), other)]
    return GeneratedCorpus(bios, corpus, heldout, probes, concepts, unseen)
