"""align-then-unlearn: make a language model forget chosen concepts, export it for vLLM, guard the endpoint.

The Python API (imported on first use, so that `import atu` stays light)::

    result = atu.unlearn("world:tiny", forget=["..."], out="runs/x")   # or a model object and its tokenizer
    result.summary, result.model, result.predictor, result.concept_index, result.save_export("export")
    atu.load_export("export"); atu.Scorer.from_export("export").score_text("...")
"""

import sys
import types

__version__ = "0.1.0"

# name -> (module, attribute)
_EXPORTS = {
    "unlearn": ("atu.api", "unlearn"),
    "UnlearnResult": ("atu.api", "UnlearnResult"),
    "Data": ("atu.api", "Data"),
    "load_export": ("atu.api", "load_export"),
    "Scorer": ("serve.scoring", "Scorer"),
    "RunConfig": ("atu.run_config", "RunConfig"),
    "DataConfig": ("atu.run_config", "DataConfig"),
    "EvalConfig": ("atu.run_config", "EvalConfig"),
    "AlignConfig": ("atu.align", "AlignConfig"),
    "UnlearnConfig": ("atu.unlearn", "UnlearnConfig"),
}
__all__ = ["__version__", *_EXPORTS]


class _Package(types.ModuleType):
    """The package module. Importing a submodule binds it as an attribute of its package, so `import atu.unlearn`
    (the unlearning stage, which the pipeline imports) would replace the API function `atu.unlearn`; this keeps the
    function. Code reaches the stage module with `from atu.unlearn import ...`, as all of this package does."""

    def __setattr__(self, name: str, value) -> None:
        if name == "unlearn" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'atu' has no attribute {name!r}")
    import importlib

    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value
