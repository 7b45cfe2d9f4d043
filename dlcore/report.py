"""Data-efficiency report of a sweep, read back from MLflow (local sqlite or a server).

Selection is on validation only: in each (arm, labels, steps, seed) cell the completed trial with
the best validation metric is kept, and its test metrics are what the tables and curves show.
Means carry 95% Student-t intervals over seeds; arms are compared by pairing seeds (a seed fixes
the label subset); derived quantities (label-efficiency ratio, steps to a target) carry percentile
bootstrap intervals over seeds and say when they are only bounds (see ``stats``).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from . import plots, stats
from .tracking import OUTCOMES, CURVE_METRICS, TAG, metric_history

TEST_CURVES = ("test_loss", "test_acc", "test_curve_loss", "test_curve_acc")  # drawn when logged at several steps; never used for selection
BASELINE = "scratch"


@dataclass
class Trial:
    """One fine-tune trial as the report needs it."""

    run_id: str
    arm: str
    budget: str  # the label budget as written in the sweep (count or fraction)
    labels: int  # labelled images it trained on
    steps: int
    seed: int
    outcome: str  # one of OUTCOMES
    val: float | None  # best validation metric
    test_acc: float | None
    test_loss: float | None = None
    labels_val: int | None = None  # labelled validation images outside the budget (oracle), when known
    params: dict = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val_acc); read for selected trials only
    validation: str = "oracle"  # the protocol it was selected by (runs from before protocols: oracle)
    total: int | None = None  # labels it read in all, as the run logged them (labels_total)
    run_steps: int | None = None  # when read off a longer run: that run's step budget
    source: str = ""  # the pretraining stage it started from ("" for scratch)

    @property
    def labels_total(self) -> int | None:
        if self.total is not None:
            return self.total
        return None if self.labels_val is None else self.labels + self.labels_val


@dataclass
class Cell:
    """One (arm, labels, steps) point: each seed's selected trial."""

    arm: str
    labels: int
    steps: int
    trials: list[Trial]  # in seed order

    @property
    def n(self) -> int:
        return len(self.trials)

    @property
    def accs(self) -> list[float]:
        return [t.test_acc for t in self.trials]

    @property
    def losses(self) -> list[float]:
        return [t.test_loss for t in self.trials if t.test_loss is not None]

    @property
    def mean(self) -> float:
        return stats.mean_ci(self.accs)[0]

    @property
    def half_width(self) -> float:
        """Half-width of the 95% Student-t interval of the mean test accuracy; nan with a single seed."""
        return stats.mean_ci(self.accs)[1]

    def by_seed(self, metric: str) -> dict[int, float]:
        return {t.seed: getattr(t, metric) for t in self.trials if getattr(t, metric) is not None}

    @property
    def labels_total(self) -> int | None:
        totals = {t.labels_total for t in self.trials}
        return totals.pop() if len(totals) == 1 else None


SEARCH_KEYS = ("lr", "weight_decay", "encoder_lr", "batch_size", "head_hidden")


def selected_trials(trials: list[Trial], mode: str) -> list[Trial]:
    """The completed trial with the best validation metric in each (arm, labels, steps, seed) cell;
    stopped, diverged, failed and interrupted trials never compete."""
    best: dict[tuple, Trial] = {}
    for t in trials:
        if t.outcome != "completed" or t.test_acc is None or (t.val is None and t.validation != "none"):
            continue  # under 'none' a cell has one trial, and nothing to select it by
        key = (t.arm, t.labels, t.steps, t.seed)
        if key not in best or (t.val > best[key].val if mode == "max" else t.val < best[key].val):
            best[key] = t
    return list(best.values())


def select(chosen: list[Trial]) -> list[Cell]:
    """Per (arm, labels, steps), over seeds, from each seed's selected trial (``selected_trials``)."""
    groups: dict[tuple, list[Trial]] = defaultdict(list)
    for t in sorted(chosen, key=lambda t: (t.arm, t.labels, t.steps, t.seed)):
        groups[(t.arm, t.labels, t.steps)].append(t)
    return [Cell(arm, labels, steps, ts) for (arm, labels, steps), ts in sorted(groups.items())]


def _value(v) -> str:
    """An MLflow param (always a string) as a number to 3 significant digits where it is one."""
    try:
        return f"{float(v):.3g}"
    except ValueError:
        return str(v)


def hyperparameters(cell: Cell, keys: tuple) -> str:
    """Each seed's chosen values: 's0: lr=0.001; s1: lr=0.003'. Where the other seeds trained with the
    values the first seed's search picked (search_scope cell, logged as param cell.search_from_seed)
    and every seed shows them, once: 'lr=0.001 (searched on seed 0, shared by all seeds)'."""
    trials = [t for t in cell.trials if any(k in t.params for k in keys)]
    values = {t.seed: " ".join(f"{k}={_value(t.params[k])}" for k in sorted(keys) if k in t.params) for t in trials}
    searched_on = {t.params.get("cell.search_from_seed") for t in trials} - {None}
    if len(searched_on) == 1 and len(set(values.values())) == 1:
        return f"{values[trials[0].seed]} (searched on seed {searched_on.pop()}, shared by all seeds)"
    return "; ".join(f"s{seed}: {v}" for seed, v in values.items())


def paired_differences(cells: list[Cell], baseline: str = BASELINE) -> list[dict]:
    """Each arm minus the baseline at the same labels and steps, paired by seed."""
    base = {(c.labels, c.steps): c for c in cells if c.arm == baseline}
    out = []
    for c in cells:
        b = base.get((c.labels, c.steps))
        if c.arm == baseline or b is None:
            continue
        acc = stats.paired_diff(c.by_seed("test_acc"), b.by_seed("test_acc"))
        loss = stats.paired_diff(c.by_seed("test_loss"), b.by_seed("test_loss"))
        out.append({"arm": c.arm, "baseline": baseline, "labels": c.labels, "steps": c.steps, "acc": acc, "loss": loss})
    return out


def pretrained_arms(spec, trials: list) -> set[str]:
    """Arms that start from a stage (by the sweep's spec, else by the trials' tags). The others are
    scratch and, where an arm freezes its encoder untrained, random-initialisation baselines."""
    if spec is not None and spec.finetune is not None:
        return {name for name, arm in spec.finetune.arms.items() if arm.from_}
    return {t.arm for t in trials if t.source}


def random_baselines(spec, pretrained: set[str]) -> dict[str, list[str]]:
    """Each arm that freezes an untrained encoder (no stage, a mode other than 'full'), with the
    pretrained arms that train the same head on it; none without the sweep's spec, which says so."""
    if spec is None or spec.finetune is None:
        return {}
    from .spec import arm_heads, finetune_cells

    heads = arm_heads(finetune_cells(spec))
    return {r: sorted(a for a in pretrained if heads.get(a) == head) for r, head in sorted(heads.items())
            if r not in pretrained and head[0] != "full"}


