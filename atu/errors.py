"""Typed exceptions for problems the user can fix. The CLI prints them as one line and exits non-zero."""


class AtuError(Exception):
    """Base class: a problem with the user's input or environment, with a message saying how to fix it."""


class FormatError(AtuError, ValueError):
    """A data file (corpus, probes, concept set, config) is malformed. The message names file, line and field."""


class ConfigError(AtuError, ValueError):
    """A configuration value is out of range or inconsistent."""


class LoadError(AtuError):
    """A model, tokenizer or encoder could not be loaded."""
