"""Runs a validated sweep on Ray Tune: cached pretraining stages, then the fine-tune grid.

Grid axes (arm x labels x steps x seed) are enumerated; inside each grid cell Optuna samples
the searched hyperparameters and ASHA stops weak trials against the others of the same cell
(comparing a 100-label trial with a 10,000-label one would stop every low-budget trial).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

# Quiet Ray before it is imported: no usage prompt, no per-trial loggers, experiment state
# saved every second so that a killed sweep loses (almost) no record of finished trials.
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
# The final report carries test metrics and the best validation value, not the current one.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1000")

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402

from . import data as D  # noqa: E402
from . import tracking  # noqa: E402
from .spec import Job, Sweep, check_budgets, check_jobs, finetune_cells, pretrain_jobs  # noqa: E402
from .train import TrainConfig, train  # noqa: E402


class RunError(RuntimeError):
    """A sweep that could not finish; one line for the terminal."""


# ---- the trial: a few lines that hand a config to the core -------------------------------


def run_trial(config: dict, data: dict) -> None:
    job = config["job"]
    out = tempfile.mkdtemp(prefix="dlsweep-")
    try:
        cfg = TrainConfig(**job["train"], out_dir=out)

        def report(metrics: dict, checkpoint_dir: str | None) -> None:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

        train(cfg, report, D.Dataset.from_numpy(data))
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ---- search and scheduling over grid cells -----------------------------------------------


class GridSearch(Searcher):
    """Enumerates grid cells; within each, an OptunaSearch samples ``space`` ``samples`` times.

    Cells are visited breadth first (every cell's first sample, then every cell's second, ...),
    so a partial sweep already covers the whole grid.
    """

    def __init__(self, jobs: list[dict], space: dict, samples: int, metric: str, mode: str, seed: int = 0):
        super().__init__(metric=metric, mode=mode)
        self.jobs, self.space, self.seed = jobs, space, seed
        self.queue = [i for _ in range(samples) for i in range(len(jobs))]
        self.optuna: dict[int, OptunaSearch] = {}
        self.trial_cell: dict[str, int] = {}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def _searcher(self, cell: int) -> OptunaSearch:
        if cell not in self.optuna:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            sampler = optuna.samplers.TPESampler(seed=self.seed + cell, n_startup_trials=4)
            self.optuna[cell] = OptunaSearch(self.space, metric=self.metric, mode=self.mode, sampler=sampler)
        return self.optuna[cell]

    def suggest(self, trial_id: str):
        if not self.queue:
            return Searcher.FINISHED
        cell = self.queue.pop(0)
        self.trial_cell[trial_id] = cell
        job = json.loads(json.dumps(self.jobs[cell]))
        if self.space:
            job["train"].update(self._searcher(cell).suggest(trial_id))
        return {"job": job}

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        cell = self.trial_cell.pop(trial_id, None)
        if cell is not None and self.space:
            if result and f"best_{self.metric}" in result:  # a finished trial is worth its best validation value
                result = {**result, self.metric: result[f"best_{self.metric}"]}
            self._searcher(cell).on_trial_complete(trial_id, result, error)

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

    def _asha(self, trial) -> AsyncHyperBandScheduler:
        cell = trial.config["job"]["tags"]["cell"]
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
        text = f"running {c['running']}  done {c['completed']}  stopped {c['stopped_early']}  failed {c['failed']}"
        DISPLAY["progress"].update(DISPLAY["task"], completed=self.finished, status=text)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.counts["running"] += 1
        self._update()

    def _finish(self, trial, outcome: str):
        self.counts["running"] -= 1
        self.counts[outcome] += 1
        tags = trial.config["job"]["tags"]
        name = tags.get("cell") or f"{tags['stage']} seed={tags.get('seed')}"
        last = trial.last_result or {}
        metric = TrainConfig(**trial.config["job"]["train"]).metric
        value = last.get(f"best_{metric}", last.get(metric))
        line = f"[{'green' if outcome == 'completed' else 'yellow' if outcome == 'stopped_early' else 'red'}]{outcome:13}[/] {name}"
        if value is not None:
            cell = tags.get("cell", name)
            better = max if metric.endswith("acc") else min
            self.best[cell] = value if cell not in self.best else better(self.best[cell], value)
            line += f"  {metric} {value:.4f}  (cell best {self.best[cell]:.4f})"
        if "test_acc" in last:
            line += f"  test_acc {last['test_acc']:.4f}"
        elif "test_loss" in last:
            line += f"  test_loss {last['test_loss']:.4f}"
        DISPLAY["progress"].console.print(line, highlight=False, soft_wrap=True)
        self._update()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, tracking.outcome(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, "failed")

    @property
    def finished(self) -> int:
        return self.counts["completed"] + self.counts["stopped_early"] + self.counts["failed"]


# ---- the sweep --------------------------------------------------------------------------------


@dataclass
class Paths:
    """Everything a sweep writes, under one root (default ./mlflow_runs)."""

    root: Path

    @property
    def cache(self) -> Path:
        return self.root / "pretrain_cache"

    @property
    def ray(self) -> Path:
        return self.root / "ray"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def state(self, name: str) -> Path:
        return self.root / "sweeps" / name / "state.json"


def _storage(paths: Paths, state: dict) -> Path:
    """Ray Tune's experiment folders for one sweep invocation."""
    return paths.ray / state["name"] / state["stamp"]


