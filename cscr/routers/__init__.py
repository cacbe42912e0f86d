"""Routers: one interface (base.py); CSCR and every baseline register behind it.

Importing this package imports every built-in router module so that they register.
"""

import importlib

from cscr.routers.base import (
    Router,
    RouterContext,
    RouterError,
    available_routers,
    get_router,
    register,
)

_BUILTIN = ["oracle", "simple", "knn", "cscr", "umr", "thompson", "parametric", "softmax_gate", "soft_moe"]
for _m in _BUILTIN:
    try:
        importlib.import_module(f"cscr.routers.{_m}")
    except ModuleNotFoundError as _exc:  # a router module not built yet
        if _exc.name != f"cscr.routers.{_m}":
            raise

__all__ = ["Router", "RouterContext", "RouterError", "available_routers", "get_router", "register"]
