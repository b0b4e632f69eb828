"""What `elastic slice` writes: shards, index, dtypes, config, sidecars, model card, determinism."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from elastic_cli.arch.nemotron_h import parse_config
from elastic_cli.checkpoint.reader import Checkpoint
from elastic_cli.elastic.slicer import plan_budgets, slice_checkpoint
from elastic_cli.elastic.source import open_source
from elastic_cli.synthetic import importance_budgets, tiny_config, write_checkpoint

REMOTE_CODE = "# remote code stand-in\nclass NemotronHConfig: ...\n"
SIDECARS = {
    "generation_config.json": '{"bos_token_id": 1, "eos_token_id": [2, 11], "temperature": 0.6}\n',
    "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}\n',
    "tokenizer_config.json": '{"chat_template": "{{ messages }}", "eos_token": "</s>"}\n',
    "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}\n",
    "configuration_nemotron_h.py": REMOTE_CODE,
    "modeling_nemotron_h.py": REMOTE_CODE,
    "README.md": "# parent card, replaced in children\n",
}
BUDGETS = [("full", 1.0), ("mid", 0.75), ("small", 0.5)]


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("parent")
    config = tiny_config("MEM*EMEM*E")
    config["auto_map"] = {
        "AutoConfig": "configuration_nemotron_h.NemotronHConfig",
        "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM",
    }
    budgets = importance_budgets(parse_config(config), BUDGETS, seed=11)
    write_checkpoint(folder, config, seed=11, budgets=budgets, max_shard_bytes=500_000, sidecars=SIDECARS)
    return folder


def run_slice(parent: Path, output: Path, *budgets: str, shard_mb: float = 0.4) -> dict:
    args = [sys.executable, "-m", "elastic_cli", "slice", str(parent), "--output", str(output), "--json"]
    args += ["--max-shard-size", f"{shard_mb}MB"]
    for budget in budgets:
        args += ["--budget", budget]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def children(parent, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("out") / "children"
    run_slice(parent, output, "all")
    return output


def shard_header(path: Path) -> dict:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


def test_all_budgets_written_to_subfolders(children):
    assert sorted(p.name for p in children.iterdir()) == ["full", "mid", "small"]


def test_index_total_size_equals_tensor_bytes(children):
    for budget in ("full", "mid", "small"):
        folder = children / budget
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        tensor_bytes = 0
        names_in_shards = {}
        for shard in shards:
            header = shard_header(folder / shard)
            assert header.pop("__metadata__") == {"format": "pt"}, f"{budget}/{shard} lost format: pt"
            for name, entry in header.items():
                tensor_bytes += entry["data_offsets"][1] - entry["data_offsets"][0]
                names_in_shards[name] = shard
        assert index["metadata"]["total_size"] == tensor_bytes, f"{budget}: total_size differs from tensor bytes"
        assert names_in_shards == index["weight_map"], f"{budget}: index and shards disagree"
        assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        assert sorted(p.name for p in folder.glob("*.safetensors")) == shards


def test_dtypes_kept(parent, children):
    with Checkpoint.open(parent) as source, Checkpoint.open(children / "small") as child:
        fp32 = [name for name, info in child.tensors.items() if info.dtype == "F32"]
        assert any(name.endswith("A_log") for name in fp32)
        assert any(name.endswith("e_score_correction_bias") for name in fp32)
        for name, info in child.tensors.items():
            template = name.split(".")[-1]
            same_kind = [i.dtype for n, i in source.tensors.items() if n.split(".")[-1] == template and ("experts" in n) == ("experts" in name)]
            assert info.dtype in same_kind, f"{name} changed dtype to {info.dtype}"


def test_sidecars_copied_byte_for_byte(parent, children):
    for budget in ("full", "small"):
        folder = children / budget
        for name in SIDECARS:
            if name == "README.md":
                continue
            assert (folder / name).read_bytes() == (parent / name).read_bytes(), f"{budget}/{name} differs"
        assert not (folder / "elastic_config.json").exists(), "parent masks leaked into a child"


def test_config_rewritten_and_otherwise_unchanged(parent, children):
    source = json.loads((parent / "config.json").read_text())
    child = json.loads((children / "small" / "config.json").read_text())
    changed = {key for key in source if source[key] != child.get(key)}

    assert changed <= {
        "hidden_size", "mamba_num_heads", "num_attention_heads", "n_routed_experts",
        "moe_intermediate_size", "moe_shared_expert_intermediate_size", "n_groups",
    }, f"unexpected config changes: {changed}"
    assert child["auto_map"] == source["auto_map"]
    assert child["hidden_size"] < source["hidden_size"]
    assert child["head_dim"] == source["head_dim"]
    assert child["num_hidden_layers"] == len(child["hybrid_override_pattern"])


def test_model_card_names_parent_budget_and_counts(parent, children):
    card = (children / "small" / "README.md").read_text()
    data = run_slice(parent, children.parent / "dry", "small")
    params = data["budgets"][0]["params"]

    assert f"base_model: {parent.name}" in card
    assert "`small`" in card
    assert f"{params:,}" in card
    assert "local folder, no revision" in card
    assert str(parent.parent) not in card, "the card must not record absolute paths"


def test_budget_all_reads_each_tensor_once(parent, tmp_path, monkeypatch):
    reads: list[str] = []

    def counting(method):
        def wrapper(self, name, *args):
            reads.append(name)
            return method(self, name, *args)

        return wrapper

    for method in ("read", "read_bytes", "read_rows", "map_array"):
        monkeypatch.setattr(Checkpoint, method, counting(getattr(Checkpoint, method)))
    source = open_source(str(parent))
    try:
        slice_checkpoint(source, plan_budgets(source, ["all"]), tmp_path / "out", nested=True)
        expected = sorted(source.checkpoint.tensors)
    finally:
        source.close()

    assert sorted(reads) == expected, "some tensor was read twice or not at all"


def test_outputs_are_byte_identical_across_runs(parent, tmp_path):
    run_slice(parent, tmp_path / "a", "mid", "small")
    run_slice(parent, tmp_path / "b", "mid", "small")

    def digests(root: Path) -> dict[str, str]:
        return {
            str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*"))
            if path.is_file()
        }

    first, second = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert first == second
    assert sorted({name.split("/")[0] for name in first}) == ["mid", "small"]


def test_single_budget_written_into_output_itself(parent, tmp_path):
    data = run_slice(parent, tmp_path / "one", "mid", shard_mb=100)

    assert (tmp_path / "one" / "model.safetensors").exists()
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    assert data["budgets"][0]["path"] == str(tmp_path / "one")
    assert data["budgets"][0]["files"] == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_sliced_values_match_direct_indexing(parent, children):
    """Spot check: the embedding of a child equals the parent's embedding at the kept channels."""
    masks = json.loads((parent / "elastic_config.json").read_text())
    small = next(b for b in masks["budgets"] if b["name"] == "small")
    hidden = [i for i, bit in enumerate(small["masks"]["hidden"]) if bit == "1"]

    with Checkpoint.open(parent) as source, Checkpoint.open(children / "small") as child:
        expected = source.read("backbone.embeddings.weight")[:, hidden]
        assert torch.equal(child.read("backbone.embeddings.weight"), expected)
    path = next((children / "small").glob("*.safetensors"))
    with safe_open(path, "pt") as handle:
        assert handle.metadata() == {"format": "pt"}


STARTUP_PROBE = """
import runpy, sys
sys.argv = ["elastic", *sys.argv[1:]]
try:
    runpy.run_module("elastic_cli", run_name="__main__", alter_sys=True)
except SystemExit as exit_:
    assert not exit_.code, exit_.code
loaded = sorted(name for name in ("torch", "transformers") if name in sys.modules)
print("loaded:", ",".join(loaded))
"""


@pytest.mark.parametrize("command", ["slice", "inspect"])
def test_slice_and_inspect_never_import_torch(parent, tmp_path, command):
    """torch's import costs seconds that slicing small outputs cannot afford."""
    args = [str(parent), "--json"] if command == "inspect" else [str(parent), "--budget", "all", "--output", str(tmp_path / "out")]
    completed = subprocess.run(
        [sys.executable, "-c", STARTUP_PROBE, command, *args], capture_output=True, text=True, timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "loaded:", f"elastic {command} imported torch or transformers"
