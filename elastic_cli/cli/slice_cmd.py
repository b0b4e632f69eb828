"""``elastic slice``: zero-shot extraction of nested submodels as standalone checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from elastic_cli.cli.options import (
    BudgetSpec,
    Checkpoint,
    DryRun,
    Json,
    MaxShardSize,
    Overwrite,
    Quiet,
    Revision,
    Verbose,
    parse_size,
)
from elastic_cli.cli.output import configure_logging, emit, format_bytes
from elastic_cli.elastic.modelcard import format_params
from elastic_cli.elastic.slicer import output_folders, plan_budgets, slice_checkpoint
from elastic_cli.elastic.source import open_source
from elastic_cli.errors import UsageError

BudgetOption = Annotated[
    list[str],
    typer.Option("--budget", "-b", help="Budget to extract (repeat for several), or 'all'.", show_default=False),
]
OutputOption = Annotated[
    Path,
    typer.Option(
        "--output", "-o", help="Output folder; with several budgets each goes to OUTPUT/<budget>.", show_default=False
    ),
]


def slice_(
    checkpoint: Checkpoint,
    budget: BudgetOption,
    output: OutputOption,
    revision: Revision = None,
    budget_spec: BudgetSpec = None,
    max_shard_size: MaxShardSize = "5GB",
    overwrite: Overwrite = False,
    dry_run: DryRun = False,
    json: Json = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Extract budgets as standalone Hugging Face checkpoints, zero-shot.

    Every source tensor is read once for all budgets; outputs appear atomically.

    Examples:

        elastic slice ./Nemotron-Elastic-30B --budget 12B --output ./nano-12b

        elastic slice ./Nemotron-Elastic-30B --budget all --output ./children
    """
    configure_logging(verbose, quiet, keep_global=True)
    if not budget:
        raise UsageError("no --budget given", "pass --budget NAME (repeatable) or --budget all")
    max_shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    nested = len(budget) > 1 or "all" in budget
    source = open_source(checkpoint, revision, budget_spec)
    try:
        plans = plan_budgets(source, budget)
        folders = output_folders(output, plans, nested)
        if dry_run:
            results = [
                {"budget": p.budget, "path": str(folders[p.budget]), "params": p.params, "active_params": p.active_params,
                 "bytes": p.total_bytes, "tensors": len(p.tensors), "written": False}
                for p in plans
            ]
        else:
            written = slice_checkpoint(
                source, plans, output, nested=nested, overwrite=overwrite, max_shard_bytes=max_shard_bytes
            )
            results = [
                {"budget": r.budget, "path": str(r.path), "params": r.params, "active_params": r.active_params,
                 "bytes": r.total_bytes, "files": list(r.files), "written": True}
                for r in written
            ]
    finally:
        source.close()
    emit({"source": source.origin.name, "revision": source.origin.revision, "dry_run": dry_run, "budgets": results}, json, _render)


def _render(console: Console, data: dict[str, Any]) -> None:
    table = Table(title=("Plan for " if data["dry_run"] else "Sliced ") + data["source"])
    for column in ("budget", "params", "active", "size", "output"):
        table.add_column(column, justify="left" if column in ("budget", "output") else "right")
    for entry in data["budgets"]:
        table.add_row(
            entry["budget"], format_params(entry["params"]), format_params(entry["active_params"]),
            format_bytes(entry["bytes"]), entry["path"],
        )
    console.print(table)
    for entry in data["budgets"]:
        if entry.get("files"):
            console.print(f"{entry['path']}: {', '.join(entry['files'])}", style="dim")
