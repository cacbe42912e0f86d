"""Routers: one interface (base.py); CSCR and every baseline register behind it.

The built-in router modules are imported on first use of the registry (``get_router``,
``available_routers``), not with this package: importing ``cscr.routers`` stays cheap.
"""

from cscr.routers.base import (
    BUILTIN,
    Router,
    RouterContext,
    RouterError,
    available_routers,
    get_router,
    register,
)

__all__ = ["BUILTIN", "Router", "RouterContext", "RouterError", "available_routers", "get_router", "register"]
