"""A cluster without a shared disk: Tune's state, the checkpoints and the pretrain cache in an
S3-compatible object store (moto's server on 127.0.0.1), MLflow behind a real `mlflow server`
that serves the artifacts, a real 2-node Ray cluster, a driver killed and resumed from the store."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dlcore import cache
from dlcore.store import store_problem
from test_outcomes import ROOT, SWEEP, free_port, runs_of, sqlite, start_server, state_of, stop_server, write

BUCKET = "dlsweep-test"


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """An S3 endpoint on 127.0.0.1 with one bucket; the environment points pyarrow (and any process
    started from here, Ray's nodes included) at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                 "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "DLSWEEP_NODE_CACHE": str(tmp_path / "node-cache")}.items():
        monkeypatch.setenv(k, v)
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket=BUCKET)
    yield f"s3://{BUCKET}"
    server.stop()


def keys(uri: str) -> list[str]:
    from pyarrow import fs

    store, root = cache.filesystem(uri)
    return [i.path[len(root):].lstrip("/") for i in store.get_file_info(fs.FileSelector(root, recursive=True))
            if i.type == fs.FileType.File]


def stored_finished(storage: str) -> set[str]:
    """The trials Tune's experiment state in the object store records as finished."""
    from pyarrow import fs

    store, root = cache.filesystem(storage)
    files = [i.path for i in store.get_file_info(fs.FileSelector(f"{root}/ray", recursive=True, allow_not_found=True))
             if Path(i.path).name.startswith("experiment_state-")]
    if not files:
        return set()
    try:
        with store.open_input_stream(max(files)) as f:  # the names carry when each was started
            trials = [json.loads(t[0]) for t in json.loads(f.read())["trial_data"]]
    except (OSError, ValueError):  # read while Tune was writing it: not yet
        return set()
    return {t["trial_id"] for t in trials if t["status"] == "TERMINATED"}


def entry(tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "encoder.pt").write_bytes(b"weights" * 100)
    (ckpt / "sub" / "extra.bin").write_bytes(b"x" * 10)
    return ckpt


def test_an_object_store_cache_entry_is_written_manifest_last_verified_and_fetched_once_per_node(s3, tmp_path, monkeypatch):
    root = f"{s3}/prefix/pretrain_cache"
    assert cache.problem(root, "k1") == "missing"
    cache.write(root, "k1", entry(tmp_path), {"stage": "ae"}, {"test_loss": 0.5, "labels_total": 7})
    assert sorted(keys(f"{root}/k1")) == ["encoder.pt", "job.json", "manifest.json", "sub/extra.bin"]
    assert cache.problem(root, "k1") is None

    downloads = []
    opened = cache.filesystem

    def counting(uri):
        filesystem, path = opened(uri)
        if uri.endswith("/k1"):  # the entry's folder: opened to download its files
            downloads.append(uri)
        return filesystem, path

    monkeypatch.setattr(cache, "filesystem", counting)
    first = cache.fetch(root, "k1")
    second = cache.fetch(root, "k1")
    assert first == second and (first / "encoder.pt").read_bytes() == b"weights" * 100
    assert len(downloads) == 1  # the second trial on this node reads the first one's verified copy
    assert (first / "sub" / "extra.bin").exists() and cache.labels_total(first) == 7
    assert str(first).startswith(str(tmp_path / "node-cache"))
    monkeypatch.setattr(cache, "filesystem", opened)

    # a damaged object is caught before any trial reads it: by size in the store, by sha256 on the node
    store, path = cache.filesystem(f"{root}/k1/encoder.pt")
    with store.open_output_stream(path) as f:
        f.write(b"short")
    assert "encoder.pt is 5 bytes" in cache.problem(root, "k1")
    with store.open_output_stream(path) as f:
        f.write(b"wEights" * 100)  # same size, other bytes
    (first / "encoder.pt").write_bytes(b"stale")  # the node's copy no longer matches either: fetched again
    with pytest.raises(OSError, match="does not match its sha256"):
        cache.fetch(root, "k1")
    cache.remove(root, "k1")
    assert cache.problem(root, "k1") == "missing"


