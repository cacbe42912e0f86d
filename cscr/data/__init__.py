"""Routing tables: one schema (table.py), one loader per source."""

from cscr.data.table import SPLITS, Expert, RoutingTable, TableError, assign_splits

__all__ = ["SPLITS", "Expert", "RoutingTable", "TableError", "assign_splits"]
