"""Where a sweep keeps what it writes, under one root, and its state file.

Free of Ray and MLflow, so that the process that outlives a sweep's driver (``supervisor.py``)
can read and mend the state without becoming a Ray driver itself.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dlcore.cache import filesystem, join


class RunError(RuntimeError):
    """A sweep that could not finish; one line for the terminal, and the exit code to end with."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclass
class Paths:
    """Everything a sweep writes, under one root (default ./mlflow_runs). With ``storage`` (an
    object-store URI such as ``s3://bucket/prefix``, for clusters without a shared disk), Tune's
    experiment state, the trials' checkpoints and the pretrain cache live there instead, and the
    state file is copied there too."""

    root: Path
    storage: str | None = None

    @property
    def cache(self) -> str | Path:
        return join(self.storage, "pretrain_cache") if self.storage else self.root / "pretrain_cache"

    @property
    def ray(self) -> str | Path:
        return join(self.storage, "ray") if self.storage else self.root / "ray"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def state(self, name: str) -> Path:
        return self.root / "sweeps" / name / "state.json"

    def outbox(self, name: str) -> Path:
        return self.root / "sweeps" / name / "outbox.json"


def first_line(e: BaseException) -> str:
    """An exception in one line: its message's first line, or its type when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def mirror(storage: str, name: str) -> str:
    """Where a sweep's state file is copied in its object store, for a driver on another machine."""
    return join(storage, "sweeps", name, "state.json")


def write_state(path: Path, state: dict) -> None:
    """Replace the state file whole: a reader never sees half of it. A sweep whose Tune state lives
    in an object store gets its state file copied there too (a new head node resumes from it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    text = json.dumps(state, indent=1)
    tmp.write_text(text)
    tmp.replace(path)
    if state.get("storage"):
        try:
            target, where = filesystem(mirror(state["storage"], state["name"]))
            with target.open_output_stream(where) as f:  # one PUT: whole or absent
                f.write(text.encode())
        except Exception as e:  # noqa: BLE001 -- the local file is the record; the copy is for another head
            print(f"warning: could not copy the sweep's state to {state['storage']} ({first_line(e)}); it is in {path}",
                  file=sys.stderr, flush=True)


def read_state(path: Path, storage: str | None, name: str) -> dict | None:
    """The sweep's state: with ``storage``, its copy there (the latest, whichever head wrote it), else
    the local file."""
    if storage:
        source, where = filesystem(mirror(storage, name))
        try:
            with source.open_input_stream(where) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            pass
    return json.loads(path.read_text()) if path.exists() else None


def store_problem(storage: str, create: bool = True) -> str | None:
    """Why ``storage`` (an object-store URI) cannot hold a sweep, in one line, or None: an unknown
    scheme, missing credentials or an unreachable endpoint fail here, before anything is written."""
    from pyarrow import fs

    if "://" not in storage or storage.startswith("file://"):
        return f"--storage {storage}: not an object-store URI (s3://bucket/prefix, gs://bucket/prefix); a local folder is --store"
    try:
        target, where = filesystem(storage)
        bucket = where.split("/", 1)[0]
        if target.get_file_info(bucket).type == fs.FileType.NotFound:
            return f"--storage {storage}: bucket {bucket} does not exist"
        if create:
            target.create_dir(where)
    except Exception as e:  # noqa: BLE001 -- unknown scheme, credentials, endpoint: pyarrow raises many kinds
        return f"--storage {storage}: {first_line(e)}"
    return None


def resume_command(source: str, flags: tuple[str, ...] = (), storage: str | None = None) -> str:
    """The command that continues a sweep: its file and the flags that named it and placed its store
    (``--smoke``, ``--profile``, ``--set``, ``--store``), as a shell reads them; ``storage``: its object store."""
    import shlex

    return shlex.join(["dlsweep", "run", source, "--resume", *flags, *(["--storage", storage] if storage else [])])


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested mapping as dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``); an empty mapping stays a value."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def default_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def probe(uri: str, timeout: float = 5.0) -> str | None:
    """Why the tracking store at ``uri`` cannot be used (one line), or None. Only HTTP servers are
    probed: a local sqlite store is created on first use."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status == 200:
                return None
            return f"tracking server {uri} answered /health with HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"tracking server {uri} answered /health with HTTP {e.code}"
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return f"tracking server {uri} does not answer ({reason}); start it, or drop --tracking-uri to log locally"
