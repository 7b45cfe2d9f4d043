"""Overhead of running trials through `dlsweep run` (Ray Tune + MLflow) instead of a plain loop.

    DLSWEEP_DATA_DIR=../shared/data .venv/bin/python bench/bench_sweep.py

Runs one sweep of 8 fine-tune trials (scratch arm, 4 label budgets x 2 seeds, no search, no ASHA
so both sides do the same work) through the CLI in a fresh process and a fresh store, then the
same 8 trainings one after another in this process calling dlcore.train with every core, and
prints both wall times and their ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from dlcore import data as D
from dlcore.spec import finetune_cells, load_sweep
from dlcore.train import TrainConfig, train

SWEEP = {
    "name": "bench_sweep",
    "data": {"dataset": "mnist", "val_size": 5000},
    "finetune": {"arms": {"scratch": {}}, "labels": [100, 300, 1000, 3000], "steps": [1500], "seeds": [0, 1],
                 "samples": 1, "batch_size": 64, "eval_every": 250},
    "asha": {"enabled": False},
    "resources": {"cpu": 1},
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("DLSWEEP_DATA_DIR", "../shared/data"))
    p.add_argument("--steps", type=int, default=1500)
    args = p.parse_args()
    data_dir = str(Path(args.data_dir).resolve())
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    spec = dict(SWEEP, data=dict(SWEEP["data"], data_dir=data_dir))
    spec["finetune"] = dict(spec["finetune"], steps=[args.steps])
    path = tmp / "bench_sweep.yaml"
    path.write_text(yaml.safe_dump(spec))

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dlcore.cli", "run", str(path), "--store", str(tmp / "store")], check=True,
                   stdout=subprocess.DEVNULL)
    sweep_s = time.perf_counter() - t0

    cores = len(os.sched_getaffinity(0))
    t0 = time.perf_counter()
    ds = D.load_dataset("mnist", data_dir)
    jobs = finetune_cells(load_sweep(path))
    for job in jobs:
        train(TrainConfig(**job.train, threads=cores, out_dir=str(tmp / "plain")), data=ds)
    plain_s = time.perf_counter() - t0

    print(f"{len(jobs)} fine-tune trials of {args.steps} steps on MNIST, torch {torch.__version__}, {cores} cores")
    print(f"  dlsweep run (Ray Tune, 1 CPU/trial, MLflow)  {sweep_s:7.1f} s")
    print(f"  plain loop, one process, {cores} threads         {plain_s:7.1f} s")
    print(f"  ratio sweep / plain                          {sweep_s / plain_s:7.2f}x")


if __name__ == "__main__":
    main()
