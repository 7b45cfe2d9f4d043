"""The fixed costs of `dlsweep run`: command to the first trial's first step, last trial's end to exit.

    DLSWEEP_DATA_DIR=../shared/data .venv/bin/python bench/bench_startup.py [--repeat 3]

A sweep of one small MNIST trial (20 steps, evaluated after each) in a fresh store, run through the
CLI as a user runs it. The first step's time is the arrival at the driver of the evaluation after
the first step (the MLflow metric's timestamp); the end is the trial's MLflow run end. Run it on an otherwise idle machine: it measures wall time.

Beside each sweep it times the floor under the first of those: a fresh Python importing torch (which
the sweep's checks need) and a fresh Python starting a bare local Ray (``ray.init(num_cpus=2)``),
each from its launch to its return; nothing `dlsweep run` does can start its first trial sooner than
the two one after the other, since a private Ray is started only after the checks pass.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cli_run import run_cli

STEPS = 20


def sweep(data_dir: str) -> dict:
    return {"name": "bench_startup", "data": {"dataset": "mnist", "data_dir": data_dir, "val_size": 500},
            "finetune": {"arms": {"scratch": {}}, "labels": [100], "steps": [STEPS], "seeds": [0], "samples": 1,
                         "batch_size": 32, "eval_every": 1, "encoder_args": {"latent_dim": 8}},
            "asha": {"enabled": False}}


BARE_RAY = "import ray; ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level='ERROR')"


def launch_to(code: str) -> float:
    """Seconds from launching a fresh Python to the end of ``code`` in it (its exit, Ray's shutdown
    included, is not counted)."""
    started = time.time()
    out = subprocess.run([sys.executable, "-c", f"{code}; import time; print(time.time(), flush=True)"], check=True,
                         capture_output=True, text=True).stdout
    return float(out.split()[-1]) - started


def once(data_dir: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        launched, exited, client, exp = run_cli(sweep(data_dir), Path(tmp))
        (run,) = [r for r in client.search_runs([exp]) if r.data.tags.get("mlflow.parentRunId")]
        first = min(m.timestamp for m in client.get_metric_history(run.info.run_id, "train_loss")) / 1000
        found = {"command to first step s": first - launched,
                 "last end to exit s": exited - run.info.end_time / 1000, "total s": exited - launched}
    found["floor: import torch s"] = launch_to("import torch")
    found["floor: bare ray.init s"] = launch_to(BARE_RAY)
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("DLSWEEP_DATA_DIR", "../shared/data"))
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    runs = [once(str(Path(args.data_dir).resolve())) for _ in range(args.repeat)]
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(f"{key:>26}: median {statistics.median(values):5.1f}  ({', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
