"""Runs a validated sweep on Ray Tune: cached pretraining stages, then the fine-tune grid.

Grid axes (arm x labels x steps x seed) are enumerated; inside each grid cell Optuna samples
the searched hyperparameters (with search_scope cell, only in the first seed's cells, whose pick
the other seeds reuse) and ASHA stops weak trials against the others of the same cell
(comparing a 100-label trial with a 10,000-label one would stop every low-budget trial).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import sys
import threading
import time
import zlib
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from . import boot  # noqa: E402  (Ray's settings, before Ray is imported)

import ray  # noqa: E402
from ray import tune  # noqa: E402
from pyarrow import fs as pafs  # noqa: E402
from ray.train._internal.checkpoint_manager import _CheckpointManager  # noqa: E402  (see LostCheckpoints)
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402

from . import cache, search, tracking  # noqa: E402
from .spec import Job, Sweep, finetune_cells, pretrain_jobs  # noqa: E402
from .boot import Checked, check_run  # noqa: E402
from .store import Paths, RunError, write_state  # noqa: E402
from .supervisor import gone, reachable  # noqa: E402
from .train import DIVERGED_ABOVE, TrainConfig  # noqa: E402
from .trial import run_trial  # noqa: E402


# ---- search and scheduling: one study, pretraining stages and grid cells together --------


class StudySearch(Searcher):
    """Hands out the study's trials: pretraining stages first, then grid cells; within each cell an
    OptunaSearch samples ``space`` (tune domains) as many times as that cell's entry in ``samples``.

    Tune has no trial dependencies (ray-project/ray#23654), so they live here: a job that starts
    from a stage is held back until that stage's cache entry is whole; a cell led by another
    (search_scope cell) is held back until its lead's search has ended, then runs with the values
    that search picked (``picks``: lead key -> (value, values), those of earlier tuners included).
    Jobs whose stage failed or diverged, or whose lead completed no trial, stay held (blocked) while
    everything else runs. Cells are visited breadth first (every cell's first sample, then every
    cell's second, ...), so a partial sweep already covers the whole grid. ``seed`` differs between
    the tuners of one sweep.
    """

    def __init__(self, stages: list[dict], cells: list[dict], space: dict, samples: list[int], metric: str, mode: str,
                 cache_dir: str, ready: set[str], picks: dict | None = None, seed: int = 0):
        super().__init__(metric=metric, mode=mode)
        self.stages, self.cells, self.space, self.seed = stages, cells, OptunaSearch.convert_search_space(space), seed
        self.cache_dir, self.ready, self.failed = cache_dir, set(ready), set()
        self.queue = [("stage", i) for i in range(len(stages))]
        self.queue += [("cell", i) for r in range(max(samples, default=0)) for i, n in enumerate(samples) if r < n]
        self.optuna: dict[int, OptunaSearch] = {}
        self.live: dict[str, tuple[str, int]] = {}
        self.index = {c["key"]: i for i, c in enumerate(cells)}
        self.leads = {c["lead"] for c in cells if c.get("lead")}
        self.picks: dict[str, tuple[float, dict]] = dict(picks or {})
        self.values: dict[str, dict] = {}  # trial id -> the searched values it runs with

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def _searcher(self, cell: int) -> OptunaSearch:
        if cell not in self.optuna:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            # Seeded by the cell and the tuner: a cell resumed in a later tuner draws new points, not
            # the ones its finished trials already ran.
            seed = zlib.crc32(f"{self.seed}/{self.cells[cell]['key']}".encode())
            sampler = search.SobolThenTPE(self.space, search.STARTUP, seed)
            self.optuna[cell] = OptunaSearch(self.space, metric=self.metric, mode=self.mode, sampler=sampler)
        return self.optuna[cell]

    def _job(self, item: tuple[str, int]) -> dict:
        kind, i = item
        return self.stages[i] if kind == "stage" else self.cells[i]

    def _searching(self, lead: str) -> bool:
        """Whether the lead cell has trials in this tuner still to hand out or running."""
        item = ("cell", self.index.get(lead))
        return item in self.queue or item in self.live.values()

    def _runnable(self, item: tuple[str, int]) -> bool:
        lead = self._job(item).get("lead")
        if lead is not None and (self._searching(lead) or lead not in self.picks):
            return False
        source = self._job(item).get("source")
        if source is None or source in self.ready:
            return True
        if cache.problem(self.cache_dir, source) is None:  # also a stage rerun after it failed
            self.ready.add(source)
            self.failed.discard(source)
            return True
        return False

    def _blocked(self, item: tuple[str, int]) -> bool:
        """Held for good: the stage it starts from failed or diverged, or its lead's search is held
        for good or ended without a completed trial."""
        job = self._job(item)
        if job.get("source") in self.failed:
            return True
        lead = job.get("lead")
        if lead is None or lead in self.picks:
            return False
        searched = ("cell", self.index.get(lead))
        if searched in self.live.values():
            return False
        return searched not in self.queue or self._blocked(searched)

    def suggest(self, trial_id: str):
        item = next((it for it in self.queue if self._runnable(it)), None)
        if item is None:
            waiting = any(not self._blocked(it) for it in self.queue)
            return None if self.queue and (self.live or waiting) else Searcher.FINISHED
        self.queue.remove(item)
        self.live[trial_id] = item
        job = json.loads(json.dumps(self._job(item)))
        if item[0] == "cell" and self.space:
            lead = job.get("lead")
            self.values[trial_id] = dict(self.picks[lead][1]) if lead else self._searcher(item[1]).suggest(trial_id)
            job["train"].update(self.values[trial_id])
        return {"job": job}

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        item = self.live.pop(trial_id, None)
        if item is None:
            return
        kind, i = item
        if kind == "stage":
            key = self.stages[i]["key"]
            if not error and cache.problem(self.cache_dir, key) is None:
                self.ready.add(key)
                self.failed.discard(key)
            else:
                self.failed.add(key)
        elif self.space:
            values = self.values.pop(trial_id)
            if self.cells[i].get("lead"):  # it ran with its lead's pick: nothing for a search to learn
                return
            if result and f"best_{self.metric}" in result:  # a finished trial is worth its best validation value
                result = {**result, self.metric: result[f"best_{self.metric}"]}
            self._searcher(i).on_trial_complete(trial_id, result, error)
            key = self.cells[i]["key"]
            if key in self.leads and tracking.outcome(result, errored=error) == "completed":
                search.keep_best(self.picks, key, result[self.metric], values, self.mode)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class CellASHA(TrialScheduler):
    """One Tune ASHA per grid cell: trials are only ever compared with their own cell."""

    def __init__(self, metric: str, mode: str, grace_period: int, reduction_factor: float):
        super().__init__()
        self.kw = dict(time_attr="step", metric=metric, mode=mode, reduction_factor=reduction_factor)
        self.grace_period = grace_period
        self.cells: dict[str, AsyncHyperBandScheduler] = {}
        self.fifo = FIFOScheduler()

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True

    def _asha(self, trial) -> TrialScheduler:
        """The trial's cell's ASHA; pretraining stages, alone in their cell, are never cut."""
        tags = trial.config["job"]["tags"]
        if tags["stage"] != "finetune":
            return self.fifo
        cell = tags["cell"]
        if cell not in self.cells:
            max_t = trial.config["job"]["train"]["steps"]
            # stop_last_trials=False: a trial at its last evaluation still owes the final test report.
            self.cells[cell] = AsyncHyperBandScheduler(max_t=max_t, grace_period=min(self.grace_period, max_t),
                                                       stop_last_trials=False, **self.kw)
        return self.cells[cell]

    def on_trial_add(self, tune_controller, trial):
        self._asha(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        self._asha(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        if self.kw["metric"] not in result:  # the final test report carries no validation metric
            return TrialScheduler.CONTINUE
        return self._asha(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        self._asha(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self._asha(trial).on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        return self.fifo.choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        return f"CellASHA over {len(self.cells)} cells"


# ---- terminal progress ----------------------------------------------------------------------


# The live display of this process; callbacks restored by Tuner.restore find it here.
DISPLAY: dict = {}
COLORS = {"completed": "green", "stopped_early": "yellow", "diverged": "magenta", "failed": "red", "interrupted": "red"}


class ProgressCallback(tune.Callback):
    """A bar of trials with counts by outcome, and one line per finished trial with its cell's best."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.best: dict[str, float] = {}

    def get_state(self):
        return {"counts": dict(self.counts, running=0), "best": self.best}

    def set_state(self, state):
        self.counts, self.best = Counter(state["counts"]), state["best"]

    def _update(self):
        c = self.counts
        text = "  ".join(f"{k} {c[k]}" for k in ("running", "completed", "stopped_early", "diverged", "failed") if c[k] or k == "running")
        DISPLAY["progress"].update(DISPLAY["task"], completed=self.finished, status=text)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.counts["running"] += 1
        self._update()

    def _finish(self, trial, result: str, reason: str = ""):
        self.counts["running"] -= 1
        self.counts[result] += 1
        tags = trial.config["job"]["tags"]
        name = tracking.short_name(tags)
        last = trial.last_result or {}
        metric = TrainConfig(**trial.config["job"]["train"]).metric
        value = last.get(f"best_{metric}", last.get(metric))
        line = f"[{COLORS[result]}]{result:13}[/] {name}"
        if result == "diverged":
            line += f"  loss not finite (or > {DIVERGED_ABOVE:g}) at step {last.get('diverged_step')}"
        elif value is not None:
            cell = tags.get("cell", name)
            better = max if metric.endswith("acc") else min
            self.best[cell] = value if cell not in self.best else better(self.best[cell], value)
            line += f"  {metric} {value:.4f}  (cell best {self.best[cell]:.4f})"
        if result == "completed" and "test_acc" in last:
            line += f"  test_acc {last['test_acc']:.4f}"
        elif result == "completed" and "test_loss" in last:
            line += f"  test_loss {last['test_loss']:.4f}"
        if reason:
            line += f"  {reason}"
        DISPLAY["progress"].console.print(line, highlight=False, soft_wrap=True)
        self._update()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, tracking.outcome(trial.last_result))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, "failed", tracking.error_line(trial))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.counts["running"] -= 1  # it starts again (max_failures): on_trial_start counts it anew
        DISPLAY["progress"].console.print(f"[yellow]{'restarting':13}[/] {tracking.short_name(trial.config['job']['tags'])}  "
                                          f"{tracking.error_line(trial)}", highlight=False, soft_wrap=True)
        self._update()

    @property
    def finished(self) -> int:
        return sum(self.counts[k] for k in tracking.OUTCOMES)


