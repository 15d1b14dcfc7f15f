"""A real vLLM (CPU build) server on an export: it answers, and greedy outputs equal transformers'."""

import pytest

from atu.formats import read_probes
from atu.vllm_check import compare_with_transformers, post_json

pytestmark = pytest.mark.slow


def test_vllm_serves_export_like_transformers(tiny_vllm, tiny_world):
    base, export = tiny_vllm
    model_dir = export / "model"
    questions = [p.question for p in read_probes(tiny_world.path("probes.jsonl"))][:5]
    rows = compare_with_transformers(model_dir, questions, base_url=base)
    chat = post_json(
        base + "/v1/chat/completions",
        {
            "model": str(model_dir),
            "messages": [{"role": "user", "content": questions[0]}],
            "max_tokens": 16,
            "temperature": 0.0,
        },
    )
    assert len(rows) == 5
    assert all(r["equal"] for r in rows), rows
    assert chat["choices"][0]["message"]["content"] == rows[0]["vllm"]
