"""The pretrain cache: one folder per finished pretraining stage, verified before every reuse.

A stage's folder is ``<cache>/<key>/`` (the checkpoint files, ``job.json`` and ``manifest.json``).
The manifest holds the sha256 of every file, the job and the final metrics; it is written last,
inside a temporary folder that is then renamed into place, so a folder with a manifest is whole.
A missing manifest, a missing or changed file, or a non-finite final loss makes the entry invalid.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def write(cache: Path, key: str, checkpoint: Path, job: dict, metrics: dict) -> Path:
    """Copy a finished stage's checkpoint into the cache under ``key``, atomically."""
    final_loss = metrics.get("test_loss")
    if final_loss is None or not math.isfinite(final_loss):
        raise ValueError(f"stage {key} has no finite final test loss ({final_loss}); not caching it")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint, tmp)
    (tmp / "job.json").write_text(json.dumps(job, indent=1))
    manifest = {"key": key, "files": _files(tmp), "job": job,
                "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    dest = cache / key
    if dest.exists():
        shutil.rmtree(dest)
    tmp.replace(dest)
    return dest


def problem(cache: Path, key: str) -> str | None:
    """Why the cache entry ``key`` cannot be used ('missing' if there is none), or None if it is whole."""
    folder = cache / key
    if not folder.exists():
        return "missing"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no readable manifest"
    loss = manifest.get("metrics", {}).get("test_loss")
    if loss is None or not math.isfinite(loss):
        return f"final test loss {loss} is not finite"
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256(path) != digest:
            return f"{name} does not match its sha256 in the manifest"
    return None


def labels_total(folder: Path) -> int:
    """Labels a cached stage read, its own stages' included (0 for entries written before they were counted)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    return int(manifest.get("metrics", {}).get("labels_total", 0))


def remove(cache: Path, key: str) -> None:
    shutil.rmtree(cache / key, ignore_errors=True)
