"""Re-read an artifact folder written by ``elastic slice`` or ``elastic quantize`` and prove it sound.

:func:`verify_artifact` runs every check it can and reports each, rather than stopping at the
first failure:

``manifest``
    ``elastic-manifest.json`` is present and parses, every file it lists has the recorded size
    and sha256, and the folder contains no file it does not list.
``index``
    ``model.safetensors.index.json`` and the shard headers name the same tensors, each in the
    shard the index names. No shard is missing and no ``*.safetensors`` file is stray.
    ``metadata.total_size`` is the sum of the tensor bytes, and every shard has ``format: pt``
    metadata. A single ``model.safetensors`` without an index is valid.
``tensors``
    ``config.json`` parses as a NemotronH config and loads as transformers' ``NemotronHConfig``.
    Every tensor has the shape the config implies, and every unquantized weight is floating point.
``finite``
    No floating-point tensor contains NaN or Inf, and no E4M3 tensor contains a NaN byte.
``quantization``
    For a quantized folder, everything :func:`validate_quantized` checks; for any other folder,
    that it holds no quantized tensor and no ``quantization_config``.
``sidecars`` (with a parent)
    Every top-level file of the parent that a child carries over is present with the same bytes.
``parent`` (with a parent)
    For a slice, the budget's plan is rebuilt from the parent's masks: every tensor equals the
    parent's cut, and ``config.json`` (and, for a quantized parent, ``hf_quant_config.json`` and
    ``elastic_quant_state.json``) equal what slicing writes. For a quantized folder, every
    quantized module equals the parent's weight quantized with the stored scales, every other
    tensor equals the parent's, and ``config.json`` is the parent's plus ``quantization_config``.

Tensors are read one at a time, so memory stays bounded by the largest tensor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from elastic_cli.arch.nemotron_h import NemotronHArch, natural_key, parse_config
from elastic_cli.checkpoint.manifest import MANIFEST_FILE, MANIFEST_VERSION, file_digest
from elastic_cli.checkpoint.output import REGENERATED, list_sidecars
from elastic_cli.checkpoint.reader import INDEX_NAME, SINGLE_NAME, Checkpoint, read_json
from elastic_cli.checkpoint.safetensors_io import TensorInfo, read_header
from elastic_cli.checkpoint.writer import SHARD_METADATA, tensor_bytes
from elastic_cli.elastic.masks import MASKS_FILE
from elastic_cli.elastic.plan import check_tensors
from elastic_cli.elastic.slicer import plan_budgets
from elastic_cli.elastic.tensor_cut import TensorCutter
from elastic_cli.elastic.source import ElasticSource, open_source
from elastic_cli.errors import CheckpointError, ElasticError, UsageError
from elastic_cli.formats.errors import FormatError
from elastic_cli.quantize import export
from elastic_cli.quantize.pipeline import QuantizerState, load_state
from elastic_cli.quantize.policy import ModuleDecision
from elastic_cli.quantize.validate import E4M3_NAN_BYTES, validate_quantized

log = logging.getLogger(__name__)

CHECK_NAMES = ("manifest", "index", "tensors", "finite", "quantization", "sidecars", "parent")
# Each check lists at most this many problems and then counts the rest, so that a badly damaged
# folder still gives a readable report.
MAX_PROBLEMS_PER_CHECK = 10
QUANTIZED_WEIGHT_DTYPES = ("U8", "F8_E4M3")
HIGH_PRECISION_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check.

    Attributes:
        name: One of :data:`CHECK_NAMES`.
        passed: ``True`` or ``False``, or ``None`` when the check did not run (not applicable,
            no parent given, or a check it depends on failed).
        detail: What was checked, the number of problems, or why the check did not run.
    """

    name: str
    passed: bool | None
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    """Everything :func:`verify_artifact` found.

    Attributes:
        folder: The verified folder.
        kind: ``slice`` or ``quantize`` as the manifest records it, or ``None``.
        budget: The budget of a slice, as the manifest records it.
        format: ``bf16``, ``NVFP4``, ``FP8`` or ``MIXED_PRECISION``, as the manifest records it.
        parent: The ``--parent`` compared against, or ``None``.
        ok: True when no check found a problem.
        checks: One result per check, in :data:`CHECK_NAMES` order.
        problems: Every problem, prefixed with its check's name, in check order.
    """

    folder: Path
    kind: str | None
    budget: str | None
    format: str | None
    parent: str | None
    ok: bool
    checks: tuple[CheckResult, ...]
    problems: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """Return the report as a JSON-able document with a fixed set of keys."""
        return {
            "folder": str(self.folder),
            "kind": self.kind,
            "budget": self.budget,
            "format": self.format,
            "parent": self.parent,
            "ok": self.ok,
            "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in self.checks],
            "problems": list(self.problems),
        }


