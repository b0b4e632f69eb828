"""Slice plans against hand-computed indices, configs and counts (no tensor data needed).

The validator's routing-group rules are also checked against transformers' NemotronH router: a
budget at the limit is sliced and run, and models built from configs that break a rule show
the router's failure.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from elastic_cli.arch.nemotron_h import parse_config
from elastic_cli.checkpoint.safetensors_io import TensorInfo
from elastic_cli.checkpoint.torch_dtypes import TORCH_TO_DTYPE
from elastic_cli.elastic.masks import LAYER_AXES, Axis, Budget, axis_length
from elastic_cli.elastic.plan import build_plan
from elastic_cli.elastic.slicer import _warn_unaligned_experts
from elastic_cli.elastic.validate import validate_budgets
from elastic_cli.synthetic import nano_v3_config, template_shapes, tensor_dtype, tiny_config, write_checkpoint
from tests.reference.masked_forward import masked_forward


def header_only(config: dict) -> dict[str, TensorInfo]:
    arch = parse_config(config)
    return {
        name: TensorInfo(Path(), TORCH_TO_DTYPE[tensor_dtype(name)], shape, 0, 0)
        for name, shape in template_shapes(arch).items()
    }


def make_budget(config: dict, name: str = "child", hidden=None, layers=None, per_layer=None) -> Budget:
    """Build a budget keeping everything except the given masks (index lists per axis)."""
    arch = parse_config(config)

    def mask(length: int, keep: list[int] | None) -> tuple[bool, ...]:
        if keep is None:
            return (True,) * length
        return tuple(i in keep for i in range(length))

    layer_masks = []
    for layer, kind in enumerate(arch.layer_kinds):
        overrides = (per_layer or {}).get(layer, {})
        layer_masks.append(
            tuple((axis, mask(axis_length(arch, axis), overrides.get(axis))) for axis in LAYER_AXES[kind])
        )
    return Budget(
        name,
        None,
        False,
        mask(arch.hidden_size, hidden),
        mask(arch.num_layers, layers),
        tuple(layer_masks),
    )


def tensor(plan, target: str):
    return next(t for t in plan.tensors if t.target == target)


def test_mamba_in_proj_rows_cut_segment_by_segment():
    # 4 heads x 2 channels, 2 groups, state 3: in_proj rows [z 8 | x 8 | B 6 | C 6 | dt 4] = 32.
    config = tiny_config("M", mamba_num_heads=4, mamba_head_dim=2, n_groups=2, ssm_state_size=3)
    budget = make_budget(config, per_layer={0: {Axis.MAMBA_HEADS: [0, 3]}})
    plan = build_plan(parse_config(config), config, header_only(config), budget)

    in_proj = tensor(plan, "backbone.layers.0.mixer.in_proj.weight")
    z = [0, 1, 6, 7]  # heads 0 and 3, channels 0..1
    x = [8 + i for i in z]
    b = [16, 17, 18, 19, 20, 21]  # both groups keep one head, so B and C stay whole
    c = [22 + i for i in range(6)]
    dt = [28, 31]
    assert in_proj.keep[0] == tuple(z + x + b + c + dt)
    assert in_proj.keep[1] is None
    assert in_proj.target_shape == (22, 128)

    conv = tensor(plan, "backbone.layers.0.mixer.conv1d.weight")
    assert conv.keep[0] == tuple(z + [8 + i for i in range(12)])
    assert conv.target_shape == (16, 1, 4)
    assert tensor(plan, "backbone.layers.0.mixer.A_log").keep == ((0, 3),)
    assert tensor(plan, "backbone.layers.0.mixer.norm.weight").keep == (tuple(z),)
    assert tensor(plan, "backbone.layers.0.mixer.out_proj.weight").keep == (None, tuple(z))
    assert plan.config["mamba_num_heads"] == 2
    assert plan.config["n_groups"] == 2


def test_mamba_whole_group_drop_removes_b_c_and_shrinks_groups():
    config = tiny_config("M", mamba_num_heads=4, mamba_head_dim=2, n_groups=2, ssm_state_size=3)
    budget = make_budget(config, per_layer={0: {Axis.MAMBA_HEADS: [2, 3], Axis.MAMBA_HEAD_CHANNELS: [1]}})
    plan = build_plan(parse_config(config), config, header_only(config), budget)

    in_proj = tensor(plan, "backbone.layers.0.mixer.in_proj.weight")
    z = [5, 7]  # heads 2 and 3, channel 1 only
    x = [13, 15]
    b = [19, 20, 21]  # group 1 only
    c = [25, 26, 27]
    dt = [30, 31]
    assert in_proj.keep[0] == tuple(z + x + b + c + dt)
    assert plan.config["n_groups"] == 1
    assert plan.config["mamba_num_heads"] == 2
    assert plan.config["mamba_head_dim"] == 1


def test_attention_heads_cut_q_rows_and_o_columns():
    config = tiny_config("*", num_attention_heads=4, num_key_value_heads=2, head_dim=2)
    budget = make_budget(config, per_layer={0: {Axis.ATTENTION_HEADS: [1, 2]}})
    plan = build_plan(parse_config(config), config, header_only(config), budget)

    assert tensor(plan, "backbone.layers.0.mixer.q_proj.weight").keep == ((2, 3, 4, 5), None)
    assert tensor(plan, "backbone.layers.0.mixer.o_proj.weight").keep == (None, (2, 3, 4, 5))
    assert tensor(plan, "backbone.layers.0.mixer.k_proj.weight").is_copy
    assert plan.config["num_attention_heads"] == 2
    assert plan.config["num_key_value_heads"] == 2
    assert plan.config["head_dim"] == 2


def test_experts_and_layers_renumbered_contiguously():
    config = tiny_config("MEME", n_routed_experts=4, num_experts_per_tok=2)
    budget = make_budget(config, layers=[0, 1, 3], per_layer={1: {Axis.EXPERTS: [1, 3]}, 3: {Axis.EXPERTS: [0, 2]}})
    plan = build_plan(parse_config(config), config, header_only(config), budget)
    names = {t.target: t.source for t in plan.tensors}

    assert names["backbone.layers.1.mixer.experts.0.up_proj.weight"] == "backbone.layers.1.mixer.experts.1.up_proj.weight"
    assert names["backbone.layers.1.mixer.experts.1.down_proj.weight"] == "backbone.layers.1.mixer.experts.3.down_proj.weight"
    assert names["backbone.layers.2.mixer.experts.1.up_proj.weight"] == "backbone.layers.3.mixer.experts.2.up_proj.weight"
    assert "backbone.layers.1.mixer.experts.2.up_proj.weight" not in names
    assert not any(source.startswith("backbone.layers.2.") for source in names.values())
    assert tensor(plan, "backbone.layers.1.mixer.gate.weight").keep[0] == (1, 3)
    assert tensor(plan, "backbone.layers.1.mixer.gate.e_score_correction_bias").keep == ((1, 3),)
    assert plan.config["hybrid_override_pattern"] == "MEE"
    assert plan.config["num_hidden_layers"] == 3
    assert plan.config["n_routed_experts"] == 2
    assert plan.layer_map == (0, 1, 3)


def test_plan_orders_tensors_naturally():
    config = tiny_config("M" * 12)
    plan = build_plan(parse_config(config), config, header_only(config), make_budget(config, layers=list(range(1, 12))))
    layers = [int(t.target.split(".")[2]) for t in plan.tensors if t.target.startswith("backbone.layers.")]
    assert layers == sorted(layers)
    assert layers[-1] == 10


def test_hidden_cut_applies_to_every_hidden_dimension():
    config = tiny_config("M*E-", hidden_size=32, vocab_size=64, intermediate_size=16)
    hidden = list(range(0, 32, 2))
    plan = build_plan(parse_config(config), config, header_only(config), make_budget(config, hidden=hidden))

    assert tensor(plan, "backbone.embeddings.weight").keep == (None, tuple(hidden))
    assert tensor(plan, "lm_head.weight").keep == (None, tuple(hidden))
    assert tensor(plan, "backbone.norm_f.weight").keep == (tuple(hidden),)
    assert tensor(plan, "backbone.layers.0.norm.weight").keep == (tuple(hidden),)
    assert tensor(plan, "backbone.layers.0.mixer.out_proj.weight").keep[0] == tuple(hidden)
    assert tensor(plan, "backbone.layers.1.mixer.k_proj.weight").keep == (None, tuple(hidden))
    assert tensor(plan, "backbone.layers.2.mixer.gate.weight").keep == (None, tuple(hidden))
    assert tensor(plan, "backbone.layers.3.mixer.down_proj.weight").keep[0] == tuple(hidden)
    assert plan.config["hidden_size"] == 16


def test_heterogeneous_ffn_widths_zero_padded_to_widest():
    config = tiny_config("-M-", intermediate_size=8)
    budget = make_budget(config, per_layer={0: {Axis.FFN_CHANNELS: [0, 2, 4, 6]}, 2: {Axis.FFN_CHANNELS: [1, 3]}})
    plan = build_plan(parse_config(config), config, header_only(config), budget)

    assert tensor(plan, "backbone.layers.0.mixer.up_proj.weight").keep[0] == (0, 2, 4, 6)
    assert tensor(plan, "backbone.layers.2.mixer.up_proj.weight").keep[0] == (1, 3, -1, -1)
    assert tensor(plan, "backbone.layers.2.mixer.down_proj.weight").keep[1] == (1, 3, -1, -1)
    assert plan.config["intermediate_size"] == 4


def test_native_dialect_config_rewritten_in_native_dialect():
    config = tiny_config("MEM*")
    del config["hybrid_override_pattern"]
    del config["num_hidden_layers"]
    config["layers_block_type"] = ["linear_attention", "moe", "linear_attention", "full_attention"]
    plan = build_plan(parse_config(config), config, header_only(config), make_budget(config, layers=[0, 1, 3]))

    assert plan.config["layers_block_type"] == ["linear_attention", "moe", "full_attention"]
    assert "hybrid_override_pattern" not in plan.config
    assert "num_hidden_layers" not in plan.config


def test_full_nano_v3_counts_match_published_totals():
    config = nano_v3_config()
    arch = parse_config(config)
    plan = build_plan(arch, config, header_only(config), make_budget(config))

    assert plan.params == pytest.approx(31.6e9, rel=0.005), "Nemotron 3 Nano total parameter count regressed"
    assert plan.active_params == pytest.approx(3.6e9, rel=0.02), "Nemotron 3 Nano active parameter count regressed"
    assert all(t.is_copy for t in plan.tensors)


def test_validate_reports_budget_layer_and_axis():
    config = tiny_config("M*E")
    arch = parse_config(config)
    full = make_budget(config, name="full")
    odd_heads = make_budget(config, name="small", per_layer={0: {Axis.MAMBA_HEADS: [0, 1, 2, 4]}})
    problems = validate_budgets(arch, [full, odd_heads])

    assert len(problems) == 1
    assert (problems[0].budget, problems[0].layer, problems[0].axis) == ("small", 0, "mamba_heads")


def test_validate_rejects_non_nested_budgets():
    config = tiny_config("E")
    arch = parse_config(config)
    full = make_budget(config, name="full")
    mid = make_budget(config, name="mid", per_layer={0: {Axis.EXPERTS: [0, 1, 2, 3]}})
    small = make_budget(config, name="small", per_layer={0: {Axis.EXPERTS: [0, 1, 2, 5]}})
    problems = validate_budgets(arch, [full, mid, small])

    assert [(p.budget, p.layer, p.axis) for p in problems] == [("small", 0, "experts")]
    assert "first index 5" in problems[0].message


def test_validate_rejects_unequal_widths_across_layers():
    config = tiny_config("*M*")
    arch = parse_config(config)
    budget = make_budget(config, per_layer={0: {Axis.ATTENTION_HEADS: [0, 4]}})
    problems = validate_budgets(arch, [make_budget(config, name="full"), budget])

    assert [(p.layer, p.axis) for p in problems] == [(2, "attention_heads")]
    assert "layer 0 keeps 2" in problems[0].message
    assert "num_attention_heads" in problems[0].message


def test_validate_requires_partial_flag_on_dropping_parent():
    config = tiny_config("M")
    arch = parse_config(config)
    problems = validate_budgets(arch, [make_budget(config, name="top", hidden=list(range(64)))])

    assert len(problems) == 1
    assert "partial" in problems[0].message


# ---------------------------------------------------------------------------------------------
# MoE routing groups: the rules that transformers' group-limited top-k router needs


def routed_config(pattern: str = "E", **overrides) -> dict:
    """Return a tiny config with 8 experts in 2 routing groups of 4, of which the router selects 1."""
    settings = {"n_routed_experts": 8, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2}
    settings.update(overrides)
    return tiny_config(pattern, **settings)


@pytest.mark.parametrize(
    ("overrides", "experts"),
    [
        ({}, [0, 4]),
        ({"n_group": 1, "num_experts_per_tok": 1}, [3]),
    ],
    ids=["two-groups", "one-group"],
)
def test_validate_rejects_single_expert_groups(overrides, experts):
    config = routed_config(**overrides)
    budget = make_budget(config, per_layer={0: {Axis.EXPERTS: experts}})
    problems = validate_budgets(parse_config(config), [make_budget(config, name="full"), budget])

    assert [(p.budget, p.layer, p.axis) for p in problems] == [("child", 0, "experts")]
    assert "1 expert(s) per routing group" in problems[0].message
    assert "two best experts" in problems[0].message


def test_validate_rejects_too_few_selectable_experts():
    config = routed_config(num_experts_per_tok=3)
    budget = make_budget(config, per_layer={0: {Axis.EXPERTS: [0, 1, 4, 5]}})
    problems = validate_budgets(parse_config(config), [make_budget(config, name="full"), budget])

    assert [(p.budget, p.layer, p.axis) for p in problems] == [("child", 0, "experts")]
    assert "offer 2 experts" in problems[0].message
    assert "num_experts_per_tok 3" in problems[0].message


@pytest.mark.parametrize(
    ("top_k", "experts"),
    [(2, [0, 1, 4, 5]), (3, [0, 1, 2, 4, 5, 6])],
    ids=["two-per-group", "top-k-per-group"],
)
def test_validate_accepts_routing_groups_at_limit(top_k, experts):
    config = routed_config(num_experts_per_tok=top_k)
    budget = make_budget(config, per_layer={0: {Axis.EXPERTS: experts}})

    assert validate_budgets(parse_config(config), [make_budget(config, name="full"), budget]) == []


def build_router_model(config: dict):
    """Build a transformers NemotronH model with random weights from a config dictionary."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**config)).eval()


