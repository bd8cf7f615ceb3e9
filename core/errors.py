"""Errors shared by every package.

`UserError` is what a user can fix (a bad file, a bad option, a model that does not trace):
tools print its message on one line and exit with status 2. Anything else is our bug and
keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the cause and, where there is one, the fix."""


class PassError(Exception):
    """A pass failed or broke an invariant; the message names the pass and the passes before it."""
