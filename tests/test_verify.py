"""`elastic verify`: fresh artifacts verify clean, and each kind of damage is caught and named.

A tiny elastic parent is sliced to one budget and quantized to NVFP4 (with given scales, no
calibration) once per module. Each damage test works on a fresh copy of one artifact. Most
tests call the library; exit codes and the stdout/stderr split are checked through the real
command line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from elastic_cli.arch.nemotron_h import parse_config
from elastic_cli.checkpoint.manifest import MANIFEST_FILE, file_digest
from elastic_cli.checkpoint.safetensors_io import read_header
from elastic_cli.elastic.slicer import plan_budgets, slice_checkpoint
from elastic_cli.elastic.source import open_source
from elastic_cli.errors import UsageError
from elastic_cli.quantize import export
from elastic_cli.quantize.pipeline import QuantizeOptions, quantize_checkpoint
from elastic_cli.synthetic import importance_budgets, tiny_config, write_checkpoint
from elastic_cli.verify import CHECK_NAMES, verify_artifact
from tests.test_quantize_export import given_state

INDEX = "model.safetensors.index.json"
SIDECARS = {"generation_config.json": '{"eos_token_id": 2}\n', "tokenizer_config.json": '{"eos_token": "</s>"}\n'}
REPORT_KEYS = {"folder", "kind", "budget", "format", "parent", "ok", "checks", "problems"}
# A module the default NVFP4 recipe quantizes (layer 1 is MoE in "MEM*EMEM*E").
NVFP4_MODULE = "backbone.layers.1.mixer.experts.0.up_proj"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """Build the parent, its 'small' slice (three shards) and its NVFP4 quantization."""
    root = tmp_path_factory.mktemp("verify")
    parent = root / "parent"
    parent.mkdir()
    config = tiny_config("MEM*EMEM*E")
    budgets = importance_budgets(parse_config(config), [("full", 1.0), ("small", 0.5)], seed=5, block=16)
    write_checkpoint(parent, config, seed=5, budgets=budgets, max_shard_bytes=700_000, sidecars=SIDECARS)

    source = open_source(str(parent))
    try:
        slice_checkpoint(source, plan_budgets(source, ["small"]), root / "small", nested=False, max_shard_bytes=250_000)
    finally:
        source.close()

    options = QuantizeOptions(format="nvfp4", kv_cache="fp8", max_shard_bytes=600_000)
    source = open_source(str(parent), require_budgets=False)
    try:
        quantize_checkpoint(source, options, root / "nvfp4", state=given_state(source, options))
    finally:
        source.close()
    return {"parent": parent, "slice": root / "small", "quantize": root / "nvfp4"}


def damageable(artifacts: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    """Return a fresh copy of one artifact, free to damage."""
    return Path(shutil.copytree(artifacts[kind], tmp_path / kind))


def refresh_manifest(folder: Path, *names: str) -> None:
    """Record the current sha256 and size of ``names``, so that only other checks see a change."""
    path = folder / MANIFEST_FILE
    document = json.loads(path.read_text())
    for name in names:
        sha256, size = file_digest(folder / name)
        document["files"][name] = {"sha256": sha256, "size": size}
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def shard_of(folder: Path, tensor: str) -> str:
    return json.loads((folder / INDEX).read_text())["weight_map"][tensor]


def first_bf16_tensor(folder: Path, shard: str) -> str:
    header = read_header(folder / shard)
    return next(name for name, info in sorted(header.tensors.items()) if info.dtype == "BF16" and info.numel > 1)


def failed_checks(report) -> set[str]:
    return {check.name for check in report.checks if check.passed is False}


def problems_of(report, check: str) -> list[str]:
    return [problem for problem in report.problems if problem.startswith(f"{check}: ")]


@pytest.mark.parametrize("kind", ["slice", "quantize"])
def test_verify_fresh_artifact_clean(artifacts, kind):
    report = verify_artifact(artifacts[kind])

    assert report.ok, f"a fresh {kind} artifact has problems: {report.problems}"
    assert report.kind == kind
    assert [check.name for check in report.checks] == list(CHECK_NAMES)
    passed = {check.name: check.passed for check in report.checks}
    assert passed == {**{name: True for name in CHECK_NAMES}, "sidecars": None, "parent": None}


@pytest.mark.parametrize("kind", ["slice", "quantize"])
def test_verify_fresh_artifact_matches_parent(artifacts, kind):
    report = verify_artifact(artifacts[kind], parent=str(artifacts["parent"]))

    assert report.ok, f"a fresh {kind} artifact differs from its parent: {report.problems}"
    assert all(check.passed for check in report.checks), report.checks
    parent_check = next(check for check in report.checks if check.name == "parent")
    assert "tensor(s) and config.json equal the parent's" in parent_check.detail


def test_verify_flipped_byte_in_shard(artifacts, tmp_path):
    folder = damageable(artifacts, "slice", tmp_path)
    shard = "model-00002-of-00003.safetensors"
    tensor = first_bf16_tensor(folder, shard)
    begin = read_header(folder / shard).tensors[tensor].begin
    data = bytearray((folder / shard).read_bytes())
    data[begin] ^= 0x01  # lowest mantissa bit of the first BF16 value, so the value stays finite
    (folder / shard).write_bytes(bytes(data))

    report = verify_artifact(folder)
    assert failed_checks(report) == {"manifest"}
    assert len(problems_of(report, "manifest")) == 1
    assert f"manifest: {shard} has sha256" in problems_of(report, "manifest")[0]

    report = verify_artifact(folder, parent=str(artifacts["parent"]))
    assert failed_checks(report) == {"manifest", "parent"}
    assert len(problems_of(report, "parent")) == 1
    assert f"tensor '{tensor}' differs from the parent's cut" in problems_of(report, "parent")[0]


def test_verify_missing_shard(artifacts, tmp_path):
    folder = damageable(artifacts, "slice", tmp_path)
    shard = "model-00003-of-00003.safetensors"
    (folder / shard).unlink()

    report = verify_artifact(folder)

    assert not report.ok
    assert f"manifest: {shard} is listed in {MANIFEST_FILE} but missing" in report.problems
    assert f"index: shard {shard} named in {INDEX} is missing" in report.problems


def test_verify_truncated_shard(artifacts, tmp_path):
    folder = damageable(artifacts, "quantize", tmp_path)
    shard = "model-00001-of-00003.safetensors"
    size = (folder / shard).stat().st_size
    with (folder / shard).open("r+b") as handle:
        handle.truncate(size - 100)

    report = verify_artifact(folder)

    assert f"manifest: {shard} has {size - 100} bytes, but {MANIFEST_FILE} records {size}" in report.problems
    index_problems = problems_of(report, "index")
    assert len(index_problems) == 1, index_problems
    assert f"{shard} is truncated" in index_problems[0]


def test_verify_edited_config(artifacts, tmp_path):
    folder = damageable(artifacts, "slice", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] += 16
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    report = verify_artifact(folder, parent=str(artifacts["parent"]))

    assert failed_checks(report) == {"manifest", "tensors", "parent"}
    assert any(p.startswith("manifest: config.json has sha256") for p in report.problems), report.problems
    tensor_problems = problems_of(report, "tensors")
    assert len(tensor_problems) == 1, tensor_problems
    assert "but config.json implies" in tensor_problems[0]
    assert "parent: config.json differs from the planned config in hidden_size" in report.problems


def test_verify_nan_in_bf16_tensor(artifacts, tmp_path):
    folder = damageable(artifacts, "slice", tmp_path)
    shard = "model-00001-of-00003.safetensors"
    tensor = first_bf16_tensor(folder, shard)
    tensors = load_file(folder / shard)
    tensors[tensor].view(-1)[3] = float("nan")
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    refresh_manifest(folder, shard)

    report = verify_artifact(folder)

    assert report.problems == (f"finite: tensor '{tensor}' (BF16) contains 1 NaN and 0 Inf value(s)",)


def test_verify_missing_scale_tensor(artifacts, tmp_path):
    folder = damageable(artifacts, "quantize", tmp_path)
    scale = f"{NVFP4_MODULE}.weight_scale"
    shard = shard_of(folder, scale)
    tensors = load_file(folder / shard)
    removed = tensors.pop(scale)
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    index = json.loads((folder / INDEX).read_text())
    del index["weight_map"][scale]
    index["metadata"]["total_size"] -= removed.numel() * removed.element_size()
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    refresh_manifest(folder, shard, INDEX)

    report = verify_artifact(folder)

    assert report.problems == (f"quantization: {scale} is missing",)


def test_verify_unlisted_file(artifacts, tmp_path):
    folder = damageable(artifacts, "quantize", tmp_path)
    (folder / "notes.txt").write_text("added after the manifest\n")

    report = verify_artifact(folder)

    assert report.problems == (f"manifest: file notes.txt is not listed in {MANIFEST_FILE}",)


@pytest.mark.parametrize("kind", ["slice", "quantize"])
def test_verify_sidecar_differs_from_parent(artifacts, tmp_path, kind):
    folder = damageable(artifacts, kind, tmp_path)
    (folder / "generation_config.json").write_text('{"eos_token_id": 3}\n')
    refresh_manifest(folder, "generation_config.json")

    assert verify_artifact(folder).ok, "without a parent, a consistent sidecar is sound"
    report = verify_artifact(folder, parent=str(artifacts["parent"]))
    assert report.problems == ("sidecars: generation_config.json differs from the parent's",)


def test_verify_missing_sidecar(artifacts, tmp_path):
    folder = damageable(artifacts, "quantize", tmp_path)
    (folder / "elastic_config.json").unlink()
    document = json.loads((folder / MANIFEST_FILE).read_text())
    del document["files"]["elastic_config.json"]
    (folder / MANIFEST_FILE).write_text(json.dumps(document))

    report = verify_artifact(folder, parent=str(artifacts["parent"]))

    assert report.problems == ("sidecars: elastic_config.json of the parent is missing",)


def test_verify_requantization_mismatch(artifacts, tmp_path):
    folder = damageable(artifacts, "quantize", tmp_path)
    state = json.loads((folder / export.STATE_FILE).read_text())
    state["modules"][NVFP4_MODULE]["weight_amax"] *= 2
    (folder / export.STATE_FILE).write_text(json.dumps(state))
    refresh_manifest(folder, export.STATE_FILE)

    report = verify_artifact(folder, parent=str(artifacts["parent"]))

    problems = problems_of(report, "parent")
    assert problems, "scales that no longer match the stored tensors must be reported"
    assert all(NVFP4_MODULE in problem and "quantized with the stored scales" in problem for problem in problems)


def test_verify_rejects_non_artifact_folders(artifacts, tmp_path):
    with pytest.raises(UsageError, match="artifact folder not found"):
        verify_artifact(tmp_path / "missing")
    (tmp_path / "children").mkdir()
    shutil.copytree(artifacts["slice"], tmp_path / "children" / "small")
    with pytest.raises(UsageError, match="not an artifact folder") as caught:
        verify_artifact(tmp_path / "children")
    assert "small" in caught.value.hint
    with pytest.raises(UsageError, match="--revision"):
        verify_artifact(artifacts["slice"], revision="main")


def test_verify_json_output(artifacts, invoke_cli):
    result = invoke_cli("verify", artifacts["quantize"], "--parent", artifacts["parent"], "--json")

    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document) == REPORT_KEYS
    assert document["ok"] is True
    assert document["kind"] == "quantize"
    assert document["format"] == "NVFP4"
    assert document["problems"] == []
    assert [check["name"] for check in document["checks"]] == list(CHECK_NAMES)
    assert all(set(check) == {"name", "passed", "detail"} for check in document["checks"])


def test_verify_cli_exit_codes(artifacts, run_cli, tmp_path):
    clean = run_cli("verify", artifacts["slice"], "--parent", artifacts["parent"])
    assert clean.exit_code == 0, clean.stderr
    assert clean.stdout.rstrip().endswith("sound")
    assert "verified" in clean.stderr, "the closing log line goes to stderr"

    folder = damageable(artifacts, "slice", tmp_path)
    (folder / "notes.txt").write_text("stray\n")
    damaged = run_cli("verify", folder)
    assert damaged.exit_code == 1, damaged.stderr
    assert f"manifest: file notes.txt is not listed in {MANIFEST_FILE}" in damaged.stdout.splitlines()

    missing = run_cli("verify", tmp_path / "does-not-exist")
    assert missing.exit_code == 2
    assert "Error: artifact folder not found" in missing.stderr
    assert missing.stdout == ""


def test_verify_nan_byte_in_block_scale(artifacts, tmp_path):
    folder = damageable(artifacts, "quantize", tmp_path)
    scale = f"{NVFP4_MODULE}.weight_scale"
    shard = shard_of(folder, scale)
    begin = read_header(folder / shard).tensors[scale].begin
    data = bytearray((folder / shard).read_bytes())
    data[begin] = 0x7F  # E4M3 NaN
    (folder / shard).write_bytes(bytes(data))
    refresh_manifest(folder, shard)

    report = verify_artifact(folder)

    assert f"finite: tensor '{scale}' (F8_E4M3) contains 1 NaN byte(s)" in report.problems
    assert failed_checks(report) == {"finite", "quantization"}
