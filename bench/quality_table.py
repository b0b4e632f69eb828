"""Held-out perplexity of the trained example per budget: BF16, FP8 PTQ, NVFP4 PTQ, NVFP4 QAD.

Each quantized parent is written by ``elastic quantize`` (calibrated on the shipped text), every
budget is cut from it by ``elastic slice --budget all``, its quantized weights are dequantized,
and transformers computes the perplexity on the example's held-out documents (the windows
``examples/train_example.py`` defines). Activations stay in fp32, so the figures measure weight
quantization only.

Usage:
    .venv/bin/python bench/quality_table.py               # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))

from test_quantize_quality import dequantized_folder  # noqa: E402
from train_example import heldout_windows, model_logits, window_perplexity  # noqa: E402

from elastic_cli.quantize.calib_data import load_tokenizer  # noqa: E402

EXAMPLE = ROOT / "examples" / "nano-elastic-tiny"


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "elastic_cli", *args, "-q"], check=True)


def perplexities(children: Path, windows: torch.Tensor, quantized: bool, scratch: Path) -> dict[str, float]:
    import transformers

    results = {}
    for child in sorted(p for p in children.iterdir() if p.is_dir()):
        folder = dequantized_folder(child, scratch / f"dq-{children.name}-{child.name}") if quantized else child
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        results[child.name] = window_perplexity(lambda ids, m=model: model_logits(m, ids), windows)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qad-steps", type=int, default=150)
    parser.add_argument("--qad-lr", type=float, default=3e-5)
    parser.add_argument("--calib-samples", type=int, default=16)
    args = parser.parse_args()

    windows = heldout_windows(load_tokenizer(EXAMPLE))
    calib = ["--calib-samples", str(args.calib_samples), "--calib-seq-len", "128"]
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        started = time.monotonic()
        cli("slice", str(EXAMPLE), "--budget", "all", "--output", str(work / "bf16"))
        rows["BF16"] = perplexities(work / "bf16", windows, False, work)
        for label, extra in [
            ("FP8 PTQ", ["--format", "fp8"]),
            ("NVFP4 PTQ", ["--format", "nvfp4"]),
            ("NVFP4 QAD", ["--format", "nvfp4", "--qad", "--qad-steps", str(args.qad_steps), "--qad-seq-len", "128",
                           "--qad-batch-size", "8", "--qad-lr", str(args.qad_lr), "--qad-checkpoint-dir", str(work / "qad-ckpt")]),
        ]:
            name = label.lower().replace(" ", "-")
            cli("quantize", str(EXAMPLE), *extra, *calib, "--recipe", "all-linears", "--output", str(work / name))
            cli("slice", str(work / name), "--budget", "all", "--output", str(work / f"{name}-children"))
            rows[label] = perplexities(work / f"{name}-children", windows, True, work)
        elapsed = time.monotonic() - started

    budgets = list(rows["BF16"])
    print(f"| weights | {' | '.join(budgets)} |")
    print(f"|---|{'---|' * len(budgets)}")
    for label, values in rows.items():
        print(f"| {label} | {' | '.join(f'{values[b]:.2f}' for b in budgets)} |")
    print(f"({elapsed:.0f} s)")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"quality-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
