"""Slicing at the true Nemotron 3 Nano 30B-A3B widths, checked tensor by tensor.

Three layers (Mamba, MoE, attention) with hidden 2688, 64x64 Mamba heads in 8 groups, state 128,
32/2 attention heads x 128, 128 experts x 1856, shared expert 3712 and vocab 131072 (about 4 GB
in BF16) are sliced to a 23B-like and a 12B-like budget in one pass. Every output tensor is
compared with a cut computed here independently of the planner, by reshaping each tensor into
its segments, heads and groups.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from elastic_cli.arch.nemotron_h import parse_config
from elastic_cli.checkpoint.reader import Checkpoint
from elastic_cli.elastic.masks import Axis
from elastic_cli.elastic.slicer import plan_budgets, slice_checkpoint
from elastic_cli.elastic.source import open_source
from elastic_cli.synthetic import importance_budgets, nano_v3_config, write_checkpoint

pytestmark = pytest.mark.slow

PATTERN = "ME*"


@pytest.fixture(scope="module")
def sliced(tmp_path_factory) -> tuple[Path, Path, dict]:
    parent = tmp_path_factory.mktemp("nano-real")
    config = nano_v3_config(hybrid_override_pattern=PATTERN)
    arch = parse_config(config)
    budgets = importance_budgets(arch, [("30B", 1.0), ("23B", 0.75), ("12B", 0.4)], seed=5)
    write_checkpoint(parent, config, seed=5, budgets=budgets, max_shard_bytes=2 * 1000**3)

    output = tmp_path_factory.mktemp("children") / "out"
    source = open_source(str(parent))
    try:
        plans = plan_budgets(source, ["23B", "12B"])
        slice_checkpoint(source, plans, output, nested=True, max_shard_bytes=1000**3)
    finally:
        source.close()
    return parent, output, json.loads((parent / "elastic_config.json").read_text())


def keep(bits: str | None, length: int) -> torch.Tensor:
    if bits is None:
        return torch.arange(length)
    return torch.tensor([i for i, bit in enumerate(bits) if bit == "1"])


def expected_cut(name: str, value: torch.Tensor, masks: dict, arch) -> torch.Tensor:
    """Cut one parent tensor for a budget, from the mask semantics alone."""
    hidden = keep(masks.get("hidden"), arch.hidden_size)
    layer_masks = masks.get("per_layer", {}).get(name.split(".")[2], {}) if name.startswith("backbone.layers.") else {}
    nh, hd, groups, state = arch.mamba_num_heads, arch.mamba_head_dim, arch.n_groups, arch.ssm_state_size
    heads = keep(layer_masks.get("mamba_heads"), nh)
    channels = keep(layer_masks.get("mamba_head_channels"), hd)
    per_group = nh // groups
    kept_groups = torch.unique(heads // per_group)

    def inner(rows: torch.Tensor) -> torch.Tensor:  # [nh*hd, ...] -> kept heads and channels
        return rows.reshape(nh, hd, *rows.shape[1:])[heads][:, channels].reshape(-1, *rows.shape[1:])

    def grouped(rows: torch.Tensor) -> torch.Tensor:  # [G*N, ...] -> kept groups
        return rows.reshape(groups, state, *rows.shape[1:])[kept_groups].reshape(-1, *rows.shape[1:])

    if name == "backbone.embeddings.weight" or name == "lm_head.weight":
        return value[:, hidden]
    if name.endswith("norm_f.weight") or name.endswith(".norm.weight") and "mixer" not in name:
        return value[hidden]
    if name.endswith("mixer.in_proj.weight"):
        di, gn = nh * hd, groups * state
        z, x, b, c, dt = value.split([di, di, gn, gn, nh])
        return torch.cat([inner(z), inner(x), grouped(b), grouped(c), dt[heads]])[:, hidden]
    if name.endswith("mixer.conv1d.weight") or name.endswith("mixer.conv1d.bias"):
        di, gn = nh * hd, groups * state
        x, b, c = value.split([di, gn, gn])
        return torch.cat([inner(x), grouped(b), grouped(c)])
    if name.endswith(("A_log", ".D", "dt_bias")):
        return value[heads]
    if name.endswith("mixer.norm.weight"):
        return inner(value)
    if name.endswith("mixer.out_proj.weight"):
        return inner(value.T).T[hidden]

    attention = keep(layer_masks.get("attention_heads"), arch.num_attention_heads)
    if name.endswith("q_proj.weight"):
        return value.reshape(arch.num_attention_heads, arch.head_dim, -1)[attention].reshape(-1, value.shape[1])[:, hidden]
    if name.endswith(("k_proj.weight", "v_proj.weight")):
        return value[:, hidden]
    if name.endswith("o_proj.weight"):
        return value[hidden].reshape(-1, arch.num_attention_heads, arch.head_dim)[:, attention].reshape(len(hidden), -1)

    experts = keep(layer_masks.get("experts"), arch.n_routed_experts)
    expert_ffn = keep(layer_masks.get("expert_channels"), arch.moe_intermediate_size)
    shared_ffn = keep(layer_masks.get("shared_expert_channels"), arch.shared_expert_intermediate_size)
    if name.endswith("gate.weight"):
        return value[experts][:, hidden]
    if name.endswith("e_score_correction_bias"):
        return value[experts]
    ffn = shared_ffn if "shared_experts" in name else expert_ffn
    if name.endswith("up_proj.weight"):
        return value[ffn][:, hidden]
    if name.endswith("down_proj.weight"):
        return value[hidden][:, ffn]
    raise AssertionError(f"no expectation for {name}")


@pytest.mark.parametrize("budget", ["23B", "12B"])
def test_real_widths_sliced_tensor_by_tensor(sliced, budget):
    parent, output, document = sliced
    masks = next(entry["masks"] for entry in document["budgets"] if entry["name"] == budget)
    with Checkpoint.open(parent) as source, Checkpoint.open(output / budget) as child:
        arch = parse_config(source.config)
        experts = keep(masks.get("per_layer", {}).get("1", {}).get("experts"), arch.n_routed_experts).tolist()
        checked = 0
        for name in source.tensors:
            target = name
            if ".experts." in name:
                expert = int(name.split(".")[5])
                if expert not in experts:
                    continue
                target = name.replace(f".experts.{expert}.", f".experts.{experts.index(expert)}.")
            expected = expected_cut(name, source.read(name), masks, arch)
            actual = child.read(target)
            assert actual.dtype == expected.dtype, f"{target} dtype"
            assert torch.equal(actual, expected), f"{target} differs from the independent cut of {name}"
            checked += 1
        assert checked == len(child.tensors), "the child has tensors this test did not check"


def test_real_widths_config_fields(sliced):
    _, output, _ = sliced
    config = json.loads((output / "12B" / "config.json").read_text())

    assert config["hidden_size"] == 1072  # 0.4 * 2688 rounded to a multiple of 16
    assert config["mamba_num_heads"] == 24  # 3 of 8 heads in each of the 8 groups
    assert config["n_groups"] == 8
    assert config["num_attention_heads"] == 12  # 6 per KV head
    assert config["n_routed_experts"] == 51
    assert config["moe_intermediate_size"] == 736
    assert config["head_dim"] == 128
    assert config["mamba_head_dim"] == 64


def test_real_widths_masks_are_not_prefixes(sliced):
    _, _, document = sliced
    small = next(entry["masks"] for entry in document["budgets"] if entry["name"] == "12B")
    experts = small["per_layer"]["1"][Axis.EXPERTS.value]

    assert experts.count("1") == 51
    assert experts != "1" * 51 + "0" * (128 - 51), "masks are prefixes; index selection is not exercised"
