"""Export to the ModelOpt unified Hugging Face layout that vLLM, TensorRT-LLM and SGLang load.

This is the only module that contains the on-disk quantization names. Per quantized module
``M`` (hub names, ``backbone.`` prefix):

NVFP4::

    M.weight           uint8 [out, in/2]          E2M1 pairs, element 2k in the low nibble
    M.weight_scale     float8_e4m3fn [out, in/16] block scales
    M.weight_scale_2   float32 []                 global scale = weight amax / (6 * 448)
    M.input_scale      float32 []                 activation amax / (6 * 448)

FP8::

    M.weight           float8_e4m3fn [out, in]
    M.weight_scale     float32 []                 weight amax / 448
    M.input_scale      float32 []                 activation amax / 448

FP8 KV cache: ``...mixer.k_proj.k_scale`` and ``...mixer.v_proj.v_scale`` (float32 [],
amax / 448 of the k/v projections' outputs).

Fused partners (q/k/v of one attention layer) share one weight amax and one input amax, so
their ``weight_scale_2`` (or FP8 ``weight_scale``) and ``input_scale`` are equal, as engines
that fuse them require. ``hf_quant_config.json`` carries ``producer`` and ``quantization``
(``quant_algo``, ``kv_cache_quant_algo`` always present, ``group_size`` for NVFP4,
``exclude_modules``; ``quantized_layers`` for mixed precision), and ``config.json`` gains a
``quantization_config`` block (``quant_method: modelopt``) and is otherwise unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from elastic_cli import __version__
from elastic_cli.formats.constants import NVFP4_BLOCK_SIZE
from elastic_cli.quantize.policy import ModuleDecision, QuantPlan

if TYPE_CHECKING:
    import torch

# The functions that compute (quantize, dequantize, check values) import torch and the format
# numerics when called: slicing uses this module only for names and shapes and must start
# without loading torch.

QUANT_CONFIG_FILE = "hf_quant_config.json"
STATE_FILE = "elastic_quant_state.json"
PRODUCER = {"name": "elastic", "version": __version__}
SCALAR: tuple[int, ...] = ()


# Quantization tensors next to a module's weight, by name suffix, and their role.
_SUFFIX_ROLES = {
    "weight_scale_2": "global_scale",
    "weight_scale": "scale",
    "input_scale": "input_scale",
    "k_scale": "kv_scale",
    "v_scale": "kv_scale",
}
PACKED_DTYPE = "U8"
BLOCK_SCALE_DTYPE = "F8_E4M3"
BLOCK_SCALE_PAD = 1.0  # the scale an all-zero block gets, so padded blocks match a fresh quantization


def split_quantized_name(name: str) -> tuple[str, str]:
    """Split a tensor name into its module's weight name and its role.

    Returns:
        ``(weight name, role)`` with role ``weight``, ``scale``, ``global_scale``,
        ``input_scale`` or ``kv_scale``. A plain tensor returns ``(name, "weight")``.
    """
    module, _, suffix = name.rpartition(".")
    role = _SUFFIX_ROLES.get(suffix)
    if role is None:
        return name, "weight"
    return f"{module}.weight", role


def quantized_shape(role: str, dtype: str, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Return the shape a quantization tensor has for a weight of ``weight_shape``."""
    if role in ("global_scale", "input_scale", "kv_scale"):
        return SCALAR
    out_features, in_features = weight_shape
    if role == "weight":  # packed E2M1 pairs
        return (out_features, in_features // 2)
    if dtype == BLOCK_SCALE_DTYPE:
        return (out_features, in_features // NVFP4_BLOCK_SIZE)
    return SCALAR  # FP8 per-tensor weight_scale


def output_entries(decision: ModuleDecision, dtype: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """List ``(name, dtype, shape)`` of what one module's weight becomes on disk, in write order.

    Args:
        decision: The module's decision; ``format`` None means the weight is copied.
        dtype: The stored dtype of the source weight (safetensors name).
    """
    module, shape = decision.module, decision.shape
    if decision.format is None:
        return [(f"{module}.weight", dtype, shape)]
    out_features, in_features = shape
    if decision.format == "nvfp4":
        return [
            (f"{module}.input_scale", "F32", SCALAR),
            (f"{module}.weight", "U8", (out_features, in_features // 2)),
            (f"{module}.weight_scale", "F8_E4M3", (out_features, in_features // NVFP4_BLOCK_SIZE)),
            (f"{module}.weight_scale_2", "F32", SCALAR),
        ]
    return [
        (f"{module}.input_scale", "F32", SCALAR),
        (f"{module}.weight", "F8_E4M3", shape),
        (f"{module}.weight_scale", "F32", SCALAR),
    ]


def kv_scale_entry(weight_name: str) -> tuple[str, str, tuple[int, ...]] | None:
    """Return the KV-cache scale that follows a ``k_proj``/``v_proj`` weight, if any."""
    if weight_name.endswith("mixer.k_proj.weight"):
        return (weight_name.replace(".weight", ".k_scale"), "F32", SCALAR)
    if weight_name.endswith("mixer.v_proj.weight"):
        return (weight_name.replace(".weight", ".v_scale"), "F32", SCALAR)
    return None


@dataclass(frozen=True)
class ModuleScales:
    """The amax values one module is quantized with (fp32 scalars as floats).

    ``weight_amax`` is shared by fused partners; ``input_amax`` is the calibrated activation
    amax (max over budgets, shared by fused partners).
    """

    format: str
    weight_amax: float
    input_amax: float


def quantize_module(weight: torch.Tensor, scales: ModuleScales) -> list[torch.Tensor]:
    """Quantize one weight [out, in]; return tensors in :func:`output_entries` order."""
    from elastic_cli.formats import fp8, nvfp4

    if scales.format == "nvfp4":
        global_scale = nvfp4.global_scale(scales.weight_amax)
        packed, block_scale = nvfp4.quantize(weight, global_scale)
        return [nvfp4.global_scale(scales.input_amax), packed, block_scale, global_scale]
    weight_scale = fp8.per_tensor_scale(scales.weight_amax)
    return [fp8.per_tensor_scale(scales.input_amax), fp8.quantize(weight, weight_scale), weight_scale]


def kv_scale(amax: float) -> torch.Tensor:
    """Return an FP8 KV-cache scale: amax / 448 (1.0 for a zero amax)."""
    from elastic_cli.formats import fp8

    return fp8.per_tensor_scale(amax)


def dequantize_module(tensors: dict[str, torch.Tensor], module: str, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """Rebuild a module's high-precision weight from its exported tensors."""
    from elastic_cli.formats import fp8, nvfp4

    weight = tensors[f"{module}.weight"]
    if fmt == "nvfp4":
        return nvfp4.dequantize(weight, tensors[f"{module}.weight_scale"], tensors[f"{module}.weight_scale_2"], dtype)
    return fp8.dequantize(weight, tensors[f"{module}.weight_scale"], dtype)


def hf_quant_config(plan: QuantPlan) -> dict[str, Any]:
    """Return the ``hf_quant_config.json`` document of a quantization plan."""
    quantization: dict[str, Any] = {
        "quant_algo": plan.quant_algo,
        "kv_cache_quant_algo": plan.kv_cache_quant_algo,
        "exclude_modules": list(plan.exclude_modules),
    }
    if plan.quant_algo == "NVFP4":
        quantization["group_size"] = NVFP4_BLOCK_SIZE
    if plan.quant_algo == "MIXED_PRECISION":
        quantization["quantized_layers"] = {
            decision.module: layer_algo(decision.format) for decision in plan.decisions if decision.format
        }
    return {"producer": dict(PRODUCER), "quantization": quantization}


def layer_algo(fmt: str | None) -> dict[str, Any]:
    """Return the per-layer algorithm entry of a mixed-precision config."""
    if fmt == "nvfp4":
        return {"quant_algo": "NVFP4", "group_size": NVFP4_BLOCK_SIZE}
    return {"quant_algo": "FP8"}


def _scheme(algo: str) -> dict[str, Any]:
    if algo == "NVFP4":
        tensor = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": NVFP4_BLOCK_SIZE}
        return {"input_activations": dict(tensor), "weights": dict(tensor)}
    tensor = {"dynamic": False, "num_bits": 8, "type": "float"}
    return {"input_activations": dict(tensor), "weights": dict(tensor)}


def quantization_config(document: dict[str, Any]) -> dict[str, Any]:
    """Return the ``quantization_config`` block for ``config.json`` from ``hf_quant_config.json``.

    The block follows the compressed-tensors style that ModelOpt writes: one config group per
    algorithm, ``ignore`` (the exclude list), ``quant_algo``, ``kv_cache_scheme`` for an FP8
    KV cache, ``producer`` and ``quant_method: modelopt``.
    """
    quantization = document["quantization"]
    algo = quantization["quant_algo"]
    block: dict[str, Any] = {}
    if algo == "MIXED_PRECISION":
        by_algo: dict[str, list[str]] = {}
        for module, entry in quantization["quantized_layers"].items():
            by_algo.setdefault(entry["quant_algo"], []).append(module)
        groups = {}
        for index, (layer_algo_name, modules) in enumerate(by_algo.items()):
            group = _scheme(layer_algo_name)
            group["targets"] = sorted(modules)
            groups[f"group_{index}"] = group
        block["config_groups"] = groups
        block["quantized_layers"] = quantization["quantized_layers"]
    else:
        group = _scheme(algo)
        group["targets"] = ["Linear"]
        block["config_groups"] = {"group_0": group}
    block["ignore"] = list(quantization.get("exclude_modules") or [])
    block["quant_algo"] = algo
    if quantization.get("kv_cache_quant_algo") == "FP8":
        block["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    block["producer"] = document["producer"]
    block["quant_method"] = "modelopt"
    return block


def rename_quant_config(document: dict[str, Any], module_map: dict[str, str]) -> dict[str, Any]:
    """Return ``hf_quant_config.json`` for a sliced child: modules renamed, dropped ones removed.

    Args:
        document: The parent's ``hf_quant_config.json``.
        module_map: Parent module name to child module name, for every module the child keeps.
    """
    quantization = dict(document["quantization"])
    quantization["exclude_modules"] = sorted(
        module_map[name] for name in quantization.get("exclude_modules") or [] if name in module_map
    )
    if "quantized_layers" in quantization:
        quantization["quantized_layers"] = {
            module_map[name]: entry for name, entry in quantization["quantized_layers"].items() if name in module_map
        }
    return {**document, "quantization": quantization}


def rename_state(document: dict[str, Any], module_map: dict[str, str]) -> dict[str, Any]:
    """Return a quantizer state document for a sliced child, with modules renamed."""
    modules = {module_map[name]: entry for name, entry in document.get("modules", {}).items() if name in module_map}
    kv = {}
    for prefix, values in document.get("kv_amax", {}).items():
        child = module_map.get(f"{prefix}.k_proj")
        if child is not None:
            kv[child.rsplit(".", 1)[0]] = values
    renamed = {**document, "modules": dict(sorted(modules.items())), "kv_amax": dict(sorted(kv.items()))}
    renamed["unreached_experts"] = {}  # parent expert ids do not apply to the child's numbering
    return renamed


def check_weight_finite(name: str, weight: torch.Tensor) -> str | None:
    """Describe NaN or Inf values in a tensor, or return ``None`` when all are finite.

    The check runs over slices of ``_FINITE_CHUNK`` elements, so its temporaries stay small
    next to a large tensor such as the embedding.
    """
    import torch

    if not weight.is_floating_point() or weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return None
    flat = weight.reshape(-1)
    chunks = [flat[start : start + _FINITE_CHUNK] for start in range(0, flat.numel(), _FINITE_CHUNK)]
    if all(bool(torch.isfinite(chunk).all()) for chunk in chunks):
        return None
    nan = sum(int(torch.isnan(chunk).sum()) for chunk in chunks)
    inf = sum(int(torch.isinf(chunk).sum()) for chunk in chunks)
    return f"tensor '{name}' has {nan} NaN and {inf} Inf value(s)"


_FINITE_CHUNK = 1 << 22


def weight_amax(weight: torch.Tensor) -> float:
    """Return max |weight| as a Python float (computed in fp32)."""
    from elastic_cli.formats import fp8

    return float(fp8.amax(weight))


def bytes_of(entries: list[tuple[str, str, tuple[int, ...]]]) -> int:
    """Sum the bytes of planned entries."""
    from elastic_cli.checkpoint.safetensors_io import DTYPE_SIZES

    return sum(math.prod(shape) * DTYPE_SIZES[dtype] for _, dtype, shape in entries)
