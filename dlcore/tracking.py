"""MLflow: the store, one parent run per sweep invocation, one child run per trial.

All writes happen in the driver, through a Tune callback, so a sqlite store has one writer
however many trials run at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import torch  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME  # noqa: E402
from ray import tune  # noqa: E402

from . import plots  # noqa: E402

for noisy in ("mlflow.store.db.utils", "alembic.runtime.migration"):  # schema set-up chatter on a fresh store
    logging.getLogger(noisy).setLevel(logging.WARNING)

TAG = "dlsweep."  # prefix of every tag this tool sets


def default_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def ensure_experiment(uri: str, name: str, artifact_root: Path | None) -> str:
    """The experiment's id, created here in the driver before any trial could race to create it."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (artifact_root / name).resolve().as_uri() if artifact_root and uri.startswith("sqlite") else None
    return client.create_experiment(name, artifact_location=location)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    items = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=[Param(p.key, p.value[:6000]) for p in items[i : i + 100]])


def start_parent(uri: str, experiment_id: str, name: str, spec: dict, tags: dict) -> str:
    """The sweep invocation's run: the spec as params and as ``sweep.json``, which the report reads back."""
    client = MlflowClient(uri)
    run = client.create_run(experiment_id, run_name=name, tags={**{TAG + k: str(v) for k, v in tags.items()}, TAG + "role": "sweep"})
    log_params(client, run.info.run_id, spec)
    client.log_dict(run.info.run_id, spec, "sweep.json")
    return run.info.run_id


def numeric_metrics(result: dict) -> dict:
    keys = ("train_", "val_", "test_", "best_", "samples_per_s", "wall_s", "train_size")
    return {k: float(v) for k, v in result.items() if k.startswith(keys) and isinstance(v, (int, float))
            and not isinstance(v, bool) and v is not None and math.isfinite(v)}


CURVE_METRICS = ("train_loss", "val_loss", "train_acc", "val_acc", "val_knn_acc")


def metric_history(client: MlflowClient, run_id: str, keys=CURVE_METRICS) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] of one run, as the loss-curve plot takes it."""
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in keys}


def outcome(trial) -> str:
    """How an ended trial ended: only a trial that ran to its end sent the final test report."""
    return "completed" if "test_loss" in (trial.last_result or {}) else "stopped_early"


class MlflowCallback(tune.Callback):
    """Logs every trial as a child run of the sweep's parent run; restarts replace, never duplicate."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str):
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.runs: dict[str, str] = {}  # trial_id -> run_id
        self._client = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    def __getstate__(self):
        return {**self.__dict__, "_client": None}

    def get_state(self):
        return {"runs": self.runs}

    def set_state(self, state):
        self.runs = state["runs"]

    def _existing(self, trial_id: str) -> list[str]:
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG}trial_id` = '{trial_id}' and tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_run_id}'",
        )
        return [r.info.run_id for r in found]

    def on_trial_start(self, iteration, trials, trial, **info):
        # A trial that starts again after a crash or kill logs afresh: drop its partial run.
        for run_id in self._existing(trial.trial_id):
            self.client.delete_run(run_id)
        job = trial.config["job"]
        tags = {MLFLOW_PARENT_RUN_ID: self.parent_run_id, TAG + "trial_id": trial.trial_id,
                **{TAG + k: str(v) for k, v in job["tags"].items()}}
        name = job["tags"].get("cell") or f"{job['tags']['stage']}/seed={job['tags'].get('seed')}"
        tags[MLFLOW_RUN_NAME] = f"{name}#{trial.trial_id.split('_')[-1]}"
        run = self.client.create_run(self.experiment_id, tags=tags)
        self.runs[trial.trial_id] = run.info.run_id
        log_params(self.client, run.info.run_id, {**job["train"], **{f"cell.{k}": v for k, v in job["tags"].items()}})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        ts, step = int(time.time() * 1000), int(result.get("step", 0))
        metrics = [Metric(k, v, ts, step) for k, v in numeric_metrics(result).items()]
        self.client.log_batch(run_id, metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        self.client.set_tag(run_id, TAG + "outcome", outcome(trial))
        self._log_artifacts(run_id, trial)
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        self.client.set_tag(run_id, TAG + "outcome", "failed")
        if trial.error_file and Path(trial.error_file).exists():
            self.client.log_artifact(run_id, trial.error_file)
        self.client.set_terminated(run_id, "FAILED")

    def _log_artifacts(self, run_id: str, trial) -> None:
        """Best checkpoint files, the loss-curve plot and, for autoencoders, the reconstruction grid."""
        ckpt = trial.checkpoint
        if ckpt is not None and Path(ckpt.path).is_dir():
            self.client.log_artifacts(run_id, ckpt.path, "checkpoint")
        with tempfile.TemporaryDirectory() as tmp:
            history = metric_history(self.client, run_id)
            title = trial.config["job"]["tags"].get("cell") or trial.config["job"]["tags"]["stage"]
            plots.save(plots.loss_curves(history, title), Path(tmp) / "loss_curves.png")
            samples = Path(ckpt.path) / "samples.pt" if ckpt is not None else None
            if samples is not None and samples.exists():
                grid = plots.reconstruction_grid(torch.load(samples, weights_only=True), title)
                plots.save(grid, Path(tmp) / "reconstructions.png")
            self.client.log_artifacts(run_id, tmp, "plots")


def count_ended(uri: str, experiment_id: str, parent_run_id: str, stage: str) -> int:
    """Trials of ``stage`` under the parent that ended: completed, stopped early or failed."""
    runs = MlflowClient(uri).search_runs(
        [experiment_id], max_results=50000,
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}' and tags.`{TAG}stage` = '{stage}'")
    return sum(1 for r in runs if r.data.tags.get(TAG + "outcome") in ("completed", "stopped_early", "failed"))


def finish_parent(uri: str, run_id: str, status: str) -> None:
    MlflowClient(uri).set_terminated(run_id, status)
