"""Trials per GPU: each trial's and the GPU's throughput, and the GPU's utilisation, with 1, 2 and 4
trials sharing one GPU.

    DLSWEEP_DATA_DIR=../shared/data python bench/bench_gpu_packing.py [--seconds 15] [--packs 1,2,4]

`resources: {gpu: 1/N}` makes Ray start N trial processes on each GPU, each with the sweep's CPU
share as its threads; the GPU does not know they are trials of one sweep. This starts N copies of a
sweep's trial the same way, as N processes that all train at once, each running the training
function (`dlcore.train.train`) with the job the sweep file makes (model, batch, augmentations,
precision: `precision: auto` is bf16 on a GPU that has it), for ``--seconds`` each, without Ray
or MLflow. It measures training throughput (images per second, evaluations left out, the first
evaluation interval too, as warm-up) between the first and the last evaluation, and the GPU's
utilisation (``nvidia-smi``, every 100 ms) while every copy is inside that window.

Workloads: E1's DAE pretraining and fine-tune (`sweeps/dae_fraction.yaml`, full size: the sweep asks
for 0.25 GPU per trial) and E3's SimCLR pretraining and ResNet-18 fine-tune
(`sweeps/simclr_cifar10.yaml`: 1 GPU per trial). A fine-tune trains the scratch arm on all of its
labels: a pretrained arm's full fine-tune costs the same per step.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKLOADS = {  # name: (sweep file, stage or "finetune", stage or arm, evaluations every this many steps)
    "e1-dae": ("sweeps/dae_fraction.yaml", "pretrain", "dae", 200),
    "e1-finetune": ("sweeps/dae_fraction.yaml", "finetune", "scratch", 200),
    "e3-simclr": ("sweeps/simclr_cifar10.yaml", "pretrain", "simclr", 50),
    "e3-finetune": ("sweeps/simclr_cifar10.yaml", "finetune", "scratch", 50),
}


class Enough(Exception):
    """Raised from the report callback once a copy has trained for its seconds."""


def job_of(workload: str, data_dir: str) -> tuple[dict, float, int]:
    """The workload's TrainConfig arguments as the sweep makes them, the trial's CPU share and its batch."""
    from dlcore import spec

    path, kind, name, eval_every = WORKLOADS[workload]
    sweep = spec.load_sweep(ROOT / path, [f"data.data_dir={data_dir}"])
    if kind == "pretrain":
        job = next(j for j in spec.pretrain_jobs(sweep).values() if j.stage == name)
    else:
        job = max((c for c in spec.finetune_cells(sweep) if c.tags["arm"] == name), key=lambda c: c.train["labels"])
    args = {**job.train, "steps": 10**7, "eval_every": eval_every, "step_budgets": None, "test_curve": False,
            "embeddings": False, "resume_every_s": 1e9}
    return args, sweep.resources.cpu, args.get("batch_size", 64)


def copy_of_trial(args: dict, threads: int, seconds: float, device: str, data: dict, start, out) -> None:
    """One trial process: train until ``seconds`` have passed, then send its evaluations' times."""
    import torch

    from dlcore import data as D
    from dlcore.train import TrainConfig, pick_device, train, uses_bf16

    folder = tempfile.mkdtemp(prefix="bench-gpu-")
    cfg = TrainConfig(**args, threads=threads, device=device, out_dir=folder)
    ds = D.Dataset.from_numpy(data)
    evals = []  # (wall time, step, training seconds so far)

    def report(metrics: dict, checkpoint_dir) -> None:
        if "samples_per_s" in metrics:
            evals.append((time.time(), metrics["step"], metrics["step"] * cfg.batch_size / metrics["samples_per_s"]))
        if len(evals) >= 3 and time.time() - began >= seconds:
            raise Enough

    start.wait(timeout=600)
    began = time.time()
    error = None
    try:
        train(cfg, report, ds)
    except Enough:
        pass
    except Exception as e:  # noqa: BLE001 -- said by the parent, which would otherwise wait forever
        error = f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    out.put({"evals": evals, "threads": torch.get_num_threads(), "bf16": uses_bf16(cfg, pick_device(cfg.device)),
             "error": error})


