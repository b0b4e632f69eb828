"""Held-out perplexity per budget of a QAD run: the BF16 teacher, the PTQ starting points and the result.

The rows are evaluated with the nested forward (:mod:`elastic_cli.qad.nested`), so each budget's
figure is that of the child ``elastic slice`` would cut, run in the QAD compute dtype:

- ``bf16``: the frozen teacher, without fake quantization.
- ``fp8_ptq``: the teacher with FP8 fake quantization, with the scales ``elastic quantize
  --format fp8`` calibrates for the same recipe and calibration options.
- ``<format>_ptq``: the teacher with the QAD run's plan and starting state, so the student
  before its first step. With ``--format fp8`` this is the ``fp8_ptq`` row.
- ``<format>_qad``: the trained student, whose forward equals the dequantized export.

Only weights are fake-quantized in every row, as in training; activations keep the compute dtype.

Perplexity is ``exp(mean NLL)`` over every predicted token (all but the first of each window) of
every window. Each token's NLL comes from float32 logits, and the sums run in float64 in a fixed
order, so a run with the same options, process count and machine gives the same figures.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from elastic_cli.elastic.source import ElasticSource
from elastic_cli.errors import UsageError
from elastic_cli.qad import distributed
from elastic_cli.qad.distributed import DistContext
from elastic_cli.qad.nested import NestedNemotronH
from elastic_cli.qad.options import EVAL_DATA_FIX, EvalOptions, check_eval_file, row_label
from elastic_cli.quantize.calib_data import pack_windows

log = logging.getLogger(__name__)

_FIX = EVAL_DATA_FIX


def load_eval_windows(source: ElasticSource, options: EvalOptions, seq_len: int) -> torch.Tensor:
    """Read and tokenize the evaluation text with the checkpoint's tokenizer.

    Raises:
        UsageError: If the file is missing, unreadable, empty or invalid, or contains fewer than
            ``seq_len`` tokens.
        CheckpointError: If the checkpoint has no tokenizer.
    """
    from elastic_cli.quantize.calib_data import load_texts, load_tokenizer

    path = Path(options.data)
    check_eval_file(path)
    tokenizer = load_tokenizer(source.checkpoint.root)
    try:
        texts = load_texts(path, tokenizer)
    except UsageError as error:  # its message and hint speak of calibration data
        message = error.message.removeprefix("calibration data ")
        raise UsageError(f"evaluation data {message}", _FIX) from error
    windows, tokens = pack_windows(texts, tokenizer, options.max_windows, seq_len)
    if windows.shape[0] == 0:
        raise UsageError(
            f"evaluation data {path} has {tokens} tokens, fewer than one window of {seq_len}",
            "pass more held-out text with --eval-data, or a smaller --eval-seq-len",
        )
    log.info("evaluation: %d window(s) of %d tokens from %s", windows.shape[0], seq_len, path)
    return windows


def sum_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Return the float64 sum of every predicted token's NLL in nats.

    Args:
        logits: ``[batch, seq, vocab]``; each token's NLL is computed in float32.
        input_ids: ``[batch, seq]``; position ``i + 1`` is the target of position ``i``.
    """
    predicted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    nll = torch.nn.functional.cross_entropy(predicted, targets, reduction="none")
    return nll.double().sum()


@dataclass
class EvalReport:
    """Mean token NLL per row and budget, with what was evaluated.

    Attributes:
        data: The evaluation file's name and ``sha256``.
        windows: Windows evaluated, over all processes.
        seq_len: Tokens per window.
        budgets: Budget names, largest first.
        dtype: The compute dtype of the forward passes.
        rows: Row key (``bf16``, ``fp8_ptq``, ``nvfp4_ptq``, ``nvfp4_qad``) to budget to mean NLL,
            in evaluation order.
        seconds: Wall time of the evaluation: its forward passes and the FP8 calibration.
    """

    data: dict[str, str]
    windows: int
    seq_len: int
    budgets: list[str]
    dtype: str
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def predicted_tokens(self) -> int:
        return self.windows * (self.seq_len - 1)

    def perplexity(self, row: str) -> dict[str, float]:
        return {budget: math.exp(nll) for budget, nll in self.rows[row].items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "windows": self.windows,
            "seq_len": self.seq_len,
            "predicted_tokens": self.predicted_tokens,
            "budgets": self.budgets,
            "dtype": self.dtype,
            "rows": list(self.rows),
            "perplexity": {row: self.perplexity(row) for row in self.rows},
            "mean_nll": {row: dict(values) for row, values in self.rows.items()},
            "seconds": round(self.seconds, 3),
        }


class Evaluator:
    """Evaluates nested models on fixed windows, splitting the windows over processes.

    Process ``r`` of ``n`` takes windows ``r, r + n, ...``. Every process runs the same number of
    forward passes, because FSDP2 gathers each layer's weights collectively. A process that has
    run out of windows repeats window 0 and discards the result.

    NOTE: the tests run the evaluation in one process only.
    """

    def __init__(
        self, windows: torch.Tensor, batch_size: int, context: DistContext, budgets: list[str], data: Path, dtype: str
    ) -> None:
        self.windows = windows
        self.batch_size = batch_size
        self.context = context
        digest = hashlib.sha256(Path(data).read_bytes()).hexdigest()
        self.report = EvalReport({"name": Path(data).name, "sha256": digest}, windows.shape[0], windows.shape[1],
                                 list(budgets), dtype)

    def evaluate(self, row: str, model: NestedNemotronH) -> dict[str, float]:
        """Evaluate every budget of ``model``, store the row and return its perplexity per budget."""
        started = time.monotonic()
        nll = {budget: self._mean_nll(model, index) for index, budget in enumerate(self.report.budgets)}
        elapsed = time.monotonic() - started
        self.report.rows[row] = nll
        self.report.seconds += elapsed
        perplexity = self.report.perplexity(row)
        if self.context.is_main:
            figures = ", ".join(f"{budget} {value:.2f}" for budget, value in perplexity.items())
            log.info("held-out perplexity of %s: %s (%.1f s)", row_label(row), figures, elapsed)
        return perplexity

    def _mean_nll(self, model: NestedNemotronH, budget: int) -> float:
        context = self.context
        own = self.windows[context.rank :: context.world_size]
        per_process = math.ceil(self.windows.shape[0] / context.world_size)
        passes = math.ceil(per_process / self.batch_size)
        total = torch.zeros((), dtype=torch.float64, device=context.device)
        with torch.no_grad():
            for index in range(passes):
                chunk = own[index * self.batch_size : (index + 1) * self.batch_size]
                real = chunk.shape[0] > 0
                input_ids = (chunk if real else self.windows[:1]).to(context.device)
                logits = model(input_ids, budget)
                if real:
                    total += sum_token_nll(logits, input_ids)
                del logits
        total = distributed.all_reduce_sum(total, context)
        return float(total) / self.report.predicted_tokens
