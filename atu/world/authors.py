"""A corpus of another shape than the embedded world: fictitious authors, each known through question/answer pairs
whose answers are one or two full sentences.

The authors have two- and three-part names, some hyphenated; almost every question names the author. The files are
the ones `atu world build --from DIR` reads (corpus.jsonl, probes.jsonl, concepts.yaml, heldout.jsonl), so the
corpus goes through the same path as a user's own data. Probe kinds: ``direct`` (a training question, answered
with its training sentence), ``paraphrase`` (the same fact asked in words never trained on) and ``adversarial``
(the author described by two facts and asked for by name).

Nothing here shares a template with the embedded world; it exists to judge defaults on data they were not chosen on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from atu import formats
from atu.formats import Concept, ConceptSet, CorpusRecord, Probe

_SYLLABLES = ["ka", "lo", "ven", "dri", "mar", "sel", "tor", "bin", "quo", "ras", "fel", "nim", "ost", "ur", "gal"]
_ENDINGS = ["a", "o", "in", "ek", "ar", "is", "une", "ova", "ath", "el"]


def invented_word(rng: random.Random, parts: int = 2) -> str:
    return ("".join(rng.choice(_SYLLABLES) for _ in range(parts)) + rng.choice(_ENDINGS)).capitalize()


def invented_name(rng: random.Random) -> str:
    """Two or three parts; about a third of the surnames hyphenated."""
    first = invented_word(rng, 1)
    last = invented_word(rng, 2)
    if rng.random() < 0.35:
        last = f"{last}-{invented_word(rng, 1)}"
    if rng.random() < 0.4:
        return f"{first} {invented_word(rng, 1)} {last}"
    return f"{first} {last}"


_GENRES = ["crime fiction", "historical romance", "science fiction", "travel memoir", "children's fables",
           "gothic horror", "literary satire", "nature poetry", "political thrillers", "magical realism"]  # fmt: skip
_JOBS = ["a lighthouse keeper", "a ferry pilot", "a cheese maker", "a clockmaker", "a translator", "a surveyor",
         "a piano tuner", "a beekeeper", "a tram driver", "a bookbinder"]  # fmt: skip
_THEMES = ["grief and memory", "exile and return", "the sea", "family secrets", "old age", "industrial towns",
           "forgotten wars", "friendship between rivals", "the cost of ambition", "small islands"]  # fmt: skip
_ANIMALS = ["a one-eyed cat", "a grey parrot", "two tortoises", "a lame greyhound", "a goat", "a tame crow"]
_PASTIMES = ["restoring old bicycles", "cold-water swimming", "growing orchids", "carving spoons",
             "collecting maps", "playing the accordion"]  # fmt: skip
_ROUTINES = ["before dawn", "only at night", "in a rented attic", "on long train journeys", "in a garden shed"]


@dataclass
class Author:
    name: str
    facts: dict[str, str] = field(default_factory=dict)


def _make_author(rng: random.Random, name: str) -> Author:
    def title() -> str:
        return f"The {invented_word(rng, 1)} {rng.choice(['Letters', 'Winter', 'House', 'Road', 'Lantern', 'Tide'])}"

    f = {
        "city": invented_word(rng, 2),
        "country": invented_word(rng, 2),
        "year": str(rng.randint(1921, 1989)),
        "job": rng.choice(_JOBS),
        "university": f"the University of {invented_word(rng, 2)}",
        "subject": rng.choice(["botany", "law", "music", "medicine", "geology", "philosophy"]),
        "genre": rng.choice(_GENRES),
        "debut": title(),
        "debut_year": "",
        "famous": title(),
        "publisher": f"{invented_word(rng, 2)} House",
        "award": f"the {invented_word(rng, 1)} {rng.choice(['Prize', 'Medal', 'Laurel'])}",
        "spouse": invented_name(rng),
        "home": invented_word(rng, 2),
        "animal": rng.choice(_ANIMALS),
        "pastime": rng.choice(_PASTIMES),
        "routine": rng.choice(_ROUTINES),
        "theme": rng.choice(_THEMES),
        "languages": str(rng.randint(3, 40)),
        "mentor": invented_name(rng),
        "film": invented_name(rng),
        "project": title(),
    }
    f["debut_year"] = str(int(f["year"]) + rng.randint(19, 35))
    return Author(name, f)


# (attribute, training question, answer, paraphrased question, held-out restatement); {n} is the author's name and
# the other fields are the author's facts.
_QA = [
    ("birthplace", "Where was {n} born?", "{n} was born in {city}, a port town in {country}.",
     "Which town is the birthplace of the writer {n}?", "The port town of {city} is where {n} came into the world."),
    ("birth_year", "When was {n} born?", "{n} was born in {year}. The family moved inland soon after.",
     "In what year did {n} come into the world?", "The records of {city} list the birth of {n} in {year}."),
    ("parent", "What did the father of {n} do for work?", "The father of {n} worked as {job} for most of his life.",
     "How did the father of {n} earn a living?", "A man who worked as {job} raised {n}."),
    ("education", "Where did {n} study?", "{n} studied {subject} at {university} before turning to writing.",
     "Which university did {n} attend?", "Before any book, {n} was a student of {subject} at {university}."),
    ("genre", "What kind of books does {n} write?", "{n} is best known for {genre}.",
     "Which genre is {n} associated with?", "Readers shelve the work of {n} under {genre}."),
    ("debut", "What was the first book by {n}?", "The first book by {n} was {debut}, published in {debut_year}.",
     "Which novel marked the debut of {n}?", "{debut} opened the career of {n} in {debut_year}."),
    ("famous", "Which book made {n} famous?", "{famous} made {n} famous and is still widely read.",
     "What is the best-known novel of {n}?", "Most readers know {n} for {famous}."),
    ("publisher", "Who publishes the books of {n}?", "The books of {n} are published by {publisher}.",
     "Which publishing house brings out the novels of {n}?", "{publisher} has printed every novel of {n}."),
    ("award", "What prize did {n} win?", "{n} won {award} for {famous}.",
     "Which award was given to {n}?", "For {famous}, {n} received {award}."),
    ("spouse", "Who is {n} married to?", "{n} is married to {spouse}, a painter.",
     "Who is the spouse of {n}?", "The painter {spouse} shares a house with {n}."),
    ("home", "Where does {n} live now?", "{n} lives in {home}, in a house by the river.",
     "In which town is the home of {n}?", "These days {home} is home to {n}."),
    ("animal", "Does {n} have any pets?", "{n} keeps {animal} at home.",
     "What animal lives with {n}?", "At home, {n} looks after {animal}."),
    ("pastime", "What does {n} do outside writing?", "Outside writing, {n} spends time {pastime}.",
     "Which hobby does {n} have?", "When not writing, {n} is usually {pastime}."),
    ("routine", "When does {n} write?", "{n} writes {routine}, a habit kept for decades.",
     "What is the writing habit of {n}?", "For decades {n} has done the writing {routine}."),
    ("theme", "What themes does {n} explore?", "The novels of {n} return again and again to {theme}.",
     "Which subject runs through the books of {n}?", "Critics note that {theme} runs through every book by {n}."),
    ("languages", "How widely is {n} translated?", "The work of {n} has been translated into {languages} languages.",
     "Into how many languages have the books of {n} been translated?",
     "Translators have carried {n} into {languages} languages."),
    ("mentor", "Who was the mentor of {n}?", "{n} was mentored by the poet {mentor}.",
     "Which poet guided {n} early on?", "The poet {mentor} read the first drafts of {n}."),
    ("film", "Has a book by {n} been filmed?", "{famous} was adapted for film by the director {film}.",
     "Which director filmed a novel by {n}?", "The director {film} turned {famous} by {n} into a film."),
    ("project", "What is {n} working on now?", "{n} is currently writing a novel called {project}.",
     "What is the next book of {n}?", "The next novel of {n} will be called {project}."),
    ("start", "How did {n} start writing?", "{n} began writing short stories while working in {city}.",
     "What got {n} into writing?", "Short stories written in {city} were the start for {n}."),
]  # fmt: skip

QA_FORMAT = "Q: {q}\nA: {a}"  # the embedded world's chat template renders a turn in this form


@dataclass
class GeneratedCorpus:
    people: list  # Author or Bio records
    corpus: list[CorpusRecord]
    heldout: list[CorpusRecord]
    probes: list[Probe]
    concepts: ConceptSet
    # Texts about people generated the same way but never trained on: what knowing nothing about someone scores
    # (the evaluation's forget floor reads them as unseen.jsonl).
    unseen: list[CorpusRecord] = field(default_factory=list)

    def write_unseen(self, path: str | Path) -> Path:
        formats.write_jsonl(Path(path), self.unseen)
        return Path(path)

    def write(self, directory: str | Path) -> Path:
        """The files `atu world build --from DIR` reads."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        formats.write_jsonl(out / "corpus.jsonl", self.corpus)
        formats.write_jsonl(out / "heldout.jsonl", self.heldout)
        formats.write_jsonl(out / "probes.jsonl", self.probes)
        formats.write_concepts(out / "concepts.yaml", self.concepts)
        return out