class LostCheckpoints(tune.Callback):
    """A trial about to start again from a checkpoint that is gone from storage starts from step 0
    instead of failing. Tune deletes a trial's previous checkpoint (``num_to_keep``) the moment it
    registers the next, and saves the experiment state that names the previous one only every few
    seconds: a driver killed in between leaves a state whose checkpoint is gone, and every --resume
    failed that trial again on it. Each pending trial's checkpoint is looked up once, before it starts."""

    def __init__(self):
        self.seen: set[str] = set()

    def on_step_begin(self, iteration, trials, **info):
        for trial in trials:
            if trial.status != "PENDING" or trial.trial_id in self.seen or trial.checkpoint is None:
                continue
            self.seen.add(trial.trial_id)
            ckpt = trial.checkpoint
            try:
                gone = ckpt.filesystem.get_file_info(ckpt.path).type == pafs.FileType.NotFound
            except Exception:  # noqa: BLE001 -- the store unreachable (pyarrow raises many kinds): Tune's restore says so
                continue
            if gone:
                # What a new trial starts with: Trial.__init__'s empty manager and no result (Tune has no
                # public way to forget a checkpoint); the failed attempt's metrics would be shown as this one's.
                meta = trial.run_metadata
                meta.checkpoint_manager = _CheckpointManager(checkpoint_config=meta.checkpoint_manager.checkpoint_config)
                meta.last_result = {}
                DISPLAY["progress"].console.print(
                    f"[yellow]{'restarting':13}[/] {tracking.short_name(trial.config['job']['tags'])}  its last checkpoint "
                    f"is gone from the store ({ckpt.path}): it starts again from step 0", highlight=False, soft_wrap=True)


