"""``fit_head``: the one epoch loop (loop.py) in a single process, validated on AUDC by default."""

from __future__ import annotations

import sys
from collections.abc import Callable

from cscr.config import TrainConfig
from cscr.training.arrays import TrainArrays
from cscr.training.loop import (
    Log,
    TrainResult,
    TrainState,
    Validator,
    init_training,
    result_from_state,
    run_epochs,
    variant_config,
)
from cscr.training.validation import audc_validator


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fit_head(arrays: TrainArrays, cfg: TrainConfig | None = None, variant: str = "cscr",
             log: Log | None = stderr_log, state: TrainState | None = None,
             on_epoch: Callable[[TrainState], None] | None = None,
             validate: Validator | None = None) -> TrainResult:
    """Train ``cfg.epochs`` epochs (from ``state`` if given) and return the best epoch's head.

    ``validate`` scores each epoch; None: the validation AUDC of the CSCR router with this head
    (``audc_validator``); ``lambda head: None`` trains without validation (best = lowest loss).
    """
    cfg = variant_config(cfg or TrainConfig(), variant)
    head, opt, state = init_training(arrays, cfg, state)
    validate = audc_validator(arrays, cfg.index.top_k) if validate is None else validate
    state = run_epochs(arrays, cfg, head, opt, state, validate, variant=variant, on_epoch=on_epoch, log=log)
    return result_from_state(state, arrays, cfg, variant)