class _Check:
    """Problems of one check, keeping the first :data:`MAX_PROBLEMS_PER_CHECK` and counting the rest.

    ``detail`` describes what a passing check established. Check functions may replace it
    with one that gives counts.
    """

    def __init__(self, name: str, detail: str) -> None:
        self.name = name
        self.detail = detail
        self.problems: list[str] = []
        self.more = 0
        self.skipped: str | None = None

    def problem(self, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS_PER_CHECK:
            self.problems.append(message)
        else:
            self.more += 1

    def skip(self, reason: str) -> None:
        self.skipped = reason

    @property
    def failed(self) -> bool:
        return bool(self.problems)

    def result(self) -> CheckResult:
        if self.problems:
            return CheckResult(self.name, False, f"{len(self.problems) + self.more} problem(s)")
        if self.skipped is not None:
            return CheckResult(self.name, None, f"not run: {self.skipped}")
        return CheckResult(self.name, True, self.detail)

    def listed(self) -> list[str]:
        lines = [f"{self.name}: {message}" for message in self.problems]
        if self.more:
            lines.append(f"{self.name}: and {self.more} more problem(s)")
        return lines


def verify_artifact(folder: Path, parent: str | None = None, revision: str | None = None) -> VerifyReport:
    """Re-read an artifact folder and check that it is complete and sound.

    Args:
        folder: A folder written by ``elastic slice`` (one budget) or ``elastic quantize``.
        parent: The checkpoint the artifact was made from (a local folder or a Hugging Face
            repo id); enables the ``sidecars`` and ``parent`` checks.
        revision: Hub revision of ``parent``.

    Returns:
        The report; ``report.ok`` is False when any check found a problem.

    Raises:
        UsageError: If ``folder`` is not an artifact folder, ``revision`` is given without
            ``parent``, or the parent cannot be opened.
    """
    started = time.monotonic()
    folder = Path(folder)
    _require_artifact_folder(folder)
    if revision is not None and parent is None:
        raise UsageError("--revision applies to --parent, but no --parent was given", "pass --parent CKPT or drop --revision")
    source = _open_parent(parent, revision) if parent is not None else None
    log.info("verifying %s%s", folder, f" against {parent}" if parent else "")

    try:
        checks, provenance = _run_checks(folder, source)
    finally:
        if source is not None:
            source.close()

    results = tuple(check.result() for check in checks)
    problems = tuple(line for check in checks for line in check.listed())
    log.info("verified %s in %.1f s: %d problem(s)", folder, time.monotonic() - started, len(problems))
    return VerifyReport(
        folder=folder,
        kind=_text(provenance.get("kind")),
        budget=_text(provenance.get("budget")),
        format=_text(provenance.get("format")),
        parent=parent,
        ok=not problems,
        checks=results,
        problems=problems,
    )


def _require_artifact_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise UsageError(f"artifact folder not found: {folder}", "pass the folder that elastic slice or elastic quantize wrote")
    markers = (MANIFEST_FILE, "config.json", INDEX_NAME, SINGLE_NAME)
    if any((folder / name).exists() for name in markers) or any(folder.glob("*.safetensors")):
        return
    nested = sorted(path.name for path in folder.iterdir() if (path / MANIFEST_FILE).is_file())
    hint = "pass the folder that elastic slice or elastic quantize wrote"
    if nested:
        hint = f"it contains the artifact folders {', '.join(nested)}, so verify each of them"
    raise UsageError(f"{folder} is not an artifact folder: it has no {MANIFEST_FILE}, config.json or safetensors file", hint)


def _open_parent(parent: str, revision: str | None) -> ElasticSource:
    try:
        return open_source(parent, revision, require_budgets=False)
    except ElasticError as error:
        raise UsageError(f"cannot open --parent {parent}: {error.message}", error.hint) from error


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _run_checks(folder: Path, source: ElasticSource | None) -> tuple[list[_Check], dict[str, Any]]:
    manifest_check = _Check("manifest", "every file matches its recorded size and sha256, and no file is unlisted")
    manifest = _check_manifest(folder, manifest_check)
    kind = _text(manifest.get("kind")) if manifest else None

    index_check = _Check("index", "the index and the shard headers name the same tensors, and total_size and metadata match")
    tensors = _check_index(folder, index_check)

    tensors_check = _Check("tensors", "config.json loads as NemotronH, and every tensor has the shape and dtype it implies")
    config = _check_config_and_tensors(folder, tensors, tensors_check)

    artifact = Checkpoint(root=folder, config=config or {}, tensors=tensors, shard_names=(), trust_root=folder.resolve())
    with artifact:
        finite_check = _Check("finite", "no NaN or Inf in any floating-point tensor")
        _check_finite(artifact, finite_check)

        quantization_check = _Check("quantization", "quantized modules, scales and quantization configs are complete")
        _check_quantization(folder, config, tensors, index_check.failed, quantization_check)

        sidecars_check = _Check("sidecars", "every file carried over from the parent has the parent's bytes")
        parent_check = _Check("parent", "every tensor and config.json equal what the parent gives")
        if source is None:
            sidecars_check.skip("no --parent given")
            parent_check.skip("no --parent given")
        else:
            _check_sidecars(folder, source, kind, sidecars_check)
            _check_parent(folder, source, artifact, config, manifest, parent_check)

    checks = [manifest_check, index_check, tensors_check, finite_check, quantization_check, sidecars_check, parent_check]
    return checks, manifest or {}


def _check_manifest(folder: Path, check: _Check) -> dict[str, Any] | None:
    """Run the ``manifest`` check and return the manifest document when it is usable."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        check.problem(f"{MANIFEST_FILE} is missing, so no file can be checked against its recorded sha256")
        return None
    try:
        document = read_json(path, MANIFEST_FILE)
    except ElasticError as error:
        check.problem(error.message)
        return None
    files = document.get("files") if isinstance(document, dict) else None
    if not isinstance(files, dict):
        check.problem(f"{MANIFEST_FILE} has no 'files' object")
        return None
    if document.get("manifest_version") != MANIFEST_VERSION:
        check.problem(f"{MANIFEST_FILE} has manifest_version {document.get('manifest_version')!r}, expected {MANIFEST_VERSION}")

    for name, entry in sorted(files.items()):
        _check_listed_file(folder, name, entry, check)
    check.detail = f"{len(files)} file(s) match their recorded size and sha256, and no file is unlisted"
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name != MANIFEST_FILE and path.name not in files:
            entry_type = "folder" if path.is_dir() else "file"
            check.problem(f"{entry_type} {path.name} is not listed in {MANIFEST_FILE}")
    return document


def _check_listed_file(folder: Path, name: str, entry: Any, check: _Check) -> None:
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        check.problem(f"{MANIFEST_FILE} lists {name!r}, which is not a plain file name")
        return
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("size"), int):
        check.problem(f"{MANIFEST_FILE} entry for {name} lacks a sha256 string and a size integer")
        return
    path = folder / name
    if not path.is_file():
        check.problem(f"{name} is listed in {MANIFEST_FILE} but missing")
        return
    size = path.stat().st_size
    if size != entry["size"]:
        check.problem(f"{name} has {size} bytes, but {MANIFEST_FILE} records {entry['size']}")
        return
    sha256, _ = file_digest(path)
    if sha256 != entry["sha256"]:
        check.problem(f"{name} has sha256 {sha256}, but {MANIFEST_FILE} records {entry['sha256']}")


def _check_index(folder: Path, check: _Check) -> dict[str, TensorInfo]:
    """Run the ``index`` check and return every tensor of the shards that could be read."""
    weight_map = _read_weight_map(folder, check)
    present = sorted(path.name for path in folder.glob("*.safetensors"))
    if weight_map is not None:
        shards = sorted(set(weight_map.values()))
    elif (folder / INDEX_NAME).exists():
        shards = present  # the index is unusable, so read every shard for the other checks
    elif (folder / SINGLE_NAME).exists():
        shards = [SINGLE_NAME]
    else:
        check.problem(f"neither {SINGLE_NAME} nor {INDEX_NAME} is present")
        shards = present
    for name in sorted(set(present) - set(shards)):
        check.problem(f"{name} is not named by {INDEX_NAME if weight_map is not None else 'any index'}")

    tensors: dict[str, TensorInfo] = {}
    read_shards = set()
    for shard in shards:
        if not (folder / shard).is_file():
            check.problem(f"shard {shard} named in {INDEX_NAME} is missing")
            continue
        try:
            header = read_header(folder / shard)
        except ElasticError as error:
            check.problem(error.message)
            continue
        read_shards.add(shard)
        if header.metadata.get("format") != SHARD_METADATA["format"]:
            check.problem(f"{shard} has metadata format {header.metadata.get('format')!r}, expected 'pt'")
        for name, info in header.tensors.items():
            if name in tensors:
                check.problem(f"tensor '{name}' is in both {tensors[name].path.name} and {shard}")
                continue
            if weight_map is not None and weight_map.get(name) != shard:
                listed = weight_map.get(name)
                check.problem(f"{shard} contains tensor '{name}', but {INDEX_NAME} " + (f"names {listed}" if listed else "does not list it"))
            tensors[name] = info

    if weight_map is not None:
        for name, shard in sorted(weight_map.items()):
            if shard in read_shards and name not in tensors:
                check.problem(f"{INDEX_NAME} names tensor '{name}' in {shard}, which does not hold it")
        _check_total_size(folder, tensors, read_shards == set(shards), check)
    return dict(sorted(tensors.items(), key=lambda item: natural_key(item[0])))


def _read_weight_map(folder: Path, check: _Check) -> dict[str, str] | None:
    path = folder / INDEX_NAME
    if not path.exists():
        return None
    try:
        index = read_json(path, INDEX_NAME)
    except ElasticError as error:
        check.problem(error.message)
        return None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        check.problem(f"{INDEX_NAME} has no valid 'weight_map' object")
        return None
    for shard in sorted(set(weight_map.values())):
        if "/" in shard or "\\" in shard or not shard.endswith(".safetensors"):
            check.problem(f"{INDEX_NAME} names shard {shard!r}, which is not a .safetensors file in this folder")
            return None
    return weight_map


def _check_total_size(folder: Path, tensors: dict[str, TensorInfo], complete: bool, check: _Check) -> None:
    index = read_json(folder / INDEX_NAME, INDEX_NAME)
    metadata = index.get("metadata")
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    if not isinstance(total, int) or isinstance(total, bool):
        check.problem(f"{INDEX_NAME} has no integer metadata.total_size")
        return
    summed = sum(info.nbytes for info in tensors.values())
    if complete and total != summed:
        check.problem(f"{INDEX_NAME} metadata.total_size is {total}, but the tensors hold {summed} bytes")


def _check_config_and_tensors(folder: Path, tensors: dict[str, TensorInfo], check: _Check) -> dict[str, Any] | None:
    """Run the ``tensors`` check and return the parsed ``config.json`` when it is a JSON object."""
    try:
        config = read_json(folder / "config.json", "config.json")
    except ElasticError as error:
        check.problem(error.message)
        return None
    if not isinstance(config, dict):
        check.problem("config.json is not a JSON object")
        return None

    _check_transformers_config(config, check)
    try:
        arch = parse_config(config)
    except ElasticError as error:
        check.problem(f"config.json is not a valid NemotronH config: {error.message}")
        return config
    _check_shapes(arch, tensors, check)
    for name, info in tensors.items():
        _, role = export.split_quantized_name(name)
        if role == "weight" and info.dtype not in QUANTIZED_WEIGHT_DTYPES + HIGH_PRECISION_DTYPES:
            check.problem(f"tensor '{name}' has dtype {info.dtype}; NemotronH weights are floating point")
    return config


def _check_transformers_config(config: dict[str, Any], check: _Check) -> None:
    from transformers import NemotronHConfig  # imported here because importing transformers takes seconds

    try:
        NemotronHConfig(**config)
    except Exception as error:  # noqa: BLE001 - transformers raises KeyError, TypeError, ValueError and its own types
        check.problem(f"config.json does not load as transformers NemotronHConfig: {type(error).__name__}: {error}")


def _check_shapes(arch: NemotronHArch, tensors: dict[str, TensorInfo], check: _Check) -> None:
    # NOTE: check_tensors raises on the first unknown, misshapen or missing tensor, so this
    # check names one such tensor even when several are wrong.
    try:
        check_tensors(arch, tensors)
    except ElasticError as error:
        check.problem(error.message)


def _check_finite(artifact: Checkpoint, check: _Check) -> None:
    """Run the ``finite`` check, reading one tensor at a time."""
    checked = 0
    for name, info in artifact.tensors.items():
        try:
            if info.dtype == export.BLOCK_SCALE_DTYPE:
                raw = artifact.read(name).view(torch.uint8)
                nan = int(((raw == E4M3_NAN_BYTES[0]) | (raw == E4M3_NAN_BYTES[1])).sum())
                if nan:
                    check.problem(f"tensor '{name}' ({info.dtype}) contains {nan} NaN byte(s)")
                checked += 1
                continue
            if info.dtype not in HIGH_PRECISION_DTYPES + ("F8_E5M2",):
                continue
            tensor = artifact.read(name)
        except ElasticError as error:
            check.problem(error.message)
            continue
        checked += 1
        finite = torch.isfinite(tensor.float() if tensor.dtype == torch.float8_e5m2 else tensor)
        if not bool(finite.all()):
            nan = int(torch.isnan(tensor.float()).sum())
            inf = int(finite.numel() - int(finite.sum()) - nan)
            check.problem(f"tensor '{name}' ({info.dtype}) contains {nan} NaN and {inf} Inf value(s)")
    check.detail = f"no NaN or Inf in {checked} floating-point tensor(s)"


def _check_quantization(
    folder: Path, config: dict[str, Any] | None, tensors: dict[str, TensorInfo], index_failed: bool, check: _Check
) -> None:
    """Run the ``quantization`` check."""
    if (folder / export.QUANT_CONFIG_FILE).exists():
        if index_failed or config is None:
            check.skip("config.json or the shards cannot be read (see the index and tensors checks)")
            return
        for problem in validate_quantized(folder):
            check.problem(problem)
        return

    check.detail = f"not quantized: no quantized tensor, no quantization_config, no {export.QUANT_CONFIG_FILE}"
    if config is not None and "quantization_config" in config:
        check.problem(f"config.json has a quantization_config, but {export.QUANT_CONFIG_FILE} is missing")
    quantized = [name for name, info in tensors.items() if info.dtype in QUANTIZED_WEIGHT_DTYPES]
    if quantized:
        check.problem(
            f"{len(quantized)} tensor(s) are stored as {' or '.join(QUANTIZED_WEIGHT_DTYPES)}, such as '{quantized[0]}', "
            f"but {export.QUANT_CONFIG_FILE} is missing"
        )


def _sidecar_skip(kind: str | None) -> set[str]:
    """Return the parent's top-level files a child does not carry over byte for byte."""
    skip = REGENERATED | {export.QUANT_CONFIG_FILE, export.STATE_FILE, MANIFEST_FILE}
    if kind == "quantize":
        skip = skip - {MASKS_FILE}  # a quantized elastic checkpoint keeps its masks
    return skip


def _check_sidecars(folder: Path, source: ElasticSource, kind: str | None, check: _Check) -> None:
    """Run the ``sidecars`` check: the parent's carried-over files exist with identical bytes."""
    try:
        files = list_sidecars(source.checkpoint.root, source.origin.trust_root, _sidecar_skip(kind))
    except ElasticError as error:
        check.problem(f"cannot list the parent's files: {error.message}")
        return
    for path in files:
        copy = folder / path.name
        if not copy.is_file():
            check.problem(f"{path.name} of the parent is missing")
        elif file_digest(copy) != file_digest(path):
            check.problem(f"{path.name} differs from the parent's")


def _check_parent(
    folder: Path,
    source: ElasticSource,
    artifact: Checkpoint,
    config: dict[str, Any] | None,
    manifest: dict[str, Any] | None,
    check: _Check,
) -> None:
    """Run the ``parent`` check for a slice or a quantized folder."""
    kind = manifest.get("kind") if manifest else None
    if kind == "slice":
        _compare_slice(source, artifact, config, manifest or {}, check)
    elif kind == "quantize":
        _compare_quantized(folder, source, artifact, config, check)
    elif manifest is None:
        check.skip(f"{MANIFEST_FILE} is unusable, so it is unknown whether the folder is a slice or a quantization")
    else:
        check.problem(f"{MANIFEST_FILE} has kind {kind!r}, expected 'slice' or 'quantize'")


def _compare_slice(
    source: ElasticSource, artifact: Checkpoint, config: dict[str, Any] | None, manifest: dict[str, Any], check: _Check
) -> None:
    budget = manifest.get("budget")
    options = manifest.get("options") if isinstance(manifest.get("options"), dict) else {}
    budgets_from = options.get("budgets_from", MASKS_FILE)
    if not isinstance(budget, str):
        check.problem(f"{MANIFEST_FILE} records no budget for this slice")
        return
    if budgets_from != MASKS_FILE:
        # NOTE: the budget spec is not stored in the artifact, so a slice planned from one
        # cannot be compared with its parent.
        check.skip(f"the slice was planned from the budget spec {budgets_from}, not from the parent's {MASKS_FILE}")
        return
    try:
        plan = plan_budgets(source, [budget])[0]
    except ElasticError as error:
        check.problem(f"cannot plan budget '{budget}' from the parent: {error.message}")
        return

    expected_config = dict(plan.config)
    parent_quant = _optional_json(source.checkpoint.root / export.QUANT_CONFIG_FILE, check)
    parent_state = _optional_json(source.checkpoint.root / export.STATE_FILE, check)
    try:
        if parent_quant is not None:
            child_quant = export.rename_quant_config(parent_quant, plan.module_map)
            expected_config["quantization_config"] = export.quantization_config(child_quant)
            _compare_json(artifact.root, export.QUANT_CONFIG_FILE, child_quant, check)
        if parent_state is not None:
            _compare_json(artifact.root, export.STATE_FILE, export.rename_state(parent_state, plan.module_map), check)
    except (KeyError, TypeError, AttributeError) as error:
        check.problem(f"the parent's quantization files are malformed ({type(error).__name__}: {error})")
    if config is not None:
        _compare_config(config, expected_config, "the planned config", check)

    log.info("comparing %d tensor(s) with the parent's cut for budget %s", len(plan.tensors), budget)
    _compare_names(artifact, {t.target: (t.dtype, t.target_shape) for t in plan.tensors}, check)
    cutter = TensorCutter()
    parent = source.checkpoint
    for tensor in plan.tensors:
        if not _same_layout(artifact, tensor.target, tensor.dtype, tensor.target_shape, check):
            continue
        try:
            if tensor.is_copy:
                expected: bytearray | memoryview = parent.read_bytes(tensor.source)
            else:
                expected = tensor_bytes(cutter.cut(parent.read(tensor.source), tensor.keep, tensor.pad_value))
            same = artifact.read_bytes(tensor.target) == expected
        except ElasticError as error:
            check.problem(error.message)
            continue
        if not same:
            check.problem(f"tensor '{tensor.target}' differs from the parent's cut of '{tensor.source}'")
    check.detail = f"{len(plan.tensors)} tensor(s) and config.json equal the parent's cut for budget '{budget}'"


def _compare_quantized(
    folder: Path, source: ElasticSource, artifact: Checkpoint, config: dict[str, Any] | None, check: _Check
) -> None:
    try:
        state = load_state(folder / export.STATE_FILE)
    except ElasticError as error:
        check.problem(error.message)
        return
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        check.problem(f"{export.STATE_FILE} is malformed ({type(error).__name__}: {error})")
        return
    document = _optional_json(folder / export.QUANT_CONFIG_FILE, check)
    if document is None:
        check.problem(f"{export.QUANT_CONFIG_FILE} is missing, so the quantization cannot be compared")
        return
    quantization = document.get("quantization")
    kv_cache = isinstance(quantization, dict) and quantization.get("kv_cache_quant_algo") == "FP8"
    if config is not None:
        try:
            expected_config = {**source.checkpoint.config, "quantization_config": export.quantization_config(document)}
        except (KeyError, TypeError, AttributeError) as error:
            check.problem(f"{export.QUANT_CONFIG_FILE} is malformed ({type(error).__name__}: {error})")
        else:
            _compare_config(config, expected_config, "the parent's config plus its quantization_config", check)

    parent = source.checkpoint
    parent_modules = {name[: -len(".weight")] for name in parent.tensors if name.endswith(".weight")}
    for module in sorted(set(state.modules) - parent_modules):
        check.problem(f"{export.STATE_FILE} names module {module}, which the parent lacks")
    layout = {}
    for name, info in parent.tensors.items():
        layout.update({target: (dtype, shape) for target, dtype, shape in _quantized_entries(name, info, state, kv_cache)})
    _compare_names(artifact, layout, check)

    log.info("re-quantizing %d module(s) of the parent with the stored scales", len(state.modules))
    for name in parent.tensors:
        try:
            expected = _quantized_tensors(parent, name, state, kv_cache)
        except (ElasticError, FormatError) as error:
            check.problem(f"cannot re-create what parent tensor '{name}' becomes: {error}")
            continue
        for target, data in expected.items():
            if not _same_layout(artifact, target, *layout[target], check):
                continue
            try:
                same = artifact.read_bytes(target) == data
            except ElasticError as error:
                check.problem(error.message)
                continue
            if not same and target == name and layout[target][0] == parent.tensors[name].dtype:
                check.problem(f"tensor '{target}' differs from the parent's")
            elif not same:
                check.problem(f"tensor '{target}' differs from the parent's '{name}' quantized with the stored scales")
    check.detail = f"{len(layout)} tensor(s) and config.json equal the parent's, re-quantized with the stored scales"


def _quantized_entries(
    name: str, info: TensorInfo, state: QuantizerState, kv_cache: bool
) -> list[tuple[str, str, tuple[int, ...]]]:
    """List ``(name, dtype, shape)`` of what one parent tensor becomes in a quantized artifact."""
    module = name[: -len(".weight")] if name.endswith(".weight") else None
    scales = state.modules.get(module) if module is not None else None
    if scales is None:
        entries = [(name, info.dtype, info.shape)]
    else:
        # output_entries reads only the module name, shape and format of a decision.
        decision = ModuleDecision(module, None, "", scales.format, "", info.shape, None)
        entries = export.output_entries(decision, info.dtype)
    kv = export.kv_scale_entry(name) if kv_cache else None
    if kv is not None:
        entries.append(kv)
    return entries


def _quantized_tensors(
    parent: Checkpoint, name: str, state: QuantizerState, kv_cache: bool
) -> dict[str, bytearray | memoryview]:
    """Re-create the bytes of what one parent tensor becomes, keyed by tensor name.

    Raises:
        CheckpointError: If the state lacks a KV-cache amax the artifact needs.
        FormatError: If the weight cannot be quantized (NaN or Inf values).
    """
    info = parent.tensors[name]
    entries = _quantized_entries(name, info, state, kv_cache)
    module = name[: -len(".weight")]
    if module in state.modules and name.endswith(".weight"):
        outputs = export.quantize_module(parent.read(name), state.modules[module])
        result = {target: tensor_bytes(tensor) for (target, _, _), tensor in zip(entries, outputs)}
    else:
        result = {name: parent.read_bytes(name)}
    kv = export.kv_scale_entry(name) if kv_cache else None
    if kv is not None:
        prefix = name.rsplit(".", 2)[0]
        amax = state.kv_amax.get(prefix)
        if amax is None:
            raise CheckpointError(f"{export.STATE_FILE} has no KV-cache amax for {prefix}", "quantize the parent again")
        result[kv[0]] = tensor_bytes(export.kv_scale(amax[0] if name.endswith("k_proj.weight") else amax[1]))
    return result


def _compare_names(artifact: Checkpoint, expected: dict[str, tuple[str, tuple[int, ...]]], check: _Check) -> None:
    for name in sorted(set(expected) - set(artifact.tensors), key=natural_key):
        check.problem(f"tensor '{name}' is missing")
    for name in sorted(set(artifact.tensors) - set(expected), key=natural_key):
        check.problem(f"tensor '{name}' is not derived from any tensor of the parent")


def _same_layout(artifact: Checkpoint, name: str, dtype: str, shape: tuple[int, ...], check: _Check) -> bool:
    """Return True when the artifact contains ``name`` with this dtype and shape, and report a mismatch."""
    info = artifact.tensors.get(name)
    if info is None:
        return False  # _compare_names reported it
    if (info.dtype, tuple(info.shape)) != (dtype, tuple(shape)):
        check.problem(f"tensor '{name}' is {info.dtype}{list(info.shape)}, expected {dtype}{list(shape)}")
        return False
    return True


def _compare_config(config: dict[str, Any], expected: dict[str, Any], reference: str, check: _Check) -> None:
    keys = sorted(key for key in set(config) | set(expected) if config.get(key, _MISSING) != expected.get(key, _MISSING))
    if keys:
        check.problem(f"config.json differs from {reference} in {', '.join(keys)}")


def _compare_json(folder: Path, name: str, expected: dict[str, Any], check: _Check) -> None:
    try:
        document = read_json(folder / name, name)
    except ElasticError as error:
        check.problem(error.message)
        return
    if document != expected:
        check.problem(f"{name} differs from the one the parent's {name} gives for this budget")


def _optional_json(path: Path, check: _Check) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        document = read_json(path, path.name)
    except ElasticError as error:
        check.problem(error.message)
        return None
    if not isinstance(document, dict):
        check.problem(f"{path.name} is not a JSON object")
        return None
    return document


_MISSING = object()
