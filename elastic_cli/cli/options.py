"""Options shared by several commands, declared once with their help text."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Optional

import typer

from elastic_cli.errors import UsageError

Checkpoint = Annotated[
    str,
    typer.Argument(help="Checkpoint: a local folder, or a Hugging Face repo id such as org/name.", show_default=False),
]
Revision = Annotated[
    Optional[str],
    typer.Option("--revision", help="Branch, tag or commit of a hub repo id.", show_default=False),
]
BudgetSpec = Annotated[
    Optional[Path],
    typer.Option(
        "--budget-spec",
        help="JSON file of keep counts per axis, for checkpoints without stored masks (see docs/elastic-format.md).",
        show_default=False,
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the plan from headers alone; write nothing.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the output folder if it exists.")]
Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, metavar="", show_default=False, help="Log per-tensor detail to stderr.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Log only warnings and errors.")]
MaxShardSize = Annotated[
    str,
    typer.Option(
        "--max-shard-size",
        help="Maximum shard file size in bytes, or with a unit from KB to PB or KiB to PiB, such as 5GB or 2GiB.",
    ),
]

# Decimal units (KB to PB) are powers of 1000 and binary units (KiB to PiB) powers of 1024.
# Keys are upper case because units match case-insensitively.
SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "PB": 1000**5,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
    "PIB": 1024**5,
}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*")


def parse_size(text: str, option: str) -> int:
    """Parse a size such as ``5GB``, ``500MB``, ``2GiB`` or ``1PB`` into bytes.

    A fractional size is rounded down to whole bytes, computed exactly (``1.5PiB`` is
    1688849860263936).

    Raises:
        UsageError: Naming the option when the text is not a size of at least one byte.
    """
    match = _SIZE.fullmatch(text)
    unit = match.group(2).upper() if match else None
    size = int(Fraction(match.group(1)) * SIZE_UNITS[unit]) if match and unit in SIZE_UNITS else 0
    if size < 1:
        raise UsageError(f"{option} {text!r} is not a size", "write it like 5GB, 500MB, 2GiB or 1PB")
    return size
