"""Shared fixtures: a tiny sharded elastic checkpoint and two ways to run the ``elastic`` command.

``run_cli`` starts the real console entry in a subprocess, so exit codes and the split between
stdout and stderr are those of a real run. Each run spends about 4 s importing torch (an
estimate from an idle 2-core machine). ``invoke_cli`` calls the same entry point in-process,
for the many tests that only need the exit code and the text.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Callable, NamedTuple

import pytest

from elastic_cli.arch.nemotron_h import parse_config
from elastic_cli.synthetic import importance_budgets, tiny_config, write_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent
BUDGET_FRACTIONS = [("large", 1.0), ("medium", 0.75), ("small", 0.5)]
# The tiny parent contains about 2.7 MB of tensors, so 1 MB shards give three shards.
MAX_SHARD_BYTES = 1_000_000
SIDECARS = {"generation_config.json": '{"do_sample": false}\n'}
CLI_TIMEOUT_S = 120
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class CliResult(NamedTuple):
    """What one run of the command line returned."""

    exit_code: int
    stdout: str
    stderr: str


CliRunner = Callable[..., CliResult]


@pytest.fixture(scope="session")
def elastic_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the pristine tiny MoE elastic checkpoint once per session. Tests must not modify it."""
    folder = tmp_path_factory.mktemp("pristine") / "parent"
    folder.mkdir()
    config = tiny_config()
    budgets = importance_budgets(parse_config(config), BUDGET_FRACTIONS, seed=0)
    write_checkpoint(folder, config, seed=0, budgets=budgets, max_shard_bytes=MAX_SHARD_BYTES, sidecars=SIDECARS)
    return folder


@pytest.fixture
def copy_checkpoint(elastic_checkpoint: Path, tmp_path: Path) -> Path:
    """Return a fresh copy of the tiny checkpoint at ``tmp_path / "parent"``, free to damage."""
    return Path(shutil.copytree(elastic_checkpoint, tmp_path / "parent"))


@pytest.fixture
def run_cli(tmp_path: Path) -> CliRunner:
    """Return ``run(*args, cwd=None, env=None) -> CliResult`` running ``python -m elastic_cli``.

    The child runs offline (``HF_HUB_OFFLINE=1``) against an empty Hugging Face cache in
    ``tmp_path`` unless ``env`` overrides those variables, so no test reaches the network or
    the user's cache.
    """
    empty_cache = tmp_path / "empty-hf-cache"

    def run(*args: object, cwd: Path | None = None, env: dict[str, str] | None = None) -> CliResult:
        child_env = {key: value for key, value in os.environ.items() if key not in ("ELASTIC_DEBUG", "FORCE_COLOR")}
        child_env.update(
            {
                "HF_HUB_OFFLINE": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HOME": str(tmp_path / "hf-home"),
                "HF_HUB_CACHE": str(empty_cache),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            }
        )
        child_env.update(env or {})
        completed = subprocess.run(
            [sys.executable, "-m", "elastic_cli", *map(str, args)],
            cwd=cwd or tmp_path,
            env=child_env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
        )
        return CliResult(completed.returncode, completed.stdout, completed.stderr)

    return run


@pytest.fixture
def invoke_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    """Return ``invoke(*args, cwd=None) -> CliResult`` calling ``elastic_cli.cli.main`` in-process.

    An exception that escapes ``main`` is printed as a traceback on the captured stderr with
    exit code 1, as the interpreter would do, so tests can assert that none escapes. The working
    folder defaults to ``tmp_path``, and ANSI colour codes are stripped from both streams.
    """
    from elastic_cli.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("ELASTIC_DEBUG", raising=False)

    def invoke(*args: object, cwd: Path | None = None) -> CliResult:
        monkeypatch.chdir(cwd or tmp_path)
        monkeypatch.setattr(sys, "argv", ["elastic", *map(str, args)])
        logger = logging.getLogger("elastic_cli")
        saved_logger = (list(logger.handlers), logger.level, logger.propagate)
        saved_sigterm = signal.getsignal(signal.SIGTERM)
        saved_sigint = signal.getsignal(signal.SIGINT)
        stdout, stderr = io.StringIO(), io.StringIO()
        exit_code = 0
        try:
            with redirect_stdout(stdout), redirect_stderr(stderr):
                try:
                    main()
                except SystemExit as exit_:
                    exit_code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
                except Exception:
                    traceback.print_exc()
                    exit_code = 1
        finally:
            signal.signal(signal.SIGTERM, saved_sigterm)
            signal.signal(signal.SIGINT, saved_sigint)
            logger.handlers[:] = saved_logger[0]
            logger.setLevel(saved_logger[1])
            logger.propagate = saved_logger[2]
        return CliResult(exit_code, ANSI_ESCAPE.sub("", stdout.getvalue()), ANSI_ESCAPE.sub("", stderr.getvalue()))

    return invoke
