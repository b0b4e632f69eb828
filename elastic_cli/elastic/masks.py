"""Budgets and their stored router masks: the elastic checkpoint format.

An elastic checkpoint is a normal NemotronH checkpoint plus ``elastic_config.json`` beside the
shards (never inside them, so transformers and vLLM see no unexpected keys). The file lists the
budgets from largest to smallest and, per budget, boolean keep-vectors written as strings of
``0``/``1`` characters: global axes (``hidden``, ``layers``) and per-layer axes keyed by the
parent's layer index. An absent axis keeps everything. ``docs/elastic-format.md`` is the full
specification.

A budget spec (``--budget-spec FILE``) gives keep counts instead of masks, for checkpoints that
carry none; each count keeps a prefix of the stored order.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastic_cli.arch.nemotron_h import LayerKind, NemotronHArch
from elastic_cli.checkpoint.reader import read_json
from elastic_cli.errors import CheckpointError, MaskError

MASKS_FILE = "elastic_config.json"
FORMAT_NAME = "elastic-nemotron-h"
FORMAT_VERSION = 1
BUDGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# The keys each level may contain. Any other key is an error, so a misspelt key is reported
# instead of being read as an absent mask that keeps everything.
MASKS_DOCUMENT_KEYS = frozenset({"format", "format_version", "budgets"})
SPEC_DOCUMENT_KEYS = frozenset({"budgets"})
BUDGET_HEADER_KEYS = frozenset({"name", "target_params", "partial"})
# Budget-level label of a problem that concerns the whole file rather than one budget.
WHOLE_FILE = "-"
NOT_A_BUDGET_LIST = "the file must be an object with a non-empty 'budgets' list"


class Axis(str, enum.Enum):
    """An elastic axis: a family of components a budget can drop."""

    HIDDEN = "hidden"
    LAYERS = "layers"
    MAMBA_HEADS = "mamba_heads"
    MAMBA_HEAD_CHANNELS = "mamba_head_channels"
    ATTENTION_HEADS = "attention_heads"
    FFN_CHANNELS = "ffn_channels"
    EXPERTS = "experts"
    EXPERT_CHANNELS = "expert_channels"
    SHARED_EXPERT_CHANNELS = "shared_expert_channels"


GLOBAL_AXES = (Axis.HIDDEN, Axis.LAYERS)
LAYER_AXES: dict[LayerKind, tuple[Axis, ...]] = {
    LayerKind.MAMBA: (Axis.MAMBA_HEADS, Axis.MAMBA_HEAD_CHANNELS),
    LayerKind.ATTENTION: (Axis.ATTENTION_HEADS,),
    LayerKind.MLP: (Axis.FFN_CHANNELS,),
    LayerKind.MOE: (Axis.EXPERTS, Axis.EXPERT_CHANNELS, Axis.SHARED_EXPERT_CHANNELS),
}


def axis_length(arch: NemotronHArch, axis: Axis) -> int:
    """Return the number of components along an axis in the parent."""
    return {
        Axis.HIDDEN: arch.hidden_size,
        Axis.LAYERS: arch.num_layers,
        Axis.MAMBA_HEADS: arch.mamba_num_heads,
        Axis.MAMBA_HEAD_CHANNELS: arch.mamba_head_dim,
        Axis.ATTENTION_HEADS: arch.num_attention_heads,
        Axis.FFN_CHANNELS: arch.intermediate_size,
        Axis.EXPERTS: arch.n_routed_experts,
        Axis.EXPERT_CHANNELS: arch.moe_intermediate_size,
        Axis.SHARED_EXPERT_CHANNELS: arch.shared_expert_intermediate_size,
    }[axis]


Mask = tuple[bool, ...]


@dataclass(frozen=True)
class Budget:
    """One nested submodel: its name and a keep-mask for every axis.

    Attributes:
        name: Budget name such as ``12B``.
        target_params: Parameter target the budget was trained for, if the checkpoint states one.
        partial: True when a largest budget deliberately drops components.
        hidden: Keep-mask over embedding channels.
        layers: Keep-mask over layers.
        layer_masks: Per parent layer, the keep-mask of each axis of that layer's kind.
    """

    name: str
    target_params: int | None
    partial: bool
    hidden: Mask
    layers: Mask
    layer_masks: tuple[tuple[tuple[Axis, Mask], ...], ...]

    def mask(self, axis: Axis, layer: int | None = None) -> Mask:
        """Return the mask of a global axis, or of a per-layer axis of one layer."""
        if axis is Axis.HIDDEN:
            return self.hidden
        if axis is Axis.LAYERS:
            return self.layers
        assert layer is not None
        return dict(self.layer_masks[layer])[axis]

    def masks(self) -> list[tuple[int | None, Axis, Mask]]:
        """List every mask as ``(layer or None, axis, mask)``."""
        items: list[tuple[int | None, Axis, Mask]] = [(None, Axis.HIDDEN, self.hidden), (None, Axis.LAYERS, self.layers)]
        for layer, axes in enumerate(self.layer_masks):
            items.extend((layer, axis, mask) for axis, mask in axes)
        return items


@dataclass(frozen=True)
class MaskProblem:
    """One problem found in a budget's masks, located by budget, layer and axis."""

    budget: str
    layer: int | None
    axis: str | None
    message: str

    def __str__(self) -> str:
        where = [] if self.budget == WHOLE_FILE else [f"budget '{self.budget}'"]
        if self.layer is not None:
            where.append(f"layer {self.layer}")
        if self.axis is not None:
            where.append(f"axis '{self.axis}'")
        if not where:
            return self.message
        return f"{', '.join(where)}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"budget": self.budget, "layer": self.layer, "axis": self.axis, "message": self.message}


