"""Checks of the committed trained example, ``examples/nano-elastic-tiny``.

The example is a NemotronH parent trained by ``examples/train_example.py`` on the shipped
standard-library docstrings, with three nested budgets. These tests load it with transformers,
validate its masks with ``elastic inspect``, slice it with ``elastic slice --budget all`` and
measure each child's perplexity on the held-out documents the script never trained on. They
also check that the script's nested forward pass (the student of nested distillation) and the
independent masked reference forward both compute what the sliced child computes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from elastic_cli.arch.nemotron_h import LayerKind, parse_config
from elastic_cli.elastic.slicer import plan_budgets
from elastic_cli.elastic.source import open_source
from elastic_cli.quantize.calib_data import load_texts
from tests.reference.masked_forward import masked_forward

transformers = pytest.importorskip("transformers")

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "examples" / "nano-elastic-tiny"
sys.path.insert(0, str(REPO_ROOT / "examples"))
import train_example  # noqa: E402

# Held-out perplexity of each sliced child, as examples/README.md records it (BF16 weights,
# fp32 compute, torch 2.13.0 on CPU). The 0.5% tolerance is an estimate that leaves room for
# other CPUs, which may sum in a different order.
RECORDED_PERPLEXITY = {"2.9M": 299.26, "1.8M": 292.28, "1.1M": 328.96}
RECORDED_TOLERANCE = 5e-3
# The reference scans step by step where transformers uses the chunked SSD form, so fp32 sums
# differ in order. Logits may differ by this fraction of the largest logit magnitude.
LOGIT_TOLERANCE = 1e-4
FP32_NAMES = ("A_log", ".D", "gate.weight", "e_score_correction_bias")


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "elastic_cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def load_model(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, experts_implementation=train_example.EXPERTS_IMPLEMENTATION
    ).eval()


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, use_cache=False).logits


def decode_masks(entry: dict) -> dict:
    """Turn one budget of elastic_config.json into the reference forward's bool-tensor masks."""
    def as_tensor(bits: str) -> torch.Tensor:
        return torch.tensor([bit == "1" for bit in bits])

    stored = entry["masks"]
    masks: dict = {"per_layer": {}}
    if "hidden" in stored:
        masks["hidden"] = as_tensor(stored["hidden"])
    if "layers" in stored:
        masks["layers"] = as_tensor(stored["layers"])
    for layer, axes in stored.get("per_layer", {}).items():
        masks["per_layer"][int(layer)] = {axis: as_tensor(bits) for axis, bits in axes.items()}
    return masks


@pytest.fixture(scope="module")
def budgets() -> list[dict]:
    assert EXAMPLE.is_dir(), f"{EXAMPLE} is missing; regenerate it with `python examples/train_example.py {EXAMPLE}`"
    return json.loads((EXAMPLE / "elastic_config.json").read_text())["budgets"]


@pytest.fixture(scope="module")
def children(budgets, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("trained") / "children"
    result = cli("slice", EXAMPLE, "--budget", "all", "--output", output, "-q")
    assert result.returncode == 0, result.stderr
    return output


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(EXAMPLE)


@pytest.fixture(scope="module")
def heldout(tokenizer) -> torch.Tensor:
    return train_example.heldout_windows(tokenizer)


@pytest.fixture(scope="module")
def training_stream(tokenizer) -> torch.Tensor:
    training, _ = train_example.split_documents(load_texts(None))
    return train_example.token_stream(training, tokenizer)


def test_example_loads_with_transformers(budgets):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        EXAMPLE, output_loading_info=True, experts_implementation=train_example.EXPERTS_IMPLEMENTATION
    )

    assert not info["missing_keys"], f"missing: {info['missing_keys']}"
    assert not info["unexpected_keys"], f"unexpected: {info['unexpected_keys']}"
    assert not info["mismatched_keys"], f"mismatched: {info['mismatched_keys']}"
    stored = load_file(EXAMPLE / "model.safetensors")
    assert torch.equal(model.model.embeddings.weight, stored["backbone.embeddings.weight"])
    expert = stored["backbone.layers.6.mixer.experts.7.up_proj.weight"]
    assert torch.equal(model.model.layers[6].mixer.experts.up_proj[7], expert)
    assert model.config.layers_block_type == [
        "linear_attention", "moe", "linear_attention", "full_attention", "moe", "linear_attention", "moe"
    ]
    assert model.config.vocab_size == len(transformers.AutoTokenizer.from_pretrained(EXAMPLE))


