"""Ray's settings and start, in a module that imports nothing heavy.

`dlsweep run` on a private Ray starts Ray in its main thread (ray.init must run there) while a
second thread imports the runner (Tune, MLflow, the core), checks the sweep and opens its MLflow
experiment: the two take seconds each on a small machine, and neither needs the other.
"""

from __future__ import annotations

import os

# Quiet Ray before it is imported: no usage prompt, no per-trial loggers, experiment state
# saved every second so that a killed sweep loses (almost) no record of finished trials.
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
# The final report carries test metrics and the best validation value, not the current one.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1000")


def start_ray(address: str | None) -> None:
    """Join ``address`` (or RAY_ADDRESS) if given; otherwise start a private local Ray that never
    joins a cluster already running on this machine (another user's, another test's)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             configure_logging=True)
