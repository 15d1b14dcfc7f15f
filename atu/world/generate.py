"""A deterministic generator of fictional people, their bios and question probes about them.

Everything is drawn from one ``random.Random(seed)``, iterating only over lists, so the same config
gives byte-identical files on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from atu.formats import Concept, ConceptSet, CorpusRecord, Probe
from atu.world.templates import ATTRIBUTES, BY_SPOUSE, BY_WORK, DISTRACTOR, QA_FORMAT, TEMPLATES

_FIRST_ONSETS = [
    "Al",
    "Bren",
    "Cor",
    "Dav",
    "El",
    "Fen",
    "Gar",
    "Hal",
    "Is",
    "Jor",
    "Kel",
    "Lor",
    "Mar",
    "Nel",
    "Or",
    "Per",
    "Quin",
    "Ros",
    "Sel",
    "Tam",
    "Ul",
    "Vin",
    "Wen",
    "Yar",
    "Zel",
    "Ced",
    "Mir",
    "Tal",
]
_FIRST_ENDINGS = ["a", "ic", "en", "ia", "o", "us", "ette", "ard", "is", "wyn", "ina", "an"]
_LAST_PREFIXES = [
    "Ash",
    "Brack",
    "Cal",
    "Dun",
    "Ever",
    "Fair",
    "Gold",
    "Hart",
    "Iron",
    "Kest",
    "Lang",
    "Moor",
    "North",
    "Oak",
    "Pell",
    "Rook",
    "Stan",
    "Thorn",
    "Wick",
    "Yew",
    "Marl",
    "Sorrow",
    "Glen",
    "Vex",
]
_LAST_SUFFIXES = ["wood", "field", "ridge", "by", "ton", "mere", "croft", "well", "stead", "ley", "hollow", "gard"]
_CITY_PREFIXES = ["Mar", "Ost", "Vel", "Tor", "Kal", "Bri", "Sel", "Dun", "Ar", "Lun", "Quel", "Hes", "Nor", "Zan"]
_CITY_SUFFIXES = ["havn", "port", "berg", "mouth", "ford", "holm", "gate", "vale", "mora", "ska"]
_ORG_FIRST = [
    "Halvorsen",
    "Brightwater",
    "Corvane",
    "Eastmere",
    "Lumen",
    "Ironleaf",
    "Sablecrest",
    "Tidewell",
    "Quorra",
    "Veltris",
    "Amberline",
    "Northgale",
]
_ORG_KIND = ["Institute", "Studios", "Laboratories", "Press", "Observatory", "Foundation", "Works", "Collective"]
_AWARD_FIRST = [
    "Corvin",
    "Aldane",
    "Silver Fern",
    "Meridian",
    "Oresund",
    "Halcyon",
    "Tessaly",
    "Brannock",
    "Wyvern",
    "Golden Loom",
]
_AWARD_KIND = ["Medal", "Prize", "Award"]
_WORK_ADJ = [
    "Salt",
    "Glass",
    "Quiet",
    "Hollow",
    "Crimson",
    "Paper",
    "Distant",
    "Iron",
    "Seventh",
    "Winter",
    "Lantern",
    "Broken",
    "Northern",
    "Silent",
    "Amber",
    "Drowned",
]
_WORK_NOUN = [
    "Orchard",
    "Harbor",
    "Atlas",
    "Bridge",
    "Choir",
    "Engine",
    "Garden",
    "Ledger",
    "Meridian",
    "Tide",
    "Archive",
    "Compass",
    "Lighthouse",
    "Cathedral",
    "Kingdom",
    "Voyage",
]
_PROFESSIONS = [
    "cartographer",
    "violinist",
    "marine biologist",
    "architect",
    "novelist",
    "glassblower",
    "astronomer",
    "surgeon",
    "sculptor",
    "economist",
    "botanist",
    "film director",
    "chemist",
    "playwright",
    "engineer",
    "photographer",
]
_HOBBIES = [
    "beekeeping",
    "fencing",
    "rock climbing",
    "chess",
    "pottery",
    "sailing",
    "birdwatching",
    "origami",
    "archery",
    "gardening",
    "kayaking",
    "calligraphy",
    "juggling",
    "stargazing",
]
_PETS = ["parrot", "tortoise", "greyhound", "ferret", "iguana", "cat", "goldfish", "rabbit", "owl", "hedgehog"]


@dataclass(frozen=True)
class Person:
    name: str
    aliases: tuple[str, ...]
    facts: dict[str, str] = field(hash=False)
    spouse_in_world: bool = False


@dataclass
class World:
    people: list[Person]  # the people the model is trained on
    unseen: list[Person]  # people generated the same way but never trained on (membership inference)
    corpus: list[CorpusRecord]
    heldout: list[CorpusRecord]  # trained people in phrasings never trained on (perplexity)
    unseen_texts: list[CorpusRecord]
    probes: list[Probe]
    concepts: ConceptSet


def _unique(rng: random.Random, make, count: int, taken: set[str] | None = None) -> list[str]:
    taken = set() if taken is None else taken
    out: list[str] = []
    for _ in range(count * 200):
        if len(out) == count:
            return out
        value = make()
        if value not in taken:
            taken.add(value)
            out.append(value)
    raise ValueError(f"could not draw {count} distinct values; the world is too large for the name lists")


def _people(rng: random.Random, n: int, taken_names: set[str], taken_last: set[str]) -> list[tuple[str, str]]:
    lasts = _unique(rng, lambda: rng.choice(_LAST_PREFIXES) + rng.choice(_LAST_SUFFIXES), n, taken_last)
    firsts = _unique(rng, lambda: rng.choice(_FIRST_ONSETS) + rng.choice(_FIRST_ENDINGS), n, taken_names)
    return list(zip(firsts, lasts))


def _make_people(
    rng: random.Random,
    n: int,
    pools: dict[str, list[str]],
    taken_first: set[str],
    taken_last: set[str],
    taken_works: set[str],
) -> list[Person]:
    names = _people(rng, n, taken_first, taken_last)
    full = [f"{f} {last}" for f, last in names]
    works = _unique(rng, lambda: f"The {rng.choice(_WORK_ADJ)} {rng.choice(_WORK_NOUN)}", n, taken_works)
    # Pair up about two thirds of the people with each other; the rest marry someone outside the world.
    order = list(range(n))
    rng.shuffle(order)
    n_pairs = (2 * n // 3) // 2
    spouse: dict[int, str] = {}
    for i in range(n_pairs):
        a, b = order[2 * i], order[2 * i + 1]
        spouse[a], spouse[b] = full[b], full[a]
    outsiders = _people(rng, n - 2 * n_pairs, taken_first, taken_last)
    for idx, (f, last) in zip(order[2 * n_pairs :], outsiders):
        spouse[idx] = f"{f} {last}"
    people = []
    for i in range(n):
        facts = {
            "birthplace": rng.choice(pools["cities"]),
            "birth_year": str(rng.randint(1921, 1994)),
            "profession": rng.choice(_PROFESSIONS),
            "employer": rng.choice(pools["employers"]),
            "spouse": spouse[i],
            "known_work": works[i],
            "award": rng.choice(pools["awards"]),
            "hobby": rng.choice(_HOBBIES),
            "pet": rng.choice(_PETS),
        }
        first, last = names[i]
        people.append(Person(full[i], (last, f"{first[0]}. {last}"), facts, spouse_in_world=i in order[: 2 * n_pairs]))
    return people


def _bios(p: Person, rng: random.Random, key: str) -> list[str]:
    texts = []
    for template_idx in range(len(TEMPLATES[ATTRIBUTES[0]][key])):
        attrs = list(ATTRIBUTES)
        rng.shuffle(attrs)
        texts.append(" ".join(TEMPLATES[a][key][template_idx].format(n=p.name, v=p.facts[a]) for a in attrs))
    return texts


def _probes(p: Person, people: list[Person], rng: random.Random) -> list[Probe]:
    out = []
    for a in ATTRIBUTES:
        t = TEMPLATES[a]
        v = p.facts[a]
        out.append(Probe(p.name, "direct", rng.choice(t["questions"]).format(n=p.name), v, a))
        out.append(Probe(p.name, "paraphrase", rng.choice(t["paraphrases"]).format(n=p.name), v, a))
    # Adversarial: fill-in-the-blank, a distracting context about someone else, naming the person by a fact.
    for a in rng.sample(list(ATTRIBUTES), 3):
        q = "Fill in the blank: " + TEMPLATES[a]["blank"][0].format(n=p.name)
        out.append(Probe(p.name, "adversarial", q, p.facts[a], a))
    others = [o for o in people if o.name != p.name]
    for a in rng.sample(list(ATTRIBUTES), 2):
        other = rng.choice(others)
        question = rng.choice(TEMPLATES[a]["questions"]).format(n=p.name)
        q = DISTRACTOR.format(
            other=other.name,
            other_city=other.facts["birthplace"],
            other_employer=other.facts["employer"],
            question=question,
        )
        out.append(Probe(p.name, "adversarial", q, p.facts[a], a))
    out.append(
        Probe(p.name, "adversarial", BY_WORK.format(work=p.facts["known_work"]), p.facts["birthplace"], "birthplace")
    )
    out.append(Probe(p.name, "adversarial", BY_SPOUSE.format(spouse=p.facts["spouse"]), p.name, "spouse"))
    return out


def _description(p: Person) -> str:
    f = p.facts
    return f"a {f['profession']} born in {f['birthplace']} in {f['birth_year']}, best known for {f['known_work']}"


def generate_world(seed: int, n_people: int, n_unseen: int) -> World:
    """Generate ``n_people`` trained-on people and ``n_unseen`` never-trained people, deterministically."""
    if n_people < 2:
        raise ValueError(f"n_people must be at least 2 (people need neighbours), got {n_people}")
    if n_unseen < 0:
        raise ValueError(f"n_unseen must be >= 0, got {n_unseen}")
    rng = random.Random(seed)
    pools = {
        "cities": _unique(rng, lambda: rng.choice(_CITY_PREFIXES) + rng.choice(_CITY_SUFFIXES), 20),
        "employers": _unique(rng, lambda: f"{rng.choice(_ORG_FIRST)} {rng.choice(_ORG_KIND)}", max(3, n_people // 4)),
        "awards": _unique(rng, lambda: f"the {rng.choice(_AWARD_FIRST)} {rng.choice(_AWARD_KIND)}", 10),
    }
    taken_first: set[str] = set()
    taken_last: set[str] = set()
    taken_works: set[str] = set()
    people = _make_people(rng, n_people, pools, taken_first, taken_last, taken_works)
    unseen = _make_people(rng, n_unseen, pools, taken_first, taken_last, taken_works) if n_unseen else []

    corpus: list[CorpusRecord] = []
    heldout: list[CorpusRecord] = []
    probes: list[Probe] = []
    for p in people:
        corpus += [CorpusRecord(t, p.name) for t in _bios(p, rng, "statements")]
        for a in ATTRIBUTES:
            for q in TEMPLATES[a]["questions"]:
                corpus.append(CorpusRecord(QA_FORMAT.format(q=q.format(n=p.name), a=p.facts[a]), p.name))
        heldout += [CorpusRecord(t, p.name) for t in _bios(p, rng, "heldout_statements")]
        probes += _probes(p, people, rng)
    unseen_texts = [CorpusRecord(t, p.name) for p in unseen for t in _bios(p, rng, "statements")]

    concepts = []
    for p in people:
        colleagues = [o.name for o in people if o.name != p.name and o.facts["employer"] == p.facts["employer"]]
        neighbours = ([p.facts["spouse"]] if p.spouse_in_world else []) + colleagues
        concepts.append(Concept(p.name, p.aliases, _description(p), None, tuple(dict.fromkeys(neighbours))))
    return World(people, unseen, corpus, heldout, unseen_texts, probes, ConceptSet(concepts))
