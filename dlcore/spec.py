"""Sweep files: YAML + ``--set`` overrides -> a validated ``Sweep`` -> plain ``TrainConfig`` jobs.

Every user mistake becomes a ``SpecError`` whose message is one line naming the file, the key
path and what was expected. Nothing here starts Ray or touches MLflow.
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

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from . import data as D
from . import losses, models
from .train import OBJECTIVES, TrainConfig


class SpecError(ValueError):
    """A sweep file that cannot run; ``str()`` is one line for the terminal."""


# Keys of TrainConfig that a sweep sets itself rather than the user.
RUN_KEYS = {"objective", "dataset", "data_dir", "classes", "val_size", "split_seed", "labels", "init_encoder",
            "seed", "threads", "device", "out_dir", "steps", "test_size"}
HINTS = typing.get_type_hints(TrainConfig)
PARAM_FIELDS = {f.name: (Optional[HINTS[f.name]], None) for f in dataclasses.fields(TrainConfig) if f.name not in RUN_KEYS}
NAME_CHOICES = {
    "encoder": models.ENCODERS,
    "decoder": models.DECODERS,
    "augment": D.AUGMENTATIONS,
    "recon_loss": losses.RECONSTRUCTION,
    "optimizer": ("adamw", "sgd"),
    "schedule": ("constant", "cosine"),
    "finetune": ("full", "frozen", "linear"),
}


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

    def to_tune(self):
        from ray import tune

        kind = next(k for k, v in self.model_dump().items() if v is not None)
        arg = getattr(self, kind)
        return tune.choice(arg) if kind == "choice" else getattr(tune, kind)(*arg)


class DataSpec(Strict):
    dataset: str = "mnist"
    data_dir: Optional[str] = None  # default: DLSWEEP_DATA_DIR, resolved by the CLI
    classes: Optional[list[int]] = None
    val_size: Union[int, float] = 5000
    split_seed: int = 0
    test_size: Optional[int] = None  # evaluate on the first N test images only (smoke runs)


class StageSpec(Params):
    """A pretraining stage, run once per seed and cached by the hash of everything it depends on."""

    objective: Literal["autoencoder", "simclr", "barlow", "classify", "decode"]
    from_: Optional[str] = Field(None, alias="from")  # stage whose encoder initialises this one
    steps: int = Field(1000, gt=0)
    classes: Optional[list[int]] = None  # override the data's classes (E1: the 8 non-cat/dog classes)
    labels: Optional[Union[int, float]] = None  # classify stages: label budget, default all
    seeds: Optional[list[int]] = None  # default: the fine-tune seeds, or [0]

    @model_validator(mode="after")
    def _decode_needs_source(self):
        if self.objective == "decode" and not self.from_:
            raise ValueError("a decode stage needs 'from': the stage whose encoder it decodes")
        return self


class ArmSpec(Params):
    """One arm of the fine-tune grid: scratch (no 'from') or started from a pretraining stage."""

    from_: Optional[str] = Field(None, alias="from")


class FinetuneSpec(Params):
    arms: dict[str, ArmSpec] = Field(default_factory=lambda: {"scratch": ArmSpec()})
    labels: list[Union[int, float]] = Field(min_length=1)
    steps: list[int] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    samples: int = Field(1, gt=0)  # Optuna samples per grid cell
    search: dict[str, Distribution] = Field(default_factory=dict)

    @field_validator("labels")
    @classmethod
    def _budgets(cls, v):
        for b in v:
            if isinstance(b, float) and not 0 < b <= 1:
                raise ValueError(f"label fraction {b} must be in (0, 1]")
            if isinstance(b, int) and b < 1:
                raise ValueError(f"label count {b} must be positive")
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
            raise ValueError(f"cannot search {unknown}; searchable: {sorted(PARAM_FIELDS)}")
        return v


class AshaSpec(Strict):
    enabled: bool = True
    grace_period: int = Field(100, gt=0)  # steps before the first cut
    reduction_factor: float = Field(2, gt=1)


class Resources(Strict):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class Tracking(Strict):
    uri: Optional[str] = None  # default: sqlite under mlflow_runs/
    experiment: Optional[str] = None  # default: the sweep's name


class Sweep(Strict):
    name: str
    description: str = ""
    data: DataSpec = Field(default_factory=DataSpec)
    pretrain: dict[str, StageSpec] = Field(default_factory=dict)
    finetune: Optional[FinetuneSpec] = None
    metric: Literal["val_acc", "val_loss"] = "val_acc"  # fine-tune selection metric, on the validation split
    target: Optional[float] = None  # accuracy the report counts steps to
    asha: AshaSpec = Field(default_factory=AshaSpec)
    resources: Resources = Field(default_factory=Resources)
    tracking: Tracking = Field(default_factory=Tracking)

    @model_validator(mode="after")
    def _references(self):
        for name, stage in self.pretrain.items():
            if stage.from_ and stage.from_ not in self.pretrain:
                raise ValueError(f"pretrain.{name}.from: no stage '{stage.from_}'; stages: {sorted(self.pretrain)}")
        self.stage_order()  # raises on cycles
        if self.finetune:
            for name, arm in self.finetune.arms.items():
                if arm.from_ and arm.from_ not in self.pretrain:
                    raise ValueError(f"finetune.arms.{name}.from: no stage '{arm.from_}'; stages: {sorted(self.pretrain)}")
        if not self.pretrain and not self.finetune:
            raise ValueError("a sweep needs a 'pretrain' or a 'finetune' section")
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
                raise ValueError(f"pretrain.{name}.from: stages form a cycle")
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


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise SpecError(f"--set {text}: expected KEY.PATH=VALUE")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as e:
        raise SpecError(f"--set {key}: value is not YAML ({e.__class__.__name__})") from None
    return key.split("."), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for i, key in enumerate(path[:-1]):
            if not isinstance(node.get(key, {}), dict):
                raise SpecError(f"--set {text}: {'.'.join(path[: i + 1])} is not a section")
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return raw


def _where(loc: tuple) -> str:
    parts = [str(p) for p in loc if not str(p).startswith(("function-", "model-"))]
    return ".".join(parts).replace(".from_", ".from") or "(top level)"


def format_validation_error(path: str, e: ValidationError) -> str:
    err = e.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{path}: {_where(err['loc'])}: {msg}{more}"


def load_sweep(path: str | Path, overrides: list[str] = (), smoke: bool = False) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such sweep file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of keys at the top level")
    raw.setdefault("name", path.stem)
    raw = apply_overrides(raw, list(overrides))
    try:
        sweep = Sweep.model_validate(raw)
    except ValidationError as e:
        raise SpecError(format_validation_error(str(path), e)) from None
    return shrink(sweep) if smoke else sweep


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


def pretrain_jobs(sweep: Sweep) -> dict[tuple[str, int], Job]:
    """(stage, seed) -> job, in dependency order; keys chain so a changed parent changes the child."""
    jobs: dict[tuple[str, int], Job] = {}
    for name in sweep.stage_order():
        st = sweep.pretrain[name]
        for seed in sweep.stage_seeds(name):
            train = {**data_values(sweep), **st.set_values(), "objective": st.objective, "steps": st.steps,
                     "labels": st.labels, "seed": seed}
            train.pop("seeds", None)
            train.pop("from_", None)
            if st.classes is not None:
                train["classes"] = st.classes
            source = None
            if st.from_:
                parents = sweep.stage_seeds(st.from_)
                source = jobs[(st.from_, parents[sweep.stage_seeds(name).index(seed) % len(parents)])].key
            hashed = {k: v for k, v in train.items() if k not in ("data_dir", "eval_batch_size")}
            key = f"{name}-{config_hash({**hashed, 'source': source})}"
            jobs[(name, seed)] = Job(name, train, {"stage": name, "objective": st.objective, "seed": seed}, source, key)
    return jobs


def finetune_cells(sweep: Sweep) -> list[Job]:
    """Every grid cell (arm x labels x steps x seed) as a job without its searched values."""
    ft = sweep.finetune
    if ft is None:
        return []
    pre = pretrain_jobs(sweep)
    base = {k: v for k, v in ft.model_dump(exclude_none=True).items() if k in PARAM_FIELDS}
    cells = []
    for (arm_name, arm), labels, steps, seed in itertools.product(ft.arms.items(), ft.labels, ft.steps, ft.seeds):
        train = {**data_values(sweep), **base, **arm.set_values(), "objective": "classify", "labels": labels,
                 "steps": steps, "seed": seed, "metric": sweep.metric}
        train.pop("from_", None)
        source = None
        if arm.from_:
            seeds = sweep.stage_seeds(arm.from_)
            source = pre[(arm.from_, seeds[ft.seeds.index(seed) % len(seeds)])].key
        else:
            train["finetune"] = "full"
        cell = f"{arm_name}/labels={labels}/steps={steps}/seed={seed}"
        tags = {"stage": "finetune", "arm": arm_name, "labels": labels, "steps": steps, "seed": seed, "cell": cell,
                "pretrained_from": arm.from_ or ""}
        cells.append(Job("finetune", train, tags, source, cell))
    return cells


def check_jobs(sweep: Sweep, source: str) -> None:
    """Build every job's TrainConfig once, so a bad value fails before anything runs."""
    pre = pretrain_jobs(sweep)
    jobs = list(pre.values()) + finetune_cells(sweep)
    by_key = {j.key: j for j in pre.values()}
    for job in jobs:
        if job.source:  # the pretrained encoder must load into the job's encoder
            src = by_key[job.source]
            mine = (job.train.get("encoder", "conv"), job.train.get("encoder_args", {}))
            theirs = (src.train.get("encoder", "conv"), src.train.get("encoder_args", {}))
            if mine != theirs:
                where = f"finetune.arms.{job.tags['arm']}" if job.stage == "finetune" else f"pretrain.{job.stage}"
                raise SpecError(f"{source}: {where}: encoder {mine[0]} {mine[1]} differs from the encoder of "
                                f"stage '{src.stage}' ({theirs[0]} {theirs[1]}) it starts from")
        try:
            TrainConfig(**{**job.train, "init_encoder": "pretrained" if job.source else job.train.get("init_encoder")})
        except (TypeError, ValueError) as e:
            raise SpecError(f"{source}: {job.stage}: {e}") from None
    if sweep.finetune and sweep.finetune.search:
        for key, dist in sweep.finetune.search.items():
            values = dist.choice if dist.choice is not None else []
            for v in values:
                try:
                    Params.model_validate({key: v})
                except ValidationError as e:
                    raise SpecError(f"{source}: finetune.search.{key}: {format_validation_error('', e).split(': ', 2)[-1]}") from None


