"""Held-out perplexity in the report of ``elastic quantize --qad --eval-data``.

Every row of the report is checked against transformers' ``NemotronHForCausalLM`` loading
children cut by ``elastic slice``. They come from the BF16 parent, from the outputs of ``elastic
quantize --format fp8`` and ``--format nvfp4`` with the same calibration options, and from the
QAD export, and each quantized child is dequantized to float32. The reference perplexity is computed in
this file with float32 token NLLs summed in float64, as the command computes it. On the
development machine (x86-64, torch 2.13.0, transformers 5.25.0, one thread) the figures agreed
exactly. The tests allow a relative difference of 1e-6, the logit tolerance of ``test_qad.py``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from elastic_cli.errors import UsageError
from elastic_cli.qad.options import EvalOptions
from elastic_cli.quantize.calib_data import pack_windows
from elastic_cli.qad.train import run_qad
from elastic_cli.quantize.calib_data import load_texts, load_tokenizer, tokenize
from elastic_cli.quantize.pipeline import QuantizeOptions
from tests.test_qad import dequantized_copy, load_child, qad_options, slice_all
from tests.test_qad import parent, single_torch_thread  # noqa: F401, F811  (fixtures, requested by name)

BUDGETS = ["large", "medium", "small"]
ROWS = ["bf16", "fp8_ptq", "nvfp4_ptq", "nvfp4_qad"]
EVAL_SEQ_LEN = 32
EVAL_WINDOWS = 5
EVAL_BATCH = 2
PERPLEXITY_TOLERANCE = 1e-6  # relative
# Quantization options shared by the QAD run and the PTQ runs it is compared with.
QUANTIZE_ARGS = ["--recipe", "all-linears", "--calib-samples", "2", "--calib-seq-len", "16"]
CLI_TIMEOUT_S = 300


def elastic(*args: object) -> subprocess.CompletedProcess:
    """Run ``python -m elastic_cli`` offline with one torch thread (two threads crawl on a busy 2-core machine)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ELASTIC_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "elastic_cli", *map(str, args)], capture_output=True, text=True, env=env,
        timeout=CLI_TIMEOUT_S,
    )


def write_heldout(path: Path) -> Path:
    """Write documents the parent's tokenizer was not trained on (it saw the first 200) as JSONL."""
    documents = load_texts(None)[-40:]
    path.write_text("".join(json.dumps({"text": document}) + "\n" for document in documents))
    return path


def qad_command(parent: Path, output: Path, *extra: object) -> list[object]:
    return [
        "quantize", parent, "--format", "nvfp4", *QUANTIZE_ARGS, "--qad", "--qad-steps", "3", "--qad-seq-len", "16",
        "--qad-batch-size", "2", "--qad-lr", "1e-3", "--qad-device", "cpu",
        "--qad-checkpoint-dir", output.with_name(output.name + ".ckpt"), "--output", output, *extra,
    ]


@pytest.fixture(scope="module")
def qad_run(parent, tmp_path_factory) -> tuple[dict, Path, Path]:
    """Run the QAD command with an evaluation once; return its JSON report, its output and the held-out file."""
    work = tmp_path_factory.mktemp("qad-eval")
    heldout = write_heldout(work / "heldout.jsonl")
    completed = elastic(*qad_command(
        parent, work / "out", "--eval-data", heldout, "--eval-seq-len", EVAL_SEQ_LEN,
        "--eval-windows", EVAL_WINDOWS, "--eval-batch-size", EVAL_BATCH, "--json",
    ))
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout), work / "out", heldout


def heldout_windows(parent: Path, heldout: Path) -> torch.Tensor:
    """The evaluation windows, cut by the calibration tokenizer's packing."""
    tokenizer = load_tokenizer(parent)
    return tokenize(load_texts(heldout, tokenizer), tokenizer, EVAL_WINDOWS, EVAL_SEQ_LEN)


def child_perplexity(folder: Path, windows: torch.Tensor) -> float:
    """Perplexity of a sliced child loaded by transformers: float32 token NLLs, float64 sums."""
    model = load_child(folder)
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for chunk in windows.split(EVAL_BATCH):
            logits = model(chunk, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="none"
            )
            total += nll.double().sum()
    return math.exp(float(total) / (windows.shape[0] * (windows.shape[1] - 1)))


