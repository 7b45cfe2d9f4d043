"""The driver's MLflow writes (tracking.Outbox) against a real sqlite MLflow store."""

from mlflow.tracking import MlflowClient

from dlcore import tracking


def evaluations(steps, ts=0) -> list:
    return [[k, float(step), ts, step] for step in steps for k in ("val_loss", "threads")]


def test_a_trial_continued_from_its_checkpoint_keeps_its_run_and_logs_each_evaluation_once(tmp_path):
    """A trial restarted from the checkpoint of step 20 (its node lost after it had reported step 40)
    reports steps 40..60 again: its run is the same, each step logged once, the final metrics kept,
    the outcome of the stopped attempt cleared and the restart counted. One restarted from step 0
    (no checkpoint) replaces its run."""
    uri = tracking.default_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "study", tmp_path / "artifacts")
    parent = tracking.start_parent(uri, exp, "sweep", {"a": 1}, {"sweep": "study"})
    box = tracking.Outbox(uri, tmp_path / "outbox.json")
    tags = {"mlflow.parentRunId": parent, "dlsweep.trial_id": "t1"}
    box.put("start", "t1", exp, parent, tags, {"lr": 0.1})
    first = box.runs["t1"]
    box.put("metrics", "t1", evaluations([0, 20, 40]))
    box.client.set_tag(first, "dlsweep.outcome", "interrupted")  # what a killed driver's --resume leaves
    box.client.set_terminated(first, "KILLED")

    again = tracking.Outbox(uri, tmp_path / "outbox.json")  # a new driver
    again.put("start", "t1", exp, parent, tags, {"lr": 0.1}, True)
    again.put("metrics", "t1", evaluations([40, 60]))
    again.put("metrics", "t1", [["test_loss", 0.5, 0, 60]])  # the final report
    client = MlflowClient(uri)
    run = client.get_run(first)
    assert again.runs["t1"] == first and run.info.status == "RUNNING"
    assert "dlsweep.outcome" not in run.data.tags and run.data.tags["dlsweep.restarts"] == "1"
    assert sorted(m.step for m in client.get_metric_history(first, "val_loss")) == [0, 20, 40, 60]
    assert sorted(m.step for m in client.get_metric_history(first, "threads")) == [0, 20, 40, 60]
    assert run.data.metrics["test_loss"] == 0.5

    again.put("start", "t1", exp, parent, tags, {"lr": 0.1}, False)  # from step 0: a fresh run
    assert again.runs["t1"] != first and client.get_run(first).info.lifecycle_stage == "deleted"
    again.put("metrics", "t1", evaluations([0, 20]))
    assert sorted(m.step for m in client.get_metric_history(again.runs["t1"], "val_loss")) == [0, 20]


def test_a_background_outbox_sends_in_order_off_the_callers_thread_and_keeps_its_queue_on_disk(tmp_path):
    """The sweep's callback queues; a thread sends, in order. What is queued is on disk before it is
    sent (a driver killed then loses nothing), and the file goes once everything is sent."""
    uri = tracking.default_uri(tmp_path)
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
