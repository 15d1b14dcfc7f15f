"""Leakage scoring: the pure position/span/truncation helpers against naive references, the scorer against a
brute-force loop over positions, the probe export, and (slow) the real vLLM pooling backend against transformers."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from toy_scorer import DIM, TABLE, ByteTokenizer, Identity, TableBackend, byte_id, toy_scorer

from atu.export import load_export
from atu.generation import chat_prompt
from atu.hidden import hidden_at
from atu.index import ConceptIndex
from atu.loading import load_lm
from atu.vllm_check import free_port
from serve.backends import BackendError, VLLMPoolingBackend, check_id_lists, length_batches
from serve.pooling_model import kv_cache_bytes, probe_export, probe_key
from serve.scoring import RESCORE_CHARS, Scorer, excerpt_span, part_rows, truncation, window_char_starts

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- pure helpers


def naive_rows(n_prefix, n_prompt, n_completion):
    """Row t predicts the window starting at token t + 1; prefix rows are never scored."""
    prompt, completion = [], []
    total = n_prefix + n_prompt + n_completion
    for t in range(n_prefix, total):
        start = t + 1
        if n_prefix <= start < n_prefix + n_prompt:
            prompt.append(t)
        elif n_prefix + n_prompt <= start < total:
            completion.append(t)
    return prompt, completion


@pytest.mark.parametrize("n_prefix", [0, 1])
def test_part_rows_match_naive(n_prefix):
    for n_prompt in range(5):
        for n_completion in range(5):
            prompt, completion = part_rows(n_prefix, n_prompt, n_completion)
            want_p, want_c = naive_rows(n_prefix, n_prompt, n_completion)
            assert prompt.tolist() == want_p and completion.tolist() == want_c, (n_prompt, n_completion)


def test_part_rows_completion_starts_at_last_prompt_token_and_skips_its_last():
    prompt, completion = part_rows(1, 3, 4)  # [BOS] p p p c c c c
    assert prompt.tolist() == [1, 2]  # BOS (row 0) is never scored; row 3 (last prompt token) predicts the completion
    assert completion.tolist() == [3, 4, 5, 6]  # row 7 (last completion token) predicts text that does not exist


def test_truncation_matches_naive():
    for n_prefix in (0, 1):
        for n_prompt in range(6):
            for n_completion in range(6):
                for max_tokens in range(n_prefix + 1, 12):
                    drop_p, drop_c = truncation(n_prefix, n_prompt, n_completion, max_tokens)
                    # naive: drop the oldest prompt tokens one by one, then the oldest completion tokens
                    p, c = n_prompt, n_completion
                    while n_prefix + p + c > max_tokens:
                        p, c = (p - 1, c) if p else (p, c - 1)
                    assert (drop_p, drop_c) == (n_prompt - p, n_completion - c)


def test_truncation_rejects_a_limit_the_prefix_fills():
    with pytest.raises(ValueError, match="must exceed the prefix length"):
        truncation(1, 3, 3, 1)


def test_window_char_starts_with_overlapping_multibyte_offsets():
    # "naïve 😀!" as byte-level BPE reports it: the bytes of "ï" and of "😀" carry their character's offsets, and a
    # token that ends inside a character still reports the whole character.
    offsets = np.array([(0, 2), (2, 3), (2, 3), (3, 5), (5, 6), (6, 7), (6, 7), (6, 7), (6, 7), (7, 8)])
    ends = offsets[:, 1]
    for p in range(len(offsets)):
        want = 0 if p == 0 else max(ends[:p])  # naive: the furthest character the text before token p reaches
        assert window_char_starts(np.array([p]), offsets)[0] == want
    assert window_char_starts(np.arange(10), offsets).tolist() == [0, 2, 3, 3, 5, 6, 7, 7, 7, 7]
    with pytest.raises(ValueError, match=r"positions must be in \[0, 10\)"):
        window_char_starts(np.array([10]), offsets)


def test_excerpt_span_skips_leading_space_and_clips():
    text = "ab  cdé😀fgh"
    assert excerpt_span(text, 2, 4) == (4, 8)
    assert text[slice(*excerpt_span(text, 2, 4))] == "cdé😀"
    assert excerpt_span(text, 9, 80) == (9, len(text))
    assert excerpt_span(text, len(text), 80) == (len(text), len(text))


def test_length_batches_bound_padded_size_and_cover_everything():
    lengths = [5, 50, 7, 6, 49, 300, 8]
    batches = length_batches(lengths, max_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 100


def test_check_id_lists_errors():
    with pytest.raises(ValueError, match="sequence 1 must be a non-empty list"):
        check_id_lists([[1, 2], []])
    with pytest.raises(ValueError, match="non-negative int token ids"):
        check_id_lists([[1, -2]])
    with pytest.raises(ValueError, match="expected a list of token id lists"):
        check_id_lists("12")


def test_kv_cache_bytes():
    cfg = {"num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "hidden_size": 256}
    per_token = 2 * 2 * 4 * 32 * 4
    assert kv_cache_bytes(cfg, 1024, seqs=64) == max(16 * 2**20, -(-per_token * 1024 * 64 // 2**20) * 2**20)
    assert kv_cache_bytes(cfg, 16, seqs=1) == 16 * 2**20  # the floor


# ---------------------------------------------------------------------------------------------- a hand-made scorer


def by_concept(scores):
    return {s.concept: s for s in scores}


def test_table_vectors_are_far_apart():
    unit = TABLE / np.linalg.norm(TABLE, axis=1, keepdims=True)
    sims = unit @ unit.T
    assert (sims - np.eye(len(TABLE))).max() < 0.7  # so a score of 1.0 names exactly one token id


def test_positions_spans_and_excerpts_on_multibyte_text():
    emoji = [b + 3 for b in "😀".encode()]
    concepts = {"b": byte_id("b"), "emoji-first-byte": emoji[0], "d": byte_id("d"), "y": byte_id("y"),
                "x": byte_id("x"), "bos": 1}  # fmt: skip
    report = toy_scorer(concepts).score("xy", "ab😀cd")  # ids: [BOS] x y | a b F0 9F 98 80 c d
    comp, prompt = by_concept(report.completion), by_concept(report.prompt)

    assert comp["b"].score == pytest.approx(1.0, abs=1e-5) and comp["b"].flagged
    assert comp["b"].row == 4 and comp["b"].position == 2  # the window after "b" starts at the emoji's first byte
    assert comp["b"].span == (2, 5) and comp["b"].excerpt == "😀cd"
    # after the emoji's first byte the text before reaches past the whole emoji (its bytes share its span)
    assert comp["emoji-first-byte"].position == 3 and comp["emoji-first-byte"].excerpt == "cd"
    # the last prompt token's row predicts the completion's start; it belongs to the completion, not the prompt
    assert comp["y"].score == pytest.approx(1.0, abs=1e-5) and comp["y"].position == 0 and comp["y"].row == 2
    assert comp["y"].excerpt == "ab😀cd" and prompt["y"].score < 0.9
    assert prompt["x"].score == pytest.approx(1.0, abs=1e-5) and prompt["x"].position == 1
    assert prompt["x"].excerpt == "y" and prompt["x"].span == (1, 2)
    # the last completion token predicts text after the completion: not scored; BOS is never scored
    assert comp["d"].score < 0.9 and not comp["d"].flagged
    assert comp["bos"].score < 0.9 and prompt["bos"].score < 0.9
    assert set(report.flagged) == {"y", "b", "emoji-first-byte"}  # all three at cosine 1.0
    assert report.prompt_flagged == ["x"] and not report.truncated and report.n_tokens == 11


def test_per_concept_max_matches_naive_numpy_over_random_concepts():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((12, DIM)).astype(np.float32)
    thresholds = rng.uniform(0.0, 0.3, 12).tolist()
    index = ConceptIndex.build(vectors, [f"c{i}" for i in range(12)], thresholds)
    scorer = Scorer(TableBackend(TABLE), ByteTokenizer(), Identity(), index, max_tokens=64, top_k=None)
    pairs = [("Q: who?", " Ada was born in Zürich."), ("", "plain text"), ("prompt only", ""), ("é", "😀😀")]
    unit_c = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for (prompt, completion), report in zip(pairs, scorer.score_batch(pairs)):
        ids = [1] + ByteTokenizer()([prompt])["input_ids"][0] + ByteTokenizer()([completion])["input_ids"][0]
        h = TABLE[ids] / np.linalg.norm(TABLE[ids], axis=1, keepdims=True)
        sims = h @ unit_c.T  # (T, C)
        n_p = len(ids) - 1 - len(completion.encode())
        for part, rows in zip((report.prompt, report.completion), naive_rows(1, n_p, len(completion.encode()))):
            got = by_concept(part)
            assert [s.score for s in part] == sorted((s.score for s in part), reverse=True)
            for c in range(12):
                s = got[f"c{c}"]
                if not rows:
                    assert (s.score, s.position, s.row, s.span, s.flagged) == (-1.0, -1, -1, (0, 0), False)
                    continue
                col = sims[rows, c]
                assert s.score == pytest.approx(col.max(), abs=1e-5)
                # repeated tokens tie; any row reaching the maximum (up to float noise) is right
                assert s.row in [r for r, v in zip(rows, col) if v >= col.max() - 1e-5]
                first = 1 if part is report.prompt else 1 + n_p  # sequence index of the part's first token
                assert s.position == s.row + 1 - first
                assert s.flagged == (s.score > thresholds[c])
        flagged = [s.concept for s in report.completion if s.flagged]
        assert report.flagged == flagged
        assert report.max_score == (report.completion[0].score if completion else -1.0)


def test_top_k_of_many_concepts_equals_the_head_of_the_full_ranking():
    rng = np.random.default_rng(2)
    n = 5000  # above the size where the top_k are found by partition
    index = ConceptIndex.build(
        rng.standard_normal((n, DIM)).astype(np.float32), [f"c{i}" for i in range(n)], [0.3] * n
    )
    pair = [("Q: who?", " Ada was born in Zürich, then moved.")]

    def scorer(top_k):
        return Scorer(TableBackend(TABLE), ByteTokenizer(), Identity(), index, max_tokens=64, top_k=top_k)

    top, every = scorer(7).score_batch(pair)[0], scorer(None).score_batch(pair)[0]
    assert [s.concept for s in top.completion] == [s.concept for s in every.completion[:7]]
    assert [s.score for s in top.completion] == [s.score for s in every.completion[:7]]
    assert top.flagged == every.flagged == [s.concept for s in every.completion if s.flagged]
    assert 0 < len(top.flagged) < n


def test_truncation_drops_oldest_prompt_then_completion_tokens():
    concepts = {"x": byte_id("x"), "z": byte_id("z"), "a": byte_id("a"), "d": byte_id("d")}
    report = toy_scorer(concepts, max_tokens=6).score("xyz", "abcd")  # kept: [BOS] z | a b c d
    comp, prompt = by_concept(report.completion), by_concept(report.prompt)
    assert report.truncated and report.n_tokens == 6
    assert comp["x"].score < 0.9 and prompt["x"].score == -1.0  # dropped; no prompt row is left
    assert comp["z"].position == 0 and comp["z"].row == 1 and comp["z"].score == pytest.approx(1.0, abs=1e-5)
    assert comp["a"].position == 1 and comp["a"].excerpt == "bcd"

    report = toy_scorer(concepts, max_tokens=4).score("xy", "abcdef")  # kept: [BOS] | d e f
    comp = by_concept(report.completion)
    assert report.truncated and report.n_tokens == 4
    assert comp["d"].position == 4 and comp["d"].row == 1 and comp["d"].excerpt == "ef"
    assert comp["a"].score < 0.9 and report.prompt[0].position == -1


def test_prompt_with_its_own_bos_is_not_given_a_second_one():
    class WithBosText(ByteTokenizer):
        def __call__(self, texts, **kw):
            out = super().__call__([t.removeprefix("<s>") for t in texts], **kw)
            for i, t in enumerate(texts):
                if t.startswith("<s>"):
                    out["input_ids"][i] = [1] + out["input_ids"][i]
                    out["offset_mapping"][i] = [(0, 3)] + [(a + 3, b + 3) for a, b in out["offset_mapping"][i]]
            return out

    index = ConceptIndex.build(TABLE[[byte_id("Q")]], ["Q"], [0.99])
    scorer = Scorer(TableBackend(TABLE), WithBosText(), Identity(), index, max_tokens=64)
    report = scorer.score("<s>Q:", " A")  # ids: BOS Q : | space A
    assert report.n_tokens == 5
    assert report.prompt[0].position == 2 and report.prompt[0].excerpt == ":"  # index 2 of the prompt's own tokens


def test_scorer_input_errors():
    scorer = toy_scorer({"a": byte_id("a")})
    with pytest.raises(ValueError, match="pairs must be a list"):
        scorer.score_batch("prompt")
    with pytest.raises(ValueError, match=r"pairs\[1\] must be a \(prompt, completion\) tuple"):
        scorer.score_batch([("a", "b"), ("a", None)])
    with pytest.raises(ValueError, match=r"pairs\[0\] must be"):
        scorer.score_batch([("only one",)])
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        toy_scorer({"a": byte_id("a")}, top_k=0)
    with pytest.raises(ValueError, match="max_tokens must be an int >= 2"):
        toy_scorer({"a": byte_id("a")}, max_tokens=1)
    assert scorer.score_batch([]) == []


def test_report_to_dict_is_json_with_stable_keys():
    report = toy_scorer({"a": byte_id("a")}).score("q", "ab")
    d = json.loads(json.dumps(report.to_dict()))
    assert list(d) == ["completion", "flagged", "max_score", "n_tokens", "prompt", "prompt_flagged", "truncated"]
    assert set(d["completion"][0]) == {
        "concept",
        "score",
        "threshold",
        "flagged",
        "position",
        "span",
        "excerpt",
        "row",
        "named",
    }
    assert d["completion"][0]["span"] == [1, 2] and d["flagged"] == ["a"]
    # every field of a ConceptScore, as dataclasses.asdict gives them (the span as a list)
    score = report.completion[0]
    assert score.to_dict() == {**dataclasses.asdict(score), "span": list(score.span)}


# ---------------------------------------------------------------------------------------------- the tiny export


@pytest.fixture(scope="module")
def export_dir(tiny_run):
    return tiny_run[0] / "export"


@pytest.fixture(scope="module")
def hf_scorer(export_dir):
    with Scorer.from_export(export_dir, backend="hf", top_k=None) as scorer:
        yield scorer


@pytest.fixture(scope="module")
def pairs(hf_scorer, tiny_world):
    tok = hf_scorer.tokenizer
    probes = tiny_world.probes()
    person = hf_scorer.labels[0]
    mine = [p for p in probes if p.concept == person][:3]
    others = [p for p in probes if p.concept != person][:3]
    out = [(chat_prompt(tok, p.question), " " + p.answer) for p in mine + others]
    corpus = [r.text for r in tiny_world.corpus()]
    return out + [("", corpus[0]), ("Plain prompt, no template.", " Naïve café ✓ 😀 answer.")]


def test_score_equals_brute_force_loop_over_positions(hf_scorer, pairs):
    model, layer = hf_scorer.backend.model, hf_scorer.backend.layer
    predictor, index = hf_scorer.predictor, hf_scorer.index
    concepts = torch.from_numpy(index.vectors())  # (C, D) unit
    bos = hf_scorer.tokenizer.bos_token_id
    for (prompt, completion), report in zip(pairs, hf_scorer.score_batch(pairs)):
        p_ids = hf_scorer.tokenizer(prompt, add_special_tokens=False).input_ids
        c_ids = hf_scorer.tokenizer(completion, add_special_tokens=False).input_ids
        p_ids = p_ids[1:] if p_ids[:1] == [bos] else p_ids
        ids = [bos] + p_ids + c_ids
        for part, rows in zip((report.prompt, report.completion), naive_rows(1, len(p_ids), len(c_ids))):
            best = np.full(len(concepts), -1.0)
            where = np.full(len(concepts), -1)
            for t in rows:  # causal: row t from the prefix ids[: t + 1] alone
                prefix = torch.tensor([ids[: t + 1]])
                with torch.no_grad():
                    h = hidden_at(model, prefix, torch.ones_like(prefix), layer)
                    pred = predictor(h, torch.ones_like(prefix))[0, -1]
                cos = torch.nn.functional.cosine_similarity(pred[None], concepts, dim=-1).numpy()
                where = np.where(cos > best, t, where)
                best = np.maximum(best, cos)
            for s in part:
                c = index.labels.index(s.concept)
                assert s.score == pytest.approx(best[c], abs=1e-4), (prompt, completion)
                assert s.row == where[c]


def test_batch_scores_equal_single_scores(hf_scorer, pairs):
    batch = hf_scorer.score_batch(pairs)
    assert hf_scorer.score_text(pairs[6][1]).to_dict() == hf_scorer.score("", pairs[6][1]).to_dict()
    for pair, got in zip(pairs, batch):
        alone = hf_scorer.score(*pair)
        for a, b in zip(alone.completion + alone.prompt, got.completion + got.prompt):
            assert a.concept == b.concept and a.position == b.position and a.span == b.span
            assert a.score == pytest.approx(b.score, abs=1e-5)


def test_flagged_iff_score_above_threshold_with_many_concepts(export_dir, hf_scorer, pairs):
    export = load_export(export_dir)
    real = export.index.vectors()
    rng = np.random.default_rng(0)
    vectors = np.concatenate([real, rng.standard_normal((20, real.shape[1])).astype(np.float32)])
    labels = export.index.labels + [f"random {i}" for i in range(20)]
    # thresholds spread over the cosines these texts reach, so that some concepts are flagged and others not
    probe = Scorer(hf_scorer.backend, hf_scorer.tokenizer, export.predictor, ConceptIndex.build(vectors, labels,
                   [0.0] * len(labels)), max_tokens=hf_scorer.max_tokens, top_k=None)  # fmt: skip
    observed = np.array([s.score for r in probe.score_batch(pairs) for s in r.completion])
    thresholds = rng.uniform(np.quantile(observed, 0.2), np.quantile(observed, 0.9), len(labels)).tolist()
    index = ConceptIndex.build(vectors, labels, thresholds)

    def scorer(top_k):
        return Scorer(hf_scorer.backend, hf_scorer.tokenizer, export.predictor, index,
                      max_tokens=hf_scorer.max_tokens, top_k=top_k)  # fmt: skip

    outcomes = set()
    for top, every in zip(scorer(3).score_batch(pairs), scorer(None).score_batch(pairs)):
        assert [s.concept for s in top.completion] == [s.concept for s in every.completion[:3]]
        for part, flagged in ((every.completion, every.flagged), (every.prompt, every.prompt_flagged)):
            assert [s.score for s in part] == sorted((s.score for s in part), reverse=True)
            assert flagged == [s.concept for s in part if s.score > s.threshold]
            assert all(s.flagged == (s.score > s.threshold) for s in part)
            outcomes |= {s.flagged for s in part}
        assert top.flagged == every.flagged and top.max_score == every.completion[0].score
    assert outcomes == {True, False}  # the checks above saw both outcomes


def test_long_prompt_is_truncated_from_the_start(hf_scorer):
    long_prompt = "Tell me everything. " * 200
    report = hf_scorer.score(long_prompt, " The answer is short.")
    assert report.truncated and report.n_tokens == hf_scorer.max_tokens
    n_prompt = len(hf_scorer.tokenizer(long_prompt, add_special_tokens=False).input_ids)
    kept = hf_scorer.max_tokens - 1 - len(hf_scorer.tokenizer(" The answer is short.").input_ids)
    assert min(s.position for s in report.prompt) >= n_prompt - kept  # only the newest prompt tokens are scored
    assert not hf_scorer.score("short", " answer").truncated


def test_hf_backend_and_from_export_errors(export_dir, hf_scorer):
    with pytest.raises(ValueError, match="backend must be one of"):
        Scorer.from_export(export_dir, backend="tpu")
    with pytest.raises(ValueError, match="sequence 0 must be a non-empty list"):
        hf_scorer.backend.hidden_states([[]])
    with pytest.raises(BackendError, match="unreachable"):
        VLLMPoolingBackend(f"http://127.0.0.1:{free_port()}", timeout=2).hidden_states([[1, 2]])


def test_hf_backend_states_equal_full_model_hidden_states(export_dir, hf_scorer):
    layer = hf_scorer.backend.layer
    full, _ = load_lm(export_dir / "model")  # all layers, unlike the backend's model
    seqs = [[1, 5, 9, 11], [1, 7], [1, 3, 3, 3, 3, 3, 3]]  # different lengths: right padding must not matter
    for got, ids in zip(hf_scorer.backend.hidden_states(seqs), seqs):
        with torch.no_grad():
            want = full(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_empty_texts_score_minus_one(hf_scorer):
    report = hf_scorer.score("", "")
    assert report.max_score == -1.0 and report.flagged == [] and report.n_tokens == 1  # BOS alone
    assert all(s.score == -1.0 and s.position == -1 and s.excerpt == "" for s in report.prompt + report.completion)
    no_bos = toy_scorer({"a": byte_id("a")})
    no_bos.tokenizer.bos_token_id = None
    report = no_bos.score("", "")
    assert report.n_tokens == 0 and report.max_score == -1.0


# ---------------------------------------------------------------------------------------------- the probe export


def test_probe_export_keeps_layers_below_hook_and_unit_norm(export_dir):
    export = load_export(export_dir)
    layer = export.guard.hook_layer
    probe = probe_export(export_dir)
    assert probe_export(export_dir) == probe  # cached: the same entry, not rebuilt
    assert probe.parent.name and probe.parent.parent.name == "probes"
    config = json.loads((probe / "config.json").read_text())
    assert config["num_hidden_layers"] == layer
    assert (probe / "tokenizer.json").is_file() and not list(probe.glob("*.bin"))
    with safe_open(str(probe / "model.safetensors"), "pt") as fh:
        names = list(fh.keys())
        assert torch.equal(fh.get_tensor("model.norm.weight"), torch.ones(export.guard.hidden_size))
    layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
    assert layers == set(range(layer)) and not any(n.startswith("lm_head") for n in names)
    assert probe_key(export)["hook_layer"] == layer

    # transformers on the probe: its last hidden state (final norm with unit weight) is hidden_states[L] rescaled
    from transformers import AutoModelForCausalLM

    probe_model = AutoModelForCausalLM.from_pretrained(probe).eval()
    full, _ = load_lm(export.model_dir)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        last = probe_model(ids, output_hidden_states=True).hidden_states[-1][0]
        want = full(ids, output_hidden_states=True).hidden_states[layer][0]
    cos = torch.nn.functional.cosine_similarity(last, want, dim=-1)
    assert cos.min() > 1 - 1e-5


# ---------------------------------------------------------------------------------------------- real vLLM


@pytest.mark.slow
def test_vllm_pooling_backend_matches_hf(export_dir, hf_scorer, pairs):
    """A real vLLM pooling server on the probe export gives the HF backend's scores and positions."""
    vllm_scorer = Scorer.from_export(export_dir, backend="vllm", top_k=None)  # starts and owns its pooling server
    base = vllm_scorer.backend.base_url
    try:
        got = vllm_scorer.score_batch(pairs)
        states = vllm_scorer.backend.hidden_states([[1, 40, 41, 42]])[0]
        with pytest.raises(BackendError, match="answered 404"):
            VLLMPoolingBackend(base, model_name="no-such-model").hidden_states([[1, 2]])
    finally:
        vllm_scorer.close()
    with pytest.raises(BackendError, match="unreachable"):  # close() stopped the server it started
        VLLMPoolingBackend(base, timeout=5).hidden_states([[1, 2]])

    want = hf_scorer.score_batch(pairs)
    diffs = []
    for a, b in zip(got, want):
        assert a.n_tokens == b.n_tokens and a.flagged == b.flagged and a.prompt_flagged == b.prompt_flagged
        for x, y in zip(a.prompt + a.completion, b.prompt + b.completion):
            assert x.concept == y.concept and x.row == y.row and x.position == y.position and x.span == y.span
            diffs.append(abs(x.score - y.score))
    assert len(diffs) == 2 * len(pairs) * len(hf_scorer.labels) and max(diffs) < 1e-3, max(diffs)
    np.testing.assert_allclose(np.linalg.norm(states, axis=1), 1.0, atol=1e-4)  # vLLM returns unit vectors