class MaskFormatError(MaskError):
    """Masks that cannot be parsed; carries every problem found."""

    def __init__(self, problems: list[MaskProblem], source: str) -> None:
        first = problems[0]
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        super().__init__(f"{source}: {first}{more}", f"fix {source}; `elastic inspect` lists every problem")
        self.problems = problems


def _full(length: int) -> Mask:
    return (True,) * length


def _decode_mask(value: Any, length: int, where: tuple[str, int | None, str], problems: list[MaskProblem]) -> Mask:
    budget, layer, axis = where
    if not isinstance(value, str) or any(char not in "01" for char in value):
        problems.append(MaskProblem(budget, layer, axis, "mask must be a string of '0' and '1' characters"))
        return _full(length)
    if len(value) != length:
        problems.append(MaskProblem(budget, layer, axis, f"mask has length {len(value)}, expected {length}"))
        return _full(length)
    return tuple(char == "1" for char in value)


def encode_mask(mask: Mask) -> str:
    """Write a keep-mask as a string of ``0``/``1`` characters."""
    return "".join("1" if keep else "0" for keep in mask)


def _check_budget_list(document: Any, allowed: frozenset[str], source: str) -> None:
    """Raise :class:`MaskFormatError` unless ``document`` has a non-empty ``budgets`` list.

    Unknown top-level keys are reported first, so that a misspelt ``budgets`` is named.
    """
    if isinstance(document, dict) and isinstance(document.get("budgets"), list) and document["budgets"]:
        return
    problems: list[MaskProblem] = []
    if isinstance(document, dict):
        _unknown_keys(document, allowed, (WHOLE_FILE, None), problems)
    raise MaskFormatError([*problems, MaskProblem(WHOLE_FILE, None, None, NOT_A_BUDGET_LIST)], source)


def _wrong_layer_axis(key: str, kind: Any, allowed: list[str]) -> str:
    """Describe a per-layer axis key that the layer does not take: unknown, or of another layer kind."""
    if key in {axis.value for axis in Axis}:
        return f"axis does not apply to a {kind.value} layer; expected one of {allowed}"
    return f"unknown axis {key!r}; a {kind.value} layer takes {allowed}"


