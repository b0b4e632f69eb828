"""Calibration: layer-by-layer amax against whole-model forwards, calibration data, memory bound.

The reference for every amax is transformers' own ``NemotronHForCausalLM`` loaded with
``from_pretrained`` (the parent, or each budget's sliced child) and run on the same token ids with
``use_cache=False``, in float32, with forward pre-hooks on every ``nn.Linear``. Routed experts are
fused 3-D parameters there, so the reference observes them differently from the product code: it
intercepts ``torch.nn.functional.linear`` inside transformers' eager experts loop and identifies
the expert from the weight's storage offset.

Tolerance: both sides run the same modules on the same float32 values. On the development
machine (x86-64 CPU, torch 2.13.0, transformers 5.25.0), with the whole batch in one micro-batch,
every amax agreed exactly, plain and elastic. The tests allow 1e-6 relative for another BLAS.
Smaller micro-batches change the matrix shapes, so the BLAS may sum in another order: there the
worst difference was 8.5e-7 relative (an expert's ``down_proj``, after ReLU² doubled the
relative error of its ``up_proj`` output), and those cases allow 1e-5.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import shutil
import sys
import weakref
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from elastic_cli.arch.nemotron_h import LayerKind, parse_config, parse_tensor_name
from elastic_cli.elastic.masks import Axis
from elastic_cli.elastic.plan import kept
from elastic_cli.elastic.slicer import plan_budgets, slice_checkpoint
from elastic_cli.elastic.source import open_source
from elastic_cli.errors import CheckpointError, ElasticError, UnsupportedError, UsageError
from elastic_cli.quantize import calib_data
from elastic_cli.quantize.calib_data import load_texts, load_tokenizer, render_messages, tokenize
from elastic_cli.elastic.tensor_cut import TensorCutter
from elastic_cli.quantize import calibrate as calibrate_module
from elastic_cli.quantize.calibrate import (
    FALLBACK_AMAX,
    calibratable_modules,
    calibrate,
    fill_unreached_experts,
)
from elastic_cli.synthetic import importance_budgets, tiny_config, write_checkpoint

transformers = pytest.importorskip("transformers")

REPO_ROOT = Path(__file__).resolve().parent.parent
RTOL = 1e-6
MICRO_BATCH_RTOL = 1e-5
PATTERN = "ME*-ME*E"  # Mamba, MoE, attention and dense MLP layers
FRACTIONS = [("full", 1.0), ("mid", 0.75), ("small", 0.5)]
SAMPLES, SEQ_LEN = 4, 24


def example_module(name: str):
    """Import a script from examples/ (not a package) by path."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def config() -> dict:
    return tiny_config(PATTERN, intermediate_size=96)


@pytest.fixture(scope="module")
def plain_parent(tmp_path_factory, config) -> Path:
    """A tiny checkpoint without masks."""
    folder = tmp_path_factory.mktemp("plain") / "parent"
    folder.mkdir()
    write_checkpoint(folder, config, seed=5, max_shard_bytes=600_000)
    return folder


@pytest.fixture(scope="module")
def elastic_parent(tmp_path_factory, config) -> Path:
    """A tiny elastic checkpoint with three nested budgets whose masks are not prefixes."""
    folder = tmp_path_factory.mktemp("elastic") / "parent"
    folder.mkdir()
    budgets = importance_budgets(parse_config(config), FRACTIONS, seed=1)
    write_checkpoint(folder, config, seed=5, budgets=budgets, max_shard_bytes=600_000)
    return folder


