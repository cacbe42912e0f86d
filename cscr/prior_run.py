"""What ``cscr train`` runs after saving a head: fit its category prior (cscr/prior.py), then write
its operating points (cscr/operating_run.py, which route through the prior)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cscr.operating_run import RunLike
from cscr.prior import CategoryPrior, fit_prior, save_prior, wants_prior
from cscr.runs.inputs import Run


def fit_run_prior(run: RunLike, variant: str, log: Callable[[str], None] | None = None) -> CategoryPrior | None:
    """Fit and save the category prior of the run's saved ``variant`` head (train split; w chosen on
    the val split), when its TrainConfig asks for one and its head gives expected qualities."""
    from cscr.runs.heads import load_trained
    from cscr.runs.loader import load_router

    run = Run.of(run)
    trained = load_trained(run.paths, variant)
    if not wants_prior(trained.config):
        if log and trained.config.category_prior:
            log(f"train[{variant}]: no category prior (a similarity head: its utilities are not qualities)")
        return None
    router = load_router(run, variant, guard=False, prior=False)
    prior = fit_prior(router, run.table, run.embeddings)
    if prior is None:
        if log:
            log(f"train[{variant}]: no category prior (fewer than 2 train categories)")
        return None
    path = save_prior(run.paths.model(variant), prior)
    if log:
        scores = prior.search.get("val_audc") or []
        said = f"val AUDC {max(scores):.4f}, {scores[0]:.4f} without it" if scores else "no validation prompts"
        log(f"train[{variant}]: category prior w = {prior.w:g} over {len(prior.categories)} categories "
            f"({said}); saved {path}")
    return prior


def after_training(run: RunLike, variant: str, log: Callable[[str], None] | None = None) -> Path | None:
    """The category prior, then the operating-point table (its path; None when none could be written)."""
    from cscr.operating_run import calibrate_after_training

    fit_run_prior(run, variant, log)
    return calibrate_after_training(run, variant, log)
