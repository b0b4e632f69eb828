"""Nested quantization-aware distillation: the training loop, its checkpoints and the export.

One QAD run:

1. Start from the PTQ state: calibrate activation scales as ``elastic quantize`` does, or reuse
   the ``elastic_quant_state.json`` of a quantized elastic checkpoint. The weight amax of every
   quantized module comes from the BF16 parent and stays fixed during training.
2. Each step samples one budget (default probabilities 0.5/0.3/0.2 from the largest of three
   budgets to the smallest). The frozen BF16 teacher and the fake-quantized student run that
   budget's nested submodel on the same tokens. The loss is KL(teacher || student) on the
   logits, at temperature 1, averaged over tokens. There is no cross-entropy term.
3. AdamW updates the student's float32 master weights, with a learning rate that warms up
   linearly and then decays (cosine by default).
4. The trained weights are rounded to the source dtype and exported through the same writer as
   PTQ, with the PTQ state's scales. Input amax values are the calibrated ones. Weight amax
   values are the fixed ones the student trained with, not recomputed from the trained
   weights. So the exported bytes dequantize to exactly the weights of the student's forward
   pass, and every budget stays sliceable with one set of scales.

Determinism: the data order of epoch ``e`` and the budget of step ``s`` are drawn from
generators seeded by ``(seed, e)`` and ``(seed, s)``, so they depend on the step alone. A
checkpoint stores the student, the optimizer and scheduler states, the step, the data position
and the torch RNG states. Resuming from it continues bit for bit as the uninterrupted run
would, with the same options and process count (tested with one process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from elastic_cli.checkpoint.output import check_inputs_kept
from elastic_cli.checkpoint.reader import Checkpoint
from elastic_cli.checkpoint.torch_dtypes import TORCH_DTYPES
from elastic_cli.checkpoint.writer import write_text
from elastic_cli.elastic.plan import build_plan, check_sliceable
from elastic_cli.elastic.source import ElasticSource, open_source
from elastic_cli.errors import CheckpointError, ElasticError, UnsupportedError, UsageError
from elastic_cli.formats.errors import FormatError
from elastic_cli.formats.constants import NVFP4_BLOCK_SIZE
from elastic_cli.qad import distributed
from elastic_cli.qad.data import TokenStream, load_training_tokens, sample_budget
from elastic_cli.qad.distributed import DistContext
from elastic_cli.qad.evaluate import EvalReport, Evaluator, load_eval_windows
from elastic_cli.qad.nested import build_nested, fake_quantized
from elastic_cli.qad.options import EvalOptions, QADOptions, budget_probabilities, check_eval_options, check_options, lr_factor
from elastic_cli.quantize import export
from elastic_cli.quantize.pipeline import (
    QuantizeOptions,
    QuantizeResult,
    QuantizerState,
    share_fused,
    calibrate_state,
    load_state,
    plan_for,
    quantize_checkpoint,
    unaligned_cuts,
)
from elastic_cli.quantize.policy import QuantPlan

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
TRAINER_FILE = "trainer.json"
CHECKPOINT_VERSION = 1
# Options that do not change the trajectory, so a resumed run may change them.
_RESUMABLE_OPTIONS = ("checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume", "stop_at_step", "log_every")


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step: the sampled budget, its mean KL per token and the learning rate."""

    step: int
    budget: str
    loss: float
    lr: float


@dataclass
class QADResult:
    """The outcome of a QAD run.

    Attributes:
        steps: Optimizer steps completed.
        tokens: Training tokens seen (``steps * batch_size * seq_len``).
        history: Every step's record, from step 1 (including steps before a resume).
        checkpoint: The last checkpoint folder written.
        quantized: The export, on rank 0 of a run that reached the end; ``None`` otherwise.
        evaluation: Held-out perplexity per row and budget, when the run was given evaluation
            options and reached the end; ``None`` otherwise.
    """

    steps: int
    tokens: int
    history: list[StepRecord]
    checkpoint: Path | None
    quantized: QuantizeResult | None = None
    evaluation: EvalReport | None = None


