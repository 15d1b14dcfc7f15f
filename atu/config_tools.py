"""Config files as people write them: read YAML, apply ``--set key.sub=value`` overrides, print a resolved config
with one line of help per key, and generate the reference of every key (docs/config.md).

The help of a key is the comment written beside (or just above) its field in the config dataclass, so the
reference cannot drift from the code; ``EXTRA_HELP`` covers the few fields whose meaning their name says.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import re
import tokenize
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from atu.configs import type_name
from atu.errors import ConfigError

# Help for fields that carry no comment in their dataclass (keyed by class name and field).
EXTRA_HELP = {
    ("UnlearnConfig", "lr"): "learning rate of the unlearning optimizer (the paper: 3e-4 with SGD on Phi-3)",
    ("UnlearnConfig", "grad_clip"): "clip the gradient's global norm to this before every unlearning step",
    ("UnlearnConfig", "batch_size"): "forget texts per unlearning step (per process)",
    ("UnlearnConfig", "lora_rank"): "method lora: rank of the adapters",
    ("UnlearnConfig", "lora_alpha"): "method lora: scaling numerator of the adapters (scale = alpha / rank)",
    ("UnlearnConfig", "log_every"): "write a metrics.jsonl row every this many unlearning steps",
    ("UnlearnConfig", "seed"): "seed of the unlearning's batch order and initialisation",
    ("AlignConfig", "n_heads"): "attention heads of the predictor",
    ("AlignConfig", "batch_size"): "texts per alignment step",
    ("AlignConfig", "encode_batch_size"): "windows per encoder call when the window targets are embedded",
    ("AlignConfig", "seed"): "seed of the predictor's initialisation, the held-out split and the batch order",
    ("TokenizerConfig", "min_frequency"): "a BPE merge must occur this many times in the corpus",
    ("LMConfig", "hidden_size"): "width of the small Llama",
    ("LMConfig", "num_hidden_layers"): "decoder layers of the small Llama",
    ("LMConfig", "num_attention_heads"): "attention heads (hidden_size must be divisible by it)",
    ("LMConfig", "intermediate_size"): "width of the MLP",
    ("LMConfig", "max_position_embeddings"): "longest sequence the model takes, in tokens",
    ("TrainConfig", "steps"): "optimizer steps of the small model's training",
    ("TrainConfig", "batch_size"): "packed sequences per training step",
    ("TrainConfig", "lr"): "peak learning rate (AdamW, cosine decay after warm-up)",
    ("TrainConfig", "min_lr_ratio"): "the cosine decay ends at lr times this",
    ("TrainConfig", "warmup_steps"): "linear warm-up steps",
    ("TrainConfig", "weight_decay"): "AdamW weight decay",
    ("TrainConfig", "grad_clip"): "clip the gradient's global norm to this",
    ("TrainConfig", "seed"): "seed of the model's initialisation and the batch order",
    ("WorldConfig", "seed"): "seed of the generated people and facts",
    ("WorldConfig", "n_people"): "people in the world (the model is trained on them)",
    ("WorldConfig", "n_unseen"): "people generated the same way but never trained on (membership inference)",
    ("WorldConfig", "tokenizer"): "the byte-level BPE tokenizer trained on the corpus",
    ("WorldConfig", "lm"): "the small Llama's architecture",
    ("WorldConfig", "train"): "how the small Llama is trained",
}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping at the top of a YAML file; a ConfigError naming the file when it is unreadable or not a mapping."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read YAML config ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``dotted.key=value`` set; the value is read as YAML (``[0.9,0.5]`` is a list,
    ``null`` is None, ``3e-4`` stays text until the config's types coerce it, as in a YAML file)."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set takes key.sub=value (for example unlearn.lr=3e-4), got {item!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from None
        node = out
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                if node.get(part) is not None:
                    where = ".".join(parts[: depth + 1])
                    raise ConfigError(f"--set {item!r}: {where} is {node[part]!r}, not a section")
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out


@cache
def _comments(cls) -> dict[str, str]:
    """Each field's comment in ``cls``'s source: the one on its line, else the comment lines just above it."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    by_line: dict[int, str] = {}  # 0-based line -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0] - 1] = tok.string.lstrip("#").strip()
    names = {f.name for f in dataclasses.fields(cls)}
    body_indent = None
    found: dict[str, str] = {}
    for i, line in enumerate(lines):
        m = re.match(r"^(\s+)(\w+)\s*:", line)
        if not m or m.group(2) not in names or m.group(2) in found:
            continue
        body_indent = body_indent or m.group(1)
        if m.group(1) != body_indent:
            continue
        if i in by_line and not line.lstrip().startswith("#"):
            found[m.group(2)] = by_line[i]
            continue
        above = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            above.insert(0, by_line.get(j, ""))
            j -= 1
        if above:
            found[m.group(2)] = " ".join(above)
    return found


