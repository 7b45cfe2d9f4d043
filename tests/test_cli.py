import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dlcore.store import default_uri
from dlcore.cli import app
from test_spec import MINIMAL, SWEEPS

runner = CliRunner()


@pytest.fixture(autouse=True)
def data_env(data_dir, monkeypatch):
    """`dlsweep run` checks the data set on --dry-run too, and finds it through DLSWEEP_DATA_DIR."""
    monkeypatch.setenv("DLSWEEP_DATA_DIR", data_dir)


def write(tmp_path, raw):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_dry_run_json_counts_match_the_grid(tmp_path):
    result = runner.invoke(app, ["run", str(write(tmp_path, MINIMAL)), "--dry-run", "--json", "--set", "finetune.seeds=[0,1,2]"])
    assert result.exit_code == 0, result.output
    p = json.loads(result.output)
    ft = MINIMAL["finetune"]
    assert len(ft["steps"]) > 1 and p["steps_read_off_one_run"] == sorted(ft["arms"])  # constant schedule
    cells = len(ft["arms"]) * len(ft["labels"]) * 3  # one run per cell reads every step budget
    assert p["grid_cells"] == cells and p["finetune_trials"] == cells * ft["samples"]
    assert p["pretrain_trials"] == 3 and p["total_trials"] == 3 + cells * ft["samples"]

    cosine = runner.invoke(app, ["run", str(write(tmp_path, MINIMAL)), "--dry-run", "--json", "--set",
                                 "finetune.seeds=[0,1,2]", "--set", "finetune.schedule=cosine"])
    p = json.loads(cosine.output)  # a schedule tied to the total keeps a trial per step budget
    assert p["grid_cells"] == cells * len(ft["steps"]) and p["steps_read_off_one_run"] == []


def test_dry_run_table_names_stages_and_resources(tmp_path):
    result = runner.invoke(app, ["run", str(write(tmp_path, MINIMAL)), "--dry-run", "--smoke"])
    assert result.exit_code == 0, result.output
    assert "study-smoke on mnist: 5 trials (1 pretraining, 4 fine-tune)" in result.output  # its own sweep
    assert "per trial 1 CPU, 0 GPU" in result.output and "this machine has" not in result.output


def test_dry_run_of_a_pretraining_only_sweep_says_nothing_of_label_selection(tmp_path):
    raw = {k: v for k, v in MINIMAL.items() if k != "finetune"}
    result = runner.invoke(app, ["run", str(write(tmp_path, raw)), "--dry-run", "--no-estimate", "--set", "resources.cpu=4096"])
    assert result.exit_code == 0, result.output
    footer = " ".join(result.output.split()).split("each stage keeps")[1]
    assert footer.startswith(" its best checkpoint by validation loss; per trial 4096 CPU, 0 GPU (this machine has ")
    assert "select on" not in result.output and "ASHA" not in result.output and "realistic" not in result.output


def test_dry_run_says_where_a_cell_scope_search_runs(tmp_path):
    result = runner.invoke(app, ["run", str(write(tmp_path, MINIMAL)), "--dry-run", "--set", "finetune.search_scope=cell"])
    assert result.exit_code == 0, result.output
    # arms x labels = 4 cells per seed (both step budgets read off one run), each 3 on seed 0 + 1 on seed 1
    assert "study on mnist: 18 trials (2 pretraining, 16 fine-tune)" in result.output
    assert "fine-tune grid: 8 cells" in result.output and "cell: 3 samples on seed 0; 1 per other seed" in result.output