def kl_divergence_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Return the sum over tokens of KL(teacher || student), in float32.

    Args:
        student_logits: ``[batch, seq, vocab]``.
        teacher_logits: ``[batch, seq, vocab]``, without gradient.
    """
    student = torch.log_softmax(student_logits.float(), dim=-1)
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
    return torch.nn.functional.kl_div(student, teacher, reduction="sum", log_target=True)


class QADTrainer:
    """The student, the teacher, the optimizer and the step counter of one QAD run.

    Args:
        source: The opened BF16 parent.
        plan: The quantization plan (which modules are quantized, to which format).
        state: The PTQ state; every quantized module needs a positive weight amax
            (see :func:`complete_state`).
        options: QAD options.
        tokens: The training sequences.
        context: The process context; ``None`` runs in this process alone, on ``options.device``.
        checkpoint_dir: Where :meth:`train` writes periodic checkpoints; ``None`` uses
            ``options.checkpoint_dir``, or ``qad-checkpoints`` in the working folder.
    """

    def __init__(
        self,
        source: ElasticSource,
        plan: QuantPlan,
        state: QuantizerState,
        options: QADOptions,
        tokens: TokenStream,
        context: DistContext | None = None,
        checkpoint_dir: Path | None = None,
    ) -> None:
        self.context = context or distributed.init_distributed(options.device)
        self.checkpoint_dir = Path(checkpoint_dir or options.checkpoint_dir or "qad-checkpoints")
        check_options(options, self.context.world_size)
        self.source, self.plan, self.state, self.options, self.tokens = source, plan, state, options, tokens
        self.total_steps = options.total_steps()

        budgets = source.budgets or [_full_budget(source)]
        if source.budgets:
            check_sliceable(source.problems, source.inspect_target)
        tensors = source.checkpoint.tensors
        self.plans = [build_plan(source.arch, source.checkpoint.config, tensors, budget) for budget in budgets]
        self.probabilities = budget_probabilities(self.plans, options.budget_probabilities)

        compute_dtype = getattr(torch, options.compute_dtype)
        quantized = {module: state.modules[module] for module in plan.quantized}
        device = self.context.device
        self.student = build_nested(
            tensors, self.plans, fake_quant=True, quantized=quantized, compute_dtype=compute_dtype, device=device
        )
        self.teacher = build_nested(tensors, self.plans, fake_quant=False, compute_dtype=compute_dtype, device=device)
        for layer in self.student.layers:
            layer.checkpoint_activations = options.activation_checkpointing
        for model in (self.student, self.teacher):
            distributed.shard(model, model.layers, self.context)
            distributed.materialize(model, source.checkpoint.read, self.context)
        self.teacher.eval()

        self.optimizer = torch.optim.AdamW(
            [p for p in self.student.parameters() if p.requires_grad],
            lr=options.lr, betas=options.betas, weight_decay=options.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, options, self.total_steps)
        )
        self.step = 0
        self.history: list[StepRecord] = []

    @property
    def budget_names(self) -> list[str]:
        return [plan.budget for plan in self.plans]

    def train_step(self) -> StepRecord:
        """Run one optimizer step on the next global batch and return its record."""
        options, context = self.options, self.context
        step = self.step + 1
        budget = sample_budget(step, options.seed, self.probabilities)
        local = options.batch_size // context.world_size
        start = self.step * options.batch_size + context.rank * local
        batch = self.tokens.samples(start, local).to(context.device)  # [local, seq_len]
        micro = options.micro_batch or local
        global_tokens = options.batch_size * batch.shape[1]

        kl_total = torch.zeros((), dtype=torch.float64, device=context.device)
        chunks = list(batch.split(micro))
        for index, chunk in enumerate(chunks):
            distributed.set_gradient_sync(self.student, index == len(chunks) - 1, context)
            with torch.no_grad():
                teacher_logits = self.teacher(chunk, budget)
            try:
                student_logits = self.student(chunk, budget)
            except FormatError as error:  # fake quantization found NaN or Inf in a weight
                raise ElasticError(
                    f"QAD diverged before step {step}: {error}", "lower --qad-lr or raise --qad-warmup-steps"
                ) from error
            kl = kl_divergence_sum(student_logits, teacher_logits)
            # FSDP2 averages gradients over processes, so scaling by the process count gives the
            # gradient of the global-batch token mean.
            (kl * (context.world_size / global_tokens)).backward()
            kl_total += kl.detach().double()
            del teacher_logits

        self._fill_missing_gradients()
        if options.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), options.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        loss = float(distributed.all_reduce_sum(kl_total, context)) / global_tokens
        if not math.isfinite(loss):
            raise ElasticError(
                f"QAD diverged at step {step}: the KL loss of budget '{self.plans[budget].budget}' is {loss}",
                "lower --qad-lr or raise --qad-warmup-steps",
            )
        self.step = step
        record = StepRecord(step, self.plans[budget].budget, loss, lr)
        self.history.append(record)
        return record

    def _fill_missing_gradients(self) -> None:
        """Give zero gradients to the parameters the sampled budget did not use.

        A budget's dropped channels already get zero gradients, because they are entries of
        tensors the budget uses. Its dropped experts and layers would get none, and AdamW would
        skip them. With zeros, AdamW treats every component a budget drops alike: its moments
        decay and its momentum keeps moving it.
        """
        for parameter in self.student.parameters():
            if parameter.requires_grad and parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)

    def train(self, until: int) -> list[StepRecord]:
        """Train up to step ``until`` (inclusive) and return the new step records.

        Rank 0 logs one progress line every ``log_every`` steps, and a checkpoint is written every
        ``checkpoint_every`` steps before ``until``.
        """
        options = self.options
        records: list[StepRecord] = []
        interval: list[StepRecord] = []
        started = time.monotonic()
        tokens_per_step = options.batch_size * options.seq_len
        while self.step < until:
            record = self.train_step()
            records.append(record)
            interval.append(record)
            if self.step % options.log_every == 0 or self.step == until:
                elapsed = max(time.monotonic() - started, 1e-9)
                if self.context.is_main:
                    log.info(
                        "QAD step %d/%d: lr %.3g, KL per token %s, %.0f tokens/s",
                        self.step, self.total_steps, record.lr, _by_budget(interval),
                        len(interval) * tokens_per_step / elapsed,
                    )
                interval = []
                started = time.monotonic()
            if options.checkpoint_every and self.step % options.checkpoint_every == 0 and self.step != until:
                self.save_checkpoint(checkpoint_folder(self.checkpoint_dir, self.step))
        return records

    # Checkpoints -----------------------------------------------------------------------

    def options_record(self) -> dict[str, Any]:
        """Describe the QAD options and progress for the artifact's manifest, without absolute paths."""
        record = {}
        for key, value in dataclasses.asdict(self.options).items():
            if key in ("checkpoint_dir", "resume", "stop_at_step", "log_every", "device"):
                continue
            record[key] = value.name if isinstance(value, Path) else _jsonable(value)
        record["steps_done"] = self.step
        return record

    def fingerprint(self) -> dict[str, Any]:
        """Describe what makes a run's trajectory, so that a resume can check it continues the same run."""
        fields = dataclasses.asdict(self.options)
        options = {key: _jsonable(value) for key, value in fields.items() if key not in _RESUMABLE_OPTIONS}
        state = json.dumps(self.state.to_json(), sort_keys=True).encode()
        return {
            "source": self.source.origin.name,
            "revision": self.source.origin.revision,
            "budgets": self.budget_names,
            "quantization": {
                "format": self.plan.format,
                "recipe": self.plan.recipe,
                "modules": sorted(self.plan.quantized),
            },
            "state_sha256": hashlib.sha256(state).hexdigest(),
            "data_sha256": self.tokens.digest(),
            "world_size": self.context.world_size,
            "options": options,
        }

    def save_checkpoint(self, folder: Path) -> Path:
        """Write the student, optimizer, scheduler, step, data position and RNG states to ``folder``.

        The folder appears atomically: the files go into ``folder.tmp`` first, which rank 0
        renames when every process has written its part. Older checkpoints beyond
        ``keep_checkpoints`` are removed.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        context = self.context
        temp = folder.with_name(folder.name + ".tmp")
        if context.is_main:
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir(parents=True)
        distributed.barrier(context)

        model_state, optimizer_state = get_state_dict(self.student, self.optimizer)
        with _single_process_dcp(context):
            state = {"model": model_state, "optimizer": optimizer_state}
            dcp.save(state, checkpoint_id=temp, no_dist=not context.is_distributed)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, temp / f"rng-rank{context.rank}.pt")
        distributed.barrier(context)  # every rank's shard and RNG file is written
        distributed.run_on_main(lambda: self._finish_checkpoint(temp, folder), context, "finishing a checkpoint")
        return folder

    def _finish_checkpoint(self, temp: Path, folder: Path) -> None:
        """Write ``trainer.json``, rename the temporary folder and remove old checkpoints (rank 0)."""
        trainer = {
            "checkpoint_version": CHECKPOINT_VERSION,
            "step": self.step,
            "samples_consumed": self.step * self.options.batch_size,
            "scheduler": self.scheduler.state_dict(),
            "fingerprint": self.fingerprint(),
            "history": [dataclasses.asdict(record) for record in self.history],
        }
        write_text(temp / TRAINER_FILE, json.dumps(trainer, indent=1, sort_keys=True) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        temp.rename(folder)
        for old in list_checkpoints(folder.parent)[: -self.options.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("wrote QAD checkpoint %s (step %d)", folder, self.step)

    def load_checkpoint(self, folder: Path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` with the same options.

        Raises:
            CheckpointError: If the folder is not a QAD checkpoint of this run.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        trainer = _read_trainer(folder)
        saved = trainer["fingerprint"]
        current = json.loads(json.dumps(self.fingerprint()))
        if saved != current:
            differing = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
            if "options" in differing:
                options = saved.get("options", {})
                changed = [key for key in sorted(options) if options.get(key) != current["options"].get(key)]
                differing += [f"options.{key}" for key in changed]
            raise CheckpointError(
                f"QAD checkpoint {folder} belongs to another run: {', '.join(differing)} differ",
                "resume with the options of that run, or remove its checkpoint folder to start over",
            )

        model_state, optimizer_state = get_state_dict(self.student, self.optimizer)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        with _single_process_dcp(self.context):
            dcp.load(loaded, checkpoint_id=folder, no_dist=not self.context.is_distributed)
        set_state_dict(
            self.student, self.optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"]
        )
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.optimizer.zero_grad(set_to_none=True)
        rng = torch.load(folder / f"rng-rank{self.context.rank}.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = int(trainer["step"])
        self.history = [StepRecord(**record) for record in trainer["history"]]
        if self.context.is_main:
            log.info("resumed QAD from %s at step %d", folder, self.step)

    # Export ----------------------------------------------------------------------------

    def student_tensors(self) -> dict[str, torch.Tensor] | None:
        """Gather the student's tensors in their stored dtypes on rank 0's CPU (``None`` elsewhere).

        Every process must call this, because gathering shards is collective.
        """
        infos = self.source.checkpoint.tensors
        gathered: dict[str, torch.Tensor] = {}
        for name, tensor in distributed.full_tensors(self.student, self.context):
            if self.context.is_main:
                gathered[name] = tensor.to(TORCH_DTYPES[infos[name].dtype]).cpu()
        return gathered if self.context.is_main else None

    def export(self, options: QuantizeOptions, output: Path, overwrite: bool = False) -> QuantizeResult | None:
        """Write the trained student as a quantized elastic checkpoint (rank 0; ``None`` elsewhere).

        The student's weights, rounded to their stored dtypes, go through
        :func:`~elastic_cli.quantize.pipeline.quantize_checkpoint` with the PTQ state, so the
        layout, scales, masks, sidecars and manifest are those of ``elastic quantize``.
        """
        tensors = self.student_tensors()

        def write() -> QuantizeResult:
            assert tensors is not None  # rank 0 gathered them
            _warn_saturated(tensors, self.plan, self.state)
            overlay = _OverlayCheckpoint.wrap(self.source.checkpoint, tensors)
            student_source = dataclasses.replace(self.source, checkpoint=overlay)
            qad_options = dataclasses.replace(options, method="quantization-aware distillation", training=self.options_record())
            return quantize_checkpoint(student_source, qad_options, output, overwrite=overwrite, state=self.state)

        return distributed.run_on_main(write, self.context, "exporting")


def _by_budget(records: list[StepRecord]) -> str:
    losses: dict[str, list[float]] = {}
    for record in records:
        losses.setdefault(record.budget, []).append(record.loss)
    means = [f"{budget} {sum(values) / len(values):.4g} ({len(values)} step(s))" for budget, values in losses.items()]
    return ", ".join(means)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _full_budget(source: ElasticSource):
    from elastic_cli.quantize.calibrate import full_budget

    return full_budget(source.arch)


def _warn_saturated(tensors: dict[str, torch.Tensor], plan: QuantPlan, state: QuantizerState) -> None:
    """Log the modules whose trained weights exceed the fixed weight amax (those elements saturate)."""
    grown = []
    for module in plan.quantized:
        amax = export.weight_amax(tensors[f"{module}.weight"])
        if amax > state.modules[module].weight_amax:
            grown.append(module)
    if grown:
        log.warning(
            "%d quantized module(s) grew beyond their PTQ weight amax during QAD, e.g. %s; their largest "
            "elements saturate, in training as in the export",
            len(grown), grown[0],
        )


@dataclass
class _OverlayCheckpoint(Checkpoint):
    """A checkpoint whose tensor reads return given tensors (the trained student) instead of the files."""

    overrides: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def wrap(cls, base: Checkpoint, overrides: dict[str, torch.Tensor]) -> "_OverlayCheckpoint":
        return cls(
            root=base.root, config=base.config, tensors=base.tensors, shard_names=base.shard_names,
            trust_root=base.trust_root, overrides=overrides,
        )

    def read(self, name: str) -> torch.Tensor:
        if name in self.overrides:
            return self.overrides[name].clone()
        return super().read(name)

    def read_bytes(self, name: str) -> memoryview:
        if name in self.overrides:
            tensor = self.overrides[name].contiguous()
            return memoryview(tensor.view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
        return super().read_bytes(name)

    def read_rows(self, name: str, rows: tuple[int, ...]) -> torch.Tensor:
        if name in self.overrides:
            return self.overrides[name][torch.tensor(rows, dtype=torch.long)]
        return super().read_rows(name, rows)


@contextlib.contextmanager
def _single_process_dcp(context: DistContext) -> Iterator[None]:
    """Silence the warning torch.distributed.checkpoint gives for every single-process save and load."""
    with warnings.catch_warnings():
        if not context.is_distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def checkpoint_folder(checkpoint_dir: Path, step: int) -> Path:
    """Return the folder of the checkpoint after ``step``."""
    return checkpoint_dir / f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """List complete checkpoint folders, oldest first (unfinished ``.tmp`` folders are skipped)."""
    if not checkpoint_dir.is_dir():
        return []
    folders = [
        path for path in checkpoint_dir.iterdir()
        if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and path.name[len(CHECKPOINT_PREFIX):].isdigit()
        and (path / TRAINER_FILE).is_file()
    ]
    return sorted(folders, key=lambda path: int(path.name[len(CHECKPOINT_PREFIX):]))


def _read_trainer(folder: Path) -> dict[str, Any]:
    path = folder / TRAINER_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"cannot read QAD checkpoint {folder}: {error}", "remove the damaged checkpoint folder"
        ) from error
    if document.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"QAD checkpoint {folder} has version {document.get('checkpoint_version')!r}",
            f"this elastic reads version {CHECKPOINT_VERSION}"
        )
    return document


# The PTQ starting point --------------------------------------------------------------------


def complete_state(source: ElasticSource, plan: QuantPlan, state: QuantizerState) -> QuantizerState:
    """Return a copy of a quantizer state with every quantized module's weight amax set.

    Fused partners (q/k/v) share one weight amax and one input amax, as export writes them;
    other modules take max |weight| of the BF16 parent. Amax values already set are kept.

    Raises:
        CheckpointError: If the state lacks a quantized module or gives it another format.
    """
    state = QuantizerState(
        dict(state.modules), dict(state.kv_amax), dict(state.unreached_experts), dict(state.calibration)
    )
    for module, decision in plan.quantized.items():
        scales = state.modules.get(module)
        if scales is None:
            raise CheckpointError(
                f"the quantizer state has no scales for module {module}", "calibrate instead of reusing a state"
            )
        if scales.format != decision.format:
            raise CheckpointError(
                f"the quantizer state quantizes {module} to {scales.format}, but this plan uses {decision.format}",
                "pass the same --format and --recipe as the run that wrote the state",
            )
    share_fused(source, plan, state)
    for module in plan.quantized:
        scales = state.modules[module]
        if scales.weight_amax <= 0:
            amax = export.weight_amax(source.checkpoint.read(f"{module}.weight"))
            state.modules[module] = export.ModuleScales(scales.format, amax, scales.input_amax)
    return state


def read_state_argument(path: Path) -> QuantizerState:
    """Read a quantizer state from ``elastic_quant_state.json`` or a quantized folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / export.STATE_FILE
    return load_state(path)


