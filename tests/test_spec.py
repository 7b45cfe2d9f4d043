import json
from pathlib import Path

import pytest
import yaml

from dlcore import spec as S

SWEEPS = sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml"))

MINIMAL = {
    "data": {"dataset": "mnist", "val_size": 500},
    "pretrain": {"ae": {"objective": "autoencoder", "steps": 30, "encoder_args": {"latent_dim": 8}}},
    "finetune": {
        "arms": {"scratch": {}, "pretrained": {"from": "ae"}},
        "labels": [20, 0.01],
        "steps": [40, 80],
        "seeds": [0, 1],
        "samples": 3,
        "encoder_args": {"latent_dim": 8},
        "search": {"lr": {"loguniform": [1e-4, 1e-2]}},
    },
}


def write(tmp_path, raw, name="study.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_minimal_sweep_validates_and_plans(tmp_path):
    sweep = S.load_sweep(write(tmp_path, MINIMAL))
    assert sweep.name == "study" and sweep.mode == "max"
    p = S.plan(sweep)
    assert p["grid_cells"] == 2 * 2 * 2  # arms x labels x seeds: the step budgets 40 and 80 come from one run
    assert p["finetune_trials"] == 8 * 3
    assert p["pretrain_trials"] == 2  # one per fine-tune seed
    assert p["total_trials"] == 26
    assert p["validation"] == {"protocol": "realistic", "fraction": 0.2}


def test_overrides_are_yaml_and_create_keys(tmp_path):
    sweep = S.load_sweep(write(tmp_path, MINIMAL), ["finetune.seeds=[0,1,2]", "finetune.weight_decay=3e-3", "asha.enabled=false"])
    assert sweep.finetune.seeds == [0, 1, 2] and sweep.finetune.weight_decay == 3e-3 and not sweep.asha.enabled


def test_smoke_shrinks_to_one_seed_two_budgets_one_sample(tmp_path):
    raw = {**MINIMAL, "finetune": {**MINIMAL["finetune"], "labels": [1000, 100, 300], "steps": [5000]}}
    sweep = S.load_sweep(write(tmp_path, raw), smoke=True)
    ft = sweep.finetune
    assert ft.seeds == [0] and ft.labels == [100, 300] and ft.samples == 1 and ft.steps == [S.SMOKE_STEPS]
    assert sweep.pretrain["ae"].steps == 30 and sweep.data.val_size == 500  # already under the cap
    assert S.plan(sweep)["total_trials"] == 1 + 2 * 2


def test_smoke_leaves_a_searched_key_to_the_search(tmp_path):
    sweep = S.load_sweep(write(tmp_path, MINIMAL), ["finetune.search.batch_size={choice: [32, 128]}"], smoke=True)
    assert sweep.finetune.batch_size is None and sweep.finetune.eval_every == 40 // 3


def test_smoke_keeps_set_values(tmp_path):
    sweep = S.load_sweep(write(tmp_path, MINIMAL), ["finetune.samples=4", "finetune.seeds=[3, 4]"], smoke=True)
    assert sweep.finetune.samples == 4 and sweep.finetune.seeds == [3, 4] and sweep.finetune.steps == [40]


def test_a_smoke_or_profile_run_is_its_own_sweep_even_when_named_by_hand(tmp_path):
    raw = {**MINIMAL, "tracking": {"experiment": "mine"}, "profiles": {"cpu": {"finetune.steps": [20]}}}
    path = write(tmp_path, raw)
    named = S.load_sweep(path, ["name=x"], smoke=True)
    assert (named.name, named.tracking.experiment) == ("x-smoke", "mine-smoke")
    assert S.load_sweep(path, ["name=x"], profile="cpu").name == "x-cpu"
    assert S.load_sweep(path, ["name=x"], profile="cpu", smoke=True).name == "x-cpu-smoke"
    assert S.load_sweep(path, smoke=True).name == "study-smoke" and S.load_sweep(path).name == "study"


def test_smoke_passes_only_a_file_whose_full_size_run_would_start(tmp_path, data_dir):
    raw = {**MINIMAL, "data": {**MINIMAL["data"], "data_dir": data_dir},
           "finetune": {**MINIMAL["finetune"], "labels": [20, 40, 70000]}}
    sweep = S.load_sweep(write(tmp_path, raw), smoke=True)
    assert sweep.finetune.labels == [20, 40]  # the smoke run itself would fit
    with pytest.raises(S.SpecError, match=r"^study.yaml: finetune.labels: label budget 70000 .* exceeds the 59500 .*"
                                          r"\(in the full-size sweep, of which --smoke runs a part\)$"):
        S.check_all(sweep, "study.yaml")
    raw["finetune"]["labels"] = [20, 40, 1000]
    assert S.check_all(S.load_sweep(write(tmp_path, raw), smoke=True), "study.yaml").num_classes == 10


def test_yaml_merge_keys_may_override_what_they_merge(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("pretrain:\n  a: &a {objective: autoencoder, steps: 30}\n  b:\n    <<: *a\n    steps: 10\n"
                    "finetune: {labels: [20], steps: [40]}\n")
    sweep = S.load_sweep(path)
    assert sweep.pretrain["b"].steps == 10 and sweep.pretrain["b"].objective == "autoencoder"


def test_check_all_returns_the_data_set_it_checked(tmp_path, data_dir):
    sweep = S.load_sweep(write(tmp_path, MINIMAL), [f"data.data_dir={data_dir}"])
    ds = S.check_all(sweep, "study.yaml")
    assert ds.name == "mnist" and ds.num_classes == 10


def test_pretrain_keys_chain_and_change_with_config(tmp_path):
    raw = {**MINIMAL, "pretrain": {**MINIMAL["pretrain"], "dec": {"objective": "decode", "from": "ae", "steps": 10}}}
    a = S.pretrain_jobs(S.load_sweep(write(tmp_path, raw)))
    b = S.pretrain_jobs(S.load_sweep(write(tmp_path, raw), ["pretrain.ae.lr=0.01"]))
    assert a[("ae", 0)].key != a[("ae", 1)].key  # seeds differ
    assert a[("ae", 0)].key != b[("ae", 0)].key and a[("dec", 0)].key != b[("dec", 0)].key  # parent change propagates
    assert a[("dec", 0)].source == a[("ae", 0)].key
    same = S.pretrain_jobs(S.load_sweep(write(tmp_path, raw), ["finetune.weight_decay=0.5", "data.data_dir=/elsewhere"]))
    assert same[("ae", 0)].key == a[("ae", 0)].key  # fine-tune settings and data location are not part of it


def test_fine_tune_cells_carry_grid_values_and_sources(tmp_path):
    sweep = S.load_sweep(write(tmp_path, MINIMAL))
    cells = S.finetune_cells(sweep)
    pre = S.pretrain_jobs(sweep)
    cell = next(c for c in cells if c.tags["arm"] == "pretrained" and c.tags["seed"] == 1)
    assert cell.source == pre[("ae", 1)].key
    assert cell.train["objective"] == "classify" and cell.train["encoder_args"] == {"latent_dim": 8}
    assert {c.key for c in cells} == {f"{a}/labels={l}/steps=80/seed={d}" for a in ("scratch", "pretrained")
                                      for l in (20, 0.01) for d in (0, 1)}
    assert all(c.train["step_budgets"] == [40] and c.tags["step_budgets"] == "40" for c in cells)
    assert all(c.train["validation"] == "realistic" and c.train["val_fraction"] == 0.2 for c in cells)


def test_search_scope_cell_searches_on_the_first_seed_and_leads_the_others(tmp_path):
    seeds = S.load_sweep(write(tmp_path, MINIMAL), ["finetune.seeds=[3, 5, 7]"])
    cell = S.load_sweep(write(tmp_path, MINIMAL), ["finetune.seeds=[3, 5, 7]", "finetune.search_scope=cell"])
    assert seeds.finetune.search_scope == "seed"  # the default: every seed searches on its own
    assert {(c.samples, c.lead, c.tags["search_scope"]) for c in S.finetune_cells(seeds)} == {(3, None, "seed")}
    cells = {c.key: c for c in S.finetune_cells(cell)}
    follower = cells["pretrained/labels=20/steps=80/seed=5"]
    assert follower.lead == "pretrained/labels=20/steps=80/seed=3" and follower.samples == 1
    assert follower.tags["search_from_seed"] == 3 and follower.tags["search_scope"] == "cell"
    assert cells[follower.lead].lead is None and cells[follower.lead].samples == 3
    assert "search_from_seed" not in cells[follower.lead].tags
    grid = 2 * 2  # arms x labels (the step budgets 40 and 80 are read off one run)
    assert S.plan(seeds)["finetune_trials"] == grid * 3 * 3
    p = S.plan(cell)
    assert p["grid_cells"] == grid * 3 and p["finetune_trials"] == grid * (3 + 1 + 1)
    assert p["total_trials"] == 3 + grid * 5 and p["finetune"]["search_scope"] == "cell"


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(bogus=1), "study.yaml: bogus: unknown key"),
    (lambda r: r["finetune"].update(lables=[10]), "finetune.lables: unknown key"),
    (lambda r: r["finetune"].update(steps="many"), "finetune.steps: Input should be a valid list"),
    (lambda r: r["finetune"].update(labels=[1.5]), "finetune.labels: label fraction 1.5 must be in (0, 1]"),
    (lambda r: r["finetune"].update(labels=[]), "finetune.labels"),
    (lambda r: r["finetune"]["search"].update(lr={"logunifrom": [1e-4, 1e-2]}), "finetune.search.lr.logunifrom: unknown key"),
    (lambda r: r["finetune"]["search"].update(lr={"loguniform": [1e-2, 1e-4]}), "loguniform needs low < high"),
    (lambda r: r["finetune"]["search"].update(lrr={"uniform": [0, 1]}), "cannot search ['lrr']"),
    (lambda r: r["finetune"]["arms"].update(bad={"from": "nope"}), "finetune.arms.bad.from: no stage 'nope'"),
    (lambda r: r["pretrain"]["ae"].update(objective="mae"), "pretrain.ae.objective: Input should be"),
    (lambda r: r["pretrain"]["ae"].update(encoder="vit"), "encoder 'vit' is not one of"),
    (lambda r: r["pretrain"].update(dec={"objective": "decode"}), "a decode stage needs 'from'"),
    (lambda r: r["pretrain"]["ae"].update({"from": "ae"}), "stages form a cycle"),
    (lambda r: r.update(metric="test_acc"), "metric: Input should be 'val_acc' or 'val_loss'"),
    (lambda r: r["resources"].update(cpu=0) if "resources" in r else r.update(resources={"cpu": 0}), "resources.cpu"),
])
def test_bad_sweep_files_name_file_and_key(tmp_path, mutate, message):
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    mutate(raw)
    with pytest.raises(S.SpecError) as e:
        S.load_sweep(write(tmp_path, raw))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(str(tmp_path / "study.yaml"))


