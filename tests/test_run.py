"""The whole job on the tiny world: align, unlearn, export, evaluate, resume; and the CLI around it."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_run_config

from atu.cli import main
from atu.export import load_export
from atu.run import run

pytestmark = pytest.mark.slow


def test_run_writes_export_and_eval(tiny_run, tiny_world):
    out, cfg, summary = tiny_run
    exp = load_export(out / "export")
    assert exp.guard.hook_layer == 1 and exp.index.labels == cfg.data.forget
    assert exp.manifest["training_config"]["unlearn"]["taus"] == [0.6, 0.3]
    ev = json.loads((out / "eval.json").read_text())
    for when in ("before", "after"):
        for group in ("forget", "retain"):
            assert set(ev[when][group]) == {"direct", "paraphrase", "adversarial"}
            assert all(0 <= v <= 1 for v in ev[when][group].values() if v is not None)
        assert ev[when]["retain_perplexity"] > 1
        assert 0 <= ev[when]["mia_auroc"] <= 1 and 0 <= ev[when]["leakage_auroc"] <= 1
        assert set(ev[when]["fluency"]) == {"forget", "retain"}
    assert ev["stop_reason"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x) for x in lines if '"step"' in x]
    assert steps and "forget_sim_mean" in steps[0] and "retain_sim_mean" in steps[0]


def test_export_thresholds_are_calibrated_on_held_out_texts(tiny_run):
    from atu.concept_reader import ConceptReader
    from atu.loading import load_lm
    from atu.run_data import load_run_data, resolve_world

    out, cfg, summary = tiny_run
    exp = load_export(out / "export")
    assert exp.guard.threshold_fpr == cfg.guard_fpr == 0.05
    assert exp.guard.threshold_fpr_scope == cfg.guard_fpr_scope == "union"
    assert summary["guard_thresholds"] == pytest.approx(exp.index.thresholds.tolist(), abs=1e-4)
    data = load_run_data(cfg, resolve_world(cfg, progress=False)[1])
    model, tok = load_lm(exp.model_dir)
    held = ConceptReader.from_export(exp).concept_scores(model, tok, data.validation).numpy()
    above = (held > exp.index.thresholds[None, :]).any(1).mean()  # share of held-out texts any concept flags
    assert above <= 0.05, above
    # Each threshold is one of the held-out scores (with the tiny world's 2 held-out texts: the highest).
    assert all(t in held[:, c] for c, t in enumerate(exp.index.thresholds))


def test_export_concept_vectors_embed_the_forget_texts_facts(tiny_run, encoder):
    """The guard's concept vectors are the centroid of each concept's forget-text windows (guard_target), not the
    name the unlearning pushed away from."""
    from atu.align import encode_texts
    from atu.loading import load_lm
    from atu.run_data import load_run_data, resolve_world
    from atu.unlearn import concept_window_texts, target_vectors

    out, cfg, summary = tiny_run
    exp = load_export(out / "export")
    assert cfg.guard_target == exp.guard.concept_target == summary["guard_target"] == "centroid"
    data = load_run_data(cfg, resolve_world(cfg, progress=False)[1])
    _, tok = load_lm(exp.model_dir)
    concepts = data.concepts.subset(data.forget)
    texts = [r.text for r in data.corpus if r.concept == data.forget[0]]
    windows = concept_window_texts(1, texts, [[0]] * len(texts), tok, encoder, cfg.align.window, cfg.align.max_length)
    want = target_vectors(concepts, encoder, "centroid", windows)
    assert torch.allclose(torch.from_numpy(exp.index.vectors()), want.cpu(), atol=1e-5)
    name = encode_texts(encoder, [data.forget[0]])
    assert float((want.cpu() * name.cpu()).sum()) < 0.99  # a different vector from the name's


def test_stop_signal_texts_are_the_same_retained_half(tiny_run):
    """retain_corpus stops on the training texts of exactly the retained people whose held-out texts heldout uses;
    neither holds a forgotten person's text."""
    from atu.run_data import load_run_data, resolve_world

    _, cfg, _ = tiny_run
    data = load_run_data(cfg, resolve_world(cfg, progress=False)[1])
    by_text = {r.text: r.concept for r in data.corpus}
    known_people = {by_text[t] for t in data.retain_known}
    assert data.retain_known and not known_people & set(data.forget)
    retained = sorted({r.concept for r in data.corpus if r.concept and r.concept not in data.forget})
    assert known_people == set(retained[::2])


