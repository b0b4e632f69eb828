"""Output folders under concurrent runs, interrupts at the commit, full disks and odd paths."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from elastic_cli import cli
from elastic_cli.checkpoint import resume
from elastic_cli.checkpoint.resume import Journal, commit_started, resumable_folder
from elastic_cli.checkpoint.writer import ShardedWriter, WritePipeline, output_error, plan_shards
from elastic_cli.errors import OutputError
from tests.conftest import REPO_ROOT
from tests.test_bad_inputs import assert_one_error


def test_second_run_on_same_output_rejected(tmp_path):
    output = tmp_path / "out"
    with resumable_folder(output, False, "a" * 64) as journal:
        (journal.folder / "model.safetensors").write_bytes(b"first run")
        for key in ("a" * 64, "b" * 64):  # the same run again, and a run with other options
            with pytest.raises(OutputError, match="another elastic run is writing output"):
                with resumable_folder(output, False, key):
                    pass
        assert (journal.folder / "model.safetensors").read_bytes() == b"first run", "the losing run touched the files"

    assert (output / "model.safetensors").read_bytes() == b"first run"
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_concurrent_slices_leave_one_sound_output(elastic_checkpoint, tmp_path):
    """Two identical slices at once: whichever wins, the output verifies and the other run prints the reason."""
    output = tmp_path / "out"
    command = [sys.executable, "-m", "elastic_cli", "-q", "slice", str(elastic_checkpoint), "--budget", "all"]
    command += ["--output", str(output), "--max-shard-size", "200KB"]
    runs = [subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    for run in runs:
        run.stdout.close()
        run.stderr.close()

    codes = sorted(code for code, _ in results)
    assert codes[0] == 0, f"neither run succeeded: {results}"
    for code, stderr in results:
        if code != 0:
            assert code == 1, stderr
            assert "Traceback" not in stderr
            assert "another elastic run is writing output" in stderr or "already exists" in stderr, stderr
    verified = subprocess.run(
        [sys.executable, "-m", "elastic_cli", "verify", str(output / "small")], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def commit_with_signal(monkeypatch, tmp_path, when: str) -> Path:
    """Write an output with the command line's SIGINT handler, sending SIGINT ``before`` or ``during`` the commit."""
    output = tmp_path / "out"
    monkeypatch.setattr(resume._COMMIT, "started", False)  # restored after the test
    original = resume.replace_destination

    def replace_after_signal(*args):
        signal.raise_signal(signal.SIGINT)
        original(*args)

    monkeypatch.setattr(resume, "replace_destination", replace_after_signal)
    previous = signal.signal(signal.SIGINT, cli._on_sigint)
    try:
        with resumable_folder(output, False, "c" * 64) as journal:
            (journal.folder / "config.json").write_text("{}\n")
            if when == "before":
                signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    return output


def test_interrupt_during_commit_keeps_output(monkeypatch, tmp_path):
    output = commit_with_signal(monkeypatch, tmp_path, "during")

    assert commit_started()
    assert json.loads((output / "config.json").read_text()) == {}


def test_interrupt_before_commit_leaves_nothing(monkeypatch, tmp_path):
    with pytest.raises(cli._Interrupted):
        commit_with_signal(monkeypatch, tmp_path, "before")

    assert not commit_started()
    assert list(tmp_path.iterdir()) == []


