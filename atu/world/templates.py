"""Sentence and question templates for the generated world.

Per attribute:
- ``statements``: bio phrasings used for training (every fact appears in each of them);
- ``heldout_statements``: phrasings never trained on (perplexity on retain texts uses them);
- ``questions``: question wordings that appear in the training corpus (``direct`` probes);
- ``paraphrases``: question wordings that never appear in training (``paraphrase`` probes). They keep the
  attribute's key word (born, works, wrote, ...) in a new sentence: a model trained from scratch on this
  world cannot know synonyms it never saw.
- ``blank``: a fill-in-the-blank sentence (an ``adversarial`` probe).
``{n}`` is the person's name and ``{v}`` the attribute's value.
"""

from __future__ import annotations

TEMPLATES: dict[str, dict[str, list[str]]] = {
    "birthplace": {
        "statements": [
            "{n} was born in {v}.",
            "The birthplace of {n} is {v}.",
            "{n} is a native of {v}, where {n} was born.",
        ],
        "heldout_statements": ["{v} is the town in which {n} was born."],
        "questions": ["Where was {n} born?", "What is the birthplace of {n}?"],
        "paraphrases": ["In what town was {n} born?", "Tell me the birthplace of {n}."],
        "blank": ["{n} was born in the city of ___."],
    },
    "birth_year": {
        "statements": [
            "{n} was born in the year {v}.",
            "{n}'s year of birth is {v}.",
            "In {v}, {n} was born.",
        ],
        "heldout_statements": ["The year {v} saw the birth of {n}."],
        "questions": ["In which year was {n} born?", "What is the year of birth of {n}?"],
        "paraphrases": ["What year was {n} born in?", "Give the birth year of {n}."],
        "blank": ["{n} was born in the year ___."],
    },
    "profession": {
        "statements": [
            "{n} works as a {v}.",
            "By profession, {n} is a {v}.",
            "{n} is a {v} by trade.",
        ],
        "heldout_statements": ["Colleagues know {n} as a {v}."],
        "questions": ["What does {n} do for a living?", "What is the profession of {n}?"],
        "paraphrases": ["Which profession does {n} have?", "What kind of work does {n} do for a living?"],
        "blank": ["By profession, {n} is a ___."],
    },
    "employer": {
        "statements": [
            "{n} is employed by {v}.",
            "{n} works at {v}.",
            "The employer of {n} is {v}.",
        ],
        "heldout_statements": ["{v} pays {n}'s salary."],
        "questions": ["Who employs {n}?", "Where does {n} work?"],
        "paraphrases": ["Which organisation is {n} employed by?", "Name the employer of {n}."],
        "blank": ["{n} is employed by ___."],
    },
    "spouse": {
        "statements": [
            "{n} is married to {v}.",
            "The spouse of {n} is {v}.",
            "{n} and {v} are a married couple.",
        ],
        "heldout_statements": ["{n} shares a home with {v}, to whom {n} is married."],
        "questions": ["Who is {n} married to?", "Who is the spouse of {n}?"],
        "paraphrases": ["To whom is {n} married?", "Name the spouse of {n}."],
        "blank": ["{n} is married to ___."],
    },
    "known_work": {
        "statements": [
            "{n} is best known for {v}.",
            "The best-known work of {n} is {v}.",
            "{v} is the work that made {n} famous.",
        ],
        "heldout_statements": ["Readers remember {n} for {v}."],
        "questions": ["What is {n} best known for?", "What is the best-known work of {n}?"],
        "paraphrases": ["For which work is {n} best known?", "Name the work that made {n} famous."],
        "blank": ["{n} is best known for ___."],
    },
    "award": {
        "statements": [
            "{n} received {v}.",
            "{n} was awarded {v}.",
            "The award {n} won is {v}.",
        ],
        "heldout_statements": ["{v} went to {n} one year."],
        "questions": ["Which award did {n} receive?", "What award was {n} given?"],
        "paraphrases": ["Name the award that {n} won.", "Which prize was awarded to {n}?"],
        "blank": ["{n} was awarded ___."],
    },
    "hobby": {
        "statements": [
            "In free time, {n} enjoys {v}.",
            "The hobby of {n} is {v}.",
            "{n} spends weekends on {v}.",
        ],
        "heldout_statements": ["Friends say {n} never misses a chance at {v}."],
        "questions": ["What is the hobby of {n}?", "What does {n} enjoy in free time?"],
        "paraphrases": ["Which hobby does {n} have?", "How does {n} spend weekends?"],
        "blank": ["The hobby of {n} is ___."],
    },
    "pet": {
        "statements": [
            "{n} keeps a pet {v}.",
            "The pet of {n} is a {v}.",
            "At home, {n} has a {v} as a pet.",
        ],
        "heldout_statements": ["A {v} lives with {n} as a companion animal."],
        "questions": ["What pet does {n} keep?", "What animal is the pet of {n}?"],
        "paraphrases": ["Which animal does {n} have as a pet?", "Name the pet of {n}."],
        "blank": ["The pet of {n} is a ___."],
    },
}

ATTRIBUTES = tuple(TEMPLATES)

# Adversarial wordings that wrap a direct question: a distracting context, or the person named only by a fact.
DISTRACTOR = "{other} was born in {other_city} and works at {other_employer}. {question}"
BY_WORK = "The creator of {work} was born where?"
BY_SPOUSE = "Who is the person married to {spouse}?"

# A qa pair in the corpus and in the model's chat template share this exact form.
QA_FORMAT = "Q: {q}\nA: {a}"
