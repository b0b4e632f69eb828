"""Fault injection: interrupted runs, full and read-only disks, hostile inputs, numeric faults, a memory cap.

Each section attacks checkpoints that the tests build themselves and checks the promises of
docs/cli.md. An output folder is either complete or absent. A failure is one ``Error:`` line
with exit code 1. An interrupt exits with 130 (SIGINT) or 143 (SIGTERM). The input is never
changed.

Starting ``python -m elastic_cli`` costs about 4 s of torch import on a 2-core machine, too much
for dozens of runs. Most runs here therefore fork from a server process that has imported
``elastic_cli.cli`` once: each forked child runs the ``elastic_cli`` module as ``python -m``
does, with its own PID, exit code, signal handling and stderr. The tests marked "fresh process"
start the real ``python -m elastic_cli`` to cover the console entry itself.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from elastic_cli.arch.nemotron_h import KIND_TO_NATIVE, parse_config, read_layer_kinds
from elastic_cli.checkpoint.manifest import MANIFEST_FILE, file_digest
from elastic_cli.checkpoint.reader import Checkpoint
from elastic_cli.checkpoint.torch_dtypes import TORCH_TO_DTYPE
from elastic_cli.checkpoint.writer import ShardedWriter, plan_shards, write_text
from elastic_cli.elastic.masks import MASKS_FILE, budgets_to_document
from elastic_cli.elastic.source import open_source
from elastic_cli.errors import CheckpointError, ElasticError
from elastic_cli.quantize import export
from elastic_cli.quantize.pipeline import QuantizeOptions, QuantizerState, plan_for, quantize_checkpoint
from elastic_cli.synthetic import importance_budgets, template_shapes, tensor_dtype, tiny_config, write_checkpoint
from tests.conftest import REPO_ROOT

BUDGET_FRACTIONS = [("large", 1.0), ("medium", 0.75), ("small", 0.5)]
INDEX = "model.safetensors.index.json"
ERROR_TIMEOUT_S = 20  # a run that only has to fail takes well under 1 s, so 20 s means a hang
SLICE_TIMEOUT_S = 120
FRESH_START_TIMEOUT_S = 60

# ---------------------------------------------------------------------------------------------
# Running the command line: a fork server, and fresh processes


FORK_SERVER = r"""
import json, os, runpy, signal, sys, traceback

import elastic_cli.cli
# The command line loads torch and transformers only for quantize; load them once here, so that
# no forked run imports them again.
import elastic_cli.quantize.pipeline
import transformers.models.nemotron_h.modeling_nemotron_h