def sliced_perplexities(quantized: Path, windows: torch.Tensor, work: Path, dequantize: bool) -> dict[str, float]:
    children = work / f"{quantized.name}-children"
    slice_all(quantized, children)
    result = {}
    for budget in BUDGETS:
        folder = children / budget
        if dequantize:
            folder = dequantized_copy(folder, work / f"{quantized.name}-{budget}-float32")
        result[budget] = child_perplexity(folder, windows)
    return result


def assert_row(report: dict, row: str, expected: dict[str, float]) -> None:
    for budget in BUDGETS:
        actual = report["perplexity"][row][budget]
        assert actual == pytest.approx(expected[budget], rel=PERPLEXITY_TOLERANCE), f"{row} at budget {budget}"


# The report --------------------------------------------------------------------------------


def test_report_has_every_row_and_budget(qad_run):
    report = qad_run[0]["qad"]["evaluation"]

    assert report["rows"] == ROWS
    assert report["budgets"] == BUDGETS
    assert report["windows"] == EVAL_WINDOWS
    assert report["seq_len"] == EVAL_SEQ_LEN
    assert report["predicted_tokens"] == EVAL_WINDOWS * (EVAL_SEQ_LEN - 1)
    assert report["data"]["name"] == "heldout.jsonl"
    assert report["dtype"] == "float32"
    for row in ROWS:
        assert sorted(report["perplexity"][row]) == sorted(BUDGETS), f"{row} lacks a budget"
        for budget in BUDGETS:
            perplexity = report["perplexity"][row][budget]
            assert math.isfinite(perplexity), f"{row} at {budget}: {perplexity}"
            assert perplexity > 1, f"{row} at {budget}: {perplexity}"
            assert perplexity == pytest.approx(math.exp(report["mean_nll"][row][budget]), rel=1e-12)
    assert report["perplexity"]["nvfp4_qad"] != report["perplexity"]["nvfp4_ptq"], "QAD changed nothing"


def test_qad_row_equals_sliced_export(qad_run, tmp_path):
    document, output, heldout = qad_run
    windows = heldout_windows(output, heldout)

    expected = sliced_perplexities(output, windows, tmp_path, dequantize=True)

    assert_row(document["qad"]["evaluation"], "nvfp4_qad", expected)


def test_bf16_row_equals_sliced_children(qad_run, parent, tmp_path):
    document, _, heldout = qad_run
    windows = heldout_windows(parent, heldout)

    expected = sliced_perplexities(parent, windows, tmp_path, dequantize=False)

    assert_row(document["qad"]["evaluation"], "bf16", expected)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_ptq_rows_equal_quantize_outputs(qad_run, parent, tmp_path, fmt):
    document, _, heldout = qad_run
    completed = elastic("quantize", parent, "--format", fmt, *QUANTIZE_ARGS, "--output", tmp_path / fmt, "-q")
    assert completed.returncode == 0, completed.stderr
    windows = heldout_windows(parent, heldout)

    expected = sliced_perplexities(tmp_path / fmt, windows, tmp_path, dequantize=True)

    assert_row(document["qad"]["evaluation"], f"{fmt}_ptq", expected)


def test_human_output_renders_table(qad_run):
    from elastic_cli.cli.quantize_cmd import _render_qad

    qad = qad_run[0]["qad"]
    console = Console(file=io.StringIO(), width=200)
    _render_qad(console, qad)
    text = console.file.getvalue()

    assert "held-out perplexity on heldout.jsonl: 5 windows of 32 tokens, float32 forward" in text
    for label, row in [("BF16", "bf16"), ("FP8 PTQ", "fp8_ptq"), ("NVFP4 PTQ", "nvfp4_ptq"), ("NVFP4 QAD", "nvfp4_qad")]:
        line = next((line for line in text.splitlines() if f" {label} " in line), None)
        assert line is not None, f"no {label} row in:\n{text}"
        assert f"{qad['evaluation']['perplexity'][row]['small']:.2f}" in line, f"{label} lacks its figure"

    console = Console(file=io.StringIO(), width=200)
    _render_qad(console, {**qad, "evaluation": None})
    assert "held-out perplexity: not evaluated (pass --eval-data FILE)" in console.file.getvalue()


# Without an evaluation -----------------------------------------------------------------------


def test_without_eval_data_report_is_null(parent, tmp_path):
    completed = elastic(*qad_command(parent, tmp_path / "out", "--qad-steps", "1", "--json"))

    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["qad"]["evaluation"] is None
    assert "held-out perplexity" not in completed.stderr


