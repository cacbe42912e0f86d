"""The one way from a run folder to a fitted router: ``load_router(run, variant) -> Router``.

Serving, ``cscr evaluate`` and the experiment commands all load routers here:

* CSCR variants (``cscr``, ``vanilla``, ``cscr@KIND``): the head trained for
  ``models/<variant>`` (cscr.runs.heads), the run's descriptors of the table's experts of the
  kind the head was trained with, refused when their basis is not the one the head was trained
  on (cscr.runs.descriptors), and c_m from the train split; built with
  ``CSCRRouter.from_trained``, with the out-of-distribution guard of ``models/<variant>/guard/``
  attached when ``cscr guard`` wrote one (``guard=False``: without it), and the category prior of
  ``models/<variant>/prior/`` when ``cscr train`` fitted one (``prior=False``: without it). The prompt
  embeddings are not read.
* ``cscr+category`` (evaluation only): the ``cscr`` router as above handed each table row's
  category (``GivenCategoryRouter``), fitted on the run's table.
* any other registered router (``kwargs`` go to its constructor): fitted on the run's table and
  prompt embeddings with the given seed.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from cscr.guard import load_guard
from cscr.newcomer import LevelChoice, load_choice
from cscr.prior import load_prior
from cscr.routers.base import Router, RouterContext, RouterError, router_class
from cscr.routers.cscr import CSCRRouter, GivenCategoryRouter
from cscr.runs.descriptors import DEFAULT_KIND
from cscr.runs.heads import load_trained
from cscr.runs.inputs import Run
from cscr.runs.paths import RunPaths


def probe_features(run: Run, view: Any = ...) -> np.ndarray | None:
    """(R, d) the features of the run's probe prompts as training read them: the encoder's vectors
    from the run's cache and, when the run has a lexical view, its half (``view``: the view already
    loaded, None for none; default: the run's); None when the run has fewer than 2 probe prompts."""
    from cscr.encoder import load_run_embeddings
    from cscr.lexical import LexicalView, features

    probe = run.table.split_index("probe")
    if len(probe) < 2:
        return None
    if view is ...:
        view = LexicalView.load(run.paths.embeddings)
    return features(load_run_embeddings(run.root, lexical=False)[probe], list(run.table.texts[probe]), view)


def attach_probes(router: Router, run: Run, variant: str = "cscr", view: Any = ...) -> LevelChoice | None:
    """Give a CSCR router whose utilities are expected qualities the run's probe prompts
    (``probe_features``), so an expert added later may bring its outcomes there (cscr/newcomer.py),
    and whether it calibrates such an expert on them: as ``cscr train`` chose for ``variant`` (a run
    without the record: yes, the operator chooses by sending outcomes); other routers are left as they
    are. Only a router that takes new experts needs them (serving: ``RouterService.from_run``), so
    ``load_router`` does not read them. Returns the recorded choice (None: none recorded or read)."""
    if not (isinstance(router, CSCRRouter) and router.head is not None and router.head.cfg.utility == "quality"):
        return None
    router.set_probes(probe_features(run, view))
    choice = load_choice(run.paths.model(variant))
    router.calibrate_newcomers = choice is None or choice.use
    return choice


def load_router(run: Run | str | os.PathLike[str] | RunPaths, variant: str = "cscr", *, seed: int = 0,
                top_k: int | None = None, use_gpu: bool | None = None, guard: bool = True, prior: bool = True,
                **kwargs: Any) -> Router:
    """The fitted router ``variant`` of a run (``top_k`` / ``use_gpu`` / ``guard`` / ``prior``: CSCR variants
    only). A router that will take experts with their probe outcomes also needs ``attach_probes``."""
    run = Run.of(run)
    base, at, _ = variant.partition("@")
    cls = router_class(base)
    if issubclass(cls, CSCRRouter):
        if kwargs:
            raise RouterError(f"{base}: unexpected option(s) {sorted(kwargs)} (a trained head takes top_k, use_gpu)")
        trained = load_trained(run.paths, variant)
        desc, kind, basis = run.descriptors(trained.descriptor_kind or DEFAULT_KIND, trained.basis_id)
        built = cls.from_trained(trained, desc, run.train_costs(), top_k=top_k, use_gpu=use_gpu, kind=kind,
                                 basis_id=basis)
        fitted_prior = load_prior(run.paths.model(variant)) if prior else None
        if fitted_prior is not None:
            built.set_prior(fitted_prior)
        saved = load_guard(run.paths.model(variant)) if guard else None
        if saved is not None:
            built.set_guard(saved)
        return built
    if issubclass(cls, GivenCategoryRouter) and not at:  # built around the run's trained cscr head
        inner = load_router(run, cls.wraps, seed=seed, top_k=top_k, use_gpu=use_gpu, guard=guard, prior=True)
        assert isinstance(inner, CSCRRouter)
        return cls(inner, **kwargs).fit(RouterContext.from_table(run.table, run.embeddings, seed=seed))
    if at:
        raise RouterError(f"{variant!r}: '@KIND' names a head trained with descriptor kind KIND; "
                          f"{base!r} has no trained head")
    if top_k is not None or use_gpu is not None:
        raise RouterError(f"{base}: top_k and use_gpu are options of trained CSCR heads")
    router = cls(**kwargs)
    return router.fit(RouterContext.from_table(run.table, run.embeddings, seed=seed))