def test_since_scores_only_the_new_windows_with_the_whole_texts_scores():
    """A completion scored as it grows, each time from where the last score reached, gets every concept's whole-text
    score (the predictor is causal), while comparing each window with the concepts about once, not once per prefix."""
    concepts = {ch: byte_id(ch) for ch in "abQzé"}
    text = "zz abQ " * 150 + "é end"
    whole = toy_scorer(concepts, max_tokens=4096).score("P", text)
    scorer = toy_scorer(concepts, max_tokens=4096)
    best, since = {}, None
    for end in range(5, len(text) + 5, 5):
        (report,) = scorer.score_batch([("P", text[:end])], since=[since or 0])
        for s in report.completion:
            best[s.concept] = max(best.get(s.concept, -1.0), s.score)
        assert all(s.score == -1.0 for s in report.prompt)  # the prompt was scored before
        since = len(text[:end])
    assert best == pytest.approx({s.concept: s.score for s in whole.completion}, abs=1e-6)
    steps = len(range(5, len(text) + 5, 5))
    assert scorer.rows_scored <= len(text) + steps * (RESCORE_CHARS + 1)
    assert scorer.rows_scored < sum(min(end, len(text)) for end in range(5, len(text) + 5, 5)) / 3
    with pytest.raises(ValueError, match="since must have one entry per pair"):
        scorer.score_batch([("P", "a"), ("P", "b")], since=[0])