@pytest.fixture(scope="module")
def token_ids(config) -> torch.Tensor:
    return torch.randint(0, config["vocab_size"], (SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(11))


@contextmanager
def opened(folder: Path, **kwargs):
    source = open_source(str(folder), **kwargs)
    try:
        yield source
    finally:
        source.close()


@contextmanager
def observe_experts(model, record):
    """Record ``record(layer, expert, projection, input)`` for every expert matmul of transformers' eager loop."""
    layers = enumerate(model.model.layers)
    experts = [(index, layer.mixer.experts) for index, layer in layers if layer.block_type == "moe"]
    with observe_fused_experts(experts, record):
        yield


@contextmanager
def observe_fused_experts(experts: list[tuple[int, nn.Module]], record):
    """Like :func:`observe_experts`, for ``NemotronHExperts`` modules given with their layer index."""
    original = nn.functional.linear

    def linear(input, weight, bias=None):
        for layer, module in experts:
            for projection in ("up_proj", "down_proj"):
                fused = getattr(module, projection)  # [E, out, in]
                if weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr():
                    expert = (weight.data_ptr() - fused.data_ptr()) // (fused.stride(0) * fused.element_size())
                    record(layer, expert, projection, input)
        return original(input, weight, bias)

    nn.functional.linear = linear
    try:
        yield
    finally:
        nn.functional.linear = original


def measure_whole_model(
    folder: Path, ids: torch.Tensor
) -> tuple[dict[str, float], dict[int, tuple[float, float]], dict[int, set[int]]]:
    """Run transformers' whole model and return its amax per module, KV amax and reached experts.

    Module names are the model's own without ``model.`` (``layers.{j}.mixer.in_proj``,
    ``layers.{j}.mixer.experts.{e}.up_proj``); layers are keyed by the model's layer index.
    """
    model = transformers.NemotronHForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="sdpa", experts_implementation="eager"
    ).eval()
    amax: dict[str, float] = {}
    kv: dict[int, list[float]] = {}
    reached: dict[int, set[int]] = {}

    def keep_max(name: str, tensor: torch.Tensor) -> None:
        amax[name] = max(amax.get(name, 0.0), float(tensor.abs().amax()))

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            short = name.removeprefix("model.")
            handles.append(module.register_forward_pre_hook(lambda m, args, short=short: keep_max(short, args[0])))
    for index, layer in enumerate(model.model.layers):
        if layer.block_type == "full_attention":
            kv[index] = [0.0, 0.0]
            for position, projection in enumerate((layer.mixer.k_proj, layer.mixer.v_proj)):
                def hook(m, args, output, index=index, position=position):
                    kv[index][position] = max(kv[index][position], float(output.abs().amax()))
                handles.append(projection.register_forward_hook(hook))

    def record(layer: int, expert: int, projection: str, input: torch.Tensor) -> None:
        keep_max(f"layers.{layer}.mixer.experts.{expert}.{projection}", input)
        reached.setdefault(layer, set()).add(expert)

    with torch.no_grad(), observe_experts(model, record):
        model(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return amax, {layer: (k, v) for layer, (k, v) in kv.items()}, reached


def to_parent_name(child_name: str, layer_map: tuple[int, ...], kept_experts: dict[int, tuple[int, ...]]) -> str:
    """Rename ``layers.{j}.mixer....experts.{e}`` of a child to the parent's ``backbone.layers...`` name."""
    if not child_name.startswith("layers."):
        return child_name
    parts = child_name.split(".")
    parent_layer = layer_map[int(parts[1])]
    parts[1] = str(parent_layer)
    if parts[3:4] == ["experts"]:
        parts[4] = str(kept_experts[parent_layer][int(parts[4])])
    return "backbone." + ".".join(parts)


def assert_amax_close(actual: dict[str, float], expected: dict[str, float], context: str, rtol: float = RTOL) -> None:
    assert set(actual) == set(expected), f"{context}: module sets differ: {sorted(set(actual) ^ set(expected))[:5]}"
    for name, value in expected.items():
        assert value > 0, f"{context}: reference amax of {name} is zero; the test would prove nothing"
        difference = abs(actual[name] - value) / value
        assert difference <= rtol, f"{context}: {name} amax {actual[name]!r} differs from the whole model's {value!r}"


def assert_kv_close(
    actual: dict[str, tuple[float, float]], expected: dict[str, tuple[float, float]], rtol: float = RTOL
) -> None:
    assert set(actual) == set(expected), f"attention layers differ: {sorted(set(actual) ^ set(expected))}"
    for prefix, pair in expected.items():
        for projection, got, value in zip(("k_proj", "v_proj"), actual[prefix], pair):
            assert abs(got - value) <= rtol * value, (
                f"{prefix}.{projection} output amax {got!r} differs from the whole model's {value!r}"
            )


# ---------------------------------------------------------------------------------------------
# Layer-by-layer calibration against whole-model forwards


@pytest.fixture(scope="module")
def plain_reference(plain_parent, token_ids):
    """The whole parent model's amax, KV amax and reached experts on ``token_ids``."""
    return measure_whole_model(plain_parent, token_ids)


@pytest.mark.parametrize(("micro_batch", "rtol"), [(SAMPLES, RTOL), (3, MICRO_BATCH_RTOL), (1, MICRO_BATCH_RTOL)])
def test_calibrate_plain_matches_whole_model(plain_parent, plain_reference, token_ids, micro_batch, rtol):
    with opened(plain_parent, require_budgets=False) as source:
        modules = calibratable_modules(source.arch)
        steps = []
        result = calibrate(
            source,
            modules,
            token_ids,
            kv_cache=True,
            micro_batch=micro_batch,
            progress=lambda done, total: steps.append((done, total)),
        )
        layers = source.arch.num_layers

    amax, kv, reached = plain_reference
    identity = tuple(range(layers))
    all_experts = {layer: tuple(range(8)) for layer in range(layers)}
    expected = {to_parent_name(name, identity, all_experts): value for name, value in amax.items()}
    assert_amax_close(result.input_amax, expected, f"micro-batch {micro_batch}", rtol)

    assert_kv_close(result.kv_amax, {f"backbone.layers.{layer}.mixer": pair for layer, pair in kv.items()}, rtol)
    unreached = {layer: [e for e in range(8) if e not in experts] for layer, experts in reached.items()}
    assert result.unreached_experts == {layer: missing for layer, missing in unreached.items() if missing}
    assert (result.samples, result.tokens, result.budgets) == (SAMPLES, SAMPLES * SEQ_LEN, ("full",))
    assert steps == [(done, layers) for done in range(1, layers + 1)], "progress must be reported once per layer"


def test_calibrate_elastic_matches_max_over_children(elastic_parent, token_ids, tmp_path):
    with opened(elastic_parent) as source:
        plans = plan_budgets(source, ["all"])
        slice_checkpoint(source, plans, tmp_path / "children", nested=True)
        budgets = list(source.budgets)
        moe_layers = [layer for layer, kind in enumerate(source.arch.layer_kinds) if kind is LayerKind.MOE]
        result = calibrate(source, calibratable_modules(source.arch), token_ids, budgets=budgets, kv_cache=True)

    expected: dict[str, float] = {}
    expected_kv: dict[str, tuple[float, float]] = {}
    per_budget: dict[str, dict[str, float]] = {}
    for budget, plan in zip(budgets, plans):
        kept_experts = {
            layer: kept(budget.mask(Axis.EXPERTS, layer)) for layer in plan.layer_map if layer in moe_layers
        }
        amax, kv, _ = measure_whole_model(tmp_path / "children" / budget.name, token_ids)
        named = {to_parent_name(name, plan.layer_map, kept_experts): value for name, value in amax.items()}
        per_budget[budget.name] = named
        for name, value in named.items():
            expected[name] = max(expected.get(name, 0.0), value)
        for child_layer, (k, v) in kv.items():
            prefix = f"backbone.layers.{plan.layer_map[child_layer]}.mixer"
            old = expected_kv.get(prefix, (0.0, 0.0))
            expected_kv[prefix] = (max(old[0], k), max(old[1], v))

    assert result.budgets == ("full", "mid", "small")
    assert_amax_close(result.input_amax, expected, "max over budgets")
    assert_kv_close(result.kv_amax, expected_kv)
    # The narrower children must really differ, or the max over budgets proves nothing.
    differing = [name for name in per_budget["small"] if per_budget["small"][name] != per_budget["full"][name]]
    assert differing, "the small child's activations equal the full model's; the budgets do not cut anything"


def rewrite_tensor(folder: Path, name: str, change) -> None:
    """Replace one tensor in its shard with ``change(tensor)``."""
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name] = change(tensors[name].clone())
            save_file(tensors, shard, metadata={"format": "pt"})
            return
    raise AssertionError(f"{name} not found in {folder}")