def check_budgets(sweep: Sweep, ds: D.Dataset, source: str) -> None:
    """Label budgets against the real pool sizes: an impossible budget fails before Ray starts."""
    for job in list(pretrain_jobs(sweep).values()) + finetune_cells(sweep):
        if job.train.get("labels") is None:
            continue
        sub = D.select_classes(ds, job.train["classes"]) if job.train.get("classes") else ds
        try:
            pool, _ = D.validation_split(len(sub.y_train), job.train["val_size"], job.train["split_seed"])
            D.budget_count(job.train["labels"], len(pool), sub.num_classes)
        except D.DataError as e:
            where = f"finetune.labels" if job.stage == "finetune" else f"pretrain.{job.stage}.labels"
            raise SpecError(f"{source}: {where}: {e}") from None


def plan(sweep: Sweep) -> dict:
    """What a run would do, as plain data (``--dry-run``)."""
    pre = pretrain_jobs(sweep)
    cells = finetune_cells(sweep)
    samples = sweep.finetune.samples if sweep.finetune else 0
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
            "arms": {k: (a.from_ or "scratch") for k, a in sweep.finetune.arms.items()},
            "labels": sweep.finetune.labels,
            "steps": sweep.finetune.steps,
            "seeds": sweep.finetune.seeds,
            "search": {k: v.model_dump(exclude_none=True) for k, v in sweep.finetune.search.items()},
            "samples_per_cell": samples,
        },
        "grid_cells": len(cells),
        "finetune_trials": len(cells) * samples,
        "total_trials": len(pre) + len(cells) * samples,
        "metric": sweep.metric,
        "mode": sweep.mode,
        "asha": sweep.asha.model_dump(),
        "resources_per_trial": sweep.resources.model_dump(),
    }