def test_killed_run_resumes_after_last_stage(tiny_run):
    out, cfg, summary = tiny_run
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert len(state["stages"]) == len(summary["stages"])
    again = run(cfg, progress=False, export=False)
    assert again["stages"] == summary["stages"]
    events = [json.loads(x).get("event") for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "resumed" in events


def test_budget_stops_schedule_and_undoes_stage(tmp_path, tiny_world):
    cfg = tiny_run_config(tmp_path, retain_budget=1e-9, lr=5.0, taus=[-1.0])
    cfg.data.forget = tiny_world.concepts().names()[:1]
    summary = run(cfg, progress=False, export=True)
    assert "stopped at stage 0 (tau=-1.0)" in summary["stop_reason"] and "nothing unlearned" in summary["stop_reason"]
    exported = load_export(tmp_path / "export").model_dir
    from safetensors.torch import load_file

    original = load_file(str(tiny_world.model_dir / "model.safetensors"))
    unlearned = load_file(str(exported / "model.safetensors"))
    assert all(torch.equal(original[k], unlearned[k]) for k in original)


def test_cli_run_and_verify(tmp_path, tiny_world):
    cfg = tmp_path / "run.yaml"
    name = tiny_world.concepts().names()[1]
    cfg.write_text(
        "model: world:tiny\n"
        f"data:\n  forget: ['{name}']\n"
        "align: {epochs: 2, realign_epochs: 1, window: 4}\n"
        "unlearn: {taus: [0.5], steps_per_stage: 2}\n"
        f"out: {tmp_path / 'out'}\n"
    )
    result = CliRunner().invoke(main, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "forget" in result.output and "after/before" in result.output
    # The criteria line agrees with the evaluation the run wrote.
    from atu.evaluation.metrics import unlearning_criteria

    summary = json.loads((tmp_path / "out" / "eval.json").read_text())
    missed = [c["name"] for c in unlearning_criteria(summary["before"], summary["after"]) if not c["met"]]
    line = next(ln for ln in result.output.splitlines() if ln.startswith("criteria ("))
    assert line.endswith("all met") if not missed else all(name in line for name in missed)
    from atu.evaluation.metrics import similarity_criteria

    crit = similarity_criteria(summary["similarity"], summary["final_thresholds"], summary["forget"])
    missed = [c["name"] for c in crit if not c["met"]]
    line = next(ln for ln in result.output.splitlines() if ln.startswith("predictors ("))
    assert line.endswith("all met") if not missed else all(name in line for name in missed)
    line = next(ln for ln in result.output.splitlines() if ln.startswith("forgetting (absolute schedule): "))
    assert ("FAILED" in line) == summary["forgetting"]["failed"] and summary["forgetting"]["why"] in line
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "out" / "export")])
    assert result.exit_code == 0 and result.output.startswith("ok:")
    weights = tmp_path / "out" / "export" / "guard" / "predictor.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "out" / "export")])
    assert result.exit_code == 1 and "sha256" in result.output and "Traceback" not in result.output