def run_qad(
    source_spec: str,
    options: QuantizeOptions,
    output: Path,
    qad: QADOptions,
    *,
    revision: str | None = None,
    state: QuantizerState | None = None,
    token_ids: torch.Tensor | None = None,
    evaluation: EvalOptions | None = None,
    overwrite: bool = False,
) -> QADResult:
    """Run nested QAD on a BF16 elastic checkpoint and export the quantized result.

    Under ``torchrun`` every process calls this with the same arguments; they share the work
    and rank 0 writes the output.

    Args:
        source_spec: The BF16 parent: a local folder or a Hugging Face repo id.
        options: Quantization options, as for ``elastic quantize`` (format, recipe, calibration).
        output: Destination folder of the quantized checkpoint.
        qad: QAD options.
        revision: Hub revision of ``source_spec``.
        state: The PTQ state to start from, such as :func:`read_state_argument` of a quantized
            elastic checkpoint; ``None`` calibrates as ``elastic quantize`` does.
        token_ids: Training sequences ``[sequences, qad.seq_len]``; ``None`` tokenizes
            ``qad.data`` (or the built-in text) with the checkpoint's tokenizer.
        evaluation: Held-out text and windows to evaluate every budget on, before training
            (BF16, FP8 PTQ and the run's PTQ starting point) and after it; ``None`` evaluates
            nothing. A run stopped by ``qad.stop_at_step`` evaluates nothing, and the run that
            reaches the last step evaluates every row.
        overwrite: Replace an existing output folder.

    Returns:
        The steps done, the loss history, the last checkpoint and, on rank 0 after the last
        step, the export and the evaluation.

    Raises:
        UsageError: For invalid options.
        UnsupportedError: For budgets that cut NVFP4 inputs inside a block of 16.
        CheckpointError: For an unreadable checkpoint, a state that does not fit the plan, or a
            checkpoint folder of another run.
        OutputError: If the output exists and ``overwrite`` is not set.
    """
    context = distributed.init_distributed(qad.device)
    source = open_source(source_spec, revision, require_budgets=False)
    try:
        check_options(qad, context.world_size)
        output = Path(output)
        if output.exists() and not overwrite and qad.stop_at_step is None:
            from elastic_cli.errors import OutputError

            raise OutputError(f"output folder {output} already exists", "pass --overwrite to replace it")
        # The export checks this too, but only after training.
        inputs = [source.checkpoint.root, options.calib_data, qad.data, evaluation.data if evaluation else None]
        check_inputs_kept(output, tuple(Path(path) for path in inputs if path is not None))
        plan = plan_for(source, options)
        _check_nesting(source, plan)
        # Checked before the training text, which can take far longer to tokenize.
        eval_windows, fp8_options, fp8_plan = None, None, None
        if evaluation is not None:
            check_eval_options(evaluation)
            eval_windows = load_eval_windows(source, evaluation, evaluation.seq_len or qad.seq_len)
            _warn_if_training_text(evaluation, qad)
            fp8_options = _fp8_row_options(options)
            fp8_plan = plan_for(source, fp8_options) if fp8_options is not None else None

        if token_ids is not None:
            tokens = TokenStream(token_ids, qad.seed)
        else:
            tokens = load_training_tokens(source, qad)
        if tokens.token_ids.shape[1] != qad.seq_len:
            raise UsageError(
                f"training sequences have {tokens.token_ids.shape[1]} tokens, but seq_len is {qad.seq_len}",
                "pass token ids of shape [sequences, seq_len]",
            )
        state = _starting_state(source, plan, options, state, context)

        checkpoint_dir = qad.checkpoint_dir or output.with_name(output.name + ".qad")
        trainer = QADTrainer(source, plan, state, qad, tokens, context, checkpoint_dir)
        _prepare_checkpoints(trainer, checkpoint_dir, qad)

        total = trainer.total_steps
        until = qad.stop_at_step or total
        if context.is_main:
            probabilities = ", ".join(f"{name} {p:.3g}" for name, p in zip(trainer.budget_names, trainer.probabilities))
            log.info(
                "QAD from step %d to %d: %d sequence(s) x %d tokens per step, budgets %s, lr %g (%s), "
                "%d process(es) on %s",
                trainer.step, until, qad.batch_size, qad.seq_len, probabilities, qad.lr, qad.schedule,
                context.world_size, context.device,
            )
        evaluator = None
        if evaluation is not None and eval_windows is not None and until == total:
            batch = evaluation.batch_size or qad.micro_batch or qad.batch_size // context.world_size
            evaluator = Evaluator(eval_windows, batch, context, trainer.budget_names, evaluation.data, qad.compute_dtype)
            _evaluate_starting_points(evaluator, trainer, source, (fp8_options, fp8_plan), options)
        elif evaluation is not None and context.is_main:
            log.info("QAD stops at step %d of %d; the evaluation runs when a resumed run reaches the end", until, total)
        trainer.train(until)
        last = checkpoint_folder(checkpoint_dir, trainer.step)
        if not (last / TRAINER_FILE).is_file():
            trainer.save_checkpoint(last)
        result = QADResult(trainer.step, trainer.step * qad.batch_size * qad.seq_len, trainer.history, last)
        if trainer.step < total:
            if context.is_main:
                log.info(
                    "QAD stopped at step %d of %d; resume with the same options and --qad-resume", trainer.step, total
                )
            return result
        if evaluator is not None:
            evaluator.evaluate(f"{options.format}_qad", trainer.student)
            result.evaluation = evaluator.report
        result.quantized = trainer.export(options, output, overwrite=overwrite)
        return result
    finally:
        source.close()
        distributed.close(context)


