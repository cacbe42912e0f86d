"""The ``cscr`` command. Each subcommand lives in ``cscr/commands/<name>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``.

Bad input ends with one line ``cscr: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ["prepare", "evaluate", "train", "quickstart", "fingerprint", "label", "sweep",
            "experiment", "report", "serve"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cscr", description="Cost-Spectrum Contrastive Routing")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"cscr.cli.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"cscr.cli.commands.{name}":
                continue  # not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    from cscr.errors import USER_ERRORS

    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"cscr: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
