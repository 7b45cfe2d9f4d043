"""The report on a real sqlite MLflow store filled with known numbers, where every figure of merit
can be worked out by hand."""

import math

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from dlcore import report as R
from dlcore import tracking
from dlcore.cli import app
from dlcore.spec import Sweep

SPEC = {
    "name": "known",
    "data": {"dataset": "mnist"},
    "finetune": {"arms": {"scratch": {}, "pretrained": {"from": "ae"}}, "labels": [100, 1000], "steps": [200],
                 "seeds": [0, 1, 2], "samples": 2, "search": {"lr": {"loguniform": [1e-4, 1e-2]}}},
    "pretrain": {"ae": {"objective": "autoencoder", "steps": 10}},
    "target": 0.8,
}
# test accuracy of the validation-best trial per (arm, labels) and seed
TEST = {("scratch", 100): [0.70, 0.72, 0.74], ("scratch", 1000): [0.88, 0.90, 0.92],
        ("pretrained", 100): [0.80, 0.81, 0.82], ("pretrained", 1000): [0.93, 0.94, 0.95]}


def fill(tmp_path, drop=(), fail=(), seeds=(0, 1, 2)):
    uri = tracking.default_uri(tmp_path)
    client = MlflowClient(uri)
    spec = Sweep.model_validate({**SPEC, "finetune": {**SPEC["finetune"], "seeds": list(seeds)}}).model_dump(mode="json", by_alias=True)
    exp = tracking.ensure_experiment(uri, "known", tmp_path / "artifacts")
    parent = tracking.start_parent(uri, exp, "sweep", spec, {"sweep": "known"})
    for (arm, labels), accs in TEST.items():
        for seed in seeds:
            if (arm, labels, seed) in drop:
                continue
            test = accs[seed]
            for sample, (val, test_acc) in enumerate([(0.9, test), (0.5, 0.99)]):  # the 2nd has better test, worse val
                tags = {"mlflow.parentRunId": parent, "dlsweep.stage": "finetune", "dlsweep.arm": arm,
                        "dlsweep.labels": str(labels), "dlsweep.steps": "200", "dlsweep.seed": str(seed),
                        "dlsweep.cell": f"{arm}/labels={labels}/steps=200/seed={seed}",
                        "dlsweep.outcome": "failed" if (arm, labels, seed, sample) in fail else "completed"}
                run = client.create_run(exp, tags=tags).info.run_id
                client.log_param(run, "lr", 0.001 * (sample + 1))
                # validation curve: pretrained reaches 0.8 at step 100, scratch at 100 labels never
                curve = {50: 0.6, 100: 0.85 if arm == "pretrained" else 0.7, 150: 0.86, 200: val}
                if (arm, labels) == ("scratch", 100):
                    curve = {50: 0.6, 100: 0.7, 150: 0.75, 200: 0.75}
                metrics = [Metric("val_acc", v, 0, s) for s, v in curve.items()]
                metrics += [Metric("best_val_acc", val if arm != "scratch" or labels != 100 else val - 0.1, 0, 200),
                            Metric("test_acc", test_acc, 0, 200), Metric("train_size", labels, 0, 200)]
                client.log_batch(run, metrics=metrics)
                client.set_terminated(run, "FAILED" if (arm, labels, seed, sample) in fail else "FINISHED")
    return client, parent


