"""Which modules are quantized, to which format: recipes read from the layer pattern.

A module is a Linear layer of the checkpoint, named as on disk without ``.weight``
(``backbone.layers.3.mixer.in_proj``). Its kind comes from the layer pattern and the tensor
template, never from guessing at substrings. Routers, ``conv1d``, embeddings, norms,
``A_log``, ``D`` and ``dt_bias`` are never quantized, and neither is ``lm_head``.

Recipes:

``nvidia`` (default)
    NVIDIA's released Nemotron 3 Nano layout: every Linear in the chosen format except the
    attention projections (q/k/v/o) and the ``in_proj``/``out_proj`` of the Mamba layer just
    before each attention layer.
``all-linears``
    Every Linear of every layer.
``experts``
    Routed experts only.
``mixed``
    Routed experts in NVFP4, Mamba ``in_proj``/``out_proj`` in FP8, everything else in BF16
    (ModelOpt's ``MIXED_PRECISION``). Needs ``--format nvfp4``.
"""

from __future__ import annotations

import enum
import fnmatch
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from elastic_cli.arch.nemotron_h import LayerKind, NemotronHArch, parse_tensor_name
from elastic_cli.checkpoint.safetensors_io import DTYPE_SIZES, TensorInfo
from elastic_cli.errors import UsageError
from elastic_cli.formats.constants import NVFP4_BLOCK_SIZE

FORMATS = ("fp8", "nvfp4")
RECIPES = ("nvidia", "all-linears", "experts", "mixed")


class ModuleKind(str, enum.Enum):
    """The role of a Linear module in NemotronH."""

    MAMBA_IN = "mamba_in_proj"
    MAMBA_OUT = "mamba_out_proj"
    ATTENTION_QKV = "attention_qkv"
    ATTENTION_OUT = "attention_o_proj"
    MLP = "mlp"
    ROUTED_EXPERT = "routed_expert"
    SHARED_EXPERT = "shared_expert"


# Linear templates (without ``.weight``) per layer kind and their module kind.
LINEAR_TEMPLATES: dict[LayerKind, dict[str, ModuleKind]] = {
    LayerKind.MAMBA: {"in_proj": ModuleKind.MAMBA_IN, "out_proj": ModuleKind.MAMBA_OUT},
    LayerKind.ATTENTION: {
        "q_proj": ModuleKind.ATTENTION_QKV,
        "k_proj": ModuleKind.ATTENTION_QKV,
        "v_proj": ModuleKind.ATTENTION_QKV,
        "o_proj": ModuleKind.ATTENTION_OUT,
    },
    LayerKind.MLP: {"up_proj": ModuleKind.MLP, "down_proj": ModuleKind.MLP},
    LayerKind.MOE: {
        "experts.{e}.up_proj": ModuleKind.ROUTED_EXPERT,
        "experts.{e}.down_proj": ModuleKind.ROUTED_EXPERT,
        "shared_experts.up_proj": ModuleKind.SHARED_EXPERT,
        "shared_experts.down_proj": ModuleKind.SHARED_EXPERT,
    },
}
# Modules that exist but are never quantized; they go into the exclude list so that loaders
# that would otherwise quantize every Linear-like module leave them alone.
KEPT_MODULES: dict[LayerKind, tuple[str, ...]] = {
    LayerKind.MAMBA: ("conv1d",),
    LayerKind.MOE: ("gate",),
}


@dataclass(frozen=True)
class ModuleDecision:
    """The format chosen for one module, and why."""

    module: str
    layer: int | None
    kind: str
    format: str | None  # "nvfp4", "fp8" or None (kept in its stored dtype)
    reason: str
    shape: tuple[int, ...]
    fused_group: str | None  # modules an engine fuses share their scalar scales


@dataclass(frozen=True)
class QuantPlan:
    """Every module's decision, the exclude list and the on-disk algorithm names.

    Attributes:
        format: The requested ``--format``.
        recipe: The recipe name.
        quant_algo: ``NVFP4``, ``FP8`` or ``MIXED_PRECISION``.
        kv_cache_quant_algo: ``FP8`` or ``None``.
        decisions: One per Linear module, in natural order.
        exclude_modules: Exact names of modules left unquantized (Linear, ``conv1d``, routers,
            ``lm_head``), sorted.
    """

    format: str
    recipe: str
    quant_algo: str
    kv_cache_quant_algo: str | None
    decisions: tuple[ModuleDecision, ...]
    exclude_modules: tuple[str, ...]

    @property
    def quantized(self) -> dict[str, ModuleDecision]:
        return {d.module: d for d in self.decisions if d.format is not None}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "recipe": self.recipe,
            "quant_algo": self.quant_algo,
            "kv_cache_quant_algo": self.kv_cache_quant_algo,
            "counts": count_by_kind(self),
        }


