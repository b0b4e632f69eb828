"""Open an elastic checkpoint: resolve it, read headers, config and budgets, validate them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from elastic_cli.arch.nemotron_h import NemotronHArch, parse_config
from elastic_cli.checkpoint.reader import Checkpoint
from elastic_cli.elastic.masks import MASKS_FILE, Budget, MaskProblem, load_budgets
from elastic_cli.elastic.validate import validate_budgets
from elastic_cli.errors import MaskError, UnsupportedError
from elastic_cli.hub import ResolvedCheckpoint, resolve_checkpoint

QUANT_CONFIG_FILE = "hf_quant_config.json"


@dataclass
class ElasticSource:
    """A parent checkpoint opened lazily, with its architecture and budgets.

    Attributes:
        origin: Where the checkpoint came from (repo id or folder name, revision).
        checkpoint: The lazy reader.
        arch: The parsed architecture.
        budgets: Budgets, largest first.
        budgets_from: ``elastic_config.json`` or the budget-spec path.
        problems: Validation problems of the hierarchy (empty when sound).
    """

    origin: ResolvedCheckpoint
    checkpoint: Checkpoint
    arch: NemotronHArch
    budgets: list[Budget]
    budgets_from: str
    problems: list[MaskProblem]

    @property
    def inspect_target(self) -> str:
        """Return the arguments of ``elastic inspect`` that show this checkpoint's budgets."""
        target = str(self.origin.path) if self.origin.revision is None else self.origin.name
        if Path(self.budgets_from).is_file():
            target += f" --budget-spec {self.budgets_from}"
        return target

    def budget(self, name: str) -> Budget:
        """Return a budget by name.

        Raises:
            MaskError: Listing the available budgets when the name is unknown.
        """
        for budget in self.budgets:
            if budget.name == name:
                return budget
        offered = ", ".join(budget.name for budget in self.budgets)
        raise MaskError(
            f"budget '{name}' not found; this checkpoint offers {offered}",
            f"see `elastic inspect {self.inspect_target}`",
        )

    def select(self, names: list[str]) -> list[Budget]:
        """Resolve ``--budget`` values (names or ``all``) to budgets, largest first, no repeats."""
        if not names or "all" in names:
            return list(self.budgets)
        wanted = {self.budget(name).name for name in names}
        return [budget for budget in self.budgets if budget.name in wanted]

    def quantization(self) -> str | None:
        """Describe the checkpoint's quantization, or return ``None`` for a high-precision one."""
        if (self.checkpoint.root / QUANT_CONFIG_FILE).exists():
            return QUANT_CONFIG_FILE
        if "quantization_config" in self.checkpoint.config:
            return "config.json quantization_config"
        for name, info in self.checkpoint.tensors.items():
            if info.dtype.startswith("F8") or name.endswith(("weight_scale", "weight_scale_2", "input_scale")):
                return f"tensor '{name}' ({info.dtype})"
        return None

    def close(self) -> None:
        self.checkpoint.close()


def open_source(
    spec: str, revision: str | None = None, budget_spec: Path | None = None, require_budgets: bool = True
) -> ElasticSource:
    """Open a checkpoint and its budgets from headers alone.

    Args:
        spec: A local folder or a Hugging Face repo id.
        revision: Hub revision (branch, tag or commit).
        budget_spec: A budget spec file to use instead of stored masks.
        require_budgets: Fail when the checkpoint defines no budgets; otherwise open it with
            an empty budget list (a plain or already sliced checkpoint).

    Raises:
        CheckpointError: If the checkpoint cannot be read.
        MaskError: If it defines no budgets or they cannot be parsed.
    """
    origin = resolve_checkpoint(spec, revision)
    checkpoint = Checkpoint.open(origin.path, trust_root=origin.trust_root)
    try:
        arch = parse_config(checkpoint.config)
        if budget_spec is None and not require_budgets and not (checkpoint.root / MASKS_FILE).exists():
            budgets, budgets_from = [], "none"
        else:
            budgets, budgets_from = load_budgets(checkpoint.root, arch, budget_spec)
    except Exception:
        checkpoint.close()
        raise
    problems = validate_budgets(arch, budgets)
    return ElasticSource(origin, checkpoint, arch, budgets, budgets_from, problems)


def reject_quantized(source: ElasticSource) -> None:
    """Raise :class:`UnsupportedError` when the checkpoint is already quantized."""
    marker = source.quantization()
    if marker is not None:
        raise UnsupportedError(
            f"{source.origin.name} is already quantized ({marker})",
            "quantize the high-precision checkpoint instead",
        )
