"""The report on a real sqlite MLflow store filled with known numbers, where every figure of merit
can be worked out by hand."""

import json
import math
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from dlcore.store import default_uri
from dlcore import plots
from dlcore import report as R
from dlcore import tracking
from dlcore.cli import app
from dlcore.spec import Sweep
from dlcore.stats import Bound

T2 = 4.302652729911275  # Student t, 0.975 quantile, 2 degrees of freedom
SPEC = {
    "name": "known",
    "data": {"dataset": "mnist"},
    "finetune": {"arms": {"scratch": {}, "pretrained": {"from": "ae"}}, "labels": [100, 1000], "steps": [200],
                 "seeds": [0, 1, 2], "samples": 2, "search": {"lr": {"loguniform": [1e-4, 1e-2]}}},
    "pretrain": {"ae": {"objective": "autoencoder", "steps": 10}},
    "target": 0.8,
}
# test accuracy of the validation-best trial per (arm, labels) and seed; its test loss is 2 (1 - acc)
TEST = {("scratch", 100): [0.70, 0.72, 0.74], ("scratch", 1000): [0.88, 0.90, 0.92],
        ("pretrained", 100): [0.80, 0.81, 0.82], ("pretrained", 1000): [0.93, 0.94, 0.95]}


def val_curve(arm, labels, seed):
    """Validation accuracy by step. With target 0.8: pretrained/100 crosses between 50 and 100 (at 90),
    pretrained/1000 between the step-0 evaluation and 50 (at 43.75), scratch/1000 between 100 and 150
    (at 131.25) except seed 2, which never does; scratch/100 never does."""
    if (arm, labels) == ("scratch", 100) or (arm, labels, seed) == ("scratch", 1000, 2):
        return {0: 0.1, 50: 0.6, 100: 0.7, 150: 0.75, 200: 0.79}
    if (arm, labels) == ("pretrained", 1000):
        return {0: 0.1, 50: 0.9, 100: 0.9, 150: 0.9, 200: 0.9}
    return {0: 0.1, 50: 0.6, 100: 0.85 if arm == "pretrained" else 0.7, 150: 0.86, 200: 0.86}


def add_run(client, exp, parent, tags, metrics=(), params=None, status="FINISHED"):
    run = client.create_run(exp, tags={"mlflow.parentRunId": parent, **{"dlsweep." + k: str(v) for k, v in tags.items()}})
    run_id = run.info.run_id
    for k, v in (params or {}).items():
        client.log_param(run_id, k, v)
    client.log_batch(run_id, metrics=[Metric(k, v, 0, s) for k, v, s in metrics])
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


def fill(tmp_path, drop=(), fail=(), seeds=(0, 1, 2), extras=False, data=None, val_metric=None, test_curves=False,
         name="known"):
    """Two samples per cell and seed: the first best on validation, the second better on test (never
    chosen). ``extras``: a third arm 'dae' whose stage diverged (blocked), a diverged, a failed and an
    interrupted trial that each have the best validation value of their cell, and two stage runs."""
    uri = default_uri(tmp_path)
    client = MlflowClient(uri)
    raw = {**SPEC, "name": name, "data": data or SPEC["data"], "finetune": {**SPEC["finetune"], "seeds": list(seeds)}}
    if extras:
        raw["pretrain"] = {**SPEC["pretrain"], "dae": {"objective": "autoencoder", "steps": 10}}
        raw["finetune"]["arms"] = {**SPEC["finetune"]["arms"], "dae": {"from": "dae"}}
    spec = Sweep.model_validate(raw).model_dump(mode="json", by_alias=True)
    exp = tracking.ensure_experiment(uri, name, tmp_path / "artifacts")
    parent = tracking.start_parent(uri, exp, "sweep", spec, {"sweep": name, "sampler": "sobol-tpe",
                                                             **({"blocked": json.dumps(["dae"])} if extras else {})})
    for (arm, labels), accs in TEST.items():
        for seed in seeds:
            if (arm, labels, seed) in drop:
                continue
            cell = {"stage": "finetune", "arm": arm, "labels": labels, "steps": 200, "seed": seed,
                    "cell": f"{arm}/labels={labels}/steps=200/seed={seed}"}
            for sample, (val, test_acc) in enumerate([(0.9, accs[seed]), (0.5, 0.99)]):
                failed = (arm, labels, seed, sample) in fail
                metrics = [("val_acc", v, s) for s, v in val_curve(arm, labels, seed).items()]
                if test_curves and (arm, labels) == ("scratch", 100):  # logged for display, ending at the final value
                    metrics += [("test_loss", 2.3, 0), ("test_loss", 1.0, 100), ("test_acc", 0.1, 0), ("test_acc", 0.5, 100)]
                metrics += [("best_val_acc", val, 200), ("test_acc", test_acc, 200), ("test_loss", 2 * (1 - test_acc), 200),
                            ("train_size", labels, 200)] + ([("val_size", val_metric, 200)] if val_metric else [])
                add_run(client, exp, parent, {**cell, "outcome": "failed" if failed else "completed"}, metrics,
                        {"lr": 0.001 * (sample + 1) * (seed + 1)}, "FAILED" if failed else "FINISHED")
    if extras:
        cell = lambda arm, labels, seed: {"stage": "finetune", "arm": arm, "labels": labels, "steps": 200, "seed": seed,
                                          "cell": f"{arm}/labels={labels}/steps=200/seed={seed}"}
        best = [("best_val_acc", 0.99, 100), ("val_acc", 0.99, 100)]
        add_run(client, exp, parent, {**cell("pretrained", 100, 0), "outcome": "diverged"}, best + [("diverged_step", 120, 120)])
        add_run(client, exp, parent, {**cell("scratch", 1000, 1), "outcome": "failed", "error": "Traceback\nRuntimeError: out of memory"},
                best + [("test_acc", 0.2, 200)], status="FAILED")
        add_run(client, exp, parent, cell("pretrained", 1000, 2), best + [("test_acc", 0.1, 200)], status="RUNNING")
        add_run(client, exp, parent, {"stage": "ae", "seed": 0, "outcome": "completed"},
                [("train_loss", 0.5, 5), ("val_loss", 0.4, 5), ("train_loss", 0.3, 10), ("val_loss", 0.35, 10), ("test_loss", 0.36, 10)])
        add_run(client, exp, parent, {"stage": "dae", "seed": 0, "outcome": "diverged"}, [("diverged_step", 7, 7)])
    return client, parent


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """The full store (extras included) and its report, built once for the tests that only read them."""
    tmp_path = tmp_path_factory.mktemp("known")
    client, parent = fill(tmp_path, extras=True)
    result = R.build(client, "known", tmp_path / "out")
    return parent, result, (tmp_path / "out" / "report.md").read_text(), tmp_path


