"""MLflow: the store, one parent run per sweep invocation, one child run per trial.

All writes happen in the driver, through a Tune callback, so a sqlite store has one writer
however many trials run at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# A request to a tracking server that went away fails within seconds instead of retrying for
# minutes; the Outbox below does the retrying, without blocking the sweep.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a "View run" line per ended run

from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME  # noqa: E402
from ray import tune  # noqa: E402

from .store import first_line, flatten
from .train import RESUME

for noisy in ("mlflow.store.db.utils", "alembic.runtime.migration"):  # schema set-up chatter on a fresh store
    logging.getLogger(noisy).setLevel(logging.WARNING)

TAG = "dlsweep."  # prefix of every tag this tool sets


def ensure_experiment(uri: str, name: str, artifact_root: Path | None) -> str:
    """The experiment's id, created here in the driver before any trial could race to create it."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (artifact_root / name).resolve().as_uri() if artifact_root and uri.startswith("sqlite") else None
    return client.create_experiment(name, artifact_location=location)


def param_key(key: str) -> str:
    """A key MLflow accepts (alphanumerics, _ - . space : /): a grid point's '=' in a stage name becomes ':'."""
    return key.replace("=", ":")


def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    items = [Param(param_key(k), json.dumps(v) if not isinstance(v, str) else v) for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=[Param(p.key, p.value[:6000]) for p in items[i : i + 100]])


def start_parent(uri: str, experiment_id: str, name: str, spec: dict, tags: dict, params: dict | None = None) -> str:
    """The sweep invocation's run: ``params`` (default: the spec) as params, the whole spec as
    ``sweep.json``, which the report reads back."""
    client = MlflowClient(uri)
    run = client.create_run(experiment_id, run_name=name, tags={**{TAG + k: str(v) for k, v in tags.items()}, TAG + "role": "sweep"})
    log_params(client, run.info.run_id, spec if params is None else params)
    client.log_dict(run.info.run_id, spec, "sweep.json")
    return run.info.run_id


def numeric_metrics(result: dict) -> dict:
    """The metrics of a trial's result worth logging; ``at<steps>/...`` are the step budgets read off the run."""
    keys = ("train_", "val_", "test_", "best_", "labels_", "samples_per_s", "wall_s", "eval_s", "train_size", "diverged_step",
            "resumed_from_step", "threads")
    return {k: float(v) for k, v in result.items() if (k.startswith(keys) or READ_OFF.match(k))
            and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


READ_OFF = re.compile(r"at(\d+)/(.+)")


CURVE_METRICS = ("train_loss", "val_loss", "train_acc", "val_acc", "val_knn_acc")


def metric_history(client: MlflowClient, run_id: str, keys=CURVE_METRICS) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] of one run, as the loss-curve plot takes it."""
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in keys}


OUTCOMES = ("completed", "stopped_early", "diverged", "failed", "interrupted")


def outcome(last_result: dict | None, errored: bool = False) -> str:
    """How a trial ended, from its last result: only a trial that ran to its end sent test metrics;
    a diverged one sent ``diverged_step``; one stopped by ASHA got ``done`` without test metrics;
    anything else (Ctrl-C, a kill, a lost tracking server) was interrupted."""
    last = last_result or {}
    if errored:
        return "failed"
    if "diverged_step" in last:
        return "diverged"
    if "test_loss" in last:
        return "completed"
    return "stopped_early" if last.get("done") else "interrupted"


def error_line(trial) -> str:
    """The last line of a failed trial's traceback: its one-line reason."""
    text = ""
    if trial.error_file and Path(trial.error_file).exists():
        text = Path(trial.error_file).read_text(errors="replace")
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "unknown error"


