"""Start the command line: ``python -m elastic_cli`` and the ``elastic`` script."""

import sys

from elastic_cli.errors import is_out_of_memory

_OUT_OF_MEMORY_HINT = "Hint: raise the memory limit (ulimit -v, the cgroup's memory.max) or free memory\n"


def run() -> None:
    """Import and run the command line, reporting a failed start in one line.

    Importing numpy, typer and rich takes a few tenths of a second. The command line's own
    signal and error handling starts only after that, so this function covers the window.
    """
    try:
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
