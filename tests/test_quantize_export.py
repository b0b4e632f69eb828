"""Quantization policy, export layout, validator and nesting, with scales given (no calibration).

Calibration has its own tests; here the quantizer state supplies activation amax values, so
every byte written is a function of the weights and those values alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

from elastic_cli.arch.nemotron_h import parse_config
from elastic_cli.checkpoint.reader import Checkpoint
from elastic_cli.elastic.slicer import plan_budgets, slice_checkpoint
from elastic_cli.elastic.source import open_source
from elastic_cli.errors import MaskError, UsageError
from elastic_cli.formats import fp8, nvfp4
from elastic_cli.quantize import export
from elastic_cli.quantize.pipeline import QuantizeOptions, QuantizerState, load_state, plan_for, quantize_checkpoint
from elastic_cli.quantize.policy import plan_quantization
from elastic_cli.quantize.validate import validate_quantized
from elastic_cli.synthetic import importance_budgets, nano_v3_config, tiny_config, write_checkpoint
from tests.test_plan import header_only

PATTERN = "MEM*EMEM*E"


def given_state(source, options: QuantizeOptions) -> QuantizerState:
    """Activation amax per quantized module, as calibration would store it."""
    plan = plan_for(source, options)
    state = QuantizerState(calibration={"samples": 0, "tokens": 0, "budgets": []})
    for index, decision in enumerate(plan.decisions):
        if decision.format:
            state.modules[decision.module] = export.ModuleScales(decision.format, 0.0, 1.0 + index / 7)
    for decision in plan.decisions:
        if decision.module.endswith("k_proj"):
            state.kv_amax[decision.module.rsplit(".", 1)[0]] = (2.5, 3.5)
    return state


@pytest.fixture(scope="module")
def elastic_parent(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("parent")
    config = tiny_config(PATTERN)
    budgets = importance_budgets(parse_config(config), [("full", 1.0), ("small", 0.5)], seed=3, block=16)
    write_checkpoint(folder, config, seed=3, budgets=budgets, max_shard_bytes=700_000,
                     sidecars={"generation_config.json": '{"eos_token_id": 2}\n'})
    return folder


def quantize(folder: Path, output: Path, state: QuantizerState | None = None, **options) -> QuantizerState:
    opts = QuantizeOptions(**{"format": "nvfp4", "max_shard_bytes": 600_000, **options})
    source = open_source(str(folder), require_budgets=False)
    try:
        state = state or given_state(source, opts)
        result = quantize_checkpoint(source, opts, output, state=state)
    finally:
        source.close()
    return result.state


@pytest.mark.parametrize(("fmt", "recipe"), [("nvfp4", "nvidia"), ("fp8", "nvidia"), ("nvfp4", "mixed"), ("fp8", "experts")])
def test_export_passes_validator(elastic_parent, tmp_path, fmt, recipe):
    quantize(elastic_parent, tmp_path / "q", format=fmt, recipe=recipe, kv_cache="fp8")

    assert validate_quantized(tmp_path / "q") == []


@pytest.mark.parametrize(("fmt", "recipe"), [("nvfp4", "nvidia"), ("fp8", "all-linears"), ("nvfp4", "mixed")])
def test_config_block_equals_modelopt_conversion(elastic_parent, tmp_path, fmt, recipe):
    quantize(elastic_parent, tmp_path / "q", format=fmt, recipe=recipe, kv_cache="fp8")
    document = json.loads((tmp_path / "q" / "hf_quant_config.json").read_text())
    config = json.loads((tmp_path / "q" / "config.json").read_text())

    assert config["quantization_config"] == convert_hf_quant_config_format(document)
    assert document["quantization"]["kv_cache_quant_algo"] == "FP8"
    source = json.loads((elastic_parent / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == source, "config changed beyond quantization_config"


def test_nvfp4_tensors_round_trip(elastic_parent, tmp_path):
    state = quantize(elastic_parent, tmp_path / "q", format="nvfp4", recipe="all-linears")
    with Checkpoint.open(elastic_parent) as parent, Checkpoint.open(tmp_path / "q") as child:
        module = "backbone.layers.0.mixer.in_proj"
        original = parent.read(f"{module}.weight")
        tensors = {name: child.read(name) for name in child.tensors if name.startswith(module + ".")}

        assert tensors[f"{module}.weight"].dtype == torch.uint8
        assert tensors[f"{module}.weight"].shape == (original.shape[0], original.shape[1] // 2)
        assert tensors[f"{module}.weight_scale"].dtype == torch.float8_e4m3fn
        assert tensors[f"{module}.weight_scale_2"].shape == ()
        assert float(tensors[f"{module}.weight_scale_2"]) == pytest.approx(float(original.float().abs().max()) / 2688)
        assert float(tensors[f"{module}.input_scale"]) == pytest.approx(state.modules[module].input_amax / 2688)
        restored = export.dequantize_module(tensors, module, "nvfp4", torch.float32)
        error = (restored - original.float()).pow(2).mean()
        sqnr = 10 * torch.log10(original.float().pow(2).mean() / error)
        assert sqnr > 18, f"NVFP4 round trip SQNR {sqnr:.1f} dB is below 18 dB"
        packed, scales = nvfp4.quantize(original, nvfp4.global_scale(original.float().abs().max()))
        assert torch.equal(tensors[f"{module}.weight"], packed), "exported bytes differ from the reference numerics"


def test_fused_qkv_share_scales(elastic_parent, tmp_path):
    quantize(elastic_parent, tmp_path / "q", format="fp8", recipe="all-linears")
    with Checkpoint.open(tmp_path / "q") as child:
        prefix = "backbone.layers.3.mixer"
        for suffix in ("weight_scale", "input_scale"):
            values = {float(child.read(f"{prefix}.{p}.{suffix}")) for p in ("q_proj", "k_proj", "v_proj")}
            assert len(values) == 1, f"q/k/v {suffix} differ: {values}"
        q = child.read(f"{prefix}.q_proj.weight")
        assert q.dtype == torch.float8_e4m3fn


def test_quantized_elastic_keeps_masks_and_state(elastic_parent, tmp_path):
    state = quantize(elastic_parent, tmp_path / "q")
    files = sorted(p.name for p in (tmp_path / "q").iterdir())

    assert "elastic_config.json" in files
    assert (tmp_path / "q" / "elastic_config.json").read_bytes() == (elastic_parent / "elastic_config.json").read_bytes()
    assert "generation_config.json" in files
    assert load_state(tmp_path / "q" / "elastic_quant_state.json").modules == state.modules


def test_sliced_quantized_parent_equals_quantized_child(elastic_parent, tmp_path):
    """Slicing the NVFP4 parent gives the bytes of quantizing the BF16 child with the parent's scales."""
    parent_state = quantize(elastic_parent, tmp_path / "q-parent", kv_cache="fp8")

    source = open_source(str(tmp_path / "q-parent"))
    try:
        slice_checkpoint(source, plan_budgets(source, ["small"]), tmp_path / "q-small", nested=False)
    finally:
        source.close()
    source = open_source(str(elastic_parent))
    try:
        plans = plan_budgets(source, ["small"])
        slice_checkpoint(source, plans, tmp_path / "bf16-small", nested=False)
        module_map = plans[0].module_map
    finally:
        source.close()
    child_state = QuantizerState.from_json(export.rename_state(parent_state.to_json(), module_map))
    quantize(tmp_path / "bf16-small", tmp_path / "small-q", kv_cache="fp8", state=child_state)

    with Checkpoint.open(tmp_path / "q-small") as sliced, Checkpoint.open(tmp_path / "small-q") as direct:
        assert sorted(sliced.tensors) == sorted(direct.tensors)
        for name in sliced.tensors:
            assert sliced.read_bytes(name) == direct.read_bytes(name), f"{name} differs"
    for name in ("hf_quant_config.json", "config.json"):
        assert json.loads((tmp_path / "q-small" / name).read_text()) == json.loads((tmp_path / "small-q" / name).read_text())
    assert validate_quantized(tmp_path / "q-small") == []


