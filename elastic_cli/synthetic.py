"""Deterministic synthetic elastic NemotronH checkpoints, for the example, tests and benchmarks.

The weights are random but shaped and typed like a real checkpoint (BF16 weights; FP32
``A_log``, ``D``, router and ``e_score_correction_bias``); the budgets are nested and ranked by
a random importance order, so their masks are not prefixes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from elastic_cli.arch.nemotron_h import NemotronHArch, natural_key, parse_config, parse_tensor_name
from elastic_cli.checkpoint.safetensors_io import encode_header
from elastic_cli.checkpoint.torch_dtypes import TORCH_TO_DTYPE
from elastic_cli.checkpoint.writer import SHARD_METADATA, ShardedWriter, plan_shards, write_text
from elastic_cli.elastic.masks import LAYER_AXES, MASKS_FILE, Axis, Budget, Mask, axis_length, budgets_to_document

FP32_TEMPLATES = ("A_log", "D", "gate.weight", "gate.e_score_correction_bias")


def nano_v3_config(**overrides: Any) -> dict[str, Any]:
    """Return the Nemotron 3 Nano 30B-A3B config (remote-code dialect), with overrides applied."""
    config: dict[str, Any] = {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "vocab_size": 131072,
        "hidden_size": 2688,
        "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
        "num_hidden_layers": 52,
        "mamba_num_heads": 64,
        "mamba_head_dim": 64,
        "n_groups": 8,
        "ssm_state_size": 128,
        "conv_kernel": 4,
        "num_attention_heads": 32,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "intermediate_size": 1856,
        "n_routed_experts": 128,
        "num_experts_per_tok": 6,
        "moe_intermediate_size": 1856,
        "moe_shared_expert_intermediate_size": 3712,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "tie_word_embeddings": False,
        "layer_norm_epsilon": 1e-05,
        "mlp_hidden_act": "relu2",
        "mamba_hidden_act": "silu",
        "use_conv_bias": True,
        "use_bias": False,
        "mlp_bias": False,
        "attention_bias": False,
        "torch_dtype": "bfloat16",
    }
    config.update(overrides)
    if "hybrid_override_pattern" in config:
        config["num_hidden_layers"] = len(config["hybrid_override_pattern"])
    return config


def tiny_config(pattern: str = "MEM*EMEM*E", **overrides: Any) -> dict[str, Any]:
    """Return a small NemotronH config with the Nano v3 structure (GQA, grouped Mamba, top-k MoE)."""
    sizes = {
        "vocab_size": 512,
        "hidden_size": 128,
        "hybrid_override_pattern": pattern,
        "mamba_num_heads": 8,
        "mamba_head_dim": 16,
        "n_groups": 2,
        "ssm_state_size": 16,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 192,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 96,
        "moe_shared_expert_intermediate_size": 128,
        "routed_scaling_factor": 1.5,
    }
    sizes.update(overrides)
    return nano_v3_config(**sizes)


def template_shapes(arch: NemotronHArch) -> dict[str, tuple[int, ...]]:
    """Return every required tensor name with the shape the config implies, in natural order."""
    shapes = {}
    for name in arch.required_tensors():
        parsed = parse_tensor_name(name)
        assert parsed is not None
        shape = arch.template_shape(parsed)
        assert shape is not None
        shapes[name] = shape
    shapes_with_bias = dict(shapes)
    for name in list(shapes):
        if name.endswith("mixer.conv1d.weight"):
            shapes_with_bias[name.replace("weight", "bias")] = (arch.mamba_conv_dim,)
    return {name: shapes_with_bias[name] for name in sorted(shapes_with_bias, key=natural_key)}


def tensor_dtype(name: str) -> torch.dtype:
    """Return the dtype a real NemotronH checkpoint stores a tensor in."""
    return torch.float32 if name.endswith(FP32_TEMPLATES) else torch.bfloat16


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Draw one tensor with a scale that keeps activations in a sensible range."""
    if name.endswith("A_log"):
        value = torch.log(torch.empty(shape).uniform_(1.0, 16.0, generator=generator))
    elif name.endswith(".D"):
        value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
    elif name.endswith("dt_bias"):
        dt = torch.exp(torch.empty(shape).uniform_(math.log(1e-3), math.log(1e-1), generator=generator))
        value = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
        value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
    elif name.endswith("e_score_correction_bias"):
        value = 0.01 * torch.randn(shape, generator=generator)
    elif name.endswith(".bias"):
        value = 0.02 * torch.randn(shape, generator=generator)
    else:
        fan_in = shape[-1] if len(shape) > 1 else 1
        if name.endswith("conv1d.weight"):
            fan_in = shape[-1]
        std = 1.0 if name.endswith("embeddings.weight") else 1.0 / math.sqrt(fan_in)
        value = std * torch.randn(shape, generator=generator)
    return value.to(tensor_dtype(name))


