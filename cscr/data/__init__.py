"""Routing tables: one schema (table.py), one loader per source, ``load_dataset(name, cfg)``."""

from cscr.data.registry import known_datasets, load_dataset, register_loader
from cscr.data.table import SPLITS, Expert, RoutingTable, TableError, assign_splits

__all__ = [
    "SPLITS",
    "Expert",
    "RoutingTable",
    "TableError",
    "assign_splits",
    "known_datasets",
    "load_dataset",
    "register_loader",
]
