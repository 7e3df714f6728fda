"""Every shipped cluster config is valid YAML with the fields Ray / KubeRay require."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_cluster_launcher_configs(name):
    cfg = yaml.safe_load((CLUSTER / name).read_text())
    for key in (
        "cluster_name",
        "max_workers",
        "provider",
        "available_node_types",
        "head_node_type",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        assert key in cfg, f"{name}: missing {key}"
    assert cfg["provider"]["type"] in ("aws", "gcp") and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for tname, node in types.items():
        assert "node_config" in node and "resources" in node, tname
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert workers and all(t["max_workers"] >= t.get("min_workers", 0) for t in workers)
    assert any(
        "GPU" in str(t["node_config"]) or "g5" in str(t["node_config"]) or "nvidia" in str(t["node_config"])
        for t in workers
    )
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


# ------------------------------------------------------------------ exposure


DOCS = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"


def _commands(cfg: dict) -> list[str]:
    return [
        c
        for key in ("setup_commands", "head_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
        for c in cfg.get(key, [])
    ]


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_launcher_configs_expose_nothing_without_authentication(name):
    cfg = yaml.safe_load((CLUSTER / name).read_text())
    commands = _commands(cfg)
    assert not any("0.0.0.0" in c for c in commands), [c for c in commands if "0.0.0.0" in c]
    (mlflow,) = [c for c in commands if "mlflow server" in c]
    assert "--app-name basic-auth" in mlflow and "MLFLOW_AUTH_CONFIG_PATH=" in mlflow  # never the default admin
    assert "--artifacts-destination" in mlflow  # artifacts go through the server's login too
    starts = [c for c in commands if "ray start" in c]
    assert starts and all(c.startswith("RAY_AUTH_MODE=token ") for c in starts), starts
    assert all("--metrics-export-port=" in c for c in starts), starts
    (head,) = [c for c in starts if "--head" in c]
    assert "--dashboard-host=127.0.0.1" in head
    mounts = cfg["file_mounts"]
    assert {"/home/ray/.ray/auth_token", "/home/ray/.mlflow/credentials"} <= set(mounts)
    assert not any(k in str(cfg) for k in ("password1234", "AWS_SECRET_ACCESS_KEY=", "mlflow_tracking_password ="))


def _pod_env(doc_part) -> list[dict]:
    return [e for c in doc_part["template"]["spec"]["containers"] for e in c.get("env", [])]


def _from_secret(env: list[dict], name: str) -> bool:
    return any(e["name"] == name and "secretKeyRef" in e.get("valueFrom", {}) and "value" not in e for e in env)


def test_kuberay_configs_need_a_token_and_keep_credentials_in_secrets():
    cluster = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())["spec"]
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())["spec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"  # port-forward only
    for spec in (cluster, job.get("rayClusterSpec")):
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            env = _pod_env(group)
            assert {"name": "RAY_AUTH_MODE", "value": "token"} in env
            assert _from_secret(env, "RAY_AUTH_TOKEN")
            assert _from_secret(env, "MLFLOW_TRACKING_PASSWORD")
            assert "metrics-export-port" in group["rayStartParams"]
        if spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0":
            submitter = job["submitterPodTemplate"]["spec"]["containers"][0]["env"]
            assert _from_secret(submitter, "RAY_AUTH_TOKEN")
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert not any(k.endswith(("PASSWORD", "SECRET_ACCESS_KEY", "TOKEN")) for k in runtime_env.get("env_vars", {}))
    assert "@" not in runtime_env["env_vars"].get("MLFLOW_TRACKING_URI", "")


def test_docs_recommend_tunnels_or_auth_and_say_what_the_metrics_port_does():
    text = DOCS.read_text()
    for needle in (
        "## Exposure",
        "ray dashboard cluster/aws-gpu.yaml",
        "ssh -L 5000:",
        "kubectl port-forward",
        "--app-name basic-auth",
        "RAY_AUTH_MODE=token",
        "--metrics-export-port",
        "## Secrets",
        "runtime_env_agent.log",
    ):
        assert needle in text, needle
    # 0.0.0.0 only where the docs say why and what guards it
    for line in (ln for ln in text.splitlines() if "0.0.0.0" in ln):
        assert "auth" in line or "never" in line, line
    notes = (CLUSTER / "local-single-gpu.md").read_text()
    assert "--node-ip-address=127.0.0.1" in notes and "mlflow server --host 127.0.0.1" in notes
    assert "0.0.0.0" not in notes.replace("never by binding `0.0.0.0`", "")
