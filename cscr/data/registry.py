"""The loader registry: ``load_dataset(name, cfg)`` for every source."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from cscr.config import DataConfig
from cscr.data.table import RoutingTable, TableError

Loader = Callable[..., RoutingTable]

# name -> module that registers it (imported on first use: no import-time cost for the others)
_MODULES = {
    "routerbench": "cscr.data.routerbench",
    "llmrouter": "cscr.data.llmrouter",
    "routellm": "cscr.data.routellm",
    "embedllm": "cscr.data.embedllm",
    "mixinstruct": "cscr.data.mixinstruct",
    "generic": "cscr.data.generic",
    "routerarena": "cscr.data.routerarena",
}
_LOADERS: dict[str, Loader] = {}


def register_loader(name: str) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        _LOADERS[name] = fn
        return fn

    return deco


def known_datasets() -> list[str]:
    return sorted(set(_MODULES) | set(_LOADERS))


def load_dataset(name: str, cfg: DataConfig | None = None, **options: Any) -> RoutingTable:
    """Build the routing table of data set ``name`` from ``cfg.data_dir`` (None: the loader's
    Hub download). ``options`` are loader-specific (e.g. routellm ``subset="mmlu"``); an
    unknown option is refused with a clear error."""
    if name not in _LOADERS:
        if name not in _MODULES:
            raise TableError(f"unknown data set {name!r}; known: {', '.join(known_datasets())}")
        importlib.import_module(_MODULES[name])
    cfg = cfg if cfg is not None else DataConfig(dataset=name)
    return _LOADERS[name](cfg, **options)