def test_malformed_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data: {dataset: mnist\nfinetune: [")
    with pytest.raises(S.SpecError, match=r"broken.yaml: not valid YAML at line \d+"):
        S.load_sweep(path)
    with pytest.raises(S.SpecError, match="no such sweep file"):
        S.load_sweep(tmp_path / "nope.yaml")
    with pytest.raises(S.SpecError, match="KEY.PATH=VALUE"):
        S.load_sweep(write(tmp_path, MINIMAL), ["finetune.seeds"])


def test_unreadable_sweep_file_is_one_line(tmp_path, monkeypatch):
    path = write(tmp_path, MINIMAL)

    def denied(self):  # what chmod 000 does to anyone but root, who runs these tests in CI containers
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(S.SpecError, match=r"study.yaml: cannot read it \(Permission denied\)$"):
        S.load_sweep(path)


def test_impossible_budget_fails_against_the_real_pool(tmp_path, mnist):
    sweep = S.load_sweep(write(tmp_path, MINIMAL), ["finetune.labels=[100000]"])
    with pytest.raises(S.SpecError, match="finetune.labels: label budget 100000 .* exceeds the 59500"):
        S.check_budgets(sweep, mnist, "study.yaml")
    sweep = S.load_sweep(write(tmp_path, MINIMAL), ["finetune.labels=[5]"])
    with pytest.raises(S.SpecError, match="smaller than the number of classes"):
        S.check_budgets(sweep, mnist, "study.yaml")


def test_a_scratch_arm_freezes_its_random_encoder_only_when_it_says_so(tmp_path):
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    raw["finetune"]["finetune"] = "linear"  # a grid-wide mode is for the arms that start from a stage
    raw["finetune"]["arms"]["random"] = {"finetune": "linear", "features": "conv"}
    cells = S.finetune_cells(S.load_sweep(write(tmp_path, raw)))
    modes = {c.tags["arm"]: (c.train["finetune"], c.train.get("features", "code")) for c in cells}
    assert modes == {"scratch": ("full", "code"), "pretrained": ("linear", "code"), "random": ("linear", "conv")}
    arms = S.plan(S.load_sweep(write(tmp_path, raw)))["finetune"]["arms"]  # the dry run says what the cells train
    assert arms == {"scratch": "scratch", "pretrained": "ae", "random": "random init, linear"}
    raw["finetune"]["arms"]["random"]["encoder"] = "mlp"
    sweep = S.load_sweep(write(tmp_path, raw))
    with pytest.raises(S.SpecError, match="finetune.arms.random.*features 'conv'"):
        S.check_jobs(sweep, "study.yaml")


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["finetune"]["search"].update(finetune={"choice": ["full", "linear"]}),
     "finetune.search.finetune: is what an arm is, not a hyperparameter"),
    (lambda r: r["finetune"]["search"].update(features={"choice": ["code", "conv"]}),
     "finetune.search.features: is what an arm is"),
    (lambda r: r["pretrain"]["ae"].update(features="conv"), "pretrain.ae.features: is for fine-tune arms"),
])
def test_what_an_arm_trains_is_set_per_arm(tmp_path, mutate, message):
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    mutate(raw)
    with pytest.raises(S.SpecError, match=message):
        S.load_sweep(write(tmp_path, raw))


