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
from . import cache, models
from .spec import Job, Sweep, finetune_cells, pretrain_jobs
from .train import TrainConfig, train

RAY_START_S = 6.0  # ray.init, the MLflow parent run and the tuner, measured on the 2-core CPU
TRIAL_START_S = 1.0  # a trial's actor (reused) and its data (shared through the object store)
PROBE_STEPS = 4
PROBE_BATCH = 64  # larger batches are timed at this size and scaled (a CPU step's time grows about linearly)
PROBE_IMAGES = 1000  # validation and test images the probe evaluates; passes are scaled to the real counts


class EstimateError(Exception):
    """The probe could not time a stage or arm (it diverged at once, say)."""


def _probe(cfg: TrainConfig, ds: D.Dataset) -> dict:
    """Seconds per optimizer step, per validation pass and per test pass of ``cfg`` on this machine."""
    picked = D.select_classes(ds, cfg.classes) if cfg.classes else ds
    n_test = min(cfg.test_size or len(picked.x_test), len(picked.x_test))
    batch = min(cfg.batch_size, PROBE_BATCH)
    pretraining = cfg.objective != "classify"
    val = cfg.val_size if isinstance(cfg.val_size, int) else round(cfg.val_size * len(picked.x_train))
    probe = replace(cfg, steps=PROBE_STEPS, eval_every=PROBE_STEPS, step_budgets=None, test_curve=False, batch_size=batch,
                    test_size=min(PROBE_IMAGES, n_test), embeddings=False,
                    val_size=min(val, PROBE_IMAGES) if pretraining else cfg.val_size)
    marks: list[tuple[float, dict]] = []  # when each report came, and what it said
    t0 = time.perf_counter()
    train(probe, report=lambda metrics, _ckpt: marks.append((time.perf_counter(), metrics)), data=ds)
    end = time.perf_counter()
    if len(marks) < 2 or "samples_per_s" not in marks[-2][1]:
        raise EstimateError(f"{cfg.objective} run did not get through {PROBE_STEPS} steps (it diverged at once?)")
    t_steps, after_steps = marks[-2]  # the evaluation after the probe's steps (the last report is the test's)
    train_s = PROBE_STEPS * batch / after_steps["samples_per_s"]
    if len(marks) == 3:  # step 0 was evaluated too: the time between the two evaluations' ends is steps + one pass
        val_s = max(t_steps - marks[0][0] - train_s, 0.0)
        setup_s = max(marks[0][0] - t0 - val_s, 0.0)
    else:  # nothing to validate on (protocol none)
        val_s, setup_s = 0.0, max(t_steps - t0 - train_s, 0.0)
    if pretraining and val:
        val_s *= val / probe.val_size
    return {"step_s": train_s / PROBE_STEPS * cfg.batch_size / batch, "val_s": val_s,
            "test_s": (end - t_steps) * n_test / probe.test_size, "setup_s": setup_s}


def _seconds(job: Job, cost: dict, val_scale: float = 1.0) -> float:
    """One trial of ``job`` at the probed costs: its steps, its evaluations (step 0 included; each
    ``val_scale`` times the probed pass) and one test pass per step budget read off the run plus the final one."""
    t = job.train
    steps, every = t["steps"], t.get("eval_every", 100)
    budgets = t.get("step_budgets") or []
    evals = steps // every + 1 + len(budgets)
    tests = 1 + len(budgets) + (evals if t.get("test_curve") else 0)
    return cost["setup_s"] + steps * cost["step_s"] + evals * cost["val_s"] * val_scale + tests * cost["test_s"]


