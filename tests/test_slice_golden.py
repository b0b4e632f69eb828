"""Golden equivalence: a sliced child loaded by transformers equals the masked parent.

For each elastic axis alone and for all axes together, on an MoE layout like Nemotron 3 Nano
(`M`, `E`, `*`) and a dense layout like Nemotron Nano v2 (`M`, `-`, `*`), the child written by
`elastic slice` is loaded with transformers' NemotronHForCausalLM (no missing or unexpected
keys) and its logits are compared with an independent masked forward of the parent weights
(tests/reference/masked_forward.py), which applies the masks as semantics and never slices.

Tolerance: both sides compute in fp32 from the same BF16 weights, so they differ only by
floating-point summation order; logits must agree within 2e-4 absolute plus 1e-4 relative.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from elastic_cli.arch.nemotron_h import parse_config
from elastic_cli.elastic.masks import LAYER_AXES, MASKS_FILE, Axis, Budget, axis_length, budgets_to_document
from elastic_cli.elastic.slicer import plan_budgets, slice_checkpoint
from elastic_cli.elastic.source import open_source
from elastic_cli.synthetic import importance_budgets, tiny_config, write_checkpoint
from tests.reference.masked_forward import masked_forward

transformers = pytest.importorskip("transformers")

ATOL = 2e-4
RTOL = 1e-4
MOE_PATTERN = "MEM*EMEM*E"
DENSE_PATTERN = "M-M*-M-"


def dense_config() -> dict:
    """A Nano-v2-like dense layout in the native transformers dialect."""
    config = tiny_config(DENSE_PATTERN, intermediate_size=96)
    names = {"M": "linear_attention", "-": "mlp", "*": "full_attention"}
    config["layers_block_type"] = [names[c] for c in config.pop("hybrid_override_pattern")]
    del config["num_hidden_layers"]
    return config


LAYOUTS = {"moe": lambda: tiny_config(MOE_PATTERN), "dense": dense_config}


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> dict[str, Path]:
    """One parent checkpoint per layout, written once; cases hard-link its files."""
    folders = {}
    for layout, make_config in LAYOUTS.items():
        folder = tmp_path_factory.mktemp(f"parent-{layout}")
        write_checkpoint(folder, make_config(), seed=7, max_shard_bytes=600_000)
        folders[layout] = folder
    return folders


def random_mask(length: int, keep: int, generator: torch.Generator) -> list[int]:
    return sorted(torch.randperm(length, generator=generator)[:keep].tolist())


def grouped(length: int, groups: int, per_group: int, generator: torch.Generator) -> list[int]:
    size = length // groups
    kept = []
    for group in range(groups):
        kept.extend(group * size + i for i in random_mask(size, per_group, generator))
    return kept


def case_budget(config: dict, case: str, seed: int = 0) -> Budget:
    """Build a child budget that cuts one axis (or all of them), with masks that are not prefixes."""
    arch = parse_config(config)
    generator = torch.Generator().manual_seed(seed)
    if case == "all":
        return importance_budgets(arch, [("child", 0.5)], seed)[0]

    hidden = tuple(True for _ in range(arch.hidden_size))
    layers = tuple(True for _ in range(arch.num_layers))
    if case == "hidden":
        kept = set(random_mask(arch.hidden_size, arch.hidden_size * 5 // 8, generator))
        hidden = tuple(i in kept for i in range(arch.hidden_size))
    if case == "layers":
        dropped = {1, 2} if arch.num_layers > 4 else {1}
        layers = tuple(i not in dropped for i in range(arch.num_layers))

    layer_masks = []
    for layer, kind in enumerate(arch.layer_kinds):
        masks = []
        for axis in LAYER_AXES[kind]:
            length = axis_length(arch, axis)
            keep = list(range(length))
            if case == axis.value == "mamba_heads":
                keep = grouped(length, arch.n_groups, arch.mamba_num_heads // arch.n_groups // 2, generator)
            elif case == "mamba_groups" and axis is Axis.MAMBA_HEADS:
                size = length // arch.n_groups
                keep = list(range(size, 2 * size))  # keep only the second group, whole
            elif case == axis.value == "attention_heads":
                keep = grouped(length, arch.num_key_value_heads, arch.num_attention_heads // arch.num_key_value_heads // 2, generator)
            elif case == axis.value == "experts":
                keep = random_mask(length, arch.num_experts_per_tok + 2, generator)
            elif case == axis.value:
                # Channel axes: each layer keeps a different count, so FFN widths get zero-padded.
                count = length // 2 if axis is Axis.MAMBA_HEAD_CHANNELS else max(1, length // 2 - 8 * (layer % 3))
                keep = random_mask(length, count, generator)
            masks.append((axis, tuple(i in set(keep) for i in range(length))))
        layer_masks.append(tuple(masks))
    return Budget("child", None, False, hidden, layers, tuple(layer_masks))


def reference_masks(budget: Budget) -> dict:
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for layer, axes in enumerate(budget.layer_masks):
        per_layer[layer] = {axis.value: torch.tensor(mask) for axis, mask in axes}
    return {"hidden": torch.tensor(budget.hidden), "layers": torch.tensor(budget.layers), "per_layer": per_layer}


def link_parent(parent: Path, folder: Path) -> None:
    folder.mkdir()
    for path in parent.iterdir():
        os.link(path, folder / path.name)


def parent_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def sliced_logits(parent: Path, budget: Budget, tmp_path: Path, input_ids: torch.Tensor) -> torch.Tensor:
    folder = tmp_path / "elastic"
    link_parent(parent, folder)
    config = json.loads((folder / "config.json").read_text())
    arch = parse_config(config)
    full = Budget("full", None, False, (True,) * arch.hidden_size, (True,) * arch.num_layers, tuple(
        tuple((axis, (True,) * len(mask)) for axis, mask in axes) for axes in budget.layer_masks
    ))
    (folder / MASKS_FILE).write_text(json.dumps(budgets_to_document([full, budget], arch)))

    source = open_source(str(folder))
    try:
        assert not source.problems, f"test budget is invalid: {[str(p) for p in source.problems]}"
        plans = plan_budgets(source, ["child"])
        slice_checkpoint(source, plans, tmp_path / "child", nested=False)
    finally:
        source.close()

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "child", dtype=torch.float32, output_loading_info=True
    )
    assert info["missing_keys"] == set() or not info["missing_keys"], f"missing keys: {info['missing_keys']}"
    assert not info["unexpected_keys"], f"unexpected keys: {info['unexpected_keys']}"
    assert not info["mismatched_keys"], f"mismatched keys: {info['mismatched_keys']}"
    model.eval()
    with torch.no_grad():
        return model(input_ids, use_cache=False).logits.float()


AXIS_CASES = {
    "moe": ["hidden", "layers", "mamba_heads", "mamba_groups", "mamba_head_channels", "attention_heads",
            "experts", "expert_channels", "shared_expert_channels", "all"],
    "dense": ["hidden", "layers", "mamba_heads", "mamba_head_channels", "attention_heads", "ffn_channels", "all"],
}


@pytest.mark.parametrize(
    ("layout", "case"), [(layout, case) for layout, cases in AXIS_CASES.items() for case in cases]
)
def test_sliced_child_matches_masked_parent(parents, tmp_path, layout, case):
    parent = parents[layout]
    config = json.loads((parent / "config.json").read_text())
    budget = case_budget(config, case)
    input_ids = torch.randint(0, config["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3))

    expected = masked_forward(config, parent_tensors(parent), input_ids, reference_masks(budget))
    actual = sliced_logits(parent, budget, tmp_path, input_ids)

    assert actual.shape == expected.shape
    assert expected.abs().max() > 0.1, "reference logits are degenerate; the test would prove nothing"
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{layout}/{case}: {m}")


def test_unmasked_budget_matches_parent_exactly(parents, tmp_path):
    """A budget that keeps everything writes every tensor byte for byte."""
    parent = parents["moe"]
    config = json.loads((parent / "config.json").read_text())
    arch = parse_config(config)
    full = importance_budgets(arch, [("child", 1.0)], 0)[0]
    link_parent(parent, tmp_path / "elastic")
    (tmp_path / "elastic" / MASKS_FILE).write_text(json.dumps(budgets_to_document([full], arch)))
    source = open_source(str(tmp_path / "elastic"))
    try:
        slice_checkpoint(source, plan_budgets(source, ["child"]), tmp_path / "out", nested=False)
    finally:
        source.close()

    before = parent_tensors(parent)
    after = parent_tensors(tmp_path / "out")
    assert sorted(before) == sorted(after)
    for name, value in before.items():
        assert after[name].dtype == value.dtype, f"{name} changed dtype"
        assert torch.equal(after[name], value), f"{name} changed"