def test_means_bands_steps_and_label_efficiency_by_hand(tmp_path):
    client, parent = fill(tmp_path)
    result = R.build(client, "known", tmp_path / "out")
    cells = {(c.arm, c.labels): c for c in result["cells"]}
    assert cells[("scratch", 100)].accs == pytest.approx([0.70, 0.72, 0.74])  # selected on validation, not test
    assert cells[("scratch", 100)].mean == pytest.approx(0.72)
    t = 4.302652729911275  # Student t, 0.975 quantile, 2 degrees of freedom
    assert cells[("scratch", 100)].half_width == pytest.approx(t * 0.02 / math.sqrt(3))
    assert cells[("scratch", 100)].best_params == {"lr": "0.001"}
    eff = {e["labels"]: e for e in result["efficiency"]}
    assert eff[100]["baseline_labels"] == pytest.approx(100 * math.sqrt(10))  # halfway in log between 100 and 1000
    assert eff[100]["ratio"] == pytest.approx(math.sqrt(10))
    assert math.isinf(eff[1000]["baseline_labels"])  # scratch never reaches 94%
    rows = {(r["arm"], r["labels"]): r for r in result["rows"]}
    assert rows[("pretrained", 100)]["steps_to_target"] == 100 and rows[("pretrained", 100)]["reached_target"] == "3/3"
    assert rows[("scratch", 100)]["steps_to_target"] is None and rows[("scratch", 100)]["reached_target"] == "0/3"
    out = tmp_path / "out"
    for name in ("accuracy_vs_labels.png", "accuracy_vs_labels.svg", "accuracy_vs_steps.png", "summary.csv", "summary.md", "report.md"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    assert "![" in md and "accuracy_vs_labels.png" in md and "95% Student-t" in md and "72.00% ± 4.97%" in md
    assert "Partial" not in md
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert "report/report.md" in logged and "report/accuracy_vs_labels.png" in logged


def test_partial_and_failed_runs_still_report_the_rest(tmp_path):
    client, _ = fill(tmp_path, drop={("scratch", 1000, 2)}, fail={("pretrained", 100, 1, 0)})
    result = R.build(client, "known", tmp_path / "out")
    cells = {(c.arm, c.labels): c for c in result["cells"]}
    assert cells[("scratch", 1000)].accs == pytest.approx([0.88, 0.90])
    # the failed validation-best trial is left out; the seed falls back to its other, completed trial
    assert cells[("pretrained", 100)].accs == pytest.approx([0.80, 0.99, 0.82])
    assert result["missing"] == ["scratch/labels=1000/steps=200/seed=2"]
    assert result["failed"] == 1
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Partial sweep" in md and "scratch/labels=1000/steps=200/seed=2" in md


def test_one_seed_has_no_band_and_says_so(tmp_path):
    client, _ = fill(tmp_path, seeds=(0,))
    result = R.build(client, "known", tmp_path / "out")
    assert all(c.n == 1 and math.isnan(c.half_width) for c in result["cells"])
    assert "one seed per point: no confidence band" in (tmp_path / "out" / "report.md").read_text()


def test_labels_to_match_edges():
    assert R.labels_to_match([100, 1000], [0.7, 0.9], 0.6) == 100  # there from the smallest budget
    assert R.labels_to_match([100, 1000], [0.7, 0.9], 0.95) == math.inf
    assert R.labels_to_match([10, 100, 1000], [0.5, 0.7, 0.9], 0.8) == pytest.approx(100 * math.sqrt(10))
    assert R.steps_to_target([(50, 0.5), (100, 0.81), (150, 0.79)], 0.8) == 100


def test_report_cli_prints_table_and_unknown_experiment_fails(tmp_path):
    fill(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["report", "known", "--store", str(tmp_path), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert "72.00% ± 4.97%" in result.output and "scratch needs ~316 labels (3.2x)" in result.output
    bad = runner.invoke(app, ["report", "nope", "--store", str(tmp_path)])
    assert bad.exit_code == 2 and "no MLflow experiment 'nope'" in bad.output


def test_loss_curves_for_a_chosen_cell(tmp_path):
    client, _ = fill(tmp_path)
    result = R.build(client, "known", tmp_path / "out", curves=["scratch/labels=1000"])
    assert "loss_curves_scratch_1000.png" in result["figures"] and "loss_curves_pretrained_100.png" not in result["figures"]
    with pytest.raises(ValueError, match="no completed trial in cell 'scratch/labels=7'"):
        R.build(client, "known", tmp_path / "out", curves=["scratch/labels=7"])
