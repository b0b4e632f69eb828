"""Tests of the masked reference forward against transformers' NemotronH.

Unmasked, the reference must match transformers' logits. Masked, it must match transformers
running a child that these tests slice by hand from the parent's on-disk tensors, so every mask
meaning is checked against a real model of the smaller shape.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import NemotronHConfig, NemotronHForCausalLM

from tests.reference.masked_forward import (
    gated_group_rms_norm,
    masked_forward,
    read_layer_kinds,
    read_settings,
    resolve_masks,
    rms_norm_over_kept,
    route_tokens,
)

# Logits may differ from transformers' by this fraction of the largest logit magnitude. The
# reference scans step by step while transformers uses the chunked SSD form, which reorders fp32
# sums. The largest gap measured on these models (torch 2.13.0, CPU) was 1e-6.
RELATIVE_TOLERANCE = 2e-5

BATCH = 2
SEQ = 12

TINY_CONFIG = {
    "vocab_size": 160,
    "hidden_size": 64,
    "mamba_num_heads": 8,
    "mamba_head_dim": 8,
    "n_groups": 2,
    "ssm_state_size": 16,
    "conv_kernel": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "n_routed_experts": 6,
    "moe_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 48,
    "num_experts_per_tok": 2,
    "routed_scaling_factor": 2.5,
}

GROUPED_ROUTER = {"n_routed_experts": 8, "n_group": 2, "topk_group": 1}

BLOCK_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}


def layout_of(pattern: str) -> list[str]:
    """Convert a hybrid_override_pattern string to the layers_block_type list transformers writes."""
    return [BLOCK_TYPES[char] for char in pattern]


# ---------------------------------------------------------------------------------------------
# Building parents and children
# ---------------------------------------------------------------------------------------------


def randomise_parameters(model: NemotronHForCausalLM, generator: torch.Generator) -> None:
    """Draw every weight at a scale that keeps activations and logits of order one."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    with torch.no_grad():
        for name, tensor in named:
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith(("norm.weight", "norm_f.weight")):
                tensor.copy_(1.0 + 0.2 * noise)
            elif name.endswith("A_log"):
                tensor.copy_(torch.log(1.0 + 7.0 * torch.rand(tensor.shape, generator=generator)))
            elif name.endswith(".D"):
                tensor.copy_(noise)
            elif name.endswith("dt_bias"):
                tensor.copy_(0.5 * noise - 1.0)
            elif "conv1d" in name:
                tensor.copy_(0.5 * noise)
            elif name.endswith("embeddings.weight"):
                tensor.copy_(noise)
            elif name.endswith("bias"):
                tensor.copy_(0.1 * noise)
            else:
                tensor.copy_(noise / math.sqrt(tensor.shape[-1]))


def save_parent(
    directory: Path, seed: int, layout: list[str], **overrides
) -> tuple[NemotronHForCausalLM, dict, dict]:
    """Save a random tiny NemotronH and return (model, config.json dict, on-disk tensors)."""
    config = NemotronHConfig(**(TINY_CONFIG | overrides | {"layers_block_type": layout}))
    model = NemotronHForCausalLM(config).float().eval()
    randomise_parameters(model, torch.Generator().manual_seed(seed))
    model.save_pretrained(directory)

    config_dict = json.loads((directory / "config.json").read_text())
    tensors = load_file(directory / "model.safetensors")
    return model, config_dict, tensors


