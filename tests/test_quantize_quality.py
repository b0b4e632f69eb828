"""End to end: calibrate, quantize, slice every budget, dequantize, compare logits with BF16.

The elastic parent is quantized once through the command line (real calibration with the
checkpoint's own tokenizer); each budget is sliced from the quantized parent, its quantized
modules are dequantized, and transformers' logits on held-out text are compared with the BF16
child's.

The weights are random, not trained, so quantization noise grows from layer to layer much more
than in a trained model (one layer alone: FP8 about 0.02-0.04 relative RMS logit error). On this
five-layer model the errors measured 0.10-0.17 for FP8 and 0.21-0.38 for NVFP4 across budgets
(larger budgets have more layers' worth of noise); the bounds leave about 1.5x headroom. The
trained example gives the meaningful quality figures (perplexity per budget).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from elastic_cli.arch.nemotron_h import parse_config
from elastic_cli.checkpoint.reader import Checkpoint
from elastic_cli.quantize import export
from elastic_cli.quantize.calib_data import load_texts, load_tokenizer, tokenize
from elastic_cli.quantize.validate import validate_quantized
from elastic_cli.synthetic import importance_budgets, tiny_config, write_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from example_tokenizer import train_tokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")

BOUNDS = {"fp8": 0.25, "nvfp4": 0.55}
BUDGETS = ["full", "mid", "small"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("parent")
    config = tiny_config("MEM*E")
    arch = parse_config(config)
    budgets = importance_budgets(arch, list(zip(BUDGETS, (1.0, 0.75, 0.5))), seed=21, block=16)
    write_checkpoint(folder, config, seed=21, budgets=budgets)
    train_tokenizer(load_texts(None)[:200], config["vocab_size"], folder)
    return folder


def cli(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "elastic_cli", *args, "-q"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr


def held_out_ids(folder: Path) -> torch.Tensor:
    """Return token windows from the end of the shipped text; calibration reads only its start."""
    texts = load_texts(None)
    return tokenize(texts[-40:], load_tokenizer(folder), samples=2, seq_len=48)


def dequantized_folder(quantized: Path, target: Path) -> Path:
    """Write a plain fp32 checkpoint whose quantized modules are replaced by their dequantized weights."""
    target.mkdir()
    with Checkpoint.open(quantized) as checkpoint:
        tensors = {name: checkpoint.read(name) for name in checkpoint.tensors}
    document = json.loads((quantized / export.QUANT_CONFIG_FILE).read_text())
    algo = document["quantization"]["quant_algo"]
    layers = document["quantization"].get("quantized_layers", {})
    plain = {}
    for name, value in tensors.items():
        base, role = export.split_quantized_name(name)
        if role != "weight":
            continue
        if value.dtype in (torch.uint8, torch.float8_e4m3fn):
            module = base[: -len(".weight")]
            fmt = (layers[module]["quant_algo"] if algo == "MIXED_PRECISION" else algo).lower()
            value = export.dequantize_module(tensors, module, fmt, torch.float32)
        plain[name] = value.float()
    save_file(plain, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((quantized / "config.json").read_text())
    config.pop("quantization_config")
    (target / "config.json").write_text(json.dumps(config))
    return target


def logits(folder: Path, input_ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids, use_cache=False).logits.float()


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_dequantized_budgets_track_bf16(parent, tmp_path, fmt):
    cli("quantize", str(parent), "--format", fmt, "--recipe", "all-linears", "--kv-cache", "fp8",
        "--calib-samples", "4", "--calib-seq-len", "64", "--output", str(tmp_path / "q"))
    assert validate_quantized(tmp_path / "q") == []
    cli("slice", str(tmp_path / "q"), "--budget", "all", "--output", str(tmp_path / "q-children"))
    cli("slice", str(parent), "--budget", "all", "--output", str(tmp_path / "bf16-children"))
    input_ids = held_out_ids(parent)

    for budget in BUDGETS:
        assert validate_quantized(tmp_path / "q-children" / budget) == [], f"{budget} child is unsound"
        reference = logits(tmp_path / "bf16-children" / budget, input_ids)
        restored = logits(dequantized_folder(tmp_path / "q-children" / budget, tmp_path / f"dq-{budget}"), input_ids)
        error = float((restored - reference).norm() / reference.norm())
        assert 0 < error < BOUNDS[fmt], f"{fmt} budget {budget}: relative logit error {error:.4f}"
