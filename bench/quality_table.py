"""Held-out perplexity of the trained example per budget: BF16, FP8 PTQ, NVFP4 PTQ, NVFP4 QAD.

Each quantized parent is written by ``elastic quantize``, calibrated (and, for QAD, trained) on
the example's training documents only. Every budget is cut from it by ``elastic slice --budget
all``, its quantized weights are dequantized, and transformers computes the perplexity on the
example's held-out documents (the windows ``examples/train_example.py`` defines). Activations
stay in fp32, so the figures measure weight quantization only.

The QAD command also evaluates the same windows itself (``--eval-data``). Both sides sum float32
token NLLs in float64 over batches of the same windows, so every row of its JSON report must
agree with the sliced children's figures within a relative 1e-9, or the script exits with an
error.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python bench/quality_table.py   # 4.5 minutes on 2 shared CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
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
from train_example import (  # noqa: E402
    BATCH, EXPERTS_IMPLEMENTATION, SEQ_LEN, heldout_windows, model_logits, split_documents,
)

from elastic_cli.quantize.calib_data import load_texts, load_tokenizer  # noqa: E402

EXAMPLE = ROOT / "examples" / "nano-elastic-tiny"
REPORT_ROWS = {"BF16": "bf16", "FP8 PTQ": "fp8_ptq", "NVFP4 PTQ": "nvfp4_ptq", "NVFP4 QAD": "nvfp4_qad"}
REPORT_TOLERANCE = 1e-9  # relative


def cli(*args: str) -> str:
    """Run ``elastic`` and return its stdout."""
    completed = subprocess.run([sys.executable, "-m", "elastic_cli", *args, "-q"], check=True, stdout=subprocess.PIPE, text=True)
    return completed.stdout


def write_jsonl(path: Path, documents: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": document}) + "\n" for document in documents), encoding="utf-8")
    return path


def check_report(rows: dict[str, dict[str, float]], report: dict) -> float:
    """Return the largest relative difference between the sliced figures and the QAD report's."""
    worst = 0.0
    for label, key in REPORT_ROWS.items():
        for budget, expected in rows[label].items():
            actual = report["perplexity"][key][budget]
            worst = max(worst, abs(actual - expected) / expected)
    if worst > REPORT_TOLERANCE:
        raise SystemExit(f"the QAD report differs from the sliced children by {worst:.2e} (relative)")
    return worst


def window_perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """Return exp(mean NLL) over every predicted token of every window: float32 token NLLs, float64 sums."""
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for input_ids in windows.split(BATCH):
            logits = model_logits(model, input_ids).float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
            )
            total += nll.double().sum()
    return math.exp(float(total) / (windows.shape[0] * (windows.shape[1] - 1)))


def perplexities(children: Path, windows: torch.Tensor, quantized: bool, scratch: Path) -> dict[str, float]:
    import transformers

    results = {}
    for child in sorted(p for p in children.iterdir() if p.is_dir()):
        folder = dequantized_folder(child, scratch / f"dq-{children.name}-{child.name}") if quantized else child
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, experts_implementation=EXPERTS_IMPLEMENTATION
        ).eval()
        results[child.name] = window_perplexity(model, windows)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qad-steps", type=int, default=150)
    parser.add_argument("--qad-lr", type=float, default=3e-5)
    parser.add_argument("--calib-samples", type=int, default=16)
    args = parser.parse_args()

    windows = heldout_windows(load_tokenizer(EXAMPLE))
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        training, heldout = split_documents(load_texts(None))
        training_file = write_jsonl(work / "training.jsonl", training)
        heldout_file = write_jsonl(work / "heldout.jsonl", heldout)
        calib = ["--calib-data", str(training_file), "--calib-samples", str(args.calib_samples), "--calib-seq-len", "128"]
        evaluation = ["--eval-data", str(heldout_file), "--eval-seq-len", str(SEQ_LEN), "--eval-windows",
                      str(len(windows)), "--eval-batch-size", str(BATCH)]
        started = time.monotonic()
        cli("slice", str(EXAMPLE), "--budget", "all", "--output", str(work / "bf16"))
        rows["BF16"] = perplexities(work / "bf16", windows, False, work)
        for label, extra in [
            ("FP8 PTQ", ["--format", "fp8"]),
            ("NVFP4 PTQ", ["--format", "nvfp4"]),
            ("NVFP4 QAD", ["--format", "nvfp4", "--qad", "--qad-steps", str(args.qad_steps), "--qad-seq-len", "128",
                           "--qad-batch-size", "8", "--qad-lr", str(args.qad_lr), "--qad-checkpoint-dir", str(work / "qad-ckpt"),
                           "--qad-data", str(training_file), *evaluation, "--json"]),
        ]:
            name = label.lower().replace(" ", "-")
            command_started = time.monotonic()
            stdout = cli("quantize", str(EXAMPLE), *extra, *calib, "--recipe", "all-linears", "--output", str(work / name))
            command_seconds = time.monotonic() - command_started
            cli("slice", str(work / name), "--budget", "all", "--output", str(work / f"{name}-children"))
            rows[label] = perplexities(work / f"{name}-children", windows, True, work)
        report = json.loads(stdout)["qad"]["evaluation"]
        elapsed = time.monotonic() - started

    budgets = report["budgets"]  # largest first
    print(f"| weights | {' | '.join(budgets)} |")
    print(f"|---|{'---|' * len(budgets)}")
    for label, values in rows.items():
        print(f"| {label} | {' | '.join(f'{values[b]:.2f}' for b in budgets)} |")
    print(f"({elapsed:.0f} s)")
    worst = check_report(rows, report)
    print(f"QAD report: every row within {worst:.1e} (relative) of the sliced children; its evaluation took "
          f"{report['seconds']:.1f} s of the QAD command's {command_seconds:.0f} s")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    document = {"sliced": rows, "qad_report": report}
    (results / f"quality-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
