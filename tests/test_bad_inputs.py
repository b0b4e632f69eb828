"""Bad inputs to ``elastic slice`` and ``elastic inspect``: one clear error and no partial output.

Every case damages a fresh copy of the tiny elastic checkpoint or passes a bad option. The
command must exit with 1 (2 for usage errors) and print exactly one ``Error:`` line on stderr
naming the offending value, with no traceback and nothing on stdout. It must leave neither the
output folder nor a hidden ``.NAME.resume-*`` work folder behind.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import CliResult

INDEX = "model.safetensors.index.json"
MASKS = "elastic_config.json"
# Layer pattern of tiny_config(): "MEM*EMEM*E".
MAMBA_LAYER, MOE_LAYER, ATTENTION_LAYER = 0, 1, 3


# ---------------------------------------------------------------------------------------------
# Helpers


def error_lines(result: CliResult) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def assert_one_error(result: CliResult, *expected: str, exit_code: int = 1) -> str:
    """Check the exit code, one ``Error:`` line containing every ``expected`` text, no traceback."""
    assert result.exit_code == exit_code, (
        f"exit code {result.exit_code}, expected {exit_code}, stderr:\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr, f"traceback on stderr:\n{result.stderr}"
    lines = error_lines(result)
    assert len(lines) == 1, f"expected exactly one 'Error:' line on stderr, got {len(lines)}:\n{result.stderr}"
    for text in expected:
        assert text in lines[0], f"error line does not name {text!r}: {lines[0]}"
    assert result.stdout == "", f"an error printed to stdout: {result.stdout!r}"
    return lines[0]


def assert_no_output(output: Path) -> None:
    """Check that neither the output folder nor a temporary folder beside it exists."""
    assert not output.exists(), f"a failed run left {output} behind"
    leftovers = sorted(path.name for path in output.parent.glob(f".{output.name}.resume-*"))
    assert leftovers == [], f"a failed run left temporary folders {leftovers} beside {output}"


@pytest.fixture
def slice_fails(invoke_cli, tmp_path: Path) -> Callable[..., str]:
    """Return ``run(checkpoint, *expected, budget="small", extra=())`` for failing slices.

    It runs ``elastic slice CHECKPOINT --budget BUDGET --output tmp_path/out``, checks one error
    naming every ``expected`` text and no output left behind, and returns the error line.
    """

    def run(checkpoint: Path | str, *expected: str, budget: str = "small", extra: tuple = ()) -> str:
        output = tmp_path / "out"
        result = invoke_cli("slice", checkpoint, "--budget", budget, "--output", output, *extra)
        line = assert_one_error(result, *expected)
        assert_no_output(output)
        return line

    return run


def shard_files(checkpoint: Path) -> list[Path]:
    weight_map = json.loads((checkpoint / INDEX).read_text())["weight_map"]
    return [checkpoint / name for name in sorted(set(weight_map.values()))]


def header_length(shard: Path) -> int:
    with shard.open("rb") as handle:
        return struct.unpack("<Q", handle.read(8))[0]


def edit_json(path: Path, edit: Callable[[Any], None]) -> None:
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document, indent=1))


def set_json_value(path: Path, keys: tuple[str, ...], value: Any) -> None:
    """Set ``document[keys[0]]...[keys[-1]] = value`` in a JSON file.

    A key applied to a list selects the entry whose ``"name"`` is that key (a budget).
    """
    document = json.loads(path.read_text())
    target = document
    for key in keys[:-1]:
        if isinstance(target, list):
            target = next(entry for entry in target if entry["name"] == key)
        else:
            target = target[key]
    target[keys[-1]] = value
    path.write_text(json.dumps(document, indent=1))


def set_layer_mask(checkpoint: Path, budget: str, layer: int, axis: str, value: Any) -> None:
    set_json_value(checkpoint / MASKS, ("budgets", budget, "masks", "per_layer", str(layer), axis), value)


def budget_entry(document: dict[str, Any], name: str) -> dict[str, Any]:
    return next(entry for entry in document["budgets"] if entry["name"] == name)


def layer_masks(document: dict[str, Any], budget: str, layer: int) -> dict[str, str]:
    return budget_entry(document, budget)["masks"]["per_layer"][str(layer)]


def set_bit(mask: str, index: int, value: str) -> str:
    return mask[:index] + value + mask[index + 1 :]


# ---------------------------------------------------------------------------------------------
# The console entry in a subprocess: real exit codes and streams


def test_console_entry_checkpoint_error(run_cli, copy_checkpoint):
    shard = shard_files(copy_checkpoint)[1]
    shard.unlink()
    output = copy_checkpoint.parent / "out"

    result = run_cli("slice", copy_checkpoint, "--budget", "small", "--output", output)

    assert_one_error(result, shard.name)
    assert result.stderr.startswith("Error:"), f"stderr does not start with the error line:\n{result.stderr}"
    assert_no_output(output)


def test_console_entry_missing_budget(run_cli, elastic_checkpoint, tmp_path):
    output = tmp_path / "out"

    result = run_cli("slice", elastic_checkpoint, "--output", output)

    assert_one_error(result, "--budget", exit_code=2)
    assert_no_output(output)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("slice", "{ckpt}", "--budget", "small"), id="missing-output"),
        pytest.param(("slice", "{ckpt}", "--budget", "small", "--output", "out", "--bogus"), id="unknown-option"),
        pytest.param(("inspect",), id="missing-checkpoint"),
        pytest.param(("-q", "-v", "inspect", "{ckpt}"), id="quiet-and-verbose-global"),
        pytest.param(("slice", "{ckpt}", "--budget", "small", "--output", "out", "-q", "-v"), id="quiet-and-verbose"),
    ],
)
def test_usage_errors_exit_2(invoke_cli, elastic_checkpoint, args):
    result = invoke_cli(*(str(arg).replace("{ckpt}", str(elastic_checkpoint)) for arg in args))

    assert_one_error(result, exit_code=2)


def test_verbose_help_shows_a_flag(invoke_cli):
    """``-v`` is counted, not given a value, so its help line must not show ``<int>``."""
    result = invoke_cli("slice", "--help")

    verbose_lines = [line for line in result.stdout.splitlines() if "--verbose" in line]
    assert result.exit_code == 0
    assert len(verbose_lines) == 1
    assert "<int>" not in verbose_lines[0]


# ---------------------------------------------------------------------------------------------
# Damaged shards and index


def test_missing_shard(slice_fails, copy_checkpoint):
    shard = shard_files(copy_checkpoint)[1]
    shard.unlink()

    slice_fails(copy_checkpoint, shard.name, "missing")


def test_shard_truncated_in_data_area(slice_fails, copy_checkpoint):
    shard = shard_files(copy_checkpoint)[0]
    size = shard.stat().st_size
    assert size - 100 > 8 + header_length(shard), "the cut must fall in the data area"
    os.truncate(shard, size - 100)

    slice_fails(copy_checkpoint, shard.name, "truncated")


@pytest.mark.parametrize("where", ["length-prefix", "header-json"])
def test_shard_truncated_in_header(slice_fails, copy_checkpoint, where):
    shard = shard_files(copy_checkpoint)[0]
    cut = 5 if where == "length-prefix" else 8 + header_length(shard) // 2
    os.truncate(shard, cut)

    slice_fails(copy_checkpoint, shard.name, "bytes")


@pytest.mark.parametrize("length", ["file-size", "2**63"])
def test_header_length_past_end_of_file(slice_fails, copy_checkpoint, length):
    shard = shard_files(copy_checkpoint)[0]
    value = shard.stat().st_size if length == "file-size" else 2**63
    with shard.open("r+b") as handle:
        handle.write(struct.pack("<Q", value))

    slice_fails(copy_checkpoint, shard.name, "header length", str(value))


@pytest.mark.parametrize("damage", [b"!", b"\xff"], ids=["invalid-json", "invalid-utf8"])
def test_corrupted_header_json(slice_fails, copy_checkpoint, damage):
    shard = shard_files(copy_checkpoint)[0]
    with shard.open("r+b") as handle:
        handle.seek(8)  # the opening brace of the JSON header
        handle.write(damage)

    slice_fails(copy_checkpoint, shard.name, "corrupted header")


def test_index_names_tensor_absent_from_shard(slice_fails, copy_checkpoint):
    phantom = "backbone.layers.0.mixer.phantom.weight"
    shard = shard_files(copy_checkpoint)[0]
    set_json_value(copy_checkpoint / INDEX, ("weight_map", phantom), shard.name)

    slice_fails(copy_checkpoint, phantom, shard.name)


def test_shard_tensor_missing_from_index(slice_fails, copy_checkpoint):
    index = json.loads((copy_checkpoint / INDEX).read_text())
    shard = shard_files(copy_checkpoint)[-1]
    unlisted = next(name for name, file in index["weight_map"].items() if file == shard.name)
    del index["weight_map"][unlisted]
    (copy_checkpoint / INDEX).write_text(json.dumps(index))

    line = slice_fails(copy_checkpoint, unlisted, shard.name)

    assert "does not list" in line, f"message does not say the index lacks the tensor: {line}"


def test_duplicate_tensor_across_shards(slice_fails, copy_checkpoint):
    first = shard_files(copy_checkpoint)[0]
    with safe_open(first, framework="pt") as handle:
        name = next(iter(handle.keys()))
        tensor = handle.get_tensor(name)
    # Sorts before the first shard, and the index points at it, so it is read first.
    duplicate = copy_checkpoint / "model-00000-duplicate.safetensors"
    save_file({name: tensor}, duplicate, metadata={"format": "pt"})
    set_json_value(copy_checkpoint / INDEX, ("weight_map", name), duplicate.name)

    slice_fails(copy_checkpoint, name, duplicate.name, first.name)


def test_tensor_shape_contradicts_config(slice_fails, copy_checkpoint):
    name = "backbone.norm_f.weight"
    weight_map = json.loads((copy_checkpoint / INDEX).read_text())["weight_map"]
    shard = copy_checkpoint / weight_map[name]
    tensors = load_file(shard)
    tensors[name] = torch.ones(127, dtype=torch.bfloat16)
    save_file(tensors, shard, metadata={"format": "pt"})

    slice_fails(copy_checkpoint, name, "[127]", "[128]")


# ---------------------------------------------------------------------------------------------
# config.json


def test_config_missing(slice_fails, copy_checkpoint):
    (copy_checkpoint / "config.json").unlink()

    slice_fails(copy_checkpoint, "config.json", "not found")


def test_config_invalid_json(slice_fails, copy_checkpoint):
    (copy_checkpoint / "config.json").write_text('{"hidden_size": 128,\n')

    slice_fails(copy_checkpoint, "config.json", "not valid JSON")


def test_config_layer_count_contradicts_pattern(slice_fails, copy_checkpoint):
    set_json_value(copy_checkpoint / "config.json", ("num_hidden_layers",), 11)

    slice_fails(copy_checkpoint, "num_hidden_layers", "11", "10")


@pytest.mark.parametrize("marker", ["hf_quant_config.json", "quantization_config"])
def test_quantize_rejects_quantized_input(invoke_cli, copy_checkpoint, tmp_path, marker):
    if marker == "hf_quant_config.json":
        (copy_checkpoint / marker).write_text('{"quantization": {"quant_algo": "FP8"}}\n')
    else:
        set_json_value(copy_checkpoint / "config.json", (marker,), {"quant_method": "fp8"})
    output = tmp_path / "out"

    result = invoke_cli("quantize", copy_checkpoint, "--format", "fp8", "--output", output)

    assert_one_error(result, "already quantized", marker)
    assert_no_output(output)


def test_slice_rejects_malformed_quant_config(slice_fails, copy_checkpoint):
    (copy_checkpoint / "hf_quant_config.json").write_text('{"quantization": "FP8"}\n')

    slice_fails(copy_checkpoint, "hf_quant_config.json")


# ---------------------------------------------------------------------------------------------
# Budgets and masks


def test_unknown_budget_lists_available(invoke_cli, elastic_checkpoint, tmp_path):
    output = tmp_path / "out"

    result = invoke_cli("slice", elastic_checkpoint, "--budget", "huge", "--output", output)

    assert_one_error(result, "'huge'", "large, medium, small")
    assert_no_output(output)


@pytest.mark.parametrize("name", ["[bold]huge", "[/huge]"])
def test_error_keeps_brackets_in_budget(invoke_cli, elastic_checkpoint, tmp_path, name):
    result = invoke_cli("slice", elastic_checkpoint, "--budget", name, "--output", tmp_path / "out")

    assert_one_error(result, f"'{name}'")


def test_error_keeps_bracketed_folder_name(slice_fails, copy_checkpoint):
    folder = copy_checkpoint.rename(copy_checkpoint.parent / "parent[v2]")
    (folder / "config.json").unlink()

    slice_fails(folder, "parent[v2]")


def test_non_nested_masks(slice_fails, copy_checkpoint):
    def keep_what_medium_drops(document: dict[str, Any]) -> None:
        medium = layer_masks(document, "medium", MOE_LAYER)["expert_channels"]
        small = layer_masks(document, "small", MOE_LAYER)
        dropped = medium.index("0")
        small["expert_channels"] = set_bit(small["expert_channels"], dropped, "1")

    edit_json(copy_checkpoint / MASKS, keep_what_medium_drops)

    line = slice_fails(copy_checkpoint, "'small'", f"layer {MOE_LAYER}", "'expert_channels'")

    assert "nested" in line, f"message does not say the budgets must be nested: {line}"


def test_mask_wrong_length(slice_fails, copy_checkpoint):
    def shorten(document: dict[str, Any]) -> None:
        masks = layer_masks(document, "small", MAMBA_LAYER)
        masks["mamba_heads"] = masks["mamba_heads"][:-1]

    edit_json(copy_checkpoint / MASKS, shorten)

    slice_fails(copy_checkpoint, MASKS, "'small'", f"layer {MAMBA_LAYER}", "'mamba_heads'", "length 7, expected 8")


@pytest.mark.parametrize("value", ["10x10111", "1011 011", "+1011011", [1, 0, 1, 1, 0, 1, 1, 1]], ids=str)
def test_mask_invalid_characters(slice_fails, copy_checkpoint, value):
    set_layer_mask(copy_checkpoint, "small", MAMBA_LAYER, "mamba_heads", value)

    slice_fails(copy_checkpoint, MASKS, "'small'", f"layer {MAMBA_LAYER}", "'mamba_heads'", "'0' and '1'")


def test_mask_axis_wrong_layer_kind(slice_fails, copy_checkpoint):
    set_layer_mask(copy_checkpoint, "small", MAMBA_LAYER, "experts", "1" * 8)

    slice_fails(copy_checkpoint, MASKS, "'small'", f"layer {MAMBA_LAYER}", "'experts'", "mamba")


def drop_hidden_in_largest(document: dict[str, Any]) -> None:
    budget_entry(document, "large")["masks"]["hidden"] = budget_entry(document, "medium")["masks"]["hidden"]


def test_largest_budget_drops_without_partial(slice_fails, copy_checkpoint):
    edit_json(copy_checkpoint / MASKS, drop_hidden_in_largest)

    slice_fails(copy_checkpoint, "'large'", "partial", budget="large")


def test_partial_largest_budget_accepted(invoke_cli, copy_checkpoint):
    def declare_partial(document: dict[str, Any]) -> None:
        drop_hidden_in_largest(document)
        budget_entry(document, "large")["partial"] = True

    edit_json(copy_checkpoint / MASKS, declare_partial)
    output = copy_checkpoint.parent / "out"

    result = invoke_cli("slice", copy_checkpoint, "--budget", "large", "--output", output)

    assert result.exit_code == 0, f"a declared partial largest budget was rejected:\n{result.stderr}"
    assert json.loads((output / "config.json").read_text())["hidden_size"] == 96


def test_experts_fewer_than_top_k(slice_fails, copy_checkpoint):
    def keep_one_expert(document: dict[str, Any]) -> None:
        masks = layer_masks(document, "small", MOE_LAYER)
        first = masks["experts"].index("1")
        masks["experts"] = set_bit("0" * len(masks["experts"]), first, "1")

    edit_json(copy_checkpoint / MASKS, keep_one_expert)

    slice_fails(copy_checkpoint, "'small'", f"layer {MOE_LAYER}", "'experts'", "num_experts_per_tok")


def test_attention_heads_not_multiple_of_kv_heads(slice_fails, copy_checkpoint):
    def drop_one_head(document: dict[str, Any]) -> None:
        masks = layer_masks(document, "small", ATTENTION_LAYER)
        last = masks["attention_heads"].rindex("1")
        masks["attention_heads"] = set_bit(masks["attention_heads"], last, "0")

    edit_json(copy_checkpoint / MASKS, drop_one_head)

    slice_fails(copy_checkpoint, "'small'", f"layer {ATTENTION_LAYER}", "'attention_heads'", "KV head")


# ---------------------------------------------------------------------------------------------
# Budget spec and missing masks


@pytest.fixture
def unmasked_checkpoint(copy_checkpoint: Path) -> Path:
    (copy_checkpoint / MASKS).unlink()
    return copy_checkpoint


def test_no_masks_and_no_budget_spec(invoke_cli, unmasked_checkpoint, slice_fails):
    line = slice_fails(unmasked_checkpoint, MASKS)

    result = invoke_cli("inspect", unmasked_checkpoint)
    assert "--budget-spec" in result.stderr, f"the output does not tell to pass --budget-spec:\n{result.stderr}"
    assert error_lines(result) == [line], "inspect and slice report a missing elastic_config.json differently"


def test_budget_spec_missing(slice_fails, unmasked_checkpoint):
    spec = unmasked_checkpoint.parent / "no-such-spec.json"

    slice_fails(unmasked_checkpoint, spec.name, "not found", extra=("--budget-spec", spec))


def test_budget_spec_invalid_json(slice_fails, unmasked_checkpoint):
    spec = unmasked_checkpoint.parent / "spec.json"
    spec.write_text('{"budgets": [\n')

    slice_fails(unmasked_checkpoint, spec.name, "not valid JSON", extra=("--budget-spec", spec))


@pytest.mark.parametrize(
    ("keep", "axis", "value", "length"),
    [
        ({"hidden": 129}, "hidden", 129, 128),
        ({"hidden": -1}, "hidden", -1, 128),
        ({"experts": 9}, "experts", 9, 8),
        ({"per_layer": {"3": {"attention_heads": 10}}}, "attention_heads", 10, 8),
    ],
    ids=["hidden-above", "hidden-negative", "experts-above", "per-layer-heads-above"],
)
def test_budget_spec_count_out_of_range(slice_fails, unmasked_checkpoint, keep, axis, value, length):
    spec = unmasked_checkpoint.parent / "spec.json"
    spec.write_text(json.dumps({"budgets": [{"name": "full", "keep": {}}, {"name": "small", "keep": keep}]}))

    slice_fails(
        unmasked_checkpoint, spec.name, "'small'", f"'{axis}'", f"keep count {value}", f"0 to {length}",
        extra=("--budget-spec", spec),
    )


# ---------------------------------------------------------------------------------------------
# Output folder


def test_existing_output_rejected(invoke_cli, elastic_checkpoint, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("user data\n")

    result = invoke_cli("slice", elastic_checkpoint, "--budget", "small", "--output", output)

    assert_one_error(result, str(output), "already exists")
    assert "--overwrite" in result.stderr, f"the output does not suggest --overwrite:\n{result.stderr}"
    assert sorted(path.name for path in output.iterdir()) == ["keep.txt"], "the existing output was modified"
    assert (output / "keep.txt").read_text() == "user data\n", "the existing output's file was changed"
    assert list(tmp_path.glob(".out.resume-*")) == [], "a rejected run left a work folder"


def test_overwrite_replaces_existing_output(invoke_cli, elastic_checkpoint, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("user data\n")

    result = invoke_cli("slice", elastic_checkpoint, "--budget", "small", "--output", output, "--overwrite")

    assert result.exit_code == 0, f"--overwrite was rejected:\n{result.stderr}"
    assert not (output / "keep.txt").exists(), "--overwrite kept a file of the old output"
    assert json.loads((output / "config.json").read_text())["hidden_size"] == 64
    hidden = sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("."))
    assert hidden == [], f"--overwrite left hidden folders {hidden} beside the output"


def test_output_under_regular_file(invoke_cli, elastic_checkpoint, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    output = blocker / "child"

    result = invoke_cli("slice", elastic_checkpoint, "--budget", "small", "--output", output)

    assert_one_error(result, blocker.name)
    assert blocker.read_text() == "not a folder\n", "the file in the output path was changed"


def test_output_in_proc(invoke_cli, elastic_checkpoint):
    output = Path("/proc") / f"elastic-test-{os.getpid()}"

    result = invoke_cli("slice", elastic_checkpoint, "--budget", "small", "--output", output)

    assert_one_error(result, output.name)
    assert_no_output(output)


def test_output_error_names_requested_path(invoke_cli, elastic_checkpoint):
    output = Path("/proc") / f"elastic-test-{os.getpid()}"

    result = invoke_cli("slice", elastic_checkpoint, "--budget", "small", "--output", output)

    line = assert_one_error(result)
    assert ".partial-" not in line, f"the error names the temporary folder, not {output}: {line}"
    assert str(output) in line, f"the error does not name {output}: {line}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_output_in_read_only_folder(invoke_cli, elastic_checkpoint, tmp_path):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o500)
    output = parent / "out"
    try:
        result = invoke_cli("slice", elastic_checkpoint, "--budget", "small", "--output", output)
    finally:
        parent.chmod(0o700)

    assert_one_error(result, str(parent))
    assert_no_output(output)


# ---------------------------------------------------------------------------------------------
# Checkpoint argument


@pytest.mark.parametrize("spec", ["not a repo", "org/na me"])
def test_neither_folder_nor_repo_id(slice_fails, spec):
    slice_fails(spec, f"'{spec}'", "neither")


@pytest.mark.parametrize("spec", ["no/such/folder", "org/name/extra"])
def test_missing_folder_with_two_slashes(slice_fails, spec):
    slice_fails(spec, f"checkpoint folder '{spec}' does not exist")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("../../etc", "checkpoint folder '../../etc' does not exist"),
        ("../org", "checkpoint folder '../org' does not exist"),
        ("org/../../etc", "checkpoint folder 'org/../../etc' does not exist"),
        ("org/..", "'org/..' is neither"),
        ("org/na..me", "'org/na..me' is neither"),
    ],
)
def test_repo_id_path_traversal(invoke_cli, tmp_path, spec, expected):
    # From tmp/a/b/c, "../../etc" is tmp/a/etc, which does not exist. An argument that reads as
    # a path is reported as a missing folder, and one with ".." that could be a repo id is
    # rejected as a repo id, so neither reaches the hub.
    cwd = tmp_path / "a" / "b" / "c"
    cwd.mkdir(parents=True)

    result = invoke_cli("slice", spec, "--budget", "small", "--output", cwd / "out", cwd=cwd)

    assert_one_error(result, expected)
    assert_no_output(cwd / "out")


def test_file_instead_of_folder(slice_fails, elastic_checkpoint, tmp_path):
    config = elastic_checkpoint / "config.json"

    slice_fails(str(config), "config.json", "not a checkpoint folder")


# ---------------------------------------------------------------------------------------------
# Unknown and missing keys in budget specs and elastic_config.json

BUDGET_KEYS_IN_SPEC = "['keep', 'name', 'partial', 'target_params']"
BUDGET_KEYS_IN_MASKS = "['masks', 'name', 'partial', 'target_params']"


def write_spec(checkpoint: Path, document: dict[str, Any]) -> Path:
    spec = checkpoint.parent / "spec.json"
    spec.write_text(json.dumps(document))
    return spec


@pytest.mark.parametrize("key", ["masks", "kep"], ids=["masks-instead-of-keep", "misspelt-keep"])
def test_budget_spec_unknown_budget_key(slice_fails, unmasked_checkpoint, key):
    small = {"name": "small", key: {"hidden": 64}}
    spec = write_spec(unmasked_checkpoint, {"budgets": [{"name": "full", "keep": {}}, small]})

    slice_fails(
        unmasked_checkpoint, spec.name, "'small'", f"unknown key '{key}'", BUDGET_KEYS_IN_SPEC,
        extra=("--budget-spec", spec),
    )


def test_budget_spec_budget_without_keep(slice_fails, unmasked_checkpoint):
    spec = write_spec(unmasked_checkpoint, {"budgets": [{"name": "full", "keep": {}}, {"name": "small"}]})

    slice_fails(unmasked_checkpoint, spec.name, "'small'", "missing key 'keep'", extra=("--budget-spec", spec))


def test_budget_spec_unknown_top_level_key(slice_fails, unmasked_checkpoint):
    document = {"budgets": [{"name": "full", "keep": {}}, {"name": "small", "keep": {"hidden": 64}}], "default": {}}
    spec = write_spec(unmasked_checkpoint, document)

    line = slice_fails(
        unmasked_checkpoint, spec.name, "unknown key 'default'", "['budgets']", extra=("--budget-spec", spec)
    )

    assert "budget '" not in line, f"a problem of the whole file is attributed to a budget: {line}"


def test_budget_spec_empty_keep_accepted(invoke_cli, unmasked_checkpoint):
    spec = write_spec(unmasked_checkpoint, {"budgets": [{"name": "full", "keep": {}}]})

    result = invoke_cli("inspect", unmasked_checkpoint, "--budget-spec", spec, "--json")

    assert result.exit_code == 0, f"an empty 'keep' object was rejected:\n{result.stderr}"
    assert [budget["hidden_size"] for budget in json.loads(result.stdout)["budgets"]] == [128]


def test_masks_unknown_budget_key(slice_fails, copy_checkpoint):
    def misspell_masks(document: dict[str, Any]) -> None:
        small = budget_entry(document, "small")
        small["mask"] = small.pop("masks")

    edit_json(copy_checkpoint / MASKS, misspell_masks)

    line = slice_fails(copy_checkpoint, MASKS, "'small'", "unknown key 'mask'", BUDGET_KEYS_IN_MASKS)

    assert "(and 1 more problem)" in line, f"the missing 'masks' key is not counted: {line}"


def test_masks_budget_without_masks(slice_fails, copy_checkpoint):
    edit_json(copy_checkpoint / MASKS, lambda document: budget_entry(document, "small").pop("masks"))

    slice_fails(copy_checkpoint, MASKS, "'small'", "missing key 'masks'")


def test_masks_unknown_top_level_key(slice_fails, copy_checkpoint):
    set_json_value(copy_checkpoint / MASKS, ("budget",), [])

    slice_fails(copy_checkpoint, MASKS, "unknown key 'budget'", "['budgets', 'format', 'format_version']")


# ---------------------------------------------------------------------------------------------
# Experts that transformers' group-limited router cannot route


def test_budget_spec_single_expert_routing_groups(slice_fails, unmasked_checkpoint):
    # With 8 experts in 2 routing groups, keeping 2 leaves one expert per group, and the router's
    # top-2 inside each group fails on that.
    set_json_value(unmasked_checkpoint / "config.json", ("n_group",), 2)
    set_json_value(unmasked_checkpoint / "config.json", ("topk_group",), 1)
    small = {"name": "small", "keep": {"experts": 2}}
    spec = write_spec(unmasked_checkpoint, {"budgets": [{"name": "full", "keep": {}}, small]})

    slice_fails(
        unmasked_checkpoint, "'small'", f"layer {MOE_LAYER}", "'experts'", "1 expert(s) per routing group",
        extra=("--budget-spec", spec),
    )


def test_masks_misspelt_budgets_key_named(slice_fails, copy_checkpoint):
    edit_json(copy_checkpoint / MASKS, lambda document: document.__setitem__("budget", document.pop("budgets")))

    slice_fails(copy_checkpoint, MASKS, "unknown key 'budget'", "(and 1 more problem)")


def test_unsliceable_spec_hint_names_spec(invoke_cli, unmasked_checkpoint, tmp_path):
    set_json_value(unmasked_checkpoint / "config.json", ("n_group",), 2)
    set_json_value(unmasked_checkpoint / "config.json", ("topk_group",), 1)
    spec = write_spec(unmasked_checkpoint, {"budgets": [{"name": "full", "keep": {}}, {"name": "small", "keep": {"experts": 2}}]})

    result = invoke_cli("slice", unmasked_checkpoint, "--budget", "small", "--budget-spec", spec, "--output", tmp_path / "out")

    assert_one_error(result, "'small'")
    assert f"elastic inspect {unmasked_checkpoint} --budget-spec {spec}" in result.stderr


@pytest.mark.parametrize(
    ("axis", "message"),
    [("expert_channel", "unknown axis 'expert_channel'"), ("attention_heads", "axis does not apply to a moe layer")],
    ids=["misspelt", "other-layer-kind"],
)
def test_budget_spec_per_layer_axis_named(slice_fails, unmasked_checkpoint, axis, message):
    small = {"name": "small", "keep": {"per_layer": {str(MOE_LAYER): {axis: 1}}}}
    spec = write_spec(unmasked_checkpoint, {"budgets": [{"name": "full", "keep": {}}, small]})

    slice_fails(unmasked_checkpoint, "'small'", message, extra=("--budget-spec", spec))