def test_mismatched_encoder_between_stage_and_arm_is_caught(tmp_path):
    sweep = S.load_sweep(write(tmp_path, MINIMAL), ["finetune.encoder_args.latent_dim=16"])
    with pytest.raises(S.SpecError, match="encoder"):
        S.check_jobs(sweep, "study.yaml")


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_validates_full_and_smoke(path):
    for smoke in (False, True):
        sweep = S.load_sweep(path, smoke=smoke)
        S.check_jobs(sweep, str(path))
        assert S.plan(sweep)["total_trials"] > 0


def test_every_experiment_ships_a_sweep():
    names = {p.name for p in SWEEPS}
    assert {"dae_fraction.yaml", "mnist_conv_ae.yaml", "mnist_labels_100.yaml", "simclr_cifar10.yaml",
            "barlow_cifar10.yaml", "mnist_mlp_ae_300.yaml", "mnist_mlp_dae.yaml"} <= names


def test_profiles_are_named_overrides_under_the_set_lines(tmp_path):
    raw = {**MINIMAL, "profiles": {"cpu": {"finetune.steps": [20], "finetune.seeds": [0, 1, 2], "pretrain.ae.steps": 10}}}
    path = write(tmp_path, raw)
    full = S.load_sweep(path)
    assert full.finetune.steps == [40, 80] and full.profile is None
    cpu = S.load_sweep(path, profile="cpu")
    assert cpu.finetune.steps == [20] and cpu.finetune.seeds == [0, 1, 2] and cpu.pretrain["ae"].steps == 10
    assert cpu.profile == "cpu" and cpu.name == "study-cpu" and "profiles" not in cpu.model_dump()
    mine = S.load_sweep(path, ["finetune.seeds=[7]"], profile="cpu", smoke=True)  # --set wins, smoke shrinks the profile
    assert mine.finetune.seeds == [7] and mine.finetune.steps == [20] and mine.profile == "cpu"
    with pytest.raises(S.SpecError, match=r"study.yaml --profile gpu: no profile 'gpu'; this file has \['cpu'\]"):
        S.load_sweep(path, profile="gpu")


