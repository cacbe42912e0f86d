"""The default validation of a training loop: AUDC of the CSCR router on the validation prompts.

This module may import the routers (the loop in loop.py does not: it takes the validator as a
callable). ``audc_validator(arrays, top_k)`` is what ``fit_head`` and the Ray Train worker pass in.
"""

from __future__ import annotations

from cscr.eval import metrics as M
from cscr.head import Head
from cscr.routers.cscr import CSCRRouter
from cscr.training.arrays import TrainArrays
from cscr.training.loop import Validator


def validation_audc(head: Head, arrays: TrainArrays, top_k: int, n_lambdas: int = 100) -> float | None:
    """AUDC of the CSCR router (this head, top-k; 0: every expert) on the validation prompts;
    None without any."""
    if arrays.val_x.shape[0] == 0:
        return None
    router = CSCRRouter.from_parts(head, dict(zip(arrays.expert_names, arrays.descriptors, strict=True)),
                                   dict(zip(arrays.expert_names, arrays.costs, strict=True)),
                                   top_k=top_k or len(arrays.expert_names), use_gpu=False)
    lambdas = router.knob_grid(arrays.val_x, n_lambdas)
    choices = router.route_sweep(arrays.val_x, lambdas)
    x, y = M.operating_points(choices, arrays.val_quality, arrays.val_cost)
    lo, hi = M.pool_range(arrays.val_cost.mean(axis=0))
    return M.audc(M.deferral_curve(x, y), lo, hi)


def audc_validator(arrays: TrainArrays, top_k: int, n_lambdas: int = 100) -> Validator:
    """``validate(head)`` for ``run_epochs``: the validation AUDC of the head on ``arrays``."""

    def validate(head: Head) -> float | None:
        return validation_audc(head, arrays, top_k, n_lambdas)

    return validate