def _mamba_before_attention(arch: NemotronHArch) -> set[int]:
    """Return the Mamba layers that come right before an attention layer (nearest preceding)."""
    layers = set()
    for index, kind in enumerate(arch.layer_kinds):
        if kind is not LayerKind.ATTENTION:
            continue
        for previous in range(index - 1, -1, -1):
            if arch.layer_kinds[previous] is LayerKind.MAMBA:
                layers.add(previous)
                break
            if arch.layer_kinds[previous] is LayerKind.ATTENTION:
                break
    return layers


def _recipe_format(recipe: str, fmt: str, kind: ModuleKind, layer: int, protected: set[int]) -> tuple[str | None, str]:
    if recipe == "all-linears":
        return fmt, "all-linears recipe"
    if recipe == "experts":
        if kind is ModuleKind.ROUTED_EXPERT:
            return fmt, "routed expert"
        return None, "experts recipe keeps non-expert modules in high precision"
    if recipe == "mixed":
        if kind is ModuleKind.ROUTED_EXPERT:
            return "nvfp4", "routed expert (mixed recipe)"
        if kind in (ModuleKind.MAMBA_IN, ModuleKind.MAMBA_OUT):
            return "fp8", "Mamba projection (mixed recipe)"
        return None, "mixed recipe keeps this kind in high precision"
    # nvidia
    if kind in (ModuleKind.ATTENTION_QKV, ModuleKind.ATTENTION_OUT):
        return None, "attention projections stay in high precision"
    if kind in (ModuleKind.MAMBA_IN, ModuleKind.MAMBA_OUT) and layer in protected:
        return None, "Mamba layer before an attention layer stays in high precision"
    return fmt, "nvidia recipe"