def field_help(cls, name: str) -> str:
    """The help of field ``name`` of ``cls`` (its comment, else ``EXTRA_HELP``, else the nested class's docstring);
    '' when there is none."""
    text = _comments(cls).get(name) or EXTRA_HELP.get((cls.__name__, name), "")
    if not text:
        tp = typing.get_type_hints(cls)[name]
        if dataclasses.is_dataclass(tp) and tp.__doc__ and not tp.__doc__.startswith(tp.__name__ + "("):
            text = tp.__doc__.strip().split("\n\n")[0].replace("\n", " ")
    return text


def one_line(text: str, width: int = 110) -> str:
    """The first sentence of ``text``, cut to ``width`` characters."""
    first = re.split(r"(?<=\.)\s", text, maxsplit=1)[0].rstrip(".")
    return first if len(first) <= width else first[: width - 3].rstrip() + "..."


@dataclass
class KeyDoc:
    key: str  # dotted
    type: str
    default: Any
    help: str
    section: bool  # a nested config (mapping), not a value


def describe(cls, instance: Any = None, prefix: str = "") -> Iterator[KeyDoc]:
    """Every key of config class ``cls`` (nested sections first listed, then their keys), with ``instance``'s value
    (default: the field's default) and help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if instance is not None:
            value = getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = dataclasses.MISSING
        section = dataclasses.is_dataclass(tp)
        yield KeyDoc(prefix + f.name, type_name(tp), value, field_help(cls, f.name), section)
        if section:
            yield from describe(tp, value if dataclasses.is_dataclass(value) else None, prefix + f.name + ".")


def _scalar(value: Any) -> str:
    """A value in YAML flow style that reads back as the same value (JSON is YAML)."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return json.dumps(value)


def show(cls, instance: Any) -> str:
    """``instance`` as YAML with every key (defaults included) and each key's help as a comment."""
    rows = []
    for doc in describe(cls, instance):
        depth = doc.key.count(".")
        name = doc.key.rsplit(".", 1)[-1]
        left = "  " * depth + (f"{name}:" if doc.section else f"{name}: {_scalar(doc.default)}")
        rows.append((left, one_line(doc.help)))
    width = min(48, max(len(left) for left, _ in rows) + 2)
    return "\n".join(f"{left:<{width}}# {help}" if help else left for left, help in rows) + "\n"


def reference(sections: Sequence[tuple[str, str, type]]) -> str:
    """The Markdown reference of every key of each ``(title, intro, config class)``."""
    out = [
        "# Configuration reference",
        "",
        "Generated from the config classes by `atu config reference --out docs/config.md`; a test checks that it is",
        "up to date. Values are coerced to each key's type (`lr: 3e-4` is a number), unknown keys are errors, and",
        "`--set key.sub=value` overrides any key on the command line. `atu config show CONFIG` prints a config with",
        "every default filled in.",
    ]
    for title, intro, cls in sections:
        out += ["", f"## {title}", "", intro, "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for doc in describe(cls):
            if doc.default is dataclasses.MISSING:
                default = "(required)"
            else:
                default = "" if doc.section else f"`{_scalar(doc.default)}`"
            cell = doc.help.replace("|", "\\|")
            kind = doc.type.replace("|", "or")
            out.append(f"| `{doc.key}` | {kind} | {default} | {cell} |")
    return "\n".join(out) + "\n"


def reference_sections() -> list[tuple[str, str, type]]:
    from atu.run_config import RunConfig
    from atu.world.config import WorldConfig

    return [
        ("Run config (`atu run`, `atu align`, `atu unlearn`, `atu export`, `atu config show`)",
         "One YAML file drives the whole job.", RunConfig),
        ("World config (`atu world build --config`)",
         "The embedded world and the small model trained on it; its hash is the cache key.", WorldConfig),
    ]  # fmt: skip