def _unknown_keys(
    mapping: dict, allowed: frozenset[str], where: tuple[str, int | None], problems: list[MaskProblem]
) -> None:
    """Report every key of ``mapping`` that is not in ``allowed``."""
    budget, layer = where
    for key in mapping:
        if key not in allowed:
            problems.append(MaskProblem(budget, layer, None, f"unknown key {key!r}; expected one of {sorted(allowed)}"))


def _budget_header(
    entry: Any, position: int, body_key: str, problems: list[MaskProblem], seen: set[str]
) -> tuple[str, int | None, bool] | None:
    if not isinstance(entry, dict):
        problems.append(MaskProblem(f"#{position}", None, None, "budget entry must be an object"))
        return None
    name = entry.get("name")
    valid_name = isinstance(name, str) and BUDGET_NAME.match(name) is not None
    _unknown_keys(entry, BUDGET_HEADER_KEYS | {body_key}, (name if valid_name else f"#{position}", None), problems)
    if not valid_name:
        problems.append(
            MaskProblem(f"#{position}", None, None, f"budget name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        )
        return None
    if name in seen:
        problems.append(MaskProblem(name, None, None, "budget name appears twice"))
        return None
    seen.add(name)
    target = entry.get("target_params")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int) or target <= 0):
        problems.append(MaskProblem(name, None, None, f"target_params {target!r} must be a positive integer"))
        target = None
    partial = entry.get("partial", False)
    if not isinstance(partial, bool):
        problems.append(MaskProblem(name, None, None, f"partial {partial!r} must be true or false"))
        partial = False
    return name, target, partial


def parse_masks(document: Any, arch: NemotronHArch, source: str = MASKS_FILE) -> list[Budget]:
    """Parse an ``elastic_config.json`` document into budgets, largest first.

    Raises:
        MaskFormatError: With every problem found (wrong types or lengths, unknown keys, axes or
            layers, a budget without ``masks``).
    """
    problems: list[MaskProblem] = []
    _check_budget_list(document, MASKS_DOCUMENT_KEYS, source)
    version = document.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        message = f"format_version {version!r} is not supported (this elastic reads {FORMAT_VERSION})"
        raise MaskFormatError([MaskProblem(WHOLE_FILE, None, None, message)], source)

    _unknown_keys(document, MASKS_DOCUMENT_KEYS, (WHOLE_FILE, None), problems)
    return _parse_budgets(document, source, "masks", "an object of axis masks", problems, _parse_budget_masks, arch)


def _parse_budgets(document: dict, source: str, key: str, what: str, problems: list[MaskProblem], build, arch) -> list[Budget]:
    """Parse every budget entry with ``build`` on its ``key`` object; raise with all problems at the end.

    The ``key`` object is required, so a misspelt key cannot turn a budget into a copy of the
    parent. An empty object is valid and keeps everything.
    """
    budgets = []
    seen: set[str] = set()
    for position, entry in enumerate(document["budgets"]):
        header = _budget_header(entry, position, key, problems, seen)
        if header is None:
            continue
        name, target, partial = header
        if key not in entry:
            message = f"missing key '{key}'; write \"{key}\": {{}} for a budget that keeps everything"
            problems.append(MaskProblem(name, None, None, message))
            continue
        body = entry[key]
        if not isinstance(body, dict):
            problems.append(MaskProblem(name, None, None, f"'{key}' must be {what}"))
            continue
        budgets.append(build(arch, name, target, partial, body, problems))

    if problems:
        raise MaskFormatError(problems, source)
    return budgets


