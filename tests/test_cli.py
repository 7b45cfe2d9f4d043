import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dlcore.cli import app
from test_spec import MINIMAL, SWEEPS

runner = CliRunner()


def write(tmp_path, raw):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_dry_run_json_counts_match_the_grid(tmp_path):
    result = runner.invoke(app, ["run", str(write(tmp_path, MINIMAL)), "--dry-run", "--json", "--set", "finetune.seeds=[0,1,2]"])
    assert result.exit_code == 0, result.output
    p = json.loads(result.output)
    ft = MINIMAL["finetune"]
    cells = len(ft["arms"]) * len(ft["labels"]) * len(ft["steps"]) * 3
    assert p["grid_cells"] == cells and p["finetune_trials"] == cells * ft["samples"]
    assert p["pretrain_trials"] == 3 and p["total_trials"] == 3 + cells * ft["samples"]


def test_dry_run_table_names_stages_and_resources(tmp_path):
    result = runner.invoke(app, ["run", str(write(tmp_path, MINIMAL)), "--dry-run", "--smoke"])
    assert result.exit_code == 0, result.output
    assert "study on mnist: 5 trials (1 pretraining, 4 fine-tune)" in result.output
    assert "per trial 1.0 CPU, 0.0 GPU" in result.output


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


def test_help_is_the_docstring():
    result = runner.invoke(app, ["run", "--help"])
    assert result.exit_code == 0 and "pretraining stages once each" in result.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ui_serves_the_store(tmp_path):
    from dlcore import tracking

    store = tmp_path / "store"
    store.mkdir()
    uri = tracking.default_uri(store)
    exp = tracking.ensure_experiment(uri, "study", store / "artifacts")
    tracking.start_parent(uri, exp, "sweep x", {"a": 1}, {"sweep": "study"})
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dlcore.cli", "ui", "--store", str(store), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        body = None
        for _ in range(60):
            time.sleep(1)
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                                             data=json.dumps({"max_results": 10}).encode(),
                                             headers={"Content-Type": "application/json"})
                body = json.loads(urllib.request.urlopen(req, timeout=5).read())
                break
            except OSError:
                continue
        assert body is not None, "mlflow server did not answer"
        assert "study" in {e["name"] for e in body["experiments"]}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_ui_without_store_is_an_error(tmp_path):
    result = runner.invoke(app, ["ui", "--store", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no MLflow store" in result.output