def test_a_resumed_stream_computes_one_predictor_row_per_new_token_and_scores_as_the_whole_text():
    """With a real (random) predictor: a stream scored as it grows (``Resume``) reuses the predictor's rows of what
    it shared with its last scoring, so the rows computed grow linearly with its length, and every concept's best
    score over the updates equals the whole text's; the final scoring drops the stream's cached work."""
    from atu.predictor import EmbeddingPredictor, PredictorConfig
    from serve.scoring import Resume

    torch.manual_seed(0)
    concepts = {ch: byte_id(ch) for ch in "abQzé"}

    def scorer():
        s = toy_scorer(concepts, max_tokens=1024)
        config = PredictorConfig(DIM, DIM, d_model=32, n_layers=2, n_heads=4, max_len=1024)
        s.predictor = EmbeddingPredictor(config).eval()
        return s

    text = "zz abQ " * 60 + "é end"
    streamed, reference = scorer(), scorer()
    reference.predictor.load_state_dict(streamed.predictor.state_dict())
    whole = reference.score("P", text)
    best, since, ends = {}, 0, list(range(5, len(text) + 5, 5))
    for end in ends:
        (report,) = streamed.score_batch([("P", text[:end])], since=[Resume("s/0", since)])
        for s in report.completion:
            best[s.concept] = max(best.get(s.concept, -1.0), s.score)
        since = len(text[:end])
    assert best == pytest.approx({s.concept: s.score for s in whole.completion}, abs=1e-4)
    n_tokens = whole.n_tokens
    # one row per token over the whole stream (the first scoring computes the prompt's and BOS's rows too)
    assert streamed.rows_predicted == n_tokens, (streamed.rows_predicted, n_tokens)
    assert streamed.cached_streams == 1
    (final,) = streamed.score_batch([("P", text)], since=[Resume("s/0", None, final=True)])
    assert streamed.rows_predicted == n_tokens  # nothing new to compute
    assert [(s.concept, round(s.score, 4)) for s in final.completion] == [
        (s.concept, round(s.score, 4)) for s in whole.completion
    ]
    assert streamed.cached_streams == 0
    # a pair that is not a stream is computed whole, as before
    streamed.score_batch([("P", text)])
    assert streamed.rows_predicted == 2 * n_tokens


