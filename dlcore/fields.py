"""What a sweep file's values may be: number ranges, plain names, grid axes, builder arguments.

These are pydantic types and plain checks; ``spec`` builds its models from them. A check that
concerns a key below the model running it raises ``At(key, message)``, so the error names the key.
"""

from __future__ import annotations

import inspect
import re
from typing import Annotated, Any, Optional, Union

from pydantic import AfterValidator, Field


class At(ValueError):
    """A validator's complaint about ``key``, a dotted path below the model that raises it; ``also``:
    other keys below that model the complaint involves (so that a ``--set`` of any of them is named)."""

    def __init__(self, key: str, message: str, also: tuple[str, ...] = ()):
        super().__init__(message)
        self.key, self.also = key, also


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=-]*")


def plain_name(value: str) -> str:
    """A name that becomes a folder or an experiment: no '/', no leading dot, so it stays inside its parent."""
    if not NAME.fullmatch(value):
        raise ValueError(f"'{value}' is not a plain name: letters, digits and _ . = -, starting with a letter or digit")
    return value


def unique(values: list) -> list:
    """A grid axis without repeats: a repeat would run the same cells twice and count them as two."""
    keys = [(type(v), v) for v in values]  # the budget 1 (one label) is not the budget 1.0 (all of them)
    repeated = [v for i, (v, k) in enumerate(zip(values, keys)) if k in keys[:i]]
    if repeated:
        raise ValueError(f"{repeated} given more than once in {values}")
    return values


def budget(b: int | float) -> int | float:
    if isinstance(b, float) and not 0 < b <= 1:
        raise ValueError(f"label fraction {b} must be in (0, 1]")
    if isinstance(b, int) and b < 1:
        raise ValueError(f"label count {b} must be positive")
    return b


def val_size(v: int | float) -> int | float:
    if isinstance(v, float) and not 0 < v < 1 or isinstance(v, int) and v < 1:
        raise ValueError(f"val_size {v} must be a count >= 1 or a fraction in (0, 1)")
    return v


Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]
Name = Annotated[str, AfterValidator(plain_name)]
Budget = Annotated[Union[int, float], AfterValidator(budget)]
ValSize = Annotated[Union[int, float], AfterValidator(val_size)]
Classes = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1), AfterValidator(unique)]  # upper bound: check_budgets


def grid(item: Any) -> Any:
    """A grid axis: a non-empty list of ``item`` without repeats."""
    return Annotated[list[item], Field(min_length=1), AfterValidator(unique)]


# The range of each number a stage or an arm sets; a search distribution must stay inside it too.
RANGES = {
    **dict.fromkeys(("lr", "encoder_lr", "temperature"), Positive),
    **dict.fromkeys(("weight_decay", "noise_std", "barlow_lambda"), NonNegative),
    **dict.fromkeys(("batch_size", "eval_batch_size", "eval_every", "proj_dim", "proj_hidden", "knn_bank",
                     "recon_samples"), Count),
    **dict.fromkeys(("head_hidden", "warmup_steps"), Annotated[int, Field(ge=0)]),
}


def _arguments(builder) -> set[str]:
    return set(inspect.signature(builder).parameters) - {"image_shape"}


def model_args_problem(values: dict, objective: str) -> Optional[tuple[str, str]]:
    """(key, what is wrong) when ``encoder_args`` do not fit the builders they are passed to, else None.

    Autoencoders pass them to the decoder too (train.build_model), so there they must fit both.
    """
    from . import models  # torch: only when a sweep is checked, not for --help

    encoder = values.get("encoder") or "conv"
    if encoder not in models.ENCODERS:
        return None  # _check_names says so
    builders = {f"encoder {encoder}": models.ENCODERS[encoder]}
    if objective in ("autoencoder", "decode"):
        decoder = values.get("decoder") or encoder
        if decoder not in models.DECODERS:
            return "decoder", f"no decoder '{decoder}' to mirror encoder {encoder}; give decoder: one of {sorted(models.DECODERS)}"
        builders[f"decoder {decoder}"] = models.DECODERS[decoder]
    known = set.intersection(*map(_arguments, builders.values()))
    unknown = sorted(set(values.get("encoder_args") or {}) - known)
    if unknown:
        return "encoder_args", f"unknown argument {unknown} for {' and '.join(builders)}; known: {sorted(known)}"
    return None
