"""Start the command line: ``python -m elastic_cli`` and the ``elastic`` script."""

import os
import sys

from elastic_cli.errors import is_out_of_memory

_OUT_OF_MEMORY_HINT = "Hint: raise the memory limit (ulimit -v, the cgroup's memory.max) or free memory\n"


def _import_numpy_without_blas_threads() -> None:
    """Import numpy with its OpenBLAS limited to the calling thread.

    At import, numpy's OpenBLAS starts a thread per core that spins for about a tenth of a
    second, taking a core from the work that follows. elastic does no linear algebra with
    numpy, so the threads are never needed. The environment is restored afterwards, so child
    processes and torch see the user's settings.
    """
    if "OPENBLAS_NUM_THREADS" in os.environ:
        import numpy  # noqa: F401
        return
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import numpy  # noqa: F401
    finally:
        del os.environ["OPENBLAS_NUM_THREADS"]


def run() -> None:
    """Import and run the command line, reporting a failed start in one line.

    Importing numpy, typer and rich takes a few tenths of a second. The command line's own
    signal and error handling starts only after that, so this function covers the window.
    """
    try:
        _import_numpy_without_blas_threads()
        from elastic_cli.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted while starting; nothing was written.\n")
        sys.exit(130)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        sys.stderr.write(f"Error: out of memory while starting elastic ({type(error).__name__})\n{_OUT_OF_MEMORY_HINT}")
        sys.exit(1)
    main()


if __name__ == "__main__":
    run()