class GpuSampler:
    """``nvidia-smi`` read every 100 ms in the background: (time, utilisation %, memory used MiB)."""

    def __init__(self):
        self.samples: list[tuple[float, float, float]] = []
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "100"],
                                         stdout=subprocess.PIPE, text=True)
        except FileNotFoundError:
            self.proc = None
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def between(self, t0: float, t1: float) -> tuple[float | None, float | None]:
        """Mean utilisation and peak memory (GiB) of the samples in [t0, t1]."""
        inside = [(u, m) for t, u, m in self.samples if t0 <= t <= t1]
        if not inside:
            return None, None
        return statistics.mean(u for u, _ in inside), max(m for _, m in inside) / 1024

    def close(self) -> None:
        if self.proc:
            self.proc.terminate()


def measure(workload: str, pack: int, seconds: float, device: str, data: dict, data_dir: str, sampler: GpuSampler) -> dict:
    """``pack`` copies of the workload's trial at once; per-copy and total images/s, GPU utilisation."""
    args, cpu_share, batch = job_of(workload, data_dir)
    threads = max(1, min(int(cpu_share), (os.cpu_count() or 1) // pack))
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(pack + 1), ctx.Queue()
    procs = [ctx.Process(target=copy_of_trial, args=(args, threads, seconds, device, data, start, out)) for _ in range(pack)]
    for p in procs:
        p.start()
    start.wait(timeout=600)
    results = [out.get(timeout=seconds * 20 + 600) for _ in procs]
    for p in procs:
        p.join()
    if errors := [r["error"] for r in results if r["error"]]:
        raise RuntimeError(f"{workload}, {pack} per GPU: {errors[0]}")
    rates, windows = [], []
    for r in results:
        (t_a, step_a, train_a), (t_b, step_b, train_b) = r["evals"][1], r["evals"][-1]  # the first interval warms up
        rates.append((step_b - step_a) * batch / (train_b - train_a))
        windows.append((t_a, t_b))
    util, mem = sampler.between(max(a for a, _ in windows), min(b for _, b in windows))
    return {"workload": workload, "pack": pack, "threads": threads, "bf16": results[0]["bf16"], "batch": batch,
            "per_trial": statistics.mean(rates), "total": sum(rates), "gpu_util": util, "gpu_mem_gib": mem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="training time of each copy")
    ap.add_argument("--packs", default="1,2,4", help="trials per GPU to measure")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--device", default="auto", help="auto (cuda where there is one) or cpu, to try the script")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    from dlcore import data as D

    data_dir = os.environ.get("DLSWEEP_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    import torch

    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() and a.device != "cpu" else "CPU"
    print(f"{where}, {os.cpu_count()} CPUs, torch {torch.__version__}; {a.seconds:g} s of training per copy")
    sampler = GpuSampler()
    rows, loaded = [], {}
    try:
        for workload in a.workloads.split(","):
            name = "cifar10"  # every workload here trains on CIFAR-10
            if name not in loaded:
                loaded[name] = D.load_dataset(name, data_dir).to_numpy()
            one = None
            for pack in (int(p) for p in a.packs.split(",")):
                try:
                    row = measure(workload, pack, a.seconds, a.device, loaded[name], data_dir, sampler)
                except Exception as e:  # noqa: BLE001 -- said, and the other workloads still measured
                    print(f"{workload:12s} {pack} per GPU  failed: {e}", flush=True)
                    break
                one = one or row["total"]
                row["total_vs_1"] = row["total"] / one
                rows.append(row)
                util = "n/a" if row["gpu_util"] is None else f"{row['gpu_util']:.0f}%"
                mem = "n/a" if row["gpu_mem_gib"] is None else f"{row['gpu_mem_gib']:.1f} GiB"
                print(f"{workload:12s} {pack} per GPU  threads {row['threads']:2d}  bf16 {row['bf16']!s:5s}  "
                      f"per trial {row['per_trial']:8.0f} img/s  all {row['total']:8.0f} img/s ({row['total_vs_1']:.2f}x)  "
                      f"GPU busy {util}  memory {mem}", flush=True)
    finally:
        sampler.close()
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
