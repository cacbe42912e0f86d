"""Run folders: everything that reads or writes ``runs/<name>/``.

* ``cscr.runs.paths``: ``RunPaths`` (where each stage's files live), ``RunError``;
* ``cscr.runs.heads``: trained heads on disk (``save_trained``, ``load_trained``);
* ``cscr.runs.descriptors``: computing probe-outcome descriptors (an explicit step) and reading
  any kind from the run's store;
* ``cscr.runs.inputs``: ``Run``, the table and prompt embeddings of a run, loaded once;
* ``cscr.runs.loader``: ``load_router(run, variant) -> Router``, the one run-to-router loader.
* ``cscr.runs.settings``: the run's settings record (``settings.json``): later commands default to
  the descriptor kind and TrainConfig the run was trained with.

Only ``RunPaths`` is imported with the package (it has no dependencies); import the others from
their modules.
"""

from cscr.runs.paths import RunError, RunPaths

__all__ = ["RunError", "RunPaths"]
