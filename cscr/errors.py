"""Errors that mean "bad input" (the CLI prints them as one line and exits 2)."""

from __future__ import annotations

from cscr.config import ConfigError
from cscr.data.table import TableError
from cscr.routers.base import RouterError


class InputError(ValueError):
    """Bad user input not covered by a more specific error."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, TableError, RouterError, InputError, FileNotFoundError, KeyError, ValueError,
)