def test_calibrate_unreached_expert_gets_layer_max(elastic_parent, token_ids, tmp_path):
    folder = Path(shutil.copytree(elastic_parent, tmp_path / "parent"))
    layer, expert = 5, 3

    def never_selected(tensor: torch.Tensor, row: int = expert, value: float = -1e4) -> torch.Tensor:
        tensor[row] = value
        return tensor

    # sigmoid(router logit) is 0 and the correction bias is -1, so score plus bias always loses.
    rewrite_tensor(folder, f"backbone.layers.{layer}.mixer.gate.weight", never_selected)
    rewrite_tensor(
        folder, f"backbone.layers.{layer}.mixer.gate.e_score_correction_bias", lambda t: never_selected(t, value=-1.0)
    )

    with opened(folder) as source:
        budgets = list(source.budgets)
        assert budgets[0].mask(Axis.EXPERTS, layer)[expert], "the full budget must keep the forced expert"
        result = calibrate(source, calibratable_modules(source.arch), token_ids, budgets=budgets)

    assert result.unreached_experts == {layer: [expert]}
    prefix = f"backbone.layers.{layer}.mixer.experts"
    for projection in ("up_proj", "down_proj"):
        reached = [result.input_amax[f"{prefix}.{e}.{projection}"] for e in range(8) if e != expert]
        assert result.input_amax[f"{prefix}.{expert}.{projection}"] == max(reached), (
            f"unreached expert's {projection} amax must be the max of the layer's reached experts"
        )


