from __future__ import annotations

import copy
import errno
import json
import shutil

import numpy as np
import pytest
import torch

from atu.errors import ConfigError
from atu.export import (
    ExportError,
    GuardConfig,
    GuardFiles,
    check_encoder_dim,
    load_export,
    plain_model,
    write_export,
)
from atu.index import ConceptIndex
from atu.predictor import EmbeddingPredictor, PredictorConfig

pytestmark = pytest.mark.usefixtures("one_thread")

EMBED_DIM = 384


@pytest.fixture(scope="module")
def lm(tiny_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_world.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_world.model_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def parts(lm, tiny_world):
    model, _ = lm
    torch.manual_seed(0)
    predictor = EmbeddingPredictor(
        PredictorConfig(input_dim=model.config.hidden_size, output_dim=EMBED_DIM, d_model=32, n_layers=1, n_heads=2)
    ).eval()
    concepts = tiny_world.concepts().concepts
    vectors = np.random.default_rng(0).normal(size=(len(concepts), EMBED_DIM)).astype(np.float32)
    thresholds = [c.threshold if c.threshold is not None else 0.5 for c in concepts]
    index = ConceptIndex.build(vectors, [c.name for c in concepts], thresholds)
    guard = GuardConfig(
        hook_layer=1,
        window=8,
        encoder="packaged:all-MiniLM-L6-v2",
        hidden_size=model.config.hidden_size,
        embedding_dim=EMBED_DIM,
        num_layers=model.config.num_hidden_layers,
    )
    return predictor, index, guard


def _write(out_dir, lm, parts, **overrides):
    model, tokenizer = lm
    predictor, index, guard = parts
    pieces = {"predictor": predictor, "config": guard, "index": index}
    pieces.update({k: overrides.pop(k) for k in ("predictor", "config", "index") if k in overrides})
    kwargs = dict(
        model=model,
        tokenizer=tokenizer,
        guard=GuardFiles(**pieces),
        training_config={"lr": 0.3, "optimizer": "sgd", "taus": [0.9, 0.7, 0.5]},
        eval_summary={"forget_exact_match": 0.125},
    )
    kwargs.update(overrides)
    return write_export(out_dir, **kwargs)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, lm, parts):
    return _write(tmp_path_factory.mktemp("export") / "EXPORT", lm, parts)


@pytest.fixture
def export_copy(exported, tmp_path):
    return shutil.copytree(exported, tmp_path / "EXPORT")


def _logits(model, tokenizer, text="The quick brown fox was born in"):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_layout_and_manifest(exported):
    names = sorted(p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file())
    guard_files = ["concepts.faiss", "concepts.json", "guard.json", "predictor.json", "predictor.safetensors"]
    assert [n for n in names if n.startswith("guard/")] == [f"guard/{n}" for n in guard_files]
    assert {"model/config.json", "model/model.safetensors", "model/generation_config.json"} <= set(names)
    assert any(n.startswith("model/tokenizer") for n in names)
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]

    text = (exported / "manifest.json").read_text()
    manifest = json.loads(text)
    assert json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n" == text  # sorted keys
    assert manifest["format_version"] == 1 and manifest["created"].endswith("Z")
    assert set(manifest["versions"]) == {"atu", "faiss", "torch", "transformers"}
    assert manifest["training_config"]["optimizer"] == "sgd"
    assert manifest["eval_summary"] == {"forget_exact_match": 0.125}
    assert manifest["guard"]["hook_layer"] == 1 and manifest["guard"]["embedding_dim"] == EMBED_DIM
    assert sorted(manifest["files"]) == [n for n in names if n != "manifest.json"]
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left
    plain_dir = exported.parent / "plain"
    plain_dir.mkdir()
    assert exported.stat().st_mode == plain_dir.stat().st_mode  # as readable as any directory the user makes
    plain_dir.rmdir()


def test_round_trip(exported, lm, parts):
    from transformers import AutoModelForCausalLM

    model, tokenizer = lm
    predictor, index, guard = parts
    loaded = load_export(exported)

    assert loaded.guard == guard and loaded.model_dir == exported / "model"
    assert not loaded.predictor.training
    hidden = torch.randn(2, 7, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predictor(hidden), predictor(hidden), rtol=0, atol=0)
    queries = np.random.default_rng(1).normal(size=(5, EMBED_DIM)).astype(np.float32)
    for a, b in zip(loaded.index.concept_scores(queries), index.concept_scores(queries)):
        np.testing.assert_array_equal(a, b)
    assert loaded.index.labels == index.labels

    reloaded = AutoModelForCausalLM.from_pretrained(loaded.model_dir).eval()
    torch.testing.assert_close(_logits(reloaded, tokenizer), _logits(model, tokenizer), rtol=0, atol=0)


def test_load_without_verify(exported):
    assert load_export(exported, verify=False).guard.hook_layer == 1