def test_slice_rejects_cut_inside_nvfp4_block(elastic_parent, tmp_path):
    quantize(elastic_parent, tmp_path / "q")
    masks = json.loads((tmp_path / "q" / "elastic_config.json").read_text())
    small = masks["budgets"][1]["masks"]
    hidden = list(small["hidden"])
    first_kept = hidden.index("1")
    hidden[first_kept] = "0"
    hidden[hidden.index("0", first_kept + 16)] = "1"  # moves one channel into another block
    small["hidden"] = "".join(hidden)
    (tmp_path / "q" / "elastic_config.json").write_text(json.dumps(masks))

    source = open_source(str(tmp_path / "q"))
    try:
        with pytest.raises(MaskError, match="inside a block of 16"):
            plan_budgets(source, ["small"])
    finally:
        source.close()


def test_recipes_on_full_nano_layout():
    config = nano_v3_config()
    arch = parse_config(config)
    tensors = header_only(config)
    plan = plan_quantization(arch, tensors, "nvfp4", "nvidia")
    kept = set(plan.exclude_modules)

    assert "lm_head" in kept
    assert "backbone.layers.5.mixer.q_proj" in kept, "attention must stay in high precision"
    assert "backbone.layers.4.mixer.in_proj" in kept, "the Mamba layer before attention must stay"
    assert "backbone.layers.2.mixer.in_proj" not in kept
    assert "backbone.layers.1.mixer.gate" in kept
    assert "backbone.layers.0.mixer.conv1d" in kept
    assert plan.quant_algo == "NVFP4"
    assert plan_quantization(arch, tensors, "nvfp4", "mixed").quant_algo == "MIXED_PRECISION"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fmt": "int4"}, "--format 'int4'"),
        ({"fmt": "nvfp4", "recipe": "everything"}, "--recipe 'everything'"),
        ({"fmt": "fp8", "recipe": "mixed"}, "--recipe mixed"),
        ({"fmt": "fp8", "exclude": ["*nothing*"]}, "matches no module"),
        ({"fmt": "fp8", "recipe": "experts", "exclude": ["*experts*"]}, "quantizes nothing"),
        ({"fmt": "fp8", "kv_cache": "int8"}, "--kv-cache"),
    ],
)
def test_policy_rejects_bad_requests(kwargs, message):
    config = tiny_config(PATTERN)
    with pytest.raises(UsageError, match=message.replace("*", r"\*").replace("(", r"\(")):
        plan_quantization(parse_config(config), header_only(config), **kwargs)