def random_tensors(arch: NemotronHArch, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor of a random checkpoint, one at a time, in natural order."""
    for name, shape in template_shapes(arch).items():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + sum(name.encode()) * 7919 + len(name))
        yield name, random_tensor(name, shape, generator)


def _top(scores: torch.Tensor, count: int) -> Mask:
    keep = torch.zeros(len(scores), dtype=torch.bool)
    keep[torch.argsort(scores, descending=True, stable=True)[:count]] = True
    return tuple(bool(x) for x in keep)


def _grouped_top(scores: torch.Tensor, groups: int, per_group: int) -> Mask:
    size = len(scores) // groups
    mask: list[bool] = []
    for group in range(groups):
        mask.extend(_top(scores[group * size : (group + 1) * size], per_group))
    return tuple(mask)


def _round_to(value: float, multiple: int, low: int) -> int:
    return max(low, int(round(value / multiple)) * multiple)


def _blockwise(scores: torch.Tensor, block: int) -> torch.Tensor:
    """Give every element of a block of ``block`` channels its block's score, so rankings keep whole blocks."""
    if block <= 1 or len(scores) % block:
        return scores
    per_block = scores[::block].clone()
    return per_block.repeat_interleave(block) - torch.arange(len(scores)).remainder(block) * 1e-9


def importance_budgets(
    arch: NemotronHArch, fractions: list[tuple[str, float]], seed: int, block: int = 1
) -> list[Budget]:
    """Build nested budgets that keep the most important ``fraction`` of each axis.

    A random importance score per component replaces the activation-based ranking of
    Minitron-style pruning; every budget keeps the top of the same ranking, so budgets nest.
    Counts respect the structural rules (the same count per Mamba group and per KV head,
    experts at least top-k) and are multiples of 16 where the width allows, so children stay
    quantizable to NVFP4. ``fractions`` runs from largest (1.0) to smallest. With
    ``block=16``, channel axes are ranked in whole blocks of 16, so an NVFP4-quantized parent
    can still be sliced to every budget.
    """
    generator = torch.Generator().manual_seed(seed)
    channel_axes = (Axis.HIDDEN, Axis.FFN_CHANNELS, Axis.EXPERT_CHANNELS, Axis.SHARED_EXPERT_CHANNELS)
    scores = {Axis.HIDDEN: _blockwise(torch.rand(arch.hidden_size, generator=generator), block)}
    layer_scores = [
        {
            axis: _blockwise(torch.rand(axis_length(arch, axis), generator=generator), block if axis in channel_axes else 1)
            for axis in LAYER_AXES[kind]
        }
        for kind in arch.layer_kinds
    ]
    budgets = []
    for name, fraction in fractions:
        hidden = _top(scores[Axis.HIDDEN], _round_to(arch.hidden_size * fraction, 16, 16))
        layer_masks = []
        for layer, kind in enumerate(arch.layer_kinds):
            masks = []
            for axis in LAYER_AXES[kind]:
                length = axis_length(arch, axis)
                layer_score = layer_scores[layer][axis]
                if axis is Axis.MAMBA_HEADS:
                    per_group = max(1, round(arch.mamba_num_heads // arch.n_groups * fraction))
                    mask = _grouped_top(layer_score, arch.n_groups, per_group)
                elif axis is Axis.ATTENTION_HEADS:
                    per_kv = max(1, round(arch.num_attention_heads // arch.num_key_value_heads * fraction))
                    mask = _grouped_top(layer_score, arch.num_key_value_heads, per_kv)
                elif axis is Axis.EXPERTS:
                    count = max(arch.num_experts_per_tok, round(length * fraction))
                    count -= count % arch.n_group
                    mask = _grouped_top(layer_score, arch.n_group, count // arch.n_group)
                elif axis is Axis.MAMBA_HEAD_CHANNELS:
                    mask = _top(layer_score, length)  # head channels stay whole in this example
                else:
                    mask = _top(layer_score, min(length, _round_to(length * fraction, 16, 16)))
                masks.append((axis, mask))
            layer_masks.append(tuple(masks))
        layers = (True,) * arch.num_layers
        budgets.append(Budget(name, None, False, hidden, layers, tuple(layer_masks)))
    return budgets


def write_checkpoint(
    folder: Path,
    config: dict[str, Any],
    seed: int,
    budgets: list[Budget] | None = None,
    max_shard_bytes: int = 5 * 1000**3,
    sidecars: dict[str, str] | None = None,
) -> None:
    """Write a random checkpoint (and its masks, when given) into an existing empty folder."""
    arch = parse_config(config)
    shapes = template_shapes(arch)
    entries = [(name, TORCH_TO_DTYPE[tensor_dtype(name)], shape) for name, shape in shapes.items()]
    layout = plan_shards(entries, max_shard_bytes)
    with ShardedWriter(folder, layout) as writer:
        for name, tensor in random_tensors(arch, seed):
            writer.write(name, tensor)
        writer.finish()
    write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    if budgets is not None:
        document = budgets_to_document(budgets, arch)
        write_text(folder / MASKS_FILE, json.dumps(document, indent=1, sort_keys=True) + "\n")
    for name, text in (sidecars or {}).items():
        write_text(folder / name, text)


def write_header_only_checkpoint(
    folder: Path,
    config: dict[str, Any],
    budgets: list[Budget] | None = None,
    max_shard_bytes: int = 5 * 1000**3,
) -> None:
    """Write a checkpoint whose shards hold real headers and sparse, all-zero data.

    The files take almost no disk space (their data areas are holes), yet every header is exact,
    so header-only commands (``inspect``, ``--dry-run``) see a full-size checkpoint, such as the
    complete Nemotron 3 Nano 30B-A3B, without its 63 GB of weights.
    """
    arch = parse_config(config)
    entries = [(name, TORCH_TO_DTYPE[tensor_dtype(name)], shape) for name, shape in template_shapes(arch).items()]
    layout = plan_shards(entries, max_shard_bytes)
    for file, shard_entries in layout.shards:
        header, sizes = encode_header(list(shard_entries), SHARD_METADATA)
        with (folder / file).open("wb") as handle:
            handle.write(header)
            handle.truncate(len(header) + sum(sizes))
    if len(layout.shards) > 1:
        index = {"metadata": {"total_size": layout.total_size}, "weight_map": layout.weight_map}
        write_text(folder / "model.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")
    write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    if budgets is not None:
        write_text(folder / MASKS_FILE, json.dumps(budgets_to_document(budgets, arch), indent=1, sort_keys=True) + "\n")
