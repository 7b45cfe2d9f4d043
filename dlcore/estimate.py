"""How long a sweep would take on this machine, from a few training steps of each kind of trial.

``dlsweep run FILE --dry-run`` times, for each pretraining stage and each fine-tune arm, a short
run of the real training function on the real data (a handful of optimizer steps, one validation
pass and one test pass, with the threads the sweep gives a trial), then scales each trial by its
steps and evaluations and lays the trials out on this machine's trial slots in dependency order
(an arm that starts from a stage waits for that stage). Ray's start and each trial's start are
added as the constants measured on a 2-core CPU. It is an estimate: training speed moves with
what else runs on the machine, and ASHA may stop trials early (not counted).
"""

from __future__ import annotations

import heapq
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import data as D
from . import models
from .spec import Job, Sweep, finetune_cells, pretrain_jobs
from .train import TrainConfig, train

RAY_START_S = 6.0  # ray.init, the MLflow parent run and the tuner, measured on the 2-core CPU
TRIAL_START_S = 1.0  # a trial's actor (reused) and its data (shared through the object store)
PROBE_STEPS = 4
PROBE_TEST = 1000  # test images the probe evaluates; the test pass is scaled to the whole set


def _probe(cfg: TrainConfig, ds: D.Dataset) -> dict:
    """Seconds per optimizer step, per validation pass and per test pass of ``cfg`` on this machine."""
    marks: list[tuple[float, dict]] = []  # when each report came, and what it said
    probe = replace(cfg, steps=PROBE_STEPS, eval_every=PROBE_STEPS, step_budgets=None, test_curve=False,
                    test_size=min(PROBE_TEST, len(ds.x_test)), embeddings=False)
    t0 = time.perf_counter()
    train(probe, report=lambda metrics, _ckpt: marks.append((time.perf_counter(), metrics)), data=ds)
    end = time.perf_counter()
    t_steps, after_steps = marks[-2]  # the evaluation after the probe's steps (the last report is the test's)
    train_s = PROBE_STEPS * cfg.batch_size / after_steps["samples_per_s"]
    if len(marks) == 3:  # step 0 was evaluated too: the time between the two evaluations' ends is steps + one pass
        val_s = max(t_steps - marks[0][0] - train_s, 0.0)
        setup_s = max(marks[0][0] - t0 - val_s, 0.0)
    else:  # nothing to validate on (protocol none)
        val_s, setup_s = 0.0, max(t_steps - t0 - train_s, 0.0)
    test_s = (end - t_steps) * len(ds.x_test) / probe.test_size
    return {"step_s": train_s / PROBE_STEPS, "val_s": val_s, "test_s": test_s, "setup_s": setup_s}


def _seconds(job: Job, cost: dict) -> float:
    """One trial of ``job`` at the probed costs: its steps, its evaluations (step 0 included) and
    one test pass per step budget read off the run plus the final one."""
    t = job.train
    steps, every = t["steps"], t.get("eval_every", 100)
    budgets = t.get("step_budgets") or []
    evals = steps // every + 1 + len(budgets)
    tests = 1 + len(budgets) + (evals if t.get("test_curve") else 0)
    return cost["setup_s"] + steps * cost["step_s"] + evals * cost["val_s"] + tests * cost["test_s"]


def _layout(trials: list[tuple[float, str | None, str]], slots: int) -> float:
    """Wall time of ``trials`` (seconds, the key it waits for or None, its own key) on ``slots``
    parallel slots, each taken by the first trial in order whose source has finished."""
    done: dict[str, float] = {}
    free = [0.0] * slots
    pending = list(trials)
    end = 0.0
    while pending:
        at = heapq.heappop(free)
        trial = next((t for t in pending if t[1] is None or t[1] in done), pending[0])
        pending.remove(trial)
        secs, source, key = trial
        finish = max(at, done.get(source, 0.0)) + secs + TRIAL_START_S
        done[key] = max(done.get(key, 0.0), finish)
        heapq.heappush(free, finish)
        end = max(end, finish)
    return end


def estimate(sweep: Sweep, cpus: int | None = None) -> dict:
    """Measured costs per stage and arm and the sweep's predicted wall time on this machine
    (``cpus``: the CPUs Ray would get here, default all of them)."""
    cpus = cpus or os.cpu_count() or 1
    per_trial = max(1, min(int(sweep.resources.cpu), cpus)) if sweep.resources.cpu >= 1 else 1
    slots = max(1, int(cpus // max(sweep.resources.cpu, 1e-9))) if sweep.resources.cpu else cpus
    threads = torch.get_num_threads()
    torch.set_num_threads(per_trial)
    try:
        ds = D.load_dataset(sweep.data.dataset, sweep.data.data_dir)
        stages = list(pretrain_jobs(sweep).values())
        cells = finetune_cells(sweep)
        costs: dict[str, dict] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for job in stages + cells:
                kind = job.stage if job.stage != "finetune" else f"arm {job.tags['arm']}"
                if kind in costs:
                    continue
                values = {**job.train, "out_dir": str(Path(tmp) / "probe"), "threads": per_trial}
                if job.source:  # the job's own model shape and frozen layers; the weights don't matter for speed
                    enc = models.build_encoder(values.get("encoder", "conv"), ds.image_shape, **values.get("encoder_args", {}))
                    torch.save(enc.state_dict(), Path(tmp) / "encoder.pt")
                    values["init_encoder"] = str(Path(tmp) / "encoder.pt")
                costs[kind] = _probe(TrainConfig(**values), ds)
    finally:
        torch.set_num_threads(threads)
    trials = []
    for job in stages:
        trials.append((_seconds(job, costs[job.stage]), job.source, job.key))
    for cell in cells:
        secs = _seconds(cell, costs[f"arm {cell.tags['arm']}"])
        trials += [(secs, cell.source, cell.key)] * cell.samples
    trials.sort(key=lambda t: t[1] is not None)  # what waits for nothing goes first, as the runner schedules it
    wall = RAY_START_S + _layout(trials, slots)
    return {"wall_s": wall, "slots": slots, "threads_per_trial": per_trial,
            "costs": {k: {n: round(v, 4) for n, v in c.items()} for k, c in costs.items()},
            "trial_s": round(sum(t[0] for t in trials), 1)}