def label_efficiency(cells: list[Cell], arm: str, baseline: str = BASELINE) -> list[dict]:
    """For each budget of ``arm``: labels the baseline needs for the same mean test accuracy, and the
    ratio to the budget, bootstrapped over the seeds present in every cell involved."""
    out = []
    for steps in sorted({c.steps for c in cells}):
        base = sorted((c for c in cells if c.arm == baseline and c.steps == steps), key=lambda c: c.labels)
        for c in sorted((c for c in cells if c.arm == arm and c.steps == steps), key=lambda c: c.labels):
            seeds = sorted(set.intersection(*(set(x.by_seed("test_acc")) for x in [c, *base]))) if base else []
            if not seeds:
                continue
            scratch = np.array([[b.by_seed("test_acc")[s] for b in base] for s in seeds])  # (seeds, budgets)
            mine = np.array([c.by_seed("test_acc")[s] for s in seeds])  # (seeds,)
            ratio = stats.label_ratio([b.labels for b in base], scratch, mine, c.labels)
            out.append({"arm": arm, "steps": steps, "labels": c.labels, "accuracy": float(mine.mean()), "seeds": len(seeds),
                        "ratio": ratio, "baseline_labels": ratio.point.scaled(c.labels)})
    return out


def steps_estimate(cell: Cell, target: float) -> tuple[stats.Estimate, int, int] | None:
    """Median steps to ``target`` on the validation curves, with its bootstrap interval, and how many
    of the seeds with a curve reached it."""
    per_seed = [stats.steps_to_target(t.curve, target, t.steps) for t in cell.trials if t.curve]
    if not per_seed:
        return None
    return stats.steps_summary(per_seed), sum(b.kind != "above" for b in per_seed), len(per_seed)


# ---- reading MLflow ----------------------------------------------------------------------


def latest_parent(client: MlflowClient, experiment_id: str) -> str | None:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG}role` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def sweep_parent(client: MlflowClient, experiment_id: str, experiment: str, run_id: str | None):
    """The parent run of a sweep invocation (default: the latest), checked to be one of this experiment."""
    run_id = run_id or latest_parent(client, experiment_id)
    if run_id is None:
        raise ValueError(f"experiment '{experiment}' has no sweep runs yet")
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ValueError(f"run '{run_id}' does not exist in the tracking store") from None
    if run.info.experiment_id != experiment_id:
        raise ValueError(f"run '{run_id}' belongs to another experiment, not to '{experiment}'")
    if run.data.tags.get(TAG + "role") != "sweep":
        raise ValueError(f"run '{run_id}' is not a sweep's parent run (a trial or stage?); "
                         f"pass the run tagged {TAG}role=sweep, or no --run for the latest")
    return run


def run_outcome(run) -> str:
    """The outcome tag; a run without one failed (status FAILED) or was interrupted (still RUNNING, killed)."""
    return run.data.tags.get(TAG + "outcome") or ("failed" if run.info.status == "FAILED" else "interrupted")


def read_trials(client: MlflowClient, experiment_id: str, parent: str, metric: str = "val_acc",
                val_default: int | None = None) -> tuple[list[Trial], list]:
    """Fine-tune trials of one sweep invocation, and all its child runs (pretraining stages too).

    A trial's labels are its budget (under 'realistic' its validation labels are part of it); its
    labels in total are the logged ``labels_total``, else the budget plus ``labels_val``/``val_size``
    or ``val_default``. A run that read smaller step budgets off itself gives one trial per budget.
    """
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=5000)
    trials = []
    for r in runs:
        tags, m = r.data.tags, r.data.metrics
        if tags.get(TAG + "stage") != "finetune":
            continue
        validation = tags.get(TAG + "validation", "oracle")
        if validation == "realistic" and "labels_train" in m:
            labels, val_labels = int(m["labels_train"] + m["labels_val"]), 0
        else:
            labels = int(m.get("labels_train", m.get("train_size", 0))) or _count(tags)
            val_labels = m.get("labels_val", m.get("val_size", val_default))
        total = int(m["labels_total"]) if "labels_total" in m else None
        trial = Trial(r.info.run_id, tags[TAG + "arm"], tags[TAG + "labels"], labels, int(tags[TAG + "steps"]),
                      int(tags[TAG + "seed"]), run_outcome(r), m.get(f"best_{metric}", m.get(metric)), m.get("test_acc"),
                      m.get("test_loss"), int(val_labels) if val_labels is not None else None, dict(r.data.params),
                      validation=validation, total=total, source=tags.get(TAG + "pretrained_from", ""))
        trials.append(trial)
        if labels:  # a run still under way has not logged its labels yet: its read-off budgets wait for them
            trials += read_off(trial, m, tags.get(TAG + "step_budgets", ""), metric)
    return trials, runs


def read_off(trial: Trial, metrics: dict, budgets: str, metric: str) -> list[Trial]:
    """The trials a longer run stands for at each smaller step budget it recorded (``at<steps>/...``):
    selected so far, tested then. A budget the run never reached (stopped, failed) stands for nothing."""
    out = []
    for steps in (int(s) for s in budgets.split(",") if s):
        if f"at{steps}/test_acc" in metrics:
            out.append(replace(trial, steps=steps, outcome="completed", val=metrics.get(f"at{steps}/best_{metric}"),
                               test_acc=metrics[f"at{steps}/test_acc"], test_loss=metrics.get(f"at{steps}/test_loss"),
                               run_steps=trial.steps))
    return out


def _count(tags: dict) -> int:
    budget = tags[TAG + "labels"]
    return int(budget) if budget.isdigit() else 0


def natural(item) -> list:
    """Sort key that reads the numbers in a name as numbers: ae.latent_dim=2 before ae.latent_dim=12.
    Takes a name or a (name, value) pair."""
    name = item[0] if isinstance(item, tuple) else item
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def stage_runs(client: MlflowClient, experiment_id: str) -> dict[str, object]:
    """The newest completed run of each pretraining stage in the experiment (any invocation: they are cached)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG}outcome` = 'completed'",
                              order_by=["attributes.start_time DESC"], max_results=5000)
    out = {}
    for r in runs:
        stage = r.data.tags.get(TAG + "stage")
        if stage and stage != "finetune" and stage not in out:
            out[stage] = r
    return out


