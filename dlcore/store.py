"""Where a sweep keeps what it writes, under one root, and its state file.

Free of Ray and MLflow, so that the process that outlives a sweep's driver (``supervisor.py``)
can read and mend the state without becoming a Ray driver itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Paths:
    """Everything a sweep writes, under one root (default ./mlflow_runs)."""

    root: Path

    @property
    def cache(self) -> Path:
        return self.root / "pretrain_cache"

    @property
    def ray(self) -> Path:
        return self.root / "ray"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def state(self, name: str) -> Path:
        return self.root / "sweeps" / name / "state.json"

    def outbox(self, name: str) -> Path:
        return self.root / "sweeps" / name / "outbox.json"


def write_state(path: Path, state: dict) -> None:
    """Replace the state file whole: a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)