def test_example_stores_real_checkpoint_dtypes():
    with safe_open(EXAMPLE / "model.safetensors", "pt") as handle:
        names = list(handle.keys())
        dtypes = {name: handle.get_slice(name).get_dtype() for name in names}

    assert "backbone.layers.1.mixer.experts.7.up_proj.weight" in names
    for name, dtype in dtypes.items():
        expected = "F32" if name.endswith(FP32_NAMES) else "BF16"
        assert dtype == expected, f"{name} is stored as {dtype}, expected {expected}"


def test_example_size_stays_small():
    total = sum(path.stat().st_size for path in EXAMPLE.iterdir())
    assert total < 8_000_000, f"the committed example grew to {total} bytes"


def test_example_inspect_reports_valid_budgets(budgets):
    result = cli("inspect", EXAMPLE, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    assert report["valid"] is True
    assert report["problems"] == []
    assert [budget["name"] for budget in report["budgets"]] == [budget["name"] for budget in budgets]
    params = [budget["params"] for budget in report["budgets"]]
    assert params == sorted(params, reverse=True), f"budgets are not largest first: {params}"
    assert 0.5 < params[1] / params[0] < 0.7, f"middle budget keeps {params[1] / params[0]:.2f} of the parent"
    assert 0.25 < params[2] / params[0] < 0.45, f"smallest budget keeps {params[2] / params[0]:.2f} of the parent"


def test_example_masks_are_importance_prefixes(budgets):
    arch = parse_config(json.loads((EXAMPLE / "config.json").read_text()))
    group_sizes = {
        "mamba_heads": arch.mamba_num_heads // arch.n_groups,
        "attention_heads": arch.num_attention_heads // arch.num_key_value_heads,
    }
    channel_axes = ("hidden", "expert_channels", "shared_expert_channels")

    for budget in budgets[1:]:
        masks = budget["masks"]
        named = [("hidden", masks["hidden"])] + [
            (axis, bits) for axes in masks["per_layer"].values() for axis, bits in axes.items()
        ]
        for axis, bits in named:
            size = group_sizes.get(axis, len(bits))
            for start in range(0, len(bits), size):
                group = bits[start : start + size]
                kept = group.count("1")
                assert group == "1" * kept + "0" * (size - kept), f"{budget['name']} {axis} is not a prefix: {bits}"
            if axis in channel_axes:
                assert bits.count("1") % 16 == 0, f"{budget['name']} {axis} keeps {bits.count('1')} channels"


def unigram_perplexity(training: torch.Tensor, heldout: torch.Tensor, vocab_size: int) -> float:
    """Return the held-out perplexity of add-one-smoothed unigram frequencies of the training tokens."""
    counts = torch.bincount(training, minlength=vocab_size).double() + 1
    log_probabilities = (counts / counts.sum()).log()
    return math.exp(-float(log_probabilities[heldout[:, 1:]].mean()))


def child_perplexities(budgets: list[dict], children: Path, windows: torch.Tensor) -> dict[str, float]:
    perplexities = {}
    for budget in budgets:
        child = load_model(children / budget["name"])
        perplexities[budget["name"]] = train_example.window_perplexity(lambda ids: logits_of(child, ids), windows)
    return perplexities


@pytest.mark.slow
def test_heldout_perplexity_per_budget(budgets, children, heldout, training_stream):
    vocab_size = json.loads((EXAMPLE / "config.json").read_text())["vocab_size"]
    unigram = unigram_perplexity(training_stream, heldout, vocab_size)
    perplexities = child_perplexities(budgets, children, heldout)

    parent, smallest = perplexities[budgets[0]["name"]], perplexities[budgets[-1]["name"]]
    for name, perplexity in perplexities.items():
        assert math.isfinite(perplexity), f"budget {name}: perplexity {perplexity}"
        assert perplexity < unigram, f"budget {name}: perplexity {perplexity:.1f}, unigram model {unigram:.1f}"
        assert perplexity < vocab_size / 4, f"budget {name}: perplexity {perplexity:.1f} is near uniform ({vocab_size})"
        assert perplexity < 1.2 * parent, f"budget {name}: perplexity {perplexity:.1f}, parent {parent:.1f}"
        recorded = RECORDED_PERPLEXITY[name]
        assert abs(perplexity / recorded - 1) < RECORDED_TOLERANCE, (
            f"budget {name}: perplexity {perplexity:.2f}, README records {recorded:.2f}"
        )
    assert smallest == max(perplexities.values()), f"the smallest budget should predict worst: {perplexities}"


@pytest.mark.slow
def test_training_text_perplexity_is_ordered(budgets, children, tokenizer):
    # On text it was trained on, each budget's capacity decides: larger budgets fit strictly better.
    perplexities = child_perplexities(budgets, children, train_example.training_sample(tokenizer))

    ordered = [perplexities[budget["name"]] for budget in budgets]
    assert ordered == sorted(ordered), f"larger budgets should fit the training text better: {perplexities}"
    assert ordered[0] < 0.7 * ordered[1], f"the parent barely beats the middle budget: {perplexities}"


@pytest.mark.slow
def test_sliced_child_matches_masked_reference(budgets, children, heldout):
    config = json.loads((EXAMPLE / "config.json").read_text())
    tensors = load_file(EXAMPLE / "model.safetensors")
    input_ids = heldout[:3]

    for budget in budgets:
        reference = masked_forward(config, tensors, input_ids, decode_masks(budget))
        sliced = logits_of(load_model(children / budget["name"]), input_ids)
        error = float((sliced - reference).abs().max() / reference.abs().max())
        assert error < LOGIT_TOLERANCE, f"budget {budget['name']}: logits differ by {error:.2e} of the largest"

        reference_loss = float(train_example.mean_cross_entropy(reference, input_ids))
        sliced_loss = float(train_example.mean_cross_entropy(sliced, input_ids))
        assert math.isclose(math.exp(sliced_loss), math.exp(reference_loss), rel_tol=1e-4), (
            f"budget {budget['name']}: sliced perplexity {math.exp(sliced_loss):.4f}, "
            f"masked reference {math.exp(reference_loss):.4f}"
        )


@pytest.mark.slow
def test_nested_budget_forward_equals_sliced_child(budgets, children, heldout):
    parent = load_model(EXAMPLE)
    source = open_source(str(EXAMPLE))
    try:
        plans = plan_budgets(source, ["all"])
    finally:
        source.close()
    input_ids = heldout[:2]

    for plan in plans:
        nested = train_example.NestedBudget(plan)
        with torch.no_grad():
            student = nested.logits(parent, input_ids)
        sliced = logits_of(load_model(children / plan.budget), input_ids)
        assert torch.allclose(student, sliced, rtol=0, atol=1e-5 * float(sliced.abs().max())), (
            f"budget {plan.budget}: the distillation student differs from the sliced child"
        )


def test_importance_permutation_keeps_logits():
    config = train_example.example_config()
    arch = parse_config(config)
    torch.manual_seed(0)
    model = train_example.new_model(config).eval()
    input_ids = torch.randint(0, config["vocab_size"], (2, 24))
    before = logits_of(model, input_ids)
    layers = {kind: [i for i, k in enumerate(arch.layer_kinds) if k is kind] for kind in LayerKind}
    moe_layers = layers[LayerKind.MOE]
    importance = train_example.Importance(
        hidden=torch.rand(arch.hidden_size),
        mamba_heads={i: torch.rand(arch.mamba_num_heads) for i in layers[LayerKind.MAMBA]},
        attention_heads={i: torch.rand(arch.num_attention_heads) for i in layers[LayerKind.ATTENTION]},
        experts={i: torch.rand(arch.n_routed_experts) for i in moe_layers},
        expert_channels={i: torch.rand(arch.n_routed_experts, arch.moe_intermediate_size) for i in moe_layers},
        shared_expert_channels={i: torch.rand(arch.shared_expert_intermediate_size) for i in moe_layers},
    )
    embeddings = model.model.embeddings.weight.detach().clone()

    train_example.sort_by_importance(model, arch, importance)

    assert not torch.equal(model.model.embeddings.weight, embeddings), "the permutation left the weights unchanged"
    after = logits_of(model, input_ids)
    error = float((after - before).abs().max() / before.abs().max())
    assert error < 1e-5, f"permuting the weights changed the logits by {error:.2e} of the largest"
