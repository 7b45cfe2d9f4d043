"""What a run does before its trials, in a module that imports neither Ray's Tune nor MLflow: the
checks that end a bad run before anything starts or is written, Ray's settings and Ray's start.

A run checks itself here (``check_run``), then starts Ray in its main thread (ray.init must run
there) while a second thread imports MLflow and Tune and opens the sweep's MLflow experiment
(``start``): seconds each on a small machine, and neither needs the other. `dlsweep run` calls
both before it imports the runner, so that those imports overlap Ray's start too.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from .spec import SpecError, Sweep, check_all, format_validation_error
from .store import Paths, RunError, default_uri, flatten, probe, read_state, resume_command, store_problem
from .supervisor import reachable

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


@dataclass
class Checked:
    """A sweep that passed every check a run makes before it writes anything, with the MLflow
    experiment it logs to (``open_experiment``); ``state`` is the saved state of a resumed sweep."""

    sweep: Sweep
    source: str
    paths: Paths
    ds: object
    uri: str
    experiment: str
    joined: str | None  # the cluster it joins (--address or RAY_ADDRESS); None: a private Ray
    storage: str | None
    state: dict | None
    experiment_id: str | None = None
    started: float = 0.0  # time.perf_counter() when Ray began to start: the sweep's wall_s counts from there
    flags: tuple[str, ...] = ()  # the command's flags that name the sweep and place its store (resume_command)
    ignored: tuple[str, ...] = ()  # resumed: the keys given now that differ from the saved sweep, which runs as saved

    @property
    def again(self) -> str:
        """The command that continues this run."""
        return resume_command(self.source, self.flags, self.paths.storage)

    def open_experiment(self) -> "Checked":
        from .tracking import ensure_experiment  # MLflow and Tune: most of what overlaps Ray's start in `start`

        self.experiment_id = ensure_experiment(self.uri, self.experiment, self.paths.artifacts)
        return self


def start(checked: Checked, address: str | None) -> bool:
    """Start (or join) Ray for ``checked`` while a second thread opens its MLflow experiment (a fresh
    sqlite store takes seconds to build its schema, and importing MLflow and Tune seconds more);
    returns whether the Ray is the sweep's own (a private one, to shut down at its end). A failure
    or Ctrl-C on either side stops the Ray it started, and the experiment is then not created."""
    import ray
    import ray._common.usage.usage_lib  # noqa: F401 -- imported here first, not by both threads at once

    stop = threading.Event()

    def opened() -> None:
        if not stop.is_set():
            checked.open_experiment()

    own_ray = not ray.is_initialized()
    checked.started = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        ready = pool.submit(opened)
        try:
            start_ray(address)
            ready.result()
        except BaseException:
            stop.set()
            if own_ray and ray.is_initialized():
                ray.shutdown()
            raise
    return own_ray


def check_run(sweep: Sweep, source: str, root: Path, tracking_uri: str | None = None, address: str | None = None,
              resume: bool = False, storage: str | None = None, flags: tuple[str, ...] = ()) -> Checked:
    """What a run checks before it starts Ray or writes anything; raises SpecError/DataError/RunError.
    ``flags``: the command's own flags that name the sweep and place its store, for the resume hints."""
    storage = storage.rstrip("/") if storage else None
    ds = None if resume else check_all(sweep, source)  # a resumed sweep's spec is the one in its state
    if storage:
        trouble = store_problem(storage)
        if trouble:
            raise RunError(trouble)
    paths = Paths(Path(root).resolve(), storage)
    state_path = paths.state(sweep.name)
    state, ignored = None, []
    if resume:
        state = read_state(state_path, storage, sweep.name)
        if state is None:
            raise RunError(f"{source}: nothing to resume: {sweep.name} has never run under "
                           f"{paths.root}{f' or {storage}' if storage else ''}")
        if storage and state.get("storage") != storage:
            raise RunError(f"{source}: the last run of {sweep.name} kept its state in {state.get('storage') or paths.root}, "
                           f"not {storage}: resume with that")
        paths = Paths(paths.root, state.get("storage"))
        db = state["tracking_uri"].removeprefix("sqlite:///")
        if state["tracking_uri"].startswith("sqlite:///") and not Path(db).exists():
            raise RunError(f"{source}: the sweep's MLflow store {db} is not on this machine (a new head node?); "
                           "its runs cannot be continued here. Sweeps that must outlive their head log to a "
                           "tracking server (--tracking-uri http://...)")
        if state["status"] == "finished":
            raise RunError(f"{source}: nothing to resume: the last run of {sweep.name} finished")
        given, saved = flatten(sweep.model_dump(mode="json", by_alias=True)), flatten(state["spec"])
        ignored = sorted(k for k in given.keys() | saved.keys() if given.get(k) != saved.get(k))
        try:
            sweep = Sweep.model_validate(state["spec"])
        except ValidationError as e:  # saved by an older dlsweep whose rules were looser
            raise SpecError(format_validation_error(f"{state_path} (saved spec)", e)) from None
        tracking_uri = state["tracking_uri"]
    if ds is None:
        ds = check_all(sweep, source)

    joined = address or os.environ.get("RAY_ADDRESS")
    where = joined.removeprefix("ray://") if joined else None
    if where and ":" in where and not reachable(where, timeout=5.0):  # before anything is written: ray.init would hang
        raise RunError(f"no Ray cluster answers at {joined}; start it, or leave out --address (and RAY_ADDRESS) "
                       "for a private local Ray")
    uri = tracking_uri or sweep.tracking.uri or default_uri(paths.root)
    trouble = probe(uri)
    if trouble:
        raise RunError(trouble)
    return Checked(sweep, source, paths, ds, uri, sweep.tracking.experiment or sweep.name, joined, storage, state,
                   flags=tuple(flags), ignored=tuple(ignored))
