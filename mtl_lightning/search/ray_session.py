"""Ray for the length of one search, study or set of populations: started here, shut down here.

A Ray the caller already has (a notebook's `ray.init()`, a test's fixture, a study running a search row) is used
and left as it is. One started here is shut down on the way out, error or not, so a notebook or a test that calls
`run_search` twice works: a local Ray stops; for the cluster at RAY_ADDRESS only this driver disconnects, and the
cluster runs on.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

from ..plugins import is_file


class _DoubleDeleteFilter(logging.Filter):
    """Drop Tune's traceback for deleting an already deleted checkpoint (Ray 2.60, harmless, seen with PBT).

    PBT asks a donor to save, and Tune registers the checkpoint that save returns a second time; with
    `num_to_keep` the second entry later deletes a folder the first already removed. Only that case is dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not ("Error handling checkpoint" in str(record.msg) and isinstance(exc, FileNotFoundError))


def quiet_tune() -> None:
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # Tune warns each time a trial's checkpoints (one per epoch, num_to_keep) force an experiment snapshot within 5 s
    # of the last: always, with small cells, and harmless at their size; 0 turns the warning off
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    controller_log = logging.getLogger("ray.tune.execution.tune_controller")
    if not any(isinstance(f, _DoubleDeleteFilter) for f in controller_log.filters):
        controller_log.addFilter(_DoubleDeleteFilter())


def quiet_worker() -> None:
    """Run in a trial's worker as the trial starts (search/trial.py): Ray's line per saved checkpoint ("Checkpoint
    successfully created") and per restore ("Restored on ... from checkpoint") stay out of the search's console;
    warnings still show. Not Ray's `worker_process_setup_hook`: a runtime environment of any kind keeps Ray from
    starting its workers ahead of time, which doubled a small PBT search's wall time."""
    for name in (
        "ray.train._internal.storage",
        "ray.tune.trainable.trainable",
        "ray.tune.trainable.function_trainable",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)


def init_ray(num_cpus: int | None, quiet: bool = False, plugins=()) -> bool:
    """Local Ray with `num_cpus` (None: all), or the cluster at RAY_ADDRESS; nothing if Ray is already up. `quiet`:
    Ray's and Tune's own console lines (start-up, the experiment's table, where results went) only on errors.
    The plugin files among `plugins` (a config's) are shipped to the workers (Ray's runtime environment), where they
    may not be on the disk (a cluster's other nodes). Returns whether this call started (or joined) Ray."""
    import ray

    quiet_tune()
    if quiet:  # trials write their own console.log; Tune's restore notices are not problems
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter prints nothing at verbose=0
        for name in ("ray.tune", "ray.train"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if ray.is_initialized():
        return False
    args = {"logging_level": logging.ERROR, "log_to_driver": False} if quiet else {}
    files = [p for p in plugins if is_file(p)]
    if files:
        args["runtime_env"] = {"py_modules": files}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**args)  # an existing cluster
    else:
        # "local": a new Ray of our own, never a `ray start` cluster that happens to run on the machine (which
        # ray.init() would join, refusing num_cpus), as the README says: a cluster is used only with RAY_ADDRESS
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **args)
    return True


@contextmanager
def ray_session(num_cpus: int | None, quiet: bool = False, plugins=()):
    """`init_ray` for the body of a `with`; what it started is shut down at the end (see the module docstring)."""
    import ray

    started = init_ray(num_cpus, quiet, plugins)
    try:
        yield
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
