"""Re-read a quantized checkpoint and list everything a serving engine would trip over.

Checks: ``hf_quant_config.json`` has every key the loaders require and ``config.json`` has a
matching ``quantization_config``; every exclude entry names a real module; every Linear is
either quantized or excluded (engines quantize whatever the exclude list does not name);
every quantized module has all its tensors with the right dtypes and shapes; scales are finite
and positive; no E4M3 tensor holds a NaN byte; fused partners share their scalar scales; the
tensors match the config, which parses as a NemotronH config.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from elastic_cli.arch.nemotron_h import parse_config
from elastic_cli.checkpoint.reader import Checkpoint, read_json
from elastic_cli.elastic.plan import check_tensors
from elastic_cli.errors import ElasticError
from elastic_cli.formats.constants import NVFP4_BLOCK_SIZE
from elastic_cli.quantize.export import QUANT_CONFIG_FILE, quantization_config
from elastic_cli.quantize.policy import LINEAR_TEMPLATES, KEPT_MODULES

E4M3_NAN_BYTES = (0x7F, 0xFF)


def _linear_modules(checkpoint: Checkpoint) -> dict[str, str]:
    """Map every Linear module of the checkpoint to its weight dtype."""
    arch = parse_config(checkpoint.config)
    modules = {}
    for layer, kind in enumerate(arch.layer_kinds):
        for template in LINEAR_TEMPLATES[kind]:
            experts = range(arch.n_routed_experts) if "{e}" in template else [None]
            for expert in experts:
                suffix = template.replace("{e}", str(expert)) if expert is not None else template
                name = f"backbone.layers.{layer}.mixer.{suffix}"
                if f"{name}.weight" in checkpoint.tensors:
                    modules[name] = checkpoint.tensors[f"{name}.weight"].dtype
    return modules


def _real_modules(checkpoint: Checkpoint) -> set[str]:
    return {name[: -len(".weight")] for name in checkpoint.tensors if name.endswith(".weight")}


def validate_quantized(folder: Path) -> list[str]:
    """Return every problem of a quantized checkpoint folder (an empty list means sound)."""
    problems: list[str] = []
    try:
        checkpoint = Checkpoint.open(folder)
    except ElasticError as error:
        return [str(error)]
    with checkpoint:
        try:
            arch = parse_config(checkpoint.config)
            check_tensors(arch, checkpoint.tensors)
        except ElasticError as error:
            return [str(error)]
        document = _read_quant_config(folder, problems)
        if document is None:
            return problems
        quantization = document["quantization"]
        _check_config_block(checkpoint.config, document, problems)

        real = _real_modules(checkpoint)
        excluded = set(quantization.get("exclude_modules") or [])
        for name in sorted(excluded - real):
            problems.append(f"exclude_modules names '{name}', which is not a module of this checkpoint")

        linears = _linear_modules(checkpoint)
        algo = quantization["quant_algo"]
        mixed = quantization.get("quantized_layers") if algo == "MIXED_PRECISION" else None
        for module, dtype in linears.items():
            quantized = dtype in ("U8", "F8_E4M3")
            if module in excluded and quantized:
                problems.append(f"{module} is quantized but listed in exclude_modules")
            elif module not in excluded and not quantized:
                problems.append(f"{module} is stored as {dtype} but not excluded, so engines would read it as quantized")
            if quantized:
                expected_algo = mixed.get(module, {}).get("quant_algo") if mixed is not None else algo
                _check_module(checkpoint, module, "NVFP4" if dtype == "U8" else "FP8", expected_algo, problems)
        _check_fused(checkpoint, arch, problems)
        _check_kv(checkpoint, quantization, problems)
        never = {name for names in KEPT_MODULES.values() for name in names}
        for module in sorted(real):
            if module == "lm_head" or module.rsplit(".", 1)[-1] in never:
                if checkpoint.tensors[f"{module}.weight"].dtype in ("U8", "F8_E4M3"):
                    problems.append(f"{module} must never be quantized")
    return problems


def _read_quant_config(folder: Path, problems: list[str]) -> dict[str, Any] | None:
    path = folder / QUANT_CONFIG_FILE
    if not path.exists():
        problems.append(f"{QUANT_CONFIG_FILE} is missing")
        return None
    try:
        document = read_json(path, QUANT_CONFIG_FILE)
    except ElasticError as error:
        problems.append(str(error))
        return None
    quantization = document.get("quantization") if isinstance(document, dict) else None
    if not isinstance(quantization, dict):
        problems.append(f"{QUANT_CONFIG_FILE} has no 'quantization' object")
        return None
    if "producer" not in document:
        problems.append(f"{QUANT_CONFIG_FILE} has no 'producer'")
    for key in ("quant_algo", "kv_cache_quant_algo", "exclude_modules"):
        if key not in quantization:
            problems.append(f"{QUANT_CONFIG_FILE} has no 'quantization.{key}' (vLLM and SGLang require it)")
    if quantization.get("quant_algo") == "NVFP4" and quantization.get("group_size") != NVFP4_BLOCK_SIZE:
        problems.append(f"{QUANT_CONFIG_FILE} has group_size {quantization.get('group_size')!r}, expected {NVFP4_BLOCK_SIZE}")
    if quantization.get("quant_algo") not in ("NVFP4", "FP8", "MIXED_PRECISION"):
        problems.append(f"{QUANT_CONFIG_FILE} has quant_algo {quantization.get('quant_algo')!r}")
        return None
    if quantization.get("quant_algo") == "MIXED_PRECISION" and not isinstance(quantization.get("quantized_layers"), dict):
        problems.append(f"{QUANT_CONFIG_FILE} is MIXED_PRECISION without 'quantized_layers'")
        return None
    return document


def _check_config_block(config: dict[str, Any], document: dict[str, Any], problems: list[str]) -> None:
    block = config.get("quantization_config")
    if not isinstance(block, dict):
        problems.append("config.json has no quantization_config")
        return
    if block != quantization_config(document):
        problems.append(f"config.json quantization_config disagrees with {QUANT_CONFIG_FILE}")


def _scalar(checkpoint: Checkpoint, name: str, problems: list[str]) -> float | None:
    info = checkpoint.tensors.get(name)
    if info is None:
        problems.append(f"{name} is missing")
        return None
    if info.dtype != "F32" or info.shape not in ((), (1,)):
        problems.append(f"{name} is {info.dtype}{list(info.shape)}, expected a float32 scalar")
        return None
    value = float(checkpoint.read(name).reshape(-1)[0])
    if not math.isfinite(value) or value <= 0:
        problems.append(f"{name} is {value}, expected a finite positive scale")
        return None
    return value


def _check_module(checkpoint: Checkpoint, module: str, stored: str, expected: str | None, problems: list[str]) -> None:
    if expected != stored:
        problems.append(f"{module} is stored as {stored} but the config declares {expected}")
    weight = checkpoint.tensors[f"{module}.weight"]
    _scalar(checkpoint, f"{module}.input_scale", problems)
    if stored == "NVFP4":
        _scalar(checkpoint, f"{module}.weight_scale_2", problems)
        scale = checkpoint.tensors.get(f"{module}.weight_scale")
        expected_shape = (weight.shape[0], weight.shape[1] * 2 // NVFP4_BLOCK_SIZE)
        if scale is None:
            problems.append(f"{module}.weight_scale is missing")
        elif scale.dtype != "F8_E4M3" or scale.shape != expected_shape:
            problems.append(f"{module}.weight_scale is {scale.dtype}{list(scale.shape)}, expected F8_E4M3{list(expected_shape)}")
        else:
            _check_e4m3(checkpoint, f"{module}.weight_scale", problems, positive=True)
    else:
        _scalar(checkpoint, f"{module}.weight_scale", problems)
        _check_e4m3(checkpoint, f"{module}.weight", problems, positive=False)


def _check_e4m3(checkpoint: Checkpoint, name: str, problems: list[str], positive: bool) -> None:
    raw = checkpoint.read(name).view(torch.uint8)
    nan = int(((raw == E4M3_NAN_BYTES[0]) | (raw == E4M3_NAN_BYTES[1])).sum())
    if nan:
        problems.append(f"{name} holds {nan} NaN byte(s)")
    if positive:
        non_positive = int((checkpoint.read(name).float() <= 0).sum())
        if non_positive:
            problems.append(f"{name} holds {non_positive} zero or negative block scale(s)")


def _check_fused(checkpoint: Checkpoint, arch, problems: list[str]) -> None:
    for layer, kind in enumerate(arch.layer_kinds):
        if kind.value != "attention":
            continue
        prefix = f"backbone.layers.{layer}.mixer"
        for suffix in ("input_scale", "weight_scale_2", "weight_scale"):
            names = [f"{prefix}.{p}.{suffix}" for p in ("q_proj", "k_proj", "v_proj")]
            present = [n for n in names if n in checkpoint.tensors and checkpoint.tensors[n].shape in ((), (1,))]
            if len(present) not in (0, 3):
                problems.append(f"{prefix}: q/k/v are not all quantized alike ({suffix} on {len(present)} of 3)")
                continue
            values = {float(checkpoint.read(n).reshape(-1)[0]) for n in present}
            if len(values) > 1:
                problems.append(f"{prefix}: q/k/v have different {suffix} values {sorted(values)}; fused engines need one")


def _check_kv(checkpoint: Checkpoint, quantization: dict[str, Any], problems: list[str]) -> None:
    kv_names = [name for name in checkpoint.tensors if name.endswith((".k_scale", ".v_scale"))]
    if quantization.get("kv_cache_quant_algo") == "FP8":
        for name in checkpoint.tensors:
            if name.endswith("mixer.k_proj.weight"):
                _scalar(checkpoint, name.replace(".weight", ".k_scale"), problems)
                _scalar(checkpoint, name.replace("k_proj.weight", "v_proj.v_scale"), problems)
    elif kv_names:
        problems.append(f"{kv_names[0]} is present but kv_cache_quant_algo is not FP8")