def test_means_intervals_and_hyperparameters_by_hand(known):
    _, result, md, _ = known
    cells = {(c.arm, c.labels): c for c in result["cells"]}
    assert set(cells) == set(TEST)  # the blocked arm has no cells
    # selected on validation: not the better-on-test sample, nor the diverged/failed/interrupted trial
    assert cells[("scratch", 100)].accs == pytest.approx([0.70, 0.72, 0.74])
    assert cells[("scratch", 1000)].accs == pytest.approx([0.88, 0.90, 0.92])
    assert cells[("pretrained", 100)].accs == pytest.approx([0.80, 0.81, 0.82])
    assert cells[("pretrained", 1000)].accs == pytest.approx([0.93, 0.94, 0.95])
    assert cells[("scratch", 100)].mean == pytest.approx(0.72)
    assert cells[("scratch", 100)].half_width == pytest.approx(T2 * 0.02 / math.sqrt(3))
    rows = {(r["arm"], r["labels"]): r for r in result["rows"]}
    r = rows[("scratch", 100)]
    assert r["test_loss_mean"] == pytest.approx(0.56) and r["test_loss_ci95"] == pytest.approx(T2 * 0.04 / math.sqrt(3), abs=1e-4)
    assert r["hyperparameters"] == "s0: lr=0.001; s1: lr=0.002; s2: lr=0.003"  # each seed's own choice
    assert r["labels_total"] == 100 + 5000 and rows[("pretrained", 1000)]["labels_total"] == 1000 + 5000
    assert "| scratch | 100 | 5100 | 200 | 3 | 72.00% ± 4.97% | 0.5600 ± 0.0994 |" in md


def test_steps_to_target_median_interval_and_censoring(known):
    _, result, md, _ = known
    rows = {(r["arm"], r["labels"]): r for r in result["rows"]}
    assert (rows[("pretrained", 100)]["steps_to_target"], rows[("pretrained", 100)]["reached_target"]) == ("90", "3 of 3")
    assert rows[("pretrained", 100)]["steps_to_target_ci95"] == "90 to 90"
    assert rows[("pretrained", 1000)]["steps_to_target"] == "44"  # 43.75: from the step-0 evaluation to step 50
    # scratch/1000: 131.25, 131.25 and a seed that never gets there: counted, not dropped
    r = rows[("scratch", 1000)]
    assert (r["steps_to_target"], r["reached_target"], r["steps_to_target_ci95"]) == ("131", "2 of 3", "131 to > 200")
    assert r["steps_to_target_censored"] == pytest.approx(7 / 27, abs=0.015)  # the censored seed is the median
    r = rows[("scratch", 100)]
    assert (r["steps_to_target"], r["reached_target"]) == ("not within 200 steps", "0 of 3")
    assert "| 131 (131 to > 200) | 2 of 3 |" in md and "∞" not in md and "inf" not in md.replace("info", "")


