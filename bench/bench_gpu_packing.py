"""Trials per GPU: each trial's and the GPU's throughput, and the GPU's utilisation, with 1, 2 and 4
trials sharing one GPU.

    DLSWEEP_DATA_DIR=../shared/data python bench/bench_gpu_packing.py [--seconds 15] [--packs 1,2,4]

`resources: {gpu: 1/N}` makes Ray start N trial processes on each GPU, each with the sweep's CPU
share as its threads; the GPU does not know they are trials of one sweep. This starts N copies of a
sweep's trial the same way, as N processes that all train at once, each running the training
function (`dlcore.train.train`) with the job the sweep file makes (model, batch, augmentations,
precision: `precision: auto` is bf16 on a GPU that has it), for ``--seconds`` each, without Ray
or MLflow. The copies measure over one common window: it opens once every copy has passed its
first evaluation (start-up, CUDA and cuDNN's kernel timing behind it) and closes ``--seconds`` later,
while every copy still trains; each copy's training throughput (images per second, evaluations left
out) is taken between its first and last evaluation inside the window, and the GPU's utilisation
(``nvidia-smi``, every 100 ms) over the window.

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
    """Raised from the report callback once the common window has closed."""


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


def copy_of_trial(args: dict, threads: int, device: str, data: dict, window, out) -> None:
    """One trial process: trains until the common window closes, then sends its evaluations' times."""
    import torch

    from dlcore import data as D
    from dlcore.train import TrainConfig, pick_device, train, uses_bf16

    folder = tempfile.mkdtemp(prefix="bench-gpu-")
    evals, error = [], None  # evals: (wall time, step, training seconds so far)
    try:
        cfg = TrainConfig(**args, threads=threads, device=device, out_dir=folder)
        ds = D.Dataset.from_numpy(data)

        def report(metrics: dict, checkpoint_dir) -> None:
            if "samples_per_s" not in metrics:
                return
            if not evals:
                window.warm()  # the last copy to warm up opens the window with this evaluation, its first inside
            evals.append((time.time(), metrics["step"], metrics["step"] * cfg.batch_size / metrics["samples_per_s"]))
            if window.closed():
                raise Enough

        train(cfg, report, ds)
    except Enough:
        pass
    except Exception as e:  # noqa: BLE001 -- said by the parent
        error = f"{type(e).__name__}: {e}"
        window.warm()  # the others need not wait for this one
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    out.put({"evals": evals, "threads": torch.get_num_threads(), "error": error,
             "bf16": error is None and uses_bf16(cfg, pick_device(cfg.device))})


class Window:
    """The common measuring window of ``copies`` processes: opens when the last of them has warmed up
    (passed its first evaluation) and closes ``seconds`` later."""

    def __init__(self, ctx, copies: int, seconds: float):
        self.copies, self.seconds = copies, seconds
        self.warmed, self.opened = ctx.Value("i", 0), ctx.Value("d", 0.0)

    def warm(self) -> None:
        with self.warmed.get_lock():
            self.warmed.value += 1
            if self.warmed.value == self.copies:
                self.opened.value = time.time()

    def closed(self) -> bool:
        return self.opened.value > 0 and time.time() >= self.opened.value + self.seconds


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
    window, out = Window(ctx, pack, seconds), ctx.Queue()
    procs = [ctx.Process(target=copy_of_trial, args=(args, threads, device, data, window, out)) for _ in range(pack)]
    try:
        for p in procs:
            p.start()
        results = [out.get(timeout=seconds * 20 + 600) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    if errors := [r["error"] for r in results if r["error"]]:
        raise RuntimeError(f"{workload}, {pack} per GPU: {errors[0]}")
    t0 = window.opened.value
    t1 = t0 + seconds
    rates = []
    for r in results:
        inside = [e for e in r["evals"] if t0 <= e[0] <= t1]
        if len(inside) < 2:
            raise RuntimeError(f"{workload}, {pack} per GPU: fewer than 2 evaluations of a copy in the {seconds:g} s "
                               "window; give it more --seconds")
        (_, step_a, train_a), (_, step_b, train_b) = inside[0], inside[-1]
        rates.append((step_b - step_a) * batch / (train_b - train_a))
    util, mem = sampler.between(t0, t1)
    return {"workload": workload, "pack": pack, "threads": threads, "bf16": results[0]["bf16"], "batch": batch,
            "per_trial": statistics.mean(rates), "total": sum(rates), "gpu_util": util, "gpu_mem_gib": mem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="length of the common measuring window")
    ap.add_argument("--packs", default="1,2,4", help="trials per GPU to measure")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--device", default="auto", help="auto (cuda where there is one) or cpu, to try the script")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    from dlcore import data as D

    data_dir = os.environ.get("DLSWEEP_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    import torch

    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() and a.device != "cpu" else "CPU"
    print(f"{where}, {os.cpu_count()} CPUs, torch {torch.__version__}; measured over a common {a.seconds:g} s window")
    sampler = GpuSampler()
    data, rows = D.load_dataset("cifar10", data_dir).to_numpy(), []  # every workload here trains on CIFAR-10
    try:
        for workload in a.workloads.split(","):
            one = None
            for pack in (int(p) for p in a.packs.split(",")):
                try:
                    row = measure(workload, pack, a.seconds, a.device, data, data_dir, sampler)
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
