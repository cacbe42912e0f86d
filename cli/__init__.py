"""The ``cscr`` command: the application layer over the library (cscr), the jobs (cscr.jobs) and
serving (cscr.serve). Each subcommand lives in ``cli/commands/<name>.py`` (``cscr.cli.commands``)
and exposes ``register(subparsers)``, which adds its parser and sets ``func(args) -> int``; the
function builds a frozen config and calls the library or a job's ``run(cfg)``.

Only the subcommand being run is imported (``cscr --help`` imports none of them, nor ray or
torch): the top-level listing comes from ``COMMANDS``. Global options: ``-v``/``--verbose`` and
``--log-level`` (cscr.jobs.cluster: Ray, Train, Tune and Data are quiet unless asked).

Bad input ends with one line ``cscr: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Iterable

from cscr.jobs.cluster import add_logging_options, set_log_level

# name -> one-line summary (the module's own ``help=``; tests/test_cli.py checks they agree)
COMMANDS: dict[str, str] = {
    "prepare": "build a run's routing table, splits and prompt embeddings",
    "evaluate": "evaluate routers on a run's test split (AUDC, QNC, peak)",
    "calibrate": "operating points of a run's router: cost and quality per knob value (table + plot)",
    "route": "route one prompt offline: ranked experts at a budget, quality target or cost weight",
    "train": "train the CSCR head (Ray Train, or --plain)",
    "guard": "choose and attach the out-of-distribution guard of a trained head (nested leave-one-group-out)",
    "quickstart": "RouterBench end to end: prepare, descriptors, train, evaluate",
    "fingerprint": "compute expert descriptors (logit / perplexity) for a pool",
    "label": "run a live pool on prompts with answers and write a routing table",
    "sweep": "Ray Tune ablation sweep (bands, k, gamma, alpha, tau_min, width, descriptor)",
    "experiment": "generalisation experiments: unseen-experts, ood",
    "report": "build the markdown report over all runs",
    "serve": "serve the router and the pool over an OpenAI-compatible API",
}


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``cscr`` parser with ``commands`` registered in full (None: all of them, which imports
    every command module); the others get a placeholder that only lists them."""
    full = set(COMMANDS) if commands is None else set(commands)
    parser = argparse.ArgumentParser(
        prog="cscr", description="Cost-Spectrum Contrastive Routing: send each prompt to the cheapest LLM "
        "that will answer it well. `cscr COMMAND --help` describes each command.")
    add_logging_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, summary in COMMANDS.items():
        if name in full:
            importlib.import_module(f"cscr.cli.commands.{name}").register(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def command_in(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not a global option)."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "HF_HUB_OFFLINE" not in os.environ:  # our default, not the user's: data downloads stay allowed
        os.environ.update(HF_HUB_OFFLINE="1", CSCR_HUB_OFFLINE_DEFAULT="1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    name = command_in(argv)
    parser = build_parser([name] if name in COMMANDS else [])
    args = parser.parse_args(argv)
    level = set_log_level(args.log_level, args.verbose)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from cscr.errors import USER_ERRORS

    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"cscr: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