class Outbox:
    """MLflow writes of the driver, done in order. A write that fails (the tracking server went
    away) waits with everything after it and is retried with backoff; the queue lives in a JSON file
    so that a driver that stops (or is killed) before the server is back loses nothing: the next
    ``--resume`` sends it. ``gave_up`` turns true once the server has been away for ``patience_s``.

    ``background``: ``put`` only queues, and a thread of its own sends. Logging a trial's end (its
    checkpoint, plots drawn from its curves) takes ~0.6 s; done in Tune's loop, it held back the
    next trial's start on the freed cores for as long. ``storage_fs``: the pyarrow filesystem of
    Tune's storage (None: local paths), where the checkpoint paths of "end" operations live; a
    checkpoint in an object store is copied here by the sending thread too, not by Tune's loop."""

    def __init__(self, uri: str, path: Path, patience_s: float | None = None, background: bool = False,
                 storage_fs=None):
        self.uri, self.path, self.background, self.storage_fs = uri, Path(path), background, storage_fs
        self.patience_s = patience_s if patience_s is not None else float(os.environ.get("DLSWEEP_TRACKING_PATIENCE_S", 600))
        self.pending: list = []
        self.runs: dict[str, str] = {}  # trial_id -> MLflow run id
        self.logged: dict[str, dict[str, int]] = {}  # continued runs: trial_id -> metric -> last step logged before
        self.down_since: float | None = None
        self.next_try = 0.0
        self.last_error = ""
        self._client = None
        self._locks()
        self._load()

    def _locks(self) -> None:
        self._queue = threading.Lock()  # guards ``pending`` and the file
        self._sending = threading.Lock()  # one sender at a time: the thread, or a flush
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def _load(self) -> None:
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            self.pending, self.runs = saved["pending"], {**self.runs, **saved["runs"]}
            self.logged = {**self.logged, **saved.get("logged", {})}

    def __getstate__(self):
        skip = ("_client", "_queue", "_sending", "_wake", "_thread", "_closed")
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state):
        # A callback restored by Tuner.restore comes from a pickle taken when the sweep began:
        # what was queued since lives in the file.
        self.__dict__.update(state)
        self.__dict__.setdefault("storage_fs", None)  # pickled by a dlsweep whose callback fetched checkpoints itself
        self._client = None
        self._locks()
        self._load()

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    @property
    def gave_up(self) -> bool:
        return self.down_since is not None and time.time() - self.down_since > self.patience_s

    def put(self, op: str, trial_id: str, *args) -> None:
        with self._queue:
            self.pending.append([op, trial_id, *args])
            self._save()  # on disk before it is sent: a driver killed now loses nothing
        if not self.background:
            self.flush()
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dlsweep-mlflow", daemon=True)
            self._thread.start()
            SENDING.add(self)
        self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if not self._closed and time.time() >= self.next_try:
                self._send()

    def close(self) -> None:
        """Stop the sending thread (what it could not send stays in the file)."""
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        SENDING.discard(self)

    @staticmethod
    def close_all() -> None:
        """Stop every sending thread of this process (a tuner that ended without on_experiment_end)."""
        for box in list(SENDING):
            box.close()

    def flush(self, wait: bool = False) -> bool:
        """Send what is queued; True when nothing is left. ``wait``: keep retrying until sent or given up."""
        while True:
            if time.time() >= self.next_try:
                self._send()
            with self._queue:
                left = bool(self.pending)
            if not left or not wait or self.gave_up:
                return not left
            time.sleep(max(0.05, min(self.next_try - time.time(), 5.0)))

    def _send(self) -> None:
        with self._sending:
            while True:
                with self._queue:
                    if not self.pending:
                        break
                    op, trial_id, *args = self.pending[0]
                try:
                    getattr(self, "_" + op)(trial_id, *args)
                except Exception as e:  # noqa: BLE001 -- connection errors surface as many types
                    now = time.time()
                    self.down_since = self.down_since or now
                    self.next_try = now + min(30.0, 2.0 ** min(5, int(now - self.down_since) // 10 + 1))
                    self.last_error = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                    with self._queue:
                        self._save()
                    return
                with self._queue:
                    self.pending.pop(0)
                    if not self.pending:
                        self._save()
            self.down_since, self.next_try = None, 0.0

    def _save(self) -> None:
        """The queue to its file (the caller holds ``_queue``); no file when nothing is queued."""
        if self.pending:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"pending": self.pending, "runs": self.runs, "logged": self.logged}))
            tmp.replace(self.path)
        elif self.path.exists():
            self.path.unlink()

    # ---- the operations -----------------------------------------------------------------

    def _start(self, trial_id: str, experiment_id: str, parent_run_id: str, tags: dict, params: dict,
               continues: bool = False) -> None:
        """A trial's run. One that starts again after a lost node or a killed driver continues its run
        when it continues from a checkpoint (``continues``); one that starts from step 0 logs afresh,
        and its partial run is replaced."""
        old = self.client.search_runs(  # newest first
            [experiment_id],
            filter_string=f"tags.`{TAG}trial_id` = '{trial_id}' and tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'")
        if continues and old:
            run, old = old[0], old[1:]
            run_id = run.info.run_id
            attempt = tags.get(TAG + "attempt")
            if attempt is None or run.data.tags.get(TAG + "attempt") != attempt:  # not this op sent again (a replay)
                self.client.update_run(run_id, status="RUNNING")
                for key in (TAG + "outcome", TAG + "error"):  # what the stopped attempt ended with
                    if key in run.data.tags:
                        self.client.delete_tag(run_id, key)
                self.client.set_tag(run_id, TAG + "restarts", str(int(run.data.tags.get(TAG + "restarts", 0)) + 1))
                if attempt is not None:
                    self.client.set_tag(run_id, TAG + "attempt", attempt)
            # The trial reports again the evaluations after its checkpoint that the run already has.
            logged = {k: max(m.step for m in self.client.get_metric_history(run_id, k)) for k in run.data.metrics}
        else:
            run_id, logged = None, None
        with self._queue:  # put() writes these to the file from the caller's thread
            if logged is None:
                self.logged.pop(trial_id, None)
            else:
                self.logged[trial_id] = logged
        for r in old:
            self.client.delete_run(r.info.run_id)
        if run_id is None:
            run_id = self.client.create_run(experiment_id, tags=tags).info.run_id
            log_params(self.client, run_id, params)
        with self._queue:
            self.runs[trial_id] = run_id

    def _metrics(self, trial_id: str, metrics: list) -> None:
        logged = self.logged.get(trial_id, {})
        fresh = [Metric(k, v, ts, step) for k, v, ts, step in metrics if step > logged.get(k, -1)]
        if fresh:
            self.client.log_batch(self.runs[trial_id], metrics=fresh)

    def _end(self, trial_id: str, result: str, tags: dict, checkpoint: str | None, title: str, error_file: str | None) -> None:
        """A trial's end: its tags, and for a trial that ended for good its last checkpoint (``checkpoint``,
        a path in ``storage_fs``) rid of its restart state and logged with the plots, then its status."""
        run_id = self.runs[trial_id]
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)
        if result in LOGS_ARTIFACTS:
            if checkpoint is not None:
                checkpoint = self._local(checkpoint, trial_id)
            _log_artifacts(self.client, run_id, checkpoint, title)
        if error_file and Path(error_file).exists():
            self.client.log_artifact(run_id, error_file)
        status = {"failed": "FAILED", "interrupted": "KILLED"}.get(result, "FINISHED")
        self.client.set_terminated(run_id, status)
        if checkpoint and Path(checkpoint).parent.name == DOWNLOADED:  # a copy from the object store: done with
            shutil.rmtree(checkpoint, ignore_errors=True)

    def _local(self, checkpoint: str, trial_id: str) -> str | None:
        """The checkpoint (a path in ``storage_fs``) rid of its restart state, as a folder here: one in an
        object store is copied next to the queue's file first (and removed once its artifacts are
        logged). A checkpoint that cannot be had is warned about and left out: the run is still
        logged, and the queue behind it is not held up as if the tracking server were away."""
        from pyarrow import fs

        if Path(checkpoint).parent.name == DOWNLOADED and Path(checkpoint).is_dir():
            return checkpoint  # queued by a dlsweep whose callback had copied it already
        try:
            ckpt = tune.Checkpoint(checkpoint, self.storage_fs)
            drop_restart_state(ckpt)
            if isinstance(ckpt.filesystem, fs.LocalFileSystem):
                return ckpt.path
            return ckpt.to_directory(str(self.path.parent / DOWNLOADED / trial_id))
        except Exception as e:  # noqa: BLE001 -- pyarrow and the stores raise many kinds
            print(f"warning: could not fetch {trial_id}'s checkpoint {checkpoint} ({first_line(e)}); its run is logged "
                  "without it", file=sys.stderr, flush=True)
            return None


