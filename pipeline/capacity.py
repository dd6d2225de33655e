"""What the cluster can ever provide, so an impossible request fails at once instead of waiting forever
on a placement group (an exit-2 error in the format of pipeline/errors.py).

    capacity, source = cluster_capacity()   # {"CPU": 324.0, "GPU": 16.0}, "the autoscaler's maximum (~/ray_bootstrap_config.yaml) is"

- A cluster with a known autoscaler configuration: its maximum. The configuration is
  $MTL_AUTOSCALER_CONFIG, else `~/ray_bootstrap_config.yaml` (where `ray up` puts it on the head node).
  Both the cluster launcher's YAML (`available_node_types`, `max_workers`) and a KubeRay RayCluster
  manifest (`workerGroupSpecs[].maxReplicas`) are read.
- An autoscaling cluster whose configuration is not available here: (None, reason) — no check.
- A fixed cluster: the total of its nodes' resources (`ray.cluster_resources()`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

BOOTSTRAP = Path("~/ray_bootstrap_config.yaml")


def _quantity(value) -> float:
    """A Kubernetes quantity ("8", "500m", 4) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _launcher_capacity(config: dict) -> dict[str, float] | None:
    """Per resource, the most the node types can add up to: the head once, each worker type up to its
    max_workers, all worker nodes together up to the global max_workers (largest nodes first)."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    if any("resources" not in t for t in types.values()):
        return None  # resources auto-detected from the instance type: not knowable from the file
    total: dict[str, float] = {}
    names = {r for t in types.values() for r in t["resources"]}
    for resource in names:
        amount = float(types.get(head, {}).get("resources", {}).get(resource, 0))
        left = int(config.get("max_workers", 1 << 30))
        for name, spec in sorted(types.items(), key=lambda kv: -float(kv[1]["resources"].get(resource, 0))):
            count = min(int(spec.get("max_workers", 0)), left)
            amount += count * float(spec["resources"].get(resource, 0))
            left -= count
        total[resource] = amount
    return total


def _kuberay_capacity(manifest: dict) -> dict[str, float]:
    spec = manifest.get("spec", {}).get("rayClusterSpec", manifest.get("spec", {}))  # RayJob embeds the cluster

    def group(g: dict, replicas: int) -> dict[str, float]:
        params = g.get("rayStartParams", {}) or {}
        limits = (g["template"]["spec"]["containers"][0].get("resources", {}) or {}).get("limits", {}) or {}
        cpu = _quantity(params.get("num-cpus", limits.get("cpu", 0)))
        gpu = _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        return {"CPU": replicas * cpu, "GPU": replicas * gpu}

    total = group(spec["headGroupSpec"], 1)
    for g in spec.get("workerGroupSpecs", []):
        for k, v in group(g, int(g.get("maxReplicas", g.get("replicas", 0)))).items():
            total[k] += v
    return total


def autoscaler_config_path() -> Path | None:
    configured = os.environ.get("MTL_AUTOSCALER_CONFIG")
    if configured:
        return Path(configured).expanduser()
    return BOOTSTRAP.expanduser() if BOOTSTRAP.expanduser().is_file() else None


def autoscaler_capacity(path: Path) -> dict[str, float] | None:
    from pipeline.errors import PipelineError
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise PipelineError.one("MTL_AUTOSCALER_CONFIG", f"cannot read {path} ({type(err).__name__})",
                                "point it at the cluster launcher YAML or the RayCluster manifest, or unset it")
    if isinstance(config, dict) and re.fullmatch(r"Ray(Cluster|Job)", str(config.get("kind", ""))):
        return _kuberay_capacity(config)
    if isinstance(config, dict) and "available_node_types" in config:
        return _launcher_capacity(config)
    raise PipelineError.one("MTL_AUTOSCALER_CONFIG", f"{path} is neither a cluster launcher YAML nor a RayCluster/RayJob",
                            "point it at the cluster's configuration, or unset it")


def autoscaler_running() -> bool:
    """True when an autoscaler (v1 or v2) reports to this cluster's GCS."""
    import json

    import ray
    from ray.experimental.internal_kv import _internal_kv_get
    status = _internal_kv_get(b"__autoscaling_status")  # autoscaler v1's status record
    if status:
        # Without a launcher (ray.init, `ray start`) the monitor runs a read-only provider that names
        # each node's type after the node itself; a real autoscaler uses its configuration's type names.
        mapping = (json.loads(status).get("autoscaler_report") or {}).get("node_type_mapping") or {}
        if any(kind != f"node_{node}" for node, kind in mapping.items()):
            return True
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status
        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        return bool(status.pending_launches or status.pending_nodes or status.failed_launches
                    or str(getattr(status.stats, "autoscaler_version", "0") or "0") not in ("0", "None"))
    except Exception:  # an older GCS or no v2 state: no evidence of an autoscaler
        return False


def cluster_capacity() -> tuple[dict[str, float] | None, str]:
    """(the most this cluster can ever provide per resource, where that number comes from); (None, why)
    when it cannot be known."""
    import ray
    path = autoscaler_config_path()
    if path is not None:
        capacity = autoscaler_capacity(path)
        if capacity is None:
            return None, f"{path} lets the launcher detect node resources"
        return capacity, f"the autoscaler's maximum ({path}) is"
    if autoscaler_running():
        return None, "an autoscaler is running and its configuration is unknown here (set MTL_AUTOSCALER_CONFIG)"
    return {k: float(v) for k, v in ray.cluster_resources().items()}, "the cluster has"