def test_smoke_keeps_what_set_sets(tmp_path):
    result = runner.invoke(app, ["run", str(write(tmp_path, MINIMAL)), "--dry-run", "--json", "--smoke", "--set", "finetune.samples=4"])
    assert result.exit_code == 0, result.output
    p = json.loads(result.output)
    assert p["finetune"]["samples_per_cell"] == 4  # the user's, not smoke's 1
    assert p["finetune"]["seeds"] == [0] and p["finetune"]["steps"] == [40]  # the rest is still shrunk
    assert p["finetune_trials"] == 2 * 2 * 4


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_passes_dry_run(path):
    for extra in ([], ["--smoke"]):
        result = runner.invoke(app, ["run", str(path), "--dry-run", "--json", *extra])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["total_trials"] > 0


@pytest.mark.parametrize("args, message", [
    (["--set", "finetune.lables=[10]"], "finetune.lables: unknown key"),
    (["--set", "finetune.search.lr={logunifrom: [1, 2]}"], "finetune.search.lr.logunifrom: unknown key"),
    (["--set", "finetune.steps=[0]"], "finetune.steps: step budgets must be positive"),
    (["--set", "finetune.labels=[100000]"], "label budget 100000 (100000 labels) exceeds"),
    (["--set", "data.dataset=svhn"], "data set 'svhn' not found"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, data_dir, monkeypatch, args, message):
    monkeypatch.setenv("DLSWEEP_DATA_DIR", data_dir)
    store = tmp_path / "store"
    result = runner.invoke(app, ["run", str(write(tmp_path, MINIMAL)), "--store", str(store), *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not store.exists()  # no MLflow store, no Ray state: nothing half-written
    import ray
    assert not ray.is_initialized()


def test_missing_sweep_file(tmp_path):
    result = runner.invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "no such sweep file" in result.output


@pytest.mark.parametrize("name", ["../etc", "a/b", ".hidden"])
def test_report_refuses_an_experiment_name_that_leaves_its_folder(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["report", name, "--store", str(tmp_path / "store")])
    assert result.exit_code == 2 and f"experiment name: '{name}' is not a plain name" in result.output
    assert list(tmp_path.iterdir()) == []


def test_ui_offers_host_and_port():
    result = runner.invoke(app, ["ui", "--help"])
    assert result.exit_code == 0 and "--host" in result.output and "--port" in result.output


def test_help_is_the_docstring():
    result = runner.invoke(app, ["run", "--help"])
    assert result.exit_code == 0 and "pretraining stages once each" in result.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_ui(tmp_path) -> tuple[subprocess.Popen, int, dict]:
    """`dlsweep ui` on a store with one experiment, once its server answers: (process, port, /experiments/search)."""
    from dlcore import tracking

    store = tmp_path / "store"
    store.mkdir()
    uri = default_uri(store)
    exp = tracking.ensure_experiment(uri, "study", store / "artifacts")
    tracking.start_parent(uri, exp, "sweep x", {"a": 1}, {"sweep": "study"})
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dlcore.cli", "ui", "--store", str(store), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for _ in range(60):
        time.sleep(1)
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                                         data=json.dumps({"max_results": 10}).encode(),
                                         headers={"Content-Type": "application/json"})
            return proc, port, json.loads(urllib.request.urlopen(req, timeout=5).read())
        except OSError:
            continue
    proc.kill()
    raise AssertionError("mlflow server did not answer")


def live_processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process that is not a zombie, read from /proc."""
    procs = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            state, ppid, pgrp = (d / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if state != "Z":
            procs[int(d.name)] = (int(ppid), int(pgrp))
    return procs


def descendants(pid: int) -> set[int]:
    procs, found, todo = live_processes(), set(), [pid]
    while todo:
        parent = todo.pop()
        kids = {c for c, (ppid, _) in procs.items() if ppid == parent}
        found |= kids
        todo += kids
    return found


@pytest.mark.slow
def test_ui_serves_the_store(tmp_path):
    proc, _, body = serve_ui(tmp_path)
    try:
        assert "study" in {e["name"] for e in body["experiments"]}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_ui_sigterm_leaves_no_server_process_behind(tmp_path):
    proc, port, _ = serve_ui(tmp_path)
    server = descendants(proc.pid)  # mlflow server, uvicorn, the job runner and its consumers
    try:
        groups = {live_processes()[p][1] for p in server}
        assert len(server) > 1 and len(groups) == 1 and os.getpgid(0) not in groups  # one group of its own
        (pgid,) = groups
        proc.send_signal(signal.SIGTERM)  # to dlsweep alone, as `kill PID` would
        assert proc.wait(timeout=20) == 0
        deadline = time.monotonic() + 20
        while server & set(live_processes()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not server & set(live_processes()), "server processes outlived dlsweep ui"
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        for pid in (server | descendants(proc.pid)) & set(live_processes()):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_ui_ctrl_c_stops_the_server_quietly(tmp_path):
    proc, port, _ = serve_ui(tmp_path)
    server = descendants(proc.pid)
    try:
        assert 1 < len(server) <= 3  # mlflow server and uvicorn: no job runner and consumers
        proc.send_signal(signal.SIGINT)  # a terminal's Ctrl-C: the server runs in a session of its own
        assert proc.wait(timeout=20) == 0
        out = proc.stdout.read().decode()
        assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
        assert not server & set(live_processes()), "server processes outlived dlsweep ui"
    finally:
        for pid in (server | descendants(proc.pid)) & set(live_processes()):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def test_ui_without_store_is_an_error(tmp_path):
    result = runner.invoke(app, ["ui", "--store", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no MLflow store" in result.output


def test_profile_runs_as_its_own_sweep_and_dry_run_shows_it(tmp_path):
    raw = {**MINIMAL, "profiles": {"cpu": {"finetune.steps": [20], "finetune.seeds": [0]}}}
    path = write(tmp_path, raw)
    result = runner.invoke(app, ["run", str(path), "--dry-run", "--json", "--profile", "cpu"])
    assert result.exit_code == 0, result.output
    p = json.loads(result.output)
    assert p["name"] == "study-cpu" and p["finetune"]["steps"] == [20] and p["finetune"]["seeds"] == [0]
    bad = runner.invoke(app, ["run", str(path), "--dry-run", "--profile", "gpu"])
    assert bad.exit_code == 2 and "no profile 'gpu'; this file has ['cpu']" in bad.output
    report = runner.invoke(app, ["report", "study", "--profile", "cpu", "--store", str(tmp_path)])
    assert report.exit_code == 2 and "--profile and --smoke need the sweep file" in report.output


def test_help_imports_neither_torch_nor_ray():
    """`dlsweep --help` and `dlsweep run --help` stay as quick as a bare typer program: no torch, Ray or MLflow."""
    code = ("import sys; from typer.testing import CliRunner; from dlcore.cli import app; "
            "r = CliRunner().invoke(app, ['run', '--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_address_where_no_ray_answers_fails_fast_and_writes_nothing(tmp_path, data_dir):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tmp_path / "store"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "dlcore.cli", "run", str(write(tmp_path, MINIMAL)), "--store", str(store),
                             "--address", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DLSWEEP_DATA_DIR": data_dir})
    assert result.returncode == 2, result.stderr
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr
    assert not (store / "sweeps").exists() and time.monotonic() - started < 60


def test_cli_conventions_short_help_version_and_shipped_sweeps():
    short = runner.invoke(app, ["run", "-h"], env={"COLUMNS": "200"})
    assert short.exit_code == 0 and "Shipped sweep files (in sweeps/):" in short.output
    assert all(p.name in short.output for p in SWEEPS)
    assert "--smoke  " in short.output and "<bool>  Shrink" not in short.output  # a flag, not a value
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.startswith("dlsweep ")


def test_data_lists_what_the_data_folder_holds(tmp_path, data_dir, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("DLSWEEP_DATA_DIR", str(empty))
    listing = runner.invoke(app, ["data"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0 and f"data folder: {empty} (DLSWEEP_DATA_DIR)" in listing.output
    assert "dlsweep data fetch mnist" in listing.output and "dlsweep data fetch cifar10" in listing.output
    missing = runner.invoke(app, ["run", str(write(tmp_path, MINIMAL)), "--dry-run"])
    assert missing.exit_code == 2 and "set DLSWEEP_DATA_DIR to a folder holding mnist.npz, or run `dlsweep data " \
                                      "fetch mnist`" in missing.output.replace("\n", "")

    filled = tmp_path / "filled"
    filled.mkdir()
    (filled / "mnist.npz").symlink_to(Path(data_dir) / "mnist.npz")
    monkeypatch.setenv("DLSWEEP_DATA_DIR", str(filled))
    listing = runner.invoke(app, ["data"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0 and "60000 x 28 x 28" in listing.output and "10000 x 28 x 28" in listing.output
    import hashlib
    assert hashlib.sha256((filled / "mnist.npz").read_bytes()).hexdigest()[:16] in listing.output
    assert "dlsweep data fetch cifar10" in listing.output and "dlsweep data fetch mnist" not in listing.output
    assert runner.invoke(app, ["run", str(write(tmp_path, MINIMAL)), "--dry-run"]).exit_code == 0

    monkeypatch.delenv("DLSWEEP_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    listing = runner.invoke(app, ["data"], env={"COLUMNS": "200"})
    assert f"data folder: {tmp_path / 'cache' / 'dlsweep' / 'data'} (default)" in listing.output
    bad = runner.invoke(app, ["data", "fetch", "svhn"])
    assert bad.exit_code == 2 and "no download for 'svhn'" in bad.output


def test_resume_runs_the_saved_sweep_and_names_the_values_it_does_not_use(tmp_path, data_dir):
    from dlcore import boot
    from dlcore.spec import load_sweep
    from dlcore.store import Paths, write_state

    path = write(tmp_path, {**MINIMAL, "data": {**MINIMAL["data"], "data_dir": data_dir}})
    saved, store = load_sweep(path), tmp_path / "store"
    store.mkdir()
    (store / "mlflow.db").touch()
    write_state(Paths(store.resolve()).state(saved.name), {"name": saved.name, "status": "interrupted", "storage": None,
                                                            "spec": saved.model_dump(mode="json", by_alias=True),
                                                            "tracking_uri": f"sqlite:///{store / 'mlflow.db'}"})
    given = load_sweep(path, ["finetune.samples=2", "finetune.seeds=[5]"])
    checked = boot.check_run(given, str(path), store, resume=True, flags=("--set", "finetune.samples=2", "--set", "x=a b"))
    assert checked.ignored == ("finetune.samples", "finetune.seeds")
    assert checked.sweep.finetune.samples == saved.finetune.samples and checked.sweep.finetune.seeds == saved.finetune.seeds
    assert checked.again == f"dlsweep run {path} --resume --set finetune.samples=2 --set 'x=a b'"
    assert boot.check_run(saved, str(path), store, resume=True).ignored == ()


def test_a_run_that_fails_its_checks_starts_no_ray_and_writes_nothing(tmp_path, data_dir):
    """--resume of a sweep that never ran is found when the state is read: a one-line error before Ray starts
    (`dlsweep run` starts its private Ray while a second thread imports the runner, only once the checks passed)."""
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths live under it
    store = tmp_path / "store"
    env = {**os.environ, "DLSWEEP_DATA_DIR": data_dir, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        result = subprocess.run([sys.executable, "-m", "dlcore.cli", "run", str(write(tmp_path, MINIMAL)), "--resume",
                                 "--store", str(store)], env=env, capture_output=True, text=True, timeout=180)
        assert result.returncode == 2, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "nothing to resume: study has never run" in lines[0]
        assert not list(Path(ray_tmp).glob("ray/session_*")), "a Ray was started for a run that could not start"
        assert not (store / "sweeps").exists() and not (store / "mlflow.db").exists()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
