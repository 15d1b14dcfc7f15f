"""`atu attack quantize` and `atu attack relearn`: attack an export, evaluate, and compare with its original model.

Both return flat JSON-ready dicts; the CLI prints them and writes them with ``--out``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

from atu import formats
from atu.attack.guard import guard_report
from atu.attack.quantize import QuantConfig, bucket_collapse, collapse_summary, int8_dynamic, quantize_model
from atu.attack.relearn import (
    RelearnConfig,
    default_relearn_texts,
    held_out_fact_texts,
    held_out_probes,
    loss_recovery,
    recovery,
    relearn,
    text_loss,
)
from atu.attack.source import ExportSource, evaluate_loaded
from atu.errors import ConfigError
from atu.evaluation.probes import answer_probes, mean_recall_by_kind
from atu.formats import PROBE_KINDS
from atu.loading import load_lm

logger = logging.getLogger(__name__)

INT8_KERNEL = "int8 torch.ao dynamic"


def mean_of_kinds(recall: dict) -> float | None:
    values = [recall[k] for k in PROBE_KINDS if recall.get(k) is not None]
    return sum(values) / len(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def precision_ratios(before: dict, original: dict, unlearned: dict) -> dict:
    """Means of the probe kinds: forget recall of the unlearned model over the original's at full precision ("of
    before": quantizing the original is not forgetting), neighbour and retain over the original's at the same
    precision (what quantization costs everyone is not the unlearning's doing)."""
    return {
        "forget": _ratio(mean_of_kinds(unlearned["forget"]), mean_of_kinds(before["forget"])),
        **{g: _ratio(mean_of_kinds(unlearned[g]), mean_of_kinds(original[g])) for g in ("neighbour", "retain")},
    }


def _brief(ev: dict) -> dict:
    return {k: v for k, v in ev.items() if k != "answers"}


def quantize_attack(
    src: ExportSource, cfg: QuantConfig, *, kernel: bool = True, guard: bool = True, progress: bool = False
) -> dict:
    """The export's model and its original at fp32, under ``cfg``'s RTN, and (``kernel``) under torch's int8
    kernels: `atu eval`'s figures for each, unlearned/original ratios per precision, the per-layer bucket-collapse
    check of ``cfg``, and (``guard``) the export's guard on each quantized unlearned model's answers."""
    original, tok_o = load_lm(src.original)
    unlearned, tok_u = load_lm(src.export.model_dir)
    precisions = [("fp32", None), (cfg.label, lambda m: quantize_model(m, cfg))]
    if kernel:
        precisions.append((INT8_KERNEL, int8_dynamic))
    probes = formats.read_probes(src.data.probes)
    rows, kernel_error = [], None
    for label, make in precisions:
        try:
            pair = {
                "original": make(original) if make else original,
                "unlearned": make(unlearned) if make else unlearned,
            }
        except ConfigError as e:  # no int8 kernel in this torch build: say so and carry on with RTN
            kernel_error = str(e)
            logger.warning("%s", e)
            continue
        evals = {which: evaluate_loaded(m, tok_o if which == "original" else tok_u, src, progress=progress)
                 for which, m in pair.items()}  # fmt: skip
        row = {"precision": label, **{w: _brief(ev) for w, ev in evals.items()}}
        before = rows[0]["original"] if rows else evals["original"]  # fp32 comes first
        row["ratios"] = precision_ratios(before, evals["original"], evals["unlearned"])
        if guard:
            row["guard"] = guard_report(pair["unlearned"], tok_u, probes, src.export, unlearned, src.forget)
        rows.append(row)
    layers = bucket_collapse(original, unlearned, cfg)
    return {
        "export": str(src.export.root),
        "original": src.original,
        "forgotten": src.forget,
        "quantization": cfg.to_dict(),
        "rows": rows,
        "kernel_error": kernel_error,
        "collapse": {"summary": collapse_summary(layers), "layers": [x.to_dict() for x in layers]},
    }


def _grouped_recall(rows: list[dict], groups: dict[str, set]) -> dict:
    """Mean recall by kind over the rows of each group of probe questions (None where a group is empty)."""
    out = {}
    for name, keys in groups.items():
        picked = [r for r in rows if (r["concept"], r["question"]) in keys]
        out[name] = {**mean_recall_by_kind(picked), "n": len(picked)}
    return out


def relearn_groups(probes: Sequence[formats.Probe], forget: Sequence[str], concept: str, texts: Sequence[str]):
    """(concept, question) keys of: the facts given (``concept``'s probes not held out), the same person's facts
    not given, the other forgotten people's facts, and everyone else's."""
    held = {(p.concept, p.question) for p in held_out_probes(probes, forget, texts)}
    forget_set = set(forget)
    return {
        "given": {(p.concept, p.question) for p in probes if p.concept == concept} - held,
        "held_out": {k for k in held if k[0] == concept},
        "other_forgotten": {k for k in held if k[0] != concept},
        "retain": {(p.concept, p.question) for p in probes if p.concept not in forget_set},
    }


def relearn_attack(
    src: ExportSource,
    cfg: RelearnConfig,
    texts: Sequence[str] | None = None,
    *,
    guard: bool = True,
    progress: bool = False,
) -> dict:
    """Fine-tune the export's model on ``texts`` (default: half of its first forgotten concept's facts) for
    ``cfg.steps`` steps, and compare recall on the facts not given with the original model's and the unlearned
    model's. Recovery: the share of the recall that unlearning removed which came back."""
    probes = formats.read_probes(src.data.probes)
    concept = src.forget[0]
    if texts is None:
        if not src.data.corpus:
            raise ConfigError("the export's data names no corpus to take the relearning texts from; pass --on FILE")
        texts = default_relearn_texts(formats.read_corpus(src.data.corpus), probes, concept)
    groups = relearn_groups(probes, src.forget, concept, texts)
    if not groups["held_out"] and not groups["other_forgotten"]:
        raise ConfigError("every forgotten fact's answer is in the relearning texts: no held-out fact to evaluate")
    original, tok = load_lm(src.original)
    unlearned, tok_u = load_lm(src.export.model_dir)
    relearned, records = relearn(copy.deepcopy(unlearned), tok_u, texts, cfg)
    recall = {
        name: _grouped_recall(answer_probes(m, tk, probes, progress=progress), groups)
        for name, m, tk in (
            ("original", original, tok),
            ("unlearned", unlearned, tok_u),
            ("relearned", relearned, tok_u),
        )
    }
    rec = {
        g: recovery(*(mean_of_kinds(recall[m][g]) for m in ("original", "unlearned", "relearned")))
        for g in ("held_out", "other_forgotten", "given")
    }
    out = {
        "export": str(src.export.root),
        "original": src.original,
        "forgotten": src.forget,
        "relearned_concept": concept,
        "relearn": cfg.to_dict(),
        "texts": list(texts),
        "loss": [r["loss"] for r in records],
        "recall": recall,
        "recovery": rec,
        "ratio_to_original": {
            g: _ratio(mean_of_kinds(recall["relearned"][g]), mean_of_kinds(recall["original"][g]))
            for g in ("held_out", "other_forgotten", "given", "retain")
        },
    }
    if src.data.corpus:
        models = {"original": (original, tok), "unlearned": (unlearned, tok_u), "relearned": (relearned, tok_u)}
        out["answer_loss"] = held_out_answer_loss(src, probes, texts, models)
    if guard:
        out["guard"] = guard_report(relearned, tok_u, probes, src.export, unlearned, src.forget)
    return out


def held_out_answer_loss(src: ExportSource, probes, texts: Sequence[str], models: dict) -> dict | None:
    """The training side of the same question: each model's loss on the answers of the held-out facts in their own
    corpus texts, and the share of what unlearning added that relearning takes away (probe-free, so a setting can be
    chosen on it). None when the corpus states no held-out fact apart from the given ones."""
    held, answers = held_out_fact_texts(formats.read_corpus(src.data.corpus), probes, src.forget, texts)
    if not held:
        return None
    loss = {name: text_loss(m, tk, held, answers) for name, (m, tk) in models.items()}
    return {
        **loss,
        "texts": len(held),
        "recovery": loss_recovery(*(loss[k] for k in ("original", "unlearned", "relearned"))),
    }