def test_policy_lists_unaligned_widths():
    config = tiny_config("ME", hidden_size=120)
    arch = parse_config(config)
    with pytest.raises(UsageError, match="multiples of 16"):
        plan_quantization(arch, header_only(config), "nvfp4", "all-linears")
    plan = plan_quantization(arch, header_only(config), "nvfp4", "all-linears", keep_unaligned=True)
    assert "backbone.layers.0.mixer.in_proj" in plan.exclude_modules


def test_nan_weight_reported_not_written(tmp_path):
    folder = tmp_path / "parent"
    folder.mkdir()
    write_checkpoint(folder, tiny_config("ME"), seed=1)
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["backbone.layers.1.mixer.experts.2.up_proj.weight"][0, 3] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    from elastic_cli.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"experts\.2\.up_proj\.weight' has 1 NaN"):
        quantize(folder, tmp_path / "q", format="fp8", recipe="experts")
    assert not (tmp_path / "q").exists()


def test_all_zero_weight_gets_finite_scales(tmp_path):
    folder = tmp_path / "parent"
    folder.mkdir()
    write_checkpoint(folder, tiny_config("ME"), seed=1)
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["backbone.layers.1.mixer.experts.0.up_proj.weight"].zero_()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    quantize(folder, tmp_path / "q", format="nvfp4", recipe="experts")
    with Checkpoint.open(tmp_path / "q") as child:
        module = "backbone.layers.1.mixer.experts.0.up_proj"
        assert float(child.read(f"{module}.weight_scale_2")) == 1.0
        assert torch.equal(child.read(f"{module}.weight"), torch.zeros_like(child.read(f"{module}.weight")))
    assert validate_quantized(tmp_path / "q") == []


def test_fp8_outliers_never_nan(tmp_path):
    weight = torch.randn(32, 64) * 1e4
    scale = fp8.per_tensor_scale(weight.abs().max())
    quantized = fp8.quantize(weight, scale)

    assert not torch.isnan(quantized.float()).any()


def test_tp_degrees_follow_row_parallel_blocks():
    config = tiny_config("ME", moe_intermediate_size=48, hidden_size=64)
    arch = parse_config(config)
    from elastic_cli.quantize.policy import servable_tp_degrees

    nvfp4_plan = plan_quantization(arch, header_only(config), "nvfp4", "experts")
    fp8_plan = plan_quantization(arch, header_only(config), "fp8", "experts")
    nvfp4_blocked = servable_tp_degrees(nvfp4_plan)
    fp8_blocked = servable_tp_degrees(fp8_plan)

    # down_proj is row-parallel with 48 inputs: 3 NVFP4 blocks cannot be split over 2 ranks.
    assert nvfp4_blocked[1] == []
    assert any("down_proj" in name for name in nvfp4_blocked[2])
    assert fp8_blocked[2] == []
    assert fp8_blocked[8] == []
    # up_proj is column-parallel: its 48 rows split evenly over 8 ranks.
    assert not any("up_proj" in name for name in nvfp4_blocked[8])


def test_budget_spec_becomes_stored_masks(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    write_checkpoint(folder, tiny_config("MEM*E"), seed=2)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"budgets": [{"name": "full", "keep": {}}, {"name": "half", "keep": {"hidden": 64, "experts": 4}}]}))
    opts = QuantizeOptions(format="fp8", recipe="experts")
    source = open_source(str(folder), budget_spec=spec, require_budgets=False)
    try:
        quantize_checkpoint(source, opts, tmp_path / "q", state=given_state(source, opts))
    finally:
        source.close()

    masks = json.loads((tmp_path / "q" / "elastic_config.json").read_text())
    assert [b["name"] for b in masks["budgets"]] == ["full", "half"]
    assert masks["budgets"][1]["masks"]["hidden"] == "1" * 64 + "0" * 64
