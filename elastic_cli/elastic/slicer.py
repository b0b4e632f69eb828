"""Execute slice plans: stream the parent's tensors once and write one checkpoint per budget.

Each source tensor is read once, cut for every requested budget and written straight into each
budget's shard, so memory stays bounded by the largest tensor plus its cuts, however large the
checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from elastic_cli import __version__
from elastic_cli.checkpoint.manifest import MANIFEST_FILE, write_manifest
from elastic_cli.checkpoint.reader import read_json
from elastic_cli.checkpoint.output import REGENERATED, copy_sidecars, list_sidecars
from elastic_cli.checkpoint.resume import input_fingerprint, resumable_folder, run_key
from elastic_cli.checkpoint.writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter, output_error, plan_shards, write_text
from elastic_cli.elastic.modelcard import render_model_card
from elastic_cli.elastic.plan import Keep, SlicePlan, TensorSlice, build_plan, check_sliceable
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
    check_sliceable(source.problems, source.origin.name)
    return [build_plan(source.arch, source.checkpoint.config, source.checkpoint.tensors, budget) for budget in budgets]


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
    with resumable_folder(output, overwrite, key) as journal:
        temp = journal.folder
        folders = {name: temp / path.relative_to(output) for name, path in output_folders(output, plans, nested).items()}
        for folder in folders.values():
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise output_error(folder, error) from error
        writers = [
            ShardedWriter(folders[plan.budget], layout, journal, _prefix(folders[plan.budget], temp))
            for plan, layout in zip(plans, layouts)
        ]
        _stream(source, plans, writers)

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


def _stream(source: ElasticSource, plans: list[SlicePlan], writers: list[ShardedWriter]) -> None:
    by_source: dict[str, list[tuple[int, TensorSlice]]] = {}
    for position, plan in enumerate(plans):
        for tensor in plan.tensors:
            by_source.setdefault(tensor.source, []).append((position, tensor))

    cutter = TensorCutter()
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
        info = checkpoint.tensors[name]
        if all(tensor.is_copy for _, tensor in targets):
            raw = checkpoint.read_bytes(name)
            for position, tensor in targets:
                writers[position].write_bytes(tensor.target, tensor.dtype, tensor.target_shape, raw)
            continue
        if len(targets) == 1 and targets[0][1].keep and targets[0][1].keep[0] is not None:
            # One budget cuts the rows: read only its rows, then cut the other dimensions.
            position, tensor = targets[0]
            rows = tensor.keep[0]
            wanted = tuple(row for row in rows if row >= 0)
            part = checkpoint.read_rows(name, wanted)
            positions = iter(range(len(wanted)))
            local = tuple(next(positions) if row >= 0 else -1 for row in rows)
            writers[position].write(tensor.target, cutter.cut(part, (local, *tensor.keep[1:]), tensor.pad_value))
            continue
        full = checkpoint.read(name)
        for position, tensor in targets:
            writers[position].write(tensor.target, cutter.cut(full, tensor.keep, tensor.pad_value))
        log.debug("sliced %s %s for %d budget(s)", name, list(info.shape), len(targets))


_MAX_RUNS = 64
_SAME_SIZE_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _take(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """Gather entries along ``dim``; numpy's take on a same-size integer view of the bits.

    Slicing only moves bits, so the gather runs on integers of the element size; numpy's take
    measured about 5x faster than torch's index_select for column gathers of a BF16 matrix
    (torch 2.13, numpy 2.4, 2-core x86 CPU).
    """
    bits = _SAME_SIZE_INTS.get(tensor.element_size())
    if bits is None or tensor.dim() == 0:
        return tensor.index_select(dim, index)
    array = tensor.contiguous().view(bits).numpy()
    return torch.from_numpy(np.take(array, index.numpy(), axis=dim)).view(tensor.dtype)


def _runs(keep: tuple[int, ...]) -> list[slice]:
    """Split ascending-run keep indices into slices; empty when there is padding or reordering."""
    runs: list[slice] = []
    start = 0
    for position in range(1, len(keep) + 1):
        if position == len(keep) or keep[position] != keep[position - 1] + 1:
            if keep[start] < 0:
                return []
            runs.append(slice(keep[start], keep[position - 1] + 1))
            start = position
    return runs


class TensorCutter:
    """Applies keep indices to tensors, caching index tensors shared between many tensors."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[tuple[int, ...], torch.Tensor | slice, torch.Tensor | None]] = {}

    def _index(self, keep: tuple[int, ...]) -> tuple[torch.Tensor | slice | list[slice], torch.Tensor | None]:
        cached = self._cache.get(id(keep))
        if cached is not None and cached[0] is keep:
            return cached[1], cached[2]
        padding = None
        runs = _runs(keep)
        if len(runs) == 1:
            index: torch.Tensor | slice | list[slice] = runs[0]
        elif runs and len(runs) <= _MAX_RUNS:
            index = runs  # a few contiguous runs copy faster than a gather
        else:
            index = torch.tensor(keep, dtype=torch.long)
            if (index < 0).any():
                padding = index >= 0
        self._cache[id(keep)] = (keep, index, padding)
        return index, padding

    def cut(self, tensor: torch.Tensor, keep: tuple[Keep, ...], pad_value: float = 0.0) -> torch.Tensor:
        """Keep the listed entries of each dimension; ``-1`` entries become ``pad_value``."""
        for dim, indices in enumerate(keep):
            if indices is None:
                continue
            index, padding = self._index(indices)
            if isinstance(index, slice):
                tensor = tensor.narrow(dim, index.start, index.stop - index.start)
            elif isinstance(index, list):
                tensor = torch.cat([tensor.narrow(dim, run.start, run.stop - run.start) for run in index], dim=dim)
            elif padding is None:
                tensor = _take(tensor, dim, index)
            else:
                shape = list(tensor.shape)
                shape[dim] = len(indices)
                result = torch.full(shape, pad_value, dtype=torch.float32).to(tensor.dtype)
                result.index_copy_(dim, padding.nonzero().squeeze(1), tensor.index_select(dim, index[padding]))
                tensor = result
        return tensor.contiguous()
