"""Guards around the commands: outputs that would delete the input, memory limits, early interrupts."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from elastic_cli.checkpoint.writer import ShardedWriter, WritePipeline, plan_shards
from elastic_cli.errors import CheckpointError, is_out_of_memory


def tree_digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("where", ["input itself", "folder above the input"])
def test_slice_output_over_input_rejected(copy_checkpoint, run_cli, where):
    before = tree_digests(copy_checkpoint.parent)
    output = copy_checkpoint if where == "input itself" else copy_checkpoint.parent

    result = run_cli("slice", copy_checkpoint, "--budget", "small", "--output", output, "--overwrite")

    assert result.exit_code == 2, result.stderr
    assert "would replace the input" in result.stderr
    assert "Traceback" not in result.stderr
    assert tree_digests(copy_checkpoint.parent) == before, "the input changed"


def test_quantize_output_over_input_rejected(copy_checkpoint, run_cli):
    before = tree_digests(copy_checkpoint)

    result = run_cli("quantize", copy_checkpoint, "--format", "fp8", "--output", copy_checkpoint, "--overwrite")

    assert result.exit_code == 2, result.stderr
    assert "would replace the input" in result.stderr
    assert tree_digests(copy_checkpoint) == before, "the input changed"


def test_missing_calibration_file_is_one_error(copy_checkpoint, run_cli, tmp_path):
    result = run_cli("quantize", copy_checkpoint, "--format", "fp8", "--calib-data", tmp_path / "absent.txt",
                     "--output", tmp_path / "out")

    assert result.exit_code == 2, result.stderr
    assert "calibration data" in result.stderr
    assert "not found" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_verify_accepts_quiet_after_command(copy_checkpoint, run_cli, tmp_path):
    assert run_cli("slice", copy_checkpoint, "--budget", "small", "--output", tmp_path / "child").exit_code == 0

    for flag in ("-q", "-v"):
        result = run_cli("verify", tmp_path / "child", flag)
        assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (MemoryError(), True),
        (OSError(errno.ENOMEM, "Cannot allocate memory"), True),
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("shape mismatch"), False),
        (ImportError("libgfortran.so.5: failed to map segment from shared object"), True),
        (ImportError("No module named 'scipy'"), False),
        (ValueError("Cannot allocate memory"), False),
    ],
)
def test_out_of_memory_recognised(error, expected):
    assert is_out_of_memory(error) is expected


START_WITH_FAILING_IMPORT = """
import builtins, sys
real_import = builtins.__import__

def failing_import(name, *args, **kwargs):
    if name == "typer":
        raise {error}
    return real_import(name, *args, **kwargs)

builtins.__import__ = failing_import
sys.argv = ["elastic", "--version"]
from elastic_cli.__main__ import run
run()
"""


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        ("MemoryError()", 1, "Error: out of memory while starting elastic (MemoryError)"),
        ("KeyboardInterrupt()", 130, "Interrupted while starting; nothing was written."),
    ],
)
def test_failed_start_is_one_line(error, code, message):
    completed = subprocess.run(
        [sys.executable, "-c", START_WITH_FAILING_IMPORT.format(error=error)], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == code
    assert completed.stderr.splitlines()[0] == message
    assert "Traceback" not in completed.stderr


class VanishedPages:
    """A file handle whose writes fail as when the mapped source pages were truncated away."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        raise OSError(errno.EFAULT, "Bad address")

    def __getattr__(self, name):
        return getattr(self._handle, name)


def test_source_truncated_mid_write_blames_the_checkpoint(tmp_path, monkeypatch):
    original = ShardedWriter._write

    def write(self, file, data):
        self._handle = VanishedPages(self._handle)
        original(self, file, data)

    monkeypatch.setattr(ShardedWriter, "_write", write)
    layout = plan_shards([("a", "I16", (4,))])
    with pytest.raises(CheckpointError, match="truncated or replaced while elastic read it"):
        with WritePipeline() as pipeline, ShardedWriter(tmp_path, layout, pipeline=pipeline) as writer:
            writer.write_array("a", "I16", np.zeros(4, dtype=np.int16))
            writer.finish()


def test_qad_output_over_input_rejected_before_training(copy_checkpoint, run_cli):
    before = tree_digests(copy_checkpoint)

    result = run_cli("quantize", copy_checkpoint, "--format", "nvfp4", "--qad", "--qad-steps", "1",
                     "--output", copy_checkpoint.parent, "--overwrite")

    assert result.exit_code == 2, result.stderr
    assert "would replace the input" in result.stderr
    assert "calibrating" not in result.stderr, "the check ran only after calibration"
    assert tree_digests(copy_checkpoint) == before, "the input changed"


COUNT_THREADS_AFTER_NUMPY = """
import os
from elastic_cli.__main__ import _import_numpy_without_blas_threads
_import_numpy_without_blas_threads()
print(len(os.listdir("/proc/self/task")), os.environ.get("OPENBLAS_NUM_THREADS"))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_numpy_starts_no_blas_threads():
    """numpy's OpenBLAS would start a spinning thread per extra core; the environment is left as it was."""
    environment = {key: value for key, value in os.environ.items() if key not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    completed = subprocess.run(
        [sys.executable, "-c", COUNT_THREADS_AFTER_NUMPY], capture_output=True, text=True, env=environment, timeout=120, check=True
    )
    assert completed.stdout.split() == ["1", "None"]


def test_slice_imports_no_heavy_module(elastic_checkpoint, run_cli, tmp_path):
    """Every command pays for its imports at start, so slicing must not load torch, transformers or pydantic."""
    result = run_cli("-q", "slice", elastic_checkpoint, "--budget", "all", "-o", tmp_path / "out", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.exit_code == 0, result.stderr

    imported = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:"):
            imported.add(line.rsplit("|", 1)[-1].strip())
    assert "numpy" in imported
    assert "torch" not in imported
    assert "transformers" not in imported
    assert "pydantic" not in imported