def test_calibrate_rejects_attention_bias(plain_parent, token_ids, tmp_path):
    folder = Path(shutil.copytree(plain_parent, tmp_path / "parent"))
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight = "backbone.layers.2.mixer.q_proj.weight"
    shard = folder / index["weight_map"][weight]
    tensors = load_file(shard)
    bias = "backbone.layers.2.mixer.q_proj.bias"
    tensors[bias] = torch.zeros(tensors[weight].shape[0], dtype=torch.bfloat16)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"][bias] = shard.name
    index_path.write_text(json.dumps(index))

    with opened(folder, require_budgets=False) as source:
        with pytest.raises(UnsupportedError, match="q_proj.bias', which transformers' NemotronH block lacks"):
            calibrate(source, {"backbone.layers.0.mixer.in_proj"}, token_ids)


def test_fill_unreached_rule_chain(config):
    arch = parse_config(config)
    moe_layers = [1, 5, 7]
    observed = {
        # layer 1: experts 0 and 2 reached; layer 5: none reached; layer 7: none reached, no shared expert seen
        "backbone.layers.1.mixer.experts.0.up_proj": 2.0,
        "backbone.layers.1.mixer.experts.0.down_proj": 30.0,
        "backbone.layers.1.mixer.experts.2.up_proj": 3.0,
        "backbone.layers.1.mixer.experts.2.down_proj": 10.0,
        "backbone.layers.5.mixer.shared_experts.up_proj": 7.0,
    }
    reached = {1: {0, 2}}
    kept_experts = [{layer: tuple(range(8)) for layer in moe_layers}]

    filled, unreached = fill_unreached_experts(arch, observed, reached, kept_experts)

    assert unreached == {1: [1, 3, 4, 5, 6, 7], 5: list(range(8)), 7: list(range(8))}
    assert filled["backbone.layers.1.mixer.experts.4.up_proj"] == 3.0, "rule 1: max of the layer's reached experts"
    assert filled["backbone.layers.1.mixer.experts.4.down_proj"] == 30.0, "rule 1: max of the layer's reached experts"
    assert filled["backbone.layers.5.mixer.experts.0.up_proj"] == 7.0, "rule 2: the shared expert's up_proj input"
    assert filled["backbone.layers.5.mixer.experts.0.down_proj"] == 30.0, "rule 2: max reached down_proj in the model"
    assert filled["backbone.layers.7.mixer.experts.0.up_proj"] == FALLBACK_AMAX, "rule 3: the fixed fallback"
    assert filled["backbone.layers.1.mixer.experts.0.up_proj"] == 2.0, "observed values must stay unchanged"

    _, nothing = fill_unreached_experts(arch, {}, {}, [{}])
    assert nothing == {}, "no MoE layer ran, so there is nothing to fill"
    filled_empty, _ = fill_unreached_experts(arch, {}, {}, [{7: tuple(range(8))}])
    assert filled_empty["backbone.layers.7.mixer.experts.0.down_proj"] == FALLBACK_AMAX