def run_child(request):
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                            (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    sys.argv = ["elastic", *request["args"]]
    code = 0
    try:
        runpy.run_module("elastic_cli", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        if isinstance(exit_.code, int):
            code = exit_.code
        elif exit_.code is not None:
            print(exit_.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        # The interpreter dies of SIGINT on an uncaught KeyboardInterrupt, so the child does too.
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            run_child(request)
        finally:
            os._exit(1)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


@dataclass(frozen=True)
class RunResult:
    """One finished command-line run. ``exit_code`` is negative (-N) when signal N killed it."""

    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool
    elapsed_s: float


def cli_environment(home: Path) -> dict[str, str]:
    """Return the environment of a test run: offline, an empty Hugging Face cache, no debug mode."""
    env = {key: value for key, value in os.environ.items() if key not in ("ELASTIC_DEBUG", "FORCE_COLOR")}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HOME": str(home / "hf-home"),
            "HF_HUB_CACHE": str(home / "empty-hf-cache"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
    )
    return env


class ForkServer:
    """A process that has imported ``elastic_cli.cli`` and forks one child per ``elastic`` command.

    It runs one command at a time: :meth:`spawn` starts it and returns the child's PID, so a
    test can signal it, and :meth:`wait` collects the result.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.process = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=workdir,
            env=cli_environment(workdir),
        )
        self._buffer = b""
        self._ready = False
        self._runs = 0
        self._pending: tuple[int, float, Path, Path] | None = None

    def _read_line(self, timeout_s: float) -> str | None:
        assert self.process.stdout is not None
        descriptor = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([descriptor], [], [], remaining)
            if ready:
                chunk = os.read(descriptor, 4096)
                if not chunk:
                    raise RuntimeError(f"the fork server exited with {self.process.wait()}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def spawn(self, *args: object, cwd: Path | None = None) -> int:
        """Start ``elastic ARGS`` in a forked child and return its PID."""
        assert self._pending is None, "the previous run was not collected"
        if not self._ready:
            line = self._read_line(FRESH_START_TIMEOUT_S)
            assert line == "ready", f"the fork server did not start: {line!r}"
            self._ready = True
        self._runs += 1
        stdout = self.workdir / f"run-{self._runs}.stdout"
        stderr = self.workdir / f"run-{self._runs}.stderr"
        request = {
            "args": [str(arg) for arg in args],
            "cwd": str(cwd or self.workdir),
            "stdout": str(stdout),
            "stderr": str(stderr),
        }
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(request) + "\n").encode())
        self.process.stdin.flush()
        started = time.monotonic()
        pid = int(self._read_line(10) or "0")
        assert pid > 0, "the fork server did not report a PID"
        self._pending = (pid, started, stdout, stderr)
        return pid

    def wait(self, timeout_s: float = SLICE_TIMEOUT_S) -> RunResult:
        """Collect the running child, or SIGKILL it after ``timeout_s`` and report ``timed_out``."""
        assert self._pending is not None, "no run to wait for"
        pid, started, stdout, stderr = self._pending
        line = self._read_line(timeout_s)
        timed_out = line is None
        if timed_out:
            os.kill(pid, signal.SIGKILL)
            line = self._read_line(10)
        elapsed = time.monotonic() - started
        self._pending = None
        return RunResult(int(line or "-9"), stdout.read_text(), stderr.read_text(), timed_out, elapsed)

    def run(self, *args: object, cwd: Path | None = None, timeout_s: float = SLICE_TIMEOUT_S) -> RunResult:
        self.spawn(*args, cwd=cwd)
        return self.wait(timeout_s)

    def close(self) -> None:
        if self._pending is not None:
            os.kill(self._pending[0], signal.SIGKILL)
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    server = ForkServer(tmp_path_factory.mktemp("fork-server"))
    yield server
    server.close()


def start_fresh(args: list[object], home: Path, **popen: Any) -> subprocess.Popen:
    """Start the real ``python -m elastic_cli ARGS`` with captured text output."""
    return subprocess.Popen(
        [sys.executable, "-m", "elastic_cli", *map(str, args)],
        cwd=home,
        env=cli_environment(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


# ---------------------------------------------------------------------------------------------
# Checking outputs


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def assert_one_error(result: RunResult, *expected: str) -> str:
    """Check exit code 1, no hang, no traceback, one ``Error:`` line naming every ``expected``."""
    assert not result.timed_out, f"the run hung and was killed after {result.elapsed_s:.0f} s:\n{result.stderr}"
    assert result.exit_code == 1, f"exit code {result.exit_code}, expected 1, stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, f"traceback on stderr:\n{result.stderr}"
    lines = error_lines(result.stderr)
    assert len(lines) == 1, f"expected one 'Error:' line, got {len(lines)}:\n{result.stderr}"
    for text in expected:
        assert text.lower() in lines[0].lower(), f"the error does not mention {text!r}: {lines[0]}"
    assert result.stdout == "", f"a failed run printed to stdout: {result.stdout!r}"
    return lines[0]


def partial_folders(output: Path) -> list[str]:
    """List the ``.NAME.partial-*`` temporary folders beside ``output``."""
    return sorted(path.name for path in output.parent.glob(f".{output.name}.partial-*"))


def hidden_leftovers(output: Path) -> list[str]:
    """List every hidden ``.NAME.*`` entry beside ``output``: temporary, resumable or replaced folders."""
    return sorted(path.name for path in output.parent.glob(f".{output.name}.*"))


def assert_no_output(output: Path) -> None:
    assert not output.exists(), f"a failed run left {output} behind"
    assert hidden_leftovers(output) == [], f"a failed run left {hidden_leftovers(output)} beside {output}"


def tree_digests(root: Path) -> dict[str, tuple[str, int]]:
    """Return the sha256 and size of every file under ``root``, keyed by relative path."""
    return {
        str(path.relative_to(root)): file_digest(path)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def assert_manifest_matches(folder: Path) -> None:
    """Check that a folder's manifest lists exactly its other files, with their sha256 and size."""
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    listed = manifest["files"]
    present = sorted(path.name for path in folder.iterdir() if path.name != MANIFEST_FILE)
    assert sorted(listed) == present, f"{folder}: the manifest lists {sorted(listed)}, the folder holds {present}"
    for name, entry in listed.items():
        sha256, size = file_digest(folder / name)
        assert (sha256, size) == (entry["sha256"], entry["size"]), f"{folder / name} does not match its manifest"


def assert_budget_folders_complete(output: Path, budgets: list[str]) -> None:
    """Check that ``output`` contains one folder per budget and nothing else, each matching its manifest."""
    assert sorted(path.name for path in output.iterdir()) == sorted(budgets), f"{output} holds the wrong folders"
    for budget in budgets:
        assert_manifest_matches(output / budget)


# ---------------------------------------------------------------------------------------------
# Building checkpoints


@pytest.fixture(scope="module")
def ram_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tmpfs for the large inputs and outputs of this module, or a disk folder where none can be mounted.

    A killed process loses nothing that reached the page cache, so RAM-backed files test
    interrupts as well as a disk does, without the disk's fsync times, which other load on
    the machine can stretch from milliseconds to seconds.
    """
    folder = tmp_path_factory.mktemp("ram-disk")
    mounted = False
    if shutil.which("mount") is not None:
        command = ["mount", "-t", "tmpfs", "-o", "size=2g", "tmpfs", str(folder)]
        mounted = subprocess.run(command, capture_output=True).returncode == 0
    yield folder
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def write_pooled_checkpoint(folder: Path, config: dict[str, Any], budgets: list, max_shard_bytes: int) -> None:
    """Write a checkpoint like ``write_checkpoint`` does, but cut every tensor from one random pool.

    ``write_checkpoint`` draws fresh random values for every tensor, which took about 8 s for
    280 MB on a 2-core machine. Reading one pool of 1 M values at a different offset per tensor
    takes a fraction of that, and rows of one tensor still differ.
    """
    arch = parse_config(config)
    entries = [(name, TORCH_TO_DTYPE[tensor_dtype(name)], shape) for name, shape in template_shapes(arch).items()]
    largest = max(math.prod(shape) for _, _, shape in entries)
    pool_size = 1_000_003  # prime, so offsets modulo it rarely repeat
    generator = torch.Generator().manual_seed(7)
    pool = torch.randn(pool_size, generator=generator)
    tiled = {
        dtype: pool.to(dtype).repeat(largest // pool_size + 2) for dtype in (torch.bfloat16, torch.float32)
    }
    layout = plan_shards(entries, max_shard_bytes)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", lambda descriptor: None)
        with ShardedWriter(folder, layout) as writer:
            for index, (name, _, shape) in enumerate(entries):
                offset = index * 7919 % pool_size
                values = tiled[tensor_dtype(name)][offset : offset + math.prod(shape)]
                writer.write(name, values.view(shape))
            writer.finish()
        write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_text(folder / MASKS_FILE, json.dumps(budgets_to_document(budgets, arch), indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Interrupted runs


SWEEP_SEED = 20240611
KILLS_PER_SIGNAL = 4
SLICE_OPTIONS = ("--max-shard-size", "1MB")  # many shards, so kills land between and inside shard writes


@pytest.fixture(scope="module")
def sweep_checkpoint(fork_server: ForkServer, ram_disk: Path) -> Path:
    """A 3-budget elastic checkpoint of about 34 MB in 1 MB shards, built while the fork server starts."""
    folder = ram_disk / "sweep-parent"
    folder.mkdir()
    config = tiny_config(hidden_size=256, n_routed_experts=40, moe_intermediate_size=192)
    budgets = importance_budgets(parse_config(config), BUDGET_FRACTIONS, seed=1)
    write_pooled_checkpoint(folder, config, budgets, max_shard_bytes=1_000_000)
    return folder


@dataclass(frozen=True)
class Reference:
    """An uninterrupted ``slice --budget all``: its files and how long it ran."""

    digests: dict[str, tuple[str, int]]
    duration_s: float
    input_digests: dict[str, tuple[str, int]]


@pytest.fixture(scope="module")
def reference(fork_server: ForkServer, sweep_checkpoint: Path, ram_disk: Path) -> Reference:
    input_digests = tree_digests(sweep_checkpoint)
    output = ram_disk / "reference"
    result = fork_server.run("slice", sweep_checkpoint, "--budget", "all", "--output", output, *SLICE_OPTIONS)
    assert result.exit_code == 0, f"the uninterrupted slice failed:\n{result.stderr}"
    assert_budget_folders_complete(output, [name for name, _ in BUDGET_FRACTIONS])
    return Reference(tree_digests(output), result.elapsed_s, input_digests)


def kill_delays(signum: int, duration_s: float) -> list[float]:
    """Seeded kill times spread over one run's measured duration.

    The first 0.1 s is left out: there a forked child may not yet have installed the SIGTERM
    handler of ``main()`` on a loaded machine, and it has written nothing yet either.
    """
    generator = random.Random(SWEEP_SEED + signum)
    start = min(0.1, duration_s / 2)
    return sorted(generator.uniform(start, duration_s) for _ in range(KILLS_PER_SIGNAL))


def check_after_kill(output: Path, reference: Reference, what: str) -> None:
    """The output after an interrupt: absent, or complete and equal to the uninterrupted run."""
    if output.exists():
        assert_budget_folders_complete(output, [name for name, _ in BUDGET_FRACTIONS])
        assert tree_digests(output) == reference.digests, f"{what}: the output differs from an uninterrupted run"


def check_interrupted_run(exit_code: int, stderr: str, output: Path, reference: Reference, signum: int, what: str) -> None:
    """Check one interrupted run: its exit code, stderr, output and temporary folders."""
    expected = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -signal.SIGKILL}[signum]
    allowed = {expected, 0}  # 0: the run finished before the signal arrived
    assert exit_code in allowed, f"{what}: exit code {exit_code}, expected one of {sorted(allowed)}:\n{stderr}"
    assert "Traceback" not in stderr, f"{what}: traceback on stderr:\n{stderr}"
    if exit_code == 0:
        assert output.exists(), f"{what}: exit code 0 but no output"
    check_after_kill(output, reference, what)
    if signum != signal.SIGKILL:
        assert partial_folders(output) == [], f"{what}: temporary folders left: {partial_folders(output)}"


def needs_rerun(output: Path, signum: int) -> bool:
    """Return True when the interrupted run left something for the next run to finish or clean up.

    A run keeps its finished shards in a hidden ``.NAME.resume-*`` folder on purpose, for the
    next run to reuse. After SIGKILL that folder also contains the unrecorded shard being written.
    """
    return not output.exists() and (signum == signal.SIGKILL or bool(hidden_leftovers(output)))


def check_rerun(fork_server: ForkServer, checkpoint: Path, output: Path, reference: Reference, what: str) -> None:
    """The same command succeeds after an interrupt, removes what that run left and writes the same bytes."""
    rerun = fork_server.run("slice", checkpoint, "--budget", "all", "--output", output, *SLICE_OPTIONS)
    assert rerun.exit_code == 0, f"{what}: the next run failed:\n{rerun.stderr}"
    assert hidden_leftovers(output) == [], f"{what}: the next run left {hidden_leftovers(output)}"
    assert tree_digests(output) == reference.digests, f"{what}: the next run's output differs from an uninterrupted run"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: signal.Signals(s).name)
def test_interrupted_slice_complete_or_absent(fork_server, sweep_checkpoint, reference, ram_disk, signum):
    assert reference.duration_s > 0.2, f"the slice takes {reference.duration_s:.2f} s, too short to interrupt"

    for number, delay in enumerate(kill_delays(signum, reference.duration_s)):
        output = ram_disk / f"{signal.Signals(signum).name}-{number}"
        what = f"{signal.Signals(signum).name} after {delay:.2f} s"
        pid = fork_server.spawn("slice", sweep_checkpoint, "--budget", "all", "--output", output, *SLICE_OPTIONS)
        time.sleep(delay)
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass  # the run finished first, so its output must be complete
        result = fork_server.wait()

        assert not result.timed_out, f"{what}: the run did not exit"
        check_interrupted_run(result.exit_code, result.stderr, output, reference, signum, what)
        if needs_rerun(output, signum):
            check_rerun(fork_server, sweep_checkpoint, output, reference, what)
        shutil.rmtree(output, ignore_errors=True)

    assert tree_digests(sweep_checkpoint) == reference.input_digests, "an interrupted run changed the input checkpoint"


@dataclass(frozen=True)
class FreshInterrupt:
    """A fresh ``python -m elastic_cli slice`` killed by one signal while it wrote."""

    signum: int
    output: Path
    exit_code: int
    stderr: str
    started_writing: bool


@pytest.fixture(scope="module")
def fresh_interrupts(sweep_checkpoint, reference, ram_disk) -> dict[int, FreshInterrupt]:
    """Start one real console run per caught signal, both together, and kill each one mid-write.

    Each run gets its signal a seeded delay after its hidden work folder appears. SIGKILL runs
    no code in the process, so the forked runs above cover it as well as a fresh process would.
    """
    home = ram_disk / "fresh"
    home.mkdir()
    signals = [signal.SIGINT, signal.SIGTERM]
    generator = random.Random(SWEEP_SEED)
    outputs = {signum: home / f"out-{signal.Signals(signum).name}" for signum in signals}
    processes = {
        signum: start_fresh(["slice", sweep_checkpoint, "--budget", "all", "--output", outputs[signum], *SLICE_OPTIONS], home)
        for signum in signals
    }
    delays = {signum: generator.uniform(0.0, 0.3) * reference.duration_s for signum in signals}

    deadline = time.monotonic() + FRESH_START_TIMEOUT_S
    waiting = set(signals)
    writing_since: dict[int, float] = {}
    while waiting and time.monotonic() < deadline:
        for signum in sorted(waiting):
            process, output = processes[signum], outputs[signum]
            if process.poll() is not None:
                waiting.discard(signum)
            elif signum not in writing_since and hidden_leftovers(output):
                writing_since[signum] = time.monotonic()
            elif signum in writing_since and time.monotonic() - writing_since[signum] >= delays[signum]:
                process.send_signal(signum)
                waiting.discard(signum)
        time.sleep(0.005)

    results = {}
    for signum in signals:
        process = processes[signum]
        if signum in waiting:
            process.kill()  # never started writing within the deadline
        _, stderr = process.communicate(timeout=SLICE_TIMEOUT_S)
        results[signum] = FreshInterrupt(signum, outputs[signum], process.returncode, stderr, signum in writing_since)
    return results


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: signal.Signals(s).name)
def test_interrupted_fresh_process(fork_server, sweep_checkpoint, reference, fresh_interrupts, signum):
    run = fresh_interrupts[signum]
    what = f"fresh process, {signal.Signals(signum).name}"

    assert run.started_writing, f"{what}: the run ended before it started writing:\n{run.stderr}"
    check_interrupted_run(run.exit_code, run.stderr, run.output, reference, signum, what)
    if needs_rerun(run.output, signum):
        check_rerun(fork_server, sweep_checkpoint, run.output, reference, what)
    assert tree_digests(sweep_checkpoint) == reference.input_digests, "an interrupted run changed the input checkpoint"


@pytest.mark.parametrize(
    "signum",
    [
        pytest.param(
            signal.SIGINT,
            id="SIGINT",
        ),
        pytest.param(signal.SIGTERM, id="SIGTERM"),
    ],
)
def test_interrupt_message(fresh_interrupts, signum):
    run = fresh_interrupts[signum]
    word = {signal.SIGINT: "Interrupted", signal.SIGTERM: "Terminated"}[signum]

    assert run.started_writing, f"the run ended before it started writing:\n{run.stderr}"
    assert run.exit_code != 0, f"the run finished before the signal arrived:\n{run.stderr}"
    assert f"{word}; nothing was left half-written." in run.stderr, f"no {word!r} message on stderr:\n{run.stderr}"


# ---------------------------------------------------------------------------------------------
# Full and read-only disks


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """Return ``mount(name, options) -> Path``, which mounts a tmpfs under ``tmp_path``.

    Every tmpfs is unmounted after the test. The test is skipped when mounting is not permitted
    (tests not run as root, or no CAP_SYS_ADMIN).
    """
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command on this machine")
        completed = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True
        )
        if completed.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {completed.stderr.strip() or completed.returncode}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_disk_full_fails_cleanly(fork_server, elastic_checkpoint, mount_tmpfs):
    disk = mount_tmpfs("disk", "size=2m")
    output = disk / "out"
    before = tree_digests(elastic_checkpoint)
    assert sum(size for _, size in before.values()) > 2 * 2**20, "the checkpoint must be larger than the 2 MiB disk"

    result = fork_server.run("slice", elastic_checkpoint, "--budget", "large", "--output", output, timeout_s=ERROR_TIMEOUT_S)

    assert_one_error(result, "no space left", str(disk))
    assert sorted(path.name for path in disk.iterdir()) == [], "the failed run left files on the full disk"
    assert tree_digests(elastic_checkpoint) == before, "the failed run changed the input checkpoint"


def test_disk_full_error_names_output(fork_server, elastic_checkpoint, mount_tmpfs):
    output = mount_tmpfs("disk", "size=2m") / "out"

    result = fork_server.run("slice", elastic_checkpoint, "--budget", "large", "--output", output, timeout_s=ERROR_TIMEOUT_S)

    line = assert_one_error(result, "no space left")
    assert f"/.{output.name}." not in line, f"the error names the removed temporary folder: {line}"
    assert str(output) in line, f"the error does not name {output}: {line}"


def test_disk_full_then_space_freed(fork_server, elastic_checkpoint, mount_tmpfs, tmp_path):
    """A rerun after space is freed writes the bytes of a run that never failed, and nothing else."""
    disk = mount_tmpfs("disk", "size=2m")
    output = disk / "out"
    args = ("slice", elastic_checkpoint, "--budget", "large", "--max-shard-size", "300KB", "--output")
    assert_one_error(fork_server.run(*args, output, timeout_s=ERROR_TIMEOUT_S), "no space left")

    grown = subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], capture_output=True, text=True)
    if grown.returncode != 0:
        pytest.skip(f"cannot grow the tmpfs: {grown.stderr.strip()}")
    rerun = fork_server.run(*args, output)
    undisturbed = fork_server.run(*args, tmp_path / "undisturbed")

    assert rerun.exit_code == 0, f"the run after freeing space failed:\n{rerun.stderr}"
    assert undisturbed.exit_code == 0, f"the slice on a roomy disk failed:\n{undisturbed.stderr}"
    assert hidden_leftovers(output) == [], f"the rerun left {hidden_leftovers(output)} beside the output"
    assert tree_digests(output) == tree_digests(tmp_path / "undisturbed"), "the rerun wrote other bytes"


def test_no_free_inodes_fails_cleanly(fork_server, elastic_checkpoint, mount_tmpfs):
    # Three inodes: the mount's root, the temporary folder and the first budget folder.
    disk = mount_tmpfs("disk", "size=8m,nr_inodes=3")
    output = disk / "out"

    result = fork_server.run("slice", elastic_checkpoint, "--budget", "all", "--output", output, timeout_s=ERROR_TIMEOUT_S)

    assert_one_error(result, "no space left")
    assert sorted(path.name for path in disk.iterdir()) == [], "the failed run left files on the full disk"


def test_read_only_disk_fails_cleanly(fork_server, elastic_checkpoint, mount_tmpfs):
    disk = mount_tmpfs("disk", "size=8m")
    remount = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
    if remount.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only: {remount.stderr.strip()}")
    output = disk / "out"

    result = fork_server.run("slice", elastic_checkpoint, "--budget", "small", "--output", output, timeout_s=ERROR_TIMEOUT_S)

    line = assert_one_error(result, str(disk), "not writable")
    assert f"/.{output.name}." not in line, f"the error names a temporary folder: {line}"
    assert sorted(path.name for path in disk.iterdir()) == [], "the failed run wrote to the read-only disk"


# ---------------------------------------------------------------------------------------------
# Hostile inputs (tests/test_bad_inputs.py covers the rest: truncations, header lengths past
# the end of the file, invalid JSON, index and shard disagreements, masks of the wrong length)


def shard_paths(checkpoint: Path) -> list[Path]:
    weight_map = json.loads((checkpoint / INDEX).read_text())["weight_map"]
    return [checkpoint / name for name in sorted(set(weight_map.values()))]


def rewrite_header(shard: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Replace a shard's JSON header, keeping its data area.

    ``edit`` changes the header in place (returning None), returns a new JSON value, or
    returns raw header bytes.
    """
    data = shard.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    replaced = edit(header)
    if isinstance(replaced, bytes):
        body = replaced
    else:
        body = json.dumps(header if replaced is None else replaced).encode()
    body += b" " * (-(8 + len(body)) % 8)
    shard.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + length :])


def first_entry(header: dict[str, Any]) -> dict[str, Any]:
    return header[next(name for name in header if name != "__metadata__")]


def set_first_entry(field: str, value: Any) -> Callable[[Path], None]:
    return lambda checkpoint: rewrite_header(shard_paths(checkpoint)[0], lambda header: first_entry(header).__setitem__(field, value))


def alias_two_tensors(header: dict[str, Any]) -> None:
    """Point a tensor at the bytes of an earlier tensor of the same dtype and shape."""
    entries = [entry for name, entry in header.items() if name != "__metadata__"]
    for index, entry in enumerate(entries):
        twin = next((e for e in entries[:index] if (e["dtype"], e["shape"]) == (entry["dtype"], entry["shape"])), None)
        if twin is not None:
            entry["data_offsets"] = list(twin["data_offsets"])
            return
    raise AssertionError("the shard has no two tensors of the same dtype and shape")


def add_empty_tensor(name: str) -> Callable[[Path], None]:
    """Add a zero-size tensor called ``name`` to the first shard and to the index."""

    def damage(checkpoint: Path) -> None:
        shard = shard_paths(checkpoint)[0]
        entry = {"dtype": "BF16", "shape": [0], "data_offsets": [0, 0]}
        rewrite_header(shard, lambda header: header.__setitem__(name, entry))
        edit_json(checkpoint / INDEX, lambda index: index["weight_map"].__setitem__(name, shard.name))

    return damage


def edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    document = json.loads(path.read_text())
    replaced = edit(document)
    path.write_text(json.dumps(document if replaced is None else replaced))


def small_masks(document: dict[str, Any]) -> dict[str, Any]:
    return next(entry for entry in document["budgets"] if entry["name"] == "small")["masks"]


def contradicting_block_types(config: dict[str, Any]) -> None:
    """Give the config a valid ``layers_block_type`` that disagrees with its pattern in two layers."""
    _, kinds = read_layer_kinds(config)
    names = [KIND_TO_NATIVE[kind] for kind in kinds]
    names[0], names[1] = names[1], names[0]
    assert names != [KIND_TO_NATIVE[kind] for kind in kinds], "swapping layers 0 and 1 must change the list"
    config["layers_block_type"] = names


XFAIL_TYPE_ERROR_DTYPE = "safetensors_io._parse_entry tests `dtype not in DTYPE_SIZES` on a JSON list: TypeError"
XFAIL_JSON_VALUE_ERROR = "read_header catches only JSONDecodeError, but json.loads raises ValueError"


HOSTILE_CASES = [
    # (id, damage, texts the error must contain, xfail reason)
    ("header-json-array", lambda c: rewrite_header(shard_paths(c)[0], lambda h: [1, 2, 3]), ["not a JSON object"], None),
    ("offsets-negative", set_first_entry("data_offsets", [-8, 0]), ["invalid data offsets"], None),
    ("offsets-float", set_first_entry("data_offsets", [0.0, 8.5]), ["invalid data offsets"], None),
    ("offsets-string", set_first_entry("data_offsets", ["0", "8"]), ["invalid data offsets"], None),
    (
        "offsets-overlapping",
        lambda c: rewrite_header(shard_paths(c)[0], alias_two_tensors),
        ["offsets"],
        "read_header accepts two tensors sharing bytes (and gaps between tensors); the safetensors "
        "format and its reference reader require the tensors to tile the data area exactly",
    ),
    ("dtype-unknown", set_first_entry("dtype", "F4"), ["dtype 'F4'"], None),
    ("dtype-list", set_first_entry("dtype", ["BF16"]), ["dtype"], XFAIL_TYPE_ERROR_DTYPE),
    ("shape-negative", set_first_entry("shape", [-1, 4]), ["invalid shape"], None),
    ("shape-float", set_first_entry("shape", [2.5, 4]), ["invalid shape"], None),
    (
        "header-int-5000-digits",
        lambda c: rewrite_header(shard_paths(c)[0], lambda h: b'{"t": {"data_offsets": [0, ' + b"9" * 5000 + b"]}}"),
        ["corrupted header"],
        XFAIL_JSON_VALUE_ERROR + " (int above 4300 digits)",
    ),
    (
        "header-json-nested-100000-deep",
        lambda c: rewrite_header(shard_paths(c)[0], lambda h: b"[" * 100_000 + b"]" * 100_000),
        ["corrupted header"],
        "read_header catches only JSONDecodeError, but deeply nested JSON raises RecursionError",
    ),
    (
        "tensor-name-superscript-digit",
        add_empty_tensor("backbone.layers.\u00b2.extra"),
        ["backbone.layers.\u00b2.extra"],
        "natural_key() calls int() on every part for which str.isdigit() is true; '\u00b2' is such a "
        "part and int('\u00b2') raises ValueError",
    ),
    (
        "config-both-dialects-disagree",
        lambda c: edit_json(c / "config.json", contradicting_block_types),
        ["hybrid_override_pattern", "layers_block_type"],
        None,
    ),
    (
        "config-block-type-list-entries",
        lambda c: edit_json(c / "config.json", lambda d: d.__setitem__("layers_block_type", [["moe"]] * 10)),
        ["layers_block_type"],
        "read_layer_kinds tests `name not in NATIVE_NAMES` on list entries: TypeError",
    ),
    (
        "config-not-utf8",
        lambda c: (c / "config.json").write_bytes(b'{"hidden_size": "\xff"}'),
        ["config.json"],
        "read_json catches OSError and JSONDecodeError but not the UnicodeDecodeError of read_text",
    ),
    (
        "config-hidden-size-2**64",
        lambda c: edit_json(c / "config.json", lambda d: d.__setitem__("hidden_size", 2**64)),
        ["hidden_size"],
        "parse_config accepts any positive hidden_size; masks._full() then builds a tuple of that "
        "length: OverflowError here, MemoryError for 2**40",
    ),
    (
        "mask-number",
        lambda c: edit_json(c / MASKS_FILE, lambda d: small_masks(d)["per_layer"]["1"].__setitem__("experts", 10110011)),
        ["'small'", "'experts'", "string of '0' and '1'"],
        None,
    ),
    (
        "mask-list-of-bools",
        lambda c: edit_json(c / MASKS_FILE, lambda d: small_masks(d)["per_layer"]["1"].__setitem__("experts", [True] * 8)),
        ["'small'", "'experts'", "string of '0' and '1'"],
        None,
    ),
    (
        "mask-layer-key-superscript-digit",
        lambda c: edit_json(c / MASKS_FILE, lambda d: small_masks(d)["per_layer"].__setitem__("\u00b2", {})),
        ["'small'", "layer key"],
        "_parse_budget_masks tests key.isdigit() and then calls int(key), which raises ValueError for '\u00b2'",
    ),
]


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        pytest.param(damage, expected, id=case_id, marks=[])
        for case_id, damage, expected, reason in HOSTILE_CASES
    ],
)
def test_hostile_input_one_error(fork_server, copy_checkpoint, tmp_path, damage, expected):
    damage(copy_checkpoint)
    output = tmp_path / "out"

    result = fork_server.run("slice", copy_checkpoint, "--budget", "small", "--output", output, timeout_s=ERROR_TIMEOUT_S)

    assert_one_error(result, *expected)
    assert_no_output(output)


