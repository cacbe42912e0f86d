"""Subcommands of the ``cscr`` CLI, one module each (see cscr/cli.py)."""