def _flip_byte(path, offset=-10):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_weights_are_refused(export_copy):
    _flip_byte(export_copy / "guard" / "predictor.safetensors")
    with pytest.raises(ExportError, match=r"^guard/predictor\.safetensors: sha256 mismatch \(file changed after"):
        load_export(export_copy)


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, sort_keys=True, indent=2) + "\n")


def test_edited_guard_config_is_refused(export_copy):
    _edit_json(export_copy / "guard" / "guard.json", hook_layer=2)
    with pytest.raises(ExportError, match=r"^guard/guard\.json: sha256 mismatch"):
        load_export(export_copy)
    # Without hashing, the edit still disagrees with the manifest's copy of the guard config.
    with pytest.raises(ExportError, match=r"manifest\.json: its 'guard' section differs from guard/guard\.json"):
        load_export(export_copy, verify=False)


def test_out_of_range_hook_layer_is_refused_without_verify(export_copy):
    _edit_json(export_copy / "guard" / "guard.json", hook_layer=99)
    with pytest.raises(
        ExportError, match=r"guard/guard\.json: GuardConfig\.hook_layer \(99\) must be in 1\.\.num_layers"
    ):
        load_export(export_copy, verify=False)


def test_dimension_mismatch_is_refused_without_verify(export_copy, lm):
    hidden = lm[0].config.hidden_size
    _edit_json(export_copy / "guard" / "guard.json", hidden_size=hidden + 1)
    manifest = json.loads((export_copy / "manifest.json").read_text())
    manifest["guard"]["hidden_size"] = hidden + 1
    (export_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ExportError, match=rf"model/config\.json: hidden_size is {hidden}, but .* expects {hidden + 1}"
    ):
        load_export(export_copy, verify=False)


def test_extra_and_missing_files_are_refused(export_copy):
    (export_copy / "model" / "extra.txt").write_text("hello")
    with pytest.raises(ExportError, match=r"^model/extra\.txt: not listed in manifest\.json"):
        load_export(export_copy)
    (export_copy / "model" / "extra.txt").unlink()
    (export_copy / "guard" / "concepts.json").unlink()
    with pytest.raises(ExportError, match=r"^guard/concepts\.json: listed in manifest\.json but missing"):
        load_export(export_copy)


def test_symlinks_and_pickle_files_are_refused(export_copy, tmp_path):
    import json

    target = export_copy / "guard" / "concepts.json"
    outside = tmp_path / "concepts.json"
    outside.write_bytes(target.read_bytes())  # the same bytes, so the hash matches: only the link is wrong
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(ExportError, match=r"^guard/concepts\.json: a symbolic link inside the export"):
        load_export(export_copy)
    target.unlink()
    target.write_bytes(outside.read_bytes())
    manifest = json.loads((export_copy / "manifest.json").read_text())
    manifest["files"]["model/pytorch_model.bin"] = "0" * 64
    (export_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"model/pytorch_model\.bin is a pickle-based file"):
        load_export(export_copy)


def test_not_an_export(tmp_path):
    with pytest.raises(ExportError, match=r"no manifest\.json"):
        load_export(tmp_path)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("predictor_in", r"predictor input_dim \(12\) does not match guard\.hidden_size \(\d+\)"),
        ("index_dim", r"guard\.embedding_dim \(384\) does not match concept index dim \(16\)"),
        ("predictor_out", r"predictor output_dim \(128\) does not match guard\.embedding_dim \(384\)"),
        ("guard_layers", r"guard\.num_layers \(5\) does not match model num_hidden_layers \(\d+\)"),
    ],
)
def test_mismatched_dimensions_refused_at_write(tmp_path, lm, parts, change, match):
    model = lm[0]
    predictor, index, guard = parts
    overrides = {}
    if change == "predictor_in":
        overrides["predictor"] = EmbeddingPredictor(PredictorConfig(input_dim=12, output_dim=EMBED_DIM, d_model=8))
    elif change == "predictor_out":
        overrides["predictor"] = EmbeddingPredictor(
            PredictorConfig(input_dim=model.config.hidden_size, output_dim=128, d_model=8)
        )
    elif change == "index_dim":
        overrides["index"] = ConceptIndex.build(np.eye(len(index), 16), index.labels, index.thresholds)
    else:
        overrides["config"] = GuardConfig(**{**guard.to_dict(), "num_layers": 5})
    with pytest.raises(ConfigError, match=match):
        _write(tmp_path / "out", lm, parts, **overrides)
    assert list(tmp_path.iterdir()) == []