def plan_quantization(
    arch: NemotronHArch,
    tensors: dict[str, TensorInfo],
    fmt: str,
    recipe: str = "nvidia",
    exclude: list[str] | None = None,
    kv_cache: str | None = None,
    keep_unaligned: bool = False,
) -> QuantPlan:
    """Decide the format of every Linear module of a checkpoint.

    Args:
        arch: The architecture.
        tensors: The checkpoint's tensors (names and shapes are all that is read).
        fmt: ``fp8`` or ``nvfp4``.
        recipe: One of :data:`RECIPES`.
        exclude: Glob patterns (``fnmatch``) of module names to keep in high precision.
        kv_cache: ``fp8`` to add FP8 KV-cache scales, else ``None``.
        keep_unaligned: Keep NVFP4 modules whose input width is not a multiple of 16 in high
            precision (and exclude them) instead of failing.

    Raises:
        UsageError: For an unknown format or recipe, an exclude pattern matching no quantized
            module, unaligned NVFP4 widths (without ``keep_unaligned``), or a plan that
            quantizes nothing.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not supported", f"choose one of {', '.join(FORMATS)}")
    if recipe not in RECIPES:
        raise UsageError(f"--recipe {recipe!r} is not known", f"choose one of {', '.join(RECIPES)}")
    if recipe == "mixed" and fmt != "nvfp4":
        raise UsageError("--recipe mixed puts routed experts in NVFP4", "use it with --format nvfp4")
    if kv_cache not in (None, "fp8"):
        raise UsageError(f"--kv-cache {kv_cache!r} is not supported", "use --kv-cache fp8, or leave it out")

    protected = _mamba_before_attention(arch)
    patterns = list(exclude or [])
    used_patterns: set[str] = set()
    decisions = []
    unaligned = []
    for name, info in tensors.items():
        parsed = parse_tensor_name(name)
        if parsed is None or parsed.layer is None or not name.endswith(".weight") or not parsed.is_mixer:
            continue
        kind_of_layer = arch.layer_kinds[parsed.layer]
        template = parsed.template[: -len(".weight")]
        kind = LINEAR_TEMPLATES[kind_of_layer].get(template)
        if kind is None:
            continue
        module = name[: -len(".weight")]
        chosen, reason = _recipe_format(recipe, fmt, kind, parsed.layer, protected)
        if chosen is not None:
            for pattern in patterns:
                if fnmatch.fnmatchcase(module, pattern):
                    used_patterns.add(pattern)
                    chosen, reason = None, f"--exclude {pattern}"
                    break
        if chosen == "nvfp4" and info.shape[-1] % NVFP4_BLOCK_SIZE:
            if not keep_unaligned:
                unaligned.append(f"{module} {list(info.shape)}")
            else:
                chosen, reason = None, f"input width {info.shape[-1]} is not a multiple of {NVFP4_BLOCK_SIZE}"
        group = f"backbone.layers.{parsed.layer}.mixer.qkv" if kind is ModuleKind.ATTENTION_QKV else None
        decisions.append(ModuleDecision(module, parsed.layer, kind.value, chosen, reason, tuple(info.shape), group))

    if unaligned:
        listing = "; ".join(unaligned[:3]) + (f" (and {len(unaligned) - 3} more)" if len(unaligned) > 3 else "")
        raise UsageError(
            f"NVFP4 needs input widths that are multiples of {NVFP4_BLOCK_SIZE}: {listing}",
            "pass --keep-unaligned to keep these modules in high precision, or --exclude them",
        )
    unused = [pattern for pattern in patterns if pattern not in used_patterns]
    if unused:
        raise UsageError(
            f"--exclude {unused[0]!r} matches no module this recipe quantizes",
            "check the pattern against module names such as backbone.layers.3.mixer.in_proj",
        )
    if not any(decision.format for decision in decisions):
        raise UsageError(
            f"recipe {recipe!r} with these exclusions quantizes nothing in this checkpoint",
            "choose another --recipe or fewer --exclude patterns",
        )

    formats = {decision.format for decision in decisions if decision.format}
    quant_algo = "MIXED_PRECISION" if len(formats) > 1 else formats.pop().upper()
    exclude_modules = sorted(
        [decision.module for decision in decisions if decision.format is None]
        + _kept_modules(arch, tensors)
    )
    return QuantPlan(
        format=fmt,
        recipe=recipe,
        quant_algo=quant_algo,
        kv_cache_quant_algo="FP8" if kv_cache == "fp8" else None,
        decisions=tuple(decisions),
        exclude_modules=tuple(exclude_modules),
    )


def _kept_modules(arch: NemotronHArch, tensors: dict[str, TensorInfo]) -> list[str]:
    names = []
    if "lm_head.weight" in tensors:
        names.append("lm_head")
    for layer, kind in enumerate(arch.layer_kinds):
        for module in KEPT_MODULES.get(kind, ()):
            if f"backbone.layers.{layer}.mixer.{module}.weight" in tensors:
                names.append(f"backbone.layers.{layer}.mixer.{module}")
    return names


def quantized_bytes(fmt: str, shape: tuple[int, ...]) -> int:
    """Return the on-disk bytes of one quantized Linear: weight, block scales and scalar scales."""
    numel = math.prod(shape)
    if fmt == "nvfp4":
        return numel // 2 + numel // NVFP4_BLOCK_SIZE + 3 * 4  # packed E2M1, E4M3 block scales, 3 fp32 scalars
    return numel + 2 * 4  # E4M3 elements, weight_scale, input_scale


def predict_bytes(plan: QuantPlan, tensors: dict[tuple[str, str], tuple[int, ...]] | dict[str, TensorInfo]) -> int:
    """Predict the output size of a checkpoint quantized with ``plan``.

    Args:
        plan: The quantization plan of the parent.
        tensors: Parent tensor name to header info (for the parent), or to ``(dtype, shape)``
            pairs for a sliced child whose names are still the parent's.
    """
    quantized = plan.quantized
    total = 0
    for name, value in tensors.items():
        dtype, shape = (value.dtype, value.shape) if isinstance(value, TensorInfo) else value
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        decision = quantized.get(module) if module else None
        if decision is not None:
            total += quantized_bytes(decision.format, tuple(shape))  # type: ignore[arg-type]
        else:
            total += math.prod(shape) * DTYPE_SIZES[dtype]
    if plan.kv_cache_quant_algo:
        attention_layers = {d.layer for d in plan.decisions if d.kind == ModuleKind.ATTENTION_QKV.value}
        total += 8 * len(attention_layers)
    return total


def count_by_kind(plan: QuantPlan) -> dict[str, dict[str, dict[str, int]]]:
    """Count modules and parameters per module kind and format (``bf16`` for kept ones)."""
    counts: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: {"modules": 0, "params": 0}))
    for decision in plan.decisions:
        entry = counts[decision.kind][decision.format or "bf16"]
        entry["modules"] += 1
        entry["params"] += math.prod(decision.shape)
    return {kind: dict(sorted(formats.items())) for kind, formats in sorted(counts.items())}


TP_DEGREES = (1, 2, 4, 8)
# Row-parallel Linears split their input across ranks; the others split their output.
ROW_PARALLEL = ("out_proj", "o_proj", "down_proj")


def servable_tp_degrees(plan: QuantPlan, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[int, list[str]]:
    """Check which tensor-parallel degrees every quantized module can be split across.

    A row-parallel module (``out_proj``, ``o_proj``, ``down_proj``) gives each rank
    ``in / tp`` input columns, which NVFP4 needs in whole blocks of 16 (FP8 needs a whole
    number); the other modules give each rank ``out / tp`` rows.

    Args:
        plan: The quantization plan.
        shapes: Module name to weight shape, for a sliced child (default: the plan's shapes).

    Returns:
        Each degree of :data:`TP_DEGREES` mapped to the modules that block it (empty when
        servable).
    """
    blockers: dict[int, list[str]] = {tp: [] for tp in TP_DEGREES}
    for decision in plan.decisions:
        if decision.format is None or (shapes is not None and decision.module not in shapes):
            continue
        shape = decision.shape if shapes is None else shapes[decision.module]
        out_features, in_features = shape
        row_parallel = decision.module.rsplit(".", 1)[-1] in ROW_PARALLEL
        for tp in TP_DEGREES:
            if row_parallel:
                unit = tp * (NVFP4_BLOCK_SIZE if decision.format == "nvfp4" else 1)
                ok = in_features % unit == 0
            else:
                ok = out_features % tp == 0
            if not ok:
                blockers[tp].append(f"{decision.module} {list(shape)}")
    return blockers
