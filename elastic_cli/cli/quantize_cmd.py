"""``elastic quantize``: FP8 or NVFP4 post-training quantization, nested structure intact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from elastic_cli.cli.options import BudgetSpec, Quiet, Verbose, Checkpoint, DryRun, Json, Overwrite, Revision
from elastic_cli.cli.output import configure_logging, emit, format_bytes, parse_size
from elastic_cli.elastic.source import open_source
from elastic_cli.quantize.pipeline import QuantizeOptions, plan_for, predicted_sizes, quantize_checkpoint, tensor_parallel
from elastic_cli.quantize.policy import RECIPES

Format = Annotated[str, typer.Option("--format", "-f", help="Weight format: fp8 or nvfp4.", show_default=False)]
Recipe = Annotated[str, typer.Option("--recipe", help=f"Which modules to quantize: {', '.join(RECIPES)}.")]
Exclude = Annotated[
    Optional[list[str]],
    typer.Option("--exclude", help="Glob of module names to keep in high precision (repeatable).", show_default=False),
]
KvCache = Annotated[Optional[str], typer.Option("--kv-cache", help="Add FP8 KV-cache scales: fp8.", show_default=False)]
KeepUnaligned = Annotated[
    bool, typer.Option("--keep-unaligned", help="Keep NVFP4 modules whose input width is not a multiple of 16 in BF16.")
]
CalibData = Annotated[
    Optional[Path],
    typer.Option("--calib-data", help="Calibration text: plain text, or JSONL with 'text' or chat 'messages'.", show_default=False),
]
CalibSamples = Annotated[int, typer.Option("--calib-samples", help="Calibration sequences.", min=1)]
CalibSeqLen = Annotated[int, typer.Option("--calib-seq-len", help="Tokens per calibration sequence.", min=1)]
Output = Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder.", show_default=False)]


def quantize(
    checkpoint: Checkpoint,
    format: Format,
    output: Output = None,
    recipe: Recipe = "nvidia",
    exclude: Exclude = None,
    kv_cache: KvCache = None,
    keep_unaligned: KeepUnaligned = False,
    calib_data: CalibData = None,
    calib_samples: CalibSamples = 64,
    calib_seq_len: CalibSeqLen = 256,
    revision: Revision = None,
    budget_spec: BudgetSpec = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest shard file, such as 5GB.")] = "5GB",
    overwrite: Overwrite = False,
    dry_run: DryRun = False,
    json: Json = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Quantize weights to FP8 or NVFP4 with calibrated activation scales.

    An elastic checkpoint stays elastic: masks are kept and every budget can still be sliced
    from the quantized parent.

    Examples:

        elastic quantize ./Nemotron-Elastic-30B --format nvfp4 --output ./nvfp4

        elastic quantize ./nano-12b --format fp8 --kv-cache fp8 --output ./nano-12b-fp8

        elastic quantize ./Nemotron-Elastic-30B --format nvfp4 --recipe mixed --dry-run
    """
    configure_logging(verbose, quiet, keep_global=True)
    from elastic_cli.errors import UsageError

    if output is None and not dry_run:
        raise UsageError("no --output given", "pass --output DIR, or --dry-run to see the plan")
    options = QuantizeOptions(
        format=format, recipe=recipe, exclude=tuple(exclude or ()), kv_cache=kv_cache, keep_unaligned=keep_unaligned,
        calib_data=calib_data, calib_samples=calib_samples, calib_seq_len=calib_seq_len,
        max_shard_bytes=parse_size(max_shard_size, "--max-shard-size"),
    )
    source = open_source(checkpoint, revision, budget_spec, require_budgets=False)
    try:
        if dry_run:
            plan = plan_for(source, options)
            data: dict[str, Any] = {
                "plan": plan.to_json(), "predicted_bytes": predicted_sizes(source, plan), "written": False,
                "tensor_parallel": tensor_parallel(source, plan),
            }
        else:
            result = quantize_checkpoint(source, options, output, overwrite=overwrite)
            data = {
                "plan": result.plan.to_json(), "predicted_bytes": result.predicted_bytes, "written": True,
                "path": str(result.path), "bytes": result.total_bytes, "files": list(result.files),
                "calibration": result.state.calibration if result.state else None,
                "unreached_experts": {str(k): v for k, v in (result.state.unreached_experts if result.state else {}).items()},
            }
    finally:
        source.close()
    data["source"] = source.origin.name
    emit(data, json, _render)


def _render(console: Console, data: dict[str, Any]) -> None:
    plan = data["plan"]
    console.print(f"{data['source']}: {plan['quant_algo']} (recipe {plan['recipe']}, KV cache {plan['kv_cache_quant_algo'] or 'not quantized'})")
    table = Table(title="Modules per kind and format")
    for column in ("kind", "format", "modules", "params"):
        table.add_column(column, justify="left" if column in ("kind", "format") else "right")
    for kind, formats in plan["counts"].items():
        for fmt, entry in formats.items():
            table.add_row(kind, fmt, str(entry["modules"]), f"{entry['params']:,}")
    console.print(table)
    sizes = ", ".join(f"{name} {format_bytes(size)}" for name, size in data["predicted_bytes"].items())
    console.print(f"predicted size: {sizes}")
    for name, entry in (data.get("tensor_parallel") or {}).items():
        blocked = "; ".join(f"TP {tp}: {', '.join(names)}" for tp, names in entry["blocked_by"].items())
        console.print(f"{name}: servable at TP {entry['degrees']}" + (f" (blocked {blocked})" if blocked else ""))
    if data["written"]:
        console.print(f"wrote {data['path']} ({format_bytes(data['bytes'])}): {', '.join(data['files'])}")
        if data.get("unreached_experts"):
            console.print(f"experts no calibration token reached: {data['unreached_experts']}", style="yellow")