# ---- the sweep --------------------------------------------------------------------------------


def _storage(paths: Paths, state: dict) -> str:
    """Ray Tune's experiment folders for one sweep invocation (a local path or an object-store URI)."""
    return cache.join(paths.ray, state["name"], state["stamp"])


def _tune_storage(where: str) -> tuple:
    """Tune's (path, storage_filesystem) for a local path or an object-store URI (the filesystem built
    here, so that an S3-compatible endpoint from the environment reaches every node with it)."""
    return cache.filesystem(where)[::-1] if cache.is_uri(where) else (where, None)


def _storage_fs(where: str | None):
    """The pyarrow filesystem of an object-store ``where`` (None for a local path or none): where the
    outbox finds the checkpoints of trials that ended."""
    return _tune_storage(where)[1] if where else None


def _trainable(data: dict, resources: dict):
    return tune.with_resources(tune.with_parameters(run_trial, data=data), resources)


def _job_config(job: Job, paths: Paths, threads: int, borrow_idle: bool = True) -> dict:
    train = dict(job.train, threads=threads)
    if job.source:  # what MLflow shows; the trial reads its node's verified copy (cache.fetch)
        train["init_encoder"] = cache.join(paths.cache, job.source, "encoder.pt")
    return {"train": train, "tags": job.tags, "key": job.key, "source": job.source, "lead": job.lead,
            "cache": str(paths.cache), "borrow_idle": borrow_idle}


