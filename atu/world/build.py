"""`atu world build`: generate (or read) a world, train its tokenizer and small Llama, cache the result.

A built world is a directory::

    corpus.jsonl  probes.jsonl  concepts.yaml   the data (generated or the user's own)
    heldout.jsonl                               retained people in phrasings never trained on (optional)
    unseen.jsonl                                people never trained on, for membership inference (optional)
    model/                                      Hugging Face format: safetensors, tokenizer, chat template
    build.json                                  losses, timings, versions
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import GenerationConfig

from atu import __version__, cache, formats
from atu.errors import FormatError
from atu.world.config import WorldConfig
from atu.world.generate import generate_world
from atu.world.lm import build_model, pretrain
from atu.world.tokenizer import train_tokenizer

logger = logging.getLogger(__name__)

# Bump when the generator or the build changes what a given config produces, so old cache entries are not reused.
BUILD_FORMAT = 1
REQUIRED_FILES = ("corpus.jsonl", "probes.jsonl", "concepts.yaml")
OPTIONAL_FILES = ("heldout.jsonl", "unseen.jsonl")
# The run config's data keys (`RunConfig.data`) and the file of a built world that fills each one.
WORLD_FILES = {
    "corpus": "corpus.jsonl",
    "concepts": "concepts.yaml",
    "validation": "heldout.jsonl",
    "probes": "probes.jsonl",
    "unseen": "unseen.jsonl",
}


@dataclass(frozen=True)
class BuiltWorld:
    root: Path

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    def path(self, name: str) -> Path:
        return self.root / name

    def corpus(self) -> list[formats.CorpusRecord]:
        return formats.read_corpus(self.root / "corpus.jsonl")

    def probes(self) -> list[formats.Probe]:
        return formats.read_probes(self.root / "probes.jsonl")

    def concepts(self) -> formats.ConceptSet:
        return formats.read_concepts(self.root / "concepts.yaml")

    def optional_texts(self, name: str) -> list[formats.CorpusRecord]:
        p = self.root / name
        return formats.read_corpus(p) if p.is_file() else []

    def build_info(self) -> dict:
        return json.loads((self.root / "build.json").read_text())


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _validate_source(source: Path) -> dict[str, str]:
    """Check a user's data directory and return the sha256 of each file (part of the cache key)."""
    if not source.is_dir():
        raise FormatError(f"{source}: not a directory (expected {', '.join(REQUIRED_FILES)} inside)")
    missing = [n for n in REQUIRED_FILES if not (source / n).is_file()]
    if missing:
        raise FormatError(f"{source}: missing {', '.join(missing)} (a world needs {', '.join(REQUIRED_FILES)})")
    corpus = formats.read_corpus(source / "corpus.jsonl")
    probes = formats.read_probes(source / "probes.jsonl")
    concepts = formats.read_concepts(source / "concepts.yaml")
    names = set(concepts.names())
    for what, items in (("corpus.jsonl", [r.concept for r in corpus]), ("probes.jsonl", [p.concept for p in probes])):
        unknown = sorted({c for c in items if c is not None and c not in names})
        if unknown:
            raise FormatError(f"{source / what}: concept {unknown[0]!r} is not in concepts.yaml")
    for name in OPTIONAL_FILES:
        if (source / name).is_file():
            formats.read_corpus(source / name)
    return {n: _file_digest(source / n) for n in (*REQUIRED_FILES, *OPTIONAL_FILES) if (source / n).is_file()}


def _write_generated(cfg: WorldConfig, out: Path) -> None:
    world = generate_world(cfg.seed, cfg.n_people, cfg.n_unseen)
    formats.write_jsonl(out / "corpus.jsonl", world.corpus)
    formats.write_jsonl(out / "probes.jsonl", world.probes)
    formats.write_jsonl(out / "heldout.jsonl", world.heldout)
    if world.unseen_texts:
        formats.write_jsonl(out / "unseen.jsonl", world.unseen_texts)
    formats.write_concepts(out / "concepts.yaml", world.concepts)
    people = [{"name": p.name, "aliases": list(p.aliases), "facts": p.facts} for p in world.people]
    (out / "people.json").write_text(json.dumps(people, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def _train_model(cfg: WorldConfig, out: Path, progress: bool) -> dict:
    corpus = formats.read_corpus(out / "corpus.jsonl")
    texts = [r.text for r in corpus]
    t0 = time.time()
    tokenizer = train_tokenizer(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
    docs = [tokenizer(t).input_ids + [tokenizer.eos_token_id] for t in texts]
    too_long = max(len(d) for d in docs)
    if too_long > cfg.lm.max_position_embeddings:
        raise FormatError(
            f"a corpus text is {too_long} tokens long, over lm.max_position_embeddings "
            f"({cfg.lm.max_position_embeddings}); split long texts or raise the limit"
        )
    t_tok = time.time() - t0
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.lm, tokenizer)
    t1 = time.time()
    losses = pretrain(model, docs, cfg.train, progress=progress)
    t_train = time.time() - t1
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    return {
        "tokenizer_seconds": round(t_tok, 2),
        "train_seconds": round(t_train, 2),
        "corpus_tokens": sum(len(d) for d in docs),
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses_every_10": losses[::10],
    }


def build_world(
    cfg: WorldConfig,
    *,
    source: str | Path | None = None,
    root: Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> BuiltWorld:
    """Build the world for ``cfg`` (generated, or from the user's ``source`` directory) or reuse the cached one."""
    key_cfg: dict = {"format": BUILD_FORMAT, "world": cfg.to_dict()}
    if source is not None:
        source = Path(source)
        key_cfg["source"] = _validate_source(source)
        # A user's world is not generated: the generator's knobs do not apply.
        for k in ("seed", "n_people", "n_unseen"):
            key_cfg["world"].pop(k)

    def build(out: Path) -> None:
        t0 = time.time()
        if source is None:
            _write_generated(cfg, out)
        else:
            for name in key_cfg["source"]:
                shutil.copyfile(source / name, out / name)
        info = _train_model(cfg, out, progress)
        info.update(
            {
                "build_seconds": round(time.time() - t0, 2),
                "atu_version": __version__,
                "torch_version": torch.__version__,
                "transformers_version": transformers.__version__,
                "threads": torch.get_num_threads(),
            }
        )
        (out / "build.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")

    return BuiltWorld(cache.get_or_build("worlds", key_cfg, build, root=root, force=force))
