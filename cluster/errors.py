"""CLI-facing errors (own module so `python -m cluster.cli` and `cluster.cli` share the class)."""

EXIT_USAGE = 2


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""