def test_shard_fifo_does_not_hang(fork_server, copy_checkpoint, tmp_path):
    shard = shard_paths(copy_checkpoint)[1]
    shard.unlink()
    os.mkfifo(shard)
    output = tmp_path / "out"

    # A run that only has to fail takes well under a second, so 3 s separates a hang from it.
    result = fork_server.run("slice", copy_checkpoint, "--budget", "small", "--output", output, timeout_s=3)

    assert_one_error(result, shard.name)
    assert_no_output(output)


def test_budget_name_with_path_separator(fork_server, copy_checkpoint, tmp_path):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    output = workspace / "out"
    edit_json(
        copy_checkpoint / MASKS_FILE,
        lambda d: next(entry for entry in d["budgets"] if entry["name"] == "small").__setitem__("name", "../x"),
    )

    result = fork_server.run("slice", copy_checkpoint, "--budget", "all", "--output", output, timeout_s=ERROR_TIMEOUT_S)

    assert_one_error(result, "'../x'", "budget name")
    assert sorted(path.name for path in workspace.iterdir()) == [], "the run wrote beside the output"
    assert not (tmp_path / "x").exists(), "the run wrote outside the output folder"


@pytest.fixture
def outside_folder(tmp_path: Path) -> Iterator[tuple[Path, bool]]:
    """Return a folder outside the checkpoint and whether reads there update access times.

    The folder is a tmpfs mounted with ``strictatime`` when the test may mount one, so that
    every read of a file in it moves the file's atime.
    """
    folder = tmp_path / "outside"
    folder.mkdir()
    mounted = False
    if shutil.which("mount") is not None:
        command = ["mount", "-t", "tmpfs", "-o", "size=8m,strictatime", "tmpfs", str(folder)]
        mounted = subprocess.run(command, capture_output=True).returncode == 0
    yield folder, mounted
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.parametrize("link", ["shard", "sidecar"])
def test_link_outside_checkpoint_not_read(fork_server, copy_checkpoint, tmp_path, outside_folder, link):
    folder, atime_tracked = outside_folder
    if link == "shard":
        inside = shard_paths(copy_checkpoint)[1]
        target = folder / inside.name
        shutil.copyfile(inside, target)
        inside.unlink()
    else:
        inside = copy_checkpoint / "tokenizer.json"
        target = folder / "secret.json"
        target.write_text('{"secret": true}\n')
    inside.symlink_to(target)
    os.utime(target, (1_000_000, 1_000_000))
    output = tmp_path / "out"

    result = fork_server.run("slice", copy_checkpoint, "--budget", "small", "--output", output, timeout_s=ERROR_TIMEOUT_S)

    assert_one_error(result, inside.name, "outside the checkpoint folder")
    assert_no_output(output)
    if atime_tracked:
        assert target.stat().st_atime == 1_000_000, f"the run read {target}, which lies outside the checkpoint"


