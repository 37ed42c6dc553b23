"""Errors in what a user gave: a config field, a file, an adapter, a saved library.

``lag_jax.run`` prints a ``UserError`` as one line (the field, file or value at fault
and what was expected) and exits non-zero; ``--verbose`` shows the traceback. Every
such error is also a ``ValueError``, so code that catches ``ValueError`` keeps working.
Errors that are not a ``UserError`` are bugs and keep their traceback.
"""

from __future__ import annotations


class UserError(ValueError):
  """Bad input: the message names the field, file, adapter or module at fault."""


class ConfigError(UserError):
  """A config field has a bad or unknown value (the message names the field)."""


class DataFileError(UserError):
  """A data file (prompts, KILT records) is unreadable; names the file and line."""


class IntegrityError(UserError):
  """Saved work is corrupt, incomplete or stale (a digest, fingerprint or shape does
  not match what was recorded); names the file or adapter."""


def some_names(names, most: int = 8) -> str:
  """'a', 'b', 'c' and 5 more: a list of names short enough for one message line."""
  shown = ", ".join(repr(n) for n in list(names)[:most])
  return shown + (f" and {len(names) - most} more" if len(names) > most else "")
