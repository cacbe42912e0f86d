"""A prepared run folder and its inputs, each loaded once on first use.

``Run.of(path)`` gives the table (``table/``) and the prompt embeddings of its rows
(``embeddings/``, the encoder ``cscr prepare`` used); ``run.descriptors(kind)`` reads the table
experts' descriptors from the store (cscr.runs.descriptors.read_descriptors: reads only).
``load_training_arrays`` turns the three into the training layer's TrainArrays.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np

from cscr.data.table import RoutingTable
from cscr.runs.descriptors import read_descriptors
from cscr.runs.paths import RunPaths
from cscr.training.arrays import TrainArrays, prepare_arrays


class Run:
    """One run folder; ``table`` and ``embeddings`` are read on first use and kept."""

    def __init__(self, root: str | os.PathLike[str] | RunPaths) -> None:
        self.paths = RunPaths.of(root)

    @staticmethod
    def of(run: Run | str | os.PathLike[str] | RunPaths) -> Run:
        return run if isinstance(run, Run) else Run(run)

    @property
    def root(self) -> Path:
        return self.paths.root

    @cached_property
    def table(self) -> RoutingTable:
        return RoutingTable.load(self.paths.require_table())

    @cached_property
    def embeddings(self) -> np.ndarray:
        """(n, d) float32, aligned with the table rows (clear error when the run has none)."""
        from cscr.encoder import load_run_embeddings

        return load_run_embeddings(self.paths.root)

    @property
    def encoder_id(self) -> str | None:
        """The encoder the run's prompt embeddings were made with (None when not embedded)."""
        manifest = self.paths.embeddings / "manifest.json"
        return json.loads(manifest.read_text()).get("encoder_id") if manifest.exists() else None

    def descriptors(self, kind: str | None = None, basis_id: str | None = None) -> tuple[dict[str, np.ndarray], str, str]:
        """(descriptors of the table's experts in table order, kind, basis id); reads only."""
        return read_descriptors(self.paths, self.table.expert_names, kind, basis_id)

    def trained_descriptors(self) -> tuple[dict[str, np.ndarray], str, str]:
        """``descriptors`` of the kind the run was last trained with (as ``cscr train`` reads it;
        the default kind for a run never trained)."""
        from cscr.runs.settings import recorded_training

        recorded = recorded_training(self.paths)
        return self.descriptors(recorded.descriptor_kind if recorded else None)

    def train_costs(self) -> dict[str, float]:
        """{expert: c_m}: mean train cost over the largest, the costs every router is scored with."""
        t = self.table
        return dict(zip(t.expert_names, t.expert_costs(t.split_index("train")).tolist(), strict=True))


def load_training_arrays(run: Run | str | os.PathLike[str] | RunPaths, tolerance: float = 0.0,
                         kind: str | None = None) -> TrainArrays:
    """TrainArrays from a prepared run folder (table, embeddings, descriptors of ``kind``).

    Reads only: take the descriptor step first (cscr.runs.descriptors.prepare_descriptors).
    """
    run = Run.of(run)
    desc, kind, basis = run.descriptors(kind)
    arrays = prepare_arrays(run.table, run.embeddings, desc, tolerance, kind, basis)
    arrays.meta["run_dir"] = str(run.root)
    return arrays