def test_stopped_run_evaluates_at_the_end(parent, tmp_path):
    evaluation = EvalOptions(write_heldout(tmp_path / "heldout.jsonl"), seq_len=EVAL_SEQ_LEN, max_windows=2)
    options = QuantizeOptions(format="nvfp4", recipe="all-linears", calib_samples=2, calib_seq_len=16)
    qad = qad_options(tmp_path, "stop", steps=2, batch_size=2, stop_at_step=1)

    stopped = run_qad(str(parent), options, tmp_path / "out", qad, evaluation=evaluation)
    resumed = run_qad(str(parent), options, tmp_path / "out",
                      dataclasses.replace(qad, stop_at_step=None, resume=True), evaluation=evaluation)

    assert stopped.evaluation is None
    assert resumed.evaluation is not None
    assert list(resumed.evaluation.rows) == ROWS


# Bad evaluation data -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "evaluation data .*missing.txt not found"),
        ("folder", "evaluation data .* is a folder"),
        ("empty", "evaluation data .* contains no text"),
        ("invalid-jsonl", "evaluation data .* line 1 is not valid JSON"),
        ("too-short", "evaluation data .* has \\d+ tokens, fewer than one window of 4096"),
    ],
)
def test_bad_eval_data_fails_before_training(parent, tmp_path, invoke_cli, case, message):
    paths = {"missing": tmp_path / "missing.txt", "folder": tmp_path, "empty": tmp_path / "empty.txt",
             "invalid-jsonl": tmp_path / "bad.jsonl", "too-short": tmp_path / "short.txt"}
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "short.txt").write_text("A few words of held-out text.\n")
    output = tmp_path / "out"

    result = invoke_cli(*qad_command(parent, output, "--eval-data", paths[case], "--eval-seq-len", "4096"))

    assert result.exit_code == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert re.search(message, errors[0]), errors[0]
    assert "--eval-data" in result.stderr, "the hint does not name the option"
    assert "tokenized" not in result.stderr, "the training text was tokenized before the evaluation data was checked"
    assert "calibrating" not in result.stderr, "calibration started before the evaluation data was checked"
    assert not output.with_name("out.ckpt").exists(), "training started"
    assert not output.exists()


def test_eval_data_needs_qad(parent, tmp_path, invoke_cli):
    heldout = write_heldout(tmp_path / "heldout.jsonl")

    result = invoke_cli("quantize", parent, "--format", "nvfp4", "--eval-data", heldout, "--output", tmp_path / "out")

    assert result.exit_code == 2
    assert "--eval-data is only valid with --qad" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("option", "value"), [("--eval-seq-len", "64"), ("--eval-windows", "3"), ("--eval-batch-size", "2")])
def test_eval_option_needs_eval_data(parent, tmp_path, invoke_cli, option, value):
    result = invoke_cli("quantize", parent, "--format", "nvfp4", "--qad", option, value, "--output", tmp_path / "out")

    assert result.exit_code == 2
    assert f"{option} is only valid with --eval-data" in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_eval_data_rejected_in_dry_run(parent, tmp_path, invoke_cli):
    missing = tmp_path / "missing.jsonl"

    result = invoke_cli("quantize", parent, "--format", "nvfp4", "--qad", "--eval-data", missing, "--dry-run")

    assert result.exit_code == 2
    assert f"evaluation data {missing} not found" in result.stderr


def test_eval_options_rejected():
    from elastic_cli.qad.options import check_eval_options

    with pytest.raises(UsageError, match="--eval-windows is 0"):
        check_eval_options(EvalOptions(Path("x"), max_windows=0))
    with pytest.raises(UsageError, match="--eval-seq-len is 1"):
        check_eval_options(EvalOptions(Path("x"), seq_len=1))


# Packing -------------------------------------------------------------------------------------


def test_pack_windows_matches_calibration_packing(parent):
    tokenizer = load_tokenizer(parent)
    texts = load_texts(None)[-30:]

    windows, _ = pack_windows(texts, tokenizer, 6, 24)

    assert torch.equal(windows, tokenize(texts, tokenizer, 6, 24))
    capped, _ = pack_windows(texts, tokenizer, 2, 24)
    assert torch.equal(capped, windows[:2])
    empty, tokens = pack_windows(texts[:1], tokenizer, 2, 100_000)
    assert empty.shape == (0, 100_000)
    assert tokens > 0