def _write_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


def _trainable(data: dict, resources: dict):
    return tune.with_resources(tune.with_parameters(run_trial, data=data), resources)


def _job_config(job: Job, paths: Paths, threads: int) -> dict:
    train = dict(job.train, threads=threads)
    if job.source:
        train["init_encoder"] = str(paths.cache / job.source / "encoder.pt")
    return {"train": train, "tags": job.tags, "key": job.key}


def _levels(sweep: Sweep, jobs: dict) -> list[list[Job]]:
    depth: dict[str, int] = {}
    for name in sweep.stage_order():
        src = sweep.pretrain[name].from_
        depth[name] = depth[src] + 1 if src else 0
    levels: dict[int, list[Job]] = defaultdict(list)
    for (name, _), job in jobs.items():
        levels[depth[name]].append(job)
    return [levels[d] for d in sorted(levels)]


def _fit(tuner: tune.Tuner, console: Console, label: str, total: int, done: int = 0):
    """Run the tuner under a live bar. Whether it finished is judged by the caller: after Ctrl-C,
    Tune reports the trials it stopped as terminated."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console)
    DISPLAY.update(progress=progress, task=progress.add_task(label, total=total, completed=done, status=""))
    with progress:
        return tuner.fit()


def run_sweep(sweep: Sweep, source: str, root: Path, tracking_uri: str | None = None, address: str | None = None,
              resume: bool = False, console: Console | None = None) -> dict:
    """Run (or resume) a sweep; returns its state dict. Raises SpecError/DataError/RunError."""
    console = console or Console()
    paths = Paths(Path(root).resolve())
    state_path = paths.state(sweep.name)
    if resume:
        if not state_path.exists():
            raise RunError(f"{source}: nothing to resume: {sweep.name} has never run under {paths.root}")
        state = json.loads(state_path.read_text())
        if state["status"] == "finished":
            raise RunError(f"{source}: nothing to resume: the last run of {sweep.name} finished")
        sweep = Sweep.model_validate(state["spec"])
        tracking_uri = state["tracking_uri"]
        console.print(f"resuming {sweep.name} (run {state['stamp']})")
    check_jobs(sweep, source)
    ds = D.load_dataset(sweep.data.dataset, sweep.data.data_dir)
    check_budgets(sweep, ds, source)

    uri = tracking_uri or sweep.tracking.uri or tracking.default_uri(paths.root)
    experiment = sweep.tracking.experiment or sweep.name
    experiment_id = tracking.ensure_experiment(uri, experiment, paths.artifacts)
    if not resume:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        parent = tracking.start_parent(uri, experiment_id, f"sweep {stamp}", sweep.model_dump(mode="json", by_alias=True),
                                       {"sweep": sweep.name, "source": source, "stamp": stamp})
        state = {"name": sweep.name, "stamp": stamp, "parent_run_id": parent, "experiment_id": experiment_id,
                 "tracking_uri": uri, "spec": sweep.model_dump(mode="json", by_alias=True), "status": "running"}
    state["status"] = "running"
    _write_state(state_path, state)

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", configure_logging=True)
    resources = fit_resources({"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu}, console)
    threads = max(1, int(resources["cpu"]))
    data = ds.to_numpy()
    try:
        ok = _run_pretraining(sweep, paths, state, uri, data, resources, threads, console)
        if ok and sweep.finetune:
            ok = _run_finetune(sweep, paths, state, uri, data, resources, threads, console, resume)
    except KeyboardInterrupt:
        ok = False
    except BaseException:
        state["status"] = "interrupted"
        _write_state(state_path, state)
        tracking.finish_parent(uri, state["parent_run_id"], "FAILED")
        raise
    state["status"] = "finished" if ok else "interrupted"
    _write_state(state_path, state)
    tracking.finish_parent(uri, state["parent_run_id"], "FINISHED" if ok else "KILLED")
    return state


def fit_resources(resources: dict, console: Console) -> dict:
    """Shrink a trial's request to what one node of the cluster has, saying so: a request no node
    can meet would leave Tune waiting forever. The same sweep file then runs on a GPU cluster and
    on a laptop."""
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
    return fitted


def _run_pretraining(sweep, paths, state, uri, data, resources, threads, console) -> bool:
    jobs = pretrain_jobs(sweep)
    for level, level_jobs in enumerate(_levels(sweep, jobs)):
        todo = []
        for job in level_jobs:
            if (paths.cache / job.key / "encoder.pt").exists():
                console.print(f"pretrain [bold]{job.stage}[/] seed {job.tags['seed']}: reusing cached encoder {job.key}",
                              highlight=False)
            else:
                todo.append(job)
        if not todo:
            continue
        console.print(f"pretrain: {len(todo)} run(s) of {sorted({j.stage for j in todo})}", highlight=False)
        mlflow_cb = tracking.MlflowCallback(uri, state["experiment_id"], state["parent_run_id"])
        tuner = tune.Tuner(
            _trainable(data, resources),
            param_space={"job": tune.grid_search([_job_config(j, paths, threads) for j in todo])},
            tune_config=tune.TuneConfig(reuse_actors=True),
            run_config=tune.RunConfig(name=f"pretrain-{level}", storage_path=str(_storage(paths, state)),
                                      callbacks=[mlflow_cb, ProgressCallback()], verbose=0,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
        results = _fit(tuner, console, "pretrain", len(todo))
        for result in results:
            key = result.config["job"]["key"]
            if result.error is None and result.checkpoint is not None and "test_loss" in (result.metrics or {}):
                tmp = paths.cache / f".{key}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(result.checkpoint.path, tmp)
                (tmp / "job.json").write_text(json.dumps(result.config["job"], indent=1))
                tmp.replace(paths.cache / key)
        failed = [r for r in results if r.error is not None]
        if failed:
            raise RunError(f"pretraining failed: {failed[0].config['job']['tags']['stage']}: {str(failed[0].error).splitlines()[-1]}")
        if any(not (paths.cache / j.key / "encoder.pt").exists() for j in todo):
            return False  # interrupted: the unfinished stages run again on --resume
    return True


def _run_finetune(sweep, paths, state, uri, data, resources, threads, console, resume) -> bool:
    ft = sweep.finetune
    cells = finetune_cells(sweep)
    total = len(cells) * ft.samples
    path = _storage(paths, state) / "finetune"
    trainable = _trainable(data, resources)
    done = 0
    if resume and tune.Tuner.can_restore(str(path)):
        # Finished trials stay finished; the searcher, ASHA and both callbacks come back from disk.
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
        done = tracking.count_ended(uri, state["experiment_id"], state["parent_run_id"], "finetune")
        console.print(f"finetune: {done} of {total} trials already finished", highlight=False)
    else:
        space = {k: d.to_tune() for k, d in ft.search.items()}
        searcher = GridSearch([_job_config(c, paths, threads) for c in cells], space, ft.samples, sweep.metric, sweep.mode)
        scheduler = (CellASHA(sweep.metric, sweep.mode, sweep.asha.grace_period, sweep.asha.reduction_factor)
                     if sweep.asha.enabled else FIFOScheduler())
        mlflow_cb = tracking.MlflowCallback(uri, state["experiment_id"], state["parent_run_id"])
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=total, reuse_actors=True),
            run_config=tune.RunConfig(name="finetune", storage_path=str(path.parent), callbacks=[mlflow_cb, ProgressCallback()],
                                      verbose=0,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
    console.print(f"finetune: {len(cells)} grid cells x {ft.samples} sample(s) = {total} trials", highlight=False)
    _fit(tuner, console, "finetune", total, done)
    ended = tracking.count_ended(uri, state["experiment_id"], state["parent_run_id"], "finetune")
    return ended >= total
