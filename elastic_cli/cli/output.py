"""One output sink for every command: human tables or one JSON document on stdout.

Results go to stdout; logs, progress and warnings go to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Callable

from rich.console import Console

from elastic_cli.errors import UsageError

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)


def configure_logging(verbose: int, quiet: bool, keep_global: bool = False) -> None:
    """Send log records to stderr: WARNING with ``-q``, INFO by default, DEBUG with ``-v``.

    With ``keep_global``, a command's own ``-q``/``-v`` only tighten or widen what the global
    options (given before the command name) already set.
    """
    if verbose and quiet:
        raise UsageError("--quiet and --verbose were both given", "pass only one of them")
    root = logging.getLogger("elastic_cli")
    if keep_global and not verbose and not quiet:
        return
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s" if verbose else "%(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def emit(data: dict[str, Any], as_json: bool, render: Callable[[Console, dict[str, Any]], None]) -> None:
    """Print a command's result: ``data`` as JSON, or rendered for a person."""
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        sys.stdout.flush()
        return
    render(stdout, data)


def format_bytes(count: float) -> str:
    """Write a byte count in binary units (``58.9 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TiB"
