"""Question-answer datasets as worlds: read (question, answer, subject) rows from a JSONL or CSV file or a local
Hugging Face ``datasets`` directory, and write the files that `atu world build --from` trains a small model on and
`atu run` reads.

One code path makes every file from the same pairs, so the corpus, the probes and the held-out texts always agree:

- ``corpus.jsonl``: each pair through ``template`` (default ``QA_TEMPLATE``), filed under its subject;
- ``probes.jsonl``: each pair as a ``direct`` probe (the question, the answer as the reference);
- ``heldout.jsonl``: each pair through ``heldout_template``, a phrasing never trained on (the stopping signal);
- ``concepts.yaml``: one concept per subject.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from atu import formats
from atu.errors import ConfigError, FormatError

# How a pair becomes training text. The embedded world's chat template renders a question as "Q: ...\nA:", so a
# model trained on this form answers a chat prompt the way the probes are scored.
QA_TEMPLATE = "Q: {question}\nA: {answer}"
# The same fact in another form, never trained on: held-out perplexity on it is the retain budget's signal.
HELDOUT_TEMPLATE = "{question} {answer}"
FIELDS = ("question", "answer", "subject")


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str
    subject: str


@dataclass(frozen=True)
class Columns:
    """Which column of the source holds each field."""

    question: str = "question"
    answer: str = "answer"
    subject: str = "subject"


def _rows(path: Path, split: str | None) -> Iterable[tuple[str, dict]]:
    """(where, row) for every row of a JSONL or CSV file or a ``datasets.save_to_disk`` directory."""
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise ConfigError(
                f"{path}: reading a Hugging Face datasets directory needs the datasets package (pip install datasets)"
            ) from None
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ConfigError(f"{path}: no split {split!r} (splits: {', '.join(sorted(data))}); pass --split")
            data = data[split]
        for i, row in enumerate(data):
            yield f"{path}[{split}] row {i}", row
    elif path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            for i, row in enumerate(csv.DictReader(fh), 2):  # line 1 is the header
                yield f"{path}:{i}", row
    elif path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise FormatError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise FormatError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
                yield f"{path}:{i}", row
    elif not path.exists():
        raise FormatError(f"{path}: file not found")
    else:
        raise FormatError(f"{path}: unknown format (expected .jsonl, .csv or a datasets directory)")


def read_qa(path: str | Path, columns: Columns = Columns(), split: str | None = "train") -> list[QAPair]:
    """Every (question, answer, subject) of ``path``; errors name the file, the row and the column."""
    path = Path(path)
    pairs = []
    for where, row in _rows(path, split):
        values = {}
        for name in FIELDS:
            column = getattr(columns, name)
            if column not in row:
                raise FormatError(f"{where}: no column {column!r} (the {name}; columns: {', '.join(map(str, row))})")
            value = row[column]
            if not isinstance(value, str) or not value.strip():
                raise FormatError(f"{where}: column {column!r} (the {name}) must be non-empty text, got {value!r}")
            values[name] = " ".join(value.split())  # one line: generation stops at the first newline
        pairs.append(QAPair(**values))
    if not pairs:
        raise FormatError(f"{path}: no rows")
    return pairs


def _render(template: str, pair: QAPair, what: str) -> str:
    try:
        return template.format(question=pair.question, answer=pair.answer, subject=pair.subject)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{what} {template!r}: use only {{question}}, {{answer}} and {{subject}} ({e})") from None


def write_qa_world(
    pairs: list[QAPair], out: str | Path, *, template: str = QA_TEMPLATE, heldout_template: str = HELDOUT_TEMPLATE
) -> Path:
    """Write corpus.jsonl, probes.jsonl, heldout.jsonl and concepts.yaml for ``pairs`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    subjects = sorted({p.subject for p in pairs})
    corpus = [formats.CorpusRecord(_render(template, p, "--template"), p.subject) for p in pairs]
    heldout = [formats.CorpusRecord(_render(heldout_template, p, "--heldout-template"), p.subject) for p in pairs]
    probes = [formats.Probe(p.subject, "direct", p.question, p.answer) for p in pairs]
    formats.write_jsonl(out / "corpus.jsonl", corpus)
    formats.write_jsonl(out / "heldout.jsonl", heldout)
    formats.write_jsonl(out / "probes.jsonl", probes)
    formats.write_concepts(out / "concepts.yaml", formats.ConceptSet([formats.Concept(s) for s in subjects]))
    return out


def world_run_config(root: str | Path, forget: list[str] | None = None) -> dict:
    """A run config (as a mapping) for the world built in ``root`` (`atu world build` printed it): its model, its
    files, the first concept forgotten unless ``forget`` says, and answers long enough for the longest reference
    answer of its probes (in the model's tokens, plus a margin), so no answer is cut before it is scored."""
    from transformers import AutoTokenizer

    root = Path(root).resolve()
    concepts = formats.read_concepts(root / "concepts.yaml")
    forget = list(forget) if forget else concepts.names()[:1]
    unknown = [n for n in forget if n not in concepts.names()]
    if unknown:
        raise ConfigError(f"--forget {unknown[0]!r} is not a concept of {root / 'concepts.yaml'}")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    answers = [p.answer for p in formats.read_probes(root / "probes.jsonl")]
    longest = max(len(tokenizer(a, add_special_tokens=False).input_ids) for a in answers)
    data = {"corpus": "corpus.jsonl", "concepts": "concepts.yaml", "probes": "probes.jsonl"}
    optional = (("validation", "heldout.jsonl"), ("unseen", "unseen.jsonl"))
    data.update({k: n for k, n in optional if (root / n).is_file()})
    return {
        "model": str(root / "model"),
        "data": {**{k: str(root / n) for k, n in data.items()}, "forget": forget},
        "eval": {"max_new_tokens": longest + 8},
        "out": "runs/" + root.name,
    }