def _artifact(client: MlflowClient, run_id: str, path: str):
    """A torch-saved artifact of a run, or None when it has none."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception:  # noqa: BLE001 -- MLflow raises several kinds for a missing artifact
            return None
        return torch.load(local, weights_only=True)


def embeddings_markdown(embeddings: dict[str, dict]) -> list[str]:
    """Per stage: each class's spread and how far apart the classes are, in the embedding's own units."""
    if not embeddings:
        return []
    classes = len(next(iter(embeddings.values()))["spread"])
    head = ["stage", "separation"] + [f"spread {c}" for c in range(classes)]
    lines = ["## Latent embeddings", "", "Spread: root mean squared distance of a class's test images to their "
             "centroid; separation: mean distance between class centroids over mean spread; both in units of the "
             "embedding's overall spread (RMS distance to its mean). Centroid distances are in the figure and in "
             "`centroid_distances.csv`.", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for stage, e in sorted(embeddings.items(), key=natural):
        lines.append(f"| {stage} | {e['separation']:.2f} | " + " | ".join(f"{v:.2f}" for v in e["spread"].tolist()) + " |")
    return lines + [""]


def stage_grids(stages: dict[str, object]) -> dict[str, list[dict]]:
    """Stages expanded from a ``grid:``: base name -> one entry per point (its values and test metrics)."""
    out = defaultdict(list)
    for name, run in sorted(stages.items(), key=natural):
        tags, m = run.data.tags, run.data.metrics
        if tags.get(TAG + "grid_of"):
            out[tags[TAG + "grid_of"]].append({"stage": name, "point": json.loads(tags[TAG + "point"]),
                                               **{k: m.get(k) for k in ("test_loss", "test_l1", "test_l2", "test_acc")}})
    return dict(out)


def grid_downstream(points: list[dict], chosen: list[Trial]) -> dict[str, dict[int, float]]:
    """stage -> label budget -> mean test accuracy of the selected trials that started from it (longest steps)."""
    out = {}
    for p in points:
        trials = [t for t in chosen if t.source == p["stage"]]
        if not trials:
            continue
        steps = max(t.steps for t in trials)
        by_labels = defaultdict(list)
        for t in trials:
            if t.steps == steps:
                by_labels[t.labels].append(t.test_acc)
        out[p["stage"]] = {n: float(np.mean(v)) for n, v in sorted(by_labels.items())}
    return out


def compute_markdown(stages: dict[str, object], cells: list[Cell], target: float | None,
                     pretrained: set[str] | None = None) -> list[str]:
    """The trade pretraining makes: each stage's cost (paid once, on unlabelled images) beside the
    fine-tune steps each pretrained arm needs to reach ``target`` against scratch at the same labels
    (the longest step budget's curves), as images processed (steps x batch). ``pretrained``: the arms
    that start from a stage (default: those whose trials name one)."""
    if not stages or not cells:
        return []
    if pretrained is None:
        pretrained = {c.arm for c in cells if any(t.source for t in c.trials)}
    lines = ["## Compute: pretraining paid once, fine-tune steps saved", "",
             "Images processed = optimizer steps x batch size, a hardware-free measure of compute (a pretraining "
             "step and a fine-tune step of the same encoder cost about the same per image).", "",
             "| stage | objective | steps | batch | images processed | images it trained on | wall time |", "|" + " --- |" * 7]
    cost = {}
    for name, run in sorted(stages.items(), key=natural):
        p, m = run.data.params, run.data.metrics
        steps, batch = int(float(p.get("steps", 0))), _batch(p)
        cost[name] = steps * batch
        wall = "-" if "wall_s" not in m else f"{m['wall_s']:.0f} s" if m["wall_s"] < 90 else f"{m['wall_s'] / 60:.1f} min"
        kind = run.data.tags.get(TAG + "objective", "?")
        lines.append(f"| {name} | {kind} | {steps:,} | {batch} | {steps * batch:,} | {int(m.get('train_size', 0)):,} | {wall} |")
    if target is None or not any(t.curve for c in cells for t in c.trials):
        return lines + [""]
    longest = {}
    for c in cells:
        if c.steps >= longest.get((c.arm, c.labels), c).steps:
            longest[(c.arm, c.labels)] = c
    lines += ["", f"Fine-tune steps to {target:.0%} validation accuracy (median over seeds, 95% bootstrap interval), and "
              "the fine-tune images a pretrained arm saves against scratch at the same labels; 'pays back after' is the "
              "stage's images over the images saved per fine-tune run.", "",
              "| labels | arm | steps to target | fine-tune images to target | saved vs scratch | pays back after |",
              "|" + " --- |" * 6]
    for labels in sorted({k[1] for k in longest}):
        base = longest.get((BASELINE, labels))
        base_est = steps_estimate(base, target) if base else None
        for arm in sorted((a for a, b in longest if b == labels), key=lambda a: (a != BASELINE, a)):
            c = longest[(arm, labels)]
            found = steps_estimate(c, target)
            if found is None:
                continue
            est, batch = found[0], _batch(c.trials[0].params)
            steps = stats.fmt_estimate(est, stats.fmt_steps, stats.fmt)
            images = stats.fmt(est.point.scaled(batch))
            saved, back = "", ""
            source = c.trials[0].source
            if arm in pretrained and base_est:  # not a random-init baseline: it pays for no stage
                a, b = est.point.scaled(batch), base_est[0].point.scaled(_batch(base.trials[0].params))
                if a.kind == "above" and b.kind == "above":
                    saved = "neither reached it"
                elif a.kind == "above":
                    saved, back = "none: only scratch reached it", "never"
                elif b.kind == "above":
                    saved = f"> {b.value - a.value:,.0f}"  # scratch never got there within its budget
                else:  # an arm already there at step 0 ('below') counts as there
                    diff = b.value - a.value
                    saved = f"{diff:,.0f}"
                    back = f"{cost[source] / diff:,.1f} runs" if diff > 0 and source in cost else "never" if diff <= 0 else ""
            lines.append(f"| {c.labels:,} | {arm} | {steps} | {images} | {saved or '-'} | {back or '-'} |")
    return lines + [""]


def _batch(params: dict) -> int:
    """The batch size a run trained with: its param, else TrainConfig's default (unset values are not logged)."""
    from .train import TrainConfig

    return int(float(params.get("batch_size") or TrainConfig.batch_size))


def grid_markdown(base: str, points: list[dict], downstream: dict) -> list[str]:
    keys = list(points[0]["point"])
    budgets = sorted({n for accs in downstream.values() for n in accs})
    head = keys + ["test loss", "test L1", "test L2"] + [f"test acc, {n:,} labels" for n in budgets]
    lines = [f"## Pretraining grid: {base}", "", "Each point is its own cached stage; test metrics of its checkpoint "
             "selected on held-out images, and the mean over seeds of the test accuracy of the selected fine-tune "
             "trials that started from it.", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for p in points:
        cols = [str(p["point"][k]) for k in keys] + [f"{p[k]:.4f}" if p[k] is not None else "-" for k in ("test_loss", "test_l1", "test_l2")]
        cols += [f"{downstream[p['stage']][n]:.2%}" if n in downstream.get(p["stage"], {}) else "-" for n in budgets]
        lines.append("| " + " | ".join(cols) + " |")
    return lines + [""]


def trial_outcomes(runs: list) -> tuple[dict[str, Counter], list[str]]:
    """Counts by stage and outcome, and one line per trial that diverged, failed or was interrupted."""
    counts: dict[str, Counter] = defaultdict(Counter)
    problems = []
    done = {r.data.tags.get(TAG + "cell") for r in runs if run_outcome(r) == "completed"}
    for r in sorted(runs, key=lambda r: (r.data.tags.get(TAG + "stage", ""), r.data.tags.get(TAG + "cell", ""))):
        tags, outcome = r.data.tags, run_outcome(r)
        stage = tags.get(TAG + "stage", "?")
        counts[stage][outcome] += 1
        name = tags.get(TAG + "cell") or f"{stage}/seed={tags.get(TAG + 'seed', '?')}"
        if outcome == "failed":
            error = (tags.get(TAG + "error") or "").strip().splitlines()
            problems.append(f"`{name}` failed: {error[-1][:200] if error else 'no error recorded'}")
        elif outcome == "diverged":
            step = r.data.metrics.get("diverged_step")
            problems.append(f"`{name}` diverged" + (f" at step {step:,.0f}" if step is not None else ""))
        elif outcome == "interrupted":
            why = ("the sweep was stopped" if tags.get(TAG + "outcome") == "interrupted" else
                   "no outcome logged: still running, or the sweep was stopped")
            again = "; its cell has a completed trial (run again on resume, or another sample)" if tags.get(TAG + "cell") in done else ""
            problems.append(f"`{name}` interrupted ({why}){again}")
    return dict(counts), problems


def blocked_cells(parent_run, spec, runs: list, expected: dict[str, str]) -> dict[str, str]:
    """Cells that never ran because their arm's pretraining stage failed or diverged: cell -> reason.

    The parent run's tag ``dlsweep.blocked`` is a JSON list of those arms; ``expected`` maps each
    grid cell to its arm.
    """
    reasons = {}
    for arm in json.loads(parent_run.data.tags.get(TAG + "blocked") or "[]"):
        arms = spec.finetune.arms if spec is not None and spec.finetune else {}
        stage = arms[arm].from_ if arm in arms else None
        ended = {run_outcome(r) for r in runs if stage and r.data.tags.get(TAG + "stage") == stage}
        how = "diverged" if "diverged" in ended and "failed" not in ended else "failed"
        reasons[arm] = f"blocked (pretraining stage {stage} {how})" if stage else "blocked (its pretraining stage failed)"
    out = {cell: reasons[arm] for cell, arm in expected.items() if arm in reasons}
    leads = json.loads(parent_run.data.tags.get(TAG + "blocked_searches") or "[]")  # search_scope cell
    if leads and spec is not None:
        from .spec import finetune_cells

        for c in finetune_cells(spec):
            if c.lead in leads and c.key not in out:
                out[c.key] = f"blocked (the search on seed {c.lead.rsplit('=', 1)[-1]} completed no trial)"
    return out


def sweep_of(client: MlflowClient, parent: str):
    """The validated spec a sweep invocation ran with (its parent run's ``sweep.json``), or None."""
    from .spec import Sweep

    try:
        with tempfile.TemporaryDirectory() as tmp:
            return Sweep.model_validate(json.loads(Path(client.download_artifacts(parent, "sweep.json", tmp)).read_text()))
    except (OSError, ValueError, mlflow.exceptions.MlflowException):  # a run from before sweep.json existed
        return None


SETTING_SKIP = ("data_dir", "labels", "seed", "step_budgets", "init_encoder", "test_size", "embeddings", "metric",
                "validation", "val_fraction", "split_seed", "dataset", "val_size", "classes")  # said elsewhere


def _setting(v) -> str:
    """A typed setting of the sweep's spec as the file would write it (integers with thousands separators)."""
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, (int, float)):
        return f"{v:,}" if isinstance(v, int) else f"{v:g}"
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def settings_markdown(spec) -> list[str]:
    """What each pretraining stage and each arm trained with, as the sweep set it (first seed): the
    augmentations and hyperparameters a reader needs to repeat a number."""
    from .spec import finetune_cells, pretrain_jobs

    columns: dict[str, dict] = {}
    for job in pretrain_jobs(spec).values():
        columns.setdefault(f"stage {job.stage}", job.train)
    searched = set(spec.finetune.search) if spec.finetune else set()
    for cell in finetune_cells(spec):
        train = {**cell.train, **{k: "searched" for k in searched}}
        if spec.finetune.arms[cell.tags["arm"]].from_:
            train["from"] = spec.finetune.arms[cell.tags["arm"]].from_
        columns.setdefault(f"arm {cell.tags['arm']}", train)
    if not columns:
        return []
    keys = sorted({k for c in columns.values() for k in c if k not in SETTING_SKIP},
                  key=lambda k: (k not in ("objective", "from", "finetune", "encoder", "augment"), k))
    lines = ["## Settings", "", "Each stage's and arm's settings as the sweep set them (steps: the largest budget); "
             "anything not listed is at its default in `dlcore/train.py` (`TrainConfig`).", "",
             "| setting | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_setting(c[k]) if k in c else "" for c in columns.values()) + " |")
    from .data import AUGMENTATION_TEXT

    used = sorted({c["augment"] for c in columns.values() if c.get("augment") in AUGMENTATION_TEXT})
    lines += ["", "Augmentations, on each training batch: " + "; ".join(f"`{a}`: {AUGMENTATION_TEXT[a]}" for a in used)
              + "." if used else ""]
    return lines + [""]


def curve_trials(chosen: list[Trial], cells: list[str] | None) -> list[Trial]:
    """Trials whose loss curves to draw: for each ``arm/labels=N`` asked for (default: every arm at
    its smallest budget), the selected trial of the lowest seed."""
    if not cells:
        smallest = min(t.labels for t in chosen)
        cells = sorted({f"{t.arm}/labels={smallest}" for t in chosen if t.labels == smallest})
    out = []
    for cell in cells:
        matches = sorted((t for t in chosen if f"{t.arm}/labels={t.labels}" == cell or f"{t.arm}/labels={t.budget}" == cell),
                         key=lambda t: (t.steps, t.seed))
        if not matches:
            raise ValueError(f"no completed trial in cell '{cell}'; cells look like 'scratch/labels=100'")
        out.append(matches[0])
    return out


# ---- the report ------------------------------------------------------------------------------


def build(client: MlflowClient, experiment: str, out: Path, parent: str | None = None, target: float | None = None,
          curves: list[str] | None = None, drawn: list[str] | None = None) -> dict:
    """Write figures, tables and report.md for one sweep invocation (default: the latest) and log them
    to its parent run; returns what was found.

    Nothing is written before the experiment and run are checked. The folder is built beside ``out``
    and swapped in whole, so no file of an earlier report survives and a crash leaves the old one.
    """
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment '{experiment}' in {client.tracking_uri}")
    parent_run = sweep_parent(client, exp.experiment_id, experiment, parent)
    out = Path(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "report.md").exists())):
        raise ValueError(f"{out} exists and is not a report folder (no report.md in it); choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    try:
        staging.chmod(0o755)
        result = _write(client, experiment, exp.experiment_id, parent_run, staging, target, curves, drawn)
        _swap(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    client.log_artifacts(parent_run.info.run_id, str(out), "report")
    return {**result, "out": out}


def _swap(new: Path, out: Path) -> None:
    """Put ``new`` in place of ``out``: the old folder is moved aside, and back if the move fails."""
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old = aside / "report"
    if out.exists():
        out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        if old.exists():
            old.rename(out)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _write(client: MlflowClient, experiment: str, experiment_id: str, parent_run, out: Path, target: float | None,
           curves: list[str] | None, drawn: list[str] | None = None) -> dict:
    parent = parent_run.info.run_id
    spec = sweep_of(client, parent)
    expected, metric, mode, searched, val_default = {}, "val_acc", "max", SEARCH_KEYS, None
    if spec is not None:
        from .spec import finetune_cells

        expected = {c.key: c.tags["arm"] for c in finetune_cells(spec)}
        metric, mode = spec.metric, spec.mode
        searched = tuple(spec.finetune.search) if spec.finetune else ()
        target = target if target is not None else spec.target
        val_default = spec.data.val_size if isinstance(spec.data.val_size, int) else None
    trials, runs = read_trials(client, experiment_id, parent, metric, val_default)
    chosen = selected_trials(trials, mode)
    histories: dict[str, list] = {}
    for t in chosen:  # a trial read off a longer run has that run's curve up to its own budget
        if t.run_id not in histories:
            histories[t.run_id] = metric_history(client, t.run_id, ("val_acc",))["val_acc"]
        t.curve = [p for p in histories[t.run_id] if p[0] <= t.steps]
    cells = select(chosen)
    arms = sorted({t.arm for t in trials})
    colors = plots.arm_colors(arms)
    figures: list[tuple[str, str]] = []  # (file, caption)
    labels_note = labels_caption(cells)

    if cells:
        plots.save(plots.accuracy_vs(cells, colors, f"{experiment}: test accuracy vs labels", "labels"),
                   out / "accuracy_vs_labels.png", svg=True)
        figures.append(("accuracy_vs_labels.png", f"Test accuracy vs label budget: {plots.ci_caption([c.n for c in cells])}; "
                        f"{labels_note}."))
    if len({c.steps for c in cells}) > 1:
        plots.save(plots.accuracy_vs(cells, colors, f"{experiment}: test accuracy vs fine-tune steps", "steps"),
                   out / "accuracy_vs_step_budget.png", svg=True)
        read = sorted({t.steps for t in chosen if t.run_steps})
        how = (f" (budgets {', '.join(f'{s:,}' for s in read)} read off the longest run: the checkpoint selected by then, "
               "tested then)" if read else "")
        figures.append(("accuracy_vs_step_budget.png", f"Test accuracy vs fine-tune step budget{how}, one panel per label "
                        f"budget: {plots.ci_caption([c.n for c in cells])}; {labels_note}."))
    longest = [t for t in chosen if t.run_steps is None]  # read-off budgets are prefixes of these curves
    if any(t.curve for t in longest):
        plots.save(plots.accuracy_vs_steps(longest, colors, f"{experiment}: validation accuracy during fine-tuning", target),
                   out / "accuracy_vs_steps.png", svg=True)
        figures.append(("accuracy_vs_steps.png", "Validation accuracy vs fine-tune step, one panel per label and step "
                        f"budget (selected trials; {plots.ci_caption([c.n for c in cells], 'curve')}; validation labels "
                        f"as in the protocol above){f'; dotted: target {target:.0%}' if target else ''}."))
        for t in curve_trials(chosen, curves):
            name = f"loss_curves_{t.arm}_{t.labels}.png"
            title = f"{t.arm}, {t.labels} labels, {t.steps} steps, seed {t.seed}"
            plots.save(plots.loss_curves(metric_history(client, t.run_id, CURVE_METRICS + TEST_CURVES), title), out / name, svg=True)
            figures.append((name, f"Train and validation loss and accuracy: {title}."))

    stages = stage_runs(client, experiment_id)
    grids, losses, errors, embeddings = {}, {}, {}, {}
    for stage, run in sorted(stages.items(), key=natural):
        name = f"loss_curves_{stage}.png"
        history = metric_history(client, run.info.run_id, CURVE_METRICS + TEST_CURVES)
        plots.save(plots.loss_curves(history, f"pretraining stage {stage}"), out / name, svg=True)
        figures.append((name, f"Train and validation loss of pretraining stage {stage} per evaluation"
                        + (" (test curves: display only)." if any(k.startswith("test_curve") and v for k, v in history.items()) else ".")))
        found = _artifact(client, run.info.run_id, "checkpoint/embeddings.pt")
        if found is not None:
            embeddings[stage] = found
        samples = _artifact(client, run.info.run_id, "checkpoint/samples.pt")
        if samples is None:  # not an autoencoder stage
            continue
        grids[stage] = samples
        losses[stage] = run.data.metrics.get("test_loss")
        errors[stage] = {k: run.data.metrics[f"test_{k}"] for k in ("l1", "l2") if f"test_{k}" in run.data.metrics}
    unknown = sorted(set(drawn or ()) - set(embeddings))
    if unknown:
        raise ValueError(f"--embeddings: no stage with embeddings named {', '.join(unknown)}; "
                         f"stages with embeddings: {', '.join(sorted(embeddings)) or 'none'}")
    if embeddings:
        shown = {k: v for k, v in embeddings.items() if not drawn or k in drawn}
        plots.save(plots.embeddings(shown), out / "embeddings.png", svg=False)
        drawn_n = " or ".join(f"{n:,}" for n in sorted({len(e["labels"]) for e in shown.values()}))
        figures.append(("embeddings.png", "How each stage's encoder lays out the test set: its top two principal axes "
                        f"({drawn_n} images, coloured by class) and the distances between class centroids, both in units of "
                        "the embedding's overall spread, so encoders of different scales compare."))
    if grids:
        plots.save(plots.reconstructions(grids, errors), out / "reconstructions.png", svg=True)
        figures.append(("reconstructions.png", "Test images and their reconstructions by each autoencoder stage "
                        "(64 images; first rows: clean and, for denoising stages, noisy input)."))

    grid_md = []
    for base, points in stage_grids(stages).items():
        downstream = grid_downstream(points, chosen)
        plots.save(plots.stage_grid(base, points, downstream), out / f"grid_{base}.png", svg=True)
        figures.append((f"grid_{base}.png", f"Stage {base} over its grid: test reconstruction error (or loss) of each "
                        "point, and the mean test accuracy of the arms fine-tuned from it, per label budget."))
        grid_md += grid_markdown(base, points, downstream)

    rows = summary_rows(cells, target, searched)
    pretrained = pretrained_arms(spec, trials)
    paired = [p for p in paired_differences(cells) if p["arm"] in pretrained]
    paired_random = [p for r, same in random_baselines(spec, pretrained).items() for p in paired_differences(cells, r)
                     if p["arm"] in same]
    efficiency = [e for arm in arms if arm in pretrained and BASELINE in arms for e in label_efficiency(cells, arm)]
    counts, problems = trial_outcomes(runs)
    blocked = blocked_cells(parent_run, spec, runs, expected)
    present = {f"{t.arm}/labels={t.budget}/steps={t.steps}/seed={t.seed}" for t in trials if t.outcome == "completed"}
    missing = sorted(set(expected) - present - set(blocked))
    _write_csv(out / "summary.csv", rows, SUMMARY_HEADER)
    if embeddings:
        _write_csv(out / "centroid_distances.csv", [
            {"stage": stage, "class": i, **{str(j): round(v, 4) for j, v in enumerate(row)}}
            for stage, e in sorted(embeddings.items(), key=natural) for i, row in enumerate(e["centroid_dist"].tolist())])
    finetuned = spec is None or spec.finetune is not None
    table_md = _markdown(rows, finetuned)
    (out / "summary.md").write_text(table_md)

    md = [f"# {experiment}: {'data-efficiency report' if finetuned else 'pretraining report'}", "",
          f"Experiment `{experiment}`, sweep run `{parent}`.", ""]
    md += [protocol(spec, trials, parent_run.data.tags.get(TAG + "sampler")), ""] if finetuned else [
        "A pretraining-only sweep: each stage keeps its best checkpoint by validation loss; test losses below.", ""]
    if missing:
        md += [f"**Partial sweep:** {len(missing)} grid cell(s) have no completed trial yet: " + ", ".join(missing[:20])
               + (" ..." if len(missing) > 20 else ""), ""]
    for reason in sorted(set(blocked.values())):
        cells_blocked = sorted(c for c, r in blocked.items() if r == reason)
        md += [f"**{len(cells_blocked)} cell(s) {reason}:** " + ", ".join(cells_blocked[:20])
               + (" ..." if len(cells_blocked) > 20 else ""), ""]
    for name, caption in figures:
        md += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    if finetuned:
        md += ["## Summary per cell", "", "Test accuracy and test loss of each seed's selected trial: mean ± half-width "
               "of the 95% Student-t interval over seeds (no interval with one seed). Steps to target: median over seeds "
               "of the step at which the validation accuracy reached it (linear between the two evaluations that bracket "
               "it), 95% percentile-bootstrap interval over seeds; a seed that never reached it counts as 'not within' its "
               "step budget, not as missing.", "", table_md, ""]
    if paired:
        md += ["## Pretrained minus scratch, paired by seed", "", "Same labels, steps and seed (hence the same labelled "
               "images): mean of the per-seed differences ± half-width of its 95% Student-t interval.", "",
               _paired_markdown(paired), ""]
    if paired_random:
        md += ["## Pretrained minus random initialisation, paired by seed", "", "Each pretrained arm against the arm "
               "that trains the same head the same way on the same encoder at its random initialisation (same labels, "
               "steps and seed): what the pretraining bought that arm. Mean of the per-seed differences ± half-width of "
               "its 95% Student-t interval.", "", _paired_markdown(paired_random), ""]
    if efficiency:
        md += ["## Label efficiency", "", "Labels the scratch arm needs to match each pretrained budget's mean test "
               "accuracy (linear interpolation in log(labels) between the scratch budgets), as a multiple of that budget; "
               "95% percentile-bootstrap interval over seeds (10,000 resamples of the seeds, both arms resampled together). "
               "'> N' means scratch does not get there within its largest budget, '≤ N' that its smallest budget already does. "
               "With few seeds a percentile bootstrap understates the uncertainty (3 seeds give 10 distinct resamples).",
               "", _efficiency_markdown(efficiency), ""]
    if losses:
        md += ["## Pretraining stages", "", "Test metrics of each stage's checkpoint selected on held-out images. "
               "Autoencoders report their mean L1 and mean squared (L2) error per pixel whatever loss they trained on, "
               "so stages trained on different losses compare in common units.", "",
               "| stage | objective | selected step | test loss (its own) | test L1 | test L2 | test accuracy |",
               "|" + " --- |" * 7]
        for name, run in sorted(stages.items(), key=natural):
            m = run.data.metrics
            if m.get("test_loss") is None:
                continue
            cols = [f"{m['best_step']:,.0f}" if "best_step" in m else "-"]
            cols += [f"{m[k]:.4f}" if k in m else "-" for k in ("test_loss", "test_l1", "test_l2")]
            cols.append(f"{m['test_acc']:.2%}" if "test_acc" in m else "-")
            md.append(f"| {name} | {run.data.tags.get(TAG + 'objective', '?')} | " + " | ".join(cols) + " |")
        md.append("")
    md += compute_markdown(stages, cells, target, pretrained) if finetuned else []
    md += grid_md + embeddings_markdown(embeddings)
    md += settings_markdown(spec) if spec is not None else []
    md += ["## Trials", "", _trials_markdown(counts, problems), ""]
    (out / "report.md").write_text("\n".join(md))
    return {"parent": parent, "cells": cells, "rows": rows, "paired": paired + paired_random, "efficiency": efficiency, "missing": missing,
            "blocked": blocked, "outcomes": counts, "problems": problems, "failed": counts.get("finetune", Counter())["failed"],
            "figures": [f for f, _ in figures], "target": target, "finetuned": finetuned, "stage_losses": losses,
            "stage_errors": errors}


def labels_caption(cells: list[Cell]) -> str:
    """What the label axis counts, and the labels each budget used in all (per arm where arms differ)."""
    totals = sorted({(c.arm, c.labels, c.labels_total) for c in cells if c.labels_total is not None})
    if not totals:
        return "labels used in total unknown (runs from before they were logged)"
    if all(n == total for _, n, total in totals):
        return "a budget's labels are all it used (training and validation)"
    by_arm = defaultdict(list)
    for arm, n, total in totals:
        by_arm[arm].append(f"{n:,} → {total:,}")
    same = len({tuple(v) for v in by_arm.values()}) == 1
    parts = [", ".join(next(iter(by_arm.values())))] if same else [f"{arm}: {', '.join(v)}" for arm, v in by_arm.items()]
    return "labels used in total (training + validation + monitors), per budget: " + "; ".join(parts)


def protocol(spec, trials: list[Trial], sampler: str | None = "sobol-tpe") -> str:
    """The paragraph a reader needs before any number: validation, selection, search, seeds, labels, test."""
    if spec is None:
        return ("**Protocol.** The sweep's spec (sweep.json) is missing from its parent run, so its validation and "
                "search cannot be stated; numbers are test metrics of the trial selected on validation per cell and seed.")
    ft = spec.finetune
    validation = validation_text(spec, trials)
    if ft.search:
        space = ", ".join(f"{k} ~ {kind}{json.dumps(arg)}"
                          for k, dist in ft.search.items() for kind, arg in dist.model_dump(exclude_none=True).items())
        from .search import STARTUP

        sobol = "points of a scrambled Sobol sequence (space-filling, no model)"
        search = f"{ft.samples} Optuna sample(s) per cell over {space}, " + (
            f"all at {sobol}" if ft.samples <= STARTUP else
            f"the first {STARTUP} at {sobol}, the rest by TPE fitted to the cell's trials finished by then")
        if sampler is None:  # a sweep run before the sampler was recorded: TPE with 4 random startup trials
            search = (f"{ft.samples} Optuna TPE sample(s) per cell over {space}"
                      + (f"; with {ft.samples} ≤ 4 samples TPE (n_startup_trials=4) is pure random sampling"
                         if ft.samples <= 4 else ", the first 4 at random"))
        elif any(dist.choice for dist in ft.search.values()):
            search += " (choice keys: drawn at random in the Sobol samples)"
        first = ft.seeds[0]
        search += ("; each (arm, labels, steps, seed) cell searched on its own" if ft.search_scope == "seed" else
                   f"; searched on seed {first} only: every other seed trained one trial with the values of seed "
                   f"{first}'s selected trial in the same (arm, labels, steps) cell")
    else:
        search = f"none; {ft.samples} trial(s) per cell with the sweep's fixed hyperparameters"
    asha = (f"; ASHA may stop unpromising trials after {spec.asha.grace_period} steps, and only trials that ran to "
            "their end compete" if spec.asha.enabled and ft.samples > 1 else "")
    if {t.validation for t in trials} == {"none"} or (not trials and spec.validation.protocol == "none"):
        selection = "none: each cell's single trial, at its last step"
    else:
        selection = (f"each trial keeps its checkpoint with the best {spec.metric} on validation (evaluated every "
                     f"{ft.eval_every or 100} steps and at step 0), and in each (arm, labels, steps, seed) cell the "
                     f"completed trial with the {'highest' if spec.mode == 'max' else 'lowest'} {spec.metric} is selected")
    steps = steps_text(trials)
    return (f"**Protocol.** Validation: {validation}. Selection: {selection}{asha}. Search: {search}. {steps}"
            f"Seeds: {', '.join(map(str, ft.seeds))}; a seed fixes the labelled subset, so arms with the same seed "
            f"trained on the same images. Labels used in total (labels_total): {labels_text(spec, trials)}. Test set: "
            "each selected checkpoint is evaluated on it once (once per step budget where budgets are read off one "
            "run); test numbers, and any test curves drawn for display, never enter any selection.")


def validation_text(spec, trials: list[Trial]) -> str:
    """The fine-tune validation protocol, as the trials ran it (their tag) or, for old runs, the spec."""
    d = spec.data
    ran = sorted({t.validation for t in trials}) or [spec.validation.protocol]
    texts = []
    for name in ran:
        if name == "realistic":
            texts.append(f"realistic (Oliver et al. 2018): {spec.validation.fraction:.0%} of each class's labels in the "
                         "budget (at least one per class; stratified, nested and seeded like the budgets) are held out "
                         "of training and used to select; an n-label result used n labels in all")
        elif name == "oracle":
            logged = sorted({t.labels_val for t in trials if t.labels_val})
            size = f"{logged[0]:,}" if len(logged) == 1 else f"{d.val_size:,}" if isinstance(d.val_size, int) else f"{d.val_size:.0%} of the"
            texts.append(f"oracle: a fixed split of {size} labelled training images outside every budget (split seed "
                         f"{d.split_seed}, the same for every arm and seed), counted in labels_total")
        else:
            texts.append("none: no model selection; fixed hyperparameters and the last checkpoint")
    return "; ".join(texts)


def steps_text(trials: list[Trial]) -> str:
    read = sorted({(t.steps, t.run_steps) for t in trials if t.run_steps})
    if not read:
        return ""
    longest = max(r for _, r in read)
    return (f"Steps: the step budgets {', '.join(f'{s:,}' for s in sorted({s for s, _ in read}))} are read off each "
            f"{longest:,}-step run (a schedule that does not depend on the total): at each, the checkpoint selected "
            "so far and its test metrics, as a separate run with that budget and seed would give. ")


def labels_text(spec, trials: list[Trial]) -> str:
    """How labels were counted, including what pretraining stages read (k-NN monitors)."""
    monitors = [f"stage {name} ran a k-NN monitor on labelled images (bank of {st.knn_bank:,} plus validation)"
                for name, st in spec.pretrain.items() if st.knn_monitor or st.metric == "val_knn_acc"]
    base = ("training + validation labels + labels read by the pretraining stages an arm starts from, summed "
            "(the sets may overlap, so this is an upper bound)")
    label_free = "pretraining stages select their checkpoints on held-out unlabelled images (their own loss)"
    return base + ("; " + "; ".join(monitors) if monitors else f"; {label_free}")


def summary_rows(cells: list[Cell], target: float | None, keys: tuple = SEARCH_KEYS) -> list[dict]:
    rows = []
    for c in cells:
        acc, acc_hw = stats.mean_ci(c.accs)
        loss, loss_hw = stats.mean_ci(c.losses)
        row = {"arm": c.arm, "labels": c.labels, "steps": c.steps, "seeds": c.n,
               "test_acc_mean": round(acc, 4), "test_acc_ci95": None if c.n < 2 else round(acc_hw, 4),
               "test_loss_mean": round(loss, 4) if c.losses else None,
               "test_loss_ci95": round(loss_hw, 4) if len(c.losses) > 1 else None,
               "labels_total": c.labels_total}
        if target is not None:
            found = steps_estimate(c, target)
            est, reached, n = found if found else (None, 0, 0)
            row["steps_to_target"] = stats.fmt_steps(est.point) if est else None
            row["steps_to_target_ci95"] = (f"{stats.fmt(est.lo)} to {stats.fmt(est.hi)}" if est and est.lo else None)
            row["steps_to_target_censored"] = round(est.censored, 3) if est else None
            row["reached_target"] = f"{reached} of {n}"
        row["hyperparameters"] = hyperparameters(c, keys)
        rows.append(row)
    return rows


# summary.csv's columns when it has no row (with rows: theirs, which add the steps-to-target ones with a target)
SUMMARY_HEADER = ["arm", "labels", "steps", "seeds", "test_acc_mean", "test_acc_ci95", "test_loss_mean", "test_loss_ci95",
                  "labels_total", "hyperparameters"]


def _write_csv(path: Path, rows: list[dict], header: list[str] | None = None) -> None:
    """``rows`` as CSV; with no rows, ``header`` alone, so that a reader gets an empty table, not an error."""
    with open(path, "w", newline="") as f:
        if not rows and not header:
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else header)
        w.writeheader()
        w.writerows(rows)


def ci_text(mean: float | None, half: float | None, spec: str) -> str:
    """'72.00% ± 4.97%' (spec '.2%'); the mean alone without a half-width; '' without a mean."""
    if mean is None:
        return ""
    return format(mean, spec) + (f" ± {format(half, spec)}" if half is not None else "")


def _markdown(rows: list[dict], finetuned: bool = True) -> str:
    if not rows:
        return "_No completed fine-tune trials yet._" if finetuned else "_A pretraining-only sweep: it has no fine-tune cells._"
    steps = "steps_to_target" in rows[0]
    head = ["arm", "labels", "labels_total", "steps", "seeds", "test acc (95% CI)", "test loss (95% CI)"]
    head += ["steps to target: median (95% CI)", "seeds reaching it"] if steps else []
    lines = ["| " + " | ".join(head + ["hyperparameters (per seed)"]) + " |", "|" + " --- |" * (len(head) + 1)]
    for r in rows:
        cols = [r["arm"], r["labels"], r["labels_total"] if r["labels_total"] is not None else "?", r["steps"], r["seeds"],
                ci_text(r["test_acc_mean"], r["test_acc_ci95"], ".2%"), ci_text(r["test_loss_mean"], r["test_loss_ci95"], ".4f")]
        if steps:
            ci = f" ({r['steps_to_target_ci95']})" if r["steps_to_target_ci95"] else ""
            cols += [(r["steps_to_target"] or "-") + ci, r["reached_target"]]
        lines.append("| " + " | ".join(str(v) for v in cols + [r["hyperparameters"]]) + " |")
    return "\n".join(lines)


def diff_text(p: stats.Paired, kind: str) -> str:
    """'+9.00 pp ± 2.48 pp' for accuracy (percentage points), '-0.1800 ± 0.0497' for loss; '-' without pairs."""
    if p.n == 0:
        return "-"
    scale, digits, unit = (100, 2, " pp") if kind == "acc" else (1, 4, "")
    text = f"{p.mean * scale:+.{digits}f}{unit}"
    return text + (f" ± {p.half_width * scale:.{digits}f}{unit}" if p.n > 1 else " (one seed)")


def _paired_markdown(paired: list[dict]) -> str:
    lines = ["| arm | labels | steps | seed pairs | Δ test acc (95% CI) | Δ test loss (95% CI) |", "|" + " --- |" * 6]
    for p in paired:
        lines.append(f"| {p['arm']} − {p['baseline']} | {p['labels']} | {p['steps']} | {p['acc'].n} | "
                     f"{diff_text(p['acc'], 'acc')} | {diff_text(p['loss'], 'loss')} |")
    return "\n".join(lines)


def efficiency_text(e: dict) -> tuple[str, str]:
    """The labels scratch needs and the ratio: ('316', '3.16x (95% CI 2.78x to 3.59x)'), ('> 1,000', '> 1.00x ...')."""
    return stats.fmt(e["baseline_labels"]), stats.fmt_estimate(e["ratio"], lambda b: stats.fmt(b, ".2f", "x"))


def _efficiency_markdown(rows: list[dict]) -> str:
    lines = ["| arm | steps | labels | seeds | mean test acc | scratch needs | ratio (95% CI) |", "|" + " --- |" * 7]
    for e in rows:
        need, ratio = efficiency_text(e)
        lines.append(f"| {e['arm']} | {e['steps']} | {e['labels']} | {e['seeds']} | {e['accuracy']:.2%} | {need} | {ratio} |")
    return "\n".join(lines)


def _trials_markdown(counts: dict[str, Counter], problems: list[str]) -> str:
    lines = ["| stage | " + " | ".join(o.replace("_", " ") for o in OUTCOMES) + " |", "|" + " --- |" * (len(OUTCOMES) + 1)]
    for stage in sorted(counts, key=lambda s: (s != "finetune", natural(s))):
        lines.append(f"| {stage} | " + " | ".join(str(counts[stage][o]) for o in OUTCOMES) + " |")
    lines += ["", "Only completed trials are selected; stopped, diverged, failed and interrupted ones are counted here "
              "and left out of every table and curve."]
    if problems:
        lines += [""] + [f"- {p}" for p in problems[:50]] + ([f"- ... and {len(problems) - 50} more"] if len(problems) > 50 else [])
    return "\n".join(lines)


# ---- two reports side by side ------------------------------------------------------------------


def read_summary(folder: Path) -> dict[tuple, dict]:
    """(arm, labels, steps) -> row of a report folder's summary.csv."""
    path = Path(folder) / "summary.csv"
    if not path.is_file():
        raise ValueError(f"{folder} is not a report folder (no summary.csv); make one with dlsweep report --out")
    with open(path, newline="") as f:
        return {(r["arm"], int(r["labels"]), int(r["steps"])): r for r in csv.DictReader(f)}


def compare(a: Path, b: Path, names: tuple[str, str]) -> str:
    """A markdown table of two reports of the same grid (e.g. one sweep under two validation protocols):
    per cell, each one's mean test accuracy with its interval and labels used in total, and the
    difference of the means."""
    rows_a, rows_b = read_summary(a), read_summary(b)
    common = sorted(set(rows_a) & set(rows_b), key=lambda k: (k[0], k[2], k[1]))
    if not common:
        raise ValueError(f"{a} and {b} share no (arm, labels, steps) cell")

    def acc(r: dict) -> str:
        half = float(r["test_acc_ci95"]) if r["test_acc_ci95"] else None
        return ci_text(float(r["test_acc_mean"]), half, ".2%")

    def total(r: dict) -> str:
        return f"{int(float(r['labels_total'])):,}" if r["labels_total"] else "?"

    lines = [f"| arm | labels | steps | {names[0]}: test acc | labels used | {names[1]}: test acc | labels used | "
             f"{names[1]} − {names[0]} |", "|" + " --- |" * 8]
    for key in common:
        ra, rb = rows_a[key], rows_b[key]
        diff = (float(rb["test_acc_mean"]) - float(ra["test_acc_mean"])) * 100
        lines.append(f"| {key[0]} | {key[1]:,} | {key[2]:,} | {acc(ra)} | {total(ra)} | {acc(rb)} | {total(rb)} | "
                     f"{diff:+.2f} pp |")
    return "\n".join(lines)