def _parse_budget_masks(
    arch: NemotronHArch, name: str, target: int | None, partial: bool, masks: dict[str, Any], problems: list[MaskProblem]
) -> Budget:
    known = {axis.value for axis in GLOBAL_AXES} | {"per_layer"}
    for key in masks:
        if key not in known:
            problems.append(MaskProblem(name, None, key, f"unknown global axis; expected one of {sorted(known)}"))
    hidden = _full(arch.hidden_size)
    layers = _full(arch.num_layers)
    if "hidden" in masks:
        hidden = _decode_mask(masks["hidden"], arch.hidden_size, (name, None, "hidden"), problems)
    if "layers" in masks:
        layers = _decode_mask(masks["layers"], arch.num_layers, (name, None, "layers"), problems)

    per_layer = masks.get("per_layer", {})
    if not isinstance(per_layer, dict):
        problems.append(MaskProblem(name, None, "per_layer", "'per_layer' must be an object keyed by layer index"))
        per_layer = {}
    layer_masks: list[dict[Axis, Mask]] = [
        {axis: _full(axis_length(arch, axis)) for axis in LAYER_AXES[kind]} for kind in arch.layer_kinds
    ]
    for key, axes in per_layer.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 10 and int(key) < arch.num_layers):
            problems.append(MaskProblem(name, None, "per_layer", f"layer key {key!r} is not a layer index below {arch.num_layers}"))
            continue
        layer = int(key)
        kind = arch.layer_kinds[layer]
        if not isinstance(axes, dict):
            problems.append(MaskProblem(name, layer, None, "per-layer entry must be an object of axis masks"))
            continue
        allowed = {axis.value: axis for axis in LAYER_AXES[kind]}
        for axis_name, value in axes.items():
            axis = allowed.get(axis_name)
            if axis is None:
                problems.append(MaskProblem(name, layer, axis_name, _wrong_layer_axis(axis_name, kind, sorted(allowed))))
                continue
            layer_masks[layer][axis] = _decode_mask(value, axis_length(arch, axis), (name, layer, axis_name), problems)

    return Budget(
        name=name,
        target_params=target,
        partial=partial,
        hidden=hidden,
        layers=layers,
        layer_masks=tuple(tuple(entry.items()) for entry in layer_masks),
    )


def budgets_to_document(budgets: list[Budget], arch: NemotronHArch) -> dict[str, Any]:
    """Write budgets as an ``elastic_config.json`` document, omitting masks that keep everything."""
    entries = []
    for budget in budgets:
        masks: dict[str, Any] = {}
        if not all(budget.hidden):
            masks["hidden"] = encode_mask(budget.hidden)
        if not all(budget.layers):
            masks["layers"] = encode_mask(budget.layers)
        per_layer: dict[str, dict[str, str]] = {}
        for layer, axes in enumerate(budget.layer_masks):
            kept = {axis.value: encode_mask(mask) for axis, mask in axes if not all(mask)}
            if kept:
                per_layer[str(layer)] = kept
        if per_layer:
            masks["per_layer"] = per_layer
        entry: dict[str, Any] = {"name": budget.name}
        if budget.target_params is not None:
            entry["target_params"] = budget.target_params
        if budget.partial:
            entry["partial"] = True
        entry["masks"] = masks
        entries.append(entry)
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "budgets": entries}


def _count(value: Any, length: int, where: tuple[str, int | None, str], problems: list[MaskProblem]) -> Mask:
    budget, layer, axis = where
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= length:
        problems.append(MaskProblem(budget, layer, axis, f"keep count {value!r} must be an integer from 0 to {length}"))
        return _full(length)
    return (True,) * value + (False,) * (length - value)


def _spec_groups(arch: NemotronHArch, axis: Axis) -> int:
    """Return how many equal groups a budget-spec count of this axis is split across."""
    if axis is Axis.MAMBA_HEADS:
        return arch.n_groups
    if axis is Axis.ATTENTION_HEADS:
        return arch.num_key_value_heads
    if axis is Axis.EXPERTS:
        return arch.n_group
    return 1


def _grouped_count(value: Any, length: int, groups: int, where: tuple[str, int | None, str], problems: list[MaskProblem]) -> Mask:
    """Keep ``value / groups`` leading entries of each of ``groups`` equal groups."""
    budget, layer, axis = where
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= length or value % groups:
        problems.append(
            MaskProblem(budget, layer, axis, f"keep count {value!r} must be an integer from 0 to {length} divisible by {groups} groups")
        )
        return _full(length)
    size, per_group = length // groups, value // groups
    return ((True,) * per_group + (False,) * (size - per_group)) * groups