def fit_resources(resources: dict, console: Console, trials: int | None = None) -> dict:
    """Shrink a trial's request to what one node of the cluster has, saying so: a request no node
    can meet would leave Tune waiting forever. The same sweep file then runs on a GPU cluster and
    on a laptop. A CPU-only sweep of fewer ``trials`` than a node has CPU slots spreads the node's
    CPUs over them (``share_cores``)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    most_cpu = max(n.get("CPU", 0) for n in nodes)
    most_gpu = max(n.get("GPU", 0) for n in nodes)
    fitted = dict(resources)
    if resources["gpu"] > most_gpu:
        fitted["gpu"] = 0 if not most_gpu else most_gpu
        console.print(f"[yellow]resources.gpu {resources['gpu']} > {most_gpu} GPU(s) per node: trials get {fitted['gpu']}"
                      f"{' and run on CPU' if not fitted['gpu'] else ''}[/]", highlight=False)
    if resources["cpu"] > most_cpu:
        fitted["cpu"] = most_cpu
        console.print(f"[yellow]resources.cpu {resources['cpu']} > {most_cpu} CPU(s) per node: trials get {most_cpu}[/]",
                      highlight=False)
    if trials and not fitted["gpu"]:
        fitted["cpu"] = share_cores(fitted["cpu"], trials, most_cpu)
    return fitted


def share_cores(cpu: float, trials: int, node_cpus: float) -> float:
    """CPUs per trial when a sweep has fewer trials than the node has slots of ``cpu``: the node's
    CPUs shared out evenly (whole CPUs), so that no core idles while the only trials run on one
    thread each; otherwise ``cpu`` as asked. Ray's accounting then holds those CPUs for the trial,
    and the trial's threads follow them."""
    slots = int(node_cpus // cpu) if cpu else 0
    if 0 < trials < slots:
        return max(cpu, float(int(node_cpus // trials)))
    return cpu


def _cached_stages(jobs: list[Job], paths: Paths, console: Console) -> set[str]:
    """Keys of the stages whose cache entry verifies; a damaged entry is removed, to be rebuilt."""
    ready = set()
    for job in jobs:
        why = cache.problem(paths.cache, job.key)
        where = f"pretrain [bold]{job.stage}[/] seed {job.tags['seed']}"
        if why is None:
            console.print(f"{where}: reusing cached encoder {job.key}", highlight=False, soft_wrap=True)
            ready.add(job.key)
        elif why != "missing":
            console.print(f"[yellow]{where}: cached entry {job.key} is damaged ({why}); rebuilding it[/]", highlight=False,
                          soft_wrap=True)
            cache.remove(paths.cache, job.key)
    return ready


class RayWatch(threading.Thread):
    """Watches the Ray cluster's GCS from the driver. If it stops answering, Ray's core worker would
    end the process without a word after a minute (``gcs_rpc_server_reconnect_timeout_s``); this
    ends it with exit code 1 after ``misses`` polls instead, first calling ``on_loss`` with the
    GCS's host:port to say so and save the state, unless None: then the process that outlives this
    driver does both (supervisor.py)."""

    def __init__(self, on_loss=None, period_s: float = 0.5, misses: int = 3):
        super().__init__(daemon=True, name="dlsweep-raywatch")
        self.where = ray.get_runtime_context().gcs_address
        self.on_loss, self.period_s, self.misses = on_loss, period_s, misses
        self.stopped = threading.Event()

    def alive(self) -> bool:
        return reachable(self.where, timeout=self.period_s)

    def lost(self) -> None:
        """Never returns."""
        if self.on_loss:
            self.on_loss(self.where)
        os._exit(1)

    def run(self):
        missed = 0
        while not self.stopped.wait(self.period_s):
            missed = 0 if self.alive() else missed + 1
            if missed >= self.misses and not self.stopped.is_set():
                self.lost()


def _quiet_tune() -> None:
    """Tune logs every failed trial's traceback; dlsweep prints its one-line reason instead, and the
    whole traceback is in the trial's MLflow run (error.txt)."""
    for name in ("ray.tune", "ray.air", "ray.train"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _open_sweep(sweep: Sweep, source: str, uri: str, experiment_id: str, storage: str | None, paths: Paths,
                console: Console, state: dict | None) -> dict:
    """The sweep's MLflow side before its trials: a resumed sweep (``state``) sends what its last run
    could not and closes the runs it left open; a new one starts its parent run. Returns the state."""
    resume = state is not None
    if resume:
        console.print(f"resuming {sweep.name} (run {state['stamp']})")
        outbox = tracking.Outbox(uri, paths.outbox(sweep.name), storage_fs=_storage_fs(paths.storage))
        if outbox.pending:
            sent = len(outbox.pending)
            outbox.flush()
            console.print(f"sent {sent - len(outbox.pending)} MLflow record(s) the last run could not", highlight=False)
        dangling = tracking.end_dangling_runs(uri, state["experiment_id"], state["parent_run_id"])
        if dangling:
            console.print(f"{dangling} run(s) the interrupted driver left open or lost with its Ray cluster marked KILLED (outcome interrupted)",
                          highlight=False)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        written = sweep.model_dump(mode="json", by_alias=True, exclude_defaults=True, exclude_none=True)
        written.pop("profile", None)
        params = {**written, "sweep.file": source, "sweep.profile": sweep.profile or "none"}
        parent = tracking.start_parent(uri, experiment_id, f"sweep {stamp}", sweep.model_dump(mode="json", by_alias=True),
                                       {"sweep": sweep.name, "source": source, "stamp": stamp, "sampler": "sobol-tpe"},
                                       params)
        state = {"name": sweep.name, "stamp": stamp, "parent_run_id": parent, "experiment_id": experiment_id,
                 "tracking_uri": uri, "spec": sweep.model_dump(mode="json", by_alias=True), "tuners": [],
                 "storage": storage}
    return state


def run_sweep(sweep: Sweep, source: str, root: Path, tracking_uri: str | None = None, address: str | None = None,
              resume: bool = False, console: Console | None = None, supervised: bool = False,
              storage: str | None = None, flags: tuple[str, ...] = ()) -> dict:
    """Run (or resume) a sweep; returns its state dict, whose ``status`` is finished, failed (some
    trials failed or were blocked) or interrupted. Raises SpecError/DataError/RunError.

    ``supervised``: a process outlives this one to report a lost Ray cluster (supervisor.py); this
    one then only ends, leaving the state ``running`` with its pid for that process to find. The
    two never race to speak or to write the state.

    ``storage``: an object-store URI (``s3://bucket/prefix``) for Tune's state, the checkpoints and
    the pretrain cache, for clusters whose nodes share no disk; a resumed sweep keeps its own."""
    checked = check_run(sweep, source, root, tracking_uri, address, resume, storage, flags)
    own_ray = boot.start(checked, address)
    return run_checked(checked, console, supervised, own_ray)


def run_checked(checked: Checked, console: Console | None = None, supervised: bool = False, own_ray: bool = False) -> dict:
    """``run_sweep`` once its checks passed, its experiment is open and Ray is up; ``own_ray``: the
    Ray is this sweep's own (a private one, shut down at the end; a joined cluster is left running)."""
    console = console or Console()
    _quiet_tune()
    if checked.ignored:
        console.print(f"[yellow]--resume continues {checked.sweep.name} as it was saved; differing now, and not used: "
                      f"{', '.join(checked.ignored)}[/]", highlight=False, soft_wrap=True)
    sweep, source, paths, ds, uri, storage = checked.sweep, checked.source, checked.paths, checked.ds, checked.uri, checked.storage
    joined, resume = checked.joined, checked.state is not None
    state_path = paths.state(sweep.name)
    started = checked.started
    try:
        state = _open_sweep(sweep, source, uri, checked.experiment_id, storage, paths, console, checked.state)
    except BaseException:
        if own_ray:
            ray.shutdown()
        raise
    state["status"] = "running"
    state["driver"] = {"pid": os.getpid()}  # whose the running state is: the supervisor checks for its child's
    write_state(state_path, state)

    def on_ray_loss(where: str) -> None:
        state["status"] = "interrupted"
        write_state(state_path, state)
        print(f"error: the Ray cluster at {where} went away mid-sweep; state saved; once Ray is back, continue with: {checked.again}",
              file=sys.stderr, flush=True)

    watch = RayWatch(None if supervised else on_ray_loss)
    state["driver"]["ray"] = watch.where
    write_state(state_path, state)
    watch.start()
    planned = len(pretrain_jobs(sweep)) + sum(c.samples for c in finetune_cells(sweep))
    resources = fit_resources({"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu}, console, planned)
    threads = max(1, int(resources["cpu"]))
    study = Study(sweep, paths, state, uri, ds.to_numpy(), resources, threads, console)
    interrupted = False
    try:
        study.run(resume)
    except KeyboardInterrupt:
        interrupted = True
    except BaseException as e:
        watch.stopped.set()
        lost = isinstance(e, Exception) and not watch.alive()
        _interrupted(state, state_path, uri, console, watch, supervised, checked.again, lost)
        raise
    finally:
        watch.stopped.set()
    wait = cluster_wait_s(bool(joined) or not own_ray, study.summary()["failed"], lost_with_ray(study.all_results()))
    if not watch.alive() or (wait and gone(watch.where, within_s=wait)):
        _interrupted(state, state_path, uri, console, watch, supervised, checked.again, lost=True)
    summary = {**study.summary(), "headline": study.headline(), "wall_s": time.perf_counter() - started}
    if own_ray:
        ray.shutdown()  # nothing of this sweep's Ray outlives it, in the CLI or in a caller's process
    interrupted = interrupted or study.tracking_lost or summary["unfinished"] > 0
    state["summary"] = summary
    state["status"] = "interrupted" if interrupted else "failed" if summary["failed"] or summary["blocked"] else "finished"
    write_state(state_path, state)
    tracking.finish_sweep(uri, state, console, summary)
    return state


def lost_with_ray(results) -> bool:
    """Whether a trial of ``results`` (tune.Result) failed because its actor went down with its node or
    its owner, the driver: what Ray says of trials lost with their cluster (tracking.LOST_WITH_RAY)."""
    return any(r.error is not None and tracking.LOST_WITH_RAY.search(str(r.error)) for r in results)


def cluster_wait_s(joined: bool, failed: int, lost: bool) -> float:
    """How long a sweep that ended with ``failed`` trials gives its cluster's GCS to stop answering before
    it says how it ended. Tune may end normally, its trials failed by a joined cluster's death, before
    that cluster's GCS goes (raylets stop first; on a busy machine the GCS can take many seconds more).
    Nothing to wait for on a private Ray or without a failure; 30 s when a trial's actor died with its
    node or owner (``lost``), 3 s for any other failure."""
    if not joined or not failed:
        return 0.0
    return 30.0 if lost else 3.0


def _interrupted(state: dict, state_path: Path, uri: str, console: Console, watch: RayWatch, supervised: bool, again: str,
                 lost: bool) -> None:
    """Save the sweep as interrupted and end its open runs; when its Ray cluster went away (``lost``),
    its trials lost with it are interrupted too, and this raises the one-line RunError that says so."""
    if lost and supervised:
        watch.lost()  # Ray's core worker is about to end this process anyway; the supervisor speaks
    state["status"] = "interrupted"
    write_state(state_path, state)
    tracking.finish_sweep(uri, state, console, cluster_lost=lost)
    if lost:
        raise RunError(f"the Ray cluster at {watch.where} went away mid-sweep; state saved; once Ray is back, "
                       f"continue with: {again}", code=1) from None


@contextmanager
def _ctrl_c_seen():
    """Yields a list that holds SIGINT once a Ctrl-C arrived while the block ran a ``Tuner.fit``.

    Tune returns normally on a first Ctrl-C: its handler stops the trials and puts back the handler it
    found, which is the one installed here, so the handler in place afterwards tells whether it ran.
    A second Ctrl-C reaches the handler here, which raises KeyboardInterrupt as Python's own would."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def ctrl_c(signum, _frame):
        seen.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, ctrl_c)
    tune_catches = not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
    try:
        yield seen
    finally:
        if tune_catches and signal.getsignal(signal.SIGINT) is ctrl_c and not seen:
            seen.append(signal.SIGINT)  # Tune's handler ran, and handed this one back
        signal.signal(signal.SIGINT, previous)


class Study:
    """One sweep invocation's trials on Tune. A first tuner runs every stage and cell; on resume the
    last tuner is restored (failed and unfinished trials run again), then one more tuner runs what
    is still owed: trials stopped by an interrupt, and cells a failed stage held back until a rerun
    cached it."""

    def __init__(self, sweep: Sweep, paths: Paths, state: dict, uri: str, data: dict, resources: dict, threads: int,
                 console: Console):
        self.sweep, self.paths, self.state, self.uri, self.console = sweep, paths, state, uri, console
        self.trainable = _trainable(data, resources)
        self.threads = threads
        self.stages = list(pretrain_jobs(sweep).values())
        self.cells = finetune_cells(sweep)
        self.results: dict[str, list] = {}  # tuner name -> its results (tune.Result)
        self.tracking_lost = False
        self.ctrl_c = False  # a Ctrl-C stopped a tuner (Tune returns normally then)

    @property
    def storage(self) -> str:
        return _storage(self.paths, self.state)

    def _tuner(self, name: str, stages: list[Job], cells: list[tuple[Job, int]], ready: set[str]) -> tune.Tuner:
        sweep = self.sweep
        space = {k: d.to_tune() for k, d in sweep.finetune.search.items()} if sweep.finetune else {}
        borrow = sweep.resources.borrow_idle
        searcher = StudySearch([_job_config(j, self.paths, self.threads, borrow) for j in stages],
                               [_job_config(c, self.paths, self.threads, borrow) for c, _ in cells], space, [n for _, n in cells],
                               sweep.metric, sweep.mode, str(self.paths.cache), ready, self._picks(),
                               self.state["tuners"].index(name))
        scheduler = (CellASHA(sweep.metric, sweep.mode, sweep.asha.grace_period, sweep.asha.reduction_factor)
                     if sweep.asha.enabled else FIFOScheduler())
        path, fs = _tune_storage(self.storage)
        mlflow_cb = tracking.MlflowCallback(self.uri, self.state["experiment_id"], self.state["parent_run_id"],
                                            self.paths.outbox(self.state["name"]), fs)
        return tune.Tuner(
            self.trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                        num_samples=len(stages) + sum(n for _, n in cells), reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=path, storage_filesystem=fs, callbacks=[LostCheckpoints(), mlflow_cb, ProgressCallback()],
                                      stop=tracking.TrackingStopper(mlflow_cb), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )

    def _fit(self, name: str, tuner: tune.Tuner, total: int) -> None:
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=self.console)
        DISPLAY.update(progress=progress, task=progress.add_task(self.sweep.name, total=total, completed=0, status=""))
        with progress, _ctrl_c_seen() as seen:
            grid = tuner.fit()
        self.ctrl_c = self.ctrl_c or bool(seen)
        self.results[name] = list(grid)
        tracking.Outbox.close_all()
        outbox = tracking.Outbox(self.uri, self.paths.outbox(self.state["name"]),  # what the callback could not send
                                 storage_fs=_storage_fs(self.storage))
        if not outbox.flush():
            self.tracking_lost = True
            self.console.print(f"[red]the tracking server {self.uri} has been unreachable for over "
                               f"{outbox.patience_s:.0f} s ({outbox.last_error}); {len(outbox.pending)} record(s) kept "
                               f"for --resume[/]", highlight=False, soft_wrap=True)

    def _restore(self, name: str) -> tune.Tuner:
        path, fs = _tune_storage(cache.join(self.storage, name))
        return tune.Tuner.restore(path, self.trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)

    def run(self, resume: bool) -> None:
        tuners = self.state["tuners"]
        if resume and tuners and tune.Tuner.can_restore(*_tune_storage(cache.join(self.storage, tuners[-1]))):
            for name in tuners[:-1]:
                self.results[name] = list(self._restore(name).get_results())
            self.console.print(f"{tuners[-1]}: continuing; failed and unfinished trials run again", highlight=False)
            restored = self._restore(tuners[-1])
            self._fit(tuners[-1], restored, self.state.get("totals", {}).get(tuners[-1], len(restored.get_results())))
            if self.tracking_lost or self.ctrl_c:
                return  # a Ctrl-C stopped the restored tuner: it stops the whole invocation, not just that tuner
            stages, cells, _ = self.owed()
            if not stages and not cells:
                return
            tracking.delete_interrupted_runs(self.uri, self.state["experiment_id"], self.state["parent_run_id"])
            self.console.print(f"still owed: {len(stages)} pretraining run(s) and {sum(n for _, n in cells)} trial(s) of "
                               f"{len(cells)} cell(s) (interrupted, or held back by a stage or first-seed search that has now "
                               "run)", highlight=False)
        else:
            ready = _cached_stages(self.stages, self.paths, self.console)
            stages, cells = [j for j in self.stages if j.key not in ready], [(c, c.samples) for c in self.cells]
            return self._start_tuner(stages, cells, ready)
        self._start_tuner(stages, cells, self._ready())

    def _start_tuner(self, stages: list[Job], cells: list[tuple[Job, int]], ready: set[str]) -> None:
        """A new tuner for ``stages`` and ``cells``, recorded in the state before it starts."""
        tuners = self.state["tuners"]
        name = f"study-{len(tuners)}"
        tuners.append(name)
        total = len(stages) + sum(n for _, n in cells)
        self.state.setdefault("totals", {})[name] = total  # the progress bar's total when it is restored
        write_state(self.paths.state(self.state["name"]), self.state)
        self.console.print(f"{name}: {len(stages)} pretraining run(s), {len(cells)} grid cells, {total} trials", highlight=False)
        self._fit(name, self._tuner(name, stages, cells, ready), total)

    def _ready(self) -> set[str]:
        return {j.key for j in self.stages if cache.problem(self.paths.cache, j.key) is None}

    def _ended(self) -> Counter:
        """Per stage or cell key: trials that ended for good (any outcome but interrupted)."""
        ended = Counter()
        for r in self.all_results():
            if r.config and tracking.outcome(r.metrics, errored=r.error is not None) != "interrupted":
                ended[r.config["job"]["key"]] += 1
        return ended

    def _picks(self) -> dict[str, tuple[float, dict]]:
        """What the search of each lead cell picked in the tuners so far (search_scope cell)."""
        keys = list(self.sweep.finetune.search) if self.sweep.finetune else []
        return search.picks(self.all_results(), {c.lead for c in self.cells if c.lead}, keys, self.sweep.metric, self.sweep.mode)

    def owed(self) -> tuple[list[Job], list[tuple[Job, int]], list[tuple[Job, int, str]]]:
        """What this invocation still owes: stages to (re)run, cells with their missing trials that
        can run, and cells held back with why: 'stage' (the stage it, or its lead, starts from failed
        or diverged) or 'search' (its lead's search ended without a completed trial)."""
        ready, ended, picks = self._ready(), self._ended(), self._picks()
        stages = [j for j in self.stages if j.key not in ready and not ended[j.key]]
        startable = ready | {j.key for j in stages}
        by_key = {c.key: c for c in self.cells}
        runnable, blocked = [], []
        for c in self.cells:
            n = c.samples - ended[c.key]
            if n <= 0:
                continue
            lead = by_key.get(c.lead)
            if any(j.source is not None and j.source not in startable for j in (c, lead) if j is not None):
                blocked.append((c, n, "stage"))
            elif lead and ended[lead.key] >= lead.samples and lead.key not in picks:
                blocked.append((c, n, "search"))
            else:
                runnable.append((c, n))
        return stages, runnable, blocked

    def headline(self) -> dict:
        """Mean test accuracy over seeds of each arm's validation-selected trials, at its smallest and
        largest label budget (longest steps): the parent run's headline metrics."""
        metric, sign = self.sweep.metric, (1 if self.sweep.mode == "max" else -1)
        chosen: dict[tuple, tuple] = {}
        for r in self.all_results():
            tags, m = (r.config or {}).get("job", {}).get("tags", {}), r.metrics or {}
            if tags.get("stage") != "finetune" or "test_acc" not in m:
                continue
            key = (tags["arm"], tags["labels"], tags["steps"], tags["seed"])
            val = sign * m.get(f"best_{metric}", 0.0)
            if key not in chosen or val > chosen[key][0]:
                chosen[key] = (val, m["test_acc"])
        out = {}
        for arm in sorted({k[0] for k in chosen}):
            mine = {k: v for k, v in chosen.items() if k[0] == arm}
            steps = max(k[2] for k in mine)
            budgets = sorted({k[1] for k in mine if k[2] == steps}, key=lambda b: (isinstance(b, float), b))
            for b in {budgets[0], budgets[-1]}:
                accs = [v[1] for k, v in mine.items() if k[1] == b and k[2] == steps]
                out[tracking.param_key(f"test_acc.{arm}.labels_{b}")] = sum(accs) / len(accs)
        return out

    def all_results(self) -> list:
        """Every tuner's results (tune.Result), in order."""
        return [r for rs in self.results.values() for r in rs]

    def summary(self) -> dict:
        """Counts of trials by outcome, blocked trials (their stage failed or diverged, or their first
        seed's search completed no trial) and unfinished ones."""
        counts = Counter()
        for r in self.all_results():
            counts[tracking.outcome(r.metrics, errored=r.error is not None)] += 1
        stages, runnable, blocked = self.owed()
        by_stage = [c for c, _, why in blocked if why == "stage"]
        return {**{k: counts[k] for k in tracking.OUTCOMES}, "blocked": sum(n for _, n, _ in blocked),
                "blocked_arms": sorted({c.tags["arm"] for c in by_stage}),
                "blocked_stages": sorted({self.sweep.finetune.arms[c.tags["arm"]].from_ for c in by_stage}),
                "blocked_searches": sorted({c.lead for c, _, why in blocked if why == "search"}),
                "unfinished": len(stages) + sum(n for _, n in runnable)}
