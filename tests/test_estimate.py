"""The wall-time estimate of --dry-run: measured on real data, scaled by steps, laid out in dependency order."""

import json

import yaml
from typer.testing import CliRunner

from dlcore.cli import app
from dlcore.estimate import TRIAL_START_S, _layout, slots_here
from dlcore.spec import Resources
from test_spec import MINIMAL

runner = CliRunner()


def test_layout_runs_independent_trials_beside_a_stage_and_dependents_after_it():
    # 2 slots: a 10 s stage and two 4 s scratch trials start at once; the 3 s fine-tune waits for the stage.
    s = TRIAL_START_S
    trials = [(10.0, None, "stage"), (4.0, None, "a"), (4.0, None, "b"), (3.0, "stage", "ft")]
    assert _layout(trials, 2) == 10 + s + 3 + s
    assert _layout(trials, 1) == 10 + 4 + 4 + 3 + 4 * s
    assert _layout([(5.0, None, "x")] * 4, 4) == 5 + s
    # a slot that frees up while a long stage still runs takes a short stage's dependent, not the long one's
    trials = [(100.0, None, "A"), (10.0, None, "B"), (3.0, "A", "fa"), (3.0, "B", "fb")]
    assert _layout(trials, 2) == 100 + s + 3 + s
    # a trial whose source is not among the trials (a cached stage) is ready at once
    assert _layout([(4.0, "cached", "ft")], 1) == 4 + s


def test_slots_and_threads_follow_what_ray_would_pack_here():
    assert slots_here(Resources(cpu=1), cpus=2, gpus=0) == (2, 1)
    assert slots_here(Resources(cpu=2), cpus=2, gpus=0) == (1, 2)
    assert slots_here(Resources(cpu=0.5), cpus=2, gpus=0) == (2, 1)  # 4 packed, but 1 thread each on 2 cores
    assert slots_here(Resources(cpu=4, gpu=1), cpus=16, gpus=1) == (1, 4)  # the one GPU is the limit
    assert slots_here(Resources(cpu=2, gpu=0.25), cpus=16, gpus=1) == (4, 2)
    assert slots_here(Resources(cpu=1, gpu=0.25), cpus=2, gpus=0) == (2, 1)  # no GPU here: the runner drops it


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

    # with the pretraining stage already cached under --store, the runner reuses it: it costs nothing
    from dlcore.spec import load_sweep, pretrain_jobs

    store = tmp_path / "store"
    jobs = pretrain_jobs(load_sweep(path)).values()
    for job in jobs:
        (store / "pretrain_cache" / job.key).mkdir(parents=True)
    from dlcore import cache, estimate

    # the same measured step costs for both plans: two separate measurements differ by the machine's noise
    probed = next(iter(short["costs"].values()))
    monkeypatch.setattr(estimate, "_probe", lambda cfg, ds: dict(probed))
    uncached = plan()
    monkeypatch.setattr(cache, "problem", lambda folder, key: None if (folder / key).is_dir() else "missing")
    cached = json.loads(runner.invoke(app, ["run", str(path), "--dry-run", "--json", "--estimate", "--store", str(store)]).output)
    assert cached["estimate"]["cached_stages"] == len(jobs) == 2 and "ae" not in cached["estimate"]["costs"]
    assert cached["estimate"]["trial_s"] < uncached["trial_s"]

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