def test_router_fails_on_single_expert_groups():
    # The child of the two-groups case above: 2 experts left in 2 routing groups.
    model = build_router_model(routed_config(n_routed_experts=2))

    with pytest.raises(RuntimeError, match="selected index k out of range"), torch.no_grad():
        model(torch.randint(0, 512, (1, 5)), use_cache=False)


def test_router_picks_rejected_groups_below_top_k():
    # The child of the too-few-selectable case above: 2 experts in each of 2 groups, and a top-3
    # taken from the 1 selected group.
    config = routed_config(n_routed_experts=4, num_experts_per_tok=3)
    router = build_router_model(config).model.layers[0].mixer.gate

    with torch.no_grad():
        _, _, indices = router(torch.randn(16, config["hidden_size"], generator=torch.Generator().manual_seed(1)))

    groups_per_token = [len({expert // 2 for expert in token}) for token in indices.tolist()]
    assert groups_per_token == [2] * 16, "a top-3 from 2 selectable experts should spill into the rejected group"


def test_routing_limit_child_matches_masked_parent(tmp_path):
    # Imported here because that module skips itself without transformers.
    from tests.test_slice_golden import ATOL, RTOL, parent_tensors, reference_masks, sliced_logits

    config = routed_config("ME")
    parent = tmp_path / "parent"
    parent.mkdir()
    write_checkpoint(parent, config, seed=7)
    budget = make_budget(config, per_layer={1: {Axis.EXPERTS: [0, 1, 4, 5]}})
    input_ids = torch.randint(0, config["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3))

    expected = masked_forward(config, parent_tensors(parent), input_ids, reference_masks(budget))
    actual = sliced_logits(parent, budget, tmp_path, input_ids)

    assert json.loads((tmp_path / "child" / "config.json").read_text())["n_routed_experts"] == 4
    assert expected.abs().max() > 0.1, "reference logits are degenerate; the test would prove nothing"
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


def expert_width_budget(config: dict, width: int) -> Budget:
    return make_budget(config, per_layer={2: {Axis.EXPERT_CHANNELS: list(range(width))}})


@pytest.mark.parametrize(("width", "warned"), [(36, True), (40, False)])
def test_unaligned_expert_width_warned(caplog, width, warned):
    config = tiny_config("M*E", moe_intermediate_size=48)
    plan = build_plan(parse_config(config), config, header_only(config), expert_width_budget(config, width))

    with caplog.at_level("WARNING", logger="elastic_cli"):
        _warn_unaligned_experts(plan)

    assert plan.config["moe_intermediate_size"] == width
    assert ("moe_intermediate_size 36 is not a multiple of 8" in caplog.text) is warned


def test_unaligned_expert_width_fails_in_transformers():
    """The warning's premise: transformers' default expert kernel rejects such a child in BF16."""
    config = tiny_config("M*E", moe_intermediate_size=36)
    model = build_router_model(config).to(torch.bfloat16)

    with pytest.raises(RuntimeError, match="multiple of 16 bytes"):
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3, 4]]), use_cache=False)
