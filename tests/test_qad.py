"""Nested QAD: fake-quant numerics, the nested forward, the training loop, resume, export, torchrun.

The nested forward is compared with transformers' ``NemotronHForCausalLM`` loading the output of
``elastic slice``: the BF16 child for the teacher, and for the fake-quantized student the child
sliced from the quantized parent, dequantized to float32. Both sides run the same transformers
modules (SDPA attention, eager experts loop) on the same float32 values, so they differ at most
by the BLAS's summation order. On the development machine (x86-64, torch 2.13.0,
transformers 5.25.0, one thread) the logits agreed exactly; the tests allow 1e-6 relative and
absolute.

The two-process run forks ``tests/qad_worker.py`` twice with the environment variables
``torchrun`` sets (FSDP2 over gloo on the CPU). It splits every global batch over two processes, so its sums run
in another order than the one-process run's. Its losses must agree within 1e-5 relative and its
weights within 1e-5 relative plus 1e-7 absolute.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from elastic_cli.arch.nemotron_h import parse_config
from elastic_cli.checkpoint.reader import Checkpoint
from elastic_cli.elastic.slicer import plan_budgets, slice_checkpoint
from elastic_cli.elastic.source import open_source
from elastic_cli.errors import CheckpointError, UsageError
from elastic_cli.formats import fp8, nvfp4
from elastic_cli.qad import distributed
from elastic_cli.qad.fake_quant import fake_quantize, round_to_stored, weight_scale
from elastic_cli.qad.nested import build_nested
from elastic_cli.qad.data import TokenStream
from elastic_cli.qad.options import QADOptions, budget_probabilities, check_options, lr_factor
from elastic_cli.qad.train import QADTrainer, complete_state, kl_divergence_sum, list_checkpoints, run_qad
from elastic_cli.quantize import export
from elastic_cli.quantize.calib_data import load_texts
from elastic_cli.quantize.pipeline import QuantizeOptions, QuantizerState, load_state, plan_for, quantize_checkpoint
from elastic_cli.quantize.policy import ModuleDecision
from elastic_cli.quantize.validate import validate_quantized
from elastic_cli.synthetic import importance_budgets, tiny_config, write_checkpoint
from elastic_cli.verify import verify_artifact

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from example_tokenizer import train_tokenizer  # noqa: E402

from tests import qad_worker  # noqa: E402

transformers = pytest.importorskip("transformers")

PATTERN = "MEM*E"  # Mamba, MoE, attention: every layer kind of Nemotron 3 Nano
FRACTIONS = [("large", 1.0), ("medium", 0.75), ("small", 0.5)]
SEQ_LEN = 16
LOGIT_TOLERANCE = {"atol": 1e-6, "rtol": 1e-6}
WORKERS_TIMEOUT_S = 300


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    """Run torch with one thread: two threads per tiny matmul made a QAD step 15x slower on a busy 2-core VM."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """A tiny BF16 elastic parent whose three budgets keep whole blocks of 16 channels, with a tokenizer."""
    folder = tmp_path_factory.mktemp("qad") / "parent"
    folder.mkdir()
    config = tiny_config(PATTERN)
    budgets = importance_budgets(parse_config(config), FRACTIONS, seed=4, block=16)
    write_checkpoint(folder, config, seed=4, budgets=budgets)
    train_tokenizer(load_texts(None)[:200], config["vocab_size"], folder)
    return folder


def given_state(folder: Path, options: QuantizeOptions) -> QuantizerState:
    """A PTQ state with made-up input amax values and the parent's weight amax values."""
    source = open_source(str(folder))
    try:
        plan = plan_for(source, options)
        state = QuantizerState(calibration={"samples": 0, "tokens": 0, "budgets": []})
        for index, decision in enumerate(plan.decisions):
            if decision.format:
                state.modules[decision.module] = export.ModuleScales(decision.format, 0.0, 1.0 + index / 7)
        return complete_state(source, plan, state)
    finally:
        source.close()


