"""Training the routing head (SPEC.md section 4).

* arrays.py: ``TrainArrays`` / ``prepare_arrays``: the inputs as plain numpy arrays;
* loop.py: the steps (``init_training``, ``epoch_batches``, ``train_epoch``, ``record_epoch``,
  ``TrainState`` checkpoints) and ``run_epochs``, the one epoch loop, whose validation is passed
  in as a callable;
* validation.py: the default validator (AUDC of the CSCR router on the validation prompts);
* fit.py: ``fit_head``, the loop in one process;
* search.py: the search space and choice of ``cscr train --tune`` (pure; jobs/sweep.py runs it);
* plain.py: ``train_run``, a run folder trained with ``fit_head`` and saved (imported from there:
  it reads and writes run folders).

jobs/train.py runs the same ``run_epochs`` on Ray Train workers. Importing this package loads
arrays.py and loop.py only; ``fit_head`` and the validators (which build a CSCR router) load on
first use, so the run layer can import the training types without loading the routers.
"""

from typing import TYPE_CHECKING, Any

from cscr.training.arrays import TrainArrays, prepare_arrays
from cscr.training.loop import (
    VARIANTS,
    Log,
    Tensors,
    TrainResult,
    TrainState,
    Validator,
    epoch_batches,
    epoch_line,
    head_for,
    init_training,
    record_epoch,
    result_from_state,
    run_epochs,
    train_epoch,
    variant_config,
)

if TYPE_CHECKING:
    from cscr.training.fit import fit_head
    from cscr.training.validation import audc_validator, validation_audc

_LAZY = {"fit_head": "cscr.training.fit", "audc_validator": "cscr.training.validation",
         "validation_audc": "cscr.training.validation"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "VARIANTS", "Log", "Tensors", "TrainArrays", "TrainResult", "TrainState", "Validator", "audc_validator",
    "epoch_batches", "epoch_line", "fit_head", "head_for", "init_training", "prepare_arrays", "record_epoch",
    "result_from_state", "run_epochs", "train_epoch", "validation_audc", "variant_config",
]