def _fp8_row_options(options: QuantizeOptions) -> QuantizeOptions | None:
    """Return the ``elastic quantize --format fp8`` options for the FP8 PTQ row (``None`` for an FP8 run).

    The recipe, excludes and calibration options are the run's own. FP8 rejects the mixed
    recipe, so that recipe's FP8 row uses the nvidia recipe.
    """
    if options.format == "fp8":
        return None
    recipe = "nvidia" if options.recipe == "mixed" else options.recipe
    return dataclasses.replace(options, format="fp8", recipe=recipe)


def _warn_if_training_text(evaluation: EvalOptions, qad: QADOptions) -> None:
    if qad.data is not None and Path(qad.data).resolve() == Path(evaluation.data).resolve():
        log.warning(
            "the evaluation text %s is also the QAD training text, so its perplexity is not a held-out figure",
            evaluation.data,
        )


def _evaluate_starting_points(
    evaluator: Evaluator,
    trainer: QADTrainer,
    source: ElasticSource,
    fp8: tuple[QuantizeOptions | None, QuantPlan | None],
    options: QuantizeOptions,
) -> None:
    """Evaluate the BF16 teacher, its FP8 PTQ and the run's PTQ starting point, before training.

    The FP8 state is calibrated as ``elastic quantize --format fp8`` calibrates it. Only its
    weight amax values change the figures, because activations are not fake-quantized.
    """
    teacher = trainer.teacher
    evaluator.evaluate("bf16", teacher)
    run_ptq = {module: trainer.state.modules[module] for module in trainer.plan.quantized}
    fp8_options, fp8_plan = fp8
    if fp8_options is None or fp8_plan is None:  # the run itself is FP8
        fp8_ptq = run_ptq
    else:
        started = time.monotonic()
        fp8_state = _starting_state(source, fp8_plan, fp8_options, None, trainer.context, "for the FP8 PTQ evaluation")
        fp8_ptq = {module: fp8_state.modules[module] for module in fp8_plan.quantized}
        evaluator.report.seconds += time.monotonic() - started
    with fake_quantized(teacher, fp8_ptq):
        evaluator.evaluate("fp8_ptq", teacher)
    if options.format != "fp8":
        with fake_quantized(teacher, run_ptq):
            evaluator.evaluate(f"{options.format}_ptq", teacher)


