"""``elastic inspect``: what is inside an elastic checkpoint, from headers alone."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from elastic_cli.cli.options import Quiet, Verbose, BudgetSpec, Checkpoint, Json, Revision
from elastic_cli.cli.output import configure_logging, emit, format_bytes
from elastic_cli.elastic.modelcard import format_params
from elastic_cli.elastic.report import build_report
from elastic_cli.elastic.source import open_source


def inspect(
    checkpoint: Checkpoint,
    revision: Revision = None,
    budget_spec: BudgetSpec = None,
    json: Json = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Show the architecture, every budget's parameters and sizes, and whether the masks are valid.

    Reads config.json, the shard headers and the masks only; no tensor data.

    Examples:

        elastic inspect ./Nemotron-Elastic-30B

        elastic inspect nvidia/NVIDIA-Nemotron-Labs-3-Elastic-30B-A3B-BF16 --json
    """
    configure_logging(verbose, quiet, keep_global=True)
    source = open_source(checkpoint, revision, budget_spec)
    try:
        report = build_report(source)
    finally:
        source.close()
    emit(report, json, _render)


def _render(console: Console, report: dict[str, Any]) -> None:
    arch = report["architecture"]
    ckpt = report["checkpoint"]
    console.print(f"[bold]{ckpt['name']}[/bold]" + (f" @ {ckpt['revision']}" if ckpt["revision"] else ""))
    console.print(
        f"NemotronH, {arch['layers']} layers ({arch['pattern']}), hidden {arch['hidden_size']}, vocab {arch['vocab_size']}"
    )
    counts = arch["layer_counts"]
    console.print(
        f"  {counts['mamba']} Mamba ({arch['mamba']['heads']} heads x {arch['mamba']['head_dim']}, "
        f"{arch['mamba']['groups']} groups, state {arch['mamba']['state']}), "
        f"{counts['attention']} attention ({arch['attention']['heads']}/{arch['attention']['kv_heads']} heads x "
        f"{arch['attention']['head_dim']}), {counts['mlp']} MLP ({arch['ffn']}), {counts['moe']} MoE "
        f"({arch['moe']['experts']} experts top-{arch['moe']['top_k']} x {arch['moe']['expert_ffn']}, "
        f"shared {arch['moe']['shared_expert_ffn']})"
    )
    console.print(f"  {ckpt['tensors']} tensors in {ckpt['shards']} shard(s), {format_bytes(ckpt['bytes'])}")

    table = Table(title=f"Budgets (from {report['budgets_from']})")
    for column in ("budget", "params", "active", "layers", "hidden", "BF16", "FP8", "NVFP4"):
        table.add_column(column, justify="left" if column == "budget" else "right")
    for budget in report["budgets"]:
        table.add_row(
            budget["name"] + (" (partial)" if budget["partial"] else ""),
            format_params(budget["params"]),
            format_params(budget["active_params"]),
            str(budget["layers"]),
            str(budget["hidden_size"]),
            *(format_bytes(budget["bytes"][name]) for name in ("bf16", "fp8", "nvfp4")),
        )
    console.print(table)
    console.print("FP8: routed experts in FP8. NVFP4: routed experts in NVFP4, Mamba projections in FP8.", style="dim")
    if report["valid"]:
        console.print("[green]valid[/green]: budgets are nested and sliceable")
        return
    console.print(f"[red]invalid[/red]: {len(report['problems'])} problem(s)")
    for problem in report["problems"]:
        where = f"budget '{problem['budget']}'"
        if problem["layer"] is not None:
            where += f", layer {problem['layer']}"
        if problem["axis"] is not None:
            where += f", axis '{problem['axis']}'"
        console.print(f"  {where}: {problem['message']}")
