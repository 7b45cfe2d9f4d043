"""The process that outlives a sweep's driver: it keeps a driver's own exit code, and speaks only
for a driver that died leaving its sweep running. Drivers here are small Python processes that end
the way Ray's core worker ends a real one (``os._exit(1)``), or by a signal; no Ray is started."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from rich.console import Console

from dlcore import tracking
from dlcore.store import write_state
from dlcore.supervisor import reap, supervise

ROOT = Path(__file__).resolve().parents[1]
AGAIN = "dlsweep run study.yaml --resume"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep_state(tmp_path: Path) -> tuple[Path, dict]:
    """A sweep's state and MLflow runs as a driver leaves them mid-sweep: parent and one trial RUNNING."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(uri, "study", tmp_path / "artifacts")
    parent = tracking.start_parent(uri, experiment, "sweep", {}, {})
    MlflowClient(uri).create_run(experiment, tags={MLFLOW_PARENT_RUN_ID: parent})
    state = {"name": "study", "parent_run_id": parent, "experiment_id": experiment, "tracking_uri": uri, "status": "running"}
    return tmp_path / "sweeps" / "study" / "state.json", state


def driver(state_path: Path, state: dict, end: str) -> list[str]:
    """A driver that saves ``state`` as its own (its pid, a Ray GCS that nobody serves), then runs ``end``."""
    code = (f"import json, os, signal; from dlcore.store import write_state; state = json.loads({json.dumps(json.dumps(state))}); "
            f"state['driver'] = {{'pid': os.getpid(), 'ray': '127.0.0.1:{free_port()}'}}; "
            f"write_state(__import__('pathlib').Path({str(state_path)!r}), state); {end}")
    return [sys.executable, "-c", code]


def test_a_driver_ended_by_ray_is_reported_in_one_line_and_its_runs_closed(tmp_path):
    state_path, state = sweep_state(tmp_path)
    proc, stopped = supervise(driver(state_path, state, "os._exit(1)"))  # as ray::QuickExit() does
    out = io.StringIO()
    assert reap(proc, state_path, AGAIN, Console(file=out, width=400)) == 1 and not stopped
    line = out.getvalue().strip()
    assert line.startswith("error: the Ray cluster at 127.0.0.1:") and len(line.splitlines()) == 1
    assert line.endswith(f"went away mid-sweep; state saved; once Ray is back, continue with: {AGAIN}")
    assert json.loads(state_path.read_text())["status"] == "interrupted"
    client = MlflowClient(state["tracking_uri"])
    runs = client.search_runs([state["experiment_id"]])
    assert {r.info.status for r in runs} == {"KILLED"}
    child = next(r for r in runs if r.info.run_id != state["parent_run_id"])
    assert child.data.tags["dlsweep.outcome"] == "interrupted"


def test_trials_the_driver_saw_die_with_the_cluster_are_interrupted_not_failed(tmp_path):
    """Tune's driver may hear a trial's actor die with its node before Ray ends the driver itself: that
    trial was lost with the cluster, not failed. A trial that failed by itself stays failed."""
    state_path, state = sweep_state(tmp_path)
    client = MlflowClient(state["tracking_uri"])
    ended = {"owner": "The actor is dead because its owner has died. Owner Id: 01 Owner Ip address: 192.0.2.2 Owner "
                      "worker exit type: SYSTEM_ERROR Worker exit detail: Owner's node has crashed.",
             "node": "\tthe actor's node was terminated unexpectedly: health check failed due to missing too many heartbeats",
             "own": "ZeroDivisionError: division by zero",
             "mentions a node": "ValueError: node 3 died in the user's own simulation"}
    ids = {}
    for name, error in ended.items():
        run = client.create_run(state["experiment_id"], tags={MLFLOW_PARENT_RUN_ID: state["parent_run_id"],
                                                              "dlsweep.outcome": "failed", "dlsweep.error": error})
        client.set_terminated(run.info.run_id, "FAILED")
        ids[name] = run.info.run_id
    proc, _ = supervise(driver(state_path, state, "os._exit(1)"))
    reap(proc, state_path, AGAIN, Console(file=io.StringIO(), width=400))
    for name in ("owner", "node"):
        lost = client.get_run(ids[name])
        assert (lost.info.status, lost.data.tags["dlsweep.outcome"]) == ("KILLED", "interrupted"), name
    for name in ("own", "mentions a node"):
        own = client.get_run(ids[name])
        assert (own.info.status, own.data.tags["dlsweep.outcome"]) == ("FAILED", "failed"), name


def test_a_driver_killed_by_a_signal_is_reported_with_the_shells_exit_code(tmp_path):
    state_path, state = sweep_state(tmp_path)
    proc, _ = supervise(driver(state_path, state, "os.kill(os.getpid(), signal.SIGKILL)"))
    out = io.StringIO()
    assert reap(proc, state_path, AGAIN, Console(file=out, width=400)) == 128 + signal.SIGKILL
    assert out.getvalue().startswith("error: the sweep driver was killed by SIGKILL mid-sweep; state saved")
    assert json.loads(state_path.read_text())["status"] == "interrupted"


def test_a_driver_that_saved_how_it_ended_keeps_its_exit_code_and_is_not_spoken_for(tmp_path):
    state_path, state = sweep_state(tmp_path)
    end = "state['status'] = 'interrupted'; write_state(__import__('pathlib').Path(" + repr(str(state_path)) + "), state); os._exit(130)"
    proc, _ = supervise(driver(state_path, state, end))
    out = io.StringIO()
    assert reap(proc, state_path, AGAIN, Console(file=out)) == 130
    assert out.getvalue() == ""
    write_state(state_path, state)  # running, but another process's: a driver that died before writing its own
    assert reap(proc, state_path, AGAIN, Console(file=out)) == 130 and out.getvalue() == ""


def test_ctrl_c_reaches_the_driver_once_and_its_exit_code_comes_back(tmp_path):
    """A terminal's Ctrl-C goes to the supervisor's whole group; the driver, in a session of its own,
    gets it once, from the supervisor, and the supervisor ends with the driver's code."""
    got = tmp_path / "got"
    child = (f"import signal, sys, time; n = []; signal.signal(signal.SIGINT, lambda *a: n.append(1)); "
             f"open({str(tmp_path / 'ready')!r}, 'w').close(); time.sleep(3); open({str(got)!r}, 'w').write(str(len(n))); "
             f"sys.exit(130)")
    parent = f"import sys; from dlcore.supervisor import supervise; sys.exit(supervise({[sys.executable, '-c', child]!r})[0].returncode)"
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT, start_new_session=True)
    deadline = time.time() + 60
    while not (tmp_path / "ready").exists() and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert got.read_text() == "1"