def _check_nesting(source: ElasticSource, plan: QuantPlan) -> None:
    if len(source.budgets) > 1:
        unaligned = unaligned_cuts(source, plan)
        if unaligned:
            raise UnsupportedError(
                f"NVFP4 cannot keep the nesting: {unaligned[0]} keeps input columns that split blocks of "
                f"{NVFP4_BLOCK_SIZE}",
                "use masks that keep whole blocks of 16 channels",
            )


def _starting_state(
    source: ElasticSource,
    plan: QuantPlan,
    options: QuantizeOptions,
    state: QuantizerState | None,
    context: DistContext,
    purpose: str = "before QAD",
) -> QuantizerState:
    """Return the completed PTQ state: given, or calibrated on rank 0 and shared with every process."""
    if state is not None:
        return complete_state(source, plan, state)
    def calibrate() -> dict[str, Any]:
        log.info("calibrating %d module(s) %s", len(plan.quantized), purpose)
        return complete_state(source, plan, calibrate_state(source, plan, options)).to_json()

    document = distributed.broadcast_object(distributed.run_on_main(calibrate, context, "calibrating"), context)
    assert isinstance(document, dict)
    return QuantizerState.from_json(document)


def _prepare_checkpoints(trainer: QADTrainer, checkpoint_dir: Path, options: QADOptions) -> None:
    """Resume from the latest checkpoint, or refuse to mix a new run with an old one's checkpoints."""
    existing = list_checkpoints(checkpoint_dir)
    if options.resume and existing:
        trainer.load_checkpoint(existing[-1])
    elif options.resume:
        if trainer.context.is_main:
            log.info("no QAD checkpoint in %s; starting at step 0", checkpoint_dir)
    elif existing:
        raise UsageError(
            f"{checkpoint_dir} already contains QAD checkpoints (latest {existing[-1].name})",
            "pass --qad-resume to continue that run, or remove the folder to start over",
        )
