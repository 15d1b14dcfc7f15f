"""Relearning attack: fine-tune an unlearned model for a few steps on some facts, then ask about the others.

Knowledge that was only hidden comes back from a small related set: a few steps on half of a forgotten person's
facts bring back facts that were not in that set. The attacker owns the weights, so every parameter trains
(Adam, next-token loss on the given texts). Which facts were given is decided by their answers: a probe is held
out when its answer appears in none of the given texts, so nothing the model was shown is counted as recovered.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from atu.errors import ConfigError
from atu.formats import CorpusRecord, Probe
from atu.hidden import decoder_layers
from atu.texts import lm_loss, text_batches, token_nll


@dataclass
class RelearnConfig:
    """One relearning run."""

    steps: int = 10  # optimizer steps (K)
    lr: float = 1e-4  # Adam learning rate, constant
    batch_size: int = 4  # texts per step, drawn in a shuffled cycle over the given texts
    max_length: int = 128  # tokens per text (truncated)
    seed: int = 0  # order of the texts and torch seed

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"relearn.{name} must be a positive int, got {value!r}")
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not self.lr > 0:
            raise ConfigError(f"relearn.lr must be a number > 0, got {self.lr!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _answer_in(answer: str, texts: Sequence[str]) -> bool:
    needle = answer.strip().lower()
    return any(needle in t.lower() for t in texts)


def default_relearn_texts(corpus: Sequence[CorpusRecord], probes: Sequence[Probe], concept: str) -> list[str]:
    """Half of ``concept``'s facts as the single-fact texts of its training corpus that state them.

    The facts are its probes' attributes in sorted order, every other one (the first, third, ...); a fact's texts
    are the corpus texts filed under the concept that contain its answer and no other attribute's answer (the
    world's ``Q: ... A: ...`` pairs; a bio states every fact and is never one of them)."""
    answers: dict[str, str] = {}
    for p in probes:
        if p.concept == concept and p.attribute and p.answer.strip().lower() != concept.lower():
            answers.setdefault(p.attribute, p.answer)
    if len(answers) < 2:
        raise ConfigError(f"{concept!r} has fewer than two facts with probes; give the texts to relearn with --on")
    chosen = sorted(answers)[::2]
    others = [a for k, a in answers.items() if k not in chosen]
    texts = [
        r.text
        for r in corpus
        if r.concept == concept
        and any(_answer_in(answers[k], [r.text]) for k in chosen)
        and not any(_answer_in(a, [r.text]) for a in others)
    ]
    if not texts:
        raise ConfigError(f"no single-fact texts about {concept!r} in the corpus; give the texts to relearn with --on")
    return texts


def held_out_probes(probes: Sequence[Probe], forget: Sequence[str], texts: Sequence[str]) -> list[Probe]:
    """The probes about forgotten concepts whose answer appears in none of ``texts``: the facts not relearned."""
    forget_set = set(forget)
    return [p for p in probes if p.concept in forget_set and not _answer_in(p.answer, texts)]


def relearn(model, tokenizer, texts: Sequence[str], cfg: RelearnConfig) -> tuple[torch.nn.Module, list[dict]]:
    """Fine-tune every parameter of ``model`` in place on ``texts`` for ``cfg.steps`` steps; returns (model, one
    record per step: ``step``, ``loss`` (mean token NLL before the step), ``texts`` (the texts of its batch)).

    The model is left in eval mode with every parameter's ``requires_grad`` as it was."""
    if not texts:
        raise ConfigError("no texts to relearn on")
    decoder_layers(model)  # a causal LM we know how to read, or a one-line error
    torch.manual_seed(cfg.seed)
    order = list(range(len(texts)))
    rng = random.Random(cfg.seed)
    device = next(model.parameters()).device
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    queue: list[int] = []
    logged = []
    model.train()
    for step in range(cfg.steps):
        if len(queue) < cfg.batch_size:  # a fresh shuffled pass once the current one runs short
            rng.shuffle(order)
            queue += order
        picked, queue = queue[: cfg.batch_size], queue[cfg.batch_size :]
        ((ids, attn),) = text_batches([texts[i] for i in picked], tokenizer, cfg.max_length, batch_size=len(picked))
        ids, attn = ids.to(device), attn.to(device)
        loss = lm_loss(model, ids, attn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        logged.append((step, loss.detach(), [texts[i] for i in picked]))
    model.eval()
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True))
    return model, [{"step": s, "loss": float(v), "texts": t} for s, v, t in logged]


def held_out_fact_texts(
    corpus: Sequence[CorpusRecord], probes: Sequence[Probe], forget: Sequence[str], texts: Sequence[str]
) -> tuple[list[str], list[str]]:
    """The training texts of the forgotten facts not relearned, and their answers (lower case): the records filed
    under a forgotten concept, other than ``texts``, that state the answer of a held-out probe and no answer that
    ``texts`` state. A forgotten concept's own name is never counted as an answer (every text of hers states it)."""
    forget_set, names = set(forget), {c.strip().lower() for c in forget}
    held = {p.answer.strip().lower() for p in held_out_probes(probes, forget, texts)} - names
    given = {p.answer.strip().lower() for p in probes if p.concept in forget_set} - held - names
    given_texts = set(texts)
    out = []
    for r in corpus:
        low = r.text.lower()
        if r.concept in forget_set and r.text not in given_texts and any(a in low for a in held):
            if not any(a in low for a in given):
                out.append(r.text)
    return out, sorted(held)


def answer_span(tokenizer, text: str, answers: Sequence[str]) -> tuple[int, int] | None:
    """(first, end) token positions (BOS counted) of the earliest of ``answers`` (lower case) in ``text``; None when it
    states none."""
    found = [(i, a) for a in answers if (i := text.lower().find(a)) >= 0]
    if not found:
        return None
    i, a = min(found)
    first = len(tokenizer(text[:i].rstrip())["input_ids"])
    end = len(tokenizer(text[: i + len(a)])["input_ids"])
    return first, max(end, first + 1)


def text_loss(model, tokenizer, texts: Sequence[str], answers: Sequence[str] | None = None) -> float:
    """Mean next-token loss over the texts' tokens; with ``answers``, over the tokens of the first answer each text
    states only (`answer_span`), so that the question's words do not count."""
    batches = text_batches(list(texts), tokenizer, 128, batch_size=16)
    total = count = 0.0
    start = 0
    for (_, attn), nll in zip(batches, token_nll(model, batches)):
        keep = attn[:, 1:].clone().float()
        if answers is not None:
            for row, text in enumerate(texts[start : start + len(attn)]):
                keep[row] = 0
                span = answer_span(tokenizer, text, answers)
                if span is not None:
                    keep[row, span[0] - 1 : span[1] - 1] = 1  # position t-1 predicts token t
        start += len(attn)
        total += float((nll * keep).sum())
        count += float(keep.sum())
    return total / max(count, 1.0)


def loss_recovery(before: float, unlearned: float, relearned: float) -> float | None:
    """Share of the loss unlearning added that relearning takes away: (unlearned - relearned) / (unlearned -
    before); None when unlearning added none."""
    added = unlearned - before
    return (unlearned - relearned) / added if added > 1e-9 else None


def recovery(before: float | None, unlearned: float | None, relearned: float | None) -> float | None:
    """Share of the recall that unlearning removed which relearning brings back: (relearned - unlearned) /
    (before - unlearned); None when unlearning removed nothing (the share is undefined)."""
    if before is None or unlearned is None or relearned is None or before - unlearned <= 1e-9:
        return None
    return (relearned - unlearned) / (before - unlearned)
