"""``elastic verify``: re-read an artifact folder and prove it complete and sound."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from elastic_cli.cli.options import Json, Quiet, Verbose
from elastic_cli.cli.output import configure_logging, emit

Folder = Annotated[
    Path,
    typer.Argument(
        metavar="DIR", help="Artifact folder written by elastic slice (one budget) or elastic quantize.", show_default=False
    ),
]
Parent = Annotated[
    Optional[str],
    typer.Option(
        "--parent",
        help="Checkpoint the artifact was made from (folder or repo id). Every tensor and carried-over file is compared with it.",
        show_default=False,
    ),
]
ParentRevision = Annotated[
    Optional[str],
    typer.Option("--revision", help="Branch, tag or commit of the --parent repo id.", show_default=False),
]


def verify(
    folder: Folder,
    parent: Parent = None,
    revision: ParentRevision = None,
    json: Json = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Check an artifact's manifest hashes, shard index, tensor shapes, finite values and quantization.

    With --parent, also compare every tensor with the parent's cut or quantization, and every carried-over file with the parent's.

    Exit codes: 0 sound, 1 problems found (each listed on stdout), 2 usage error.

    Examples:

        elastic verify ./nano-12b

        elastic verify ./nano-12b --parent ./Nemotron-Elastic-30B --json
    """
    configure_logging(verbose, quiet, keep_global=True)
    from elastic_cli.verify import verify_artifact  # imports torch, which slice and inspect never load

    report = verify_artifact(folder, parent, revision)
    emit(report.to_json(), json, _render)
    if not report.ok:
        raise typer.Exit(1)


def _render(console: Console, data: dict[str, Any]) -> None:
    unicode = (console.encoding or "").lower().startswith("utf")
    marks = {True: "✓", False: "✗", None: "-"} if unicode else {True: "ok", False: "FAIL", None: "-"}
    provenance = " ".join(str(value) for value in (data["kind"], data["budget"], data["format"]) if value)
    console.print(f"{data['folder']} ({provenance or 'no usable manifest'})", highlight=False, markup=False)
    for check in data["checks"]:
        console.print(f"{marks[check['passed']]} {check['name']:<13}{check['detail']}", highlight=False, markup=False)
    for problem in data["problems"]:
        console.print(problem, highlight=False, markup=False)
    console.print("sound" if data["ok"] else f"{len(data['problems'])} problem(s) found", highlight=False, markup=False)