def _layout(trials: list[tuple[float, str | None, str]], slots: int) -> float:
    """Wall time of ``trials`` (seconds, the key it waits for or None, its own key), in the order the
    runner hands them out, on ``slots`` parallel slots: each free slot takes the trial that can start
    soonest (what it waits for has finished), the earlier in order on a tie."""
    keys = {t[2] for t in trials}
    pending = [(secs, source if source in keys else None, key) for secs, source, key in trials]
    done: dict[str, float] = {}
    free = [0.0] * slots
    end = 0.0
    while pending:
        at = heapq.heappop(free)

        def ready(t, at=at) -> float:
            return at if t[1] is None else max(at, done.get(t[1], float("inf")))

        trial = min(pending, key=ready)  # its source is always handed out before it: never inf
        pending.remove(trial)
        finish = ready(trial) + trial[0] + TRIAL_START_S
        done[trial[2]] = max(done.get(trial[2], 0.0), finish)
        heapq.heappush(free, finish)
        end = max(end, finish)
    return end


def slots_here(resources, cpus: int, gpus: int) -> tuple[int, int]:
    """Trials at a time on this machine and threads each, as the runner would set them: Ray packs
    ``cpus / resources.cpu`` trials (and ``gpus / resources.gpu`` where trials ask for a GPU this
    machine has), each with ``int(cpu)`` threads, at least 1; more threads than cores don't run faster."""
    per_trial = max(1, min(int(resources.cpu), cpus))
    slots = max(1, min(int(cpus // resources.cpu), cpus // per_trial))
    if resources.gpu and gpus:
        slots = max(1, min(slots, int(gpus // resources.gpu)))
    return slots, per_trial


def estimate(sweep: Sweep, cpus: int | None = None, cache_dir: Path | None = None) -> dict:
    """Measured costs per stage and arm and the sweep's predicted wall time on this machine
    (``cpus``: the CPUs Ray would get here, default all of them; stages whole in ``cache_dir`` are
    reused by the runner and cost nothing)."""
    cpus = cpus or os.cpu_count() or 1
    slots, per_trial = slots_here(sweep.resources, cpus, torch.cuda.device_count())
    stages = [j for j in pretrain_jobs(sweep).values() if cache_dir is None or cache.problem(cache_dir, j.key) is not None]
    cells = finetune_cells(sweep)
    largest: dict[str, Job] = {}  # per arm, its largest budget's cell: the one probed (validation grows with the budget)
    for c in cells:
        arm = c.tags["arm"]
        if arm not in largest or (isinstance(c.train.get("labels"), float) == isinstance(largest[arm].train.get("labels"), float)
                                  and _budget(c) > _budget(largest[arm])):
            largest[arm] = c
    threads = torch.get_num_threads()
    torch.set_num_threads(per_trial)
    costs: dict[str, dict] = {}
    try:
        ds = D.load_dataset(sweep.data.dataset, sweep.data.data_dir)
        with tempfile.TemporaryDirectory() as tmp:
            for kind, job in [*((j.stage, j) for j in stages), *((f"arm {a}", c) for a, c in largest.items())]:
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
    trials = [(_seconds(job, costs[job.stage]), job.source, job.key) for job in stages]
    realistic = sweep.validation.protocol == "realistic"
    for cell in cells:
        probed = largest[cell.tags["arm"]]
        same_kind = isinstance(cell.train.get("labels"), float) == isinstance(probed.train.get("labels"), float)
        scale = _budget(cell) / _budget(probed) if realistic and same_kind else 1.0
        source = cell.source if any(j.key == cell.source for j in stages) else None  # a cached stage: ready now
        trials += [(_seconds(cell, costs[f"arm {cell.tags['arm']}"], scale), source, cell.key)] * cell.samples
    wall = RAY_START_S + _layout(trials, slots)
    return {"wall_s": wall, "slots": slots, "threads_per_trial": per_trial, "cached_stages": len(pretrain_jobs(sweep)) - len(stages),
            "costs": {k: {n: round(v, 4) for n, v in c.items()} for k, c in costs.items()},
            "trial_s": round(sum(t[0] for t in trials), 1)}


def _budget(cell: Job) -> float:
    """A cell's label budget as a number comparable within its sweep (counts with counts, fractions with fractions)."""
    b = cell.train.get("labels")
    return float(b) if b is not None else 1.0
