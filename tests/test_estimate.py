"""The wall-time estimate of --dry-run: measured on real data, scaled by steps, laid out in dependency order."""

import json

import yaml
from typer.testing import CliRunner

from dlcore.cli import app
from dlcore.estimate import TRIAL_START_S, _layout
from test_spec import MINIMAL

runner = CliRunner()


def test_layout_runs_independent_trials_beside_a_stage_and_dependents_after_it():
    # 2 slots: a 10 s stage and two 4 s scratch trials start at once; the 3 s fine-tune waits for the stage.
    s = TRIAL_START_S
    trials = [(10.0, None, "stage"), (4.0, None, "a"), (4.0, None, "b"), (3.0, "stage", "ft")]
    assert _layout(trials, 2) == 10 + s + 3 + s
    assert _layout(trials, 1) == 10 + 4 + 4 + 3 + 4 * s
    assert _layout([(5.0, None, "x")] * 4, 4) == 5 + s


def test_dry_run_estimates_from_measured_steps_and_scales_with_them(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("DLSWEEP_DATA_DIR", data_dir)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))

    def plan(*extra):
        result = runner.invoke(app, ["run", str(path), "--dry-run", "--json", "--estimate", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)["estimate"]

    short, long = plan(), plan("--set", "finetune.steps=[2000,4000]")
    assert set(short["costs"]) == {"ae", "arm scratch", "arm pretrained"}
    assert all(c["step_s"] > 0 and c["test_s"] > 0 for c in short["costs"].values())
    assert long["trial_s"] > short["trial_s"] and long["wall_s"] > short["wall_s"] > 0

    table = runner.invoke(app, ["run", str(path), "--dry-run"])
    assert "estimated wall time on this machine: ~" in table.output and "arm scratch" in table.output
    assert "estimated" not in runner.invoke(app, ["run", str(path), "--dry-run", "--no-estimate"]).output


def test_a_stage_that_starts_from_another_is_timed_with_its_frozen_encoder(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("DLSWEEP_DATA_DIR", data_dir)
    raw = {"data": MINIMAL["data"], "pretrain": {**MINIMAL["pretrain"], "dec": {
        "objective": "decode", "from": "ae", "steps": 30, "encoder_args": {"latent_dim": 8}}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["run", str(path), "--dry-run", "--json", "--estimate"])
    assert result.exit_code == 0, result.output
    e = json.loads(result.output)["estimate"]
    assert set(e["costs"]) == {"ae", "dec"} and e["wall_s"] > 30 * (e["costs"]["ae"]["step_s"] + e["costs"]["dec"]["step_s"])
