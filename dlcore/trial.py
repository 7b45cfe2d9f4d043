"""The trial: what runs in each of Tune's trial actors, a few lines that hand a config to the core.

Kept apart from the driver's modules so that a trial actor imports what training needs (torch, the
core, Tune's report and checkpoint) and not what only the driver uses (MLflow, Optuna, the plots):
each new actor starts seconds sooner.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import ray
from ray import tune

from . import cache
from . import data as D
from .train import TrainConfig, train


def run_trial(config: dict, data: dict) -> None:
    job = config["job"]
    out = tempfile.mkdtemp(prefix="dlsweep-")
    try:
        train_args = dict(job["train"])
        if job.get("source") and "cache" in job:  # the stage's entry, copied to this node first from an object store
            train_args["init_encoder"] = str(cache.fetch(job["cache"], job["source"]) / "encoder.pt")
        cfg = TrainConfig(**train_args, out_dir=out)

        upstream = cache.labels_total(Path(cfg.init_encoder).parent) if job.get("source") else 0

        def report(metrics: dict, checkpoint_dir: str | None) -> None:
            if "labels_total" in metrics:  # the final report: count what the stages it starts from read too
                metrics = {**metrics, "labels_upstream": upstream, "labels_total": metrics["labels_total"] + upstream}
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

        # A trial that starts again (its node was lost, or the sweep was killed and resumed) continues
        # from the last checkpoint it reported, wherever that was stored.
        restored = tune.get_checkpoint()
        resume = restored.to_directory(str(Path(out) / "restored")) if restored else None
        own = tune.get_context().get_trial_resources().required_resources.get("CPU", 1.0)
        threads_now = threads_for(own, cfg.threads or 1) if config.get("borrow_idle") else None
        final = train(cfg, report, D.Dataset.from_numpy(data), resume=resume, threads_now=threads_now)
        final["labels_total"] = final.get("labels_total", 0) + upstream
        if job["tags"]["stage"] != "finetune" and "diverged_step" not in final:
            # A pretraining stage caches itself before it ends, so that the stages and cells that
            # start from it find it the moment the driver hears it finished.
            cache.write(job["cache"], job["key"], Path(out) / "checkpoint", job, final)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def threads_for(own: float, start: int):
    """How many threads a trial holding ``own`` CPUs of its node should run now: as many as it holds,
    plus, while some of the node's CPUs are held by no trial (the pretraining stage ahead of the arms
    that wait for it, the last trials of a sweep), its share of those in proportion to what it holds;
    read from Ray's resource accounting. Tune cannot grow a running trial's request without
    restarting it (ResourceChangingScheduler, which also rules out reused actors), so idle CPUs are
    borrowed rather than requested, and handed back within ``THREADS_EVERY_S`` of a new trial
    taking them."""
    from ray._private import state  # per-node accounting (a DeveloperAPI)

    node = ray.get_runtime_context().get_node_id()
    try:
        total = state.total_resources_per_node().get(node, {}).get("CPU", own)
    except Exception:  # noqa: BLE001 -- the GCS busy: no borrowing for this trial
        total = own
    last = start

    def now() -> int:
        nonlocal last
        try:
            free = state.available_resources_per_node().get(node, {}).get("CPU", 0.0)
        except Exception:  # noqa: BLE001 -- the GCS busy or gone: keep what it has
            return last
        held = max(own, total - free)
        last = max(start, int(own + free * own / held + 1e-9))
        return last

    return now