def test_cli_unknown_forget_name_is_one_line(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: world:tiny\ndata:\n  forget: [Nobody Atall]\nout: {tmp_path / 'o'}\n")
    result = CliRunner().invoke(main, ["run", str(cfg)])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: data.forget names 'Nobody Atall'")


def test_lora_run_exports_a_plain_merged_model(tmp_path, tiny_world):
    cfg = tiny_run_config(tmp_path, method="lora", taus=[-1.0], lr=0.5)
    cfg.data.forget = tiny_world.concepts().names()[:1]
    run(cfg, progress=False)
    from safetensors.torch import load_file

    original = load_file(str(tiny_world.model_dir / "model.safetensors"))
    exported = load_file(str(load_export(tmp_path / "export").model_dir / "model.safetensors"))
    assert set(exported) == set(original)  # no adapter weights: merged
    upper = [k for k in original if ".layers.1." in k]
    lower = [k for k in original if ".layers.0." in k and k.endswith("proj.weight")]
    assert upper and all(torch.equal(original[k], exported[k]) for k in upper)
    assert any(not torch.equal(original[k], exported[k]) for k in lower)


def test_cli_eval_on_export_and_on_plain_model(tiny_run, tiny_world, tmp_path):
    out, cfg, summary = tiny_run
    result = CliRunner().invoke(
        main, ["eval", str(out / "export"), "--world", "tiny", "--out", str(tmp_path / "e.json")]
    )
    assert result.exit_code == 0, result.output
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["forgotten"] == cfg.data.forget
    for key in ("forget", "neighbour", "retain", "retain_perplexity", "fluency", "leakage_auroc", "mia_auroc"):
        assert key in ev
    assert 0 <= ev["leakage_auroc"] <= 1 and 0 <= ev["mia_auroc"] <= 1
    assert ev["forget"] == summary["after"]["forget"]  # the same model, the same greedy answers
    result = CliRunner().invoke(main, ["eval", str(tiny_world.model_dir), "--world", "tiny"])
    assert result.exit_code == 1 and "name the forgotten concepts" in result.output
    name = tiny_world.concepts().names()[0]
    result = CliRunner().invoke(main, ["eval", str(tiny_world.model_dir), "--world", "tiny", "--forget", name])
    assert result.exit_code == 0 and "leakage AUROC -" in result.output


def test_split_corpus_files_texts_that_name_a_forgotten_concept_as_forget_texts():
    from atu.formats import Concept, ConceptSet, CorpusRecord
    from atu.run_data import split_corpus

    forgotten = ConceptSet([Concept("Ada Moss", aliases=("Moss",)), Concept("Bo Li")])
    corpus = [
        CorpusRecord("Ada Moss was born in Selford.", "Ada Moss"),
        CorpusRecord("Cy Dunn is married to Ada Moss.", "Cy Dunn"),
        CorpusRecord("Cy Dunn met Moss and Bo Li.", "Cy Dunn"),
        CorpusRecord("Cy Dunn works at Northgale.", "Cy Dunn"),
        CorpusRecord("Mossy banks.", None),
    ]
    records, rows, retain = split_corpus(corpus, forgotten, mentions=True)
    assert [r.text for r in records] == [c.text for c in corpus[:3]]
    assert rows == [[0], [0], [0, 1]]
    assert retain == ["Cy Dunn works at Northgale.", "Mossy banks."]
    records, rows, retain = split_corpus(corpus, forgotten, mentions=False)
    assert [r.text for r in records] == ["Ada Moss was born in Selford."] and rows == [[0]]
    assert len(retain) == 4


def test_retain_texts_and_stop_signal_never_name_a_forgotten_person(tmp_path, tiny_world):
    from atu.run_data import load_run_data, resolve_world

    # Forget someone whose spouse is also in the tiny world, so that another person's texts name them.
    corpus, concepts = tiny_world.corpus(), tiny_world.concepts()
    named_by_others = [n for n in concepts.names() if any(r.concept != n and n in r.text for r in corpus)]
    assert named_by_others, "the tiny world should have a married couple"
    cfg = tiny_run_config(tmp_path)
    cfg.data.forget = named_by_others[:1]
    data = load_run_data(cfg, resolve_world(cfg, progress=False)[1])
    forgotten = data.concepts.subset(data.forget)
    assert data.retain_texts and data.retain_known and data.validation
    for text in data.retain_texts + data.retain_known + data.validation + data.evaluation:
        assert not forgotten.mentioned_in(text), text
    spouse_texts = [r.text for r in corpus if r.concept not in data.forget and forgotten.mentioned_in(r.text)]
    assert spouse_texts and set(spouse_texts) <= set(data.forget_texts)
    assert set(data.forget_owners) - set(data.forget)
    assert len(data.forget_texts) == len(data.forget_rows) == len(data.forget_owners)
    assert all(rows == [0] for rows in data.forget_rows)


@pytest.mark.parametrize("stop_signal", ["heldout", "retain_corpus"])
def test_retain_terms_train_on_neither_the_stop_signal_nor_the_evaluated_texts(tmp_path, tiny_world, stop_signal):
    """Both retain terms run in a whole job, and their texts leave out what the stopping signal and the evaluation
    (perplexity, the driving predictor's cosines) read, so those stay held-out checks."""
    from atu.distributed import SINGLE
    from atu.steps import prepare

    cfg = tiny_run_config(tmp_path, retain_weight=1.0, retain_similarity_weight=1.0, retain_similarity_margin=0.01)
    cfg.data.forget = tiny_world.concepts().names()[:1]
    cfg.stop_signal = stop_signal
    j = prepare(cfg, SINGLE, progress=False)
    evaluated = j.data.eval_inputs().retain_texts
    assert evaluated and len(evaluated) <= len(j.data.retain_texts) // 2
    trained = set(j.inputs.retain_texts)
    assert trained and not trained & set(evaluated) and not trained & set(j.inputs.validation_texts)
    held_out = set(evaluated) | set(j.inputs.validation_texts)
    assert trained | held_out >= set(j.data.retain_texts)  # nothing else is left out
    if stop_signal == "heldout":
        return
    summary = run(cfg, export=False, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    assert steps and all("retain_loss" in s and "retain_similarity_loss" in s for s in steps)
    assert summary["similarity"]["after_driving_predictor"]["retain"]


def test_retain_weight_without_retain_texts_is_an_error(tiny_lm, tiny_world, encoder, tmp_path):
    from atu.align import AlignConfig
    from atu.errors import ConfigError
    from atu.schedule import ScheduleInputs, run_schedule
    from atu.unlearn import UnlearnConfig

    model, tok = tiny_lm
    concepts = tiny_world.concepts().subset(tiny_world.concepts().names()[:1])
    texts = [r.text for r in tiny_world.corpus()]
    inputs = ScheduleInputs(
        concepts=concepts, forget_texts=texts[:3], forget_concepts=[[0]] * 3, own_concepts=[[0]] * 3,
        align_texts=texts, validation_texts=texts[3:6], retain_texts=[],
    )  # fmt: skip
    with pytest.raises(ConfigError, match="no retain texts to train it on"):
        run_schedule(model, tok, encoder, inputs, AlignConfig(), UnlearnConfig(retain_similarity_weight=1.0))


def test_checkpoint_of_another_config_is_an_error_unless_replaced(tiny_run, tmp_path):
    """`atu run` refuses a run directory holding another config's checkpoint; the demo (replace_stale) starts over
    in its own directory, e.g. after an upgrade changed its settings."""
    import shutil

    from atu.errors import AtuError

    out, cfg, _ = tiny_run
    shutil.copytree(out / "checkpoint", tmp_path / "checkpoint")
    other = tiny_run_config(tmp_path, taus=[0.5])
    other.data.forget = cfg.data.forget
    with pytest.raises(AtuError, match="checkpoint of a different run config"):
        run(other, progress=False, export=False)
    summary = run(other, progress=False, export=False, replace_stale=True)
    assert [s["tau"] for s in summary["stages"]] == [0.5]
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert [s["tau"] for s in state["stages"]] == [0.5]


def test_on_stage_hands_over_each_kept_stage_and_the_last_is_the_exported_model(tmp_path, tiny_world):
    """`run(on_stage=...)` (how benchmarks/unlearning.py scores the schedule cut after each stage): called once per
    stage in order, with the model in eval mode; what it sees after the last stage is the model that is exported,
    and generating with it there (as the benchmark's scoring does) does not change it."""
    from atu.evaluation.probes import answer_probes
    from atu.loading import load_lm

    cfg = tiny_run_config(tmp_path / "run")
    cfg.data.forget = tiny_world.concepts().names()[:1]
    probes = tiny_world.probes()[:4]
    _, tokenizer = load_lm(tiny_world.model_dir)
    seen = []

    def on_stage(record, *, model, predictor, concept_vectors, hook_layer):
        assert not model.training
        answer_probes(model, tokenizer, probes)
        seen.append((record["tau"], {n: p.detach().clone() for n, p in model.state_dict().items()}, hook_layer))
        assert concept_vectors.shape[0] == 1 and predictor is not None

    summary = run(cfg, progress=False, on_stage=on_stage)
    assert [tau for tau, _, _ in seen] == [s["tau"] for s in summary["stages"]] == [0.6, 0.3]
    exported, _ = load_lm(load_export(summary["export"]).model_dir)
    for n, p in exported.state_dict().items():
        torch.testing.assert_close(p, seen[-1][1][n], msg=n)
    assert any(not torch.equal(seen[0][1][n], seen[-1][1][n]) for n in seen[0][1])


def test_a_run_that_levelled_off_stays_stopped_when_run_again(tmp_path, tiny_world):
    """A finished placed schedule, run again in its directory, resumes with every stage kept and runs no more: the
    stop is decided from the kept stages, not only after a new one."""
    cfg = tiny_run_config(tmp_path, taus=None, steps_per_stage=2, extra_stages=3, progress_patience=1,
                          progress_min=100.0)  # fmt: skip
    cfg.data.forget = tiny_world.concepts().names()[:1]
    first = run(cfg, progress=False, export=False)
    assert "levelled off" in first["stop_reason"], first["stop_reason"]
    again = run(cfg, progress=False, export=False)
    assert again["stages"] == first["stages"] and again["stop_reason"] == first["stop_reason"]
