"""Real sweeps on a local Ray, real MNIST and a real sqlite MLflow store."""

import csv
import json
import os
import shutil
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from dlcore.cli import app

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "data": {"dataset": "mnist", "val_size": 500, "test_size": 1000},
    "pretrain": {"ae": {"objective": "autoencoder", "steps": 30, "eval_every": 15, "batch_size": 64,
                        "encoder_args": {"latent_dim": 8}}},
    "finetune": {
        "arms": {"scratch": {}, "pretrained": {"from": "ae"}},
        "labels": [20, 50],
        "steps": [40],
        "seeds": [0],
        "samples": 3,
        "batch_size": 32,
        "eval_every": 10,
        "encoder_args": {"latent_dim": 8},
        "search": {"lr": {"loguniform": [1e-6, 3e-2]}},
    },
    "asha": {"grace_period": 10, "reduction_factor": 3},
    "resources": {"cpu": 1},
}


def child_runs(store: Path, experiment: str, parent: str | None = None):
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return client, [r for r in runs if r.data.tags.get("mlflow.parentRunId") and
                    (parent is None or r.data.tags["mlflow.parentRunId"] == parent)]


@pytest.fixture
def tiny_sweep(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_sweep_end_to_end_logs_every_trial_and_reuses_pretraining(tiny_sweep, tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("DLSWEEP_DATA_DIR", data_dir)
    store = tmp_path / "store"
    runner = CliRunner()
    first = runner.invoke(app, ["run", str(tiny_sweep), "--store", str(store)])
    assert first.exit_code == 0, first.output
    state = json.loads((store / "sweeps" / "tiny" / "state.json").read_text())
    assert state["status"] == "finished"
    client, runs = child_runs(store, "tiny", state["parent_run_id"])
    stages = [r.data.tags["dlsweep.stage"] for r in runs]
    assert stages.count("ae") == 1  # pretraining ran once for its one (config, seed)
    finetune = [r for r in runs if r.data.tags["dlsweep.stage"] == "finetune"]
    assert len(finetune) == 2 * 2 * 3  # arms x budgets x samples
    # the parent run summarises the sweep: the file's keys (no defaults, no nulls), counts, headline numbers
    parent = client.get_run(state["parent_run_id"])
    assert "null" not in parent.data.params.values() and parent.data.params["sweep.file"] == str(tiny_sweep)
    assert parent.data.params["sweep.profile"] == "none" and "finetune.head_hidden" not in parent.data.params
    m = parent.data.metrics
    assert m["trials"] == 1 + 12 and m["trials_completed"] + m["trials_stopped_early"] == 13 and m["wall_s"] > 0
    assert {f"test_acc.{a}.labels_{n}" for a in ("scratch", "pretrained") for n in (20, 50)} <= set(m)
    assert 0.1 < m["test_acc.pretrained.labels_50"] <= 1
    # child runs have names a narrow column can tell apart, the whole cell as their description
    names = {r.info.run_name for r in finetune}
    assert names == {f"{a} {n} s0" for a in ("scratch", "pretrained") for n in (20, 50)}
    assert all(r.data.tags["mlflow.note.content"] == r.data.tags["dlsweep.cell"] for r in finetune)
    cells = {r.data.tags["dlsweep.cell"] for r in finetune}
    assert cells == {f"{a}/labels={n}/steps=40/seed=0" for a in ("scratch", "pretrained") for n in (20, 50)}
    for r in finetune:
        p = r.data.params
        assert p["labels"] in ("20", "50") and p["steps"] == "40" and p["seed"] == "0" and "lr" in p
        assert (p.get("init_encoder") is not None) == (r.data.tags["dlsweep.arm"] == "pretrained")
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")][:2] == [0, 10]  # step 0: untrained
    outcomes = [r.data.tags["dlsweep.outcome"] for r in finetune]
    assert "stopped_early" in outcomes  # ASHA cut some trials inside their cells
    done = [r for r in finetune if r.data.tags["dlsweep.outcome"] == "completed"]
    assert done and all("test_acc" in r.data.metrics for r in done)
    assert all(0 < r.data.metrics["eval_s"] < r.data.metrics["wall_s"] for r in done)  # the benchmark's eval share
    arts = {a.path for a in client.list_artifacts(done[0].info.run_id, "checkpoint")}
    assert {"checkpoint/model.pt", "checkpoint/encoder.pt"} <= arts
    ae_run = next(r for r in runs if r.data.tags["dlsweep.stage"] == "ae")
    assert {a.path for a in client.list_artifacts(ae_run.info.run_id, "plots")} == {
        "plots/loss_curves.png", "plots/reconstructions.png"}

    rep = runner.invoke(app, ["report", str(tiny_sweep), "--store", str(store), "--out", str(tmp_path / "report")])
    assert rep.exit_code == 0, rep.output
    assert "pretraining stage ae: test loss" in rep.output
    for name in ("accuracy_vs_labels.png", "accuracy_vs_steps.svg", "reconstructions.png", "loss_curves_ae.png", "report.md"):
        assert (tmp_path / "report" / name).exists(), name
    summary = (tmp_path / "report" / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("arm,labels,steps,seeds,test_acc_mean") and len(summary) == 1 + 4

    second = runner.invoke(app, ["run", str(tiny_sweep), "--store", str(store), "--set", "finetune.samples=1"])
    assert second.exit_code == 0, second.output
    assert "reusing cached encoder" in second.output and "pretrain: 1 run" not in second.output
    state2 = json.loads((store / "sweeps" / "tiny" / "state.json").read_text())
    _, runs2 = child_runs(store, "tiny", state2["parent_run_id"])
    assert [r.data.tags["dlsweep.stage"] for r in runs2].count("ae") == 0  # the second run pretrained nothing
    assert len(runs2) == 4


def tune_state(store: Path) -> tuple[set[str], list[Path]]:
    """From Tune's last saved experiment state: the trials it has finished, and the checkpoint folders
    of those it has not (what a --resume continues them from)."""
    states = sorted(store.glob("ray/tiny/*/study-0/experiment_state-*.json"))
    try:
        trials = [json.loads(t) for t, _ in json.loads(states[-1].read_text())["trial_data"]] if states else []
    except (OSError, ValueError):  # being written
        return set(), []
    return ({t["trial_id"] for t in trials if t["status"] == "TERMINATED"},
            [c for t in trials if t["status"] != "TERMINATED"
             for c in store.glob(f"ray/tiny/*/study-0/run_trial_{t['trial_id']}_*/checkpoint_*")])


def test_resume_after_kill_reruns_nothing_finished(tiny_sweep, tmp_path, data_dir):
    """A kill mid-sweep: --resume reruns only what had not finished, including a trial whose last
    checkpoint is gone (Tune deletes the previous one before its saved state names the next: a kill
    in between left every --resume failing that trial); it starts again from step 0."""
    raw = yaml.safe_load(tiny_sweep.read_text())
    raw["finetune"].update(samples=2, steps=[300], eval_every=100, search={})
    raw["asha"]["enabled"] = False
    tiny_sweep.write_text(yaml.safe_dump(raw))
    store = tmp_path / "store"
    env = {**os.environ, "DLSWEEP_DATA_DIR": data_dir}
    cmd = [sys.executable, "-m", "dlcore.cli", "run", str(tiny_sweep), "--store", str(store)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    finished_before = []
    while time.time() < deadline:
        time.sleep(0.5)
        if not (store / "mlflow.db").exists() or not (store / "sweeps" / "tiny" / "state.json").exists():
            continue
        try:
            _, runs = child_runs(store, "tiny")
        except Exception:  # the store is still being created
            continue
        finished_before = [r for r in runs if r.data.tags.get("dlsweep.outcome") == "completed"
                           and r.data.tags["dlsweep.stage"] == "finetune"]
        finished, unfinished = tune_state(store)
        # Killed once Tune's saved state has the finished trials and a trial it would resume from a checkpoint
        if len(finished_before) >= 2 and {r.data.tags["dlsweep.trial_id"] for r in finished_before} <= finished and unfinished:
            break
    assert proc.poll() is None, proc.stdout.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _, runs = child_runs(store, "tiny")
    finished, lost = tune_state(store)  # the driver is dead: the state --resume reads
    finished_before = {r.info.run_id: r.data.tags["dlsweep.trial_id"] for r in runs
                       if r.data.tags.get("dlsweep.outcome") == "completed" and r.data.tags["dlsweep.stage"] == "finetune"
                       and r.data.tags["dlsweep.trial_id"] in finished}
    assert 2 <= len(finished_before) < 8
    assert lost
    for c in lost:  # the race's end state: the saved experiment state names checkpoints that are gone
        shutil.rmtree(c)

    resumed = subprocess.run(cmd + ["--resume"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming tiny" in resumed.stdout
    assert "its last checkpoint is gone from the store" in resumed.stdout and "starts again from step 0" in resumed.stdout
    state = json.loads((store / "sweeps" / "tiny" / "state.json").read_text())
    assert state["status"] == "finished"
    _, runs = child_runs(store, "tiny", state["parent_run_id"])
    finetune = [r for r in runs if r.data.tags["dlsweep.stage"] == "finetune"]
    assert len(finetune) == 8  # no duplicates
    assert len({r.data.tags["dlsweep.trial_id"] for r in finetune}) == 8
    assert all(r.data.tags.get("dlsweep.outcome") == "completed" for r in finetune)
    ids = {r.info.run_id for r in finetune}
    assert set(finished_before) <= ids  # finished trials kept their runs: they were not rerun

    again = subprocess.run(cmd + ["--resume"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "nothing to resume" in again.stderr


def test_sweep_joins_a_multi_node_cluster_with_address(tiny_sweep, tmp_path, data_dir):
    from ray.cluster_utils import Cluster

    raw = yaml.safe_load(tiny_sweep.read_text())
    raw["finetune"].update(samples=1, search={})
    raw["resources"] = {"cpu": 2, "gpu": 0.5}  # more than any node has: shrunk with a warning, not a hang
    tiny_sweep.write_text(yaml.safe_dump(raw))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        env = {**os.environ, "DLSWEEP_DATA_DIR": data_dir}
        store = tmp_path / "store"
        result = subprocess.run([sys.executable, "-m", "dlcore.cli", "run", str(tiny_sweep), "--store", str(store),
                                 "--address", cluster.address], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "resources.cpu 2.0 > 1.0 CPU(s) per node: trials get 1.0" in result.stdout
        assert "resources.gpu 0.5 > 0 GPU(s) per node: trials get 0 and run on CPU" in result.stdout
        state = json.loads((store / "sweeps" / "tiny" / "state.json").read_text())
        _, runs = child_runs(store, "tiny", state["parent_run_id"])
        assert len(runs) == 1 + 4 and all(r.data.tags["dlsweep.outcome"] == "completed" for r in runs)
    finally:
        cluster.shutdown()


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tiny_sweep, tmp_path, data_dir):
    raw = yaml.safe_load(tiny_sweep.read_text())
    del raw["pretrain"]
    raw["finetune"].update(arms={"scratch": {}}, samples=1, steps=[3000], eval_every=100, search={})
    tiny_sweep.write_text(yaml.safe_dump(raw))
    store = tmp_path / "store"
    env = {**os.environ, "DLSWEEP_DATA_DIR": data_dir}
    # Named by a --set, which the line that says how to continue must carry (else it names another sweep).
    proc = subprocess.Popen([sys.executable, "-m", "dlcore.cli", "run", str(tiny_sweep), "--set", "name=renamed", "--store",
                             str(store)], env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((store / "ray").glob("*/*/study-*/*/checkpoint_*")):
        time.sleep(0.5)  # until a trial has reported
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    again = out.split("continue with: ")[1].splitlines()[0]
    assert shlex.split(again) == ["dlsweep", "run", str(tiny_sweep), "--resume", "--set", "name=renamed", "--store", str(store)]
    assert json.loads((store / "sweeps" / "renamed" / "state.json").read_text())["status"] == "interrupted"
    assert "Traceback" not in out
    _, runs = child_runs(store, "renamed")
    assert runs and all(r.info.status != "RUNNING" for r in runs)  # interrupted runs are ended, not left open
    assert {r.data.tags["dlsweep.outcome"] for r in runs} <= {"completed", "interrupted"}

    # One Ctrl-C during the resumed tuner stops the whole invocation: no next tuner starts the trial again.
    seen = set(store.glob("ray/*/*/study-*/*/checkpoint_*"))
    proc = subprocess.Popen([sys.executable, "-m", "dlcore.cli", *shlex.split(again)[1:]],  # the line, as pasted
                            env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not set(store.glob("ray/*/*/study-*/*/checkpoint_*")) - seen:
        time.sleep(0.5)  # until the restored trial has reported again
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    state = json.loads((store / "sweeps" / "renamed" / "state.json").read_text())
    assert state["status"] == "interrupted" and state["tuners"] == ["study-0"], out
    assert "still owed" not in out and "not used" not in out  # the pasted line gives what the sweep was run with


def test_search_scope_cell_gives_the_other_seeds_the_first_seeds_pick(tiny_sweep, tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("DLSWEEP_DATA_DIR", data_dir)
    raw = yaml.safe_load(tiny_sweep.read_text())
    raw["data"].update(val_size=300, test_size=500)
    raw["pretrain"]["ae"].update(steps=20, eval_every=10)
    raw["finetune"].update(labels=[20], steps=[20], seeds=[0, 1], samples=2, search_scope="cell")
    raw["asha"]["enabled"] = False
    tiny_sweep.write_text(yaml.safe_dump(raw))
    store = tmp_path / "store"
    result = CliRunner().invoke(app, ["run", str(tiny_sweep), "--store", str(store)])
    assert result.exit_code == 0, result.output
    state = json.loads((store / "sweeps" / "tiny" / "state.json").read_text())
    _, runs = child_runs(store, "tiny", state["parent_run_id"])
    assert len(runs) == 2 + 2 * 2 + 2  # ae per seed, 2 samples per arm on seed 0, 1 trial per arm on seed 1
    finetune = [r for r in runs if r.data.tags["dlsweep.stage"] == "finetune"]
    assert {r.data.tags["dlsweep.search_scope"] for r in finetune} == {"cell"}
    for arm in ("scratch", "pretrained"):
        searched = [r for r in finetune if r.data.tags["dlsweep.cell"] == f"{arm}/labels=20/steps=20/seed=0"]
        (follower,) = [r for r in finetune if r.data.tags["dlsweep.cell"] == f"{arm}/labels=20/steps=20/seed=1"]
        assert len(searched) == 2 and len({r.data.params["lr"] for r in searched}) == 2
        assert all(r.data.tags["dlsweep.outcome"] == "completed" and "dlsweep.search_from_seed" not in r.data.tags
                   for r in searched)
        best = max(r.data.metrics["best_val_acc"] for r in searched)
        assert follower.data.params["lr"] in {r.data.params["lr"] for r in searched if r.data.metrics["best_val_acc"] == best}
        assert follower.data.tags["dlsweep.search_from_seed"] == "0"

    out = tmp_path / "report"
    rep = CliRunner().invoke(app, ["report", str(tiny_sweep), "--store", str(store), "--out", str(out)])
    assert rep.exit_code == 0, rep.output
    rows = {r["arm"]: r for r in csv.DictReader((out / "summary.csv").open())}
    for arm, row in rows.items():
        follower = next(r for r in finetune if r.data.tags["dlsweep.cell"] == f"{arm}/labels=20/steps=20/seed=1")
        assert row["hyperparameters"] == f"lr={float(follower.data.params['lr']):.3g} (searched on seed 0, shared by all seeds)"
    assert "searched on seed 0 only" in (out / "report.md").read_text()


def test_step_budgets_read_off_one_run_through_the_whole_pipeline(tmp_path, data_dir, monkeypatch):
    """steps: [20, 40] under a constant schedule: one 40-step run per cell, whose MLflow run carries the
    20-step result (at20/...), and a report with both step budgets, the 20-step numbers read off."""
    monkeypatch.setenv("DLSWEEP_DATA_DIR", data_dir)
    raw = {"data": {"dataset": "mnist", "val_size": 500, "test_size": 500},
           "finetune": {"arms": {"scratch": {}}, "labels": [50], "steps": [20, 40], "seeds": [0, 1], "samples": 1,
                        "batch_size": 32, "eval_every": 10, "encoder_args": {"latent_dim": 8}},
           "asha": {"enabled": False}, "resources": {"cpu": 1}}
    path = tmp_path / "steps.yaml"
    path.write_text(yaml.safe_dump(raw))
    store = tmp_path / "store"
    result = CliRunner().invoke(app, ["run", str(path), "--store", str(store)])
    assert result.exit_code == 0, result.output
    client, runs = child_runs(store, "steps")
    assert len(runs) == 2 and {r.data.tags["dlsweep.steps"] for r in runs} == {"40"}  # one run per seed
    for r in runs:
        m = r.data.metrics
        assert r.data.tags["dlsweep.step_budgets"] == "20" and 0 < m["at20/test_acc"] <= 1
        assert m["at20/best_step"] <= 20 and m["labels_total"] == 50 and m["labels_val"] >= 10  # realistic
    out = tmp_path / "report"
    rep = CliRunner().invoke(app, ["report", str(path), "--store", str(store), "--out", str(out)])
    assert rep.exit_code == 0, rep.output
    with open(out / "summary.csv") as f:
        rows = {int(r["steps"]): r for r in csv.DictReader(f)}
    assert set(rows) == {20, 40} and rows[20]["labels_total"] == rows[40]["labels_total"] == "50"
    at20 = sorted(r.data.metrics["at20/test_acc"] for r in runs)
    assert float(rows[20]["test_acc_mean"]) == pytest.approx(sum(at20) / 2, abs=1e-4)
    assert (out / "accuracy_vs_step_budget.png").exists()
    assert "the step budgets 20 are read off each 40-step run" in (out / "report.md").read_text()


def test_fewer_trials_than_cpu_slots_share_out_the_cores():
    from dlcore.runner import share_cores

    assert share_cores(1, 1, 2) == 2.0  # the only trial gets both cores
    assert share_cores(1, 2, 2) == 1  # two trials, one core each
    assert share_cores(1, 3, 8) == 2.0 and share_cores(1, 99, 8) == 1  # whole CPUs; a big sweep keeps its request
    assert share_cores(2, 1, 2) == 2 and share_cores(0.5, 3, 2) == 0.5  # already the node / enough trials to fill it


def test_a_trial_borrows_the_cores_no_trial_holds_and_gives_them_back():
    """threads_for: a trial holding 1 of 2 CPUs runs 2 threads while nothing holds the other, 1 once
    another trial takes it, 2 again when that one ends (Ray's accounting, read on a local Ray)."""
    import ray

    from dlcore.trial import threads_for

    if ray.is_initialized():  # left by an earlier test
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote(num_cpus=1)
        class Trial:
            def __init__(self):
                self.threads = threads_for(1.0, 1)

            def ask(self) -> int:
                return self.threads()

        def settles(actor, want: int) -> bool:  # the accounting lags a placement by up to a heartbeat
            deadline = time.time() + 10
            while time.time() < deadline:
                if ray.get(actor.ask.remote()) == want:
                    return True
                time.sleep(0.2)
            return False

        first = Trial.remote()
        assert settles(first, 2)
        second = Trial.remote()
        assert settles(first, 1) and settles(second, 1)
        ray.kill(second)
        assert settles(first, 2)
    finally:
        ray.shutdown()


def test_a_trial_actor_imports_what_training_needs_and_not_the_drivers_stack():
    """Each trial actor imports dlcore.trial when it starts: torch, the core and Tune, not MLflow,
    Optuna or the plotting stack (they cost a new actor seconds); the driver's tracking draws its
    plots without importing matplotlib at start either."""
    trial = subprocess.run([sys.executable, "-c", "import sys, dlcore.trial; print(sorted(m for m in "
                            "('mlflow', 'optuna', 'matplotlib', 'scipy.stats', 'dlcore.runner') if m in sys.modules))"],
                           cwd=ROOT, capture_output=True, text=True, check=True)
    assert trial.stdout.strip() == "[]"
    driver = subprocess.run([sys.executable, "-c", "import sys, dlcore.runner; print(sorted(m for m in "
                             "('matplotlib', 'scipy.stats') if m in sys.modules))"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    assert driver.stdout.strip() == "[]"


def test_a_failed_sweep_waits_for_its_clusters_gcs_only_where_the_cluster_may_be_going():
    from types import SimpleNamespace

    from dlcore.runner import cluster_wait_s, lost_with_ray

    owner_died = RuntimeError("The actor is dead because its owner has died. Owner Id: 01 Worker exit detail: "
                              "Owner's node has crashed.")
    with_node = RuntimeError("The actor died because its node has died.\n\tthe actor's node was terminated unexpectedly: x")
    results = [SimpleNamespace(error=None), SimpleNamespace(error=ValueError("lr must be positive"))]
    assert not lost_with_ray(results)
    assert lost_with_ray(results + [SimpleNamespace(error=owner_died)])
    assert lost_with_ray([SimpleNamespace(error=with_node)])
    assert cluster_wait_s(joined=False, failed=2, lost=True) == 0  # a private Ray: nothing outlives the driver
    assert cluster_wait_s(joined=True, failed=0, lost=False) == 0
    assert cluster_wait_s(joined=True, failed=1, lost=False) == 3.0
    assert cluster_wait_s(joined=True, failed=1, lost=True) == 30.0
