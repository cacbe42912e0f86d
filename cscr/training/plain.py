"""``train_run``: train a run folder's head with the plain loop (no Ray) and save the best epoch.

Kept apart from the package's ``__init__`` because it reads and writes run folders (the run
layer imports cscr.training.arrays, and this module imports the run layer: one direction).
"""

from __future__ import annotations

from cscr.config import TrainConfig
from cscr.prior_run import after_training
from cscr.runs.descriptors import prepare_descriptors
from cscr.runs.heads import save_trained
from cscr.runs.inputs import load_training_arrays
from cscr.training.fit import fit_head, stderr_log
from cscr.training.loop import Log, TrainResult


def train_run(run_dir: str, variant: str = "cscr", cfg: TrainConfig | None = None,
              descriptor_kind: str | None = None, log: Log | None = stderr_log) -> TrainResult:
    """Load the run's table, embeddings and descriptors, train with the plain loop, save the head."""
    cfg = cfg or TrainConfig()
    kind = prepare_descriptors(run_dir, descriptor_kind, log=log)  # probe-outcome: computed and stored
    arrays = load_training_arrays(run_dir, cfg.loss.tolerance, kind)
    if log:
        log(f"train[{variant}]: {arrays.n} train prompts ({arrays.meta.get('n_train_with_positive', arrays.n)} with a positive), "
            f"{arrays.val_x.shape[0]} val prompts, "
            f"{len(arrays.expert_names)} experts, {arrays.meta['descriptor_kind']} descriptors "
            f"(D' = {arrays.descriptors.shape[1]}), plain loop")
    result = fit_head(arrays, cfg, variant, log=log)
    path = save_trained(run_dir, result)
    if log:
        log(f"train[{variant}]: best epoch {result.best_epoch} (val AUDC {result.best_val_audc}); saved {path}")
    after_training(run_dir, variant, log)  # its category prior, then its operating points (issue 11)
    return result
