"""docs/cluster.md works as written: its YAML files are the ones shipped and pass Ray's cluster
schema (the `ray up` file) or have KubeRay's shape; its `dlsweep` lines parse and check as the
README's do; its `mlflow server` line starts a server that stores artifacts in S3 and serves them.
`ray up`, `ray attach`, `ray dashboard` and `kubectl` need a cloud account or a Kubernetes cluster
and are not run; tests/test_cluster.py runs the arrangement itself on one machine."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dlcore import cache
from dlcore.cli import app
from test_cluster import s3  # noqa: F401 -- the S3 endpoint fixture
from test_outcomes import free_port

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "cluster.md").read_text()
LINES = [line.split("  #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", DOC, re.S)
         for line in block.splitlines() if line.strip()]
NOT_HERE = ("ray ", "kubectl ", "export ")  # a cloud account, a Kubernetes cluster; an environment setting


def test_every_line_of_the_guide_is_run_here_or_named_as_not_runnable():
    runnable = [line for line in LINES if line.startswith(("dlsweep ", "mlflow "))]
    assert len(runnable) + sum(line.startswith(NOT_HERE) for line in LINES) == len(LINES)
    assert sum(line.startswith("dlsweep run") for line in runnable) >= 3 and any("--storage s3://" in line for line in runnable)


def test_the_yaml_in_the_guide_is_the_shipped_files():
    blocks = re.findall(r"```yaml\n(.*?)```", DOC, re.S)
    assert blocks == [(ROOT / "docs" / "cluster" / name).read_text() for name in ("ray-up.yaml", "raycluster.yaml")]


def test_the_ray_up_config_passes_rays_own_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "docs" / "cluster" / "ray-up.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}  # the head only drives
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config, "workers": 4}, schema)  # the schema does catch a wrong key


def test_the_kuberay_manifest_has_a_head_and_a_gpu_group():
    manifest = yaml.safe_load((ROOT / "docs" / "cluster" / "raycluster.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    head = manifest["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (group,) = manifest["spec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


@pytest.mark.parametrize("line", [line for line in LINES if line.startswith("dlsweep ")])
def test_guide_dlsweep_line_works_as_written(line, data_dir, monkeypatch, s3):  # noqa: F811
    monkeypatch.setenv("DLSWEEP_DATA_DIR", data_dir)
    monkeypatch.chdir(ROOT)
    args = [a.replace("s3://team-dlsweep", s3) for a in shlex.split(line)[1:]]  # the bucket: moto's, here
    if args[0] == "run":  # a dry run checks the file and the data as the real run would
        args = [a for a in args if a != "--resume"] + ([] if "--dry-run" in args else ["--dry-run", "--no-estimate"])
    else:  # a report of a sweep on a server that is not here
        args += ["--help"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{line}\n{result.output}"


@pytest.mark.slow
def test_the_guides_mlflow_server_stores_artifacts_in_the_bucket_and_serves_them(s3, tmp_path):  # noqa: F811
    from mlflow.tracking import MlflowClient
    from pyarrow import fs

    (line,) = [line for line in LINES if line.startswith("mlflow server")]
    port = free_port()
    here = (line.replace("postgresql://mlflow@db.internal/mlflow", f"sqlite:///{tmp_path / 'team.db'}")
            .replace("s3://team-mlflow/", f"{s3}/team-mlflow/").replace("10.0.0.5", "127.0.0.1")
            .replace("--port 5000", f"--port {port}").replace("--workers 4", "--workers 1"))
    assert here.count("127.0.0.1") == 1 and "sqlite" in here
    proc = subprocess.Popen([sys.executable, "-m", *shlex.split(here)], cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = MlflowClient(f"http://127.0.0.1:{port}")
        for _ in range(90):
            try:
                exp = client.create_experiment("team")
                break
            except Exception:
                time.sleep(1)
        else:
            raise AssertionError("the guide's mlflow server did not start")
        run = client.create_run(exp)
        (tmp_path / "note.txt").write_text("through the server")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        got = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "back"))
        assert Path(got).read_text() == "through the server"
        store, root = cache.filesystem(f"{s3}/team-mlflow/artifacts")
        stored = [i.path for i in store.get_file_info(fs.FileSelector(root, recursive=True))]
        assert any(p.endswith("/note.txt") for p in stored)  # in the bucket, not on the server's disk
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
