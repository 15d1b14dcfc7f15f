"""How a command line reports a problem the user can fix: one line on stderr and exit status 1, not a traceback.

Shared by the ``atu`` commands and those ``serve`` registers with them (``atu audit``), so that neither package
imports the other's command module for it."""

from __future__ import annotations

import functools
import sys

import click

from atu.errors import AtuError


def friendly(fn):
    """Turn an AtuError raised by ``fn`` into one line on stderr and a non-zero exit, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AtuError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)

    return wrapper
