"""Options of ``elastic quantize --qad``, declared once with their help text, and their conversion.

The quantize command takes these as parameters and calls :func:`build_qad_options`, then
``elastic_cli.qad.run_qad``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from elastic_cli.errors import UsageError
from elastic_cli.qad.options import COMPUTE_DTYPES, DEFAULT_MAX_WINDOWS, SCHEDULES, EvalOptions, QADOptions, check_eval_file

Qad = Annotated[
    bool,
    typer.Option(
        "--qad/--no-qad",
        help="After calibrating, train the quantized student by nested distillation (see docs/qad.md).",
    ),
]
QadState = Annotated[
    Optional[Path],
    typer.Option(
        "--qad-state",
        help="Start QAD from this elastic_quant_state.json, or a quantized folder holding one, instead of calibrating.",
        show_default=False,
    ),
]
QadData = Annotated[
    Optional[Path],
    typer.Option(
        "--qad-data", help="Training text: plain text, or JSONL with 'text' or chat 'messages'.", show_default=False
    ),
]
QadSteps = Annotated[Optional[int], typer.Option("--qad-steps", help="Optimizer steps.", min=1, show_default=False)]
QadTokens = Annotated[
    Optional[str],
    typer.Option(
        "--qad-tokens", help="Training tokens instead of steps, such as 500M or 1B (decimal units).", show_default=False
    ),
]
QadSeqLen = Annotated[int, typer.Option("--qad-seq-len", help="Tokens per training sequence.", min=1)]
QadBatchSize = Annotated[
    int, typer.Option("--qad-batch-size", help="Sequences per optimizer step, over all processes.", min=1)
]
QadMicroBatch = Annotated[
    Optional[int],
    typer.Option(
        "--qad-micro-batch",
        help="Sequences per forward pass in each process (default: its whole share).",
        min=1,
        show_default=False,
    ),
]
QadLr = Annotated[float, typer.Option("--qad-lr", help="Peak AdamW learning rate.")]
QadMinLr = Annotated[float, typer.Option("--qad-min-lr", help="Learning rate at the end of the decay.")]
QadSchedule = Annotated[str, typer.Option("--qad-schedule", help=f"Decay after the warmup: {', '.join(SCHEDULES)}.")]
QadWarmupSteps = Annotated[int, typer.Option("--qad-warmup-steps", help="Steps of linear warmup.", min=0)]
QadWeightDecay = Annotated[float, typer.Option("--qad-weight-decay", help="AdamW weight decay.", min=0.0)]
QadMaxGradNorm = Annotated[
    float,
    typer.Option("--qad-max-grad-norm", help="Largest gradient norm before clipping (0 turns clipping off).", min=0.0),
]
QadBudgetProbabilities = Annotated[
    Optional[str],
    typer.Option(
        "--qad-budget-probs",
        help="Comma-separated sampling probability per budget, largest first (default 0.5,0.3,0.2 for three budgets).",
        show_default=False,
    ),
]
QadSeed = Annotated[int, typer.Option("--qad-seed", help="Seed of the data order and the budget sampling.")]
QadCheckpointDir = Annotated[
    Optional[Path],
    typer.Option(
        "--qad-checkpoint-dir", help="Folder for training checkpoints (default: OUTPUT.qad).", show_default=False
    ),
]
QadCheckpointEvery = Annotated[
    int,
    typer.Option("--qad-checkpoint-every", help="Steps between checkpoints (0 writes only the last step's).", min=0),
]
QadKeepCheckpoints = Annotated[
    int, typer.Option("--qad-keep-checkpoints", help="Most recent checkpoints to keep.", min=1)
]
QadResume = Annotated[
    bool, typer.Option("--qad-resume", help="Continue from the latest checkpoint in the checkpoint folder.")
]
QadStopAtStep = Annotated[
    Optional[int],
    typer.Option(
        "--qad-stop-at-step",
        help="Stop after this step with a checkpoint and no export, to resume later.",
        min=1,
        show_default=False,
    ),
]
QadLogEvery = Annotated[int, typer.Option("--qad-log-every", help="Log the loss per budget every N steps.", min=1)]
QadDtype = Annotated[str, typer.Option("--qad-dtype", help=f"Forward-pass dtype: {', '.join(COMPUTE_DTYPES)}.")]
QadActivationCheckpointing = Annotated[
    bool,
    typer.Option(
        "--qad-activation-checkpointing", help="Recompute layer activations in the backward pass to save memory."
    ),
]
QadDevice = Annotated[str, typer.Option("--qad-device", help="auto (CUDA when available), cuda or cpu.")]
EvalData = Annotated[
    Optional[Path],
    typer.Option(
        "--eval-data",
        help="Held-out text for the perplexity table of a QAD run: plain text, or JSONL with 'text' or chat "
        "'messages'. Without it nothing is evaluated.",
        show_default=False,
    ),
]
EvalSeqLen = Annotated[
    Optional[int],
    typer.Option(
        "--eval-seq-len", help="Tokens per evaluation window (default: --qad-seq-len).", min=2, show_default=False
    ),
]
EvalWindows = Annotated[
    int, typer.Option("--eval-windows", help="Maximum number of evaluation windows, from the start of the text.", min=1)
]
EvalBatchSize = Annotated[
    Optional[int],
    typer.Option(
        "--eval-batch-size",
        help="Evaluation windows per forward pass in each process (default: the training micro-batch).",
        min=1,
        show_default=False,
    ),
]

_COUNT = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([KMBGT]?)\s*", re.IGNORECASE)
_COUNT_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_count(text: str, option: str) -> int:
    """Parse a count such as ``5000``, ``500M`` or ``1B`` (decimal units; B and G are 10**9).

    Raises:
        UsageError: Naming the option when the text is not a positive count.
    """
    match = _COUNT.fullmatch(text)
    value = float(match.group(1)) * _COUNT_UNITS[match.group(2).upper()] if match else 0.0
    if value < 1:
        raise UsageError(f"{option} {text!r} is not a positive count", "write it like 5000, 500M or 1B")
    return int(value)


def parse_probabilities(text: str, option: str) -> tuple[float, ...]:
    """Parse comma-separated probabilities such as ``0.5,0.3,0.2``.

    Raises:
        UsageError: Naming the option when an entry is not a number.
    """
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError as error:
        raise UsageError(
            f"{option} {text!r} is not a comma-separated list of numbers", "write it like 0.5,0.3,0.2"
        ) from error
    if not all(math.isfinite(value) for value in values):
        raise UsageError(f"{option} {text!r} contains a value that is not finite", "write it like 0.5,0.3,0.2")
    return values


def build_qad_options(
    *,
    data: Path | None,
    steps: int | None,
    tokens: str | None,
    seq_len: int,
    batch_size: int,
    micro_batch: int | None,
    lr: float,
    min_lr: float,
    schedule: str,
    warmup_steps: int,
    weight_decay: float,
    max_grad_norm: float,
    budget_probabilities: str | None,
    seed: int,
    checkpoint_dir: Path | None,
    checkpoint_every: int,
    keep_checkpoints: int,
    resume: bool,
    stop_at_step: int | None,
    log_every: int,
    dtype: str,
    activation_checkpointing: bool,
    device: str,
) -> QADOptions:
    """Convert the ``--qad-*`` values into :class:`~elastic_cli.qad.train.QADOptions`.

    Raises:
        UsageError: For a count or probability list that does not parse. ``run_qad`` checks the
            rest (one of steps and tokens, batch splits, learning rates, schedule, dtype).
    """
    probabilities = parse_probabilities(budget_probabilities, "--qad-budget-probs") if budget_probabilities else None
    return QADOptions(
        steps=steps,
        tokens=parse_count(tokens, "--qad-tokens") if tokens is not None else None,
        seq_len=seq_len,
        batch_size=batch_size,
        micro_batch=micro_batch,
        lr=lr,
        min_lr=min_lr,
        schedule=schedule,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        budget_probabilities=probabilities,
        seed=seed,
        data=data,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        resume=resume,
        stop_at_step=stop_at_step,
        log_every=log_every,
        compute_dtype=dtype,
        activation_checkpointing=activation_checkpointing,
        device=device,
    )


def build_eval_options(
    *, qad: bool, data: Path | None, seq_len: int | None, max_windows: int, batch_size: int | None
) -> EvalOptions | None:
    """Convert the ``--eval-*`` values into :class:`~elastic_cli.qad.options.EvalOptions`.

    Returns:
        ``None`` without ``--eval-data``, so the run evaluates nothing.

    Raises:
        UsageError: For ``--eval-data`` without ``--qad``, or another ``--eval-*`` option
            without ``--eval-data``.
    """
    if data is None:
        explicit = {"--eval-seq-len": seq_len is not None, "--eval-windows": max_windows != DEFAULT_MAX_WINDOWS,
                    "--eval-batch-size": batch_size is not None}
        for name, is_set in explicit.items():
            if is_set:
                raise UsageError(f"{name} is only valid with --eval-data", f"add --qad --eval-data FILE, or remove {name}")
        return None
    if not qad:
        raise UsageError("--eval-data is only valid with --qad", "add --qad, or remove --eval-data")
    check_eval_file(data)  # also in a dry run, which reads nothing else of it
    return EvalOptions(data=data, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size)