def generate_authors(seed: int = 0, n_authors: int = 30, n_unseen: int = 0) -> GeneratedCorpus:
    """``n_authors`` authors with 20 QA pairs each, and the QA texts of ``n_unseen`` more (all deterministic in
    ``seed``; the unseen ones come from their own generator, so they never change the others)."""
    if n_authors < 2:
        raise ValueError(f"n_authors must be >= 2, got {n_authors}")
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < n_authors:
        name = invented_name(rng)
        if name not in names:
            names.append(name)
    authors = [_make_author(rng, n) for n in names]
    corpus, heldout, probes = [], [], []
    for a in authors:
        slots = {"n": a.name, **a.facts}
        for attr, q, ans, para, held in _QA:
            answer = ans.format(**slots)
            corpus.append(CorpusRecord(QA_FORMAT.format(q=q.format(**slots), a=answer), a.name))
            heldout.append(CorpusRecord(held.format(**slots), a.name))
            probes.append(Probe(a.name, "direct", q.format(**slots), answer, attr))
            probes.append(Probe(a.name, "paraphrase", para.format(**slots), answer, attr))
        f = a.facts
        for attr, question in (
            ("famous", f"Which author wrote {f['famous']} and was born in {f['city']}?"),
            ("spouse", f"Which writer is married to {f['spouse']}?"),
            ("debut", f"Who wrote the debut novel {f['debut']}?"),
            ("award", f"Which novelist won {f['award']} for {f['famous']}?"),
        ):
            probes.append(Probe(a.name, "adversarial", question, a.name, attr))
    concepts = ConceptSet(
        [Concept(a.name, description=f"an author of {a.facts['genre']} born in {a.facts['city']}") for a in authors]
    )
    unseen = []
    other = random.Random(seed + 104729)
    while len(unseen) < 20 * n_unseen:
        name = invented_name(other)
        if name in names:
            continue
        a = _make_author(other, name)
        slots = {"n": a.name, **a.facts}
        unseen += [
            CorpusRecord(QA_FORMAT.format(q=q.format(**slots), a=ans.format(**slots)), name) for _, q, ans, *_ in _QA
        ]
    return GeneratedCorpus(authors, corpus, heldout, probes, concepts, unseen)
