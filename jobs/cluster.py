"""The one "connect to Ray or start it" helper for jobs, the CLI and serving.

    from cscr.jobs.cluster import connect, disconnect, ray_cluster

    started = connect(address, num_cpus=2)     # True when this call started Ray
    try:
        ...
    finally:
        disconnect(started)                    # shuts Ray down only if we started it

    with ray_cluster(address, num_cpus=2):     # the same, as a context manager
        ...

``connect`` joins the cluster named by ``address`` or ``RAY_ADDRESS`` (``ray job submit`` sets
it), else starts a fresh embedded cluster (``address="local"``, never one started by
``ray start``) with no dashboard and token auth off. Fractional ``num_cpus`` is rounded up.
(Ray 2.60 cannot bind a node to loopback: ``ray.init`` turns 127.0.0.1 into the host's
address, ``services.resolve_ip_for_localhost``.)

Quiet by default: worker logs stay in Ray's log files (``log_to_driver=False``), Ray's own
logger shows warnings only, Ray Data progress bars are off and Train/Tune report nothing
(:func:`train_verbose`). ``-v``/``--log-level`` on ``cscr`` (or ``CSCR_LOG_LEVEL=INFO`` in the
environment, which :func:`set_log_level` writes) shows everything again. Known harmless noise is
removed where it starts: faiss is told which library it has (no ``swigfaiss_avx2``
ModuleNotFoundError line), torch's warning about read-only NumPy arrays is filtered in the
driver and in every worker (``worker_process_setup_hook``), and a Ray Train job's console keeps its
epoch lines without Ray Train's own (a "Reporting training result" line per report and worker,
:func:`quiet_train_worker`; the placement-group cleaner's failed state-API asks, a line a second
on a cluster without a dashboard, in the setup hook).

This module imports nothing heavy at import time (ray is imported inside the functions).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOG_LEVEL_ENV = "CSCR_LOG_LEVEL"
DEFAULT_LEVEL = "WARNING"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# harmless warnings from third-party code that would otherwise reach the screen
_TORCH_READONLY = r"The given NumPy array is not writable"
_PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_PG_CLEANER_NOISE = "Failed to query Ray Train Controller actor state"


def add_logging_options(p: argparse.ArgumentParser) -> None:
    """``-v``/``--verbose`` and ``--log-level``: the ``cscr`` command's global options and every
    job's; pass the parsed values to :func:`set_log_level`."""
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="show Ray's and the libraries' logs and progress bars (-vv: debug)")
    p.add_argument("--log-level", type=str.upper, choices=LEVELS, default=None,
                   help=f"log level (default: ${LOG_LEVEL_ENV}, else {DEFAULT_LEVEL})")


def set_log_level(level: str | None = None, verbose: int = 0) -> str:
    """Record the log level for this process and the processes it starts (``CSCR_LOG_LEVEL``).

    ``level`` wins over ``verbose``; ``verbose`` 1 means INFO, 2 or more DEBUG; neither keeps
    what the environment says (default WARNING). Then :func:`quiet_environment`. Returns the
    level now in force."""
    if level:
        name = level.upper()
        if name not in LEVELS:
            raise ValueError(f"unknown log level {level!r}; choose from {', '.join(LEVELS)}")
        os.environ[LOG_LEVEL_ENV] = name
    elif verbose:
        os.environ[LOG_LEVEL_ENV] = "DEBUG" if verbose > 1 else "INFO"
    quiet_environment()
    return log_level()


def log_level() -> str:
    """The level in force: ``CSCR_LOG_LEVEL`` if valid, else WARNING."""
    name = os.environ.get(LOG_LEVEL_ENV, DEFAULT_LEVEL).upper()
    return name if name in LEVELS else DEFAULT_LEVEL


def verbose() -> bool:
    """True when the user asked to see info logs (``-v`` or ``--log-level INFO/DEBUG``)."""
    return logging.getLevelName(log_level()) <= logging.INFO


def train_verbose() -> int:
    """``verbose=`` for Ray Tune's ``RunConfig``/``TuneConfig`` style options: 0 when quiet."""
    return 1 if verbose() else 0