def test_a_broken_profile_is_an_error_even_when_not_chosen(tmp_path):
    raw = {**MINIMAL, "profiles": {"cpu": {"finetune.stepz": [20]}}}
    with pytest.raises(S.SpecError, match=r"study.yaml --profile cpu: finetune.stepz: unknown key"):
        S.load_sweep(write(tmp_path, raw))
    raw = {**MINIMAL, "profiles": {"cpu": {"finetune.labels.x": 1}}}
    with pytest.raises(S.SpecError, match=r"--profile cpu: profiles.cpu.finetune.labels.x: finetune.labels is not a section"):
        S.load_sweep(write(tmp_path, raw))
    with pytest.raises(S.SpecError, match="profiles: expected a mapping of profile names"):
        S.load_sweep(write(tmp_path, {**MINIMAL, "profiles": ["cpu"]}))


GRID = {
    "data": {"dataset": "mnist", "val_size": 500},
    "pretrain": {
        "ae": {"objective": "autoencoder", "steps": 30, "encoder_args": {"channels": [8, 16], "latent_dim": 12},
               "grid": {"encoder_args.latent_dim": [2, 8], "lr": [1e-3, 3e-3]}},
        "dec": {"objective": "decode", "from": "ae", "steps": 20, "encoder_args": {"channels": [8, 16], "latent_dim": 12}},
    },
    "finetune": {"arms": {"scratch": {}, "pretrained": {"from": "ae"}}, "labels": [100], "steps": [20],
                 "encoder_args": {"channels": [8, 16], "latent_dim": 12}},
}


