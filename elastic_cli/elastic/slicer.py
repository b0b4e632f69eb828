"""Execute slice plans: stream the parent's tensors once and write one checkpoint per budget.

Each source tensor is mapped once and cut for every requested budget, block by block of whole
rows, into a few reused 4 MiB buffers (:class:`~elastic_cli.checkpoint.writer.BufferRing`).
Memory therefore stays bounded by the mapped pages of the largest tensor plus those buffers,
however large the checkpoint. Cutting works on numpy arrays of raw bits, and hashing and
writing run on background threads (:class:`~elastic_cli.checkpoint.writer.WritePipeline`), so
a slice overlaps its reads, gathers, hashes and writes and never imports torch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from elastic_cli import __version__
from elastic_cli.checkpoint.manifest import MANIFEST_FILE, write_manifest
from elastic_cli.checkpoint.reader import read_json
from elastic_cli.checkpoint.output import REGENERATED, copy_sidecars, list_sidecars
from elastic_cli.checkpoint.resume import input_fingerprint, resumable_folder, run_key
from elastic_cli.checkpoint.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    BufferRing,
    ShardedWriter,
    WritePipeline,
    output_error,
    plan_shards,
    write_text,
)
from elastic_cli.elastic.cut import ArrayCutter, pad_bits
from elastic_cli.elastic.modelcard import render_model_card
from elastic_cli.elastic.plan import SlicePlan, TensorSlice, build_plan, check_sliceable
from elastic_cli.elastic.masks import budgets_to_document
from elastic_cli.elastic.source import ElasticSource
from elastic_cli.errors import CheckpointError
from elastic_cli.quantize import export

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SliceResult:
    """Summary of one written budget: path, parameter counts, bytes and files."""

    budget: str
    path: Path
    params: int
    active_params: int
    total_bytes: int
    files: tuple[str, ...]


def plan_budgets(source: ElasticSource, names: list[str]) -> list[SlicePlan]:
    """Validate the hierarchy and plan every requested budget, from headers alone.

    Raises:
        MaskError: If a budget is unknown or the hierarchy has problems.
        UnsupportedError: If the checkpoint is already quantized.
        CheckpointError: If the tensors do not match the config.
    """
    budgets = source.select(names)
    check_sliceable(source.problems, source.inspect_target)
    plans = [build_plan(source.arch, source.checkpoint.config, source.checkpoint.tensors, budget) for budget in budgets]
    for plan in plans:
        _warn_unaligned_experts(plan)
    return plans


# transformers runs routed experts with torch's grouped matrix product by default, which needs
# every row of the expert weights to be a multiple of 16 bytes (measured with transformers 5.25.0
# and torch 2.13: "strides should be multiple of 16 bytes").
_GROUPED_MM_ALIGNMENT_BYTES = 16


def _warn_unaligned_experts(plan: SlicePlan) -> None:
    """Warn when a child's expert widths make transformers' default expert kernel fail."""
    config = plan.config
    if not config.get("n_routed_experts"):
        return
    for field in ("hidden_size", "moe_intermediate_size"):
        width = config.get(field)
        if isinstance(width, int) and width * 2 % _GROUPED_MM_ALIGNMENT_BYTES:
            log.warning(
                "budget %s: %s %d is not a multiple of 8, so transformers' default grouped_mm expert "
                "kernel rejects the child in BF16; load it with experts_implementation='eager'",
                plan.budget,
                field,
                width,
            )


def output_folders(output: Path, plans: list[SlicePlan], nested: bool) -> dict[str, Path]:
    """Map budget names to output folders: ``output`` itself, or ``output/<budget>``."""
    if not nested:
        return {plans[0].budget: output}
    return {plan.budget: output / plan.budget for plan in plans}


def slice_checkpoint(
    source: ElasticSource,
    plans: list[SlicePlan],
    output: Path,
    *,
    nested: bool,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[SliceResult]:
    """Write each planned budget as a standalone Hugging Face checkpoint.

    Args:
        source: The opened parent.
        plans: Plans from :func:`plan_budgets`.
        output: Destination folder; replaced atomically.
        nested: Write each budget into ``output/<budget>`` (several budgets) rather than into
            ``output`` itself (one budget).
        overwrite: Replace an existing destination.
        max_shard_bytes: Largest shard size in bytes.

    Returns:
        One result per budget, in plan order.
    """
    started = time.monotonic()
    skip = REGENERATED | {export.QUANT_CONFIG_FILE, export.STATE_FILE}
    sidecars = list_sidecars(source.checkpoint.root, source.origin.trust_root, skip)
    quant_document = _optional_json(source.checkpoint.root / export.QUANT_CONFIG_FILE)
    state_document = _optional_json(source.checkpoint.root / export.STATE_FILE)
    layouts = [plan_shards([(t.target, t.dtype, t.target_shape) for t in plan.tensors], max_shard_bytes) for plan in plans]

    key = run_key(
        {
            "kind": "slice",
            "version": __version__,
            "inputs": input_fingerprint(source.checkpoint.root, source.checkpoint.tensors, source.checkpoint.config),
            "budgets": budgets_to_document(source.select([plan.budget for plan in plans]), source.arch),
            "nested": nested,
            "max_shard_bytes": max_shard_bytes,
        }
    )
    spec = Path(source.budgets_from)
    inputs = (source.checkpoint.root, *([spec] if spec.is_file() else []))
    with resumable_folder(output, overwrite, key, inputs) as journal, WritePipeline() as pipeline, ExitStack() as open_writers:
        temp = journal.folder
        folders = {name: temp / path.relative_to(output) for name, path in output_folders(output, plans, nested).items()}
        for folder in folders.values():
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise output_error(folder, error) from error
        writers = [
            open_writers.enter_context(
                ShardedWriter(folders[plan.budget], layout, journal, _prefix(folders[plan.budget], temp), pipeline)
            )
            for plan, layout in zip(plans, layouts)
        ]
        _stream(source, plans, writers, BufferRing(pipeline))

        results = []
        for plan, writer, layout in zip(plans, writers, layouts):
            folder = folders[plan.budget]
            writer.finish()
            config = plan.config
            copied = copy_sidecars(sidecars, folder)
            if quant_document is not None:
                child_document = export.rename_quant_config(quant_document, plan.module_map)
                config = {**config, "quantization_config": export.quantization_config(child_document)}
                write_text(folder / export.QUANT_CONFIG_FILE, json.dumps(child_document, indent=2, sort_keys=True) + "\n")
                copied.append(export.QUANT_CONFIG_FILE)
            if state_document is not None:
                child_state = export.rename_state(state_document, plan.module_map)
                write_text(folder / export.STATE_FILE, json.dumps(child_state, indent=1, sort_keys=True) + "\n")
                copied.append(export.STATE_FILE)
            write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
            write_text(folder / "README.md", render_model_card(source, plan, __version__))
            provenance = {
                "kind": "slice",
                "parent": {"name": source.origin.name, "revision": source.origin.revision},
                "budget": plan.budget,
                "format": quant_document["quantization"]["quant_algo"] if quant_document else "bf16",
                "options": {"budgets_from": Path(source.budgets_from).name, "max_shard_bytes": max_shard_bytes},
            }
            manifest = write_manifest(folder, provenance, writer.digests)
            files = sorted([*manifest["files"], MANIFEST_FILE])
            final = output / folder.relative_to(temp)
            results.append(SliceResult(plan.budget, final, plan.params, plan.active_params, layout.total_size, tuple(files)))

    elapsed = time.monotonic() - started
    log.info("wrote %d budget(s) to %s in %.1f s", len(results), output, elapsed)
    return results


def _prefix(folder: Path, root: Path) -> str:
    relative = folder.relative_to(root).as_posix()
    return "" if relative == "." else relative + "/"


def _optional_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    document = read_json(path, path.name)
    if not isinstance(document, dict) or not isinstance(document.get("quantization", document.get("modules")), dict):
        raise CheckpointError(f"{path.name} is malformed: it has no 'quantization' or 'modules' object", "restore the file")
    return document


def _stream(source: ElasticSource, plans: list[SlicePlan], writers: list[ShardedWriter], ring: BufferRing) -> None:
    by_source: dict[str, list[tuple[int, TensorSlice]]] = {}
    for position, plan in enumerate(plans):
        for tensor in plan.tensors:
            by_source.setdefault(tensor.source, []).append((position, tensor))

    cutter = ArrayCutter()
    checkpoint = source.checkpoint
    for name in checkpoint.tensors:
        targets = by_source.get(name)
        if not targets:
            continue
        finished = [(position, tensor) for position, tensor in targets if writers[position].is_done(tensor.target)]
        for position, tensor in finished:
            writers[position].write_bytes(tensor.target, tensor.dtype, tensor.target_shape, None)
        targets = [target for target in targets if target not in finished]
        if not targets:
            continue
        # A mapped source costs no read: a copy is written from the page cache, and a cut
        # touches only the pages of the rows it keeps.
        array = checkpoint.map_array(name)
        for position, tensor in targets:
            if tensor.is_copy:
                parts = _blocks_of(array, ring.buffer_bytes)
            else:
                parts = _cut_blocks(cutter, array, tensor, ring)
            writers[position].write_parts(tensor.target, tensor.dtype, tensor.target_shape, parts)
        log.debug("sliced %s %s for %d budget(s)", name, list(array.shape), len(targets))


def _blocks_of(array: np.ndarray, block_bytes: int) -> Iterator[memoryview]:
    """Yield a contiguous array's bytes in pieces of ``block_bytes`` (the last may be shorter), without copying."""
    data = memoryview(array).cast("B") if array.size else memoryview(b"")
    for start in range(0, data.nbytes, block_bytes):
        yield data[start : start + block_bytes]


def _cut_blocks(cutter: ArrayCutter, array: np.ndarray, tensor: TensorSlice, ring: BufferRing) -> Iterator[np.ndarray]:
    """Yield the cut of ``array`` in blocks of whole rows, each in a buffer of ``ring``."""
    shape = tensor.target_shape
    pad = pad_bits(tensor.dtype, tensor.pad_value)
    if not shape:  # a scalar has no rows; there is nothing to cut
        yield np.ascontiguousarray(array)
        return
    itemsize = array.dtype.itemsize
    row_bytes = math.prod(shape[1:]) * itemsize
    if tensor.keep and tensor.keep[0] is not None and any(indices is not None for indices in tensor.keep[1:]):
        # Rows are gathered whole into the cutter's scratch array before the columns are cut.
        row_bytes = max(row_bytes, math.prod(array.shape[1:]) * itemsize)
    rows_per_block = max(1, ring.buffer_bytes // max(row_bytes, 1))
    for start in range(0, shape[0], rows_per_block):
        rows = min(rows_per_block, shape[0] - start)
        out = ring.take(rows * math.prod(shape[1:]) * itemsize).view(array.dtype).reshape(rows, *shape[1:])
        cutter.cut_rows(array, tensor.keep, pad, start, out)
        yield out
