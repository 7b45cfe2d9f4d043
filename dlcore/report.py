"""Data-efficiency report of a sweep, read back from MLflow (local sqlite or a server).

Selection is on validation only: in each (arm, labels, steps, seed) cell the completed trial with
the best validation metric is kept, and its test accuracy is what the curves show. Bands are 95%
Student-t confidence intervals of the mean over seeds.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient
from scipy import stats

from . import plots
from .tracking import TAG, metric_history


@dataclass
class Trial:
    """One fine-tune trial as the report needs it."""

    run_id: str
    arm: str
    budget: str  # the label budget as written in the sweep (count or fraction)
    labels: int  # labelled images it trained on
    steps: int
    seed: int
    outcome: str  # completed | stopped_early | failed | running
    val: float | None  # best validation metric
    test_acc: float | None
    params: dict = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val_acc)


@dataclass
class Cell:
    arm: str
    labels: int
    steps: int
    accs: list[float]  # test accuracy of each seed's selected trial
    best_params: dict

    @property
    def n(self) -> int:
        return len(self.accs)

    @property
    def mean(self) -> float:
        return float(np.mean(self.accs))

    @property
    def half_width(self) -> float:
        """Half-width of the 95% Student-t interval of the mean; nan with a single seed."""
        if self.n < 2:
            return float("nan")
        return float(stats.t.ppf(0.975, self.n - 1) * np.std(self.accs, ddof=1) / math.sqrt(self.n))


SEARCH_KEYS = ("lr", "weight_decay", "encoder_lr", "batch_size", "head_hidden")


def select(chosen: list[Trial], mode: str = "max", search_keys: tuple = SEARCH_KEYS) -> list[Cell]:
    """Per (arm, labels, steps), over seeds, from each seed's selected trial (``selected_trials``)."""
    groups: dict[tuple, list[Trial]] = defaultdict(list)
    for t in sorted(chosen, key=lambda t: (t.arm, t.labels, t.steps, t.seed)):
        groups[(t.arm, t.labels, t.steps)].append(t)
    cells = []
    for (arm, labels, steps), ts in sorted(groups.items()):
        top = max(ts, key=lambda t: t.val) if mode == "max" else min(ts, key=lambda t: t.val)
        params = {k: top.params[k] for k in search_keys if k in top.params}
        cells.append(Cell(arm, labels, steps, [t.test_acc for t in ts], params))
    return cells


def selected_trials(trials: list[Trial], mode: str) -> list[Trial]:
    """The completed trial with the best validation metric in each (arm, labels, steps, seed) cell."""
    best: dict[tuple, Trial] = {}
    for t in trials:
        if t.outcome != "completed" or t.val is None or t.test_acc is None:
            continue
        key = (t.arm, t.labels, t.steps, t.seed)
        if key not in best or (t.val > best[key].val if mode == "max" else t.val < best[key].val):
            best[key] = t
    return list(best.values())


def steps_to_target(curve: list[tuple[int, float]], target: float) -> int | None:
    """First evaluation step whose validation accuracy reaches ``target``; None if it never does."""
    for step, acc in sorted(curve):
        if acc >= target:
            return step
    return None


def labels_to_match(xs: list[int], ys: list[float], goal: float) -> float:
    """Labels a curve (ys at label counts xs) needs to reach ``goal``, interpolating linearly in
    log(labels) between the budgets that bracket it. inf if it never gets there; the smallest
    budget if it is there from the start."""
    pts = sorted(zip(xs, ys))
    if pts[0][1] >= goal:
        return float(pts[0][0])
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if y0 < goal <= y1:
            f = (goal - y0) / (y1 - y0)
            return float(math.exp(math.log(x0) + f * (math.log(x1) - math.log(x0))))
    return float("inf")


def label_efficiency(cells: list[Cell], arm: str, baseline: str = "scratch") -> list[dict]:
    """For each budget of ``arm``: labels the baseline needs for the same mean accuracy, and the ratio."""
    out = []
    for steps in sorted({c.steps for c in cells}):
        base = [c for c in cells if c.arm == baseline and c.steps == steps]
        mine = [c for c in cells if c.arm == arm and c.steps == steps]
        if not base or not mine:
            continue
        xs, ys = [c.labels for c in base], [c.mean for c in base]
        for c in sorted(mine, key=lambda c: c.labels):
            need = labels_to_match(xs, ys, c.mean)
            out.append({"arm": arm, "steps": steps, "labels": c.labels, "accuracy": c.mean,
                        "baseline_labels": need, "ratio": need / c.labels,
                        "lower_bound": need == min(xs) and ys[xs.index(min(xs))] >= c.mean})
    return out


# ---- reading MLflow ----------------------------------------------------------------------


