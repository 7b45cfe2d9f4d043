"""The pretrain cache: one folder per finished pretraining stage, verified before every reuse.

A stage's folder is ``<cache>/<key>/`` (the checkpoint files, ``job.json`` and ``manifest.json``).
The manifest holds the sha256 and size of every file, the job and the final metrics; it is written
last, so a folder with a manifest is whole: locally inside a temporary folder renamed into place, in
an object store (``s3://``, ``gs://``, any URI pyarrow opens) as the last object uploaded. A missing
manifest, a missing or changed file, or a non-finite final loss makes the entry invalid.

``<cache>`` is a local folder or an object-store URI. Trials read an entry through ``fetch``: a
local folder as it is; an object-store entry copied once per node into a node-local folder (under
``$DLSWEEP_NODE_CACHE``, default ``~/.cache/dlsweep/nodes``), under a file lock so that the trials
of one node download it once, and verified against its manifest there.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"


def is_uri(where: str | Path) -> bool:
    return "://" in str(where) and not str(where).startswith("file://")


def join(root: str | Path, *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *parts]) if is_uri(root) else str(Path(root, *parts))


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for an object-store URI. Credentials come from the usual
    environment (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...); an S3-compatible store that
    is not AWS (MinIO, Ceph, moto) from AWS_ENDPOINT_URL, as for the AWS CLI and boto3 (pyarrow reads
    it from the URI only: ``?endpoint_override=host:port&scheme=http``)."""
    from urllib.parse import urlparse

    from pyarrow import fs

    u = urlparse(uri)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if u.scheme == "s3" and endpoint and "endpoint_override" not in u.query:
        e = urlparse(endpoint)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return fs.S3FileSystem(endpoint_override=e.netloc or e.path, scheme=e.scheme or "https", region=region), \
            f"{u.netloc}{u.path}".rstrip("/")
    return fs.FileSystem.from_uri(uri)



def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def write(cache: str | Path, key: str, checkpoint: Path, job: dict, metrics: dict) -> str:
    """Copy a finished stage's checkpoint into the cache under ``key``, the manifest last."""
    final_loss = metrics.get("test_loss")
    if final_loss is None or not math.isfinite(final_loss):
        raise ValueError(f"stage {key} has no finite final test loss ({final_loss}); not caching it")
    local = not is_uri(cache)
    staging = Path(cache) if local else Path(tempfile.mkdtemp(prefix="dlsweep-cache-"))
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint, tmp)
    (tmp / "job.json").write_text(json.dumps(job, indent=1))
    files = _files(tmp)
    manifest = {"key": key, "files": files, "sizes": {n: (tmp / n).stat().st_size for n in files},
                "job": job, "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if local:
        dest = Path(cache) / key
        if dest.exists():
            shutil.rmtree(dest)
        tmp.replace(dest)
        return str(dest)
    try:
        fs, root = filesystem(join(cache, key))
        fs.delete_dir_contents(root, missing_dir_ok=True)
        fs.create_dir(root)
        for name in [*manifest["files"], MANIFEST]:  # the manifest last: an entry with one is whole
            with open(tmp / name, "rb") as src, fs.open_output_stream(f"{root}/{name}") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return join(cache, key)


def _manifest(cache: str | Path, key: str) -> dict | None:
    try:
        if is_uri(cache):
            fs, path = filesystem(join(cache, key, MANIFEST))
            with fs.open_input_stream(path) as f:
                return json.loads(f.read())
        return json.loads((Path(cache) / key / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _exists(cache: str | Path, key: str) -> bool:
    if not is_uri(cache):
        return (Path(cache) / key).exists()
    from pyarrow import fs as pafs

    fs, path = filesystem(join(cache, key))
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def problem(cache: str | Path, key: str) -> str | None:
    """Why the cache entry ``key`` cannot be used ('missing' if there is none), or None if it is whole.
    A local entry's files are checked against their sha256; an object-store entry's against their
    sizes (its sha256 are checked where it is fetched, before any trial reads it)."""
    if not _exists(cache, key):
        return "missing"
    manifest = _manifest(cache, key)
    if manifest is None:
        return "no readable manifest"
    loss = manifest.get("metrics", {}).get("test_loss")
    if loss is None or not math.isfinite(loss):
        return f"final test loss {loss} is not finite"
    if is_uri(cache):
        from pyarrow import fs as pafs

        fs, root = filesystem(join(cache, key))
        infos = {i.path[len(root):].lstrip("/"): i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))}
        for name, size in manifest.get("sizes", {}).items():
            info = infos.get(name)
            if info is None or info.type == pafs.FileType.NotFound:
                return f"{name} is missing"
            if info.size != size:
                return f"{name} is {info.size} bytes, not the {size} of the manifest"
        return None
    return _verify(Path(cache) / key, manifest)


def _verify(folder: Path, manifest: dict) -> str | None:
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256(path) != digest:
            return f"{name} does not match its sha256 in the manifest"
    return None


def node_cache(cache: str) -> Path:
    """This node's copy of an object-store cache: one folder per cache URI."""
    base = Path(os.environ.get("DLSWEEP_NODE_CACHE") or Path.home() / ".cache" / "dlsweep" / "nodes")
    return base / hashlib.sha256(cache.rstrip("/").encode()).hexdigest()[:16]


def fetch(cache: str | Path, key: str) -> Path:
    """A local folder holding the whole, verified entry ``key``: the entry itself for a local cache;
    for an object store, this node's copy, downloaded by the first trial of the node that needs it
    (the others wait on a file lock, then read the same copy)."""
    if not is_uri(cache):
        return Path(cache) / key
    cache = str(cache)
    here = node_cache(cache)
    here.mkdir(parents=True, exist_ok=True)
    with open(here / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = _manifest(cache, key)
        if manifest is None:
            raise FileNotFoundError(f"no cache entry {key} under {cache}")
        folder = here / key
        if folder.exists():
            mine = _manifest(here, key)
            if mine == manifest and _verify(folder, manifest) is None:
                return folder
            shutil.rmtree(folder)
        tmp = here / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        fs, root = filesystem(join(cache, key))
        for name in [*manifest["files"], MANIFEST]:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f"{root}/{name}") as src, open(tmp / name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        why = _verify(tmp, manifest)
        if why:  # damaged in the store: removed, so that a resume pretrains the stage again
            shutil.rmtree(tmp, ignore_errors=True)
            remove(cache, key)
            raise OSError(f"cache entry {key} under {cache}: {why}; removed it")
        tmp.replace(folder)
        return folder


def labels_total(folder: Path) -> int:
    """Labels a cached stage read, its own stages' included (0 for entries written before they were counted)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    return int(manifest.get("metrics", {}).get("labels_total", 0))


def remove(cache: str | Path, key: str) -> None:
    if is_uri(cache):
        fs, path = filesystem(join(cache, key))
        fs.delete_dir_contents(path, missing_dir_ok=True)
        try:
            fs.delete_dir(path)
        except OSError:
            pass
        return
    shutil.rmtree(Path(cache) / key, ignore_errors=True)
