"""Same inputs and options give byte-identical artifacts, and the JSON documents keep their keys.

`elastic slice --budget all` and `elastic quantize --format nvfp4` (with real calibration on 2
samples x 32 tokens) run through the command line in subprocesses against a small elastic
checkpoint with a tokenizer. Every variant is compared, by the sha256 of every file, with a base
run (one intra-op thread, output in ``base/out-base``):

- ``repeat``: the same command again, with the output under another path and folder name;
- ``threads``: ``OMP_NUM_THREADS=2``, which torch reads at start-up as its intra-op thread count;
- ``reversed``: a parent whose files were copied in reverse name order (the shards last to
  first) into another folder, with new modification times;
- ``recreated``: the parent written again from the same seed, tokenizer first and shards last,
  with modification times set decades apart.

The input copies keep the folder name ``parent``, because artifacts record the parent's name
(never its path) as provenance. Quantization with given scales (no calibration) is also checked
in-process at one and two threads.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from elastic_cli.arch.nemotron_h import parse_config
from elastic_cli.checkpoint.manifest import MANIFEST_FILE
from elastic_cli.elastic.source import open_source
from elastic_cli.quantize import export
from elastic_cli.quantize.calib_data import load_texts
from elastic_cli.quantize.pipeline import QuantizeOptions, QuantizerState, plan_for, quantize_checkpoint
from elastic_cli.synthetic import importance_budgets, tiny_config, write_checkpoint
from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "examples"))
from example_tokenizer import train_tokenizer  # noqa: E402

BUDGETS = ["full", "small"]
SEED = 13
CALIBRATION = ["--calib-samples", "2", "--calib-seq-len", "32"]
VARIANTS = ["repeat", "threads", "reversed", "recreated"]
ISO_TIMESTAMP = re.compile(rb"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")

# Keys docs/cli.md lists as stable. A nested set names the keys of an object; a list of one set
# names the keys of every element of a list. New keys may be added, so these are minimums.
INSPECT_KEYS: dict[str, Any] = {
    "elastic_version": None,
    "checkpoint": {"name", "revision", "shards", "tensors", "bytes", "dtypes", "quantization"},
    "architecture": {
        "config_dialect",
        "layers",
        "pattern",
        "layer_counts",
        "hidden_size",
        "vocab_size",
        "mamba",
        "attention",
        "ffn",
        "moe",
        "tie_word_embeddings",
    },
    "budgets_from": None,
    "budgets": [{"name", "target_params", "partial", "params", "active_params", "layers", "hidden_size", "bytes"}],
    "valid": None,
    "problems": None,
}
ARCHITECTURE_KEYS = {
    "layer_counts": {"mamba", "attention", "mlp", "moe"},
    "mamba": {"heads", "head_dim", "groups", "state"},
    "attention": {"heads", "kv_heads", "head_dim"},
    "moe": {"experts", "top_k", "expert_ffn", "shared_expert_ffn", "n_group"},
}
SLICE_KEYS = {"source", "revision", "dry_run", "budgets"}
SLICE_BUDGET_KEYS = {"budget", "path", "params", "active_params", "bytes", "written"}
QUANTIZE_KEYS = {"source", "written", "plan", "predicted_bytes"}
QUANTIZE_WRITTEN_KEYS = {"path", "bytes", "files", "calibration", "unreached_experts"}
PLAN_KEYS = {"format", "recipe", "quant_algo", "kv_cache_quant_algo", "counts"}
MANIFEST_KEYS = {"manifest_version", "tool", "kind", "parent", "budget", "format", "options", "files"}
# docs/cli.md has no section for verify yet, so these are the keys that VerifyReport.to_json returns.
VERIFY_KEYS = {"folder", "kind", "budget", "format", "parent", "ok", "checks", "problems"}


# ---------------------------------------------------------------------------------------------
# Inputs


def build_parent(folder: Path, tokenizer_first: bool = False) -> Path:
    """Write the elastic test parent (two budgets, three shards, a tokenizer) into a new ``folder``."""
    folder.mkdir(parents=True)
    config = tiny_config("MEM*E")
    budgets = importance_budgets(parse_config(config), list(zip(BUDGETS, (1.0, 0.5), strict=True)), seed=SEED, block=16)
    texts = load_texts(None)[:200]
    if tokenizer_first:
        train_tokenizer(texts, config["vocab_size"], folder)
    write_checkpoint(
        folder,
        config,
        seed=SEED,
        budgets=budgets,
        max_shard_bytes=700_000,
        sidecars={"generation_config.json": '{"eos_token_id": 2}\n'},
    )
    if not tokenizer_first:
        train_tokenizer(texts, config["vocab_size"], folder)
    return folder


@pytest.fixture(scope="module")
def parents(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Return the base parent and its two rewritten copies, keyed by variant."""
    root = tmp_path_factory.mktemp("determinism-inputs")
    base = build_parent(root / "base" / "parent")

    reversed_copy = root / "reversed" / "parent"
    reversed_copy.mkdir(parents=True)
    for index, path in enumerate(sorted(base.iterdir(), key=lambda p: p.name, reverse=True)):
        shutil.copyfile(path, reversed_copy / path.name)
        os.utime(reversed_copy / path.name, (1_600_000_000 + index, 1_600_000_000 + index))

    recreated = build_parent(root / "recreated" / "parent", tokenizer_first=True)
    for index, path in enumerate(sorted(recreated.iterdir())):
        stamp = 946_684_800 + index * 400_000_000  # from 2000-01-01 on, about 12.7 years apart
        os.utime(path, (stamp, stamp))

    assert shards(base) == shards(reversed_copy) == shards(recreated), "the rewritten parents hold other bytes"
    assert len([name for name in shards(base) if name.endswith(".safetensors")]) == 3
    return {"base": base, "repeat": base, "threads": base, "reversed": reversed_copy, "recreated": recreated}


