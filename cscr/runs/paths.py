"""The run folder: where every stage of one data set reads and writes.

    runs/<name>/
      table/                 the routing table (cscr.data.table.RoutingTable.save)
      embeddings/            prompt-embedding cache, keyed by prompt id and encoder id
      descriptors.parquet    the descriptor store (every descriptor kind)
      settings.json          what prepare, fingerprint and train were asked for (cscr.runs.settings)
      models/<variant>/      trained heads (head.pt, config.json, history.json), e.g. cscr, vanilla
      eval/                  report.md, metrics.json, metrics.csv, deferral.png
      sweeps/<grid>/         Ray Tune sweeps
      experiments/<name>/    unseen-experts, ood
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class RunError(ValueError):
    """A run folder whose parts do not fit together (e.g. a head and descriptors of another basis)."""


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @staticmethod
    def of(root: str | os.PathLike[str] | RunPaths) -> RunPaths:
        if isinstance(root, RunPaths):
            return root
        return RunPaths(Path(root).expanduser().resolve())

    @property
    def table(self) -> Path:
        return self.root / "table"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def descriptors(self) -> Path:
        return self.root / "descriptors.parquet"

    def model(self, variant: str = "cscr") -> Path:
        return self.root / "models" / variant

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def sweep(self, grid: str) -> Path:
        return self.root / "sweeps" / grid

    def experiment(self, name: str) -> Path:
        return self.root / "experiments" / name

    def require_table(self) -> Path:
        if not (self.table / "manifest.json").exists():
            raise FileNotFoundError(
                f"{self.root} has no routing table: run `cscr prepare --dataset NAME --out {self.root}` first"
            )
        return self.table
