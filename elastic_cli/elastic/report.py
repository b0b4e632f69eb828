"""The ``inspect`` report: architecture, budgets with parameter and byte counts, validation.

Byte estimates per format follow the recipes NVIDIA's published elastic sizes match: FP8 keeps
routed experts in FP8 (1 byte per weight) and everything else in its stored dtype; NVFP4 keeps
routed experts in NVFP4 (half a byte per weight plus one E4M3 block scale per 16 weights), Mamba
``in_proj``/``out_proj`` in FP8, and everything else in its stored dtype. Per-tensor scalar
scales are a few bytes and left out.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from elastic_cli import __version__
from elastic_cli.arch.nemotron_h import KIND_TO_CHAR, LayerKind, parse_tensor_name
from elastic_cli.checkpoint.safetensors_io import DTYPE_SIZES
from elastic_cli.elastic.plan import SlicePlan, build_plan
from elastic_cli.elastic.source import ElasticSource

NVFP4_BYTES_PER_WEIGHT = 0.5 + 1 / 16
FORMATS = ("bf16", "fp8", "nvfp4")


def estimate_bytes(source: ElasticSource, plan: SlicePlan) -> dict[str, int]:
    """Estimate a planned budget's on-disk size in BF16 (stored dtypes), FP8 and NVFP4."""
    sizes = dict.fromkeys(FORMATS, 0.0)
    for tensor in plan.tensors:
        numel = math.prod(tensor.target_shape)
        stored = numel * DTYPE_SIZES[tensor.dtype]
        parsed = parse_tensor_name(tensor.source)
        role = _role(source, parsed)
        sizes["bf16"] += stored
        sizes["fp8"] += numel if role == "expert" else stored
        if role == "expert":
            sizes["nvfp4"] += numel * NVFP4_BYTES_PER_WEIGHT
        elif role == "mamba_linear":
            sizes["nvfp4"] += numel
        else:
            sizes["nvfp4"] += stored
    return {name: int(value) for name, value in sizes.items()}


def _role(source: ElasticSource, parsed: Any) -> str:
    if parsed is None or parsed.layer is None:
        return "other"
    if parsed.expert is not None and parsed.template.endswith(".weight"):
        return "expert"
    kind = source.arch.layer_kinds[parsed.layer]
    if kind is LayerKind.MAMBA and parsed.template in ("in_proj.weight", "out_proj.weight"):
        return "mamba_linear"
    return "other"


def build_report(source: ElasticSource) -> dict[str, Any]:
    """Return the inspect report as JSON-ready data (stable keys, documented in docs/cli.md)."""
    arch = source.arch
    checkpoint = source.checkpoint
    dtypes = Counter(info.dtype for info in checkpoint.tensors.values())
    report: dict[str, Any] = {
        "elastic_version": __version__,
        "checkpoint": {
            "name": source.origin.name,
            "revision": source.origin.revision,
            "shards": len(checkpoint.shard_names),
            "tensors": len(checkpoint.tensors),
            "bytes": checkpoint.total_bytes,
            "dtypes": dict(sorted(dtypes.items())),
            "quantization": source.quantization(),
        },
        "architecture": {
            "config_dialect": arch.dialect,
            "layers": arch.num_layers,
            "pattern": "".join(KIND_TO_CHAR[kind] for kind in arch.layer_kinds),
            "layer_counts": {kind.value: arch.layer_kinds.count(kind) for kind in LayerKind},
            "hidden_size": arch.hidden_size,
            "vocab_size": arch.vocab_size,
            "mamba": {
                "heads": arch.mamba_num_heads,
                "head_dim": arch.mamba_head_dim,
                "groups": arch.n_groups,
                "state": arch.ssm_state_size,
            },
            "attention": {"heads": arch.num_attention_heads, "kv_heads": arch.num_key_value_heads, "head_dim": arch.head_dim},
            "ffn": arch.intermediate_size,
            "moe": {
                "experts": arch.n_routed_experts,
                "top_k": arch.num_experts_per_tok,
                "expert_ffn": arch.moe_intermediate_size,
                "shared_expert_ffn": arch.shared_expert_intermediate_size,
                "n_group": arch.n_group,
            },
            "tie_word_embeddings": arch.tie_word_embeddings,
        },
        "budgets_from": source.budgets_from,
        "budgets": [],
        "valid": not source.problems,
        "problems": [problem.to_json() for problem in source.problems],
    }
    for budget in source.budgets:
        plan = build_plan(arch, checkpoint.config, checkpoint.tensors, budget)
        child = plan.config
        report["budgets"].append(
            {
                "name": budget.name,
                "target_params": budget.target_params,
                "partial": budget.partial,
                "params": plan.params,
                "active_params": plan.active_params,
                "bytes": estimate_bytes(source, plan),
                "layers": len(plan.layer_map),
                "hidden_size": child["hidden_size"],
            }
        )
    return report
