"""The model card written into ``EXPORT/model/README.md``: how the model was made, with which settings, how it
scored, and what it forgot, by count and hash only.

The model directory is what people copy to a model hub or a serving host, away from the guard and the manifest, so
the card never names a forgotten concept: a list of names would tell every reader what to ask about. The sha256 of
the sorted names lets whoever holds the list check that it is the one this model forgot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from atu.formats import PROBE_KINDS

# The run settings that describe how the model was changed (paths and names of the user's data are left out).
_SETTINGS = {
    "align": ("hook_layer", "window", "epochs", "realign_epochs"),
    "unlearn": ("taus", "steps_per_stage", "optimizer", "lr", "method", "target", "retain_weight",
                "retain_similarity_weight", "retain_budget", "seed"),
    "harden": ("enabled", "noise", "steps"),
}  # fmt: skip


def concepts_digest(names: Sequence[str]) -> str:
    """sha256 of the concept names, sorted and joined by newlines (UTF-8): the card's fingerprint of what was
    forgotten. ``printf '%s\\n' NAMES | sort | head -c -1 | sha256sum`` computes the same."""
    return hashlib.sha256("\n".join(sorted(names)).encode("utf-8")).hexdigest()


def _hardening_lines(harden: dict[str, Any]) -> list[str]:
    if not harden.get("enabled"):
        return []
    return [
        f"Then hardened against relearning: each decoder-layer weight matrix was mixed with {harden['noise']:g} parts",
        "noise of its own scale and distilled back from the unlearned model on the retain texts for",
        f"{harden['steps']} steps.",
    ]


def _evaluation_lines(evaluation: dict[str, Any] | None) -> list[str]:
    """The card's table of recall before and after, or why there is none."""
    lines: list[str] = []
    before, after = (evaluation or {}).get("before"), (evaluation or {}).get("after")
    if before and after:
        lines += [
            "ROUGE-L recall of greedy answers to probe questions, before and after unlearning:",
            "",
            "| group | probe kind | before | after |",
            "|---|---|---:|---:|",
        ]
        for group in ("forget", "neighbour", "retain"):
            for kind in PROBE_KINDS:
                b, a = (before.get(group) or {}).get(kind), (after.get(group) or {}).get(kind)
                if b is not None and a is not None:
                    lines.append(f"| {group} | {kind} | {b:.3f} | {a:.3f} |")
        b, a = before.get("retain_perplexity"), after.get("retain_perplexity")
        if b and a:
            lines.append(f"| retain | perplexity (held-out) | {b:.1f} | {a:.1f} |")
    else:
        lines.append("Not evaluated in this export (`atu run` with probes writes the figures here).")
    return lines


def model_card(
    *, base_model: str, encoder: str, hook_layer: int, forgotten: Sequence[str], config: dict[str, Any],
    evaluation: dict[str, Any] | None, version: str,
) -> str:  # fmt: skip
    """The card's Markdown. ``config`` is the run config as a dict, ``evaluation`` the export's summary (``before``
    and ``after`` recall per group and probe kind, ``stop_reason``), or None when the run did not evaluate."""
    lines = [
        "---",
        "tags: [unlearning, align-then-unlearn]",
        "---",
        "",
        "# Unlearned model",
        "",
        f"Made with align-then-unlearn {version} from `{base_model}` by the Align-then-Unlearn method (Spohn et al.,",
        "2025, arXiv 2506.13181): an embedding predictor reads the hidden states of decoder layer "
        f"{hook_layer} and is aligned to",
        f"the text encoder `{encoder}`; layers below it were fine-tuned until the predicted future of texts about",
        "each forgotten concept stayed below a cosine threshold that falls stage by stage.",
        *_hardening_lines(config.get("harden") or {}),
        "",
        "## What was forgotten",
        "",
        f"{len(forgotten)} concept(s). The names are not listed here; sha256 of the sorted names joined by newlines:",
        "",
        f"    {concepts_digest(forgotten)}",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for section, keys in _SETTINGS.items():
        values = config.get(section) or {}
        lines += [f"| `{section}.{k}` | `{values[k]}` |" for k in keys if k in values]
    top = ("guard_target", "guard_fpr", "guard_fpr_scope", "stop_signal")
    lines += [f"| `{k}` | `{config[k]}` |" for k in top if k in config]
    lines += ["", "## Evaluation", ""]
    lines += _evaluation_lines(evaluation)
    if (evaluation or {}).get("stop_reason"):
        lines += ["", f"Schedule: {evaluation['stop_reason']}."]
    lines += [
        "",
        "## Serving",
        "",
        "`vllm serve` this directory as any Hugging Face model. The export's `guard/` directory (next to this one)",
        "holds the leakage guard that `atu serve EXPORT` puts in front of vLLM.",
        "",
        "## License",
        "",
        "The base model's license applies to these weights.",
    ]
    return "\n".join(lines) + "\n"