def test_a_stage_grid_is_one_cached_stage_per_point_and_its_followers_repeat(tmp_path):
    sweep = S.load_sweep(write(tmp_path, GRID))
    points = ["latent_dim=2.lr=0.001", "latent_dim=2.lr=0.003", "latent_dim=8.lr=0.001", "latent_dim=8.lr=0.003"]
    assert list(sweep.pretrain) == [f"ae.{p}" for p in points] + [f"dec.{p}" for p in points]
    assert list(sweep.finetune.arms) == ["scratch"] + [f"pretrained.{p}" for p in points]
    ae = sweep.pretrain["ae.latent_dim=8.lr=0.003"]
    assert ae.encoder_args == {"channels": [8, 16], "latent_dim": 8} and ae.lr == 3e-3 and ae.grid_of == "ae"
    dec = sweep.pretrain["dec.latent_dim=8.lr=0.003"]  # a follower takes the point's encoder, not its lr
    assert dec.from_ == "ae.latent_dim=8.lr=0.003" and dec.encoder_args["latent_dim"] == 8 and dec.lr is None
    arm = sweep.finetune.arms["pretrained.latent_dim=2.lr=0.001"]  # inherits the section's encoder_args, then the point's
    assert arm.from_ == "ae.latent_dim=2.lr=0.001" and arm.encoder_args == {"channels": [8, 16], "latent_dim": 2}
    jobs = S.pretrain_jobs(sweep)
    assert len({j.key for j in jobs.values()}) == 8  # each point cached on its own
    assert jobs[("ae.latent_dim=2.lr=0.001", 0)].tags["point"] == '{"encoder_args.latent_dim": 2, "lr": 0.001}'
    assert "grid_of" not in jobs[("ae.latent_dim=2.lr=0.001", 0)].train  # bookkeeping, not a training value
    S.check_jobs(sweep, "study.yaml")  # every encoder loads where it is used
    again = S.Sweep.model_validate(sweep.model_dump(mode="json", by_alias=True))  # a saved spec reloads as is (resume)
    assert list(again.pretrain) == list(sweep.pretrain) and list(again.finetune.arms) == list(sweep.finetune.arms)


@pytest.mark.parametrize("grid, message", [
    ({"encoder_args.latent_dim": []}, "expected a mapping of dotted keys to non-empty lists"),
    ({"encoder_args.latent_dim": [2, 2]}, "values must be distinct numbers or strings"),
    ({"encoder_args.latent_dim": [[2]]}, "values must be distinct numbers or strings"),
    ({"encoder_args.latent_dimm": [2]}, "pretrain.ae.latent_dimm=2.encoder_args: unknown argument ['latent_dimm']"),
])
def test_bad_stage_grids_are_one_line_errors(tmp_path, grid, message):
    raw = json.loads(json.dumps(GRID))
    raw["pretrain"]["ae"]["grid"] = grid
    with pytest.raises(S.SpecError) as e:
        S.load_sweep(write(tmp_path, raw))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_set_on_a_yaml_alias_changes_that_stage_alone(tmp_path):
    """`encoder_args: *encoder` shares one mapping in the parsed YAML: --set on one stage must not reach the others."""
    path = tmp_path / "study.yaml"
    path.write_text("data: {dataset: mnist}\npretrain:\n  ae: {objective: autoencoder, encoder_args: &enc {latent_dim: 12}}\n"
                    "  clf: {objective: classify, encoder_args: *enc}\n")
    sweep = S.load_sweep(path, ["pretrain.ae.encoder_args.latent_dim=32"])
    assert sweep.pretrain["ae"].encoder_args["latent_dim"] == 32
    assert sweep.pretrain["clf"].encoder_args["latent_dim"] == 12
