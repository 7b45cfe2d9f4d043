"""What the benchmarks share: one sweep through `dlsweep run` as a user runs it, in a fresh store."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient


def run_cli(sweep: dict, folder: Path) -> tuple[float, float, MlflowClient, str]:
    """Write ``sweep`` to ``folder``, run it through the CLI into ``folder/store``; returns the launch and exit
    times (time.time()), a client of the run's MLflow store and the sweep's experiment id."""
    path, store = folder / f"{sweep['name']}.yaml", folder / "store"
    path.write_text(yaml.safe_dump(sweep))
    launched = time.time()
    subprocess.run([sys.executable, "-m", "dlcore.cli", "run", str(path), "--store", str(store)], check=True,
                   stdout=subprocess.DEVNULL)
    exited = time.time()
    client = MlflowClient(f"sqlite:///{store.resolve()}/mlflow.db")
    return launched, exited, client, client.get_experiment_by_name(sweep["name"]).experiment_id