def load_child(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> NemotronHForCausalLM:
    """Write a checkpoint and load it with transformers, failing on any unloaded tensor."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, directory / "model.safetensors")

    # Eager experts because transformers 5.25.0 defaults to torch._grouped_mm, which raises "strides
    # should be multiple of 16 bytes" when a sliced width times the dtype size is not a multiple of 16.
    model, loading_info = NemotronHForCausalLM.from_pretrained(
        directory, output_loading_info=True, experts_implementation="eager"
    )
    assert not loading_info["missing_keys"], f"child is missing tensors: {loading_info['missing_keys']}"
    assert not loading_info["unexpected_keys"], f"child has unexpected tensors: {loading_info['unexpected_keys']}"
    return model.float().eval()


def transformers_logits(model: NemotronHForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    # use_cache=False because transformers 5.25.0 fails to build the cache when layer 0 is an MLP
    # or MoE layer ("'DummyLayer' object has no attribute 'get_seq_length'").
    with torch.no_grad():
        return model(input_ids, use_cache=False).logits


def random_input_ids(vocab_size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def assert_logits_match(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    assert scale > 1.0, f"logits are too small to compare (max |logit| {scale:.3g}); raise the weight scale"
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=RELATIVE_TOLERANCE * scale)


def kept_indices(keep: torch.Tensor) -> torch.Tensor:
    return keep.nonzero().squeeze(1)


def layer_indices_of(config: dict, block_type: str) -> list[int]:
    return [index for index, kind in enumerate(config["layers_block_type"]) if kind == block_type]


def slice_hidden(config: dict, tensors: dict, keep: torch.Tensor) -> tuple[dict, dict]:
    """Keep the hidden channels in `keep` in every tensor that has a hidden axis."""
    index = kept_indices(keep)
    reads_hidden = re.compile(r"(embeddings|in_proj|[qkv]_proj|up_proj|gate|lm_head)\.weight$")
    writes_hidden = re.compile(r"(out_proj|o_proj|down_proj)\.(weight|bias)$")
    hidden_vector = re.compile(r"(layers\.\d+\.norm|norm_f)\.weight$")

    sliced = {}
    for name, tensor in tensors.items():
        if reads_hidden.search(name):
            sliced[name] = tensor[:, index]
        elif writes_hidden.search(name) or hidden_vector.search(name):
            sliced[name] = tensor[index]
        else:
            sliced[name] = tensor
    return config | {"hidden_size": len(index)}, sliced


def slice_layers(config: dict, tensors: dict, keep: torch.Tensor) -> tuple[dict, dict]:
    """Remove the layers not in `keep` and renumber the rest."""
    new_index = {int(old): new for new, old in enumerate(kept_indices(keep))}
    sliced = {}
    for name, tensor in tensors.items():
        match = re.match(r"backbone\.layers\.(\d+)\.(.*)", name)
        if match is None:
            sliced[name] = tensor
        elif int(match.group(1)) in new_index:
            sliced[f"backbone.layers.{new_index[int(match.group(1))]}.{match.group(2)}"] = tensor
    block_types = [config["layers_block_type"][old] for old in new_index]
    return config | {"layers_block_type": block_types}, sliced


def slice_attention_heads(config: dict, tensors: dict, keep: torch.Tensor) -> tuple[dict, dict]:
    """Keep the query heads in `keep` in every attention layer; KV heads stay."""
    head_dim = config["head_dim"]
    rows = torch.cat([head * head_dim + torch.arange(head_dim) for head in kept_indices(keep).tolist()])
    sliced = dict(tensors)
    for layer in layer_indices_of(config, "full_attention"):
        prefix = f"backbone.layers.{layer}.mixer."
        sliced[prefix + "q_proj.weight"] = tensors[prefix + "q_proj.weight"][rows]
        sliced[prefix + "o_proj.weight"] = tensors[prefix + "o_proj.weight"][:, rows]
    return config | {"num_attention_heads": len(kept_indices(keep))}, sliced


def slice_mamba(
    config: dict, tensors: dict, keep_heads: torch.Tensor, keep_channels: torch.Tensor
) -> tuple[dict, dict]:
    """Keep the given Mamba heads and head channels in every Mamba layer, removing groups left without a head."""
    num_heads = config["mamba_num_heads"]
    head_dim = config["mamba_head_dim"]
    n_groups = config["n_groups"]
    state_size = config["ssm_state_size"]
    inner = num_heads * head_dim
    group_width = n_groups * state_size

    heads = kept_indices(keep_heads)
    groups = torch.unique(heads // (num_heads // n_groups))
    channels = torch.cat([head * head_dim + kept_indices(keep_channels) for head in heads.tolist()])
    group_rows = torch.cat([group * state_size + torch.arange(state_size) for group in groups.tolist()])

    # in_proj rows are [z | x | B | C | dt] and conv1d channels are [x | B | C].
    in_proj_rows = torch.cat(
        [
            channels,
            inner + channels,
            2 * inner + group_rows,
            2 * inner + group_width + group_rows,
            2 * inner + 2 * group_width + heads,
        ]
    )
    conv_channels = torch.cat([channels, inner + group_rows, inner + group_width + group_rows])

    sliced = dict(tensors)
    for layer in layer_indices_of(config, "linear_attention"):
        prefix = f"backbone.layers.{layer}.mixer."
        sliced[prefix + "in_proj.weight"] = tensors[prefix + "in_proj.weight"][in_proj_rows]
        sliced[prefix + "conv1d.weight"] = tensors[prefix + "conv1d.weight"][conv_channels]
        sliced[prefix + "conv1d.bias"] = tensors[prefix + "conv1d.bias"][conv_channels]
        for name in ("A_log", "D", "dt_bias"):
            sliced[prefix + name] = tensors[prefix + name][heads]
        sliced[prefix + "norm.weight"] = tensors[prefix + "norm.weight"][channels]
        sliced[prefix + "out_proj.weight"] = tensors[prefix + "out_proj.weight"][:, channels]

    child_fields = {
        "mamba_num_heads": len(heads),
        "mamba_head_dim": len(kept_indices(keep_channels)),
        "n_groups": len(groups),
    }
    return config | child_fields, sliced


def slice_mlp_channels(
    config: dict, tensors: dict, mlp_prefix: str, keep: torch.Tensor, size_field: str
) -> tuple[dict, dict]:
    """Keep the channels in `keep` of every ReLU² MLP whose names end in `mlp_prefix`."""
    index = kept_indices(keep)
    sliced = dict(tensors)
    for name, tensor in tensors.items():
        if re.search(re.escape(mlp_prefix) + r"up_proj\.(weight|bias)$", name):
            sliced[name] = tensor[index]
        elif re.search(re.escape(mlp_prefix) + r"down_proj\.weight$", name):
            sliced[name] = tensor[:, index]
    return config | {size_field: len(index)}, sliced


def slice_experts(config: dict, tensors: dict, keep: torch.Tensor) -> tuple[dict, dict]:
    """Keep the routed experts in `keep` in every MoE layer and renumber them."""
    index = kept_indices(keep)
    new_number = {int(old): new for new, old in enumerate(index)}
    sliced = {}
    for name, tensor in tensors.items():
        expert_match = re.match(r"(.*\.mixer\.experts\.)(\d+)\.(.*)", name)
        if expert_match is not None:
            old = int(expert_match.group(2))
            if old in new_number:
                sliced[f"{expert_match.group(1)}{new_number[old]}.{expert_match.group(3)}"] = tensor
        elif name.endswith(("mixer.gate.weight", "mixer.gate.e_score_correction_bias")):
            sliced[name] = tensor[index]
        else:
            sliced[name] = tensor
    return config | {"n_routed_experts": len(index)}, sliced


def masks_for_every_layer(config: dict, block_type: str, layer_masks: dict) -> dict:
    return {layer: layer_masks for layer in layer_indices_of(config, block_type)}


# ---------------------------------------------------------------------------------------------
# Unmasked forward against transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "dialect", "seed", "overrides"),
    [
        ("MEM*E", "hybrid_override_pattern", 1, {}),
        ("M-M*-", "layers_block_type", 2, {"time_step_limit": (0.05, 0.3)}),
        ("ME*EM", "hybrid_override_pattern", 3, GROUPED_ROUTER),
        ("E*M-", "layers_block_type", 4, {"tie_word_embeddings": True, "use_bias": True, "mlp_bias": True}),
    ],
    ids=["moe", "dense-clamped-dt", "grouped-router", "biases-tied-flag"],
)
def test_unmasked_forward_matches_transformers(tmp_path, pattern, dialect, seed, overrides):
    layout = layout_of(pattern)
    model, config, tensors = save_parent(tmp_path, seed=seed, layout=layout, **overrides)
    if dialect == "hybrid_override_pattern":
        config = {key: value for key, value in config.items() if key != "layers_block_type"}
        config["hybrid_override_pattern"] = pattern
    input_ids = random_input_ids(config["vocab_size"], seed=7)

    assert_logits_match(masked_forward(config, tensors, input_ids), transformers_logits(model, input_ids))


def test_save_pretrained_writes_backbone_names(tmp_path):
    _, _, tensors = save_parent(tmp_path, seed=3, layout=["linear_attention", "moe", "full_attention", "mlp"])

    assert "backbone.embeddings.weight" in tensors
    assert "backbone.layers.1.mixer.experts.5.up_proj.weight" in tensors
    assert "backbone.layers.1.mixer.experts.5.down_proj.weight" in tensors
    in_memory_names = [name for name in tensors if name.startswith("model.")]
    assert not in_memory_names, f"found transformers' in-memory names on disk: {in_memory_names}"


# ---------------------------------------------------------------------------------------------
# Masks against hand-sliced children
# ---------------------------------------------------------------------------------------------


def test_keep_all_masks_equal_no_masks(tmp_path):
    _, config, tensors = save_parent(tmp_path, seed=11, layout=layout_of("ME*-M"))
    settings = read_settings(config)
    sizes = {
        "mamba_heads": settings.mamba_num_heads,
        "mamba_head_channels": settings.mamba_head_dim,
        "attention_heads": settings.num_attention_heads,
        "ffn_channels": settings.intermediate_size,
        "experts": settings.n_routed_experts,
        "expert_channels": settings.moe_intermediate_size,
        "shared_expert_channels": settings.moe_shared_expert_intermediate_size,
    }
    kinds_masks = {
        "mamba": ("mamba_heads", "mamba_head_channels"),
        "attention": ("attention_heads",),
        "mlp": ("ffn_channels",),
        "moe": ("experts", "expert_channels", "shared_expert_channels"),
    }
    keep_all = {
        "hidden": torch.ones(settings.hidden_size, dtype=torch.bool),
        "layers": torch.ones(len(settings.layer_kinds), dtype=torch.bool),
        "per_layer": {
            layer: {name: torch.ones(sizes[name], dtype=torch.bool) for name in kinds_masks[kind]}
            for layer, kind in enumerate(settings.layer_kinds)
        },
    }
    input_ids = random_input_ids(config["vocab_size"], seed=12)

    with_masks = masked_forward(config, tensors, input_ids, keep_all)
    without_masks = masked_forward(config, tensors, input_ids)

    assert torch.equal(with_masks, without_masks)


def test_hidden_mask_matches_narrower_child(tmp_path):
    _, config, tensors = save_parent(tmp_path / "parent", seed=21, layout=layout_of("ME*-"))
    keep = torch.rand(config["hidden_size"], generator=torch.Generator().manual_seed(22)) < 0.7
    input_ids = random_input_ids(config["vocab_size"], seed=23)

    child = load_child(tmp_path / "child", *slice_hidden(config, tensors, keep))

    masked = masked_forward(config, tensors, input_ids, {"hidden": keep})
    assert_logits_match(masked, transformers_logits(child, input_ids))


def test_layers_mask_matches_shallower_child(tmp_path):
    _, config, tensors = save_parent(tmp_path / "parent", seed=31, layout=layout_of("MEM*E-"))
    keep = torch.tensor([True, False, True, False, True, True])
    input_ids = random_input_ids(config["vocab_size"], seed=32)

    child = load_child(tmp_path / "child", *slice_layers(config, tensors, keep))

    masked = masked_forward(config, tensors, input_ids, {"layers": keep})
    assert_logits_match(masked, transformers_logits(child, input_ids))


def test_attention_heads_mask_matches_child(tmp_path):
    _, config, tensors = save_parent(tmp_path / "parent", seed=41, layout=layout_of("*M*"))
    # Two of the four query heads that share each KV head, so the child keeps a valid GQA ratio.
    keep = torch.tensor([True, False, False, True, False, True, True, False])
    input_ids = random_input_ids(config["vocab_size"], seed=42)
    masks = {"per_layer": masks_for_every_layer(config, "full_attention", {"attention_heads": keep})}

    child = load_child(tmp_path / "child", *slice_attention_heads(config, tensors, keep))

    assert_logits_match(masked_forward(config, tensors, input_ids, masks), transformers_logits(child, input_ids))


@pytest.mark.parametrize(
    ("keep_heads", "keep_channels"),
    [
        ([1, 0, 1, 0, 0, 1, 1, 0], [1] * 8),
        ([1] * 8, [0, 1, 1, 0, 1, 1, 0, 1]),
        ([0, 1, 1, 0, 1, 0, 0, 1], [1, 1, 0, 1, 0, 1, 1, 1]),
        ([0, 0, 0, 0, 1, 0, 1, 1], [1] * 8),
    ],
    ids=["heads", "head-channels", "heads-and-channels", "whole-group-dropped"],
)
def test_mamba_masks_match_child(tmp_path, keep_heads, keep_channels):
    _, config, tensors = save_parent(tmp_path / "parent", seed=51, layout=layout_of("M*M-"))
    keep_heads = torch.tensor(keep_heads, dtype=torch.bool)
    keep_channels = torch.tensor(keep_channels, dtype=torch.bool)
    input_ids = random_input_ids(config["vocab_size"], seed=52)
    layer_masks = {"mamba_heads": keep_heads, "mamba_head_channels": keep_channels}
    masks = {"per_layer": masks_for_every_layer(config, "linear_attention", layer_masks)}

    child = load_child(tmp_path / "child", *slice_mamba(config, tensors, keep_heads, keep_channels))

    assert_logits_match(masked_forward(config, tensors, input_ids, masks), transformers_logits(child, input_ids))


@pytest.mark.parametrize(
    ("overrides", "keep"),
    [
        ({}, [1, 0, 1, 1, 0, 1]),
        (GROUPED_ROUTER, [0, 1, 1, 0, 1, 0, 0, 1]),
    ],
    ids=["flat-router", "grouped-router"],
)
def test_experts_mask_matches_child(tmp_path, overrides, keep):
    layout = layout_of("EME")
    _, config, tensors = save_parent(tmp_path / "parent", seed=61, layout=layout, **overrides)
    keep = torch.tensor(keep, dtype=torch.bool)
    input_ids = random_input_ids(config["vocab_size"], seed=62)
    masks = {"per_layer": masks_for_every_layer(config, "moe", {"experts": keep})}

    child = load_child(tmp_path / "child", *slice_experts(config, tensors, keep))

    assert_logits_match(masked_forward(config, tensors, input_ids, masks), transformers_logits(child, input_ids))


@pytest.mark.parametrize(
    ("block_type", "mask_name", "mlp_prefix", "size_field"),
    [
        ("mlp", "ffn_channels", "mixer.", "intermediate_size"),
        ("moe", "expert_channels", None, "moe_intermediate_size"),
        ("moe", "shared_expert_channels", "shared_experts.", "moe_shared_expert_intermediate_size"),
    ],
)
def test_mlp_channel_masks_match_child(tmp_path, block_type, mask_name, mlp_prefix, size_field):
    layout = layout_of("E-ME")
    _, config, tensors = save_parent(tmp_path / "parent", seed=71, layout=layout, mlp_bias=True)
    keep = torch.rand(config[size_field], generator=torch.Generator().manual_seed(72)) < 0.6
    input_ids = random_input_ids(config["vocab_size"], seed=73)
    masks = {"per_layer": masks_for_every_layer(config, block_type, {mask_name: keep})}

    # Routed experts have one prefix each, so their channels are sliced expert by expert.
    if mlp_prefix is None:
        prefixes = [f"experts.{expert}." for expert in range(config["n_routed_experts"])]
    else:
        prefixes = [mlp_prefix]
    child_config, child_tensors = config, tensors
    for prefix in prefixes:
        child_config, child_tensors = slice_mlp_channels(child_config, child_tensors, prefix, keep, size_field)
    child = load_child(tmp_path / "child", child_config, child_tensors)

    assert_logits_match(masked_forward(config, tensors, input_ids, masks), transformers_logits(child, input_ids))


def test_bf16_tensors_run_in_fp32(tmp_path):
    _, config, tensors = save_parent(tmp_path, seed=85, layout=layout_of("ME*-"))
    bf16_tensors = {name: tensor.bfloat16() for name, tensor in tensors.items()}
    upcast_tensors = {name: tensor.float() for name, tensor in bf16_tensors.items()}
    input_ids = random_input_ids(config["vocab_size"], seed=86)

    logits = masked_forward(config, bf16_tensors, input_ids)

    assert logits.dtype == torch.float32
    assert torch.equal(logits, masked_forward(config, upcast_tensors, input_ids))


def test_ffn_channel_mask_equals_zeroed_up_proj_row(tmp_path):
    _, config, tensors = save_parent(tmp_path, seed=81, layout=layout_of("M-*-"))
    dropped_channel = 17
    keep = torch.ones(config["intermediate_size"], dtype=torch.bool)
    keep[dropped_channel] = False
    zeroed = dict(tensors)
    zeroed["backbone.layers.3.mixer.up_proj.weight"] = tensors["backbone.layers.3.mixer.up_proj.weight"].clone()
    zeroed["backbone.layers.3.mixer.up_proj.weight"][dropped_channel] = 0.0
    input_ids = random_input_ids(config["vocab_size"], seed=82)

    masked = masked_forward(config, tensors, input_ids, {"per_layer": {3: {"ffn_channels": keep}}})

    assert torch.equal(masked, masked_forward(config, zeroed, input_ids))
    assert not torch.equal(masked, masked_forward(config, tensors, input_ids)), "dropping the channel changed nothing"


def test_all_masks_together_match_child(tmp_path):
    _, config, tensors = save_parent(tmp_path / "parent", seed=91, layout=layout_of("MEM*E-"))
    generator = torch.Generator().manual_seed(92)
    keep_hidden = torch.rand(config["hidden_size"], generator=generator) < 0.75
    keep_layers = torch.tensor([True, True, False, True, True, True])
    keep_mamba_heads = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    keep_mamba_channels = torch.tensor([1, 0, 1, 1, 1, 1, 0, 1], dtype=torch.bool)
    keep_attention_heads = torch.tensor([0, 1, 1, 0, 1, 1, 0, 0], dtype=torch.bool)
    keep_experts = torch.tensor([1, 1, 0, 1, 1, 0], dtype=torch.bool)
    keep_expert_channels = torch.rand(config["moe_intermediate_size"], generator=generator) < 0.7
    keep_shared_channels = torch.rand(config["moe_shared_expert_intermediate_size"], generator=generator) < 0.7
    keep_ffn_channels = torch.rand(config["intermediate_size"], generator=generator) < 0.7
    input_ids = random_input_ids(config["vocab_size"], seed=93)

    mamba_masks = {"mamba_heads": keep_mamba_heads, "mamba_head_channels": keep_mamba_channels}
    moe_masks = {
        "experts": keep_experts,
        "expert_channels": keep_expert_channels,
        "shared_expert_channels": keep_shared_channels,
    }
    per_layer = {}
    per_layer |= masks_for_every_layer(config, "linear_attention", mamba_masks)
    per_layer |= masks_for_every_layer(config, "full_attention", {"attention_heads": keep_attention_heads})
    per_layer |= masks_for_every_layer(config, "moe", moe_masks)
    per_layer |= masks_for_every_layer(config, "mlp", {"ffn_channels": keep_ffn_channels})
    masks = {"hidden": keep_hidden, "layers": keep_layers, "per_layer": per_layer}

    child_config, child_tensors = slice_hidden(config, tensors, keep_hidden)
    child_config, child_tensors = slice_mamba(child_config, child_tensors, keep_mamba_heads, keep_mamba_channels)
    child_config, child_tensors = slice_attention_heads(child_config, child_tensors, keep_attention_heads)
    child_config, child_tensors = slice_mlp_channels(
        child_config, child_tensors, "shared_experts.", keep_shared_channels, "moe_shared_expert_intermediate_size"
    )
    for expert in range(config["n_routed_experts"]):
        child_config, child_tensors = slice_mlp_channels(
            child_config, child_tensors, f"experts.{expert}.", keep_expert_channels, "moe_intermediate_size"
        )
    child_config, child_tensors = slice_experts(child_config, child_tensors, keep_experts)
    child_config, child_tensors = slice_mlp_channels(
        child_config, child_tensors, "mixer.", keep_ffn_channels, "intermediate_size"
    )
    child_config, child_tensors = slice_layers(child_config, child_tensors, keep_layers)
    child = load_child(tmp_path / "child", child_config, child_tensors)

    assert_logits_match(masked_forward(config, tensors, input_ids, masks), transformers_logits(child, input_ids))


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def test_rms_norm_over_kept_channels():
    generator = torch.Generator().manual_seed(101)
    hidden = torch.randn(3, 10, generator=generator)
    weight = torch.randn(10, generator=generator)
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    index = kept_indices(keep)

    output = rms_norm_over_kept(hidden, weight, keep.float(), 1e-5)

    kept_hidden = hidden[:, index]
    expected = weight[index] * kept_hidden / torch.sqrt(kept_hidden.square().mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(output[:, index], expected)
    assert torch.all(output[:, ~keep] == 0), "dropped hidden channels are not zero after the norm"


def test_gated_norm_group_without_kept_channel_is_zero():
    generator = torch.Generator().manual_seed(102)
    y = torch.randn(1, 4, 8, generator=generator)
    gate = torch.randn(1, 4, 8, generator=generator)
    keep = torch.tensor([0, 0, 0, 0, 1, 0, 1, 1], dtype=torch.float32)

    output = gated_group_rms_norm(y, gate, torch.ones(8), keep, n_groups=2, epsilon=1e-5)

    assert torch.all(output[..., :4] == 0), "a group with no kept channel produced output"
    assert torch.all(output[..., 5] == 0), "a dropped channel produced output"
    assert torch.all(output[..., [4, 6, 7]] != 0)


def test_route_tokens_rejects_too_few_kept_experts(tmp_path):
    _, config, tensors = save_parent(tmp_path, seed=111, layout=["moe"])
    settings = read_settings(config)
    keep = torch.zeros(settings.n_routed_experts)
    keep[2] = 1.0

    with pytest.raises(ValueError, match="fewer than num_experts_per_tok"):
        route_tokens(
            torch.randn(4, settings.hidden_size),
            tensors["backbone.layers.0.mixer.gate.weight"],
            tensors["backbone.layers.0.mixer.gate.e_score_correction_bias"],
            keep,
            settings,
        )


def test_route_tokens_never_picks_dropped_expert(tmp_path):
    _, config, tensors = save_parent(tmp_path, seed=112, layout=["moe"], **GROUPED_ROUTER)
    settings = read_settings(config)
    keep = torch.ones(settings.n_routed_experts)
    keep[[1, 6]] = 0.0

    indices, weights = route_tokens(
        torch.randn(32, settings.hidden_size, generator=torch.Generator().manual_seed(113)),
        tensors["backbone.layers.0.mixer.gate.weight"],
        tensors["backbone.layers.0.mixer.gate.e_score_correction_bias"],
        keep,
        settings,
    )

    assert not torch.isin(indices, torch.tensor([1, 6])).any(), "a dropped expert was selected"
    torch.testing.assert_close(weights.sum(-1), torch.full((32,), settings.routed_scaling_factor))


# ---------------------------------------------------------------------------------------------
# Config and mask parsing
# ---------------------------------------------------------------------------------------------


def test_layer_kinds_from_both_dialects():
    expected = ("mamba", "moe", "attention", "mlp")

    assert read_layer_kinds({"hybrid_override_pattern": "ME*-"}) == expected
    assert read_layer_kinds({"layers_block_type": ["linear_attention", "moe", "full_attention", "mlp"]}) == expected
    assert read_layer_kinds({"layers_block_type": ["mamba", "moe", "attention", "mlp"]}) == expected


def test_layer_kinds_reject_wrong_layer_count():
    with pytest.raises(ValueError, match="num_hidden_layers"):
        read_layer_kinds({"hybrid_override_pattern": "ME*-", "num_hidden_layers": 5})


def test_settings_read_tagged_infinity_and_legacy_names():
    settings = read_settings(
        {"hybrid_override_pattern": "M", "time_step_limit": [0.0, {"__float__": "Infinity"}], "mamba_n_groups": 4}
    )
    legacy = read_settings({"hybrid_override_pattern": "M", "mamba_dt_limit": [0.001, 0.1], "mamba_d_conv": 3})

    assert settings.time_step_limit == (0.0, math.inf)
    assert settings.n_groups == 4
    assert legacy.time_step_limit == (0.001, 0.1)
    assert legacy.conv_kernel == 3


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        ({"hiden": torch.ones(64, dtype=torch.bool)}, "unknown mask keys"),
        ({"hidden": torch.ones(63, dtype=torch.bool)}, r"shape \(64,\)"),
        ({"hidden": torch.ones(64)}, "bool tensor"),
        ({"hidden": torch.zeros(64, dtype=torch.bool)}, "keeps no channel"),
        ({"per_layer": {"0": {}}}, "not an int"),
        ({"per_layer": {4: {}}}, "out of range"),
        ({"per_layer": {0: {"experts": torch.ones(6, dtype=torch.bool)}}}, "mamba layer"),
    ],
)
def test_resolve_masks_rejects_malformed_masks(masks, message):
    settings = read_settings(TINY_CONFIG | {"hybrid_override_pattern": "ME*-"})

    with pytest.raises(ValueError, match=message):
        resolve_masks(settings, masks)
