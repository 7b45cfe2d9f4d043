"""Sweep files: YAML + ``--set`` overrides -> a validated ``Sweep`` -> plain ``TrainConfig`` jobs.

Every user mistake becomes a ``SpecError``: one line naming the file (or the ``--set``), the key path
and what was expected. ``check_all`` is every check a run makes before it writes anything, the data
set's own included. Nothing here starts Ray or touches MLflow.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model, field_validator, model_validator

from . import data as D
from . import losses, models
from .fields import RANGES, At, Budget, Classes, Count, Name, Seed, ValSize, budget, grid, model_args_problem
from .sweepfile import (SpecError, apply_overrides, apply_profile, format_validation_error, message, origin, read_yaml,
                        set_path)
from .train import OBJECTIVES, TrainConfig

# Keys of TrainConfig that a sweep sets itself rather than the user.
RUN_KEYS = {"objective", "dataset", "data_dir", "classes", "val_size", "split_seed", "labels", "init_encoder",
            "seed", "threads", "device", "out_dir", "steps", "test_size", "validation", "val_fraction", "step_budgets"}
HINTS = typing.get_type_hints(TrainConfig)
PARAM_FIELDS = {f.name: (Optional[RANGES.get(f.name, HINTS[f.name])], None)
                for f in dataclasses.fields(TrainConfig) if f.name not in RUN_KEYS}
NAME_CHOICES = {
    "encoder": models.ENCODERS,
    "decoder": models.DECODERS,
    "augment": D.AUGMENTATIONS,
    "recon_loss": losses.RECONSTRUCTION,
    "optimizer": ("adamw", "sgd"),
    "schedule": ("constant", "cosine"),
    "finetune": ("full", "frozen", "linear"),
    "features": ("code", "conv"),
    "precision": ("auto", "fp32", "bf16"),
}


ARM_CHOICES = {"finetune", "features"}  # what an arm trains: set per arm, never searched


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _check_names(values: dict) -> dict:
    for key, known in NAME_CHOICES.items():
        if values.get(key) is not None and values[key] not in known:
            raise ValueError(f"{key} '{values[key]}' is not one of {sorted(known)}")
    return values


# TrainConfig's tunable fields, all optional: a stage or an arm sets only what it changes.
TrainParams = create_model("TrainParams", __base__=Strict, **PARAM_FIELDS)


class Params(TrainParams):
    @model_validator(mode="after")
    def _names(self):
        _check_names(self.model_dump())
        return self

    def set_values(self) -> dict:
        return self.model_dump(exclude_none=True)


class Distribution(Strict):
    """One searched hyperparameter: exactly one of the keys below."""

    loguniform: Optional[tuple[float, float]] = None
    uniform: Optional[tuple[float, float]] = None
    randint: Optional[tuple[int, int]] = None  # high exclusive, as in tune.randint
    choice: Optional[list[Any]] = None

    @model_validator(mode="after")
    def _one(self):
        given = [k for k, v in self.model_dump().items() if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {list(Distribution.model_fields)}, got {given or 'none'}")
        kind, arg = given[0], getattr(self, given[0])
        if kind == "choice" and not arg:
            raise ValueError("choice needs at least one value")
        if kind != "choice" and not arg[0] < arg[1]:
            raise ValueError(f"{kind} needs low < high, got {list(arg)}")
        if kind == "loguniform" and arg[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {arg[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k, v in self.model_dump().items() if v is not None)

    def outside(self, key: str) -> Optional[str]:
        """Why this distribution can draw a value that ``key`` cannot take, or None."""
        kind, arg = self.kind, getattr(self, self.kind)
        types = typing.get_args(HINTS[key]) or (HINTS[key],)
        if kind in ("uniform", "loguniform") and float not in types:
            return f"{kind} draws floats, but {key} takes {' or '.join(t.__name__ for t in types)}; use randint or choice"
        edges = arg if kind == "choice" else (arg[0], arg[1] - 1) if kind == "randint" else arg
        for v in edges:
            try:
                Params.model_validate({key: v})
            except ValidationError as e:
                return f"{kind} value {v!r}: {message(e.errors()[0])}"
        return None

    def to_tune(self):
        from ray import tune

        arg = getattr(self, self.kind)
        return tune.choice(arg) if self.kind == "choice" else getattr(tune, self.kind)(*arg)


class DataSpec(Strict):
    dataset: str = "mnist"
    data_dir: Optional[str] = None  # default: DLSWEEP_DATA_DIR, resolved by the CLI
    classes: Optional[Classes] = None
    val_size: ValSize = 5000
    split_seed: Seed = 0
    test_size: Optional[Count] = None  # evaluate on the first N test images only (smoke runs)


class StageSpec(Params):
    """A pretraining stage, run once per seed and cached by the hash of everything it depends on."""

    objective: Literal["autoencoder", "simclr", "barlow", "classify", "decode"]
    from_: Optional[str] = Field(None, alias="from")  # stage whose encoder initialises this one
    steps: int = Field(1000, gt=0)
    classes: Optional[Classes] = None  # override the data's classes (E1: the 8 non-cat/dog classes)
    labels: Optional[Budget] = None  # classify stages: label budget, default all
    seeds: Optional[grid(Seed)] = None  # default: the fine-tune seeds, or [0]
    grid_of: Optional[str] = None  # set by a stage's `grid:`: the stage this point was expanded from ...
    point: Optional[dict[str, Any]] = None  # ... and its values there (dotted key -> value)

    @model_validator(mode="after")
    def _consistent(self):
        if self.objective == "decode" and not self.from_:
            raise At("from", "a decode stage needs 'from': the stage whose encoder it decodes")
        if self.features not in (None, "code"):
            raise At("features", "is for fine-tune arms: a stage's encoder is cached whole, for the stages and arms "
                                 "that start from it")
        problem = model_args_problem(self.set_values(), self.objective)
        if problem:
            raise At(*problem, also=("encoder",))
        return self


class ArmSpec(Params):
    """One arm of the fine-tune grid: scratch (no 'from') or started from a pretraining stage."""

    from_: Optional[str] = Field(None, alias="from")
    grid_of: Optional[str] = None  # set when its stage has a grid: the arm it was repeated from ...
    point: Optional[dict[str, Any]] = None  # ... and the stage's grid point


class FinetuneSpec(Params):
    arms: dict[Name, ArmSpec] = Field(default_factory=lambda: {"scratch": ArmSpec()})
    labels: grid(Union[int, float])
    steps: grid(int)
    seeds: grid(Seed) = Field(default_factory=lambda: [0])
    samples: int = Field(1, gt=0)  # Optuna samples per grid cell (per first-seed cell with search_scope cell)
    search: dict[str, Distribution] = Field(default_factory=dict)
    # seed: every (arm, labels, steps, seed) cell runs its own search. cell: only the first seed's
    # cell searches; every other seed trains once with the values of that search's selected trial,
    # so that seeds differ by their data and initialisation, not by their hyperparameters.
    search_scope: Literal["seed", "cell"] = "seed"

    @field_validator("labels")
    @classmethod
    def _budgets(cls, v):
        for b in v:
            budget(b)
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v):
        if any(s < 1 for s in v):
            raise ValueError(f"step budgets must be positive, got {v}")
        return v

    @field_validator("search")
    @classmethod
    def _searchable(cls, v):
        unknown = sorted(set(v) - set(PARAM_FIELDS))
        if unknown:
            raise ValueError(f"cannot search {unknown}; searchable: {sorted(set(PARAM_FIELDS) - ARM_CHOICES)}")
        chosen = sorted(set(v) & ARM_CHOICES)
        if chosen:
            raise At(chosen[0], "is what an arm is, not a hyperparameter: make one arm per value")
        for key, dist in v.items():
            problem = dist.outside(key)
            if problem:
                raise At(key, problem)
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.search_scope == "cell" and not self.search:
            raise At("search_scope", "cell shares the values the first seed's search picks, but finetune.search is "
                                     "empty; search something, or use search_scope seed", also=("search",))
        for key in self.search:  # the searched value replaces a set one in every trial
            for where, p in [("", self), *((f"arms.{n}.", a) for n, a in self.arms.items())]:
                if getattr(p, key) is not None:
                    raise At(f"{where}{key}", f"is set, and also searched by finetune.search.{key}, whose values "
                                              "replace it in every trial; keep one", also=(f"search.{key}",))
        base = self.set_values()
        for name, arm in self.arms.items():
            own = arm.set_values()
            values = {**base, **own}
            where = f"arms.{name}." if {"encoder", "encoder_args"} & set(own) else ""
            problem = model_args_problem(values, "classify")
            if problem:
                raise At(where + problem[0], problem[1], also=(f"{where}encoder",))
            for key in {"encoder", "encoder_args"} & set(self.search):
                for v in self.search[key].choice or []:
                    problem = model_args_problem({**values, key: v}, "classify")
                    if problem:
                        raise At(f"search.{key}", f"choice {v!r}: {problem[1]}")
        return self


class ValidationSpec(Strict):
    """How fine-tune checkpoints and hyperparameters are selected, and with which labels."""

    protocol: Literal["realistic", "oracle", "none"] = "realistic"
    fraction: float = Field(0.2, gt=0, le=0.5, allow_inf_nan=False)  # realistic: share of each class's budget


class AshaSpec(Strict):
    enabled: bool = True
    grace_period: int = Field(100, gt=0)  # steps before the first cut
    reduction_factor: float = Field(2, gt=1, allow_inf_nan=False)


class Resources(Strict):
    cpu: float = Field(1.0, gt=0, allow_inf_nan=False)
    gpu: float = Field(0.0, ge=0, allow_inf_nan=False)
    # A trial runs extra threads on its node's CPUs that no trial holds. Off: a fixed thread count,
    # so that a run's floating-point sums (and so its last digits) do not depend on other trials.
    borrow_idle: bool = True


class Tracking(Strict):
    uri: Optional[str] = None  # default: sqlite under mlflow_runs/
    experiment: Optional[Name] = None  # default: the sweep's name


GRID_SCALARS = (int, float, str, bool)


def point_name(point: dict[str, Any]) -> str:
    """'latent_dim=2.fc_hidden=0': a grid point as a suffix of stage and arm names."""
    return ".".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items())


def expand_stage_grids(raw: Any) -> Any:
    """A stage with ``grid: {dotted.key: [values]}`` becomes one stage per point of the grid (``ae`` ->
    ``ae.latent_dim=2``, ...), each cached on its own; stages and arms that start from it are repeated
    per point with the point's encoder settings, so that every encoder loads where it is used."""
    if not isinstance(raw, dict) or not isinstance(raw.get("pretrain"), dict):
        return raw
    gridded = {n: st for n, st in raw["pretrain"].items() if isinstance(st, dict) and st.get("grid") is not None}
    if not gridded:
        return raw
    raw = copy.deepcopy(raw)
    stages, arms = raw["pretrain"], (raw.get("finetune") or {}).get("arms") or {}
    for base in gridded:
        grid_spec = stages[base].pop("grid")
        if not isinstance(grid_spec, dict) or not grid_spec or not all(isinstance(v, list) and v for v in grid_spec.values()):
            raise ValueError(f"pretrain.{base}.grid: expected a mapping of dotted keys to non-empty lists of values")
        for key, values in grid_spec.items():
            if not all(isinstance(v, GRID_SCALARS) for v in values) or len(set(values)) != len(values):
                raise ValueError(f"pretrain.{base}.grid.{key}: values must be distinct numbers or strings, got {values}")
        if stages[base].get("from") in gridded:
            raise ValueError(f"pretrain.{base}.grid: a gridded stage cannot start from another gridded stage")
        points = [dict(zip(grid_spec, combo)) for combo in itertools.product(*grid_spec.values())]

        def repeat(section: dict, name: str, body: dict, all_keys: bool, inherited: dict) -> None:
            """``section[name]`` once per point, renamed, pointing at the point's stage; an arm's encoder
            settings start from the fine-tune section's when it has none of its own."""
            del section[name]
            for point in points:
                copy_ = copy.deepcopy(body)
                for key, value in point.items():
                    top = key.split(".")[0]
                    if all_keys or top in ("encoder", "encoder_args"):
                        if top not in copy_ and top in inherited:
                            copy_[top] = copy.deepcopy(inherited[top])
                        set_path(copy_, key.split("."), value)
                if name != base:
                    copy_["from"] = f"{base}.{point_name(point)}"
                copy_.update(grid_of=name, point=point)
                section[f"{name}.{point_name(point)}"] = copy_

        followers = [n for n, st in stages.items() if isinstance(st, dict) and st.get("from") == base]
        repeat(stages, base, stages[base], all_keys=True, inherited={})
        for name in followers:
            repeat(stages, name, stages[name], all_keys=False, inherited={})
        for name in [n for n, arm in arms.items() if isinstance(arm, dict) and arm.get("from") == base]:
            repeat(arms, name, arms[name], all_keys=False, inherited=raw.get("finetune") or {})
    return raw


