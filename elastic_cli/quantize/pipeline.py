"""``elastic quantize``: plan, calibrate, then stream the quantized checkpoint shard by shard.

The quantizer state (weight amax and calibrated input amax per module, KV amax) is written
next to the weights as ``elastic_quant_state.json``; quantization-aware distillation continues
from it, and re-exporting with it reproduces the same bytes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from elastic_cli import __version__
from elastic_cli.checkpoint.manifest import MANIFEST_FILE, file_digest, write_manifest
from elastic_cli.checkpoint.output import REGENERATED, copy_sidecars, list_sidecars
from elastic_cli.checkpoint.resume import Journal, input_fingerprint, resumable_folder, run_key
from elastic_cli.checkpoint.writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter, plan_shards, write_text
from elastic_cli.elastic.masks import MASKS_FILE, budgets_to_document
from elastic_cli.elastic.plan import build_plan, check_sliceable
from elastic_cli.elastic.source import ElasticSource, reject_quantized
from elastic_cli.errors import CheckpointError, ElasticError, UnsupportedError
from elastic_cli.formats.errors import FormatError
from elastic_cli.formats.constants import NVFP4_BLOCK_SIZE
from elastic_cli.quantize import export
from elastic_cli.quantize.policy import QuantPlan, plan_quantization, predict_bytes, servable_tp_degrees

log = logging.getLogger(__name__)


STATE_VERSION = 1


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything that decides what ``elastic quantize`` writes."""

    format: str
    recipe: str = "nvidia"
    exclude: tuple[str, ...] = ()
    kv_cache: str | None = None
    keep_unaligned: bool = False
    calib_data: Path | None = None
    calib_samples: int = 64
    calib_seq_len: int = 256
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    method: str = "post-training quantization"
    training: dict[str, Any] | None = None  # QAD options and progress, recorded in the manifest


@dataclass
class QuantizerState:
    """Amax values that fix every scale of a quantized checkpoint.

    Attributes:
        modules: Module name to its scales (format, shared weight amax, input amax).
        kv_amax: Attention mixer prefix to ``(k amax, v amax)``.
        unreached_experts: Parent layer to expert ids no calibration token reached.
        calibration: Samples, tokens and budgets used.
    """

    modules: dict[str, export.ModuleScales] = field(default_factory=dict)
    kv_amax: dict[str, tuple[float, float]] = field(default_factory=dict)
    unreached_experts: dict[int, list[int]] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": STATE_VERSION,
            "modules": {
                name: {"format": s.format, "weight_amax": s.weight_amax, "input_amax": s.input_amax}
                for name, s in sorted(self.modules.items())
            },
            "kv_amax": {name: list(values) for name, values in sorted(self.kv_amax.items())},
            "unreached_experts": {str(layer): experts for layer, experts in sorted(self.unreached_experts.items())},
            "calibration": self.calibration,
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> "QuantizerState":
        if document.get("format_version") != STATE_VERSION:
            raise CheckpointError(f"{export.STATE_FILE} has format_version {document.get('format_version')!r}", f"expected {STATE_VERSION}")
        modules = {
            name: export.ModuleScales(entry["format"], float(entry["weight_amax"]), float(entry["input_amax"]))
            for name, entry in document["modules"].items()
        }
        kv = {name: (float(values[0]), float(values[1])) for name, values in document.get("kv_amax", {}).items()}
        unreached = {int(layer): list(experts) for layer, experts in document.get("unreached_experts", {}).items()}
        return cls(modules, kv, unreached, dict(document.get("calibration", {})))


@dataclass(frozen=True)
class QuantizeResult:
    """Outcome of ``elastic quantize``: the plan, predicted sizes and what was written."""

    plan: QuantPlan
    predicted_bytes: dict[str, int]
    path: Path | None
    total_bytes: int | None
    files: tuple[str, ...]
    state: QuantizerState | None


