"""The data files atu reads and writes, each validated with errors naming the file, the line and the field.

- corpus JSONL: one ``{"text": str, "concept": str | null}`` per line (``concept``: who the text is about).
- probes JSONL: one ``{"concept", "kind", "question", "answer"}`` per line, ``kind`` in PROBE_KINDS,
  optional ``attribute`` (which fact the probe asks about).
- concept set YAML: ``concepts:`` followed by a list of ``{name, aliases, description, threshold, neighbours}``;
  only ``name`` is required.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from atu.errors import FormatError

PROBE_KINDS = ("direct", "paraphrase", "adversarial")


@dataclass(frozen=True)
class CorpusRecord:
    text: str
    concept: str | None = None


@dataclass(frozen=True)
class Probe:
    concept: str
    kind: str
    question: str
    answer: str
    attribute: str | None = None


@dataclass(frozen=True)
class Concept:
    """One thing to forget. ``threshold`` (tau) is the similarity under which the unlearning pushes it."""

    name: str
    aliases: tuple[str, ...] = ()
    description: str | None = None
    threshold: float | None = None
    neighbours: tuple[str, ...] = ()

    def surface_forms(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def surface_pattern(self) -> re.Pattern[str]:
        """Any surface form as a whole word, the longest first (so "C. Moss" is matched whole, not as "Moss")."""
        return _whole_words(self.surface_forms())


@dataclass
class ConceptSet:
    concepts: list[Concept] = field(default_factory=list)

    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def get(self, name: str) -> Concept:
        for c in self.concepts:
            if c.name == name:
                return c
        raise KeyError(f"no concept named {name!r}; known: {', '.join(self.names()[:10])}")

    def subset(self, names: Iterable[str]) -> ConceptSet:
        return ConceptSet([self.get(n) for n in names])

    def mentioned_in(self, text: str) -> list[int]:
        """Rows of the concepts that ``text`` names by a surface form (name or alias), as a whole word."""
        return [row for row, c in enumerate(self.concepts) if c.surface_pattern().search(text)]


@functools.lru_cache(maxsize=4096)
def _whole_words(forms: tuple[str, ...]) -> re.Pattern[str]:
    words = sorted((f for f in forms if f), key=len, reverse=True)
    return re.compile("|".join(rf"(?<!\w){re.escape(w)}(?!\w)" for w in words) or r"(?!)")  # no form: no match


# ---------------------------------------------------------------------------------------------- JSONL


def _check_fields(path: Path, line_no: int, obj: Any, required: dict[str, tuple], optional: dict[str, tuple]) -> None:
    where = f"{path}:{line_no}"
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(required) - set(optional))
    if unknown:
        allowed = ", ".join([*required, *optional])
        raise FormatError(f"{where}: unknown field {unknown[0]!r} (allowed: {allowed})")
    for name in required:
        if name not in obj:
            raise FormatError(f"{where}: missing field {name!r}")
    for name, types in {**required, **optional}.items():
        if name in obj and not isinstance(obj[name], types):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise FormatError(f"{where}: field {name!r} must be {want}, got {type(obj[name]).__name__}")


def _read_jsonl(path: Path) -> Iterable[tuple[int, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: file not found")
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None


def read_corpus(path: str | Path) -> list[CorpusRecord]:
    path = Path(path)
    records = []
    for line_no, obj in _read_jsonl(path):
        _check_fields(path, line_no, obj, {"text": (str,)}, {"concept": (str, type(None))})
        if not obj["text"].strip():
            raise FormatError(f"{path}:{line_no}: field 'text' is empty")
        records.append(CorpusRecord(text=obj["text"], concept=obj.get("concept")))
    if not records:
        raise FormatError(f"{path}: no records (expected one JSON object per line)")
    return records


def read_probes(path: str | Path) -> list[Probe]:
    path = Path(path)
    probes = []
    required = {"concept": (str,), "kind": (str,), "question": (str,), "answer": (str,)}
    for line_no, obj in _read_jsonl(path):
        _check_fields(path, line_no, obj, required, {"attribute": (str, type(None))})
        if obj["kind"] not in PROBE_KINDS:
            raise FormatError(f"{path}:{line_no}: field 'kind' is {obj['kind']!r}, expected one of {PROBE_KINDS}")
        for name in ("question", "answer", "concept"):
            if not obj[name].strip():
                raise FormatError(f"{path}:{line_no}: field {name!r} is empty")
        probes.append(Probe(**obj))
    if not probes:
        raise FormatError(f"{path}: no probes (expected one JSON object per line)")
    return probes


def read_texts(path: str | Path) -> list[str]:
    """Plain texts: a ``.txt`` file holds one text per non-empty line; any other file is JSONL whose records have a
    ``text`` field (other fields, such as ``concept``, are ignored)."""
    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise FormatError(f"{path}: file not found")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        texts = []
        for line_no, obj in _read_jsonl(path):
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
                raise FormatError(f"{path}:{line_no}: expected an object with a non-empty string field 'text'")
            texts.append(obj["text"])
    if not texts:
        raise FormatError(f"{path}: no texts")
    return texts


def write_jsonl(path: str | Path, records: Sequence[Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            obj = asdict(r) if hasattr(r, "__dataclass_fields__") else r
            obj = {k: v for k, v in obj.items() if v is not None}
            fh.write(json.dumps(obj, ensure_ascii=False, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------- YAML

_CONCEPT_FIELDS = {
    "name": (str,),
    "aliases": (list,),
    "description": (str, type(None)),
    "threshold": (float, int, type(None)),
    "neighbours": (list,),
}


def read_concepts(path: str | Path) -> ConceptSet:
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise FormatError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if root is None or not isinstance(root, yaml.MappingNode):
        raise FormatError(f"{path}: expected a mapping with a 'concepts' list at the top level")
    top = {k.value: v for k, v in root.value}
    unknown = sorted(set(top) - {"concepts"})
    if unknown:
        raise FormatError(f"{path}: unknown top-level key {unknown[0]!r} (allowed: concepts)")
    node = top.get("concepts")
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise FormatError(f"{path}: 'concepts' must be a non-empty list")
    concepts, seen = [], set()
    for item in node.value:
        where = f"{path}:{item.start_mark.line + 1}"
        obj = yaml.safe_load(yaml.serialize(item))
        if not isinstance(obj, dict):
            raise FormatError(f"{where}: each concept must be a mapping with at least a 'name'")
        unknown = sorted(set(obj) - set(_CONCEPT_FIELDS))
        if unknown:
            raise FormatError(f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(_CONCEPT_FIELDS)})")
        if "name" not in obj:
            raise FormatError(f"{where}: missing field 'name'")
        for name, types in _CONCEPT_FIELDS.items():
            if name in obj and (not isinstance(obj[name], types) or isinstance(obj[name], bool)):
                raise FormatError(f"{where}: field {name!r} has the wrong type ({type(obj[name]).__name__})")
        for name in ("aliases", "neighbours"):
            if not all(isinstance(a, str) and a.strip() for a in obj.get(name, [])):
                raise FormatError(f"{where}: field {name!r} must be a list of non-empty strings")
        if not obj["name"].strip():
            raise FormatError(f"{where}: field 'name' is empty")
        threshold = obj.get("threshold")
        if threshold is not None and not -1.0 <= threshold <= 1.0:
            raise FormatError(f"{where}: field 'threshold' is {threshold}, must be a cosine in [-1, 1]")
        if obj["name"] in seen:
            raise FormatError(f"{where}: duplicate concept name {obj['name']!r}")
        seen.add(obj["name"])
        concepts.append(
            Concept(
                name=obj["name"],
                aliases=tuple(obj.get("aliases", [])),
                description=obj.get("description"),
                threshold=None if threshold is None else float(threshold),
                neighbours=tuple(obj.get("neighbours", [])),
            )
        )
    return ConceptSet(concepts)


def write_concepts(path: str | Path, concepts: ConceptSet) -> None:
    out = []
    for c in concepts.concepts:
        d: dict[str, Any] = {"name": c.name}
        if c.aliases:
            d["aliases"] = list(c.aliases)
        if c.description:
            d["description"] = c.description
        if c.threshold is not None:
            d["threshold"] = c.threshold
        if c.neighbours:
            d["neighbours"] = list(c.neighbours)
        out.append(d)
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump({"concepts": out}, fh, sort_keys=False, allow_unicode=True)