def parse_budget_spec(document: Any, arch: NemotronHArch, source: str) -> list[Budget]:
    """Turn a budget spec (keep counts per axis, optionally per layer) into prefix masks.

    The spec is ``{"budgets": [{"name", "target_params"?, "partial"?, "keep": {axis: count, ...,
    "per_layer": {"3": {axis: count}}}}]}``. A global count of a per-layer axis applies to every
    layer of the matching kind; per-layer counts override it. Any other key, or a budget without
    ``keep``, is an error.

    Raises:
        MaskFormatError: With every problem found.
    """
    problems: list[MaskProblem] = []
    _check_budget_list(document, SPEC_DOCUMENT_KEYS, source)

    _unknown_keys(document, SPEC_DOCUMENT_KEYS, (WHOLE_FILE, None), problems)
    return _parse_budgets(document, source, "keep", "an object of axis counts", problems, _spec_budget, arch)


def _spec_budget(
    arch: NemotronHArch, name: str, target: int | None, partial: bool, keep: dict[str, Any], problems: list[MaskProblem]
) -> Budget:
    known = {axis.value for axis in Axis} | {"per_layer"}
    for key in keep:
        if key not in known:
            problems.append(MaskProblem(name, None, key, f"unknown axis; expected one of {sorted(known)}"))
    hidden = _full(arch.hidden_size)
    layers = _full(arch.num_layers)
    if "hidden" in keep:
        hidden = _count(keep["hidden"], arch.hidden_size, (name, None, "hidden"), problems)
    if "layers" in keep:
        layers = _count(keep["layers"], arch.num_layers, (name, None, "layers"), problems)

    per_layer = keep.get("per_layer", {})
    if not isinstance(per_layer, dict):
        problems.append(MaskProblem(name, None, "per_layer", "'per_layer' must be an object keyed by layer index"))
        per_layer = {}
    layer_masks = []
    for layer, kind in enumerate(arch.layer_kinds):
        override = per_layer.get(str(layer), {})
        if not isinstance(override, dict):
            problems.append(MaskProblem(name, layer, None, "per-layer entry must be an object of axis counts"))
            override = {}
        allowed = sorted(axis.value for axis in LAYER_AXES[kind])
        for key in override:
            if key not in allowed:
                problems.append(MaskProblem(name, layer, key, _wrong_layer_axis(key, kind, allowed)))
        masks = []
        for axis in LAYER_AXES[kind]:
            length = axis_length(arch, axis)
            value = override.get(axis.value, keep.get(axis.value))
            groups = _spec_groups(arch, axis)
            if value is None:
                mask = _full(length)
            elif groups > 1:
                mask = _grouped_count(value, length, groups, (name, layer, axis.value), problems)
            else:
                mask = _count(value, length, (name, layer, axis.value), problems)
            masks.append((axis, mask))
        layer_masks.append(tuple(masks))
    for key in per_layer:
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 10 and int(key) < arch.num_layers):
            problems.append(MaskProblem(name, None, "per_layer", f"layer key {key!r} is not a layer index below {arch.num_layers}"))
    return Budget(name, target, partial, hidden, layers, tuple(layer_masks))


def load_budgets(root: Path, arch: NemotronHArch, spec_path: Path | None = None) -> tuple[list[Budget], str]:
    """Load the budgets of a checkpoint from its stored masks or from a budget spec.

    Returns:
        The budgets (largest first, as listed) and where they came from.

    Raises:
        MaskError: If neither masks nor a spec exist, or they cannot be parsed.
    """
    if spec_path is not None:
        try:
            document = read_json(spec_path, "budget spec")
        except CheckpointError as error:
            raise MaskError(error.message, "pass an existing JSON file to --budget-spec") from error
        return parse_budget_spec(document, arch, str(spec_path)), str(spec_path)
    path = root / MASKS_FILE
    if not path.exists():
        raise MaskError(
            f"{root} has no {MASKS_FILE}, so it defines no budgets",
            "pass --budget-spec FILE with keep counts per axis (see docs/elastic-format.md)",
        )
    return parse_masks(read_json(path, MASKS_FILE), arch, MASKS_FILE), MASKS_FILE