def plan_for(source: ElasticSource, options: QuantizeOptions) -> QuantPlan:
    """Check the input and decide every module's format, from headers alone."""
    reject_quantized(source)
    if source.problems:
        check_sliceable(source.problems, source.inspect_target)
    return plan_quantization(
        source.arch,
        source.checkpoint.tensors,
        options.format,
        options.recipe,
        list(options.exclude),
        options.kv_cache,
        options.keep_unaligned,
    )


def predicted_sizes(source: ElasticSource, plan: QuantPlan) -> dict[str, int]:
    """Predict the quantized size of the parent and of every budget sliced from it."""
    sizes = {"parent": predict_bytes(plan, source.checkpoint.tensors)}
    for budget in source.budgets:
        slice_plan = build_plan(source.arch, source.checkpoint.config, source.checkpoint.tensors, budget)
        child = {t.source: (t.dtype, t.target_shape) for t in slice_plan.tensors}
        sizes[budget.name] = predict_bytes(plan, child)
    return sizes


def tensor_parallel(source: ElasticSource, plan: QuantPlan) -> dict[str, dict[str, Any]]:
    """Report, for the parent and every budget, the tensor-parallel degrees it can be served at."""
    def summary(blockers: dict[int, list[str]]) -> dict[str, Any]:
        return {
            "degrees": [tp for tp, names in blockers.items() if not names],
            "blocked_by": {str(tp): names[:3] for tp, names in blockers.items() if names},
        }

    report = {"parent": summary(servable_tp_degrees(plan))}
    for budget in source.budgets:
        slice_plan = build_plan(source.arch, source.checkpoint.config, source.checkpoint.tensors, budget)
        shapes = {t.source[: -len(".weight")]: t.target_shape for t in slice_plan.tensors if t.source.endswith(".weight")}
        report[budget.name] = summary(servable_tp_degrees(plan, shapes))
    return report


def unaligned_cuts(source: ElasticSource, plan: QuantPlan) -> list[str]:
    """List NVFP4 modules whose input cut, for some budget, splits a block of 16 columns.

    A quantized parent serves every budget only when each budget keeps or drops whole blocks
    along the input dimension, because packed E2M1 pairs and block scales cannot be split.
    """
    nvfp4 = {d.module for d in plan.decisions if d.format == "nvfp4"}
    problems = []
    for budget in source.budgets:
        slice_plan = build_plan(source.arch, source.checkpoint.config, source.checkpoint.tensors, budget)
        for tensor in slice_plan.tensors:
            module = tensor.source[: -len(".weight")]
            keep = tensor.keep[-1] if tensor.keep else None
            if module not in nvfp4 or keep is None:
                continue
            if not _block_aligned(keep):
                problems.append(f"budget '{budget.name}': {module}")
                break
    return problems


def _block_aligned(keep: tuple[int, ...]) -> bool:
    if len(keep) % NVFP4_BLOCK_SIZE:
        return False
    for start in range(0, len(keep), NVFP4_BLOCK_SIZE):
        block = keep[start : start + NVFP4_BLOCK_SIZE]
        if block[0] < 0 or block[0] % NVFP4_BLOCK_SIZE or block != tuple(range(block[0], block[0] + NVFP4_BLOCK_SIZE)):
            if not all(index < 0 for index in block):
                return False
    return True


def calibrate_state(source: ElasticSource, plan: QuantPlan, options: QuantizeOptions) -> QuantizerState:
    """Run calibration over every budget and return the input and KV amax values."""
    from elastic_cli.quantize.calib_data import load_texts, load_tokenizer, tokenize
    from elastic_cli.quantize.calibrate import calibrate

    tokenizer = load_tokenizer(source.checkpoint.root)
    texts = load_texts(options.calib_data, tokenizer)
    token_ids = tokenize(texts, tokenizer, options.calib_samples, options.calib_seq_len)
    modules = set(plan.quantized)
    result = calibrate(source, modules, token_ids, budgets=source.budgets or None, kv_cache=plan.kv_cache_quant_algo == "FP8")
    state = QuantizerState(
        kv_amax=dict(result.kv_amax),
        unreached_experts={layer: list(experts) for layer, experts in result.unreached_experts.items()},
        calibration={"samples": result.samples, "tokens": result.tokens, "budgets": list(result.budgets)},
    )
    for decision in plan.decisions:
        if decision.format is not None:
            state.modules[decision.module] = export.ModuleScales(decision.format, 0.0, float(result.input_amax[decision.module]))
    return state