def test_calibrate_reports_only_requested_modules(plain_parent, token_ids):
    requested = {"backbone.layers.0.mixer.in_proj", "backbone.layers.1.mixer.experts.2.down_proj", "lm_head"}
    with opened(plain_parent, require_budgets=False) as source:
        result = calibrate(source, requested, token_ids[:1])
    assert set(result.input_amax) == requested
    assert result.kv_amax == {}, "KV amax is recorded only with kv_cache=True"
    assert all(value > 0 for value in result.input_amax.values())


def test_calibrate_rejects_bad_inputs(plain_parent, config, token_ids):
    with opened(plain_parent, require_budgets=False) as source:
        with pytest.raises(ValueError, match="not Linear modules"):
            calibrate(source, {"backbone.layers.0.mixer.conv1d"}, token_ids)
        with pytest.raises(UsageError, match="outside the model's vocabulary"):
            calibrate(source, set(), torch.full((1, 4), config["vocab_size"], dtype=torch.int64))
        with pytest.raises(UsageError, match="int64"):
            calibrate(source, set(), token_ids.int())
        with pytest.raises(UsageError, match="empty"):
            calibrate(source, set(), torch.empty(0, 4, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# Memory bound: each layer read once, one layer's weights alive at a time, one routed expert at a time


def is_routed_expert(name: str) -> bool:
    parsed = parse_tensor_name(name)
    return parsed is not None and parsed.expert is not None


def test_calibrate_reads_each_layer_once(elastic_parent, token_ids, monkeypatch):
    from transformers.models.nemotron_h import modeling_nemotron_h

    reads: list[str] = []
    row_reads: list[tuple[str, tuple[int, ...]]] = []
    alive: list[tuple[int | None, weakref.ref]] = []
    overlaps: list[str] = []
    blocks: weakref.WeakSet = weakref.WeakSet()
    max_blocks = [0]
    expert_weights: list[tuple[str, weakref.ref]] = []
    expert_overlaps: list[str] = []

    original_block = modeling_nemotron_h.NemotronHBlock

    class CountedBlock(original_block):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            blocks.add(self)
            max_blocks[0] = max(max_blocks[0], len(blocks))

    monkeypatch.setattr(modeling_nemotron_h, "NemotronHBlock", CountedBlock)

    original_expert_read = calibrate_module._CheckpointExperts.read

    def read_expert(self, tensor, device):
        live = [name for name, ref in expert_weights if ref() is not None]
        if live:
            expert_overlaps.append(f"{tensor.source} read while {live} were alive")
        weight = original_expert_read(self, tensor, device)
        expert_weights.append((tensor.source, weakref.ref(weight)))
        return weight

    monkeypatch.setattr(calibrate_module._CheckpointExperts, "read", read_expert)

    with opened(elastic_parent) as source:
        original_read = source.checkpoint.read
        original_read_rows = source.checkpoint.read_rows

        def read(name: str) -> torch.Tensor:
            layer = parse_tensor_name(name).layer
            live = {other for other, ref in alive if ref() is not None and other != layer}
            if live:
                overlaps.append(f"{name} read while tensors of layer(s) {sorted(live, key=str)} were alive")
            tensor = original_read(name)
            reads.append(name)
            alive.append((layer, weakref.ref(tensor)))
            return tensor

        def read_rows(name: str, rows: tuple[int, ...]) -> torch.Tensor:
            row_reads.append((name, rows))
            return original_read_rows(name, rows)

        monkeypatch.setattr(source.checkpoint, "read", read)
        monkeypatch.setattr(source.checkpoint, "read_rows", read_rows)
        budgets = list(source.budgets)
        result = calibrate(source, calibratable_modules(source.arch), token_ids, budgets=budgets)
        layer_tensors = [name for name in source.checkpoint.tensors if parse_tensor_name(name).layer is not None]
        moe_layers = [layer for layer, kind in enumerate(source.arch.layer_kinds) if kind is LayerKind.MOE]

    gc.collect()
    other_tensors = [name for name in layer_tensors if not is_routed_expert(name)]
    repeated = sorted({name for name in reads if not is_routed_expert(name) and reads.count(name) > 1})
    assert not repeated, f"tensors other than routed experts read more than once: {repeated[:3]}"
    assert set(other_tensors) <= set(reads), "every layer tensor other than routed experts must be read"
    assert "lm_head.weight" not in reads, "calibration needs the lm_head input, never its weight"
    assert "backbone.embeddings.weight" not in reads, "calibration must read only the embedding rows it needs"
    assert row_reads == [("backbone.embeddings.weight", tuple(sorted(set(token_ids.reshape(-1).tolist()))))]
    assert not overlaps, f"more than one layer's weights were alive: {overlaps[:2]}"
    assert max_blocks[0] == 1, f"{max_blocks[0]} NemotronH blocks were alive at once"
    assert not expert_overlaps, f"more than one routed expert weight was alive: {expert_overlaps[:2]}"

    # All samples fit in one micro-batch, so each budget reads each expert it runs exactly once.
    for layer in moe_layers:
        unreached = set(result.unreached_experts.get(layer, []))
        for expert in range(8):
            keeping = sum(1 for budget in budgets if budget.mask(Axis.EXPERTS, layer)[expert])
            for projection in ("up_proj", "down_proj"):
                name = f"backbone.layers.{layer}.mixer.experts.{expert}.{projection}.weight"
                count = reads.count(name)
                assert count <= keeping, f"{name} read {count} times, but only {keeping} budget(s) keep it"
                if expert not in unreached:
                    assert count >= 1, f"{name} of a reached expert was never read"
                else:
                    assert count == 0, f"{name} of an unreached expert was read"


def test_checkpoint_experts_match_fused_experts(elastic_parent):
    """Experts read from the checkpoint give transformers' fused experts' output and expert inputs, bit for bit."""
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    layer = 1
    generator = torch.Generator().manual_seed(3)
    with opened(elastic_parent) as source:
        plans = plan_budgets(source, ["all"])
        cutter = TensorCutter()
        for plan in plans:
            config = calibrate_module._child_config(plan)
            slices = [
                tensor
                for tensor in plan.tensors
                if is_routed_expert(tensor.source) and parse_tensor_name(tensor.source).layer == layer
            ]
            _, experts = calibrate_module._block_state(slices, {}, cutter)
            with torch.device("meta"):
                meta = NemotronHExperts(config)
            streamed = calibrate_module._CheckpointExperts(meta, experts, source.checkpoint, cutter)

            fused = NemotronHExperts(config).eval()
            for projection in ("up_proj", "down_proj"):
                stacked = torch.stack(
                    [cutter.cut(source.checkpoint.read(t.source), t.keep).float() for t in experts[projection]]
                )
                getattr(fused, projection).data = stacked

            tokens, top_k = 40, config.num_experts_per_tok
            hidden = torch.randn(tokens, config.hidden_size, generator=generator)
            scores = torch.rand(tokens, config.n_routed_experts, generator=generator)
            scores[:, 0] = -1.0  # child expert 0 is never selected
            top_k_index = scores.topk(top_k, dim=-1).indices
            top_k_weights = torch.rand(tokens, top_k, generator=generator)

            observed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            streamed.observer = lambda expert, up, down: observed.__setitem__(expert, (up.clone(), down.clone()))
            expected_inputs: dict[tuple[int, str], torch.Tensor] = {}

            def record(layer_index, expert, projection, input):
                expected_inputs[(int(expert), projection)] = input.clone()

            with torch.inference_mode():
                actual = streamed(hidden, top_k_index, top_k_weights)
                with observe_fused_experts([(layer, fused)], record):
                    expected = fused(hidden, top_k_index, top_k_weights)

            assert torch.equal(actual, expected), f"budget {plan.budget}: experts output differs from transformers'"
            selected = sorted(set(top_k_index.reshape(-1).tolist()))
            assert sorted(observed) == selected, f"budget {plan.budget}: observed experts {sorted(observed)}"
            assert 0 not in observed, "an expert no token selected must not be observed"
            for expert, (up_input, down_input) in observed.items():
                assert torch.equal(up_input, expected_inputs[(expert, "up_proj")]), f"expert {expert} up_proj input"
                expected_down = expected_inputs[(expert, "down_proj")]
                assert torch.equal(down_input, expected_down), f"expert {expert} down_proj input"


def test_load_block_rejects_mismatched_experts(elastic_parent):
    layer = 1
    with opened(elastic_parent) as source:
        plan = plan_budgets(source, ["all"])[0]
        cutter = TensorCutter()
        slices = [tensor for tensor in plan.tensors if parse_tensor_name(tensor.source).layer == layer]
        parent = {t.source: source.checkpoint.read(t.source) for t in slices if not is_routed_expert(t.source)}
        state, experts = calibrate_module._block_state(slices, parent, cutter)
        config = calibrate_module._child_config(plan)

        def load(changed: dict) -> None:
            calibrate_module._load_block(config, layer, dict(state), changed, layer, source.checkpoint, cutter)

        load(experts)  # the unchanged layer loads
        with pytest.raises(UnsupportedError, match="expects 'mixer.experts.down_proj', which the checkpoint lacks"):
            load({"up_proj": experts["up_proj"]})
        with pytest.raises(UnsupportedError, match="has 7 routed experts in the checkpoint, but the config has 8"):
            load({"up_proj": experts["up_proj"][:7], "down_proj": experts["down_proj"]})
        with pytest.raises(UnsupportedError, match=r"up_proj.weight cuts to \[\d+, \d+\], but mixer.experts.down_proj"):
            load({"up_proj": experts["up_proj"], "down_proj": experts["up_proj"]})
        with pytest.raises(UnsupportedError, match="the checkpoint has 'mixer.experts.down_proj', which"):
            calibrate_module._load_block(config, 0, {}, experts, 0, source.checkpoint, cutter)


# ---------------------------------------------------------------------------------------------
# Calibration data


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The example tokenizer, trained small on the built-in text."""
    folder = tmp_path_factory.mktemp("tokenizer")
    example_module("example_tokenizer").train_tokenizer(load_texts(None)[:40], 512, folder)
    return load_tokenizer(folder)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_load_texts_plain_splits_on_blank_lines(tmp_path):
    path = write(tmp_path / "calib.txt", "First document,\ntwo lines.\n\nSecond.\n   \n\n\nThird one.\n")
    assert load_texts(path) == ["First document,\ntwo lines.", "Second.", "Third one."]


def test_load_texts_jsonl_text(tmp_path):
    path = write(tmp_path / "calib.jsonl", '{"text": "alpha beta"}\n\n{"text": "gamma", "id": 3}\n')
    assert load_texts(path) == ["alpha beta", "gamma"]


def test_load_texts_jsonl_messages(tmp_path, tokenizer):
    line = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]}
    path = write(tmp_path / "chat.jsonl", json.dumps(line) + "\n")
    plain = ["user: Hi there\nassistant: Hello"]
    templated = ["<s>user\nHi there</s>\n<s>assistant\nHello</s>\n"]
    assert load_texts(path) == plain, "without a tokenizer, messages are role: content lines"
    assert load_texts(path, tokenizer) == templated, "with a tokenizer, its chat template renders them"
    assert render_messages(line["messages"], tokenizer) == load_texts(path, tokenizer)[0]


def test_load_texts_jsonl_keeps_line_separator_in_string(tmp_path):
    path = write(tmp_path / "calib.jsonl", '{"text": "one\u2028two"}\n')
    assert load_texts(path) == ["one\u2028two"]


def test_load_texts_chat_template_error_names_line(tmp_path, tokenizer, monkeypatch):
    from jinja2 import TemplateError

    def reject(*args, **kwargs):
        raise TemplateError("roles must alternate")

    monkeypatch.setattr(tokenizer, "apply_chat_template", reject)
    path = write(tmp_path / "chat.jsonl", '{"messages": [{"role": "user", "content": "a"}]}\n')
    with pytest.raises(UsageError, match="line 1: the tokenizer's chat template rejected these messages"):
        load_texts(path, tokenizer)


def test_load_texts_default_is_shipped_text():
    texts = load_texts(None)
    assert len(texts) > 100, "the built-in text should hold many documents"
    assert texts[0].startswith("# Docstrings of the Python"), "attribution header missing"
    assert "PSF License" in texts[0], "the attribution header must name the license"
    assert 100_000 <= sum(len(text.encode()) for text in texts) <= 200_000


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "not found"),
        ("empty.txt", "", "contains no text"),
        ("blank.txt", "\n  \n\n", "contains no text"),
        ("empty.jsonl", "\n\n", "contains no text"),
        ("broken.jsonl", '{"text": "ok"}\n{"text": \n', "line 2 is not valid JSON"),
        ("other.jsonl", '{"text": "ok"}\n\n{"prompt": "x"}\n', "line 3 has neither a 'text' string nor 'messages'"),
        ("list.jsonl", '["text"]\n', "line 1 has neither"),
        ("chat.jsonl", '{"messages": [{"role": "user"}]}\n', "line 1: 'messages' must be"),
        ("latin1.txt", b"caf\xe9", "is not UTF-8"),
    ],
)
def test_load_texts_rejects_bad_file(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError, match=message) as raised:
        load_texts(path)
    assert str(path) in raised.value.message, "the message must name the file"
    assert "--calib-data" in raised.value.hint


def test_load_texts_rejects_folder(tmp_path):
    with pytest.raises(UsageError, match="is a folder"):
        load_texts(tmp_path)


def test_tokenize_cuts_consecutive_windows(tokenizer):
    texts = load_texts(None)
    windows = tokenize(texts, tokenizer, samples=6, seq_len=32)
    assert windows.shape == (6, 32)
    assert windows.dtype == torch.int64
    assert torch.equal(windows, tokenize(texts, tokenizer, samples=6, seq_len=32)), "tokenization must be deterministic"

    stream: list[int] = []
    for text in texts[:3]:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert windows.flatten().tolist() == stream[: 6 * 32], "windows must be consecutive, documents joined by EOS"


def test_tokenize_short_text_uses_what_fits(tokenizer, caplog):
    text = ["one two three four five six seven eight nine ten " * 3]
    count = len(tokenizer(text[0], add_special_tokens=False)["input_ids"]) + 1
    with caplog.at_level(logging.WARNING, logger=calib_data.__name__):
        windows = tokenize(text, tokenizer, samples=50, seq_len=8)
    assert windows.shape == (count // 8, 8)
    assert f"fills {count // 8} of 50 requested samples" in caplog.text
    with pytest.raises(UsageError, match="fewer than one window"):
        tokenize(text, tokenizer, samples=1, seq_len=count + 1)
    with pytest.raises(UsageError, match="at least 1 sample"):
        tokenize(text, tokenizer, samples=0, seq_len=8)


def test_load_tokenizer_missing_names_folder(plain_parent):
    with pytest.raises(CheckpointError) as raised:
        load_tokenizer(plain_parent)
    assert str(plain_parent) in raised.value.message
    assert "checkpoint's own tokenizer" in raised.value.hint
    assert isinstance(raised.value, ElasticError)


def test_example_tokenizer_is_deterministic(tmp_path):
    train = example_module("example_tokenizer").train_tokenizer
    texts = load_texts(None)[:20]
    train(texts, 384, tmp_path / "a")
    train(texts, 384, tmp_path / "b")
    files = sorted(path.name for path in (tmp_path / "a").iterdir())
    assert files == ["tokenizer.json", "tokenizer_config.json"]
    for name in files:
        first, second = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        assert first == second, f"{name} differs between runs"

    loaded = load_tokenizer(tmp_path / "a")
    assert len(loaded) == 384
    assert [loaded.unk_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id] == [0, 1, 2, 3]
    assert "chat_template" in json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())


def test_shipped_text_matches_generator():
    text = (REPO_ROOT / "elastic_cli" / "data" / "calibration.txt").read_text(encoding="utf-8")
    version = f"Python {sys.version_info.major}.{sys.version_info.minor} "
    if version not in text.splitlines()[0]:
        pytest.skip(f"calibration.txt was written by another Python version than {version.strip()}")
    generated = example_module("make_calibration_text").build_text()
    assert generated == text, "calibration.txt is stale; regenerate it with examples/make_calibration_text.py"
