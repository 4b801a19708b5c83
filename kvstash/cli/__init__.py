"""The ``kvstash`` command line: one module per subcommand, shared arguments in :mod:`kvstash.cli.args`."""

from kvstash.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
