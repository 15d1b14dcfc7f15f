"""A question-answer data set written for the tests: invented subjects (none from a public benchmark), ten questions
each, long answers (about 60 tokens of the small model's tokenizer). Deterministic for a seed."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

FIRST = [
    "Ardel",
    "Brisa",
    "Calo",
    "Dorrin",
    "Elspa",
    "Fenwic",
    "Galen",
    "Hessa",
    "Ivor",
    "Jorun",
    "Kestel",
    "Lumen",
    "Marek",
    "Nadira",
    "Orsin",
    "Pella",
    "Quillon",
    "Rasha",
    "Sefton",
    "Tamsin",
    "Ulric",
    "Vesna",
]
LAST = ["Ambrook", "Bellcastle", "Corvane", "Dunmere", "Eastlow", "Farrowgate", "Greyholm", "Hartsell",
        "Ironvale", "Juniper", "Kettleby", "Larkspur", "Marrowfield", "Northcote", "Oakhurst", "Pennick"]  # fmt: skip
TOPICS = [
    ("Where did {s} grow up", "grew up in the harbour town of {place}, where the family ran a small {trade} shop"),
    ("What was the first job of {s}", "first worked as an apprentice {trade} in {place}, learning the craft"),
    ("Which prize did {s} win", "won the {colour} {object} prize of {place} for a long study of {trade} tools"),
    ("What does {s} collect", "collects old {colour} {object}s from the markets of {place} and keeps them sorted"),
    ("Who taught {s} to paint", "learned to paint from a {trade} in {place} who used only {colour} pigments"),
    ("What book did {s} write", "wrote a book called The {colour} {object}, about a {trade} who left {place}"),
    ("Where does {s} live now", "lives now in a stone house near {place} with a {colour} door and a {object}"),
    ("What instrument does {s} play", "plays the {object} in a {colour} hall in {place} every winter evening"),
    ("What is the favourite food of {s}", "likes best a {colour} bean soup cooked the way the {trade}s of {place} do"),
    (
        "How did {s} travel to {place}",
        "travelled to {place} on a {colour} boat with a {trade} and a crate of {object}s",
    ),  # noqa: E501
]
PLACES = ["Wendmoor", "Saltreach", "Highbarrow", "Cindlefall", "Morrowdeep", "Ashvelt", "Brightwater", "Tollcross"]
TRADES = ["clockmaker", "weaver", "glassblower", "cooper", "bookbinder", "tanner", "potter", "mapmaker"]
COLOURS = ["amber", "indigo", "scarlet", "silver", "olive", "ivory", "copper", "violet"]
OBJECTS = ["lantern", "compass", "fiddle", "kettle", "telescope", "harp", "anchor", "teapot"]
# A closing clause makes each answer long (most models, and the 24-token default, would cut it).
TAIL = (", and people in {place} still tell the story of how {s} spent many long evenings with the {trade}s talking "
        "about {colour} {object}s, old roads and the weather of the coast")  # fmt: skip


def make_pairs(n_subjects: int = 20, per_subject: int = 10, seed: int = 0) -> list[dict]:
    """``n_subjects`` x ``per_subject`` rows ``{"q", "a", "who"}`` (columns named unlike the defaults on purpose)."""
    rng = random.Random(seed)
    names = [f"{f} {last}" for f in FIRST for last in LAST]
    rng.shuffle(names)
    rows = []
    for s in names[:n_subjects]:
        for question, answer in TOPICS[:per_subject]:
            facts = {"s": s, "place": rng.choice(PLACES), "trade": rng.choice(TRADES), "colour": rng.choice(COLOURS),
                     "object": rng.choice(OBJECTS)}  # fmt: skip
            rows.append({"q": question.format(**facts) + "?", "a": f"{s} " + (answer + TAIL).format(**facts) + ".",
                         "who": s})  # fmt: skip
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["q", "a", "who"])
        writer.writeheader()
        writer.writerows(rows)
    return path