def test_paired_differences_and_label_efficiency_with_bootstrap(known):
    _, result, md, _ = known
    paired = {(p["arm"], p["labels"]): p for p in result["paired"]}
    assert set(paired) == {("pretrained", 100), ("pretrained", 1000)}
    p = paired[("pretrained", 100)]  # differences 0.10, 0.09, 0.08; losses -0.20, -0.18, -0.16
    assert p["acc"].n == 3 and p["acc"].mean == pytest.approx(0.09) and p["acc"].half_width == pytest.approx(T2 * 0.01 / math.sqrt(3))
    assert p["loss"].mean == pytest.approx(-0.18) and p["loss"].half_width == pytest.approx(T2 * 0.02 / math.sqrt(3))
    eff = {e["labels"]: e for e in result["efficiency"]}
    assert eff[100]["baseline_labels"].value == pytest.approx(100 * math.sqrt(10))  # halfway in log between 100 and 1000
    # scratch +0.02 and pretrained +0.01 per seed index: all-seed-2 and all-seed-0 resamples (1/27 each) are the ends
    assert eff[100]["ratio"].lo.value == pytest.approx(10 ** (0.08 / 0.18))
    assert eff[100]["ratio"].hi.value == pytest.approx(10 ** (0.10 / 0.18))
    assert eff[1000]["baseline_labels"] == Bound(1000, "above")  # scratch never reaches 94% within its 1,000
    assert eff[1000]["ratio"].censored == 1.0
    assert "| pretrained − scratch | 100 | 200 | 3 | +9.00 pp ± 2.48 pp | -0.1800 ± 0.0497 |" in md
    assert "| pretrained | 200 | 100 | 3 | 81.00% | 316 | 3.16x (95% CI 2.78x to 3.59x) |" in md
    assert "| > 1,000 | > 1.00x (95% CI > 1.00x to > 1.00x; censored in 100% of resamples) |" in md


def test_trials_blocked_cells_and_protocol(known):
    parent, result, md, tmp_path = known
    assert dict(result["outcomes"]["finetune"]) == {"completed": 24, "diverged": 1, "failed": 1, "interrupted": 1}
    assert dict(result["outcomes"]["dae"]) == {"diverged": 1} and result["failed"] == 1
    assert len(result["blocked"]) == 6 and set(result["blocked"].values()) == {"blocked (pretraining stage dae diverged)"}
    assert result["missing"] == []  # blocked cells are not "missing"
    assert "`scratch/labels=1000/steps=200/seed=1` failed: RuntimeError: out of memory" in result["problems"]
    assert "`pretrained/labels=100/steps=200/seed=0` diverged at step 120" in result["problems"]
    assert ("`pretrained/labels=1000/steps=200/seed=2` interrupted (no outcome logged: still running, or the sweep was "
            "stopped); its cell has a completed trial (run again on resume, or another sample)") in result["problems"]
    assert "**6 cell(s) blocked (pretraining stage dae diverged):** dae/labels=100/steps=200/seed=0" in md
    assert "| finetune | 24 | 0 | 1 | 1 | 1 |" in md and "| dae | 0 | 0 | 1 | 0 | 0 |" in md
    assert "Validation: oracle: a fixed split of 5,000 labelled training images outside every budget (split seed 0" in md
    assert ("2 Optuna sample(s) per cell over lr ~ loguniform[0.0001, 0.01], all at points of a scrambled Sobol sequence "
            "(space-filling, no model); each (arm, labels, steps, seed) cell searched on its own") in md
    assert "Seeds: 0, 1, 2" in md and "highest val_acc" in md
    # the report names the experiment and run, never a path of this machine
    assert f"Experiment `known`, sweep run `{parent}`." in md
    assert str(tmp_path) not in md and "sqlite" not in md


def test_protocol_states_the_search_scope_and_where_tpe_starts():
    raw = {**SPEC, "finetune": {**SPEC["finetune"], "samples": 6, "search_scope": "cell",
                                "search": {**SPEC["finetune"]["search"], "batch_size": {"choice": [32, 64]}}}}
    text = R.protocol(Sweep.model_validate(raw), [])
    assert "6 Optuna sample(s) per cell over lr ~ loguniform[0.0001, 0.01], batch_size ~ choice[32, 64], the first 4 at " \
           "points of a scrambled Sobol sequence (space-filling, no model), the rest by TPE" in text
    assert "(choice keys: drawn at random in the Sobol samples)" in text
    assert ("searched on seed 0 only: every other seed trained one trial with the values of seed 0's selected trial in "
            "the same (arm, labels, steps) cell") in text


def selected(seed: int, lr: str, **params) -> R.Trial:
    return R.Trial(f"run{seed}", "scratch", "100", 100, 200, seed, "completed", 0.9, 0.8, params={"lr": lr, **params})


def test_hyperparameters_once_when_searched_on_one_seed_and_shared():
    shared = R.Cell("scratch", 100, 200, [selected(0, "0.00123"), selected(1, "0.00123", **{"cell.search_from_seed": "0"}),
                                          selected(2, "0.00123", **{"cell.search_from_seed": "0"})])
    assert R.hyperparameters(shared, ("lr",)) == "lr=0.00123 (searched on seed 0, shared by all seeds)"
    own = R.Cell("scratch", 100, 200, [selected(0, "0.001"), selected(1, "0.003")])
    assert R.hyperparameters(own, ("lr",)) == "s0: lr=0.001; s1: lr=0.003"
    # seed 0 selected a trial other than its search's pick (a tie broken the other way): no claim of sharing
    tied = R.Cell("scratch", 100, 200, [selected(0, "0.002"), selected(1, "0.001", **{"cell.search_from_seed": "0"})])
    assert R.hyperparameters(tied, ("lr",)) == "s0: lr=0.002; s1: lr=0.001"


