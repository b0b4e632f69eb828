"""``elastic quantize``: FP8 or NVFP4 post-training quantization, nested structure intact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from elastic_cli.cli import qad_options as q
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
from elastic_cli.elastic.source import open_source
from elastic_cli.errors import UsageError
from elastic_cli.qad.options import DEFAULT_MAX_WINDOWS, row_label
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
    max_shard_size: MaxShardSize = "5GB",
    overwrite: Overwrite = False,
    dry_run: DryRun = False,
    json: Json = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    qad: q.Qad = False,
    qad_state: q.QadState = None,
    qad_data: q.QadData = None,
    qad_steps: q.QadSteps = None,
    qad_tokens: q.QadTokens = None,
    qad_seq_len: q.QadSeqLen = 4096,
    qad_batch_size: q.QadBatchSize = 16,
    qad_micro_batch: q.QadMicroBatch = None,
    qad_lr: q.QadLr = 1e-5,
    qad_min_lr: q.QadMinLr = 0.0,
    qad_schedule: q.QadSchedule = "cosine",
    qad_warmup_steps: q.QadWarmupSteps = 0,
    qad_weight_decay: q.QadWeightDecay = 0.0,
    qad_max_grad_norm: q.QadMaxGradNorm = 1.0,
    qad_budget_probs: q.QadBudgetProbabilities = None,
    qad_seed: q.QadSeed = 0,
    qad_checkpoint_dir: q.QadCheckpointDir = None,
    qad_checkpoint_every: q.QadCheckpointEvery = 0,
    qad_keep_checkpoints: q.QadKeepCheckpoints = 2,
    qad_resume: q.QadResume = False,
    qad_stop_at_step: q.QadStopAtStep = None,
    qad_log_every: q.QadLogEvery = 10,
    qad_dtype: q.QadDtype = "float32",
    qad_activation_checkpointing: q.QadActivationCheckpointing = False,
    qad_device: q.QadDevice = "auto",
    eval_data: q.EvalData = None,
    eval_seq_len: q.EvalSeqLen = None,
    eval_windows: q.EvalWindows = DEFAULT_MAX_WINDOWS,
    eval_batch_size: q.EvalBatchSize = None,
) -> None:
    """Quantize weights to FP8 or NVFP4 with calibrated activation scales.

    An elastic checkpoint stays elastic: masks are kept and every budget can still be sliced
    from the quantized parent.

    Examples:

        elastic quantize ./Nemotron-Elastic-30B --format nvfp4 --output ./nvfp4

        elastic quantize ./nano-12b --format fp8 --kv-cache fp8 --output ./nano-12b-fp8

        elastic quantize ./Nemotron-Elastic-30B --format nvfp4 --recipe mixed --dry-run

        elastic quantize ./Nemotron-Elastic-30B --format nvfp4 --qad --qad-steps 1000 --output ./qad

        elastic quantize ./Nemotron-Elastic-30B --format nvfp4 --qad --qad-steps 1000 --eval-data heldout.jsonl --output ./qad
    """
    configure_logging(verbose, quiet, keep_global=True)
    # Imported here, not at the top, because it loads torch, which slice and inspect never need.
    from elastic_cli.quantize.pipeline import QuantizeOptions, plan_for, predicted_sizes, quantize_checkpoint, tensor_parallel

    if output is None and not dry_run:
        raise UsageError("no --output given", "pass --output DIR, or --dry-run to see the plan")
    options = QuantizeOptions(
        format=format, recipe=recipe, exclude=tuple(exclude or ()), kv_cache=kv_cache, keep_unaligned=keep_unaligned,
        calib_data=calib_data, calib_samples=calib_samples, calib_seq_len=calib_seq_len,
        max_shard_bytes=parse_size(max_shard_size, "--max-shard-size"),
    )
    evaluation = q.build_eval_options(
        qad=qad, data=eval_data, seq_len=eval_seq_len, max_windows=eval_windows, batch_size=eval_batch_size
    )
    if qad and not dry_run:
        from elastic_cli.qad.train import read_state_argument, run_qad

        qad_options = q.build_qad_options(
            data=qad_data, steps=qad_steps, tokens=qad_tokens, seq_len=qad_seq_len, batch_size=qad_batch_size,
            micro_batch=qad_micro_batch, lr=qad_lr, min_lr=qad_min_lr, schedule=qad_schedule,
            warmup_steps=qad_warmup_steps, weight_decay=qad_weight_decay, max_grad_norm=qad_max_grad_norm,
            budget_probabilities=qad_budget_probs, seed=qad_seed, checkpoint_dir=qad_checkpoint_dir,
            checkpoint_every=qad_checkpoint_every, keep_checkpoints=qad_keep_checkpoints, resume=qad_resume,
            stop_at_step=qad_stop_at_step, log_every=qad_log_every, dtype=qad_dtype,
            activation_checkpointing=qad_activation_checkpointing, device=qad_device,
        )
        state = read_state_argument(qad_state) if qad_state else None
        outcome = run_qad(
            checkpoint, options, output, qad_options, revision=revision, state=state, evaluation=evaluation,
            overwrite=overwrite,
        )
        if outcome.quantized is None:  # another rank under torchrun, or stopped early by --qad-stop-at-step
            return
        losses = {}
        for record in outcome.history:
            losses[record.budget] = record.loss
        result = outcome.quantized
        emit({
            "source": checkpoint, "written": True, "path": str(result.path), "bytes": result.total_bytes,
            "files": list(result.files), "plan": result.plan.to_json(), "predicted_bytes": result.predicted_bytes,
            "qad": {"steps": outcome.steps, "tokens": outcome.tokens, "last_loss_per_budget": losses,
                    "checkpoint": str(outcome.checkpoint) if outcome.checkpoint else None,
                    "evaluation": outcome.evaluation.to_json() if outcome.evaluation else None},
        }, json, _render)
        return
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
    if data.get("qad"):
        _render_qad(console, data["qad"])


def _render_qad(console: Console, qad: dict[str, Any]) -> None:
    losses = ", ".join(f"{budget} {loss:.4g}" for budget, loss in qad["last_loss_per_budget"].items())
    console.print(f"QAD: {qad['steps']} steps, {qad['tokens']:,} tokens; last KL per token: {losses}")
    evaluation = qad["evaluation"]
    if evaluation is None:
        console.print("held-out perplexity: not evaluated (pass --eval-data FILE)")
        return
    console.print(
        f"held-out perplexity on {evaluation['data']['name']}: {evaluation['windows']} windows of "
        f"{evaluation['seq_len']} tokens, {evaluation['dtype']} forward, weights fake-quantized"
    )
    table = Table()
    table.add_column("weights", justify="left")
    for budget in evaluation["budgets"]:
        table.add_column(budget, justify="right")
    for row in evaluation["rows"]:
        values = evaluation["perplexity"][row]
        table.add_row(row_label(row), *(f"{values[budget]:.2f}" for budget in evaluation["budgets"]))
    console.print(table)
