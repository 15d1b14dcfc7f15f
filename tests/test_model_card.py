import hashlib
import json

import pytest

from atu.model_card import concepts_digest, model_card


def test_digest_is_order_free_sha256_of_sorted_names():
    expected = hashlib.sha256(b"Ada Lovelace\nZed Quill").hexdigest()
    assert concepts_digest(["Zed Quill", "Ada Lovelace"]) == expected == concepts_digest(["Ada Lovelace", "Zed Quill"])


def test_card_without_evaluation_names_no_concept():
    card = model_card(
        base_model="org/model", encoder="enc", hook_layer=3, forgotten=["Secret Person"],
        config={"unlearn": {"lr": 3e-4, "taus": [0.9, 0.5]}, "data": {"forget": ["Secret Person"]}},
        evaluation=None, version="0.1.0",
    )  # fmt: skip
    assert "Secret Person" not in card
    assert "1 concept(s)" in card and concepts_digest(["Secret Person"]) in card
    assert "| `unlearn.lr` | `0.0003` |" in card and "Not evaluated" in card
    assert "hardened" not in card
    hardened = model_card(
        base_model="org/model", encoder="enc", hook_layer=3, forgotten=["Secret Person"],
        config={"harden": {"enabled": True, "noise": 0.6, "steps": 200}}, evaluation=None, version="0.1.0",
    )  # fmt: skip
    assert "mixed with 0.6 parts" in hardened and "for\n200 steps" in hardened
    assert "| `harden.enabled` | `True` |" in hardened and "| `harden.noise` | `0.6` |" in hardened


@pytest.mark.slow
def test_export_carries_a_model_card(tiny_run):
    out, cfg, summary = tiny_run
    model_dir = out / "export" / "model"
    card = (model_dir / "README.md").read_text()
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert "model/README.md" in manifest["files"]  # hashed like every other file: `atu verify` covers it
    assert f"{len(summary['forget'])} concept(s)" in card
    assert concepts_digest(summary["forget"]) in card
    assert not [name for name in summary["forget"] if name in card]
    assert "Align-then-Unlearn" in card and f"decoder layer {summary['hook_layer']}" in card
    before = summary["before"]["forget"]["direct"]
    after = summary["after"]["forget"]["direct"]
    assert f"| forget | direct | {before:.3f} | {after:.3f} |" in card
