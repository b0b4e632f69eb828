"""Options shared by several commands, declared once with their help text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

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
Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, help="Log per-tensor detail to stderr.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Log only warnings and errors.")]