def token_ids(count: int, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (count, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def nested_model(
    folder: Path, *, fake_quant: bool, state: QuantizerState | None = None, fmt: str = "nvfp4", recipe: str = "nvidia"
):
    """Build and load a student or teacher of the parent; return it with the budget names."""
    source = open_source(str(folder))
    try:
        plans = plan_budgets(source, ["all"])
        quantized = None
        if state is not None:
            plan = plan_for(source, QuantizeOptions(format=fmt, recipe=recipe))
            quantized = {module: state.modules[module] for module in plan.quantized}
        model = build_nested(source.checkpoint.tensors, plans, fake_quant=fake_quant, quantized=quantized)
        distributed.materialize(model, source.checkpoint.read, distributed.DistContext(0, 1, torch.device("cpu")))
    finally:
        source.close()
    return model, [plan.budget for plan in plans]


def load_child(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="sdpa", experts_implementation="eager"
    ).eval()


def slice_all(folder: Path, output: Path) -> None:
    source = open_source(str(folder))
    try:
        slice_checkpoint(source, plan_budgets(source, ["all"]), output, nested=True)
    finally:
        source.close()


def dequantized_copy(quantized: Path, folder: Path) -> Path:
    """Write a float32 copy of a quantized checkpoint: every quantized module dequantized, scales dropped."""
    folder.mkdir()
    config = json.loads((quantized / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    formats = {module: scales.format for module, scales in load_state(quantized / export.STATE_FILE).modules.items()}
    tensors = {}
    with Checkpoint.open(quantized) as checkpoint:
        values = {name: checkpoint.read(name) for name in checkpoint.tensors}
    for name, value in values.items():
        module, role = export.split_quantized_name(name)
        module = module.removesuffix(".weight")
        if module in formats:
            if role == "weight":
                tensors[name] = export.dequantize_module(values, module, formats[module], torch.float32)
        elif role == "weight":
            tensors[name] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def final_state(checkpoint: Path, tmp_path: Path) -> dict:
    """Load a QAD checkpoint (student and optimizer) into plain tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp_path / f"{checkpoint.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, target)
    return torch.load(target, weights_only=False)


def assert_same(left, right, where: str = "") -> None:
    """Assert two nested state dicts are equal, tensors bit for bit."""
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor) and torch.equal(left, right), f"{where} differs"
    elif isinstance(left, dict):
        assert sorted(left, key=str) == sorted(right, key=str), f"{where} has other keys"
        for key in left:
            assert_same(left[key], right[key], f"{where}.{key}")
    else:
        assert left == right, f"{where} differs: {left!r} != {right!r}"


def qad_options(tmp_path: Path, name: str, **overrides) -> QADOptions:
    fields = {"steps": 6, "seq_len": SEQ_LEN, "batch_size": 4, "lr": 1e-4, "warmup_steps": 1, "log_every": 2,
              "checkpoint_dir": tmp_path / f"{name}.qad", "device": "cpu"}
    fields.update(overrides)
    return QADOptions(**fields)


# Fake quantization --------------------------------------------------------------------------


def random_weight(out_features: int = 48, in_features: int = 128, seed: int = 0) -> torch.Tensor:
    """A float32 weight with an all-zero block and an outlier, not exactly representable in BF16."""
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05
    weight[3, 16:32] = 0.0
    weight[5, 7] = 0.9
    return weight


def exported(weight: torch.Tensor, scales: export.ModuleScales) -> dict[str, torch.Tensor]:
    """Quantize a stored weight as ``elastic quantize`` writes it, keyed by on-disk names of module ``m``."""
    decision = ModuleDecision("m", 0, "mlp", scales.format, "test", tuple(weight.shape), None)
    names = [name for name, _, _ in export.output_entries(decision, "BF16")]
    return dict(zip(names, export.quantize_module(weight, scales)))


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_fake_quant_equals_export_round_trip(fmt):
    weight = random_weight()
    stored = weight.to(torch.bfloat16)
    scales = export.ModuleScales(fmt, export.weight_amax(stored), 1.0)

    expected = export.dequantize_module(exported(stored, scales), "m", fmt, torch.float32)
    actual = fake_quantize(weight, fmt, weight_scale(scales), torch.bfloat16)

    assert actual.dtype == torch.float32
    assert torch.equal(actual, expected), f"{fmt} fake quantization differs from dequantize(export)"


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_fake_quant_saturates_like_export(fmt):
    weight = random_weight()
    stored = weight.to(torch.bfloat16)
    scales = export.ModuleScales(fmt, 0.5, 1.0)  # below the outlier 0.9, as after training grew it

    expected = export.dequantize_module(exported(stored, scales), "m", fmt, torch.float32)
    actual = fake_quantize(weight, fmt, weight_scale(scales), torch.bfloat16)

    assert torch.equal(actual, expected), f"{fmt} saturation differs from export"
    assert float(actual[5, 7]) < 0.9, "the outlier did not saturate"


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_fake_quant_gradient_passes_straight_through(fmt):
    weight = random_weight().requires_grad_(True)
    scale = weight_scale(export.ModuleScales(fmt, 0.5, 1.0))  # below the outlier 0.9, which saturates
    grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))

    fake_quantize(weight, fmt, scale, torch.bfloat16).backward(grad)

    assert torch.equal(weight.grad, grad), "the straight-through gradient changed"


def test_round_to_stored_rounds_forward_only():
    weight = random_weight().requires_grad_(True)
    rounded = round_to_stored(weight, torch.bfloat16)
    rounded.sum().backward()

    assert torch.equal(rounded, weight.detach().to(torch.bfloat16).float())
    assert torch.equal(weight.grad, torch.ones_like(weight))


def test_fake_quant_commutes_with_block_aligned_slices():
    weight = random_weight(48, 128)
    scale = nvfp4.global_scale(export.weight_amax(weight.to(torch.bfloat16)))
    rows = torch.tensor([0, 3, 5, 17, 40])
    columns = torch.cat([torch.arange(16, 48), torch.arange(96, 112)])  # whole blocks of 16

    parent = fake_quantize(weight, "nvfp4", scale, torch.bfloat16)[rows][:, columns]
    child = fake_quantize(weight[rows][:, columns], "nvfp4", scale, torch.bfloat16)

    assert torch.equal(parent, child), "slicing the fake-quantized parent differs from fake-quantizing the slice"


def test_weight_scale_matches_formats():
    assert torch.equal(weight_scale(export.ModuleScales("nvfp4", 3.0, 1.0)), nvfp4.global_scale(3.0))
    assert torch.equal(weight_scale(export.ModuleScales("fp8", 3.0, 1.0)), fp8.per_tensor_scale(3.0))
    with pytest.raises(ValueError, match="not positive"):
        weight_scale(export.ModuleScales("nvfp4", 0.0, 1.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_fake_quant_cuda_equals_cpu(fmt):
    weight = random_weight()
    scale = weight_scale(export.ModuleScales(fmt, export.weight_amax(weight.to(torch.bfloat16)), 1.0))

    expected = fake_quantize(weight, fmt, scale, torch.bfloat16)
    actual = fake_quantize(weight.cuda(), fmt, scale.cuda(), torch.bfloat16).cpu()

    assert torch.equal(actual, expected), f"{fmt} fake quantization differs between CUDA and CPU"


# Nested forward -----------------------------------------------------------------------------


@pytest.mark.parametrize("fake_quant", [False, True], ids=["teacher", "student-without-quantized-modules"])
def test_nested_forward_equals_sliced_children(parent, tmp_path, fake_quant):
    slice_all(parent, tmp_path / "children")
    model, budgets = nested_model(parent, fake_quant=fake_quant)
    ids = token_ids(2, seed=3)

    for index, budget in enumerate(budgets):
        with torch.no_grad():
            expected = load_child(tmp_path / "children" / budget)(ids, use_cache=False).logits.float()
            actual = model(ids, index)
        assert expected.abs().max() > 0.1, "reference logits are degenerate"
        torch.testing.assert_close(actual, expected, **LOGIT_TOLERANCE, msg=lambda m: f"budget {budget}: {m}")


@pytest.mark.parametrize(("fmt", "recipe"), [("nvfp4", "all-linears"), ("fp8", "nvidia")])
def test_student_equals_sliced_quantized_parent(parent, tmp_path, fmt, recipe):
    options = QuantizeOptions(format=fmt, recipe=recipe)
    state = given_state(parent, options)
    source = open_source(str(parent))
    try:
        quantize_checkpoint(source, options, tmp_path / "quantized", state=state)
    finally:
        source.close()
    slice_all(tmp_path / "quantized", tmp_path / "children")
    model, budgets = nested_model(parent, fake_quant=True, state=state, fmt=fmt, recipe=recipe)
    teacher, _ = nested_model(parent, fake_quant=False)
    ids = token_ids(2, seed=5)

    for index, budget in enumerate(budgets):
        child = dequantized_copy(tmp_path / "children" / budget, tmp_path / f"{budget}-float32")
        with torch.no_grad():
            expected = load_child(child)(ids, use_cache=False).logits.float()
            actual = model(ids, index)
            unquantized = teacher(ids, index)
        torch.testing.assert_close(actual, expected, **LOGIT_TOLERANCE, msg=lambda m: f"{fmt} budget {budget}: {m}")
        assert (actual - unquantized).abs().max() > 1e-3, f"{fmt} budget {budget}: quantization changed nothing"


def test_every_budget_trains_shared_parent_weights(parent):
    model, budgets = nested_model(parent, fake_quant=True, state=given_state(parent, QuantizeOptions(format="nvfp4")))
    source = open_source(str(parent))
    try:
        small = source.budget("small")
    finally:
        source.close()
    weight = model.get_parameter("backbone.layers.0.mixer.out_proj.weight")  # [H, inner], rows follow hidden
    dropped_rows = [row for row, keep in enumerate(small.hidden) if not keep]
    ids = token_ids(2, seed=7)

    model(ids, budgets.index("small")).pow(2).mean().backward()
    small_grad = weight.grad.clone()
    model(ids, budgets.index("large")).pow(2).mean().backward()

    assert dropped_rows, "the small budget keeps every hidden channel; the test would prove nothing"
    assert small_grad[dropped_rows].abs().max() == 0, "a budget sent gradient to hidden channels it drops"
    assert small_grad.abs().max() > 0, "the small budget sent no gradient to the parent weight"
    assert weight.grad[dropped_rows].abs().max() > 0, "the large budget's gradient did not accumulate"


def test_activation_checkpointing_keeps_gradients(parent):
    state = given_state(parent, QuantizeOptions(format="nvfp4"))
    ids = token_ids(2, seed=9)
    gradients = []
    for checkpointing in (False, True):
        model, budgets = nested_model(parent, fake_quant=True, state=state)
        for layer in model.layers:
            layer.checkpoint_activations = checkpointing
        model(ids, budgets.index("medium")).pow(2).mean().backward()
        gradients.append({name: p.grad for name, p in model.named_parameters()})

    for name, grad in gradients[0].items():
        assert (grad is None) == (gradients[1][name] is None), f"{name}: gradient presence changed"
        if grad is not None:
            torch.testing.assert_close(gradients[1][name], grad, rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}: {m}")


def test_bfloat16_compute_stays_close_to_float32(parent):
    ids = token_ids(2, seed=11)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        source = open_source(str(parent))
        try:
            plans = plan_budgets(source, ["all"])
            model = build_nested(source.checkpoint.tensors, plans, fake_quant=True, compute_dtype=dtype)
            distributed.materialize(model, source.checkpoint.read, distributed.DistContext(0, 1, torch.device("cpu")))
        finally:
            source.close()
        with torch.no_grad():
            logits[dtype] = model(ids, 2)

    error = (logits[torch.bfloat16] - logits[torch.float32]).abs().max() / logits[torch.float32].abs().max()
    assert logits[torch.bfloat16].dtype == torch.float32
    assert error < 0.03, f"BF16 logits are {error:.3%} of max |logit| away from float32 (measured 0.7%)"


# Training loop ------------------------------------------------------------------------------


def test_budget_probabilities_defaults_and_checks(parent):
    source = open_source(str(parent))
    try:
        plans = plan_budgets(source, ["all"])
    finally:
        source.close()

    assert budget_probabilities(plans, None) == pytest.approx((0.5, 0.3, 0.2))
    two = budget_probabilities(plans[:2], None)
    assert two == pytest.approx((plans[0].params / (plans[0].params + plans[1].params),
                                 plans[1].params / (plans[0].params + plans[1].params)))
    assert budget_probabilities(plans, (2.0, 1.0, 1.0)) == pytest.approx((0.5, 0.25, 0.25))
    with pytest.raises(UsageError, match="2 budget probabilities given for 3"):
        budget_probabilities(plans, (0.5, 0.5))
    with pytest.raises(UsageError, match="invalid"):
        budget_probabilities(plans, (1.0, -0.1, 0.1))


def test_lr_schedule_warms_up_then_decays():
    options = QADOptions(steps=10, lr=1e-5, min_lr=1e-6, warmup_steps=2)
    factors = [lr_factor(step, options, 10) for step in range(10)]

    assert factors[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert all(a >= b for a, b in zip(factors[2:], factors[3:])), f"cosine decay is not monotonic: {factors}"
    assert lr_factor(10, options, 10) == pytest.approx(0.1)
    linear = dataclasses.replace(options, schedule="linear")
    assert lr_factor(6, linear, 10) == pytest.approx(0.1 + 0.9 * 0.5)


@pytest.mark.parametrize(
    ("fields", "world_size", "message"),
    [
        ({}, 1, "exactly one of a step count and a token count"),
        ({"steps": 2, "tokens": 10}, 1, "exactly one"),
        ({"steps": 2, "batch_size": 3}, 2, "does not split evenly over 2 processes"),
        ({"steps": 2, "batch_size": 8, "micro_batch": 3}, 2, "micro-batches of 3"),
        ({"steps": 2, "schedule": "step"}, 1, "schedule 'step'"),
        ({"steps": 2, "lr": 1e-5, "min_lr": 1e-4}, 1, "learning rates"),
        ({"steps": 2, "stop_at_step": 3}, 1, "outside 1..2"),
        ({"steps": 0}, 1, "steps is 0"),
    ],
)
def test_options_rejected(fields, world_size, message):
    with pytest.raises(UsageError, match=message):
        check_options(QADOptions(**fields), world_size)


def test_tokens_option_sets_step_count():
    assert QADOptions(tokens=1000, seq_len=16, batch_size=4).total_steps() == 16


def test_kl_divergence_zero_and_positive():
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0))
    other = logits + torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(1))

    assert float(kl_divergence_sum(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_divergence_sum(other, logits)) > 0


def test_token_stream_order_is_positional():
    ids = token_ids(5)
    first = TokenStream(ids, seed=3).samples(0, 12)
    again = TokenStream(ids, seed=3)

    assert torch.equal(again.samples(7, 5), first[7:]), "samples depend on what was read before"
    assert sorted(first[:5, 0].tolist()) == sorted(ids[:, 0].tolist()), "an epoch does not visit every sequence once"
    assert not torch.equal(TokenStream(ids, seed=4).samples(0, 12), first)


def test_qad_lowers_kl_on_fixed_batch(parent, tmp_path):
    options = QuantizeOptions(format="nvfp4", recipe="all-linears")
    state = given_state(parent, options)
    qad = qad_options(
        tmp_path, "fit", steps=12, lr=1e-3, warmup_steps=0, schedule="constant", budget_probabilities=(0, 0, 1)
    )
    source = open_source(str(parent))
    try:
        plan = plan_for(source, options)
        context = distributed.DistContext(0, 1, torch.device("cpu"))
        trainer = QADTrainer(source, plan, state, qad, TokenStream(token_ids(4), 0), context)
        records = trainer.train(12)
    finally:
        source.close()

    assert {record.budget for record in records} == {"small"}
    assert records[-1].loss < 0.5 * records[0].loss, f"KL did not fall: {[round(r.loss, 5) for r in records]}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_matches_cpu(parent, tmp_path):
    """CUDA convolutions may use TF32 by default, so the losses only agree within 1e-2 relative."""
    options = QuantizeOptions(format="nvfp4")
    state = given_state(parent, options)
    losses = {}
    for device in ("cpu", "cuda"):
        source = open_source(str(parent))
        try:
            qad = qad_options(tmp_path, device, steps=2, device=device)
            context = distributed.DistContext(0, 1, torch.device(device))
            trainer = QADTrainer(source, plan_for(source, options), state, qad, TokenStream(token_ids(8), 0), context)
            losses[device] = [record.loss for record in trainer.train(2)]
        finally:
            source.close()

    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-2)


def run(parent: Path, output: Path, qad: QADOptions, state: QuantizerState, ids: torch.Tensor, **kwargs):
    return run_qad(str(parent), QuantizeOptions(format="nvfp4"), output, qad, state=state, token_ids=ids, **kwargs)


def test_resume_continues_bit_for_bit(parent, tmp_path):
    state = given_state(parent, QuantizeOptions(format="nvfp4"))
    ids = token_ids(10)
    whole = run(parent, tmp_path / "whole", qad_options(tmp_path, "whole", steps=4, checkpoint_every=2), state, ids)

    split = qad_options(tmp_path, "split", steps=4, checkpoint_every=2, stop_at_step=2)
    first = run(parent, tmp_path / "split", split, state, ids)
    assert first.steps == 2
    assert first.quantized is None, "a stopped run exported"
    assert not (tmp_path / "split").exists(), "a stopped run wrote an output"
    resumed = run(parent, tmp_path / "split", dataclasses.replace(split, stop_at_step=None, resume=True), state, ids)

    assert [dataclasses.asdict(r) for r in resumed.history] == [dataclasses.asdict(r) for r in whole.history]
    assert_same(final_state(resumed.checkpoint, tmp_path), final_state(whole.checkpoint, tmp_path), "checkpoint")
    with Checkpoint.open(tmp_path / "whole") as a, Checkpoint.open(tmp_path / "split") as b:
        for name in a.tensors:
            assert a.read_bytes(name) == b.read_bytes(name), f"exported {name} differs after a resume"
    assert [path.name for path in list_checkpoints(tmp_path / "whole.qad")] == ["step-00000002", "step-00000004"]


def test_export_equals_student_forward_weights(parent, tmp_path):
    state = given_state(parent, QuantizeOptions(format="nvfp4"))
    result = run(parent, tmp_path / "out", qad_options(tmp_path, "out", steps=3), state, token_ids(8))
    student = final_state(result.checkpoint, tmp_path)["model"]
    plan = result.quantized.plan

    assert validate_quantized(tmp_path / "out") == []
    assert load_state(tmp_path / "out" / export.STATE_FILE).modules == state.modules, "export changed the PTQ scales"
    with Checkpoint.open(tmp_path / "out") as out, Checkpoint.open(parent) as bf16:
        changed = 0
        for module in ["backbone.layers.0.mixer.in_proj", "backbone.layers.1.mixer.experts.3.down_proj",
                       "backbone.layers.4.mixer.shared_experts.up_proj"]:
            assert plan.quantized[module].format == "nvfp4"
            tensors = {name: out.read(name) for name in out.tensors if name.startswith(module + ".")}
            exported = export.dequantize_module(tensors, module, "nvfp4", torch.float32)
            master = student[f"{module}.weight"]
            expected = fake_quantize(master, "nvfp4", weight_scale(state.modules[module]), torch.bfloat16)
            assert torch.equal(exported, expected), f"{module}: export differs from the student's fake quantization"
            changed += int(not torch.equal(master.to(torch.bfloat16), bf16.read(f"{module}.weight")))
        norm = "backbone.layers.2.norm.weight"
        assert torch.equal(out.read(norm), student[norm].to(torch.bfloat16)), "a BF16 tensor is not the trained one"
    assert changed, "training changed none of the checked weights; the test would prove nothing"
    report = verify_artifact(tmp_path / "out")
    assert report.ok, f"elastic verify found problems: {report}"
    slice_all(tmp_path / "out", tmp_path / "children")
    for budget in ("large", "medium", "small"):
        assert validate_quantized(tmp_path / "children" / budget) == [], f"sliced {budget} is invalid"


def test_resume_rejects_another_run(parent, tmp_path):
    state = given_state(parent, QuantizeOptions(format="nvfp4"))
    ids = token_ids(8)
    run(parent, tmp_path / "a", qad_options(tmp_path, "a", steps=4, stop_at_step=2), state, ids)

    with pytest.raises(UsageError, match="already contains QAD checkpoints"):
        run(parent, tmp_path / "a", qad_options(tmp_path, "a", steps=4), state, ids)
    with pytest.raises(CheckpointError, match="options.lr"):
        run(parent, tmp_path / "a", qad_options(tmp_path, "a", steps=4, lr=3e-4, resume=True), state, ids)


def test_qad_calibrates_and_reads_text(parent, tmp_path):
    options = QuantizeOptions(format="nvfp4", calib_samples=2, calib_seq_len=SEQ_LEN)
    qad = qad_options(tmp_path, "text", steps=2, batch_size=2, seq_len=32)
    result = run_qad(str(parent), options, tmp_path / "out", qad)

    state = load_state(tmp_path / "out" / export.STATE_FILE)
    assert state.calibration["samples"] == 2
    assert all(scales.weight_amax > 0 and scales.input_amax > 0 for scales in state.modules.values())
    assert len(result.history) == 2 and all(record.loss > 0 for record in result.history)
    assert (tmp_path / "out" / "tokenizer.json").is_file(), "the tokenizer was not carried over"


# Distributed --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def forked_worker(rank: int, world_size: int, port: int, argv: list[str]) -> None:
    """Run ``tests/qad_worker.py`` as rank ``rank``, with the environment variables ``torchrun`` sets."""
    torch.set_num_threads(1)  # as DataLoader workers do: a forked child must not reuse the parent's OpenMP pool
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size)})
    qad_worker.main(argv)


def launch_processes(argv: list[str], processes: int) -> None:
    """Fork ``processes`` QAD workers and wait for them; a worker's exception fails the test.

    Forking skips each worker's import of torch and transformers, which took about 35 s for two
    processes on a busy 2-core machine.
    """
    context = torch.multiprocessing.start_processes(
        forked_worker, args=(processes, free_port(), argv), nprocs=processes, join=False, start_method="fork"
    )
    deadline = time.monotonic() + WORKERS_TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"QAD workers did not finish within {WORKERS_TIMEOUT_S} s")


@pytest.mark.slow
def test_two_processes_match_one(parent, tmp_path):
    state = given_state(parent, QuantizeOptions(format="nvfp4"))
    ids = token_ids(12)
    options = qad_options(tmp_path, "one", steps=4, micro_batch=1)
    reference = run(parent, tmp_path / "one", options, state, ids)

    (tmp_path / "state.json").write_text(json.dumps(state.to_json()))
    torch.save(ids, tmp_path / "tokens.pt")
    worker_options = dataclasses.asdict(dataclasses.replace(options, checkpoint_dir=tmp_path / "two.qad"))
    fields = {key: (str(value) if isinstance(value, Path) else value) for key, value in worker_options.items()}
    (tmp_path / "options.json").write_text(json.dumps(fields))
    launch_processes([str(parent), str(tmp_path / "two"), "--state", str(tmp_path / "state.json"),
                      "--tokens", str(tmp_path / "tokens.pt"), "--options", str(tmp_path / "options.json"),
                      "--history", str(tmp_path / "history.json")], processes=2)
    distributed_run = json.loads((tmp_path / "history.json").read_text())

    assert distributed_run["steps"] == 4
    assert [r["budget"] for r in distributed_run["history"]] == [r.budget for r in reference.history]
    for expected, actual in zip(reference.history, distributed_run["history"]):
        assert actual["loss"] == pytest.approx(expected.loss, rel=1e-5), f"step {expected.step}: losses differ"
    reference_weights = final_state(reference.checkpoint, tmp_path)["model"]
    distributed_weights = final_state(tmp_path / "two.qad" / "step-00000004", tmp_path)["model"]
    for name, value in reference_weights.items():
        torch.testing.assert_close(distributed_weights[name], value, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert validate_quantized(tmp_path / "two") == []


# Command-line option conversion --------------------------------------------------------------


def test_qad_flags_convert_counts_and_probabilities():
    from elastic_cli.cli.qad_options import build_qad_options, parse_count, parse_probabilities

    assert parse_count("500M", "--qad-tokens") == 500_000_000
    assert parse_count("1b", "--qad-tokens") == 1_000_000_000
    assert parse_count("5000", "--qad-tokens") == 5000
    assert parse_probabilities("0.5, 0.3,0.2", "--qad-budget-probs") == (0.5, 0.3, 0.2)
    with pytest.raises(UsageError, match="--qad-tokens '1.5X' is not a positive count"):
        parse_count("1.5X", "--qad-tokens")
    with pytest.raises(UsageError, match="not a comma-separated list"):
        parse_probabilities("0.5;0.5", "--qad-budget-probs")

    options = build_qad_options(
        data=None, steps=None, tokens="1M", seq_len=1024, batch_size=8, micro_batch=None, lr=2e-5, min_lr=0.0,
        schedule="linear", warmup_steps=10, weight_decay=0.0, max_grad_norm=1.0, budget_probabilities="2,1",
        seed=7, checkpoint_dir=None, checkpoint_every=50, keep_checkpoints=2, resume=False, stop_at_step=None,
        log_every=10, dtype="bfloat16", activation_checkpointing=True, device="cpu",
    )
    assert options.tokens == 1_000_000
    assert options.total_steps() == 123
    assert options.budget_probabilities == (2.0, 1.0)
    assert options.compute_dtype == "bfloat16"
    assert options.schedule == "linear"
