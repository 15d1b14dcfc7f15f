"""The export: the deployable artifact, the contract between ``atu`` (which writes it) and ``serve`` (which reads it).

Layout::

    EXPORT/
      model/         Hugging Face format, safetensors only, tokenizer, generation config, README.md (model card):
                     `vllm serve EXPORT/model`
      guard/         predictor.safetensors + predictor.json, guard.json, concepts.faiss + concepts.json
      manifest.json  sorted JSON: format_version, versions, created (UTC), guard config, training config,
                     evaluation summary, and "files": {relative path: sha256} for every file in model/ and guard/

Writing is atomic: everything goes into a temporary directory next to the destination, is fsynced, then renamed
into place, so a crash or a full disk never leaves a half export. Loading unpickles nothing (safetensors, JSON and
FAISS files only).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import MISSING, asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import torch
import transformers
from safetensors import SafetensorError

from atu import __version__
from atu.atomic import fsync, install_dir, sibling
from atu.configs import FPR_SCOPES, is_open_fraction
from atu.errors import AtuError, ConfigError, FormatError
from atu.index import ConceptIndex
from atu.model_card import model_card
from atu.predictor import EmbeddingPredictor, load_predictor, save_predictor

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
GUARD_NAME = "guard.json"
INPUT_NORMALISATIONS = ("l2",)
CONCEPT_TARGETS = ("name", "description", "centroid", "contrast")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Rust-backed writers report I/O failures as their own exception types with the OS error in the message:
# safetensors raises SafetensorError("... (os error 28)"), tokenizers a bare Exception("... (os error 28)").
_OS_ERROR_IN_MESSAGE = re.compile(r"\(os error (\d+)\)")


class ExportError(AtuError):
    """An export could not be written, or one on disk is incomplete, altered or inconsistent."""


@dataclass
class GuardConfig:
    """What the guard needs to rebuild the scoring path of an export."""

    hook_layer: int  # decoder layers whose output the predictor reads (Hugging Face hidden_states[hook_layer])
    window: int  # k: encoder tokens in each predicted window
    encoder: str  # text encoder id or path as the user gave it, e.g. "packaged:all-MiniLM-L6-v2"
    hidden_size: int  # width of the model's hidden states = the predictor's input_dim
    embedding_dim: int  # width of the encoder's embeddings = the predictor's output_dim = the index dim
    num_layers: int  # decoder layers in the model; hook_layer is in 1..num_layers
    input_normalisation: str = "l2"  # "l2": per-token L2 normalisation of the hidden states (what vLLM returns)
    concept_target: str = "name"  # what each concept vector embeds: its "name", "description" or "centroid"
    # How the index's thresholds were set: None = the unlearning's final thresholds (tau); a number = calibrated so
    # that at most this share of held-out retain texts scores above them.
    threshold_fpr: float | None = None
    # What threshold_fpr counts (atu.configs.FPR_SCOPES): the texts any concept flags ("union") or each concept's
    # ("concept", how exports without this field were calibrated).
    threshold_fpr_scope: str = "concept"

    def __post_init__(self) -> None:
        for name in ("hook_layer", "window", "hidden_size", "embedding_dim", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"GuardConfig.{name} must be a positive int, got {value!r}.")
        if self.hook_layer > self.num_layers:
            raise ConfigError(
                f"GuardConfig.hook_layer ({self.hook_layer}) must be in 1..num_layers ({self.num_layers})."
            )
        if not isinstance(self.encoder, str) or not self.encoder.strip():
            raise ConfigError(f"GuardConfig.encoder must be a non-empty encoder id or path, got {self.encoder!r}.")
        if self.input_normalisation not in INPUT_NORMALISATIONS:
            raise ConfigError(
                f"GuardConfig.input_normalisation must be one of {INPUT_NORMALISATIONS}, "
                f"got {self.input_normalisation!r}."
            )
        if self.threshold_fpr is not None and not is_open_fraction(self.threshold_fpr):
            raise ConfigError(f"GuardConfig.threshold_fpr must be in (0, 1) or None, got {self.threshold_fpr!r}.")
        if self.threshold_fpr_scope not in FPR_SCOPES:
            raise ConfigError(
                f"GuardConfig.threshold_fpr_scope must be one of {FPR_SCOPES}, got {self.threshold_fpr_scope!r}."
            )
        if self.concept_target not in CONCEPT_TARGETS:
            raise ConfigError(
                f"GuardConfig.concept_target must be one of {CONCEPT_TARGETS}, got {self.concept_target!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuardConfig:
        """Build from a dict such as ``to_dict()`` wrote; unknown or missing required keys are errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"A guard config must be a mapping, got {type(data).__name__}.")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"Unknown GuardConfig keys {unknown}; expected a subset of {sorted(known)}.")
        required = {n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ConfigError(f"GuardConfig is missing required keys {missing}.")
        return cls(**data)


@dataclass
class GuardFiles:
    """What an export's ``guard/`` holds, in memory: the predictor, its config and the concept index."""

    predictor: EmbeddingPredictor
    config: GuardConfig
    index: ConceptIndex


@dataclass
class Export:
    """An export read by ``load_export``."""

    root: Path
    model_dir: Path  # what `vllm serve` and AutoModelForCausalLM.from_pretrained load
    guard: GuardConfig
    predictor: EmbeddingPredictor  # in eval mode, on the CPU
    index: ConceptIndex
    manifest: dict[str, Any]


# ---------------------------------------------------------------------------------------------- writing


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model as a plain transformers model whose ``save_pretrained`` writes full weights.

    A PEFT-wrapped model is merged on a deep copy, so the caller's model keeps its adapters; this holds a second
    copy of the model in memory while the export is written.
    """
    import peft

    if isinstance(model, (peft.PeftModel, peft.tuners.tuners_utils.BaseTuner)):
        return copy.deepcopy(model).merge_and_unload()
    if getattr(model, "_hf_peft_config_loaded", False):
        # save_pretrained on such a model writes only the adapter, which `vllm serve` cannot load as a model.
        raise ConfigError(
            "the model has adapters attached through transformers' add_adapter/load_adapter; export a "
            "peft.PeftModel (it is merged automatically) or merge the adapters into the weights first."
        )
    return model


def _model_dims(config: Any, where: str) -> tuple[int, int]:
    """(hidden_size, num_hidden_layers) of a transformers config object or a config.json dict."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    sub = get("text_config")
    if sub is not None and get("hidden_size") is None:  # multimodal configs keep the LM's numbers in text_config
        return _model_dims(sub, where)
    hidden, layers = get("hidden_size"), get("num_hidden_layers")
    if not isinstance(hidden, int) or not isinstance(layers, int):
        raise ExportError(f"{where}: no integer hidden_size and num_hidden_layers (got {hidden!r}, {layers!r}).")
    return hidden, layers


def _check_consistency(model: Any, predictor: Any, guard: Any, index: Any) -> None:
    if not isinstance(guard, GuardConfig):
        raise ConfigError(f"guard must be a GuardConfig, got {type(guard).__name__}.")
    if not isinstance(predictor, EmbeddingPredictor):
        raise ConfigError(f"predictor must be an EmbeddingPredictor, got {type(predictor).__name__}.")
    if not isinstance(index, ConceptIndex):
        raise ConfigError(f"index must be a ConceptIndex, got {type(index).__name__}.")
    hidden, layers = _model_dims(model.config, "model.config")
    pairs = [
        ("predictor input_dim", predictor.config.input_dim, "guard.hidden_size", guard.hidden_size),
        ("guard.hidden_size", guard.hidden_size, "model hidden_size", hidden),
        ("predictor output_dim", predictor.config.output_dim, "guard.embedding_dim", guard.embedding_dim),
        ("guard.embedding_dim", guard.embedding_dim, "concept index dim", index.dim),
        ("guard.num_layers", guard.num_layers, "model num_hidden_layers", layers),
    ]
    for name_a, a, name_b, b in pairs:
        if a != b:
            raise ConfigError(f"{name_a} ({a}) does not match {name_b} ({b}); they must be equal to export.")
    if guard.hook_layer > layers:
        raise ConfigError(f"guard.hook_layer ({guard.hook_layer}) exceeds the model's num_hidden_layers ({layers}).")


def _json_text(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        # allow_nan=False: NaN and Infinity are not JSON, and strict readers of the manifest would choke on them.
        raise ConfigError(f"{what} must be JSON-serialisable without NaN or inf ({err}); use null instead.") from err


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _payload_files(root: Path) -> list[str]:
    """Relative POSIX paths of every file under root/model and root/guard, sorted (never listing order)."""
    paths = [p for sub in ("model", "guard") for p in (root / sub).rglob("*") if p.is_file() or p.is_symlink()]
    return sorted(p.relative_to(root).as_posix() for p in paths)


def _write_tree(tmp: Path, model, tokenizer, predictor, guard: GuardConfig, index, manifest: dict) -> None:
    model_dir, guard_dir = tmp / "model", tmp / "guard"
    model.save_pretrained(model_dir)  # transformers >= 5 writes safetensors only; checked below for older ones
    tokenizer.save_pretrained(model_dir)
    if not (model_dir / "generation_config.json").is_file():
        transformers.GenerationConfig.from_model_config(model.config).save_pretrained(model_dir)
    card = model_card(
        base_model=str(manifest["training_config"].get("model", "unknown")), encoder=guard.encoder,
        hook_layer=guard.hook_layer, forgotten=index.labels, config=manifest["training_config"],
        evaluation=manifest["eval_summary"], version=__version__,
    )  # fmt: skip
    (model_dir / "README.md").write_text(card, encoding="utf-8")
    pickled = [p.name for p in model_dir.rglob("*") if p.suffix in _PICKLE_SUFFIXES]
    if pickled:
        raise ExportError(
            f"{model_dir}: save_pretrained wrote pickled files {pickled}; exports hold safetensors only."
        )
    save_predictor(predictor, guard_dir)
    (guard_dir / GUARD_NAME).write_text(
        _json_text({"format_version": FORMAT_VERSION, **guard.to_dict()}, GUARD_NAME), encoding="utf-8"
    )
    index.save(guard_dir)
    manifest["files"] = {rel: _sha256(tmp / rel) for rel in _payload_files(tmp)}
    (tmp / MANIFEST_NAME).write_text(_json_text(manifest, MANIFEST_NAME), encoding="utf-8")
    for path in sorted(tmp.rglob("*"), reverse=True):  # files before the directories holding them
        fsync(path)
    fsync(tmp)


def _as_os_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` when it reports a failed write (a full disk, a quota), else None."""
    if isinstance(err, OSError):
        return err
    if isinstance(err, SafetensorError) or type(err) is Exception:
        found = _OS_ERROR_IN_MESSAGE.search(str(err))
        if found:
            return OSError(int(found.group(1)), str(err))
    return None


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not overwrite:
        raise ExportError(f"{out_dir}: already exists; pass overwrite=True (--overwrite) or choose another directory.")
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise ExportError(f"{out_dir}: exists and is not a directory; refusing to replace it with an export.")
    if any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        # overwrite=True on a mistyped path must not delete an unrelated directory.
        raise ExportError(f"{out_dir}: exists and is not an atu export (no {MANIFEST_NAME}); refusing to replace it.")


def _manifest(guard: GuardConfig, training_config: dict[str, Any], eval_summary: dict[str, Any] | None) -> dict:
    """The manifest without its file hashes (`_write_tree` adds them)."""
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": {
            "atu": __version__,
            "faiss": faiss.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "guard": guard.to_dict(),
        "training_config": training_config,
        "eval_summary": eval_summary or {},
    }


def write_export(
    out_dir: str | os.PathLike,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    guard: GuardFiles,
    training_config: dict[str, Any],
    eval_summary: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an export to ``out_dir`` atomically and return its path.

    ``model`` is a transformers causal LM or a peft model wrapping one (merged on a copy). ``training_config`` and
    ``eval_summary`` go into the manifest and must be JSON-serialisable. An existing ``out_dir`` is an error
    unless ``overwrite``; then it must be an export (or empty), and is replaced only once the new one is complete.

    Raises:
        ConfigError: the dimensions of model, predictor, guard config and index disagree (checked before writing).
        ExportError: ``out_dir`` exists, or writing failed (full disk, permissions): no ``out_dir`` is left
            half-written and the temporary directory is removed.
    """
    out_dir = Path(out_dir)
    predictor, index, guard = guard.predictor, guard.index, guard.config
    _check_consistency(model, predictor, guard, index)
    manifest = _manifest(guard, training_config, eval_summary)
    _json_text(training_config, "training_config")
    _json_text(eval_summary or {}, "eval_summary")
    _check_destination(out_dir, overwrite)
    plain = plain_model(model)

    tmp = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        # Same parent, so the final rename stays on one filesystem and is atomic.
        candidate = sibling(out_dir, "tmp")
        candidate.mkdir()  # not tempfile.mkdtemp: its mode 0o700 would make the export unreadable to a server's user
        tmp = candidate  # only now ours to delete
        _write_tree(tmp, plain, tokenizer, predictor, guard, index, manifest)
        install_dir(tmp, out_dir)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        os_err = _as_os_error(err)
        if os_err is None:
            raise
        reason = os_err.strerror or str(os_err)
        where = f" ({os_err.filename})" if os_err.filename else ""
        first_line = f"{reason}{where}".strip().splitlines()[0]
        raise ExportError(f"{out_dir}: export failed, nothing was written: {first_line}") from err
    logger.info("wrote export to %s (%d files)", out_dir, len(manifest["files"]))
    return out_dir


# ---------------------------------------------------------------------------------------------- reading


def _read_json(root: Path, rel: str) -> Any:
    try:
        return json.loads((root / rel).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{rel}: cannot read it as JSON ({err}).") from err


def _verify_files(root: Path, listed: Any) -> None:
    if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
        raise ExportError(f"{MANIFEST_NAME}: 'files' must map relative paths to sha256 hex digests.")
    for rel in listed:
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts or parts[0] not in ("model", "guard"):
            raise ExportError(f"{MANIFEST_NAME}: file entry {rel!r} is not a path inside model/ or guard/.")
        if Path(rel).suffix.lower() in _PICKLE_SUFFIXES:  # loading these runs code; exports hold safetensors only
            raise ExportError(f"{MANIFEST_NAME}: {rel} is a pickle-based file; an export holds safetensors only.")
    for sub in ("model", "guard"):
        if not (root / sub).is_dir():
            raise ExportError(f"{sub}/: missing (expected by {MANIFEST_NAME}); the export is incomplete.")
    for rel in sorted(listed):
        parts = Path(rel).parts
        # a symlink would let a verified name point at a file the hash check never read the same way twice
        if any((root / Path(*parts[: i + 1])).is_symlink() for i in range(len(parts))):
            raise ExportError(f"{rel}: a symbolic link inside the export; copy the file in instead.")
        if not (root / rel).is_file():
            raise ExportError(f"{rel}: listed in {MANIFEST_NAME} but missing.")
    for rel in _payload_files(root):
        if rel not in listed:
            raise ExportError(f"{rel}: not listed in {MANIFEST_NAME} (added after export); remove it or re-export.")
    for rel in sorted(listed):
        found = _sha256(root / rel)
        if found != listed[rel]:
            raise ExportError(
                f"{rel}: sha256 mismatch (file changed after export): "
                f"expected {listed[rel][:12]}..., found {found[:12]}..."
            )


def load_export(path: str | os.PathLike, *, verify: bool = True) -> Export:
    """Read an export written by ``write_export``; the model itself is not loaded (see ``Export.model_dir``).

    With ``verify``, every file listed in the manifest must exist with its sha256, and model/ and guard/ must hold
    no unlisted file (hashing reads every weight once). Dimensions are always checked: model/config.json against
    guard.json, the predictor against guard.json, the concept index against the embedding dimension.

    Raises:
        ExportError: one line naming the file or field, with what was expected and what was found.
    """
    root = Path(path)
    if not (root / MANIFEST_NAME).is_file():
        raise ExportError(f"{root}: no {MANIFEST_NAME}; not an atu export (or an incomplete one).")
    manifest = _read_json(root, MANIFEST_NAME)
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        got = manifest.get("format_version") if isinstance(manifest, dict) else type(manifest).__name__
        raise ExportError(f"{MANIFEST_NAME}: format_version must be {FORMAT_VERSION}, got {got!r}.")
    if verify:
        _verify_files(root, manifest.get("files"))

    raw_guard = _read_json(root, f"guard/{GUARD_NAME}")
    got = raw_guard.pop("format_version", None) if isinstance(raw_guard, dict) else type(raw_guard).__name__
    if got != FORMAT_VERSION:
        raise ExportError(f"guard/{GUARD_NAME}: format_version must be {FORMAT_VERSION}, got {got!r}.")
    try:
        guard = GuardConfig.from_dict(raw_guard)
    except ConfigError as err:
        raise ExportError(f"guard/{GUARD_NAME}: {err}") from err
    if manifest.get("guard") != guard.to_dict():
        raise ExportError(f"{MANIFEST_NAME}: its 'guard' section differs from guard/{GUARD_NAME}.")

    hidden, layers = _model_dims(_read_json(root, "model/config.json"), "model/config.json")
    for field_name, found, expected in (
        ("hidden_size", hidden, guard.hidden_size),
        ("num_hidden_layers", layers, guard.num_layers),
    ):
        if found != expected:
            raise ExportError(
                f"model/config.json: {field_name} is {found}, but guard/{GUARD_NAME} expects {expected}."
            )

    try:
        predictor = load_predictor(root / "guard")
        index = ConceptIndex.load(root / "guard")
    except FormatError as err:
        raise ExportError(str(err)) from err
    for field_name, found, expected in (
        ("input_dim", predictor.config.input_dim, guard.hidden_size),
        ("output_dim", predictor.config.output_dim, guard.embedding_dim),
    ):
        if found != expected:
            raise ExportError(
                f"guard/predictor.json: {field_name} is {found}, but guard/{GUARD_NAME} expects {expected}."
            )
    if index.dim != guard.embedding_dim:
        raise ExportError(
            f"guard/concepts.faiss: dimension {index.dim}, but guard/{GUARD_NAME} expects embedding_dim "
            f"{guard.embedding_dim}."
        )
    return Export(root, root / "model", guard, predictor, index, manifest)


def check_encoder_dim(guard: GuardConfig, encoder_dim: int) -> None:
    """Raise ExportError when the encoder loaded for ``guard`` embeds into another space than the predictor's."""
    if encoder_dim != guard.embedding_dim:
        raise ExportError(
            f"encoder {guard.encoder!r} gives {encoder_dim}-dim embeddings, but the export's predictor predicts "
            f"{guard.embedding_dim}-dim ones; load the encoder the export was aligned with."
        )