def test_hf_backend_runs_a_resumed_stream_over_its_new_tokens_only(export_dir, tiny_world):
    """With the hf backend, a stream scored as it grows runs the model over each of its tokens about once (its keys
    and values are kept), with the scores of running the whole prefix at every update; a changed ending (a word
    re-tokenised once the rest of it arrives) is run again from where it changed."""
    from serve.scoring import Resume

    with (
        Scorer.from_export(export_dir, backend="hf", top_k=None) as streamed,
        Scorer.from_export(export_dir, backend="hf", top_k=None) as plain,
    ):
        person = streamed.labels[0]
        prompt = chat_prompt(streamed.tokenizer, f"Tell me about {person}.")
        answer = " ".join(p.answer for p in tiny_world.probes()[:12])
        ends = list(range(7, len(answer), 7)) + [len(answer)]
        since = 0
        for end in ends:
            (got,) = streamed.score_batch([(prompt, answer[:end])], since=[Resume("s/0", since)])
            (want,) = plain.score_batch([(prompt, answer[:end])], since=[since])  # the prefix run again
            assert [(s.concept, s.row) for s in got.completion] == [(s.concept, s.row) for s in want.completion]
            assert [s.score for s in got.completion] == pytest.approx([s.score for s in want.completion], abs=1e-4)
            since = end
        (final,) = streamed.score_batch([(prompt, answer)], since=[Resume("s/0", None, final=True)])
        (whole,) = plain.score_batch([(prompt, answer)])
        assert [s.score for s in final.completion] == pytest.approx([s.score for s in whole.completion], abs=1e-4)
        n = whole.n_tokens
        run = streamed.backend.tokens_run
        # every token once, plus the few run again at each update where the text was cut inside a word
        assert n <= run <= n + 3 * len(ends), (run, n, len(ends))
        assert run < plain.backend.tokens_run / 3  # far from running every prefix again
        assert streamed.backend.cached_streams == 0  # the final scoring dropped the stream's cache