# ---------------------------------------------------------------------------------------------
# Numerical faults in quantization (library level, scales given instead of calibrated)


QUANTIZED_WEIGHT = "backbone.layers.0.mixer.in_proj.weight"  # quantized by the all-linears recipe
QUANTIZED_MODULE = QUANTIZED_WEIGHT.removesuffix(".weight")
SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")


@pytest.fixture(scope="module")
def plain_parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint without masks, so NVFP4 needs no block-aligned budgets."""
    folder = tmp_path_factory.mktemp("plain") / "parent"
    folder.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", lambda descriptor: None)
        write_checkpoint(folder, tiny_config(), seed=5)
    return folder


def replace_weight(folder: Path, edit: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """Edit the quantized weight in its shard, keeping dtype and shape, and return the new value."""
    with Checkpoint.open(folder) as checkpoint:
        info = checkpoint.tensors[QUANTIZED_WEIGHT]
        weight = checkpoint.read(QUANTIZED_WEIGHT).clone()
    edit(weight)
    with info.path.open("r+b") as handle:
        handle.seek(info.begin)
        handle.write(weight.contiguous().view(torch.uint8).numpy().tobytes())
    return weight


def quantize_given_scales(folder: Path, output: Path, fmt: str) -> None:
    """Quantize with the all-linears recipe, input amax 1.0 and weight amax from the weights."""
    options = QuantizeOptions(format=fmt, recipe="all-linears")
    source = open_source(str(folder), require_budgets=False)
    try:
        state = QuantizerState(calibration={"samples": 0, "tokens": 0, "budgets": []})
        for decision in plan_for(source, options).decisions:
            if decision.format:
                state.modules[decision.module] = export.ModuleScales(decision.format, 0.0, 1.0)
        quantize_checkpoint(source, options, output, state=state)
    finally:
        source.close()


def read_module(output: Path) -> dict[str, torch.Tensor]:
    with Checkpoint.open(output) as checkpoint:
        return {name: checkpoint.read(name) for name in checkpoint.tensors if name.startswith(QUANTIZED_MODULE + ".")}


def assert_no_nan_or_bad_scale(output: Path) -> None:
    """Check every E4M3 byte of the output is finite and every scale is finite and positive."""
    with Checkpoint.open(output) as checkpoint:
        for name, info in checkpoint.tensors.items():
            if info.dtype == "F8_E4M3":
                raw = torch.frombuffer(checkpoint.read_bytes(name), dtype=torch.uint8)
                nan_bytes = int(((raw & 0x7F) == 0x7F).sum())
                assert nan_bytes == 0, f"{name} holds {nan_bytes} E4M3 NaN byte(s)"
            if name.endswith(SCALE_SUFFIXES) and info.dtype == "F32":
                value = checkpoint.read(name)
                assert bool(torch.isfinite(value).all()), f"{name} is not finite: {value}"
                assert bool((value > 0).all()), f"{name} is not positive: {value}"
            if name.endswith("weight_scale") and info.dtype == "F8_E4M3":
                value = checkpoint.read(name).float()
                assert bool((value > 0).all()), f"{name} has block scales that are not positive"


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize(("value", "count"), [(float("nan"), "1 NaN and 0 Inf"), (float("inf"), "0 NaN and 1 Inf")], ids=["nan", "inf"])
def test_non_finite_weight_rejected(plain_parent, tmp_path, fmt, value, count):
    folder = Path(shutil.copytree(plain_parent, tmp_path / "parent"))
    replace_weight(folder, lambda weight: weight.__setitem__((3, 5), value))
    output = tmp_path / "q"

    with pytest.raises(CheckpointError, match=QUANTIZED_WEIGHT.replace(".", r"\.")) as raised:
        quantize_given_scales(folder, output, fmt)

    assert count in str(raised.value), f"the error does not count {count}: {raised.value}"
    assert_no_output(output)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_all_zero_weight_finite_scales(plain_parent, tmp_path, fmt):
    folder = Path(shutil.copytree(plain_parent, tmp_path / "parent"))
    replace_weight(folder, lambda weight: weight.zero_())
    output = tmp_path / "q"

    quantize_given_scales(folder, output, fmt)

    assert_no_nan_or_bad_scale(output)
    tensors = read_module(output)
    packed = tensors[QUANTIZED_WEIGHT].view(torch.uint8)
    assert int(packed.count_nonzero()) == 0, "an all-zero weight gave nonzero codes"
    scale_name = "weight_scale_2" if fmt == "nvfp4" else "weight_scale"  # the per-tensor scale
    global_scale = tensors[f"{QUANTIZED_MODULE}.{scale_name}"]
    assert float(global_scale) == 1.0, f"an all-zero weight got scale {float(global_scale)}, expected 1.0"
    if fmt == "nvfp4":
        block_scales = tensors[f"{QUANTIZED_MODULE}.weight_scale"].float()
        assert bool((block_scales == 1.0).all()), "all-zero blocks did not get block scale 1.0"


def test_all_zero_blocks_nvfp4(plain_parent, tmp_path):
    folder = Path(shutil.copytree(plain_parent, tmp_path / "parent"))
    weight = replace_weight(folder, lambda weight: weight[:, 16:48].zero_())  # blocks 1 and 2 of every row
    output = tmp_path / "q"

    quantize_given_scales(folder, output, "nvfp4")

    assert_no_nan_or_bad_scale(output)
    tensors = read_module(output)
    block_scales = tensors[f"{QUANTIZED_MODULE}.weight_scale"].float()
    assert bool((block_scales[:, 1:3] == 1.0).all()), "all-zero blocks did not get block scale 1.0"
    assert bool((block_scales[:, 0] != 1.0).any()), "nonzero blocks got the empty-block scale everywhere"
    packed = tensors[QUANTIZED_WEIGHT]
    assert int(packed[:, 8:24].count_nonzero()) == 0, "all-zero blocks gave nonzero codes"
    restored = export.dequantize_module(tensors, QUANTIZED_MODULE, "nvfp4", torch.float32)
    assert bool(torch.isfinite(restored).all()), "the dequantized weight is not finite"
    assert bool((restored[:, 16:48] == 0).all()), "all-zero blocks do not dequantize to zero"
    assert weight[:, :16].abs().amax() > 0, "the first block must stay nonzero for this test"


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_denormal_weight_rejected(plain_parent, tmp_path, fmt):
    """A weight whose every value is subnormal (1e-40 in bf16) gives a scale below the smallest
    normal float32, which elastic rejects naming the tensor."""
    folder = Path(shutil.copytree(plain_parent, tmp_path / "parent"))
    weight = replace_weight(folder, lambda weight: weight.fill_(1e-40))
    assert 0 < float(weight[0, 0]) < torch.finfo(torch.bfloat16).tiny, "1e-40 must be subnormal in bf16"
    output = tmp_path / "q"

    with pytest.raises(ElasticError, match=QUANTIZED_WEIGHT.replace(".", r"\.")) as raised:
        quantize_given_scales(folder, output, fmt)

    assert "too small" in str(raised.value), f"the error does not say the amax is too small: {raised.value}"
    assert_no_output(output)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_denormal_elements_quantize_to_zero(plain_parent, tmp_path, fmt):
    folder = Path(shutil.copytree(plain_parent, tmp_path / "parent"))
    weight = replace_weight(folder, lambda weight: weight[0, :16].fill_(1e-40))
    output = tmp_path / "q"

    quantize_given_scales(folder, output, fmt)

    assert_no_nan_or_bad_scale(output)
    restored = export.dequantize_module(read_module(output), QUANTIZED_MODULE, fmt, torch.float32)
    assert bool(torch.isfinite(restored).all()), "the dequantized weight is not finite"
    assert bool((restored[0, :16] == 0).all()), "subnormal elements did not quantize to zero"
    assert float(weight.float().abs().amax()) > 1e-3, "the rest of the weight must stay normal"


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_values_beyond_fp8_range(plain_parent, tmp_path, fmt):
    folder = Path(shutil.copytree(plain_parent, tmp_path / "parent"))
    weight = replace_weight(folder, lambda weight: weight.__setitem__((2, 7), 1e6))
    amax = torch.tensor(float(weight.float().abs().amax()), dtype=torch.float32)
    assert float(amax) > 448 * 1000, "the weight must exceed the E4M3 range by far"
    output = tmp_path / "q"

    quantize_given_scales(folder, output, fmt)

    assert_no_nan_or_bad_scale(output)
    tensors = read_module(output)
    if fmt == "fp8":
        scale = tensors[f"{QUANTIZED_MODULE}.weight_scale"]
        assert torch.equal(scale, amax / 448), f"FP8 scale {float(scale)}, expected amax / 448 = {float(amax / 448)}"
        assert float(tensors[QUANTIZED_WEIGHT][2, 7].float()) == 448.0, "the largest value does not map to 448"
    else:
        scale = tensors[f"{QUANTIZED_MODULE}.weight_scale_2"]
        assert torch.equal(scale, amax / 2688), f"NVFP4 global scale {float(scale)}, expected amax / 2688"
    restored = export.dequantize_module(tensors, QUANTIZED_MODULE, fmt, torch.float32)
    assert float(restored[2, 7]) == pytest.approx(float(amax), rel=1e-6), "the largest value does not round-trip"


# ---------------------------------------------------------------------------------------------
# Memory cap


VMPEAK_PROBE = """
import runpy, sys
sys.argv = ["elastic", "--version"]
try:
    runpy.run_module("elastic_cli", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print(open("/proc/self/status").read())
"""


def read_status(text: str, field: str) -> int:
    line = next(line for line in text.splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def limit_memory(limit: int, cap: int) -> Callable[[], None]:
    """Return a ``preexec_fn`` that caps one memory resource of the child at ``cap`` bytes."""
    return lambda: resource.setrlimit(limit, (cap, cap))


@pytest.mark.slow
def test_slice_under_memory_cap(fork_server, ram_disk, tmp_path):
    work = ram_disk / "memory"
    work.mkdir()
    probe = subprocess.Popen(
        [sys.executable, "-c", VMPEAK_PROBE], cwd=tmp_path, env=cli_environment(tmp_path), stdout=subprocess.PIPE, text=True
    )
    folder = work / "parent"
    folder.mkdir()
    config = tiny_config(hidden_size=1024, n_routed_experts=16, moe_intermediate_size=1152)
    budgets = importance_budgets(parse_config(config), BUDGET_FRACTIONS, seed=2, block=16)
    write_pooled_checkpoint(folder, config, budgets, max_shard_bytes=50_000_000)
    size = sum(path.stat().st_size for path in folder.iterdir())
    assert 300e6 < size < 600e6, f"the checkpoint has {size / 1e6:.0f} MB, outside the intended 300-600 MB"
    status, _ = probe.communicate(timeout=FRESH_START_TIMEOUT_S)
    assert probe.returncode == 0, "python -m elastic_cli --version failed"

    # The cap is what the started command already maps, plus a quarter of the checkpoint. Slicing never
    # imports torch, so that is less than the checkpoint itself.
    cap = read_status(status, "VmPeak") + size // 4
    assert cap < size, f"the cap of {cap / 1e6:.0f} MB is not below the {size / 1e6:.0f} MB checkpoint"
    # The largest budget keeps every tensor whole, so all of the checkpoint passes through the process.
    args = ["slice", folder, "--budget", "large", "--output"]
    capped = start_fresh([*args, work / "capped"], tmp_path, preexec_fn=limit_memory(resource.RLIMIT_AS, cap))
    uncapped = fork_server.run(*args, work / "uncapped")
    _, stderr = capped.communicate(timeout=SLICE_TIMEOUT_S)
    assert uncapped.exit_code == 0, f"the uncapped slice failed:\n{uncapped.stderr}"
    assert capped.returncode == 0, f"the slice failed under RLIMIT_AS = {cap / 1e6:.0f} MB:\n{stderr}"

    assert_manifest_matches(work / "capped")
    assert tree_digests(work / "capped") == tree_digests(work / "uncapped"), "the output under the cap differs from the uncapped run"
    shutil.rmtree(work)

