"""Resume: an interrupted slice or quantize run continues where it stopped, with the same bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from elastic_cli.arch.nemotron_h import parse_config
from elastic_cli.checkpoint.writer import ShardedWriter
from elastic_cli.elastic.slicer import plan_budgets, slice_checkpoint
from elastic_cli.elastic.source import open_source
from elastic_cli.quantize import pipeline
from elastic_cli.quantize.pipeline import QuantizeOptions, quantize_checkpoint
from elastic_cli.synthetic import importance_budgets, tiny_config, write_checkpoint
from tests.test_quantize_export import given_state

SHARD = 150_000


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("parent")
    config = tiny_config("MEM*EMEM*E")
    budgets = importance_budgets(parse_config(config), [("full", 1.0), ("mid", 0.75), ("small", 0.5)], seed=9, block=16)
    write_checkpoint(folder, config, seed=9, budgets=budgets, max_shard_bytes=400_000)
    return folder


def digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def interrupt_after(monkeypatch, shards: int) -> None:
    """Make the writer raise KeyboardInterrupt when it opens shard number ``shards + 1``."""
    original = ShardedWriter._open_shard
    opened = {"count": 0}

    def opening(self, file):
        opened["count"] += 1
        if opened["count"] > shards:
            raise KeyboardInterrupt
        return original(self, file)

    monkeypatch.setattr(ShardedWriter, "_open_shard", opening)


def run_slice(parent: Path, output: Path, shard: int = SHARD) -> None:
    source = open_source(str(parent))
    try:
        slice_checkpoint(source, plan_budgets(source, ["all"]), output, nested=True, max_shard_bytes=shard)
    finally:
        source.close()


def test_slice_resumes_with_identical_bytes(parent, tmp_path, monkeypatch):
    run_slice(parent, tmp_path / "reference")

    with monkeypatch.context() as patch:
        interrupt_after(patch, 5)
        with pytest.raises(KeyboardInterrupt):
            run_slice(parent, tmp_path / "out")
    work = list(tmp_path.glob(".out.resume-*"))
    assert len(work) == 1, "the interrupted run left no resumable folder"
    # Five shards were opened across the three budgets; the two whose writers moved on are finished.
    kept = sorted(str(p.relative_to(work[0])) for p in work[0].rglob("*.safetensors"))
    assert kept == ["full/model-00001-of-00020.safetensors", "mid/model-00001-of-00010.safetensors"]
    kept_bytes = {name: (work[0] / name).stat().st_mtime_ns for name in kept}

    run_slice(parent, tmp_path / "out")

    assert digests(tmp_path / "out") == digests(tmp_path / "reference")
    assert not list(tmp_path.glob(".out.resume-*")), "the resumable folder was not renamed into place"
    for name, mtime in kept_bytes.items():
        assert (tmp_path / "out" / name).stat().st_mtime_ns == mtime, f"{name} was written again instead of reused"


def test_slice_with_changed_options_starts_fresh(parent, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_after(patch, 5)
        with pytest.raises(KeyboardInterrupt):
            run_slice(parent, tmp_path / "out")
    first = list(tmp_path.glob(".out.resume-*"))
    assert len(first) == 1

    run_slice(parent, tmp_path / "out", shard=2 * SHARD)

    assert not first[0].exists(), "a run with other options reused or kept the old folder"
    run_slice(parent, tmp_path / "reference", shard=2 * SHARD)
    assert digests(tmp_path / "out") == digests(tmp_path / "reference")


def test_slice_rewrites_a_damaged_finished_shard(parent, tmp_path, monkeypatch):
    run_slice(parent, tmp_path / "reference")
    with monkeypatch.context() as patch:
        interrupt_after(patch, 5)
        with pytest.raises(KeyboardInterrupt):
            run_slice(parent, tmp_path / "out")
    shard = sorted(next(tmp_path.glob(".out.resume-*")).rglob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))

    run_slice(parent, tmp_path / "out")

    assert digests(tmp_path / "out") == digests(tmp_path / "reference")


def test_quantize_resumes_without_recalibrating(parent, tmp_path, monkeypatch):
    options = QuantizeOptions(format="nvfp4", max_shard_bytes=SHARD)
    source = open_source(str(parent))
    state = given_state(source, options)
    source.close()
    monkeypatch.setattr(pipeline, "calibrate_state", lambda *args: state)

    def run(output: Path) -> None:
        opened = open_source(str(parent))
        try:
            quantize_checkpoint(opened, options, output)
        finally:
            opened.close()

    run(tmp_path / "reference")
    with monkeypatch.context() as patch:
        interrupt_after(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "out")

    def no_calibration(*args):
        raise AssertionError("a resumed run calibrated again")

    monkeypatch.setattr(pipeline, "calibrate_state", no_calibration)
    run(tmp_path / "out")

    assert digests(tmp_path / "out") == digests(tmp_path / "reference")
    state_document = json.loads((tmp_path / "out" / "elastic_quant_state.json").read_text())
    assert all(entry["weight_amax"] > 0 for entry in state_document["modules"].values())