def test_labels_total_from_a_logged_val_size_or_unknown_for_a_fraction(tmp_path):
    client, _ = fill(tmp_path, data={"dataset": "mnist", "val_size": 0.1}, seeds=(0,))
    result = R.build(client, "known", tmp_path / "out")
    assert {r["labels_total"] for r in result["rows"]} == {None}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "oracle: a fixed split of 10% of the labelled training images" in md and "labels used in total unknown" in md
    client, _ = fill(tmp_path / "logged", data={"dataset": "mnist", "val_size": 0.1}, seeds=(0,), val_metric=600)
    rows = {(r["arm"], r["labels"]): r for r in R.build(client, "known", tmp_path / "out2")["rows"]}
    assert rows[("scratch", 100)]["labels_total"] == 700 and rows[("scratch", 1000)]["labels_total"] == 1600
    md = (tmp_path / "out2" / "report.md").read_text()
    assert "oracle: a fixed split of 600 labelled training images" in md and "100 → 700, 1,000 → 1,600" in md


def test_partial_and_failed_runs_still_report_the_rest(tmp_path):
    client, _ = fill(tmp_path, drop={("scratch", 1000, 2)}, fail={("pretrained", 100, 1, 0)})
    result = R.build(client, "known", tmp_path / "out")
    cells = {(c.arm, c.labels): c for c in result["cells"]}
    assert cells[("scratch", 1000)].accs == pytest.approx([0.88, 0.90])
    # the failed validation-best trial is left out; the seed falls back to its other, completed trial
    assert cells[("pretrained", 100)].accs == pytest.approx([0.80, 0.99, 0.82])
    assert result["missing"] == ["scratch/labels=1000/steps=200/seed=2"]
    assert result["failed"] == 1
    # pairs only where both arms have the seed: scratch/1000 lacks seed 2
    assert {p["labels"]: p["acc"].n for p in result["paired"]} == {100: 3, 1000: 2}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Partial sweep" in md and "scratch/labels=1000/steps=200/seed=2" in md


def test_one_seed_has_no_band_and_no_caption_promises_one(tmp_path):
    client, _ = fill(tmp_path, seeds=(0,))
    result = R.build(client, "known", tmp_path / "out")
    assert all(c.n == 1 and math.isnan(c.half_width) for c in result["cells"])
    md = (tmp_path / "out" / "report.md").read_text()
    captions = [line for line in md.splitlines() if line.startswith("*") and line.endswith("*") and not line.startswith("**")]
    assert len(captions) == len(result["figures"]) >= 3
    assert not any("95%" in c for c in captions)
    assert "one seed per point: no confidence band" in md and "one seed per curve: no confidence band" in md
    assert result["rows"][0]["test_acc_ci95"] is None and result["rows"][0]["steps_to_target_ci95"] is None