def _log_artifacts(client: MlflowClient, run_id: str, checkpoint: str | None, title: str) -> None:
    """Best checkpoint files, the loss-curve plot and, for autoencoders, the reconstruction grid (a
    run that stopped before its end leaves out its restart state)."""
    import torch  # here, not at the top: the driver's start does without matplotlib and scipy

    from . import plots

    if checkpoint is not None and Path(checkpoint).is_dir():
        for f in sorted(Path(checkpoint).iterdir()):
            if f.is_file() and f.name != RESUME:
                client.log_artifact(run_id, str(f), "checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        history = metric_history(client, run_id)
        plots.save(plots.loss_curves(history, title), Path(tmp) / "loss_curves.png")
        samples = Path(checkpoint) / "samples.pt" if checkpoint is not None else None
        if samples is not None and samples.exists():
            grid = plots.reconstruction_grid(torch.load(samples, weights_only=True), title)
            plots.save(grid, Path(tmp) / "reconstructions.png")
        client.log_artifacts(run_id, tmp, "plots")


SENDING: set[Outbox] = set()  # outboxes whose thread runs


def short_name(tags: dict) -> str:
    return tags.get("cell") or f"{tags['stage']}/seed={tags.get('seed')}"


def run_name(tags: dict) -> str:
    """A child run's name that survives the MLflow UI's narrow column: 'pretrained 100 s0', 'ae s1'
    (the whole cell is its description and its dlsweep.cell tag)."""
    if tags["stage"] != "finetune":
        return f"{tags['stage']} s{tags.get('seed')}"
    return f"{tags['arm']} {tags['labels']} s{tags['seed']}"


LOGS_ARTIFACTS = ("completed", "stopped_early", "diverged")
DOWNLOADED = "checkpoints-from-storage"  # beside the outbox: checkpoints copied from --storage to be logged


def _restart_state(checkpoint) -> str:
    """Where a Tune checkpoint of a running trial keeps train()'s restart state, in its own filesystem."""
    return f"{checkpoint.path}/{RESUME}"


def continues(checkpoint) -> bool:
    """Whether a trial that starts with this Tune checkpoint continues a run (train() resumes from it).
    Every checkpoint a running trial hands over holds the restart state, so a store that cannot be
    asked counts as yes."""
    if checkpoint is None:
        return False
    from pyarrow import fs

    try:
        return checkpoint.filesystem.get_file_info(_restart_state(checkpoint)).type != fs.FileType.NotFound
    except Exception:  # noqa: BLE001
        return True


def drop_restart_state(checkpoint) -> None:
    """A trial that ended (completed, stopped, diverged) never continues: its last checkpoint need not
    keep the weights twice and the optimizer's state in the store."""
    if checkpoint is None:
        return
    try:
        checkpoint.filesystem.delete_file(_restart_state(checkpoint))
    except Exception:  # noqa: BLE001 -- already gone (a finished run removes it), or a few megabytes left behind
        pass


class MlflowCallback(tune.Callback):
    """Logs every trial as a child run of the sweep's parent run, through an ``Outbox``; a restarted
    trial continues its run (from its checkpoint) or replaces it (from step 0), never duplicates it."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, outbox_path: Path, storage_fs=None):
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.outbox = Outbox(uri, outbox_path, background=True, storage_fs=storage_fs)
        self.open: set[str] = set()  # trials started here whose end is not logged yet

    def __setstate__(self, state):
        # Tuner.restore unpickles the callback of the tuner's start; one pickled by an older dlsweep has no ``open``.
        self.__dict__.update(state)
        self.__dict__.setdefault("open", set())

    def on_trial_start(self, iteration, trials, trial, **info):
        job = trial.config["job"]
        tags = {MLFLOW_PARENT_RUN_ID: self.parent_run_id, TAG + "trial_id": trial.trial_id,
                TAG + "attempt": uuid.uuid4().hex[:12],  # this start of the trial: a replayed op is not a restart
                **{TAG + k: str(v) for k, v in job["tags"].items()},
                MLFLOW_RUN_NAME: run_name(job["tags"]), "mlflow.note.content": short_name(job["tags"])}
        params = {**job["train"], **{f"cell.{k}": v for k, v in job["tags"].items()}}
        self.outbox.put("start", trial.trial_id, self.experiment_id, self.parent_run_id, tags, params, continues(trial.checkpoint))
        self.open.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        ts, step = int(time.time() * 1000), int(result.get("step", 0))
        self.outbox.put("metrics", trial.trial_id, [[k, v, ts, step] for k, v in numeric_metrics(result).items()])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, outcome(trial.last_result))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "failed", {TAG + "error": error_line(trial)}, trial.error_file)

    def _end(self, trial, result: str, tags: dict | None = None, error_file: str | None = None) -> None:
        # Only the checkpoint's path: the outbox's thread deletes its restart state and copies it from an
        # object store, work that held back Tune's loop (and the next trial's start) when done here.
        checkpoint = trial.checkpoint.path if result in LOGS_ARTIFACTS and trial.checkpoint is not None else None
        if checkpoint is not None and self.outbox.storage_fs is None:  # restored from an older dlsweep's pickle
            self.outbox.storage_fs = trial.checkpoint.filesystem
        tags = {TAG + "outcome": result, **(tags or {})}
        self.open.discard(trial.trial_id)
        self.outbox.put("end", trial.trial_id, result, tags, checkpoint, short_name(trial.config["job"]["tags"]), error_file)

    def on_experiment_end(self, trials, **info):
        # Trials the sweep stopped (a tracking server away too long, Ctrl-C) end without
        # on_trial_complete. One stopped after its final result, test metrics and all, is completed
        # for the runner as for Tune, so its run says so; the others were interrupted. (After a
        # Ctrl-C, Tune has saved its trials as running before this: --resume runs them again and
        # their runs are replaced, as for any trial interrupted without a restart state.)
        for trial in trials:
            if trial.trial_id in self.open:
                self._end(trial, outcome(trial.last_result))
        self.outbox.flush(wait=True)
        self.outbox.close()


class TrackingStopper(tune.Stopper):
    """Stops the whole sweep (as interrupted) once the tracking server has been away too long."""

    def __init__(self, callback: MlflowCallback):
        self.callback = callback

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.callback.outbox.gave_up  # its thread keeps trying


# What Ray 2.x says (the last line of the error, which is what a run's dlsweep.error tag keeps) of a
# trial whose actor was lost with its owner, the driver, or with its node: "The actor is dead because
# its owner has died. ... Worker exit detail: Owner's node has crashed." and "The actor died because
# its node has died. ...\n\tthe actor's node was terminated unexpectedly: <reason>".
LOST_WITH_RAY = re.compile(r"because its owner has died|because its node has died|the actor's node was terminated unexpectedly")


def end_dangling_runs(uri: str, experiment_id: str, parent_run_id: str, cluster_lost: bool = False) -> int:
    """End every child run of the parent still marked RUNNING (its driver was interrupted or killed)
    as KILLED with outcome ``interrupted``; returns how many there were. When the sweep's Ray cluster
    went away (``cluster_lost``), the runs the driver had already ended as failed because their actor
    went down with its owner or node are interrupted too: both kinds run again on --resume. (A node
    lost from a cluster that lives on leaves its trials failed, or restarted under max_failures.)"""
    client = MlflowClient(uri)
    parent = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'"
    runs = client.search_runs([experiment_id], max_results=50000, filter_string=f"{parent} and attributes.status = 'RUNNING'")
    if cluster_lost:
        failed = client.search_runs([experiment_id], max_results=50000, filter_string=f"{parent} and tags.`{TAG}outcome` = 'failed'")
        runs += [r for r in failed if LOST_WITH_RAY.search(r.data.tags.get(TAG + "error", ""))]
    for r in runs:
        client.set_tag(r.info.run_id, TAG + "outcome", "interrupted")
        client.set_terminated(r.info.run_id, "KILLED")
    return len(runs)


def delete_interrupted_runs(uri: str, experiment_id: str, parent_run_id: str) -> None:
    """Delete the runs of interrupted trials whose cells are about to run again (no duplicates)."""
    client = MlflowClient(uri)
    runs = client.search_runs([experiment_id], max_results=50000,
                              filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}' and tags.`{TAG}outcome` = 'interrupted'")
    for r in runs:
        client.delete_run(r.info.run_id)


def finish_parent(uri: str, run_id: str, status: str, tags: dict | None = None, metrics: dict | None = None) -> None:
    client = MlflowClient(uri)
    for k, v in (tags or {}).items():
        client.set_tag(run_id, TAG + k, v)
    if metrics:
        ts = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()])
    client.set_terminated(run_id, status)


def finish_sweep(uri: str, state: dict, console, summary: dict | None = None, cluster_lost: bool = False) -> None:
    """End a sweep invocation's parent run as its state's status says, with the counts by outcome
    when ``summary`` has them; runs a killed trial left open end as KILLED. A tracking server that
    does not answer is said on ``console`` (a rich Console), not raised: --resume closes them."""
    status = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}[state["status"]]
    tags = {"blocked": json.dumps(summary["blocked_arms"]),
            "blocked_searches": json.dumps(summary["blocked_searches"])} if summary else None
    metrics = None
    if summary:
        metrics = {f"trials_{k}": summary[k] for k in (*OUTCOMES, "blocked")}
        metrics["trials"] = sum(summary[k] for k in OUTCOMES)
        metrics.update(summary.get("headline", {}))
        if "wall_s" in summary:
            metrics["wall_s"] = summary["wall_s"]
    try:
        end_dangling_runs(uri, state["experiment_id"], state["parent_run_id"], cluster_lost)
        finish_parent(uri, state["parent_run_id"], status, tags, metrics)
    except Exception as e:  # noqa: BLE001 -- the tracking server may be the reason we stopped
        console.print(f"[yellow]could not close the sweep's MLflow run ({str(e).splitlines()[0][:200]}); "
                      f"--resume will[/]", highlight=False)
