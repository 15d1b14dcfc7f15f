import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import atu
from atu.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    text = README.read_text()
    found = re.search(r"<!-- api-example -->\n```python\n(.*?)```\n<!-- /api-example -->", text, re.S)
    assert found, "README.md lost its marked Python API example"
    return found.group(1)


def test_lazy_exports():
    from atu.run_config import EvalConfig, RunConfig
    from serve.scoring import Scorer

    assert atu.RunConfig is RunConfig and atu.EvalConfig is EvalConfig and atu.Scorer is Scorer
    assert callable(atu.unlearn) and callable(atu.load_export)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        atu.nothing  # noqa: B018


@pytest.mark.slow
def test_readme_example_runs_and_its_export_verifies(tmp_path, monkeypatch, tiny_world, capsys):
    assert "Corwyn Langstead" in tiny_world.concepts().names()  # the name the example forgets
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"retain direct / before: \d\.\d{3} \(target >= 0\.9\) (met|missed)", out)
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "runs" / "api_export")])
    assert result.exit_code == 0 and result.output.startswith("ok: "), result.output
    assert (tmp_path / "runs" / "api" / "eval.json").is_file()


@pytest.mark.slow
def test_in_memory_model_and_data(tmp_path, tiny_world, tiny_lm):
    model, tokenizer = tiny_lm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    corpus = [(r.text, r.concept) for r in tiny_world.corpus()]
    heldout = [(r.text, r.concept) for r in tiny_world.optional_texts("heldout.jsonl")]
    first = tiny_world.concepts().names()[0]
    result = atu.unlearn(
        model, tokenizer=tokenizer, forget=[first],
        data=atu.Data(corpus, tiny_world.concepts(), tiny_world.probes()[::4], validation=heldout),
        config={"align": {"epochs": 1, "realign_epochs": 1, "window": 4, "max_length": 64},
                "unlearn": {"taus": [0.6], "steps_per_stage": 2}},
        out=tmp_path / "run",
    )  # fmt: skip
    assert all((v == model.state_dict()[k]).all() for k, v in before.items())  # the caller's model is left alone
    assert result.config.model == str(tmp_path / "run" / "inputs" / "model")
    assert result.concept_index.labels == [first] and result.predictor is not None
    assert result.evaluation["before"] is not None and result.evaluation["after"] is not None
    assert result.summary["forget"] == [first] and result.model.config.hidden_size == model.config.hidden_size
    with pytest.raises(atu.api.ConfigError, match="already exists"):
        result.save_export(tmp_path / "run" / "export")
    with pytest.raises(atu.api.ConfigError, match="needs its tokenizer"):
        atu.unlearn(model, forget=[first], out=tmp_path / "other")