def quiet_environment() -> None:
    """Set the environment variables that keep Ray and friends quiet (no-op when verbose).

    Called by :func:`connect`; call it yourself before importing ray in a process that never
    connects. Only fills unset variables, so a user's explicit setting wins."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    _pin_faiss_library()
    warnings.filterwarnings("ignore", message=_TORCH_READONLY, category=UserWarning)
    if verbose():
        return
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also transformers' bars


def _pin_faiss_library() -> None:
    """faiss tries ``swigfaiss_avx2``/``avx512`` first and logs a ModuleNotFoundError when the
    wheel ships only the generic library; name the library it has so it never tries."""
    if "FAISS_OPT_LEVEL" in os.environ:
        return
    try:
        spec = importlib.util.find_spec("faiss")
    except (ImportError, ValueError):
        return
    if spec is None or not spec.submodule_search_locations:
        return
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not any(folder.glob("swigfaiss_avx*")):
        os.environ["FAISS_OPT_LEVEL"] = "generic"


def worker_setup() -> None:
    """Runs at the start of every Ray worker (``worker_process_setup_hook``)."""
    warnings.filterwarnings("ignore", message=_TORCH_READONLY, category=UserWarning)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if not verbose():
        # Ray Train's PlacementGroupCleaner asks the state API, which lives in the dashboard, once
        # a second whether the controller is alive; connect() starts local clusters without a
        # dashboard, so every ask fails and warns (one line a second through a whole training run)
        logging.getLogger(_PG_CLEANER_LOGGER).addFilter(_DropMessages(_PG_CLEANER_NOISE))
    # Ray's own helpers in workers (e.g. Ray Train's PlacementGroupCleaner, through the state API)
    # look the cluster up with address "auto", which fails with "Found multiple active Ray
    # instances" whenever another Ray runs on the host: name this worker's own cluster.
    if "RAY_ADDRESS" not in os.environ:
        try:
            import ray

            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        except Exception:  # noqa: BLE001 - not connected yet: Ray falls back to its own lookup
            pass


def connect(address: str | None = None, num_cpus: float | None = None,
            num_gpus: int | None = None, **init_kw: Any) -> bool:
    """Join ``address`` / ``RAY_ADDRESS``, or start an embedded local cluster.

    Returns True when this call initialised Ray in this process (started a cluster or joined
    one; pass it to :func:`disconnect`, which then shuts the local cluster down or leaves the
    remote one). When Ray is already initialised here nothing happens and False is returned. ``num_cpus``
    sizes a local cluster only (default: all cores, at least 1; fractions round up);
    ``init_kw`` go to ``ray.init`` as they are."""
    quiet_environment()
    import ray

    if ray.is_initialized():
        return False
    loud = verbose()
    level = logging.getLevelName(log_level())
    common: dict[str, Any] = {
        "log_to_driver": loud,
        "logging_level": level if loud else logging.WARNING,
        "runtime_env": {"worker_process_setup_hook": worker_setup},
    }
    common.update(init_kw)
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        # an existing cluster (`ray job submit` sets RAY_ADDRESS): its runtime env is the job's
        if "runtime_env" not in init_kw:
            common.pop("runtime_env")
        ray.init(address=target, **common)
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only, one user's processes
    cpus = max(1, math.ceil(num_cpus)) if num_cpus else max(1, os.cpu_count() or 1)
    ray.init(address="local", num_cpus=cpus, num_gpus=num_gpus, include_dashboard=False, **common)
    _quiet_ray_data()
    return True


def quiet_train_worker() -> None:
    """Call first in a Ray Train worker's loop. Ray Train logs each ``ray.train.report`` at INFO
    ("Reporting training result ...", one line an epoch from every worker) through a logger named
    after its file, outside ``ray.train``, so RunConfig's LoggingConfig does not reach it: keep it
    off the console unless verbose (Ray's session log files still have it)."""
    if verbose():
        return
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(f in msg for f in self.fragments)


def _quiet_ray_data() -> None:
    """Ray Data in this driver: no progress bars, no execution banners, warnings only on the
    console (its log file keeps everything)."""
    if verbose():
        return
    try:
        from ray.data import DataContext
    except ImportError:  # ray without the data extra
        return
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data._internal.progress").addFilter(_DropMessages("Progress bars"))
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def disconnect(started: bool = True) -> None:
    """Shut Ray down when ``started`` (what :func:`connect` returned); else leave it running."""
    if not started:
        return
    import ray

    ray.shutdown()


@contextmanager
def ray_cluster(address: str | None = None, num_cpus: float | None = None,
                **kw: Any) -> Iterator[bool]:
    """``connect`` on entry, ``disconnect`` on exit; yields whether Ray was started here."""
    started = connect(address, num_cpus, **kw)
    try:
        yield started
    finally:
        disconnect(started)