def test_accuracy_vs_steps_has_a_panel_per_label_and_step_budget():
    # two step budgets of the same arm and labels are two panels, not pooled as if they were seeds
    chosen = [R.Trial(f"r{s}{seed}", "scratch", "100", 100, s, seed, "completed", 0.9, 0.8,
                      curve=[(0, 0.1), (s // 2, 0.5 + seed / 100), (s, 0.7)]) for s in (100, 400) for seed in (0, 1)]
    fig = plots.accuracy_vs_steps(chosen, {"scratch": "#666666"}, "t", target=0.6)
    panels = [ax for ax in fig.axes if ax.has_data()]
    assert sorted(ax.get_title() for ax in panels) == ["100 labels, 100 steps", "100 labels, 400 steps"]
    assert [ax.get_xlim()[1] for ax in panels] == [100, 400]
    mean = next(line for line in panels[0].get_lines() if line.get_label() == "scratch")
    assert list(mean.get_xdata()) == [0, 50, 100] and mean.get_ydata()[1] == pytest.approx(50.5)
    assert [t.get_text() for t in fig.legends[0].texts] == ["scratch", "target 60%"]  # one legend, beside the panels
    plots.plt.close(fig)


def test_loss_curves_draw_no_empty_panel_and_label_test_curves():
    ae = {"train_loss": [(5, 0.5), (10, 0.3)], "val_loss": [(5, 0.4)], "train_acc": [], "val_acc": [], "test_loss": [(10, 0.36)]}
    fig = plots.loss_curves(ae)
    assert len(fig.axes) == 1  # an autoencoder has no accuracy panel
    assert [t.get_text() for t in fig.legends[0].texts] == ["train loss", "val loss"]  # a single test value is no curve
    plots.plt.close(fig)
    fig = plots.loss_curves({"val_acc": [(50, 0.5)], "train_loss": []})
    assert [ax.get_ylabel() for ax in fig.axes] == ["accuracy"]  # nor an empty loss panel
    plots.plt.close(fig)
    clf = {"train_loss": [(50, 1.0)], "val_acc": [(50, 0.5)], "test_acc": [(0, 0.1), (50, 0.5)]}
    fig = plots.loss_curves(clf)
    assert len(fig.axes) == 2
    assert "test acc (never used for selection)" in [t.get_text() for t in fig.legends[0].texts]
    plots.plt.close(fig)


def test_report_folder_is_replaced_whole_and_kept_on_a_crash(tmp_path, monkeypatch):
    client, _ = fill(tmp_path, test_curves=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("old")
    (out / "stale.png").write_text("from an earlier report")
    result = R.build(client, "known", out)
    assert not (out / "stale.png").exists() and (out / "report.md").read_text() != "old"
    # test curves logged for display (scratch/100) end at the final value, which the table keeps
    assert next(r for r in result["rows"] if (r["arm"], r["labels"]) == ("scratch", 100))["test_loss_mean"] == pytest.approx(0.56)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []  # no staging left behind
    good = (out / "report.md").read_text()

    def crash(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(R, "summary_rows", crash)
    with pytest.raises(RuntimeError, match="boom"):
        R.build(client, "known", out)
    assert (out / "report.md").read_text() == good
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    elsewhere = tmp_path / "notes"
    elsewhere.mkdir()
    (elsewhere / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="is not a report folder"):
        R.build(client, "known", elsewhere)
    assert (elsewhere / "mine.txt").read_text() == "keep"


def test_report_cli_tables_and_one_line_errors_that_leave_the_report_alone(tmp_path):
    client, parent = fill(tmp_path, extras=True)
    runner = CliRunner()
    rep = tmp_path / "rep"
    result = runner.invoke(app, ["report", "known", "--store", str(tmp_path), "--out", str(rep), "--run", parent])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "72.00% ± 4.97%" in out and "0.5600 ± 0.0994" in out and "+9.00 pp ± 2.48 pp" in out
    assert "scratch needs 316 labels: 3.16x (95% CI 2.78x to 3.59x)" in out
    assert "6 cell(s) blocked (pretraining stage dae diverged)" in out
    assert "trials of finetune: 24 completed, 1 diverged, 1 failed, 1 interrupted" in out
    good = (rep / "report.md").read_text()
    child = next(r.info.run_id for r in client.search_runs([client.get_experiment_by_name("known").experiment_id])
                 if r.data.tags.get("dlsweep.stage") == "finetune")
    _, other = fill(tmp_path, name="other")
    for run, message in [("deadbeef", "run 'deadbeef' does not exist"), (child, "is not a sweep's parent run"),
                         (other, "belongs to another experiment"),
                         (parent, "--target 80: an accuracy above 0 and at most 1"), (parent, "--target -1: an accuracy")]:
        target = message.split()[1].rstrip(":") if message.startswith("--target") else None
        bad = runner.invoke(app, ["report", "known", "--store", str(tmp_path), "--out", str(rep), "--run", run,
                                  *(["--target", target] if target else [])])
        assert bad.exit_code == 2 and message in bad.output and "Traceback" not in bad.output, bad.output
        assert len(bad.output.strip().splitlines()) == 1
    assert (rep / "report.md").read_text() == good
    bad = runner.invoke(app, ["report", "nope", "--store", str(tmp_path)])
    assert bad.exit_code == 2 and "no MLflow experiment 'nope'" in bad.output


def test_loss_curves_for_a_chosen_cell(tmp_path):
    client, _ = fill(tmp_path, seeds=(0,))
    result = R.build(client, "known", tmp_path / "out", curves=["scratch/labels=1000"])
    assert "loss_curves_scratch_1000.png" in result["figures"] and "loss_curves_pretrained_100.png" not in result["figures"]
    with pytest.raises(ValueError, match="no completed trial in cell 'scratch/labels=7'"):
        R.build(client, "known", tmp_path / "out", curves=["scratch/labels=7"])


def test_realistic_runs_with_step_budgets_read_off_become_one_trial_per_budget(tmp_path):
    """A 200-step run under 'realistic' that recorded its 100-step result: two cells per arm and budget,
    the budget's labels are all it used, and the 100-step cell's numbers are the run's at100/ metrics."""
    uri = default_uri(tmp_path)
    client = MlflowClient(uri)
    raw = {**SPEC, "validation": {"protocol": "realistic", "fraction": 0.2},
           "finetune": {**SPEC["finetune"], "steps": [100, 200], "samples": 1, "search": {}}}
    spec = Sweep.model_validate(raw).model_dump(mode="json", by_alias=True)
    exp = tracking.ensure_experiment(uri, "known", tmp_path / "artifacts")
    parent = tracking.start_parent(uri, exp, "sweep", spec, {"sweep": "known"})
    for (arm, labels), accs in TEST.items():
        for seed in (0, 1, 2):
            tags = {"stage": "finetune", "arm": arm, "labels": labels, "steps": 200, "seed": seed, "outcome": "completed",
                    "cell": f"{arm}/labels={labels}/steps=200/seed={seed}", "validation": "realistic", "step_budgets": "100"}
            val = labels // 5
            metrics = [("val_acc", v, s) for s, v in val_curve(arm, labels, seed).items()]
            metrics += [("at100/best_val_acc", 0.7, 100), ("at100/test_acc", accs[seed] - 0.1, 100),
                        ("at100/test_loss", 1.5, 100), ("best_val_acc", 0.8, 200), ("test_acc", accs[seed], 200),
                        ("test_loss", 1.0, 200), ("labels_train", labels - val, 200), ("labels_val", val, 200),
                        ("labels_total", labels, 200), ("train_size", labels - val, 200)]
            add_run(client, exp, parent, tags, metrics)
    result = R.build(client, "known", tmp_path / "out")
    cells = {(c.arm, c.labels, c.steps): c for c in result["cells"]}
    assert sorted(cells) == sorted((a, n, s) for a, n in TEST for s in (100, 200))
    for (arm, labels), accs in TEST.items():
        assert cells[(arm, labels, 200)].accs == pytest.approx(accs)
        assert cells[(arm, labels, 100)].accs == pytest.approx([a - 0.1 for a in accs])
        assert all(t.curve[-1][0] == 100 for t in cells[(arm, labels, 100)].trials)  # its curve stops at its budget
    assert {r["labels_total"] for r in result["rows"]} == {100, 1000}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Validation: realistic (Oliver et al. 2018): 20% of each class's labels in the budget" in md
    assert "the step budgets 100 are read off each 200-step run" in md
    assert "a budget's labels are all it used" in md
    assert {"accuracy_vs_labels.png", "accuracy_vs_step_budget.png", "accuracy_vs_steps.png"} <= set(result["figures"])

    # A fraction-budget run still under way has read off its 100-step budget but logged no labels yet:
    # that budget waits for them rather than landing on a 0-label point.
    tags = {"stage": "finetune", "arm": "scratch", "labels": "0.5", "steps": 200, "seed": 0, "validation": "realistic",
            "cell": "scratch/labels=0.5/steps=200/seed=0", "step_budgets": "100"}
    add_run(client, exp, parent, tags, [("at100/test_acc", 0.5, 100), ("at100/best_val_acc", 0.5, 100)], status="RUNNING")
    trials, _ = R.read_trials(client, exp, parent)
    assert all(t.labels > 0 for t in trials if t.outcome == "completed")


def test_compare_two_reports_of_the_same_grid(tmp_path):
    rows = {"realistic": [("scratch", 100, 0.70, 0.02, 100), ("scratch", 300, 0.85, None, 300)],
            "oracle": [("scratch", 100, 0.74, 0.01, 5100), ("scratch", 3000, 0.96, 0.01, 8000)]}
    for name, cells in rows.items():
        (tmp_path / name).mkdir()
        R._write_csv(tmp_path / name / "summary.csv", [
            {"arm": a, "labels": n, "steps": 500, "seeds": 3, "test_acc_mean": m, "test_acc_ci95": h, "test_loss_mean": 1.0,
             "test_loss_ci95": None, "labels_total": t} for a, n, m, h, t in cells])
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "realistic"), str(tmp_path / "oracle"),
                                      "--names", "realistic,oracle", "--out", str(tmp_path / "cmp.md")])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "cmp.md").read_text().splitlines()
    assert table[0].startswith("| arm | labels | steps | realistic: test acc | labels used | oracle: test acc")
    assert table[2:] == ["| scratch | 100 | 500 | 70.00% ± 2.00% | 100 | 74.00% ± 1.00% | 5,100 | +4.00 pp |"]  # common cells only
    bad = CliRunner().invoke(app, ["compare", str(tmp_path), str(tmp_path / "oracle")])
    assert bad.exit_code == 2 and "no summary.csv" in bad.output


def test_a_pretraining_grid_gets_a_table_and_a_figure(tmp_path):
    uri = default_uri(tmp_path)
    client = MlflowClient(uri)
    raw = {**SPEC, "pretrain": {"ae": {"objective": "autoencoder", "steps": 10, "grid": {"encoder_args.latent_dim": [2, 8]}}},
           "finetune": {**SPEC["finetune"], "samples": 1, "search": {}, "seeds": [0, 1]}}
    spec = Sweep.model_validate(raw).model_dump(mode="json", by_alias=True)
    exp = tracking.ensure_experiment(uri, "known", tmp_path / "artifacts")
    parent = tracking.start_parent(uri, exp, "sweep", spec, {"sweep": "known"})
    for d, l1 in ((2, 0.20), (8, 0.10)):
        stage = f"ae.latent_dim={d}"
        add_run(client, exp, parent, {"stage": stage, "seed": 0, "outcome": "completed", "objective": "autoencoder",
                                      "grid_of": "ae", "point": json.dumps({"encoder_args.latent_dim": d})},
                [("test_loss", l1, 10), ("test_l1", l1, 10), ("test_l2", l1 / 4, 10)])
        for labels in (100, 1000):
            for seed, acc in ((0, 0.5 + d / 100), (1, 0.52 + d / 100)):
                add_run(client, exp, parent, {"stage": "finetune", "arm": f"pretrained.latent_dim={d}", "labels": labels,
                                              "steps": 200, "seed": seed, "outcome": "completed", "pretrained_from": stage,
                                              "cell": f"pretrained.latent_dim={d}/labels={labels}/steps=200/seed={seed}"},
                        [("best_val_acc", 0.5, 200), ("test_acc", acc + labels / 10000, 200), ("test_loss", 1.0, 200)])
    result = R.build(client, "known", tmp_path / "out")
    assert "grid_ae.png" in result["figures"] and (tmp_path / "out" / "grid_ae.png").exists()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| encoder_args.latent_dim | test loss | test L1 | test L2 | test acc, 100 labels | test acc, 1,000 labels |" in md
    assert "| 2 | 0.2000 | 0.2000 | 0.0500 | 54.00% | 63.00% |" in md and "| 8 | 0.1000 | 0.1000 | 0.0250 | 60.00% | 69.00% |" in md


def test_stage_embeddings_become_a_figure_a_table_and_a_csv(tmp_path):
    import torch

    from dlcore.embeddings import embedding_stats

    uri = default_uri(tmp_path)
    client = MlflowClient(uri)
    spec = Sweep.model_validate({**SPEC, "finetune": None}).model_dump(mode="json", by_alias=True)
    exp = tracking.ensure_experiment(uri, "known", tmp_path / "artifacts")
    parent = tracking.start_parent(uri, exp, "sweep", spec, {"sweep": "known"})
    run = add_run(client, exp, parent, {"stage": "ae", "seed": 0, "outcome": "completed"}, [("test_loss", 0.1, 10)])
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat(30)
    z = torch.nn.functional.one_hot(y, 10).float() * 3 + torch.randn(300, 10, generator=g)
    (tmp_path / "checkpoint").mkdir()
    torch.save(embedding_stats(z, y, 10), tmp_path / "checkpoint" / "embeddings.pt")
    client.log_artifacts(run, str(tmp_path / "checkpoint"), "checkpoint")
    result = R.build(client, "known", tmp_path / "out")
    assert "embeddings.png" in result["figures"]
    md = (tmp_path / "out" / "report.md").read_text()
    e = embedding_stats(z, y, 10)
    assert "## Latent embeddings" in md and f"| ae | {e['separation']:.2f} | {e['spread'][0]:.2f} |" in md
    rows = (tmp_path / "out" / "centroid_distances.csv").read_text().splitlines()
    assert rows[0] == "stage,class," + ",".join(map(str, range(10))) and len(rows) == 11
    assert "(300 images, coloured by class)" in md  # the points drawn, not a fixed count
    # A pretraining-only sweep has no fine-tune rows: a table with its header (not an empty file), said plainly.
    assert (tmp_path / "out" / "summary.csv").read_text().splitlines() == [",".join(R.SUMMARY_HEADER)]
    assert (tmp_path / "out" / "summary.md").read_text() == "_A pretraining-only sweep: it has no fine-tune cells._"

    # a second stage: --embeddings picks the stages the figure draws (a row each); the table keeps both
    run = add_run(client, exp, parent, {"stage": "clf", "seed": 0, "outcome": "completed"}, [("test_loss", 0.2, 10)])
    client.log_artifacts(run, str(tmp_path / "checkpoint"), "checkpoint")
    from PIL import Image

    R.build(client, "known", tmp_path / "both")
    R.build(client, "known", tmp_path / "one", drawn=["clf"])
    tall = lambda folder: Image.open(folder / "embeddings.png").size[1]  # noqa: E731
    assert tall(tmp_path / "both") > 1.8 * tall(tmp_path / "one")
    assert "| clf |" in (tmp_path / "one" / "report.md").read_text() and "| ae |" in (tmp_path / "one" / "report.md").read_text()
    with pytest.raises(ValueError, match="--embeddings: no stage with embeddings named nope"):
        R.build(client, "known", tmp_path / "bad", drawn=["nope"])


def test_reconstructions_are_titled_with_errors_that_compare_across_losses():
    import torch

    from dlcore import plots

    images = torch.rand(8, 1, 28, 28)
    grids = {stage: {"clean": images, "input": images, "output": images.flip(0)} for stage in ("dae_l1", "dae_l2", "clf")}
    fig = plots.reconstructions(grids, {"dae_l1": {"l1": 0.0612, "l2": 0.0211}, "dae_l2": {"l1": 0.0701, "l2": 0.0195}})
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles == ["test images", "dae_l1 (test L1 0.0612, L2 0.0211 per pixel)",
                      "dae_l2 (test L1 0.0701, L2 0.0195 per pixel)", "clf"]


def test_a_sweep_run_before_the_sampler_was_recorded_is_described_as_it_ran():
    spec = Sweep.model_validate(SPEC)
    text = R.protocol(spec, [], sampler=None)
    assert "2 Optuna TPE sample(s) per cell over lr ~ loguniform[0.0001, 0.01]; with 2 ≤ 4 samples TPE " \
           "(n_startup_trials=4) is pure random sampling" in text and "Sobol" not in text


def test_compute_view_sets_pretraining_images_against_fine_tune_images_saved():
    from types import SimpleNamespace

    def cell(arm, cross):  # validation accuracy reaches 0.8 exactly at step ``cross`` for every seed
        trials = [R.Trial(f"{arm}{s}", arm, "100", 100, 200, s, "completed", 0.9, 0.9, params={"batch_size": "32"},
                          curve=[(0, 0.1), (cross, 0.8), (200, 0.9)] if cross else [(0, 0.1), (200, 0.5)],
                          source="" if arm == "scratch" else "ae")
                  for s in range(3)]
        return R.Cell(arm, 100, 200, trials)

    stage = SimpleNamespace(data=SimpleNamespace(params={"steps": "100", "batch_size": "64"},
                                                 metrics={"train_size": 5000, "wall_s": 90},
                                                 tags={"dlsweep.objective": "autoencoder"}))
    md = "\n".join(R.compute_markdown({"ae": stage}, [cell("pretrained", 50), cell("scratch", 100)], 0.8))
    assert "| ae | autoencoder | 100 | 64 | 6,400 | 5,000 | 1.5 min |" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| 100 |")]
    assert rows[0].startswith("| 100 | scratch | 100 ") and "| 3,200 |" in rows[0]  # the baseline first
    # pretrained saves (100 - 50) steps x 32 = 1,600 images per run; 6,400 / 1,600 = 4 runs to pay back
    assert rows[1].startswith("| 100 | pretrained | 50 ") and rows[1].endswith("| 1,600 | 4.0 runs |")
    never = "\n".join(R.compute_markdown({"ae": stage}, [cell("pretrained", 150), cell("scratch", 100)], 0.8))
    assert "| -1,600 | never |" in never
    assert R.compute_markdown({"ae": stage}, [cell("scratch", 100)], None)[-2].startswith("| ae |")  # no target: cost only
    stage.data.metrics["wall_s"] = 2.4  # a smoke-sized stage: seconds, not "0.0 min"
    assert "| 5,000 | 2 s |" in "\n".join(R.compute_markdown({"ae": stage}, [cell("scratch", 100)], None))
    late = "\n".join(R.compute_markdown({"ae": stage}, [cell("pretrained", 50), cell("scratch", None)], 0.8))
    assert "| > 4,800 | - |" in late  # scratch never got there within its 200 steps: over (200 - 50) x 32 saved


def test_stage_names_sort_by_their_numbers():
    from dlcore.report import natural

    names = ["clf", "ae.latent_dim=12.fc_hidden=0", "ae.latent_dim=2.fc_hidden=256", "ae.latent_dim=2.fc_hidden=0"]
    assert sorted(names, key=natural) == ["ae.latent_dim=2.fc_hidden=0", "ae.latent_dim=2.fc_hidden=256",
                                          "ae.latent_dim=12.fc_hidden=0", "clf"]
    assert sorted([("b10", 1), ("b9", 2)], key=natural) == [("b9", 2), ("b10", 1)]


def test_the_settings_table_says_what_each_stage_and_arm_trained_with():
    """The report's settings: every stage and arm as a column, what the sweep set (a searched value
    says so), the stage an arm starts from, and the augmentations in words."""
    from dlcore.spec import load_sweep

    sweep = load_sweep(Path(__file__).parents[1] / "sweeps" / "barlow_cifar10.yaml", profile="cpu")
    md = "\n".join(R.settings_markdown(sweep))
    assert "| setting | stage barlow | arm linear | arm finetuned |" in md
    assert "| augment | simclr | crop_flip | crop_flip |" in md
    assert "| from |  | barlow | barlow |" in md and "| encoder_lr |  |  | 0.0003 |" in md
    assert "| barlow_lambda | 0.005 |  |  |" in md and "| steps | 3,000 | 2,000 | 2,000 |" in md
    assert "`simclr`: random resized crop (area 0.2-1" in md and "`crop_flip`: random crop" in md
    full = load_sweep(Path(__file__).parents[1] / "sweeps" / "barlow_cifar10.yaml")
    assert "| lr | 0.3 | searched | searched |" in "\n".join(R.settings_markdown(full))  # finetune.search: lr


def test_a_random_init_probe_is_the_baseline_of_the_probes_not_a_pretrained_arm(tmp_path):
    uri = default_uri(tmp_path)
    client = MlflowClient(uri)
    raw = {**SPEC, "name": "probes", "finetune": {**SPEC["finetune"], "labels": [100], "search": {}, "samples": 1, "arms": {
        "scratch": {}, "linear": {"from": "ae", "finetune": "linear", "features": "conv"},
        "random": {"finetune": "linear", "features": "conv"}, "full": {"from": "ae"}}}}
    spec = Sweep.model_validate(raw).model_dump(mode="json", by_alias=True)
    exp = tracking.ensure_experiment(uri, "probes", tmp_path / "artifacts")
    parent = tracking.start_parent(uri, exp, "sweep", spec, {"sweep": "probes", "sampler": "sobol-tpe"})
    accs = {"scratch": [0.70, 0.72, 0.74], "linear": [0.80, 0.81, 0.82], "random": [0.60, 0.60, 0.61], "full": [0.9] * 3}
    for arm, values in accs.items():
        for seed, acc in enumerate(values):
            add_run(client, exp, parent, {"stage": "finetune", "arm": arm, "labels": 100, "steps": 200, "seed": seed,
                                          "cell": f"{arm}/labels=100/steps=200/seed={seed}", "outcome": "completed"},
                    [("val_acc", acc, 200), ("best_val_acc", acc, 200), ("test_acc", acc, 200), ("test_loss", 1 - acc, 200)])
    result = R.build(client, "probes", tmp_path / "out")
    paired = {(p["arm"], p["baseline"]): p["acc"].mean for p in result["paired"]}
    # the random-init probe is compared with the probe that trains the same head, and with nothing else
    assert paired == pytest.approx({("linear", "scratch"): 0.09, ("full", "scratch"): 0.18,
                                    ("linear", "random"): (0.20 + 0.21 + 0.21) / 3})
    assert {e["arm"] for e in result["efficiency"]} <= {"linear", "full"}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Pretrained minus random initialisation, paired by seed" in md and "| linear − random | 100 |" in md
    assert "random − scratch" not in md
