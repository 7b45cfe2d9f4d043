"""The driver's MLflow writes (tracking.Outbox) against a real sqlite MLflow store."""

import time

from mlflow.tracking import MlflowClient
from ray import tune

from dlcore.store import default_uri
from dlcore import tracking


def evaluations(steps, ts=0) -> list:
    return [[k, float(step), ts, step] for step in steps for k in ("val_loss", "threads")]


def test_a_trial_continued_from_its_checkpoint_keeps_its_run_and_logs_each_evaluation_once(tmp_path):
    """A trial restarted from the checkpoint of step 20 (its node lost after it had reported step 40)
    reports steps 40..60 again: its run is the same, each step logged once, the final metrics kept,
    the outcome of the stopped attempt cleared and the restart counted, once even when a killed
    driver's queue sends that start again. One restarted from step 0 (no checkpoint) replaces its run."""
    uri = default_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "study", tmp_path / "artifacts")
    parent = tracking.start_parent(uri, exp, "sweep", {"a": 1}, {"sweep": "study"})
    box = tracking.Outbox(uri, tmp_path / "outbox.json")
    tags = {"mlflow.parentRunId": parent, "dlsweep.trial_id": "t1", "dlsweep.attempt": "a"}
    box.put("start", "t1", exp, parent, tags, {"lr": 0.1})
    first = box.runs["t1"]
    box.put("metrics", "t1", evaluations([0, 20, 40]))
    box.client.set_tag(first, "dlsweep.outcome", "interrupted")  # what a killed driver's --resume leaves
    box.client.set_terminated(first, "KILLED")

    again = tracking.Outbox(uri, tmp_path / "outbox.json")  # a new driver
    restart = {**tags, "dlsweep.attempt": "b"}  # each start of a trial has an attempt id of its own
    again.put("start", "t1", exp, parent, restart, {"lr": 0.1}, True)
    again.put("metrics", "t1", evaluations([40, 60]))
    again.put("metrics", "t1", [["test_loss", 0.5, 0, 60]])  # the final report
    client = MlflowClient(uri)
    run = client.get_run(first)
    assert again.runs["t1"] == first and run.info.status == "RUNNING"
    assert "dlsweep.outcome" not in run.data.tags and run.data.tags["dlsweep.restarts"] == "1"
    assert sorted(m.step for m in client.get_metric_history(first, "val_loss")) == [0, 20, 40, 60]
    assert sorted(m.step for m in client.get_metric_history(first, "threads")) == [0, 20, 40, 60]
    assert run.data.metrics["test_loss"] == 0.5

    replayed = tracking.Outbox(uri, tmp_path / "outbox.json")  # a driver killed before its queue file was trimmed
    replayed.put("start", "t1", exp, parent, restart, {"lr": 0.1}, True)  # the same start sent again
    assert replayed.runs["t1"] == first and client.get_run(first).data.tags["dlsweep.restarts"] == "1"
    later = {**tags, "dlsweep.attempt": "c"}  # the trial's next start: a restart
    replayed.put("start", "t1", exp, parent, later, {"lr": 0.1}, True)
    assert client.get_run(first).data.tags["dlsweep.restarts"] == "2"

    again.put("start", "t1", exp, parent, tags, {"lr": 0.1}, False)  # from step 0: a fresh run
    assert again.runs["t1"] != first and client.get_run(first).info.lifecycle_stage == "deleted"
    again.put("metrics", "t1", evaluations([0, 20]))
    assert sorted(m.step for m in client.get_metric_history(again.runs["t1"], "val_loss")) == [0, 20]


def test_a_background_outbox_sends_in_order_off_the_callers_thread_and_keeps_its_queue_on_disk(tmp_path):
    """The sweep's callback queues; a thread sends, in order. What is queued is on disk before it is
    sent (a driver killed then loses nothing), and the file goes once everything is sent."""
    uri = default_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "study", tmp_path / "artifacts")
    parent = tracking.start_parent(uri, exp, "sweep", {"a": 1}, {"sweep": "study"})
    box = tracking.Outbox(uri, tmp_path / "outbox.json", background=True)
    tags = {"mlflow.parentRunId": parent, "dlsweep.trial_id": "t1"}
    with box._sending:  # the thread cannot send while this is held: what is queued waits, on disk
        box.put("start", "t1", exp, parent, tags, {"lr": 0.1})
        box.put("metrics", "t1", evaluations([0, 20]))
        assert [op[0] for op in tracking.Outbox(uri, tmp_path / "outbox.json").pending] == ["start", "metrics"]
    assert box.flush(wait=True)
    box.close()
    assert not box._thread.is_alive() and not (tmp_path / "outbox.json").exists()
    run = box.runs["t1"]
    assert sorted(m.step for m in MlflowClient(uri).get_metric_history(run, "val_loss")) == [0, 20]


