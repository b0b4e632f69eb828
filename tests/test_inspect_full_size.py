"""inspect and dry-run slicing of the full Nemotron 3 Nano 30B-A3B layout from headers alone.

The shards hold exact headers and sparse (hole) data areas, so the 63 GB checkpoint costs no disk
space; any tensor read would return zeros, and the commands under test must not need one.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from elastic_cli.synthetic import nano_v3_config, write_header_only_checkpoint

GIB = 1024**3

BUDGET_SPEC = {
    "budgets": [
        {"name": "30B", "keep": {}},
        {
            "name": "23B",
            "keep": {"experts": 96, "mamba_heads": 56, "expert_channels": 1664, "attention_heads": 28},
        },
        {
            "name": "12B",
            "keep": {
                "hidden": 2048,
                "experts": 48,
                "mamba_heads": 48,
                "expert_channels": 1344,
                "attention_heads": 24,
                "shared_expert_channels": 2688,
            },
        },
    ]
}


@pytest.fixture(scope="module")
def nano_parent(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nano-30b")
    write_header_only_checkpoint(folder, nano_v3_config())
    (folder / "budgets.json").write_text(json.dumps(BUDGET_SPEC))
    return folder


def run_json(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "elastic_cli", *args, "--json"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_inspect_reports_parent_totals(nano_parent):
    report = run_json("inspect", str(nano_parent), "--budget-spec", str(nano_parent / "budgets.json"))
    parent = report["budgets"][0]

    assert report["valid"], report["problems"]
    assert report["architecture"]["layers"] == 52
    assert report["architecture"]["layer_counts"] == {"mamba": 23, "attention": 6, "mlp": 0, "moe": 23}
    assert parent["params"] == pytest.approx(31.6e9, rel=0.005)
    assert parent["active_params"] == pytest.approx(3.6e9, rel=0.02)
    assert parent["bytes"]["bf16"] / GIB == pytest.approx(58.9, abs=0.1), "BF16 size differs from NVIDIA's 58.9 GiB"
    assert parent["bytes"]["fp8"] / GIB == pytest.approx(31.46, abs=0.1), "FP8 recipe size estimate regressed"
    assert parent["bytes"]["nvfp4"] / GIB == pytest.approx(18.66, abs=0.1), "NVFP4 recipe size estimate regressed"


def test_inspect_orders_nested_budgets(nano_parent):
    report = run_json("inspect", str(nano_parent), "--budget-spec", str(nano_parent / "budgets.json"))
    params = [budget["params"] for budget in report["budgets"]]

    assert [budget["name"] for budget in report["budgets"]] == ["30B", "23B", "12B"]
    assert params == sorted(params, reverse=True)
    assert report["budgets"][2]["hidden_size"] == 2048


def test_dry_run_plans_without_writing(nano_parent, tmp_path):
    out = tmp_path / "children"
    data = run_json(
        "slice", str(nano_parent), "--budget-spec", str(nano_parent / "budgets.json"),
        "--budget", "all", "--output", str(out), "--dry-run",
    )

    assert not out.exists(), "--dry-run wrote output"
    assert [entry["budget"] for entry in data["budgets"]] == ["30B", "23B", "12B"]
    assert all(entry["written"] is False for entry in data["budgets"])
    assert data["budgets"][0]["bytes"] == pytest.approx(58.9 * GIB, rel=0.002)
