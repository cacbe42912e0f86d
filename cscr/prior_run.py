"""What ``cscr train`` runs after saving a head: fit its category prior (cscr/prior.py), choose
whether experts that join later are calibrated on their probe outcomes (cscr/newcomer.py), then
write its operating points (cscr/operating_run.py, which route through the prior); last, the
head's ``models/<variant>@<kind>`` copy is refreshed with all of them (cscr.runs.heads)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cscr.newcomer import LevelChoice, save_choice
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
            f"({said}; w = {prior.w_given:g} when a request gives its category); saved {path}")
    return prior


def choose_run_levels(run: RunLike, variant: str, log: Callable[[str], None] | None = None) -> LevelChoice | None:
    """Choose, on the train and validation splits over the run's own experts (pseudo-newcomers, as the
    unseen-experts experiment chooses, but scored over the pool they join, as a server's pool grows),
    whether the saved ``variant`` head's router calibrates experts that join later on their probe
    outcomes, and save the choice with its evidence (``models/<variant>/newcomer_levels.json``;
    serving honours it). None, and nothing saved, when its TrainConfig asks for no levels or its
    head's utilities are not qualities."""
    from cscr.experiments.common import experiment_levels
    from cscr.runs.descriptors import DEFAULT_KIND
    from cscr.runs.heads import load_trained

    run = Run.of(run)
    trained = load_trained(run.paths, variant)
    desc, _, _ = run.descriptors(trained.descriptor_kind or DEFAULT_KIND, trained.basis_id)
    choice = experiment_levels(trained, run.table, run.embeddings, desc, log, joining=True)  # as serving adds them
    if choice is None:
        return None
    path = save_choice(run.paths.model(variant), choice)
    if log:
        log(f"train[{variant}]: newcomer levels recorded in {path}")
    return choice


def after_training(run: RunLike, variant: str, log: Callable[[str], None] | None = None) -> Path | None:
    """The category prior, the newcomer-level choice, then the operating-point table (its path; None
    when none could be written); last, ``models/<variant>@<kind>`` refreshed with all of them."""
    from cscr.operating_run import calibrate_after_training
    from cscr.runs.heads import refresh_kind_copy

    run = Run.of(run)  # one Run: its table and prompt features are read once for every step
    fit_run_prior(run, variant, log)
    choose_run_levels(run, variant, log)
    table = calibrate_after_training(run, variant, log)
    refresh_kind_copy(run.paths, variant)  # the copy routes as models/<variant> does
    return table
