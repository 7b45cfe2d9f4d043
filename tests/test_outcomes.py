"""Honest outcomes on a real local Ray, real MNIST and real MLflow stores: failed, diverged and
blocked trials, a damaged pretrain cache, a tracking server that is down or goes away, and a Ray
cluster the sweep must not join."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
FAULTS = Path(__file__).resolve().parent / "faults"

SWEEP = {
    "data": {"dataset": "mnist", "val_size": 300, "test_size": 500},
    "pretrain": {"ae": {"objective": "autoencoder", "steps": 20, "eval_every": 10, "batch_size": 64,
                        "encoder_args": {"latent_dim": 8}}},
    "finetune": {
        "arms": {"scratch": {}, "pretrained": {"from": "ae"}},
        "labels": [20, 50], "steps": [20], "seeds": [0], "samples": 1,
        "batch_size": 32, "eval_every": 10, "encoder_args": {"latent_dim": 8},
    },
    "asha": {"enabled": False},
    "resources": {"cpu": 1},
}


def write(tmp_path, raw=SWEEP, name="study"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def dlsweep(args, data_dir, fault=None, timeout=400, **env):
    extra = {"DLSWEEP_DATA_DIR": data_dir, **env}
    if fault:
        extra.update(DLSWEEP_TEST_FAULT=fault, PYTHONPATH=os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "dlcore.cli", *map(str, args)], cwd=ROOT, env={**os.environ, **extra},
                          capture_output=True, text=True, timeout=timeout)


def runs_of(uri: str, experiment: str = "study") -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000) if r.data.tags.get("mlflow.parentRunId")]


def state_of(store: Path, name: str = "study") -> dict:
    return json.loads((store / "sweeps" / name / "state.json").read_text())


def sqlite(store: Path) -> str:
    return f"sqlite:///{store / 'mlflow.db'}"


def test_failed_trials_exit_1_and_resume_reruns_only_them(tmp_path, data_dir):
    path, store = write(tmp_path), tmp_path / "store"
    first = dlsweep(["run", path, "--store", store], data_dir, fault="objective == 'classify' and labels == 20")
    assert first.returncode == 1, first.stdout + first.stderr
    assert "2 failed" in first.stderr and "rerun failed trials with: dlsweep run" in first.stderr
    assert "injected fault" in first.stdout  # the one-line reason, in the terminal
    assert "Traceback" not in first.stdout + first.stderr
    assert state_of(store)["status"] == "failed"
    before = {r.data.tags["dlsweep.cell"]: r for r in runs_of(sqlite(store)) if r.data.tags["dlsweep.stage"] == "finetune"}
    failed = {c: r for c, r in before.items() if "labels=20" in c}
    assert {r.data.tags["dlsweep.outcome"] for r in failed.values()} == {"failed"}
    assert all(r.info.status == "FAILED" and "injected fault" in r.data.tags["dlsweep.error"] for r in failed.values())
    done = {c: r.info.run_id for c, r in before.items() if "labels=50" in c}
    assert {before[c].data.tags["dlsweep.outcome"] for c in done} == {"completed"}

    again = dlsweep(["run", path, "--store", store, "--resume"], data_dir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert state_of(store)["status"] == "finished"
    after = [r for r in runs_of(sqlite(store)) if r.data.tags["dlsweep.stage"] == "finetune"]
    assert len(after) == 4 and {r.data.tags["dlsweep.outcome"] for r in after} == {"completed"}
    assert {c: r.info.run_id for c in done for r in after if r.data.tags["dlsweep.cell"] == c} == done  # not rerun
    assert all(r.info.status != "RUNNING" for r in runs_of(sqlite(store)))
    parent = MlflowClient(sqlite(store)).get_run(state_of(store)["parent_run_id"])
    assert parent.data.metrics["trials_completed"] == 1 + 4 and parent.data.metrics["trials_failed"] == 0


def test_failed_pretraining_blocks_its_arms_then_resume_runs_them(tmp_path, data_dir):
    path, store = write(tmp_path), tmp_path / "store"
    first = dlsweep(["run", path, "--store", store], data_dir, fault="objective == 'autoencoder'")
    assert first.returncode == 1, first.stdout + first.stderr
    assert "blocked: arms pretrained (stage ae failed or diverged)" in first.stderr
    assert not list((store / "pretrain_cache").glob("ae-*"))
    runs = runs_of(sqlite(store))
    assert {r.data.tags["dlsweep.arm"] for r in runs if r.data.tags["dlsweep.stage"] == "finetune"} == {"scratch"}
    parent = MlflowClient(sqlite(store)).get_run(state_of(store)["parent_run_id"])
    assert json.loads(parent.data.tags["dlsweep.blocked"]) == ["pretrained"] and parent.data.metrics["trials_blocked"] == 2

    again = dlsweep(["run", path, "--store", store, "--resume"], data_dir)
    assert again.returncode == 0, again.stdout + again.stderr
    finetune = [r for r in runs_of(sqlite(store)) if r.data.tags["dlsweep.stage"] == "finetune"]
    assert sorted(r.data.tags["dlsweep.arm"] for r in finetune) == ["pretrained", "pretrained", "scratch", "scratch"]
    assert all(r.data.tags["dlsweep.outcome"] == "completed" for r in finetune)


def test_a_first_seed_search_without_a_completed_trial_blocks_the_other_seeds_until_resume(tmp_path, data_dir):
    """search_scope cell, everything of seed 0 failing: the pretrained arm's seed-1 cell waits on a stage that
    failed, the scratch arm's on a search with no completed trial. --resume reruns what failed, then a
    new tuner runs the pretrained arm's search and its seed 1, and the scratch seed 1 with the pick
    reconstructed from the results of the earlier tuner."""
    raw = {**SWEEP, "finetune": {**SWEEP["finetune"], "labels": [20], "seeds": [0, 1], "samples": 2, "search_scope": "cell",
                                  "search": {"lr": {"loguniform": [1e-4, 1e-2]}}}}
    path, store = write(tmp_path, raw), tmp_path / "store"
    first = dlsweep(["run", path, "--store", store], data_dir, fault="seed == 0")
    assert first.returncode == 1, first.stdout + first.stderr
    assert "3 failed, 4 blocked; blocked: arms pretrained (stage ae failed or diverged); the other seeds of " \
           "scratch/labels=20/steps=20/seed=0 (its search completed no trial)" in first.stderr
    assert "seed=1" not in " ".join(r.data.tags.get("dlsweep.cell", "") for r in runs_of(sqlite(store)))
    parent = MlflowClient(sqlite(store)).get_run(state_of(store)["parent_run_id"])
    assert json.loads(parent.data.tags["dlsweep.blocked_searches"]) == ["scratch/labels=20/steps=20/seed=0"]
    assert parent.data.metrics["trials_blocked"] == 4 and parent.data.metrics["trials_failed"] == 3
    rep = dlsweep(["report", path, "--store", store, "--out", tmp_path / "report"], data_dir)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert ("**1 cell(s) blocked (the search on seed 0 completed no trial):** scratch/labels=20/steps=20/seed=1"
            in (tmp_path / "report" / "report.md").read_text())

    again = dlsweep(["run", path, "--store", store, "--resume"], data_dir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert state_of(store)["tuners"] == ["study-0", "study-1"] and "study-1: 0 pretraining run(s), 3 grid cells, 4 trials" in again.stdout
    finetune = [r for r in runs_of(sqlite(store)) if r.data.tags["dlsweep.stage"] == "finetune"]
    assert len(finetune) == 2 * 2 + 2 and {r.data.tags["dlsweep.outcome"] for r in finetune} == {"completed"}
    for arm in ("scratch", "pretrained"):
        searched = [r for r in finetune if r.data.tags["dlsweep.cell"] == f"{arm}/labels=20/steps=20/seed=0"]
        (follower,) = [r for r in finetune if r.data.tags["dlsweep.cell"] == f"{arm}/labels=20/steps=20/seed=1"]
        best = max(r.data.metrics["best_val_acc"] for r in searched)
        assert follower.data.params["lr"] in {r.data.params["lr"] for r in searched if r.data.metrics["best_val_acc"] == best}


def test_diverging_pretraining_is_not_cached_and_diverging_finetune_is_counted(tmp_path, data_dir):
    path, store = write(tmp_path), tmp_path / "store"
    result = dlsweep(["run", path, "--store", store, "--set", "pretrain.ae.lr=1e30", "--set", "finetune.arms.scratch.lr=1000"],
                     data_dir)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "diverged" in result.stdout and "blocked: arms pretrained" in result.stderr
    assert not list((store / "pretrain_cache").glob("ae-*"))  # a diverged stage is never cached
    runs = runs_of(sqlite(store))
    ae = next(r for r in runs if r.data.tags["dlsweep.stage"] == "ae")
    assert ae.data.tags["dlsweep.outcome"] == "diverged" and "diverged_step" in ae.data.metrics
    scratch = [r for r in runs if r.data.tags.get("dlsweep.arm") == "scratch"]
    assert len(scratch) == 2 and {r.data.tags["dlsweep.outcome"] for r in scratch} == {"diverged"}
    assert all("test_acc" not in r.data.metrics for r in scratch)  # nothing to select or draw from
    assert state_of(store)["summary"]["diverged"] == 3


def test_damaged_cache_entries_are_rebuilt_not_reused(tmp_path, data_dir):
    raw = {**SWEEP, "finetune": {**SWEEP["finetune"], "arms": {"pretrained": {"from": "ae"}}, "labels": [20]}}
    path, store = write(tmp_path, raw), tmp_path / "store"
    assert dlsweep(["run", path, "--store", store], data_dir).returncode == 0
    (entry,) = (store / "pretrain_cache").glob("ae-*")
    assert json.loads((entry / "manifest.json").read_text())["files"]["encoder.pt"]

    encoder = entry / "encoder.pt"
    encoder.write_bytes(encoder.read_bytes()[:100])  # truncated
    result = dlsweep(["run", path, "--store", store], data_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is damaged (encoder.pt does not match its sha256 in the manifest); rebuilding it" in result.stdout
    assert "reusing cached encoder" not in result.stdout

    state = torch.load(encoder, weights_only=True)
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, encoder)  # zeroed, still loadable
    result = dlsweep(["run", path, "--store", store], data_dir)
    assert "is damaged" in result.stdout and result.returncode == 0
    result = dlsweep(["run", path, "--store", store], data_dir)
    assert "reusing cached encoder" in result.stdout and "damaged" not in result.stdout


def test_dead_tracking_uri_is_one_line_within_seconds(tmp_path, data_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.time()
    result = dlsweep(["run", write(tmp_path), "--store", tmp_path / "store", "--tracking-uri", f"http://127.0.0.1:{port}"],
                     data_dir, timeout=60)
    assert time.time() - start < 30
    assert result.returncode == 2
    assert f"tracking server http://127.0.0.1:{port} does not answer" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "store" / "ray").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_path: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "server-art")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(90):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(1)
    raise AssertionError("mlflow server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_tracking_server_killed_mid_sweep_then_resumed(tmp_path, data_dir):
    raw = {**SWEEP, "finetune": {**SWEEP["finetune"], "arms": {"scratch": {}}, "labels": [20, 30, 40, 50, 60, 70],
                                  "steps": [150], "eval_every": 50}}
    del raw["pretrain"]
    path, store, port = write(tmp_path, raw), tmp_path / "store", free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    env = {**os.environ, "DLSWEEP_DATA_DIR": data_dir, "DLSWEEP_TRACKING_PATIENCE_S": "8"}
    cmd = [sys.executable, "-m", "dlcore.cli", "run", str(path), "--store", str(store), "--tracking-uri", uri]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline, completed = time.time() + 240, {}
        while time.time() < deadline and len(completed) < 2:
            time.sleep(1)
            try:
                completed = {r.info.run_id: r.data.tags["dlsweep.cell"] for r in runs_of(uri)
                             if r.data.tags.get("dlsweep.outcome") == "completed"}
            except Exception:  # the experiment is not there yet
                continue
        assert len(completed) >= 2, "no trial completed in time"
        stop_server(server)
        out, _ = proc.communicate(timeout=240)  # stops by itself once the server stayed away
        assert proc.returncode == 130, out
        assert f"the tracking server {uri} has been unreachable" in out and "Traceback" not in out
        assert state_of(store)["status"] == "interrupted"

        server = start_server(tmp_path, port)
        resumed = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        runs = runs_of(uri)
        cells = [r.data.tags["dlsweep.cell"] for r in runs]
        assert sorted(cells) == sorted(set(cells)) and len(cells) == 6  # every cell once, none twice
        assert all(r.data.tags.get("dlsweep.outcome") == "completed" and r.info.status == "FINISHED" for r in runs), \
            [(r.data.tags["dlsweep.cell"], r.data.tags.get("dlsweep.outcome"), r.info.status, r.data.tags.get("dlsweep.restarts"))
             for r in runs]
        assert set(completed) <= {r.info.run_id for r in runs}  # completed before the kill: not rerun
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        stop_server(server)


def test_a_foreign_ray_cluster_is_never_joined(tmp_path, data_dir):
    """`ray start --head` beside the sweep (as another user's would be), then killed mid-sweep:
    the sweep runs on its own private Ray and finishes."""
    raw = {**SWEEP, "finetune": {**SWEEP["finetune"], "labels": [20, 30, 40], "steps": [100], "eval_every": 50}}
    path, store = write(tmp_path, raw), tmp_path / "store"
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ""}
    head = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"],
                            env={**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(60):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(1)
        proc = subprocess.Popen([sys.executable, "-m", "dlcore.cli", "run", str(path), "--store", str(store)], cwd=ROOT,
                                env={**env, "DLSWEEP_DATA_DIR": data_dir}, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and not (store / "mlflow.db").exists():
            time.sleep(0.5)
        time.sleep(3)
        os.killpg(head.pid, signal.SIGKILL)  # the foreign cluster dies mid-sweep
        head.wait()
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, out
        assert state_of(store)["status"] == "finished"
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGKILL)



def join(path: Path, store: Path, address: str, data_dir: str, stderr) -> subprocess.Popen:
    """`dlsweep run` of ``path`` joined to the cluster at ``address``, in a session of its own."""
    return subprocess.Popen([sys.executable, "-m", "dlcore.cli", "run", str(path), "--store", str(store), "--address",
                             address], cwd=ROOT, env={**os.environ, "DLSWEEP_DATA_DIR": data_dir},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=stderr, text=True)


def wait_for_a_report(proc: subprocess.Popen, store: Path, timeout: float = 120) -> None:
    """Until a trial of the sweep under ``store`` has reported (written a checkpoint), the sweep still running."""
    deadline = time.time() + timeout
    while time.time() < deadline and not list((store / "ray").glob("*/*/study-*/*/checkpoint_*")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)


def test_the_ray_cluster_joined_going_away_is_one_line_and_saved(tmp_path, data_dir):
    """A cluster joined with --address shut down mid-sweep: Ray's core worker ends the driver from C++
    (exit 1, no Python), and the `dlsweep run` process that outlives it says so and saves the state."""
    from ray.cluster_utils import Cluster

    raw = {**SWEEP, "finetune": {**SWEEP["finetune"], "arms": {"scratch": {}}, "labels": [20], "steps": [3000],
                                  "eval_every": 20}}
    del raw["pretrain"]
    path, store = write(tmp_path, raw), tmp_path / "store"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    proc = join(path, store, cluster.address, data_dir, stderr=subprocess.PIPE)
    try:
        wait_for_a_report(proc, store)
        assert state_of(store)["status"] == "running"
        cluster.shutdown()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, out + err
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: the Ray cluster at ") and "went away mid-sweep; state saved" in line
        assert line.endswith(f"continue with: dlsweep run {path} --resume --store {store}")
        assert "Traceback" not in out + err
        assert state_of(store)["status"] == "interrupted"
        runs = runs_of(sqlite(store))
        assert runs and all(r.info.status == "KILLED" and r.data.tags["dlsweep.outcome"] == "interrupted" for r in runs)
        parent = MlflowClient(sqlite(store)).get_run(state_of(store)["parent_run_id"])
        assert parent.info.status == "KILLED"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # passed on to the driver, which runs in a session of its own
            proc.communicate(timeout=60)
        cluster.shutdown()
