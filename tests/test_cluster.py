"""Every shipped cluster config is valid YAML with the fields Ray / KubeRay require."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_cluster_launcher_configs(name):
    cfg = yaml.safe_load((CLUSTER / name).read_text())
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, f"{name}: missing {key}"
    assert cfg["provider"]["type"] in ("aws", "gcp") and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for tname, node in types.items():
        assert "node_config" in node and "resources" in node, tname
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert workers and all(t["max_workers"] >= t.get("min_workers", 0) for t in workers)
    assert any("GPU" in str(t["node_config"]) or "g5" in str(t["node_config"]) or
               "nvidia" in str(t["node_config"]) for t in workers)
    assert any("pip install" in c and "raydrat" in c for c in cfg["setup_commands"])
    assert any("--head" in c for c in cfg["head_start_ray_commands"])


def _containers(template):
    return template["spec"]["containers"]


def test_kuberay_raycluster():
    doc = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    spec = doc["spec"]
    assert _containers(spec["headGroupSpec"]["template"])[0]["image"]
    group = spec["workerGroupSpecs"][0]
    assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert _containers(group["template"])[0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_kuberay_rayjob():
    doc = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("python jobs/train.py")
    yaml.safe_load(spec["runtimeEnvYAML"])
    assert "headGroupSpec" in spec["rayClusterSpec"] and spec["rayClusterSpec"]["workerGroupSpecs"]


def test_local_single_gpu_notes():
    text = (CLUSTER / "local-single-gpu.md").read_text()
    for needle in ("ray start --head", "ray job submit", "ray job logs -f", "mlflow", "ray stop"):
        assert needle in text