def share_fused(source: ElasticSource, plan: QuantPlan, state: QuantizerState) -> None:
    """Give fused partners (q/k/v) one weight amax and one input amax.

    Partners whose weight amax the state already fixes (a reused state) keep it.
    """
    groups: dict[str, list[str]] = {}
    for decision in plan.decisions:
        if decision.format is not None and decision.fused_group:
            groups.setdefault(decision.fused_group, []).append(decision.module)
    for modules in groups.values():
        if all(state.modules[m].weight_amax > 0 for m in modules):
            continue
        weight = max(export.weight_amax(source.checkpoint.read(f"{m}.weight")) for m in modules)
        inputs = max(state.modules[m].input_amax for m in modules)
        for module in modules:
            state.modules[module] = export.ModuleScales(state.modules[module].format, weight, inputs)


def quantize_checkpoint(
    source: ElasticSource,
    options: QuantizeOptions,
    output: Path,
    *,
    overwrite: bool = False,
    state: QuantizerState | None = None,
) -> QuantizeResult:
    """Quantize a checkpoint and write it atomically to ``output``.

    Args:
        source: The opened high-precision checkpoint (elastic or not).
        options: Format, recipe and calibration options.
        output: Destination folder.
        overwrite: Replace an existing destination.
        state: Scales to use instead of calibrating: its input amax values, and its weight
            amax values where positive (0 means "compute from the weight"). A child quantized
            with its parent's state gets the parent's bytes.

    Raises:
        UnsupportedError: For an already quantized input, or an elastic checkpoint whose
            budgets cut NVFP4 inputs inside a block of 16.
        CheckpointError: For NaN or Inf weights, naming the tensor.
    """
    started = time.monotonic()
    if options.calib_data is not None:
        from elastic_cli.quantize.calib_data import check_file

        check_file(Path(options.calib_data))  # before its digest enters the run key
    plan = plan_for(source, options)
    sizes = predicted_sizes(source, plan)
    unaligned = unaligned_cuts(source, plan) if len(source.budgets) > 1 else []
    if unaligned:
        raise UnsupportedError(
            f"NVFP4 cannot keep the nesting: {unaligned[0]} keeps input columns that split blocks of "
            f"{NVFP4_BLOCK_SIZE}" + (f" (and {len(unaligned) - 1} more)" if len(unaligned) > 1 else ""),
            "use masks that keep whole blocks of 16 channels, or slice each budget first and quantize the children",
        )

    given = state
    key = run_key(
        {
            "kind": "quantize",
            "version": __version__,
            "inputs": input_fingerprint(source.checkpoint.root, source.checkpoint.tensors, source.checkpoint.config),
            "budgets": budgets_to_document(source.budgets, source.arch) if source.budgets else None,
            "options": provenance(source, plan, options)["options"],
            "state": given.to_json() if given is not None else None,
        }
    )
    entries = _output_entries(source, plan)
    layout = plan_shards(entries, options.max_shard_bytes)
    sidecars = list_sidecars(source.checkpoint.root, source.origin.trust_root, REGENERATED | {export.QUANT_CONFIG_FILE, export.STATE_FILE})
    document = export.hf_quant_config(plan)

    inputs = (source.checkpoint.root, *([options.calib_data] if options.calib_data else []))
    with resumable_folder(output, overwrite, key, inputs) as journal:
        temp = journal.folder
        state = _initial_state(source, plan, options, given, journal)
        share_fused(source, plan, state)
        with ShardedWriter(temp, layout, journal) as writer:
            _stream(source, plan, state, writer, journal)
            writer.finish()
        config = dict(source.checkpoint.config)
        config["quantization_config"] = export.quantization_config(document)
        write_text(temp / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_text(temp / export.QUANT_CONFIG_FILE, json.dumps(document, indent=2, sort_keys=True) + "\n")
        write_text(temp / export.STATE_FILE, json.dumps(state.to_json(), indent=1, sort_keys=True) + "\n")
        copy_sidecars(sidecars, temp)
        if source.budgets_from == MASKS_FILE:
            copy_sidecars([source.checkpoint.root / MASKS_FILE], temp)
        elif source.budgets:
            # Budgets from a spec become stored masks, so the output is an elastic checkpoint.
            document_masks = budgets_to_document(source.budgets, source.arch)
            write_text(temp / MASKS_FILE, json.dumps(document_masks, indent=1, sort_keys=True) + "\n")
        write_text(temp / "README.md", render_quantized_card(source, plan, options))
        manifest = write_manifest(temp, provenance(source, plan, options), writer.digests)
        files = sorted([*manifest["files"], MANIFEST_FILE])

    log.info("wrote %s (%d bytes) in %.1f s", output, layout.total_size, time.monotonic() - started)
    return QuantizeResult(plan, sizes, output, layout.total_size, tuple(files), state)


def provenance(source: ElasticSource, plan: QuantPlan, options: QuantizeOptions) -> dict[str, Any]:
    """Describe where a quantized artifact came from and the options that shaped it."""
    calib = None
    if options.calib_data is not None:
        calib = {"name": options.calib_data.name, "sha256": file_digest(options.calib_data)[0]}
    return {
        "kind": "quantize",
        "parent": {"name": source.origin.name, "revision": source.origin.revision},
        "budget": None,
        "format": plan.quant_algo,
        "options": {
            "format": options.format,
            "recipe": options.recipe,
            "exclude": list(options.exclude),
            "kv_cache": options.kv_cache,
            "keep_unaligned": options.keep_unaligned,
            "calib_data": calib or "default",
            "calib_samples": options.calib_samples,
            "calib_seq_len": options.calib_seq_len,
            "max_shard_bytes": options.max_shard_bytes,
            "method": options.method,
            "training": options.training,
        },
    }


def render_quantized_card(source: ElasticSource, plan: QuantPlan, options: QuantizeOptions) -> str:
    """Return the model card of a quantized artifact: parent, revision, format and recipe."""
    revision = source.origin.revision or "local folder, no revision"
    budgets = ", ".join(b.name for b in source.budgets) or "none (not elastic)"
    lines = [
        "---",
        f"base_model: {source.origin.name}",
        "library_name: transformers",
        "tags:",
        "- nemotron-h",
        "- modelopt",
        f"- {plan.quant_algo.lower()}",
        "---",
        "",
        f"# {source.origin.name.split('/')[-1]}: {plan.quant_algo}",
        "",
        f"`{source.origin.name}` (revision `{revision}`) quantized by elastic {__version__} with {options.method}:",
        f"format `{options.format}`, recipe `{options.recipe}`, KV cache "
        f"`{plan.kv_cache_quant_algo or 'not quantized'}`. Weights, scales and `hf_quant_config.json` follow",
        "the ModelOpt unified Hugging Face layout that vLLM, TensorRT-LLM and SGLang load.",
        "",
        f"Nested budgets kept: {budgets}. Every budget can be sliced from this checkpoint with `elastic slice`.",
        "",
    ]
    return "\n".join(lines)


def _initial_state(
    source: ElasticSource, plan: QuantPlan, options: QuantizeOptions, given: QuantizerState | None, journal: Journal
) -> QuantizerState:
    """Return the state to export with: the given one, a resumed run's, or a fresh calibration."""
    if given is not None:
        missing = [m for m in plan.quantized if m not in given.modules]
        if missing:
            raise CheckpointError(f"the quantizer state has no scales for module {missing[0]}", "calibrate instead of reusing a state")
        state = QuantizerState(dict(given.modules), dict(given.kv_amax), dict(given.unreached_experts), dict(given.calibration))
    elif "calibration" in journal.extra:
        log.info("resume: reusing the calibration of the interrupted run")
        state = QuantizerState.from_json(journal.extra["calibration"])
    else:
        log.info("calibrating %d module(s) over %d budget(s)", len(plan.quantized), max(1, len(source.budgets)))
        state = calibrate_state(source, plan, options)
        journal.save_extra("calibration", state.to_json())
    for module, amax in journal.extra.get("weight_amax", {}).items():
        if module in state.modules and state.modules[module].weight_amax <= 0:
            scales = state.modules[module]
            state.modules[module] = export.ModuleScales(scales.format, float(amax), scales.input_amax)
    return state


def _entries_of(name: str, info: Any, decision: Any, plan: QuantPlan) -> list[tuple[str, str, tuple[int, ...]]]:
    """List what one source tensor becomes on disk, in write order."""
    if decision is not None and decision.format is not None:
        entries = export.output_entries(decision, info.dtype)
    else:
        entries = [(name, info.dtype, info.shape)]
    if plan.kv_cache_quant_algo:
        kv = export.kv_scale_entry(name)
        if kv is not None:
            entries.append(kv)
    return entries


def _output_entries(source: ElasticSource, plan: QuantPlan) -> list[tuple[str, str, tuple[int, ...]]]:
    decisions = {f"{d.module}.weight": d for d in plan.decisions}
    entries = []
    for name, info in source.checkpoint.tensors.items():
        entries.extend(_entries_of(name, info, decisions.get(name), plan))
    return entries


def _stream(source: ElasticSource, plan: QuantPlan, state: QuantizerState, writer: ShardedWriter, journal: Journal) -> None:
    decisions = {f"{d.module}.weight": d for d in plan.decisions if d.format is not None}
    finished_shards = len(writer.digests)
    for name, info in source.checkpoint.tensors.items():
        outputs_of = _entries_of(name, info, decisions.get(name), plan)
        if all(writer.is_done(target) for target, _, _ in outputs_of):
            for target, dtype, shape in outputs_of:
                writer.write_bytes(target, dtype, shape, None)
            continue
        if len(writer.digests) != finished_shards:
            # Weight amax values fix scales written into finished shards; a resumed run needs them.
            finished_shards = len(writer.digests)
            amax = {m: s.weight_amax for m, s in state.modules.items() if s.weight_amax > 0}
            journal.save_extra("weight_amax", dict(sorted(amax.items())))
        tensor = source.checkpoint.read(name)
        problem = export.check_weight_finite(name, tensor)
        if problem is not None:
            raise CheckpointError(problem, "fix the checkpoint; elastic does not write NaN or Inf into quantized outputs")
        decision = decisions.get(name)
        if decision is None:
            writer.write(name, tensor)
        else:
            scales = state.modules[decision.module]
            if scales.weight_amax <= 0:
                scales = export.ModuleScales(scales.format, export.weight_amax(tensor), scales.input_amax)
                state.modules[decision.module] = scales
            try:
                outputs = export.quantize_module(tensor, scales)
            except FormatError as error:
                raise ElasticError(f"quantizing '{name}' failed: {error}", "keep this module in BF16 with --exclude") from error
            for (target, _, _), value in zip(export.output_entries(decision, info.dtype), outputs):
                writer.write(target, value)
        if plan.kv_cache_quant_algo:
            kv = export.kv_scale_entry(name)
            if kv is not None:
                amax = state.kv_amax[name.rsplit(".", 2)[0]]
                writer.write(kv[0], export.kv_scale(amax[0] if name.endswith("k_proj.weight") else amax[1]))
        del tensor


def load_state(path: Path) -> QuantizerState:
    """Read a quantizer state file written by ``elastic quantize``."""
    from elastic_cli.checkpoint.reader import read_json

    return QuantizerState.from_json(read_json(path, export.STATE_FILE))

