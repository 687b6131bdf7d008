"""Errors users see. Each names the file, row, key or band at fault and says what to do."""

from __future__ import annotations


class PolyfmError(Exception):
    """Base class for errors raised by polyfm on bad input or configuration."""


class DataError(PolyfmError, ValueError):
    """Bad input data: the message names the file and the row, key or band."""

    def __init__(self, message: str, path: object | None = None, row: int | None = None, key: str | None = None):
        where = []
        if path is not None:
            where.append(str(path))
        if row is not None:
            where.append(f"row {row}")
        if key is not None:
            where.append(f"key {key!r}")
        self.path, self.row, self.key = path, row, key
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")


class CheckpointError(PolyfmError, RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, unsafe or of the wrong architecture."""


class ConfigError(PolyfmError, ValueError):
    """A configuration (YAML, study grid, adaptation) that cannot be run."""


class NonFiniteLossError(PolyfmError, FloatingPointError):
    """The loss became NaN or Inf; the message names the batch that caused it."""