def latest_parent(client: MlflowClient, experiment_id: str) -> str | None:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG}role` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def read_trials(client: MlflowClient, experiment_id: str, parent: str, metric: str = "val_acc") -> tuple[list[Trial], list]:
    """Fine-tune trials of one sweep invocation, and its other (pretraining) child runs."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=5000)
    trials, others = [], []
    for r in runs:
        tags, m = r.data.tags, r.data.metrics
        if tags.get(TAG + "stage") != "finetune":
            others.append(r)
            continue
        outcome = tags.get(TAG + "outcome") or ("failed" if r.info.status == "FAILED" else "running")
        val = m.get(f"best_{metric}", m.get(metric))
        curve = metric_history(client, r.info.run_id, ("val_acc",))["val_acc"]
        trials.append(Trial(r.info.run_id, tags[TAG + "arm"], tags[TAG + "labels"], int(m.get("train_size", 0)) or _count(tags),
                            int(tags[TAG + "steps"]), int(tags[TAG + "seed"]), outcome, val, m.get("test_acc"),
                            dict(r.data.params), curve))
    return trials, others


def _count(tags: dict) -> int:
    budget = tags[TAG + "labels"]
    return int(budget) if budget.isdigit() else 0


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


# ---- figures -------------------------------------------------------------------------------


def _ci_caption(cells: list[Cell]) -> str:
    seeds = sorted({c.n for c in cells})
    if seeds == [1]:
        return "one seed per point: no confidence band"
    return f"mean over seeds ({'-'.join(map(str, [seeds[0], seeds[-1]])) if len(seeds) > 1 else seeds[0]}); band: 95% Student-t CI"


def fig_accuracy_vs_labels(cells: list[Cell], colors: dict, title: str):
    steps_values = sorted({c.steps for c in cells})
    fig, axes = plots.plt.subplots(1, len(steps_values), figsize=(5.2 * len(steps_values), 3.8), squeeze=False, sharey=True)
    for ax, steps in zip(axes[0], steps_values):
        for arm in sorted({c.arm for c in cells}):
            cs = sorted((c for c in cells if c.arm == arm and c.steps == steps), key=lambda c: c.labels)
            if not cs:
                continue
            x = np.array([c.labels for c in cs])
            y = np.array([c.mean for c in cs]) * 100
            hw = np.array([c.half_width for c in cs]) * 100
            ax.plot(x, y, "-o", color=colors[arm], label=arm, ms=4)
            if np.isfinite(hw).any():
                ax.fill_between(x, y - np.nan_to_num(hw), y + np.nan_to_num(hw), color=colors[arm], alpha=0.18, lw=0)
        ax.set_xscale("log")
        budgets = sorted({c.labels for c in cells if c.steps == steps})
        ax.set_xticks(budgets, [f"{b:,}" for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("labelled training images (log scale)")
        ax.set_title(f"{steps} fine-tune steps" if len(steps_values) > 1 else "")
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel("test accuracy (%)")
    axes[0, -1].legend(frameon=False, loc="lower right")
    fig.suptitle(title)
    fig.text(0.5, -0.02, _ci_caption(cells) + "; each seed's hyperparameters selected on validation accuracy",
             ha="center", fontsize=8, color="#444444")
    fig.tight_layout()
    return fig


def fig_accuracy_vs_steps(selected: list[Trial], colors: dict, title: str, target: float | None):
    budgets = sorted({t.labels for t in selected})
    cols = min(4, len(budgets))
    rows = -(-len(budgets) // cols)
    fig, axes = plots.plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False, sharey=True)
    for ax, labels in zip(axes.flat, budgets):
        for arm in sorted({t.arm for t in selected}):
            curves = [dict(t.curve) for t in selected if t.arm == arm and t.labels == labels and t.curve]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            y = np.array([[c[s] for s in steps] for c in curves]) * 100  # (seeds, steps)
            ax.plot(steps, y.mean(0), color=colors[arm], label=arm)
            if len(curves) > 1:
                hw = stats.t.ppf(0.975, len(curves) - 1) * y.std(0, ddof=1) / math.sqrt(len(curves))
                ax.fill_between(steps, y.mean(0) - hw, y.mean(0) + hw, color=colors[arm], alpha=0.18, lw=0)
        if target is not None:
            ax.axhline(target * 100, color="#999999", ls=":", lw=1)
        ax.set_title(f"{labels:,} labels")
        ax.set_xlabel("fine-tune step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(budgets):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("validation accuracy (%)")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(title)
    fig.tight_layout()
    fig.legend(handles, names, loc="upper right", ncol=len(names), frameon=False)  # above the panels, never on a curve
    return fig


def fig_reconstructions(grids: dict[str, dict], losses: dict[str, float]):
    """Side-by-side blocks, one per stage: E2 autoencoder vs classifier decoder, E5 L1 vs L2."""
    rows = {}
    first = next(iter(grids.values()))
    rows["test images"] = first["clean"]
    for stage, samples in grids.items():
        if not torch.equal(samples["input"], samples["clean"]) and "noisy input" not in rows:
            rows["noisy input"] = samples["input"]
        loss = f" (test loss {losses[stage]:.4f})" if stage in losses else ""
        rows[f"{stage}{loss}"] = samples["output"]
    return plots.image_grid(rows, n=64)


# ---- the report ------------------------------------------------------------------------------


def sweep_of(client: MlflowClient, parent: str):
    """The validated spec a sweep invocation ran with (its parent run's ``sweep.json``), or None."""
    from .spec import Sweep

    try:
        with tempfile.TemporaryDirectory() as tmp:
            return Sweep.model_validate(json.loads(Path(client.download_artifacts(parent, "sweep.json", tmp)).read_text()))
    except (OSError, ValueError, mlflow.exceptions.MlflowException):  # a run from before sweep.json existed
        return None


def efficiency_phrase(e: dict) -> str:
    if math.isinf(e["baseline_labels"]):
        return "scratch does not reach it at any of its budgets"
    if e["lower_bound"]:
        return f"scratch reaches it with its smallest budget ({e['baseline_labels']:,.0f} labels)"
    return f"scratch needs ~{e['baseline_labels']:,.0f} labels ({e['ratio']:.1f}x)"


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


def build(client: MlflowClient, experiment: str, out: Path, parent: str | None = None, target: float | None = None,
          curves: list[str] | None = None) -> dict:
    """Write figures, tables and report.md for one sweep invocation (default: the latest); returns what was found."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment '{experiment}' in {client.tracking_uri}")
    parent = parent or latest_parent(client, exp.experiment_id)
    if parent is None:
        raise ValueError(f"experiment '{experiment}' has no sweep runs yet")
    spec = sweep_of(client, parent)
    expected, metric, mode, searched = None, "val_acc", "max", SEARCH_KEYS
    if spec is not None:
        from .spec import finetune_cells

        expected = [c.key for c in finetune_cells(spec)]
        metric, mode = spec.metric, spec.mode
        searched = tuple(spec.finetune.search) if spec.finetune else ()
        target = target if target is not None else spec.target
    out.mkdir(parents=True, exist_ok=True)
    trials, _ = read_trials(client, exp.experiment_id, parent, metric)
    chosen = selected_trials(trials, mode)
    cells = select(chosen, mode, searched)
    arms = sorted({t.arm for t in trials})
    colors = plots.arm_colors(arms)
    figures: list[tuple[str, str]] = []  # (file, caption)

    if cells:
        plots.save(fig_accuracy_vs_labels(cells, colors, f"{experiment}: test accuracy vs labels"), out / "accuracy_vs_labels.png", svg=True)
        figures.append(("accuracy_vs_labels.png", f"Test accuracy vs label budget: {_ci_caption(cells)}."))
    if any(t.curve for t in chosen):
        plots.save(fig_accuracy_vs_steps(chosen, colors, f"{experiment}: validation accuracy during fine-tuning", target),
                   out / "accuracy_vs_steps.png", svg=True)
        figures.append(("accuracy_vs_steps.png", "Validation accuracy vs fine-tune step per budget (selected trials; "
                        "band: 95% Student-t CI over seeds)" + (f"; dotted: target {target:.0%}." if target else ".")))
        for t in curve_trials(chosen, curves):
            name = f"loss_curves_{t.arm}_{t.labels}.png"
            title = f"{t.arm}, {t.labels} labels, {t.steps} steps, seed {t.seed}"
            plots.save(plots.loss_curves(metric_history(client, t.run_id), title), out / name, svg=True)
            figures.append((name, f"Train and validation loss and accuracy: {title}."))

    stages = stage_runs(client, exp.experiment_id)
    grids, losses = {}, {}
    for stage, run in sorted(stages.items()):
        name = f"loss_curves_{stage}.png"
        plots.save(plots.loss_curves(metric_history(client, run.info.run_id), f"pretraining stage {stage}"), out / name, svg=True)
        figures.append((name, f"Train and validation loss of pretraining stage {stage} per evaluation."))
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client.download_artifacts(run.info.run_id, "checkpoint/samples.pt", tmp)
            except Exception:  # not an autoencoder stage
                continue
            grids[stage] = torch.load(path, weights_only=True)
        losses[stage] = run.data.metrics.get("test_loss")
    if grids:
        plots.save(fig_reconstructions(grids, {k: v for k, v in losses.items() if v is not None}), out / "reconstructions.png", svg=True)
        figures.append(("reconstructions.png", "Test images and their reconstructions by each autoencoder stage "
                        "(64 images; first rows: clean and, for denoising stages, noisy input)."))

    rows = summary_rows(cells, chosen, target)
    efficiency = [e for arm in arms if arm != "scratch" and "scratch" in arms for e in label_efficiency(cells, arm)]
    _write_csv(out / "summary.csv", rows)
    table_md = _markdown(rows)
    eff_md = _efficiency_markdown(efficiency)
    present = {f"{t.arm}/labels={t.budget}/steps={t.steps}/seed={t.seed}" for t in trials if t.outcome == "completed"}
    missing = sorted(set(expected or []) - present)
    failed = [t for t in trials if t.outcome == "failed"]
    running = [t for t in trials if t.outcome == "running"]
    (out / "summary.md").write_text(table_md)
    notes = []
    if missing:
        notes.append(f"**Partial sweep:** {len(missing)} grid cell(s) have no completed trial yet: " + ", ".join(missing[:20])
                     + (" ..." if len(missing) > 20 else ""))
    if failed:
        notes.append(f"{len(failed)} trial(s) failed and are left out.")
    if running:
        notes.append(f"{len(running)} trial(s) still running or interrupted are left out.")
    finetuned = spec is None or spec.finetune is not None
    intro = (f"Hyperparameters are selected per cell and seed on the validation split ({metric}); the numbers below "
             "are test accuracy of the selected checkpoints." if finetuned else
             "A pretraining-only sweep: each stage keeps its best checkpoint by validation loss; test losses below.")
    md = [f"# {experiment}: {'data-efficiency report' if finetuned else 'pretraining report'}", "",
          f"Sweep run `{parent}` in `{client.tracking_uri}`. {intro}", ""]
    md += [n + "\n" for n in notes]
    for name, caption in figures:
        md += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    if finetuned:
        md += ["## Summary per cell", "", table_md, ""]
    if efficiency:
        md += ["## Label efficiency", "", "Labels the scratch arm needs to match each pretrained budget's mean test accuracy "
               "(linear interpolation in log(labels) between the scratch budgets; 'more than it has' when scratch does "
               "not get there at its largest budget).", "", eff_md, ""]
    if losses:
        md += ["## Pretraining stages", "", "| stage | test loss |", "| --- | --- |"]
        md += [f"| {s} | {v:.4f} |" for s, v in sorted(losses.items()) if v is not None]
        md.append("")
    (out / "report.md").write_text("\n".join(md))
    client.log_artifacts(parent, str(out), "report")
    return {"parent": parent, "cells": cells, "rows": rows, "efficiency": efficiency, "missing": missing,
            "failed": len(failed), "figures": [f for f, _ in figures], "out": out, "target": target,
            "finetuned": finetuned, "stage_losses": losses}


def summary_rows(cells: list[Cell], chosen: list[Trial], target: float | None) -> list[dict]:
    rows = []
    for c in cells:
        row = {"arm": c.arm, "labels": c.labels, "steps": c.steps, "seeds": c.n,
               "test_acc_mean": round(c.mean, 4), "test_acc_ci95": None if c.n < 2 else round(c.half_width, 4)}
        if target is not None:
            reached = [steps_to_target(t.curve, target) for t in chosen
                       if (t.arm, t.labels, t.steps) == (c.arm, c.labels, c.steps)]
            hits = [s for s in reached if s is not None]
            row["steps_to_target"] = round(float(np.mean(hits))) if hits else None
            row["reached_target"] = f"{len(hits)}/{len(reached)}"
        row["best_hyperparameters"] = " ".join(f"{k}={float(v):.3g}" for k, v in sorted(c.best_params.items()))
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        if not rows:
            f.write("")
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _markdown(rows: list[dict]) -> str:
    if not rows:
        return "_No completed fine-tune trials yet._"
    head = [k for k in rows[0] if k != "test_acc_ci95"]  # shown as ± in the mean's column
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for r in rows:
        cells = []
        for k in head:
            v = r[k]
            if k == "test_acc_mean":
                ci = r["test_acc_ci95"]
                v = f"{v:.2%}" + (f" ± {ci:.2%}" if ci is not None else "")
            cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _efficiency_markdown(rows: list[dict]) -> str:
    lines = ["| arm | steps | labels | mean test acc | scratch needs | ratio |", "| --- | --- | --- | --- | --- | --- |"]
    for e in rows:
        ratio = "∞" if math.isinf(e["ratio"]) else f"{e['ratio']:.2f}x"
        need = "more than it has" if math.isinf(e["baseline_labels"]) else f"{e['baseline_labels']:,.0f}"
        need = f"≤ {need}" if e["lower_bound"] else need
        lines.append(f"| {e['arm']} | {e['steps']} | {e['labels']} | {e['accuracy']:.2%} | {need} | {ratio} |")
    return "\n".join(lines)
