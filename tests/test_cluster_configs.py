"""The shipped cluster configs: the launcher YAML against Ray's own schema, the KubeRay manifests and the
MLflow server manifest by structure, and the GPU counts they state against the config they run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def _load(path: Path):
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0] if len(docs) == 1 else docs


def _gpus(container: dict) -> int:
    limits = container.get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def _entry_config(entrypoint: str):
    """The training config a job entrypoint runs, with its key=value overrides applied."""
    from pipeline.config import load_config
    words = entrypoint.split()
    config = words[words.index("--config") + 1]
    overrides = [w for w in words if "=" in w and not w.startswith("-")]
    return load_config(ROOT / config, overrides)


def test_launcher_yaml_validates_against_rays_schema():
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    config = _load(CLUSTER / "aws.yaml")
    validate_config(config)  # the schema shipped inside the ray package (ray/autoscaler/ray-schema.json)
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu"]["max_worker"] = 4  # a typo the schema must reject
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)

    gpu = config["available_node_types"]["gpu"]
    assert gpu["resources"]["GPU"] == 4 and gpu["node_config"]["InstanceType"] == "g5.12xlarge"
    cfg = _entry_config("python jobs/train.py --config jobs/configs/cluster_gpu.yaml")
    assert cfg.train.use_gpu and cfg.train.num_workers <= gpu["max_workers"] * gpu["resources"]["GPU"]
    assert cfg.train.num_workers * cfg.train.cpus_per_worker <= gpu["max_workers"] * gpu["resources"]["CPU"]
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert "MLFLOW_TRACKING_URI" in " ".join(config["worker_start_ray_commands"])


def _check_ray_cluster_spec(spec: dict, where: str) -> tuple[int, int]:
    """Structural checks of a RayClusterSpec; returns (GPUs at the declared replicas, GPUs at max)."""
    assert spec["rayVersion"] == "2.60.0", where
    assert spec["authOptions"]["mode"] == "token", f"{where}: Ray token auth must stay on"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), f"{where}: rayStartParams are strings"
    (head_container,) = head["template"]["spec"]["containers"]
    assert {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265}
    env = {e["name"] for e in head_container["env"]}
    assert "MLFLOW_TRACKING_URI" in env, f"{where}: jobs must find the tracking server"
    gpus_now = gpus_max = 0
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker groups"
    for group in groups:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        containers = group["template"]["spec"]["containers"]
        for c in containers:
            assert c["image"] == head_container["image"], f"{where}: one image for every pod"
            requests, limits = c["resources"]["requests"], c["resources"]["limits"]
            assert requests.get("nvidia.com/gpu") == limits.get("nvidia.com/gpu")
            assert "cpu" in limits and "memory" in limits
        gpus = sum(_gpus(c) for c in containers)
        gpus_now += gpus * group["replicas"]
        gpus_max += gpus * group["maxReplicas"]
    return gpus_now, gpus_max


def test_kuberay_raycluster_manifest():
    doc = _load(CLUSTER / "kuberay" / "raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    gpus_now, gpus_max = _check_ray_cluster_spec(spec, "raycluster.yaml")
    cfg = _entry_config("python jobs/train.py --config jobs/configs/cluster_gpu.yaml")
    assert gpus_now == cfg.train.num_workers == 8, "the manifest states 8 GPUs for cluster_gpu.yaml"
    assert gpus_max >= gpus_now
    assert "8 GPUs" in (CLUSTER / "kuberay" / "raycluster.yaml").read_text()


def test_kuberay_rayjob_manifest_runs_the_project_runtime_env():
    doc = _load(CLUSTER / "kuberay" / "rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    cfg = _entry_config(spec["entrypoint"])
    assert cfg.train.storage_path.startswith("s3://"), "multi-node runs need shared storage"
    gpus_now, _ = _check_ray_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
    assert cfg.train.use_gpu and gpus_now == cfg.train.num_workers
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    project = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    own = runtime_env["env_vars"].pop("MTL_AUTOSCALER_CONFIG")  # the RayJob knows its own maximum
    assert runtime_env["excludes"] == project["excludes"] and runtime_env["env_vars"] == project["env_vars"]
    assert (ROOT / own).resolve() == (CLUSTER / "kuberay" / "rayjob.yaml").resolve()
    assert runtime_env["working_dir"] == "/home/ray/mtl-pipeline"
    assert "WORKDIR /home/ray/mtl-pipeline" in (CLUSTER / "Dockerfile").read_text()
    assert spec["shutdownAfterJobFinishes"] is True


def test_mlflow_server_manifest():
    docs = _load(CLUSTER / "kuberay" / "mlflow.yaml")
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    (deployment,) = by_kind["Deployment"]
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    assert deployment["apiVersion"] == "apps/v1" and set(services) == {"mlflow", "mlflow-db"}
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = dict(a.split("=", 1) for a in container["args"] if "=" in a)
    env = {e["name"]: e for e in container["env"]}
    assert args["--backend-store-uri"] == "$(MLFLOW_BACKEND_STORE_URI)"
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://")  # a database, not sqlite
    assert args["--artifacts-destination"].startswith("s3://") and "--serve-artifacts" in container["args"]
    assert "password" not in json.dumps(env["MLFLOW_BACKEND_STORE_URI"]).replace("$(DB_PASSWORD)", "")
    service = services["mlflow"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == int(args["--port"])
    # the Ray pods' tracking URI names this Service
    ray_env = {e["name"]: e.get("value") for e in
               _load(CLUSTER / "kuberay" / "raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert ray_env["MLFLOW_TRACKING_URI"].startswith("http://mlflow.")


def test_runtime_env_excludes_what_must_not_be_uploaded():
    """Ray's own packaging walk of the working dir with these excludes (.gitignore not consulted) uploads
    the code and leaves out the venv, git, MLflow stores, caches and results."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes  # what `ray job submit` runs

    excludes = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["excludes"]
    uploaded: list[str] = []
    _dir_travel(ROOT, [_get_excludes(ROOT, excludes)], lambda p: uploaded.append(str(p.relative_to(ROOT))),
                include_gitignore=False)
    files = set(uploaded)
    assert {"jobs/train.py", "pipeline/config.py", "jobs/configs/default.yaml", "cluster/runtime_env.yaml"} <= files
    for top in (".venv", ".git"):
        if (ROOT / top).is_dir():  # both exist in a checkout with `make setup` run
            assert not [f for f in files if f.startswith(top + "/")], f"{top}/ would be uploaded"
    matches = _get_excludes(ROOT, excludes)
    for path in ["mlflow.db", "mlruns/1/meta.yaml", "mlartifacts/1/x", "pipeline/__pycache__/x.pyc",
                 "checkpoints/step_1/x", "mtl_pipeline.egg-info/PKG-INFO", "eval_results/results.md",
                 ".cache/mtl-pipeline/data/x"]:
        parts = Path(path).parts
        assert any(matches(ROOT.joinpath(*parts[:i + 1])) for i in range(len(parts))), f"{path} would be uploaded"
