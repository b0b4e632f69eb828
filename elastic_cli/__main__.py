"""Allow ``python -m elastic_cli``."""

from elastic_cli.cli import main

if __name__ == "__main__":
    main()
