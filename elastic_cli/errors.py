"""Exception types for expected failures.

The command line prints these as one ``Error:`` line plus a hint and exits non-zero; it shows a
traceback only when ``ELASTIC_DEBUG=1`` is set. Library code raises them instead of using
``assert`` for anything a user can get wrong.
"""

from __future__ import annotations

import errno


class ElasticError(Exception):
    """Base class of every failure caused by input, options or the environment.

    Args:
        message: What failed, naming the value (one line).
        hint: What to do next (one line), or ``None``.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UsageError(ElasticError):
    """Invalid combination of command-line options or arguments."""

    exit_code = 2


class CheckpointError(ElasticError):
    """A checkpoint that cannot be resolved, read or understood."""


class ConfigError(CheckpointError):
    """A ``config.json`` that is missing fields or contradicts itself."""


class MaskError(ElasticError):
    """Elastic budgets or masks that are missing, malformed or inconsistent."""


class OutputError(ElasticError):
    """An output location that cannot be written."""


class UnsupportedError(ElasticError):
    """A valid request that this version of elastic does not handle."""


def is_out_of_memory(error: BaseException) -> bool:
    """Tell whether an exception means that memory ran out or a memory limit was reached.

    Besides ``MemoryError``, that is an ``OSError`` with ``ENOMEM`` (a refused ``mmap``), an
    ``ImportError`` from the dynamic loader failing to map a library, and torch's allocator
    errors, which are ``RuntimeError`` ("can't allocate memory" on CPU, "out of memory" on CUDA).
    """
    if isinstance(error, MemoryError):
        return True
    if isinstance(error, OSError):
        return error.errno == errno.ENOMEM
    text = str(error)
    if isinstance(error, ImportError):
        return "failed to map segment" in text or "Cannot allocate memory" in text
    if isinstance(error, RuntimeError):
        return "can't allocate memory" in text or "out of memory" in text
    return False