class FullDiskWithBuffer:
    """A file handle on a full file system whose close fails too, as a buffered file's flush does."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        self._handle.close()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._handle, name)


@pytest.mark.parametrize("threads", [True, False], ids=["pipeline", "inline"])
def test_disk_full_at_close_is_one_error(tmp_path, monkeypatch, threads):
    original = ShardedWriter._write

    def write(self, file, data):
        self._handle = FullDiskWithBuffer(self._handle)
        original(self, file, data)

    monkeypatch.setattr(ShardedWriter, "_write", write)
    layout = plan_shards([("a", "I16", (4,)), ("b", "I16", (4,))], max_shard_bytes=8)
    with pytest.raises(OutputError, match=r"no space left on the device while writing .*model-00001-of-00002"):
        with WritePipeline(threads=threads) as pipeline, ShardedWriter(tmp_path, layout, pipeline=pipeline) as writer:
            writer.write_array("a", "I16", np.zeros(4, dtype=np.int16))
            writer.write_array("b", "I16", np.zeros(4, dtype=np.int16))
            writer.finish()


@pytest.mark.parametrize("output", [".", "", ".."], ids=["dot", "empty", "parent"])
def test_output_containing_working_folder_rejected(invoke_cli, elastic_checkpoint, tmp_path, output):
    work = tmp_path / "work"
    work.mkdir()

    result = invoke_cli("slice", elastic_checkpoint, "--budget", "small", "--output", output, "--overwrite", cwd=work)

    assert_one_error(result, "is the current folder or contains it", exit_code=2)
    assert list(work.iterdir()) == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["work"]


def test_long_output_name_accepted(invoke_cli, elastic_checkpoint, tmp_path):
    output = tmp_path / ("o" * 250)

    result = invoke_cli("slice", elastic_checkpoint, "--budget", "small", "--output", output)

    assert result.exit_code == 0, result.stderr
    assert (output / "config.json").is_file()


def test_existing_file_output_not_folder(invoke_cli, elastic_checkpoint, tmp_path):
    output = tmp_path / "afile"
    output.write_text("data\n")

    result = invoke_cli("slice", elastic_checkpoint, "--budget", "small", "--output", output)

    assert_one_error(result, "exists and is not a folder")
    assert output.read_text() == "data\n"


def test_file_system_without_locks_still_writes(tmp_path, monkeypatch):
    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(resume.fcntl, "flock", no_locks)
    output = tmp_path / "out"
    with resumable_folder(output, False, "d" * 64) as journal:
        (journal.folder / "config.json").write_text("{}\n")

    assert (output / "config.json").read_text() == "{}\n"


SIGNALS_AFTER_MAIN = """
import signal, sys
from elastic_cli import cli
sys.argv = ["elastic", "-q", "inspect", sys.argv[1], "--json"]
cli.main()
print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN, signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)
"""


def test_signals_ignored_after_successful_command(elastic_checkpoint):
    """At exit Python restores the default action of handled signals, which a late Ctrl-C would hit."""
    completed = subprocess.run(
        [sys.executable, "-c", SIGNALS_AFTER_MAIN, str(elastic_checkpoint)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True,
    )
    assert completed.stdout.splitlines()[-1] == "True True"


def test_output_name_too_long_is_one_error(invoke_cli, elastic_checkpoint, tmp_path):
    result = invoke_cli("slice", elastic_checkpoint, "--budget", "small", "--output", tmp_path / ("n" * 256))

    assert_one_error(result, "cannot use output", "File name too long")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_hint_names_kept_shards(tmp_path):
    work = tmp_path / ".out.resume-0123456789abcdef"
    work.mkdir()
    journal = Journal(work, "key")
    journal.record("small/model-00001-of-00003.safetensors", "0" * 64, 100)
    error = output_error(work / "small" / "model-00002-of-00003.safetensors", OSError(errno.ENOSPC, "No space left on device"))

    assert error.message == f"no space left on the device while writing {tmp_path / 'out' / 'small' / 'model-00002-of-00003.safetensors'}"
    assert f"shards already finished stay in {work}" in error.hint


def test_disk_full_hint_without_finished_shards(tmp_path):
    """Before any shard is finished, the work folder is removed, so the hint does not name it."""
    work = tmp_path / ".out.resume-0123456789abcdef"
    work.mkdir()
    error = output_error(work / "small" / "model.safetensors", OSError(errno.ENOSPC, "No space left on device"))

    assert error.hint == "free space or choose another --output"