def test_a_storage_uri_nobody_can_use_is_one_line(s3, tmp_path, data_dir):
    assert "bucket nope-not-here does not exist" in store_problem("s3://nope-not-here/x")
    assert "not an object-store URI" in store_problem("some/folder")
    assert "not an object-store URI" in store_problem("file:///tmp/x")
    assert "nosuch" in store_problem("nosuch://bucket/x")
    assert store_problem(f"{s3}/sweeps") is None
    path, store = write(tmp_path, SWEEP), tmp_path / "store"
    for bad in ("s3://nope-not-here/x", "some/folder"):
        for extra in (["--dry-run", "--no-estimate"], []):  # the dry run makes the real run's check
            r = subprocess.run([sys.executable, "-m", "dlcore.cli", "run", str(path), "--store", str(store), "--storage",
                                bad, *extra], cwd=ROOT, env={**os.environ, "DLSWEEP_DATA_DIR": data_dir},
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 2 and r.stderr.strip().startswith("error: --storage") and "Traceback" not in r.stderr
            assert len(r.stderr.strip().splitlines()) == 1 and not store.exists()


@pytest.mark.slow
def test_a_two_node_sweep_on_object_storage_and_a_tracking_server_killed_then_resumed_from_the_store(s3, tmp_path,
                                                                                                     data_dir):
    """State, checkpoints and cache in S3; runs and artifacts through `mlflow server --serve-artifacts`;
    the driver killed mid-sweep and the head's disk lost: --resume from the object store finishes the
    sweep with every cell's run once and nothing written to the local store but the state file."""
    from ray.cluster_utils import Cluster

    raw = {**SWEEP, "finetune": {**SWEEP["finetune"], "labels": [20, 30, 40, 50], "steps": [200], "eval_every": 50}}
    path, store, port = write(tmp_path, raw), tmp_path / "store", free_port()
    uri, storage = f"http://127.0.0.1:{port}", f"{s3}/team/sweeps"
    server = start_server(tmp_path, port)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # trials run on the workers only
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    env = {**os.environ, "DLSWEEP_DATA_DIR": data_dir}
    cmd = [sys.executable, "-m", "dlcore.cli", "run", str(path), "--store", str(store), "--address", cluster.address,
           "--tracking-uri", uri, "--storage", storage]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline, done = time.time() + 240, []
        while time.time() < deadline and len(done) < 2:
            assert proc.poll() is None, proc.communicate()
            time.sleep(1)
            try:
                done = [r for r in runs_of(uri) if r.data.tags.get("dlsweep.outcome") == "completed"
                        and r.data.tags["dlsweep.stage"] == "finetune"]
            except Exception:  # the experiment is not there yet
                continue
        assert len(done) >= 2, "no fine-tune trial completed in time"
        deadline = time.time() + 60  # Tune saves its state to the store every 10 s or more, and on trial checkpoints
        while time.time() < deadline and not {r.data.tags["dlsweep.trial_id"] for r in done} <= stored_finished(storage):
            time.sleep(1)
        os.kill(state_of(store)["driver"]["pid"], signal.SIGKILL)  # the driver (a session of its own), with no word
        os.killpg(proc.pid, signal.SIGKILL)  # and the `dlsweep run` that watches it
        proc.communicate()
        shutil.rmtree(store)  # a new head node: nothing of the old one's disk

        resumed = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        out = resumed.stdout + resumed.stderr
        assert resumed.returncode == 0, out
        assert "resuming study" in out
        runs = runs_of(uri)
        cells = [r.data.tags["dlsweep.cell"] for r in runs if r.data.tags["dlsweep.stage"] == "finetune"]
        assert sorted(cells) == sorted(set(cells)) and len(cells) == 8  # every cell once, none twice
        assert all(r.data.tags["dlsweep.outcome"] == "completed" and r.info.status == "FINISHED" for r in runs)
        assert {r.info.run_id for r in done} <= {r.info.run_id for r in runs}  # finished before the kill: kept
        client = MlflowClient(uri)
        for r in runs:  # artifacts through the server, from any machine that reaches it
            assert r.info.artifact_uri.startswith("mlflow-artifacts:")
            assert {a.path for a in client.list_artifacts(r.info.run_id)} >= {"checkpoint", "plots"}
        pretrained = next(r for r in runs if r.data.tags["dlsweep.arm"] == "pretrained")
        assert pretrained.data.params["init_encoder"].startswith(f"{storage}/pretrain_cache/")
        stored = keys(storage)
        assert any(k.startswith("pretrain_cache/") and k.endswith("/manifest.json") for k in stored)
        assert any(k.startswith("ray/study/") and "/checkpoint_" in k for k in stored)
        assert "sweeps/study/state.json" in stored
        assert state_of(store)["status"] == "finished" and state_of(store)["storage"] == storage
        assert sorted(p.name for p in store.iterdir()) == ["sweeps"]  # no Ray state, cache or artifacts on the head
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        cluster.shutdown()
        stop_server(server)


def test_a_worker_node_lost_mid_trial_continues_from_its_checkpoint_in_the_store_with_max_failures(s3, tmp_path, data_dir):
    """`max_failures`: a trial whose node goes away starts again on another node from the last
    checkpoint it reported, read from the object store; the sweep finishes with the trial's run once,
    completed and continued (every evaluation logged once, those before the loss kept), and says a
    trial was restarted."""
    from ray.cluster_utils import Cluster

    raw = {**SWEEP, "finetune": {**SWEEP["finetune"], "arms": {"scratch": {}}, "labels": [20], "steps": [600],
                                  "eval_every": 20, "resume_every_s": 0}, "max_failures": 2}
    del raw["pretrain"]
    path, store, storage = write(tmp_path, raw), tmp_path / "store", f"{s3}/team"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # trials can only run on workers
    worker = cluster.add_node(num_cpus=1)
    proc = subprocess.Popen([sys.executable, "-m", "dlcore.cli", "run", str(path), "--store", str(store), "--address",
                             cluster.address, "--storage", storage], cwd=ROOT,
                            env={**os.environ, "DLSWEEP_DATA_DIR": data_dir}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client, deadline, steps = MlflowClient(sqlite(store)), time.time() + 120, []
        while time.time() < deadline and max(steps, default=-1) < 100:  # a few evaluations, each with its checkpoint
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
            if (store / "mlflow.db").exists() and client.get_experiment_by_name("study"):
                steps = [m.step for r in runs_of(sqlite(store)) for m in client.get_metric_history(r.info.run_id, "val_acc")]
        assert max(steps, default=-1) >= 100, "the trial reported no evaluation past step 100 in time"
        cluster.remove_node(worker, allow_graceful=False)
        cluster.add_node(num_cpus=1)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        assert "restarting" in out and "done (1 completed)" in out
        runs = runs_of(sqlite(store))
        assert len(runs) == 1 and runs[0].data.tags["dlsweep.outcome"] == "completed"
        assert runs[0].info.status == "FINISHED" and runs[0].data.metrics["test_acc"] > 0.1
        assert runs[0].data.tags["dlsweep.restarts"] == "1"
        assert 100 <= runs[0].data.metrics["resumed_from_step"] < 600
        history = client.get_metric_history(runs[0].info.run_id, "val_acc")
        assert sorted(m.step for m in history) == list(range(0, 601, 20))  # each once: continued, not replayed
        assert "checkpoint/resume.pt" not in {a.path for a in client.list_artifacts(runs[0].info.run_id, "checkpoint")}
        assert any("/checkpoint_" in k for k in keys(storage))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.communicate(timeout=60)
        cluster.shutdown()


def test_resuming_on_a_new_head_whose_mlflow_store_stayed_on_the_old_one_is_one_line(s3, tmp_path, data_dir):
    from dlcore.store import read_state, write_state

    path, store, storage = write(tmp_path, SWEEP), tmp_path / "store", f"{s3}/team"
    old = tmp_path / "old-head" / "sweeps" / "study" / "state.json"
    state = {"name": "study", "status": "interrupted", "storage": storage, "tracking_uri": "sqlite:////old-head/mlflow.db"}
    write_state(old, state)
    assert read_state(tmp_path / "nowhere.json", storage, "study") == state  # the copy in the store
    r = subprocess.run([sys.executable, "-m", "dlcore.cli", "run", str(path), "--store", str(store), "--storage", storage,
                        "--resume"], cwd=ROOT, env={**os.environ, "DLSWEEP_DATA_DIR": data_dir}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "MLflow store /old-head/mlflow.db is not on this machine" in r.stderr and "--tracking-uri" in r.stderr
