"""The ``elastic`` command line: thin commands over the library, errors as one line."""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated

import typer
from rich.markup import escape

from elastic_cli import __version__
from elastic_cli.cli.inspect_cmd import inspect
from elastic_cli.cli.options import Quiet, Verbose
from elastic_cli.cli.output import configure_logging, stderr
from elastic_cli.cli.push_cmd import push
from elastic_cli.cli.quantize_cmd import quantize
from elastic_cli.cli.slice_cmd import slice_
from elastic_cli.cli.verify_cmd import verify
from elastic_cli.checkpoint.resume import commit_started
from elastic_cli.errors import ElasticError, is_out_of_memory

app = typer.Typer(
    name="elastic",
    help="Inspect, slice, quantize and verify NVIDIA elastic (nested) NemotronH checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("inspect")(inspect)
app.command("slice")(slice_)
app.command("quantize")(quantize)
app.command("verify")(verify)
app.command("push")(push)


def _version(value: bool) -> None:
    if value:
        print(f"elastic {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    verbose: Verbose = 0,
    quiet: Quiet = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    configure_logging(verbose, quiet)


class _Terminated(BaseException):
    """Raised inside the process on SIGTERM so that cleanup code runs as for Ctrl-C."""


class _Interrupted(BaseException):
    """Raised on SIGINT instead of KeyboardInterrupt, which click would turn into a silent exit."""


def _on_sigterm(signum: int, frame: object) -> None:
    if not commit_started():
        raise _Terminated()


def _on_sigint(signum: int, frame: object) -> None:
    # Once the finished output is being moved into place, the run has done its work: it
    # finishes and exits 0 rather than report that nothing was written.
    if not commit_started():
        raise _Interrupted()


def _ignore_late_signals() -> None:
    """Ignore SIGINT and SIGTERM once the command has done its work.

    At exit Python puts the default action back for signals that have Python handlers, so a
    signal in the last milliseconds would otherwise kill the process and hide its exit code.
    Python leaves ignored signals ignored.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def main() -> None:
    """Run the command line; expected failures print one ``Error:`` line and exit non-zero."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigint)
    configure_logging(0, False)
    try:
        result = app(standalone_mode=False)
        _ignore_late_signals()
        # Without standalone mode, click returns the code of a raised typer.Exit instead of exiting.
        if isinstance(result, int) and result:
            sys.exit(result)
    except ElasticError as error:
        if os.environ.get("ELASTIC_DEBUG") == "1":
            raise
        stderr.print(f"[red]Error:[/red] {escape(error.message)}", highlight=False)
        if error.hint:
            stderr.print(f"Hint: {escape(error.hint)}", highlight=False)
        sys.exit(error.exit_code)
    except (MemoryError, OSError, RuntimeError, ImportError) as error:
        if os.environ.get("ELASTIC_DEBUG") == "1" or not is_out_of_memory(error):
            raise
        detail = f": {error}" if isinstance(error, MemoryError) and str(error) else ""
        stderr.print(f"[red]Error:[/red] out of memory{escape(detail)}; nothing was left half-written", highlight=False)
        stderr.print(
            "Hint: raise the memory limit (ulimit -v, the cgroup's memory.max) or free memory; "
            "elastic needs about its largest tensor plus 0.1 GB to slice, or plus 0.7 GB to quantize",
            highlight=False,
        )
        sys.exit(1)
    except (KeyboardInterrupt, _Interrupted):
        stderr.print("Interrupted; nothing was left half-written.", highlight=False)
        sys.exit(130)
    except _Terminated:
        stderr.print("Terminated; nothing was left half-written.", highlight=False)
        sys.exit(143)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as error:
        # Usage errors from option parsing (unknown option, invalid value): usage line, exit 2.
        show = getattr(error, "show", None)
        if show is None:
            raise
        show()
        sys.exit(getattr(error, "exit_code", 2))