def shards(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------
# Runs


def run_elastic(*args: object, threads: int, cwd: Path, home: Path) -> dict[str, Any]:
    """Run ``python -m elastic_cli ... --json`` with ``threads`` intra-op threads and return its JSON document."""
    env = {key: value for key, value in os.environ.items() if key not in ("ELASTIC_DEBUG", "MKL_NUM_THREADS")}
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
    )
    completed = subprocess.run(
        [sys.executable, "-m", "elastic_cli", "-q", *map(str, args), "--json"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, f"elastic {' '.join(map(str, args))} failed:\n{completed.stderr[-3000:]}"
    return json.loads(completed.stdout)


class Runs:
    """Artifacts of one command per variant, produced on first use and kept for the module."""

    def __init__(self, root: Path, parents: dict[str, Path], command: Callable[[Path, Path], list[object]]) -> None:
        self.root = root
        self.parents = parents
        self.command = command
        self.outputs: dict[str, Path] = {}
        self.documents: dict[str, dict[str, Any]] = {}

    def output(self, variant: str) -> Path:
        if variant not in self.outputs:
            folder = self.root / variant
            folder.mkdir()
            # The repeat writes deeper, under another folder name. The others use the base's layout.
            output = folder / "elsewhere" / "renamed-out" if variant == "repeat" else folder / "out-base"
            threads = 2 if variant == "threads" else 1
            args = self.command(self.parents[variant], output)
            self.documents[variant] = run_elastic(*args, threads=threads, cwd=folder, home=folder / "hf-home")
            self.outputs[variant] = output
        return self.outputs[variant]


@pytest.fixture(scope="module")
def slice_runs(tmp_path_factory: pytest.TempPathFactory, parents: dict[str, Path]) -> Runs:
    root = tmp_path_factory.mktemp("slice-runs")
    return Runs(root, parents, lambda parent, output: ["slice", parent, "--budget", "all", "--output", output])


@pytest.fixture(scope="module")
def quantize_runs(tmp_path_factory: pytest.TempPathFactory, parents: dict[str, Path]) -> Runs:
    root = tmp_path_factory.mktemp("quantize-runs")
    return Runs(
        root,
        parents,
        lambda parent, output: ["quantize", parent, "--format", "nvfp4", *CALIBRATION, "--output", output],
    )


def digests(output: Path) -> dict[str, str]:
    """Return the sha256 of every file under ``output``, keyed by its path relative to ``output``."""
    files = sorted(path for path in output.rglob("*") if path.is_file())
    assert files, f"{output} holds no files"
    return {path.relative_to(output).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def assert_same_bytes(expected: dict[str, str], actual: dict[str, str], variant: str) -> None:
    assert sorted(actual) == sorted(expected), f"{variant}: other file names than the base run"
    differing = sorted(name for name in expected if expected[name] != actual[name])
    assert differing == [], f"{variant}: these files differ from the base run: {differing}"


# ---------------------------------------------------------------------------------------------
# Byte-identical artifacts


def test_thread_setting_reaches_torch(tmp_path):
    """OMP_NUM_THREADS sets torch's intra-op thread count, which the threads variants rely on."""
    for threads in (1, 2):
        completed = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert completed.stdout.strip() == str(threads), f"OMP_NUM_THREADS={threads} gave {completed.stdout!r}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_slice_all_byte_identical(slice_runs, variant):
    base = digests(slice_runs.output("base"))
    assert sorted({name.split("/")[0] for name in base}) == BUDGETS

    assert_same_bytes(base, digests(slice_runs.output(variant)), variant)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_quantize_byte_identical(quantize_runs, variant):
    base = digests(quantize_runs.output("base"))
    assert "model.safetensors" in base

    assert_same_bytes(base, digests(quantize_runs.output(variant)), variant)


def given_state(source, options: QuantizeOptions) -> QuantizerState:
    """Return activation amax values per quantized module, as calibration would store them."""
    plan = plan_for(source, options)
    state = QuantizerState(calibration={"samples": 0, "tokens": 0, "budgets": []})
    for index, decision in enumerate(plan.decisions):
        if decision.format:
            state.modules[decision.module] = export.ModuleScales(decision.format, 0.0, 1.0 + index / 3)
    return state


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_quantize_given_scales_thread_independent(parents, tmp_path, fmt):
    """With the scales given, quantization and export give the same bytes at one and two threads."""
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            options = QuantizeOptions(format=fmt, recipe="all-linears", kv_cache="fp8")
            source = open_source(str(parents["base"]), require_budgets=False)
            try:
                state = given_state(source, options)
                for module in state.modules:
                    if module.endswith("k_proj"):
                        state.kv_amax[module.rsplit(".", 1)[0]] = (2.5, 3.5)
                output = tmp_path / f"threads-{count}" / "out"
                quantize_checkpoint(source, options, output, state=state)
            finally:
                source.close()
            outputs.append(digests(output))
    finally:
        torch.set_num_threads(threads)

    assert_same_bytes(outputs[0], outputs[1], f"{fmt} with given scales at 2 threads")


# ---------------------------------------------------------------------------------------------
# No paths and no timestamps in artifacts


def today_patterns() -> list[bytes]:
    """Return today's date (local and UTC) in the usual timestamp spellings."""
    days = {datetime.date.today(), datetime.datetime.now(datetime.timezone.utc).date()}
    formats = ("%Y-%m-%d", "%Y%m%d", "%Y/%m/%d", "%d/%m/%Y", "%m/%d/%Y", "%d.%m.%Y", "%b %d %Y", "%d %b %Y")
    return sorted({day.strftime(fmt).encode() for day in days for fmt in formats})


@pytest.mark.parametrize("command", ["slice", "quantize"])
def test_artifacts_hold_no_path_or_timestamp(slice_runs, quantize_runs, parents, command):
    runs = slice_runs if command == "slice" else quantize_runs
    output = runs.output("repeat")
    forbidden = {
        str(output).encode(): "the output path",
        str(output.resolve()).encode(): "the resolved output path",
        output.name.encode(): "the output folder name",
        str(parents["base"]).encode(): "the input path",
        str(parents["base"].resolve()).encode(): "the resolved input path",
        str(Path.home()).encode() + b"/": "the home folder",
    }
    forbidden.update({pattern: "today's date" for pattern in today_patterns()})

    files = sorted(path for path in output.rglob("*") if path.is_file())
    assert len(files) >= 7
    for path in files:
        data = path.read_bytes()
        for needle, description in forbidden.items():
            assert needle not in data, f"{path.relative_to(output)} contains {description} ({needle.decode()})"
        if not path.name.endswith(".safetensors"):
            stamp = ISO_TIMESTAMP.search(data)
            assert stamp is None, f"{path.relative_to(output)} contains the timestamp {stamp.group().decode()}"


# ---------------------------------------------------------------------------------------------
# JSON documents keep their documented keys


def assert_keys(document: dict[str, Any], expected: set[str], where: str) -> None:
    missing = sorted(expected - set(document))
    assert missing == [], f"{where} lacks the documented keys {missing}"


def assert_one_sorted_document(stdout: str, where: str) -> dict[str, Any]:
    """Parse stdout as one JSON document printed with sorted keys and a final newline."""
    document = json.loads(stdout)
    assert stdout == json.dumps(document, indent=2, sort_keys=True) + "\n", f"{where} is not one sorted JSON document"
    return document


def test_inspect_json_keys(parents, invoke_cli):
    result = invoke_cli("inspect", parents["base"], "--json")
    assert result.exit_code == 0, result.stderr
    document = assert_one_sorted_document(result.stdout, "inspect --json")

    assert_keys(document, set(INSPECT_KEYS), "inspect --json")
    for key, keys in INSPECT_KEYS.items():
        if isinstance(keys, set):
            assert_keys(document[key], keys, f"inspect --json {key}")
        elif isinstance(keys, list):
            assert [budget["name"] for budget in document[key]] == BUDGETS
            for entry in document[key]:
                assert_keys(entry, keys[0], f"inspect --json {key}[{entry['name']}]")
                assert_keys(entry["bytes"], {"bf16", "fp8", "nvfp4"}, f"inspect --json budget {entry['name']} bytes")
    for key, keys in ARCHITECTURE_KEYS.items():
        assert_keys(document["architecture"][key], keys, f"inspect --json architecture.{key}")
    assert document["valid"] is True
    assert document["problems"] == []


def test_slice_json_keys(parents, slice_runs, invoke_cli, tmp_path):
    result = invoke_cli(
        "slice", parents["base"], "--budget", "all", "--output", tmp_path / "plan", "--dry-run", "--json"
    )
    assert result.exit_code == 0, result.stderr
    planned = assert_one_sorted_document(result.stdout, "slice --dry-run --json")
    slice_runs.output("base")
    written = slice_runs.documents["base"]

    for document, extra, mode in ((planned, "tensors", "dry run"), (written, "files", "write")):
        assert_keys(document, SLICE_KEYS, f"slice --json ({mode})")
        assert [entry["budget"] for entry in document["budgets"]] == BUDGETS
        for entry in document["budgets"]:
            assert_keys(entry, SLICE_BUDGET_KEYS | {extra}, f"slice --json ({mode}) budget {entry['budget']}")
    assert planned["dry_run"] is True
    assert written["dry_run"] is False
    for entry in written["budgets"]:
        folder = slice_runs.output("base") / entry["budget"]
        assert sorted(entry["files"]) == sorted(path.name for path in folder.iterdir())


def test_quantize_json_keys(parents, quantize_runs, invoke_cli):
    result = invoke_cli("quantize", parents["base"], "--format", "nvfp4", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    planned = assert_one_sorted_document(result.stdout, "quantize --dry-run --json")
    quantize_runs.output("base")
    written = quantize_runs.documents["base"]

    for document, mode in ((planned, "dry run"), (written, "write")):
        assert_keys(document, QUANTIZE_KEYS, f"quantize --json ({mode})")
        assert_keys(document["plan"], PLAN_KEYS, f"quantize --json ({mode}) plan")
        assert set(document["predicted_bytes"]) == {"parent", *BUDGETS}
        for kind, formats in document["plan"]["counts"].items():
            for fmt, entry in formats.items():
                assert_keys(entry, {"modules", "params"}, f"quantize --json plan.counts.{kind}.{fmt}")
    assert planned["written"] is False
    assert written["written"] is True
    assert_keys(written, QUANTIZE_WRITTEN_KEYS, "quantize --json (write)")
    assert_keys(written["calibration"], {"samples", "tokens", "budgets"}, "quantize --json calibration")
    assert written["calibration"]["samples"] == 2
    assert written["calibration"]["tokens"] == 64


@pytest.mark.parametrize("command", ["slice", "quantize"])
def test_verify_json_and_manifest_keys(slice_runs, quantize_runs, invoke_cli, command):
    folder = slice_runs.output("base") / "small" if command == "slice" else quantize_runs.output("base")
    result = invoke_cli("verify", folder, "--json")
    assert result.exit_code == 0, result.stderr
    document = assert_one_sorted_document(result.stdout, "verify --json")

    assert_keys(document, VERIFY_KEYS, "verify --json")
    for check in document["checks"]:
        assert_keys(check, {"name", "passed", "detail"}, f"verify --json check {check.get('name')}")
    assert document["ok"] is True
    assert document["kind"] == command

    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert_keys(manifest, MANIFEST_KEYS, MANIFEST_FILE)
    assert manifest["tool"]["name"] == "elastic"
    assert set(manifest["parent"]) == {"name", "revision"}
    assert manifest["parent"] == {"name": "parent", "revision": None}
    for name, entry in manifest["files"].items():
        assert set(entry) == {"sha256", "size"}, f"{MANIFEST_FILE} entry {name} has keys {sorted(entry)}"