class Sweep(Strict):
    name: Name
    description: str = ""
    profile: Optional[Name] = None  # the profile --profile applied (set by the loader, recorded with the run)
    data: DataSpec = Field(default_factory=DataSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    pretrain: dict[Name, StageSpec] = Field(default_factory=dict)
    finetune: Optional[FinetuneSpec] = None
    metric: Literal["val_acc", "val_loss"] = "val_acc"  # fine-tune selection metric, on the validation split
    target: Optional[float] = Field(None, gt=0, le=1)  # accuracy the report counts steps to
    asha: AshaSpec = Field(default_factory=AshaSpec)
    resources: Resources = Field(default_factory=Resources)
    # Times Tune restarts a trial whose worker or node died (or that raised): for clusters whose nodes
    # can go away (spot instances). A restarted trial trains again from its start, and its MLflow run
    # is replaced, never duplicated. 0: a trial that dies is failed at once (and --resume reruns it).
    max_failures: int = Field(0, ge=0, le=100)
    tracking: Tracking = Field(default_factory=Tracking)
    _overrides: list[str] = PrivateAttr(default_factory=list)  # the --set texts it was loaded with, so that errors can name them
    _full: Optional["Sweep"] = PrivateAttr(None)  # a smoke run's full-size sweep, whose budgets are checked too

    @model_validator(mode="before")
    @classmethod
    def _grids(cls, raw):
        return expand_stage_grids(raw)

    @model_validator(mode="after")
    def _references(self):
        for name, stage in self.pretrain.items():
            if stage.from_ and stage.from_ not in self.pretrain:
                raise At(f"pretrain.{name}.from", f"no stage '{stage.from_}'; stages: {sorted(self.pretrain)}")
        self.stage_order()  # raises on cycles
        if self.finetune:
            for name, arm in self.finetune.arms.items():
                if arm.from_ and arm.from_ not in self.pretrain:
                    raise At(f"finetune.arms.{name}.from", f"no stage '{arm.from_}'; stages: {sorted(self.pretrain)}")
        if not self.pretrain and not self.finetune:
            raise ValueError("a sweep needs a 'pretrain' or a 'finetune' section")
        if self.finetune and self.validation.protocol == "none":
            if self.finetune.search:
                raise At("validation.protocol", "'none' selects nothing, so it cannot search: remove finetune.search "
                                                 "or choose realistic/oracle", also=("finetune.search",))
            if self.finetune.samples > 1:
                raise At("validation.protocol", "'none' selects nothing, so finetune.samples > 1 would train the same "
                                                 "trial again: set samples: 1", also=("finetune.samples",))
        return self

    @property
    def mode(self) -> str:
        return "max" if self.metric == "val_acc" else "min"

    def stage_order(self) -> list[str]:
        """Pretraining stages, each after the stage it starts from."""
        order: list[str] = []
        visiting: set[str] = set()

        def visit(name: str):
            if name in order:
                return
            if name in visiting:
                raise At(f"pretrain.{name}.from", "stages form a cycle")
            visiting.add(name)
            if self.pretrain[name].from_:
                visit(self.pretrain[name].from_)
            order.append(name)

        for name in self.pretrain:
            visit(name)
        return order

    def stage_seeds(self, name: str) -> list[int]:
        stage = self.pretrain[name]
        if stage.seeds is not None:
            return stage.seeds
        return list(self.finetune.seeds) if self.finetune else [0]


# ---- loading ----------------------------------------------------------------------------


def _validate(raw: dict, path: Path, overrides: list[str]) -> Sweep:
    try:
        raw = apply_overrides(raw, overrides)
    except SpecError as e:
        raise SpecError(f"{path} {e}") from None
    try:
        sweep = Sweep.model_validate(raw)
    except ValidationError as e:
        raise SpecError(format_validation_error(str(path), e, overrides)) from None
    sweep._overrides = list(overrides)
    return sweep


def load_sweep(path: str | Path, overrides: list[str] = (), smoke: bool = False, profile: str | None = None) -> Sweep:
    """The validated sweep: the file, then its ``profile`` (a named set of overrides under ``profiles:``,
    which also names the sweep ``<name>-<profile>``), then the smoke sizes, then the user's ``--set``
    lines. Every profile of the file is checked."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of keys at the top level")
    raw.setdefault("name", path.stem)
    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict) or not all(isinstance(p, dict) for p in profiles.values()):
        raise SpecError(f"{path}: profiles: expected a mapping of profile names to mappings of dotted keys to values")
    for name in [*profiles, *([profile] if profile and profile not in profiles else [])]:
        try:
            chosen = apply_profile(raw, name)
        except SpecError as e:
            raise SpecError(f"{path} --profile {name}: {e}") from None
        chosen.pop("profiles", None)
        checked = _named(_validate({**chosen, "profile": name}, Path(f"{path} --profile {name}"), list(overrides)), name)
        if name == profile:
            sweep = checked
    if profile is None:
        sweep = _validate({k: v for k, v in raw.items() if k != "profiles"}, path, list(overrides))
    if smoke:  # the smoke sizes, then the user's --set again: what they set by hand wins
        full = sweep
        sweep = _named(_validate(shrink(full).model_dump(by_alias=True), path, list(overrides)), "smoke", like=full)
        sweep._full = full
    return sweep


def _named(sweep: Sweep, suffix: str, like: Sweep | None = None) -> Sweep:
    """``sweep`` (named as ``like``, when given) as its own sweep ``<name>-<suffix>`` (a profile's or a
    smoke run's state, MLflow experiment and report folder), after the --set lines: a name set by hand
    gets the suffix too, so that ``--smoke --set name=x`` never mixes with ``--set name=x``."""
    like = like or sweep
    raw = {**sweep.model_dump(by_alias=True), "name": like.name, "tracking": like.tracking.model_dump(by_alias=True)}
    named = Sweep.model_validate(renamed(raw, suffix))
    named._overrides = sweep._overrides
    return named


def renamed(raw: dict, suffix: str) -> dict:
    """A smoke or profile run is its own sweep: name and MLflow experiment get ``-<suffix>``, so its
    state, runs and report never mix with the full-size sweep's."""
    raw = {**raw, "name": f"{raw['name']}-{suffix}"}
    if (raw.get("tracking") or {}).get("experiment"):
        raw["tracking"] = {**raw["tracking"], "experiment": f"{raw['tracking']['experiment']}-{suffix}"}
    return raw


# ---- smoke ------------------------------------------------------------------------------

SMOKE_STEPS = 60


def shrink(sweep: Sweep) -> Sweep:
    """A CPU-sized version of a sweep: few steps, 1 seed, 2 budgets, 1 sample, small val/test."""
    s = sweep.model_copy(deep=True)
    s.data.val_size = 500 if isinstance(s.data.val_size, int) else min(s.data.val_size, 0.05)
    s.data.test_size = min(s.data.test_size or 1000, 1000)

    def small(p: Params, steps: int) -> None:
        p.eval_every = max(1, steps // 3)
        p.batch_size = min(p.batch_size or 64, 64)
        if p.encoder == "resnet18":  # a quarter-width ResNet-18: ~1/16 of the FLOPs
            p.encoder_args = {**(p.encoder_args or {}), "width": 16}
            p.proj_hidden = min(p.proj_hidden or 2048, 256)

    for stage in s.pretrain.values():
        stage.steps = min(stage.steps, SMOKE_STEPS)
        stage.seeds = [stage.seeds[0]] if stage.seeds else None
        small(stage, stage.steps)
        stage.knn_bank = 1000
    if s.finetune:
        ft = s.finetune
        ft.seeds = ft.seeds[:1]
        ft.labels = sorted(ft.labels, key=lambda b: (isinstance(b, float), b))[:2]
        ft.steps = sorted({min(x, SMOKE_STEPS) for x in ft.steps})[:1]
        ft.samples = 1
        small(ft, ft.steps[0])
        for key in ft.search:  # a searched key stays the search's
            setattr(ft, key, None)
        for arm in ft.arms.values():
            arm.eval_every = arm.batch_size = None
    s.asha.grace_period = min(s.asha.grace_period, max(1, SMOKE_STEPS // 3))
    return s


# ---- plan: the jobs a sweep runs --------------------------------------------------------


def config_hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def data_values(sweep: Sweep) -> dict:
    d = sweep.data
    return {"dataset": d.dataset, "data_dir": d.data_dir, "classes": d.classes, "val_size": d.val_size,
            "split_seed": d.split_seed, "test_size": d.test_size}


@dataclasses.dataclass
class Job:
    """One training run: a TrainConfig's values plus the tags that place it in the study."""

    stage: str  # pretrain stage name, or "finetune"
    train: dict  # TrainConfig keyword arguments, except out_dir/threads/init_encoder
    tags: dict
    source: Optional[str] = None  # key of the pretraining job whose encoder it starts from
    key: str = ""  # content hash: identical jobs share it (the pretrain cache key)
    samples: int = 1  # trials of it the study runs
    lead: Optional[str] = None  # key of the cell whose search picks this cell's searched values (search_scope cell)


def pretrain_jobs(sweep: Sweep) -> dict[tuple[str, int], Job]:
    """(stage, seed) -> job, in dependency order; keys chain so a changed parent changes the child."""
    jobs: dict[tuple[str, int], Job] = {}
    for name in sweep.stage_order():
        st = sweep.pretrain[name]
        for seed in sweep.stage_seeds(name):
            train = {**data_values(sweep), **st.set_values(), "objective": st.objective, "steps": st.steps,
                     "labels": st.labels, "seed": seed}
            for key in ("seeds", "from_", "grid_of", "point"):
                train.pop(key, None)
            if st.classes is not None:
                train["classes"] = st.classes
            source = None
            if st.from_:
                parents = sweep.stage_seeds(st.from_)
                source = jobs[(st.from_, parents[sweep.stage_seeds(name).index(seed) % len(parents)])].key
            train.setdefault("embeddings", True)  # a stage's encoder is worth looking at; not part of its identity
            hashed = {k: v for k, v in train.items() if k not in ("data_dir", "eval_batch_size", "embeddings", "resume_every_s")}
            key = f"{name}-{config_hash({**hashed, 'source': source})}"
            tags = {"stage": name, "objective": st.objective, "seed": seed}
            if st.grid_of:
                tags.update(grid_of=st.grid_of, point=json.dumps(st.point))
            jobs[(name, seed)] = Job(name, train, tags, source, key)
    return jobs


def reads_steps_off_one_run(sweep: Sweep, arm: str) -> bool:
    """Whether an arm's step budgets come from one run at the largest: its schedule must not depend on the
    total (constant, or warmup then constant), whatever the search draws."""
    ft = sweep.finetune
    schedule = ft.arms[arm].schedule or ft.schedule or "constant"
    searched = ft.search.get("schedule")
    return len(ft.steps) > 1 and schedule != "cosine" and not (searched and "cosine" in (searched.choice or []))


def finetune_cells(sweep: Sweep) -> list[Job]:
    """Every grid cell (arm x labels x steps x seed) as a job without its searched values.

    Where an arm reads its step budgets off one run, its cells of every budget are one job at the
    largest budget, which records the smaller ones on the way (``step_budgets``). With search_scope
    cell, a cell of a later seed runs one trial, led by the first seed's cell."""
    ft = sweep.finetune
    if ft is None:
        return []
    pre = pretrain_jobs(sweep)
    base = {k: v for k, v in ft.model_dump(exclude_none=True).items() if k in PARAM_FIELDS}
    protocol = {"validation": sweep.validation.protocol, "val_fraction": sweep.validation.fraction}
    cells = []
    for (arm_name, arm), labels, steps, seed in itertools.product(ft.arms.items(), ft.labels, ft.steps, ft.seeds):
        budgets = {}
        if reads_steps_off_one_run(sweep, arm_name):
            if steps != max(ft.steps):
                continue
            budgets = {"step_budgets": sorted(s for s in set(ft.steps) if s < steps)}
        train = {**data_values(sweep), **base, **arm.set_values(), "objective": "classify", "labels": labels,
                 "steps": steps, "seed": seed, "metric": sweep.metric, **protocol, **budgets}
        for key in ("from_", "grid_of", "point"):
            train.pop(key, None)
        source = None
        if arm.from_:
            seeds = sweep.stage_seeds(arm.from_)
            source = pre[(arm.from_, seeds[ft.seeds.index(seed) % len(seeds)])].key
        else:  # from scratch: trained whole, unless the arm itself freezes its random encoder (a baseline)
            train["finetune"] = arm.finetune or "full"
        cell = f"{arm_name}/labels={labels}/steps={steps}/seed={seed}"
        tags = {"stage": "finetune", "arm": arm_name, "labels": labels, "steps": steps, "seed": seed, "cell": cell,
                "pretrained_from": arm.from_ or "", "validation": sweep.validation.protocol,
                "search_scope": ft.search_scope}
        if budgets:
            tags["step_budgets"] = ",".join(map(str, budgets["step_budgets"]))
        if arm.grid_of:
            tags.update(arm_of=arm.grid_of, point=json.dumps(arm.point))
        lead = None
        if ft.search_scope == "cell" and seed != ft.seeds[0]:
            lead = f"{arm_name}/labels={labels}/steps={steps}/seed={ft.seeds[0]}"
            tags["search_from_seed"] = ft.seeds[0]
        cells.append(Job("finetune", train, tags, source, cell, 1 if lead else ft.samples, lead))
    return cells


def arm_heads(cells: list[Job]) -> dict[str, tuple[str, str]]:
    """Each arm's fine-tune mode and the features its head reads, as its cells (``finetune_cells``) train them."""
    return {c.tags["arm"]: (c.train.get("finetune", "full"), c.train.get("features", "code")) for c in cells}


def _error(sweep: Sweep, source: str, key: str, problem: str, also: tuple[str, ...] = ()) -> SpecError:
    return SpecError(f"{origin(source, sweep._overrides, key, *also)}: {key}: {problem}")


def check_jobs(sweep: Sweep, source: str) -> None:
    """Build every job's TrainConfig once, so a bad value fails before anything runs."""
    pre = pretrain_jobs(sweep)
    jobs = list(pre.values()) + finetune_cells(sweep)
    by_key = {j.key: j for j in pre.values()}
    for job in jobs:
        where = f"finetune.arms.{job.tags['arm']}" if job.stage == "finetune" else f"pretrain.{job.stage}"
        if job.source:  # the pretrained encoder must load into the job's encoder
            src = by_key[job.source]
            mine = (job.train.get("encoder", "conv"), job.train.get("encoder_args", {}))
            theirs = (src.train.get("encoder", "conv"), src.train.get("encoder_args", {}))
            if mine != theirs:
                sections = [where, f"pretrain.{src.stage}", *(["finetune"] if job.stage == "finetune" else [])]
                involved = tuple(f"{section}.{k}" for section in sections for k in ("encoder", "encoder_args"))
                raise _error(sweep, source, where, f"encoder {mine[0]} {mine[1]} differs from the encoder of "
                                                   f"stage '{src.stage}' ({theirs[0]} {theirs[1]}) it starts from", involved)
        try:
            TrainConfig(**{**job.train, "init_encoder": "pretrained" if job.source else job.train.get("init_encoder")})
        except (TypeError, ValueError) as e:
            raise _error(sweep, source, where, str(e)) from None


def check_budgets(sweep: Sweep, ds: D.Dataset, source: str) -> None:
    """What only the data set can tell: classes it has, a validation split that leaves a pool, label
    budgets that fit the pool and cover every class. Fails before Ray starts."""
    pools: dict[tuple, tuple] = {}  # classes -> (pool size, number of classes, the pool's labels)
    for key, classes in [("data.classes", sweep.data.classes),
                         *((f"pretrain.{name}.classes", st.classes) for name, st in sweep.pretrain.items())]:
        if tuple(classes or ()) in pools:
            continue
        try:
            sub = D.select_classes(ds, classes) if classes else ds
        except D.DataError as e:
            raise _error(sweep, source, key, str(e)) from None
        try:
            pool, _ = D.validation_split(len(sub.y_train), sweep.data.val_size, sweep.data.split_seed)
        except D.DataError as e:
            raise _error(sweep, source, "data.val_size", f"{e} ({key} {classes})" if classes else str(e)) from None
        pools[tuple(classes or ())] = len(pool), sub.num_classes, sub.y_train[pool]
    realistic = set()
    for job in list(pretrain_jobs(sweep).values()) + finetune_cells(sweep):
        t = job.train
        size, num_classes, labels = pools[tuple(t.get("classes") or ())]
        key = "finetune.labels" if job.stage == "finetune" else f"pretrain.{job.stage}.labels"
        try:
            if t.get("validation") == "realistic":
                if (t["labels"], t["seed"]) not in realistic:  # labels of the budget, two per class at least
                    realistic.add((t["labels"], t["seed"]))
                    D.realistic_budget(labels, t["labels"], t["seed"], num_classes, t["val_fraction"])
            elif t.get("labels") is not None:
                D.budget_count(t["labels"], size, num_classes)
        except D.DataError as e:
            raise _error(sweep, source, key, str(e), also=("validation",)) from None


def check_all(sweep: Sweep, source: str) -> D.Dataset:
    """Every check a run makes before it writes anything, the data set's own included; returns the data set.

    ``dlsweep run`` calls it for dry and real runs alike: a dry run that passes is a run that starts.
    """
    check_jobs(sweep, source)
    try:
        ds = D.load_dataset(sweep.data.dataset, sweep.data.data_dir)
    except D.DataError as e:
        raise _error(sweep, source, "data.dataset", str(e)) from None
    check_budgets(sweep, ds, source)
    if sweep._full is not None:  # a smoke run that passes says the file's full-size run would start too
        try:
            check_jobs(sweep._full, source)
            check_budgets(sweep._full, ds, source)
        except SpecError as e:
            raise SpecError(f"{e} (in the full-size sweep, of which --smoke runs a part)") from None
    return ds


def plan(sweep: Sweep) -> dict:
    """What a run would do, as plain data (``--dry-run``)."""
    pre = pretrain_jobs(sweep)
    cells = finetune_cells(sweep)
    trials = sum(c.samples for c in cells)
    heads = arm_heads(cells)
    return {
        "name": sweep.name,
        "dataset": sweep.data.dataset,
        "stages": [
            {"stage": name, "objective": sweep.pretrain[name].objective, "steps": sweep.pretrain[name].steps,
             "seeds": sweep.stage_seeds(name), "from": sweep.pretrain[name].from_,
             "keys": [pre[(name, s)].key for s in sweep.stage_seeds(name)]}
            for name in sweep.stage_order()
        ],
        "pretrain_trials": len(pre),
        "finetune": None if not sweep.finetune else {
            "arms": {k: a.from_ or ("scratch" if heads[k][0] == "full" else f"random init, {heads[k][0]}")
                     for k, a in sweep.finetune.arms.items()},
            "labels": sweep.finetune.labels,
            "steps": sweep.finetune.steps,
            "seeds": sweep.finetune.seeds,
            "search": {k: v.model_dump(exclude_none=True) for k, v in sweep.finetune.search.items()},
            "samples_per_cell": sweep.finetune.samples,
            "search_scope": sweep.finetune.search_scope,
        },
        "grid_cells": len(cells),
        "finetune_trials": trials,
        "total_trials": len(pre) + trials,
        "validation": sweep.validation.model_dump(),
        "steps_read_off_one_run": sorted(a for a in sweep.finetune.arms if reads_steps_off_one_run(sweep, a))
        if sweep.finetune else [],
        "metric": sweep.metric,
        "mode": sweep.mode,
        "asha": sweep.asha.model_dump(),
        "resources_per_trial": sweep.resources.model_dump(),
    }
