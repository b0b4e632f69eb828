"""QAD options, their checks, the budget sampling probabilities and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from elastic_cli.elastic.plan import SlicePlan
from elastic_cli.errors import UsageError

THREE_BUDGET_PROBABILITIES = (0.5, 0.3, 0.2)
SCHEDULES = ("cosine", "linear", "constant")
COMPUTE_DTYPES = ("float32", "bfloat16")  # names of torch dtypes, so the CLI starts without torch
DEFAULT_MAX_WINDOWS = 128


@dataclass(frozen=True)
class QADOptions:
    """Everything that decides a QAD run, beyond the quantization options.

    Attributes:
        steps: Optimizer steps; or give ``tokens``.
        tokens: Training tokens; the run takes ``ceil(tokens / (batch_size * seq_len))`` steps.
        seq_len: Tokens per training sequence.
        batch_size: Sequences per optimizer step, over all processes (the global batch).
        micro_batch: Sequences per forward pass in each process; ``None`` runs each process's
            whole share of the global batch at once.
        lr: Peak learning rate of AdamW.
        min_lr: Learning rate at the end of the decay.
        schedule: ``cosine``, ``linear`` or ``constant`` decay after the warmup.
        warmup_steps: Steps of linear warmup from 0 to ``lr``.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        max_grad_norm: Clip the global gradient norm to this value; 0 disables clipping.
        budget_probabilities: Sampling probability of each budget, largest budget first; they
            are normalised to sum to 1. ``None`` uses 0.5/0.3/0.2 for three budgets and
            otherwise probabilities proportional to each budget's parameter count.
        seed: Seed of the data order and the budget sampling.
        data: Training text (plain text, or JSONL with ``text`` or chat ``messages``); ``None``
            uses the text shipped with elastic.
        checkpoint_dir: Folder for training checkpoints; ``None`` uses ``<output>.qad``.
        checkpoint_every: Write a checkpoint every this many steps; 0 writes only the last one.
        keep_checkpoints: Keep this many most recent checkpoints.
        resume: Continue from the latest checkpoint in ``checkpoint_dir``.
        stop_at_step: Stop after this step, write a checkpoint and return without exporting (for
            jobs with a time limit); ``None`` trains to the end and exports.
        log_every: Log one progress line every this many steps.
        compute_dtype: ``float32`` or ``bfloat16``: the dtype of weights and activations in the
            forward passes. Master weights and optimizer states are always float32.
        activation_checkpointing: Recompute each layer's activations in the backward pass.
        device: ``auto`` (CUDA when available), ``cuda`` or ``cpu``.
    """

    steps: int | None = None
    tokens: int | None = None
    seq_len: int = 4096
    batch_size: int = 16
    micro_batch: int | None = None
    lr: float = 1e-5
    min_lr: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0
    budget_probabilities: tuple[float, ...] | None = None
    seed: int = 0
    data: Path | None = None
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    stop_at_step: int | None = None
    log_every: int = 10
    compute_dtype: str = "float32"
    activation_checkpointing: bool = False
    device: str = "auto"

    def total_steps(self) -> int:
        """Return the number of optimizer steps the options ask for."""
        if self.steps is not None:
            return self.steps
        assert self.tokens is not None  # check_options rejects neither
        return math.ceil(self.tokens / (self.batch_size * self.seq_len))


def check_options(options: QADOptions, world_size: int = 1) -> None:
    """Reject QAD options that cannot run.

    Raises:
        UsageError: Naming the option and its value.
    """
    if (options.steps is None) == (options.tokens is None):
        raise UsageError(
            "QAD needs exactly one of a step count and a token count", "pass --qad-steps N or --qad-tokens N"
        )
    positive = {
        "steps": options.steps,
        "tokens": options.tokens,
        "seq_len": options.seq_len,
        "batch_size": options.batch_size,
        "micro_batch": options.micro_batch,
        "log_every": options.log_every,
        "keep_checkpoints": options.keep_checkpoints,
    }
    for name, value in positive.items():
        if value is not None and value < 1:
            raise UsageError(f"QAD option {name} is {value}", "it must be at least 1")
    if options.batch_size % world_size:
        raise UsageError(
            f"the global batch of {options.batch_size} sequences does not split evenly over {world_size} processes",
            "choose a batch size that is a multiple of the process count",
        )
    local = options.batch_size // world_size
    if options.micro_batch is not None and local % options.micro_batch:
        raise UsageError(
            f"each process's {local} sequences do not split into micro-batches of {options.micro_batch}",
            "choose a micro-batch that divides batch_size / process count",
        )
    if not (options.lr > 0 and math.isfinite(options.lr)) or not (0 <= options.min_lr <= options.lr):
        raise UsageError(
            f"QAD learning rates lr={options.lr}, min_lr={options.min_lr} are invalid", "use 0 <= min_lr <= lr, lr > 0"
        )
    if options.schedule not in SCHEDULES:
        raise UsageError(f"QAD schedule {options.schedule!r} is not known", f"choose one of {', '.join(SCHEDULES)}")
    if options.compute_dtype not in COMPUTE_DTYPES:
        raise UsageError(
            f"QAD compute dtype {options.compute_dtype!r} is not supported",
            f"choose one of {', '.join(COMPUTE_DTYPES)}"
        )
    non_negative = (options.warmup_steps, options.checkpoint_every, options.weight_decay, options.max_grad_norm)
    if min(non_negative) < 0:
        raise UsageError("QAD warmup steps, checkpoint interval, weight decay and gradient clip must not be negative")
    if options.stop_at_step is not None and not 1 <= options.stop_at_step <= options.total_steps():
        raise UsageError(f"QAD stop_at_step {options.stop_at_step} is outside 1..{options.total_steps()}")


def budget_probabilities(plans: list[SlicePlan], requested: tuple[float, ...] | None) -> tuple[float, ...]:
    """Return the sampling probability of each budget, largest first (see :class:`QADOptions`).

    Raises:
        UsageError: If ``requested`` has the wrong length, a negative or non-finite value, or
            sums to zero.
    """
    if requested is not None:
        names = ", ".join(plan.budget for plan in plans)
        if len(requested) != len(plans):
            raise UsageError(
                f"{len(requested)} budget probabilities given for {len(plans)} budget(s) ({names})",
                "give one probability per budget, largest budget first",
            )
        if any(not math.isfinite(p) or p < 0 for p in requested) or sum(requested) <= 0:
            raise UsageError(
                f"budget probabilities {list(requested)} are invalid", "use non-negative numbers with a positive sum"
            )
        weights = list(requested)
    elif len(plans) == len(THREE_BUDGET_PROBABILITIES):
        weights = list(THREE_BUDGET_PROBABILITIES)
    else:
        weights = [float(plan.params) for plan in plans]
    total = sum(weights)
    return tuple(weight / total for weight in weights)


def lr_factor(step: int, options: QADOptions, total_steps: int) -> float:
    """Return the learning-rate multiplier for the optimizer step after ``step`` completed steps."""
    if step < options.warmup_steps:
        return (step + 1) / options.warmup_steps
    floor = options.min_lr / options.lr
    progress = (step - options.warmup_steps) / max(1, total_steps - options.warmup_steps)
    progress = min(progress, 1.0)
    if options.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if options.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return 1.0


@dataclass(frozen=True)
class EvalOptions:
    """Evaluation options of a QAD run: the held-out text and how it is cut and batched.

    Attributes:
        data: Held-out text, in the formats ``--calib-data`` accepts (plain text, or JSONL with
            ``text`` or chat ``messages``), tokenized with the checkpoint's tokenizer.
        seq_len: Tokens per window; ``None`` uses the training sequence length.
        max_windows: Maximum number of windows, taken from the start of the text.
        batch_size: Windows per forward pass in each process; ``None`` uses the training
            micro-batch (each process's share of the global batch when that is unset).
    """

    data: Path
    seq_len: int | None = None
    max_windows: int = DEFAULT_MAX_WINDOWS
    batch_size: int | None = None


def check_eval_options(options: EvalOptions) -> None:
    """Reject evaluation options that cannot run.

    Raises:
        UsageError: Naming the option and its value.
    """
    counts = {"--eval-seq-len": options.seq_len, "--eval-windows": options.max_windows,
              "--eval-batch-size": options.batch_size}
    for name, value in counts.items():
        if value is not None and value < 1:
            raise UsageError(f"{name} is {value}", "it must be at least 1")
    if options.seq_len == 1:
        raise UsageError("--eval-seq-len is 1, so no window has a token to predict", "use at least 2 tokens")


EVAL_DATA_FIX = "pass --eval-data a UTF-8 .txt file (documents separated by blank lines), or .jsonl lines with 'text' or 'messages'"


def check_eval_file(path: Path) -> None:
    """Raise :class:`UsageError` unless the evaluation data is an existing file."""
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "not found"
        raise UsageError(f"evaluation data {path} {problem}", EVAL_DATA_FIX)


def row_label(row: str) -> str:
    """Return a row's display name: ``nvfp4_qad`` becomes ``NVFP4 QAD``."""
    return row.replace("_", " ").upper()