def test_trials_stopped_by_the_sweep_end_their_runs_as_their_last_results_say(tmp_path):
    """Tune ends no trial it stops for the whole sweep through on_trial_complete: the callback ends
    their runs at the experiment's end. The trial that had sent its test metrics is completed (as
    the runner counts it, so it is not run again on --resume), the other interrupted; none is left
    RUNNING. Real Ray Tune, real sqlite store."""
    import ray

    class StopAfterAFinalResult(tune.Stopper):
        """What a lost tracking server or a Ctrl-C does to a sweep, at the worst moment: everything is
        stopped right after a trial sent its final result, before it returned, while another runs."""

        def __init__(self):
            self.final, self.seen = False, set()

        def __call__(self, trial_id, result) -> bool:
            self.final, self.seen = self.final or "test_loss" in result, self.seen | {trial_id}
            return False

        def stop_all(self) -> bool:
            return self.final and len(self.seen) == 2

    def finishes_slowly(config):
        tune.report({"step": 0, "val_loss": 1.0})
        if config["job"]["fast"]:
            tune.report({"step": 10, "val_loss": 0.5, "test_loss": 0.4, "test_acc": 0.9})
        time.sleep(30)  # the final result is out; returning takes a while (a trial's last writes)

    uri = default_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "study", tmp_path / "artifacts")
    parent = tracking.start_parent(uri, exp, "sweep", {"a": 1}, {"sweep": "study"})
    callback = tracking.MlflowCallback(uri, exp, parent, tmp_path / "outbox.json")
    jobs = [{"tags": {"stage": "finetune", "arm": "scratch", "labels": n, "seed": 0, "cell": f"scratch/labels={n}"},
             "train": {"lr": 0.1}, "fast": n == 10} for n in (10, 20)]
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tune.Tuner(finishes_slowly,
                   param_space={"job": tune.grid_search(jobs)},
                   run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), callbacks=[callback], stop=StopAfterAFinalResult(),
                                             verbose=0)).fit()
    finally:
        ray.shutdown()
    runs = {r.data.tags["dlsweep.cell"]: r for r in MlflowClient(uri).search_runs([exp]) if r.info.run_id != parent}
    assert runs["scratch/labels=10"].data.tags["dlsweep.outcome"] == "completed"
    assert runs["scratch/labels=10"].info.status == "FINISHED"
    assert runs["scratch/labels=20"].data.tags["dlsweep.outcome"] == "interrupted"
    assert runs["scratch/labels=20"].info.status == "KILLED"


def test_a_callback_pickled_by_an_older_dlsweep_is_restored_with_no_trial_open(tmp_path):
    """Tuner.restore unpickles the callback pickled at the tuner's start: one from before the callback
    kept its open trials has no such set, and gets an empty one."""
    import pickle

    uri = default_uri(tmp_path)
    callback = tracking.MlflowCallback(uri, "0", "parent", tmp_path / "outbox.json")
    del callback.open
    del callback.outbox.storage_fs
    restored = pickle.loads(pickle.dumps(callback))
    assert restored.open == set() and restored.outbox.path == tmp_path / "outbox.json"
    assert restored.outbox.storage_fs is None  # its trials' checkpoints: their own filesystem, at their end


def test_a_trial_end_logs_its_checkpoint_from_the_storage_without_its_restart_state(tmp_path):
    """The "end" operation gets only the checkpoint's path in Tune's storage; the outbox (on its own
    thread in a sweep) deletes the restart state there, copies a checkpoint that is not on a local
    filesystem next to its queue, logs it, and removes the copy. An object store stands in as a
    pyarrow filesystem that is not LocalFileSystem (a subtree of a folder)."""
    from pyarrow import fs

    uri = default_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "study", tmp_path / "artifacts")
    parent = tracking.start_parent(uri, exp, "sweep", {"a": 1}, {"sweep": "study"})
    bucket = tmp_path / "bucket"
    for where, storage_fs, trial in [(tmp_path / "local", None, "t1"),
                                     (bucket, fs.SubTreeFileSystem(str(bucket), fs.LocalFileSystem()), "t2")]:
        ckpt = where / "ray" / trial / "checkpoint_000003"
        ckpt.mkdir(parents=True)
        (ckpt / "model.pt").write_bytes(b"weights")
        (ckpt / tracking.RESUME).write_bytes(b"weights and optimizer")
        box = tracking.Outbox(uri, tmp_path / "sweeps" / "outbox.json", storage_fs=storage_fs)
        box.put("start", trial, exp, parent, {"mlflow.parentRunId": parent, "dlsweep.trial_id": trial}, {"lr": 0.1})
        path = str(ckpt) if storage_fs is None else f"ray/{trial}/checkpoint_000003"
        box.put("end", trial, "completed", {"dlsweep.outcome": "completed"}, path, trial, None)
        run = MlflowClient(uri).get_run(box.runs[trial])
        assert run.info.status == "FINISHED" and run.data.tags["dlsweep.outcome"] == "completed"
        logged = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, "checkpoint")}
        assert logged == {"checkpoint/model.pt"}, logged
        assert not (ckpt / tracking.RESUME).exists() and (ckpt / "model.pt").exists()
        assert not (tmp_path / "sweeps" / tracking.DOWNLOADED / trial).exists()
    # A checkpoint that cannot be had (gone from the store) is left out, with a warning: the run still
    # ends, and the queue is not held up as if the tracking server were away.
    box.put("start", "t3", exp, parent, {"mlflow.parentRunId": parent, "dlsweep.trial_id": "t3"}, {"lr": 0.1})
    box.put("end", "t3", "completed", {"dlsweep.outcome": "completed"}, "ray/t3/checkpoint_000001", "t3", None)
    assert not box.pending and MlflowClient(uri).get_run(box.runs["t3"]).info.status == "FINISHED"
    assert not MlflowClient(uri).list_artifacts(box.runs["t3"], "checkpoint")