def test_unserialisable_training_config_is_refused(tmp_path, lm, parts):
    with pytest.raises(ConfigError, match=r"training_config must be JSON-serialisable"):
        _write(tmp_path / "out", lm, parts, training_config={"lr": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_needs_overwrite(tmp_path, exported, lm, parts):
    out = shutil.copytree(exported, tmp_path / "EXPORT")
    with pytest.raises(ExportError, match=r"EXPORT: already exists; pass overwrite=True"):
        _write(out, lm, parts)

    _write(out, lm, parts, training_config={"run": 2}, overwrite=True)
    assert load_export(out).manifest["training_config"] == {"run": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["EXPORT"]  # the replaced export is gone

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(ExportError, match=r"notes: exists and is not an atu export"):
        _write(other, lm, parts, overwrite=True)
    assert (other / "todo.txt").read_text() == "keep me"


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["predictor", "model"])
def test_full_disk_leaves_nothing(tmp_path, lm, parts, monkeypatch, where):
    if where == "predictor":
        import atu.predictor

        monkeypatch.setattr(atu.predictor, "save_file", _full_disk)
    else:
        monkeypatch.setattr(lm[0], "save_pretrained", _full_disk)  # instance attribute, undone after the test
    with pytest.raises(ExportError, match=r"out: export failed, nothing was written: No space left on device$"):
        _write(tmp_path / "out", lm, parts)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_keeps_the_previous_export(tmp_path, exported, lm, parts, monkeypatch):
    import atu.predictor

    out = shutil.copytree(exported, tmp_path / "EXPORT")
    monkeypatch.setattr(atu.predictor, "save_file", _full_disk)
    with pytest.raises(ExportError, match=r"No space left on device"):
        _write(out, lm, parts, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["EXPORT"]
    assert load_export(out).manifest == load_export(exported).manifest


def test_real_write_error_from_rust_writers(tmp_path, lm, parts):
    """A file-size limit makes the real writers fail the way a full disk does (safetensors raises SafetensorError)."""
    resource = pytest.importorskip("resource")
    import signal

    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, old_limit[1]))
    try:
        with pytest.raises(ExportError, match=r"out: export failed, nothing was written: .*too large"):
            _write(tmp_path / "out", lm, parts)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert list(tmp_path.iterdir()) == []


def test_peft_model_is_exported_merged(tmp_path, lm, parts):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base, tokenizer = lm
    torch.manual_seed(1)
    # init_lora_weights=False: random A and B, so the adapter changes the outputs and a missed merge would show.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = get_peft_model(copy.deepcopy(base), config).eval()
    expected = _logits(wrapped, tokenizer)
    assert not torch.allclose(expected, _logits(base, tokenizer))

    out = _write(tmp_path / "out", (wrapped, tokenizer), parts)

    assert isinstance(wrapped, PeftModel)  # the caller's model keeps its adapter
    assert any("lora_" in name for name, _ in wrapped.named_parameters())
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert not any("lora_" in name for name in reloaded.state_dict())
    assert not (out / "model" / "adapter_config.json").exists()
    torch.testing.assert_close(_logits(reloaded, tokenizer), expected, rtol=1e-5, atol=1e-5)
    load_export(out)


def test_plain_model_passes_through(lm):
    assert plain_model(lm[0]) is lm[0]


def test_check_encoder_dim(parts):
    guard = parts[2]
    check_encoder_dim(guard, EMBED_DIM)
    with pytest.raises(ExportError, match=r"encoder 'packaged:all-MiniLM-L6-v2' gives 768-dim embeddings, .* 384-dim"):
        check_encoder_dim(guard, 768)


def _guard(**changes):
    base = dict(hook_layer=2, window=8, encoder="enc", hidden_size=64, embedding_dim=384, num_layers=4)
    return GuardConfig(**{**base, **changes})


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"hook_layer": 0}, r"hook_layer must be a positive int, got 0"),
        ({"hook_layer": 5}, r"hook_layer \(5\) must be in 1\.\.num_layers \(4\)"),
        ({"window": True}, r"window must be a positive int, got True"),
        ({"encoder": " "}, r"encoder must be a non-empty"),
        ({"input_normalisation": "rms"}, r"input_normalisation must be one of \('l2',\), got 'rms'"),
        ({"concept_target": "alias"}, r"concept_target must be one of"),
        ({"threshold_fpr_scope": "any"}, r"threshold_fpr_scope must be one of \('union', 'concept'\)"),
    ],
)
def test_guard_config_validation(changes, match):
    with pytest.raises(ConfigError, match=match):
        _guard(**changes)


def test_guard_config_dict_round_trip():
    guard = _guard(concept_target="centroid")
    assert GuardConfig.from_dict(guard.to_dict()) == guard
    old = {k: v for k, v in guard.to_dict().items() if k != "threshold_fpr_scope"}  # an export from before it
    assert GuardConfig.from_dict(old).threshold_fpr_scope == "concept"
    with pytest.raises(ConfigError, match=r"Unknown GuardConfig keys \['layer'\]"):
        GuardConfig.from_dict({**guard.to_dict(), "layer": 3})
    with pytest.raises(ConfigError, match=r"missing required keys \['encoder'\]"):
        GuardConfig.from_dict({k: v for k, v in guard.to_dict().items() if k != "encoder"})
