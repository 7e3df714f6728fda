"""Every shipped cluster config is valid YAML with the fields Ray / KubeRay require; they run
the stock rayproject/ray image (raydrat comes from each job's runtime_env), start MLflow on a
PostgreSQL store with artifacts the nodes reach through the server, take every password from
a Secret or a file made on the machine, and hold no placeholder that is not marked as the
thing to set."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from raydrat.bench.loopback import free_port
from raydrat.bench.pgserver import SERVICE_USER, find_bin_dir

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
IMAGE = "rayproject/ray:2.60.0-py311-gpu"


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
    # the stock image; raydrat comes from each job's runtime_env, nothing installed or mounted for it
    assert cfg["docker"]["image"] == IMAGE and cfg["setup_commands"] == []
    assert not any("raydrat" in k for k in cfg["file_mounts"])
    assert any("--head" in c for c in cfg["head_start_ray_commands"])


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_launcher_head_runs_mlflow_on_postgresql_with_a_password_that_stays_on_the_head(name):
    cfg = yaml.safe_load((CLUSTER / name).read_text())
    head = cfg["head_setup_commands"]
    (mlflow,) = [c for c in head if "mlflow server" in c]
    assert "--backend-store-uri postgresql+psycopg://mlflow@127.0.0.1:5432/mlflow " in mlflow  # no password in it
    assert "PGPASSWORD=$(cat /home/ray/postgres-password) " in mlflow and "--artifacts-destination " in mlflow
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat /home/ray/mlflow-flask-key) " in mlflow  # basic-auth needs one
    assert "sqlite" not in mlflow
    made = [c for c in head if "secrets.token_urlsafe" in c]
    assert made and "/home/ray/postgres-password" in made[0] and "umask 077" in made[0]
    assert not any("postgres-password" in str(v) for v in cfg["file_mounts"].values())  # made there, not sent
    assert any("listen_addresses=127.0.0.1" in c for c in head) and any("psycopg" in c for c in head)


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
    assert spec["entrypoint"] == "python train.py cluster-gpt2-small.yaml"
    assert (REPO / "jobs" / "cluster-gpt2-small.yaml").is_file()  # inside the job folder's zip
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    shipped = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert env["pip"] == shipped["pip"]  # the same wheel as jobs/runtime_env.yaml installs
    assert env["working_dir"].startswith("https://") and env["working_dir"].endswith(".zip")
    assert "headGroupSpec" in spec["rayClusterSpec"] and spec["rayClusterSpec"]["workerGroupSpecs"]


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def _containers_of(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"]


def test_kuberay_mlflow_runs_on_postgresql_with_passwords_from_secrets():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _docs("kuberay-mlflow.yaml")}
    assert {("Deployment", "raydrat-postgres"), ("Service", "postgres"), ("Deployment", "mlflow"),
            ("Service", "mlflow")} <= set(docs)  # fmt: skip
    assert all(d["spec"]["type"] == "ClusterIP" for (kind, _), d in docs.items() if kind == "Service")
    assert not any(kind == "Secret" for kind, _ in docs)  # made with kubectl from generated passwords
    (pg,) = _containers_of(docs["Deployment", "raydrat-postgres"])
    (server,) = _containers_of(docs["Deployment", "mlflow"])
    assert _from_secret(pg["env"], "POSTGRES_PASSWORD") and _from_secret(server["env"], "PGPASSWORD")
    assert _from_secret(server["env"], "MLFLOW_ADMIN_PASSWORD")
    assert _from_secret(server["env"], "MLFLOW_FLASK_SERVER_SECRET_KEY")
    for c in (pg, server):
        assert not any("PASSWORD" in e["name"] and "value" in e for e in c["env"]), c["env"]
    command = " ".join(server["command"])
    assert "--backend-store-uri postgresql+psycopg://mlflow@postgres.default.svc:5432/mlflow" in command
    assert "--artifacts-destination /data/mlartifacts" in command and "--app-name basic-auth" in command
    # the Ray pods log to this server: the URI they are given is its Service's name and port
    port = docs["Service", "mlflow"]["spec"]["ports"][0]["port"]
    assert f"mlflow.default.svc:{port}" in command  # and the server accepts that Host header
    url = f"http://mlflow.default.svc:{port}"
    cluster = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())["spec"]
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        assert {"name": "MLFLOW_TRACKING_URI", "value": url} in _pod_env(group)
        assert all(c["image"] == IMAGE for c in group["template"]["spec"]["containers"])
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())["spec"]
    assert yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"] == url


def test_placeholders_are_marked_as_the_thing_to_set():
    """No `YOUR_ORG` left for the user to find: a value the user must give is marked on its line."""
    files = [*CLUSTER.glob("*"), REPO / "jobs" / "runtime_env.yaml", REPO / "jobs" / "cluster-gpt2-small.yaml"]
    for f in files:
        for line in f.read_text().splitlines():
            if any(m in line for m in ("YOUR", "SET-THIS", "<head private IP>")) and not line.lstrip().startswith("#"):
                assert "set this" in line.lower(), f"{f.name}: {line}"
    assert "YOUR_ORG" not in (CLUSTER / "kuberay-rayjob.yaml").read_text()


def test_the_cluster_config_is_gpt2_small_with_the_corpus_named_in_one_place(tmp_path):
    """jobs/cluster-gpt2-small.yaml extends the recipe (`base:`): the model, optimizer and
    schedule are gpt2-small's, the corpus is its one `data.sources` line (marked), two GPU
    workers; a `base:` chain merges section by section, and a loop is one error."""
    from raydrat.config import ConfigError, load_config

    cluster, recipe = load_config(str(REPO / "jobs" / "cluster-gpt2-small.yaml")), load_config("gpt2-small")
    assert cluster.model == recipe.model and cluster.optim == recipe.optim and cluster.name == "gpt2-small"
    assert cluster.train.steps == recipe.train.steps and cluster.train.storage_path != recipe.train.storage_path
    assert [s.path for s in cluster.data.sources] == ["demo"] and cluster.scaling.num_workers == 2
    (line,) = [ln for ln in (REPO / "jobs" / "cluster-gpt2-small.yaml").read_text().splitlines() if "- path:" in ln]
    assert "SET THIS" in line and "s3://" in line
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain: {steps: 7}\n")
    (tmp_path / "b.yaml").write_text("base: debug\ntrain: {batch_size: 3}\ndata: {sources: [{path: x}]}\n")
    a = load_config(str(tmp_path / "a.yaml"), ["train.eval_every=2"])
    assert (a.train.steps, a.train.batch_size, a.train.eval_every, a.model.d_model) == (7, 3, 2, 64)
    assert [s.path for s in a.data.sources] == ["x"]  # lists are replaced, not merged
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(str(tmp_path / "a.yaml"))


def test_dockerfile_installs_the_wheel_on_the_stock_image_and_says_it_is_not_built_here():
    text = (CLUSTER / "Dockerfile").read_text()
    instructions = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert instructions[0] == f"FROM {IMAGE}"
    assert any(ln.startswith("COPY jobs/dist/raydrat-${RAYDRAT_VERSION}-py3-none-any.whl") for ln in instructions)
    assert "Not built by this project's tests" in text and "python -m pip wheel --no-deps -w jobs/dist ." in text


def test_local_single_gpu_notes():
    text = (CLUSTER / "local-single-gpu.md").read_text()
    for needle in ("ray start --head", "ray job submit", "ray job logs -f", "mlflow", "ray stop"):
        assert needle in text
    # the `ray job` CLI needs RAY_AUTH_MODE=token against a head with token auth (docs/distributed.md)
    assert "export RAY_AUTH_MODE=token" in text and "--runtime-env jobs/runtime_env.yaml" in text
    assert "mlflow server --host 127.0.0.1 --port 5000 --workers 1" in text


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


# ------------------------------------------------------------------ the head's commands, run

RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"


@pytest.mark.slow  # PostgreSQL and an MLflow server start (a minute on a loaded machine)
def test_the_launcher_head_commands_start_mlflow_on_postgresql(tmp_path):
    """aws-gpu.yaml's head_setup_commands as written (but the package installs, which this
    machine has done: PostgreSQL's binaries, mlflow[auth], psycopg), with /home/ray a temp
    folder and free ports for 5432 and 5000: the password is made, PostgreSQL initialised and
    started, the database created, and `mlflow server` (basic auth) serves a run that lands
    in PostgreSQL's tables. Run twice, as `ray up` does on a restart: the second pass keeps
    the password and the data. PostgreSQL's commands run as the postgres user when the test
    runs as root (PostgreSQL refuses root; in the image they run as the ray user)."""
    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    commands = [c for c in cfg["head_setup_commands"] if not c.startswith(("sudo apt-get", "pip install"))]
    home = Path(tempfile.mkdtemp(prefix="raydrat-head-"))
    bindir = home / "bin"  # `python` for the password line; PostgreSQL's tools on the PATH as in the image
    bindir.mkdir()
    (bindir / "python").symlink_to(shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3")
    as_service = os.geteuid() == 0
    if as_service:
        account = pwd.getpwnam(SERVICE_USER)
        for p in (home, bindir):
            os.chown(p, account.pw_uid, account.pw_gid)
    pg_port, http_port = free_port(), free_port()
    password = "admin-" + os.urandom(6).hex()
    (home / "mlflow-auth.ini").write_text(  # as docs/distributed.md makes it
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{home}/mlflow-auth.db\n"
        f"admin_username = raydrat\nadmin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {**os.environ, "PGPORT": str(pg_port), "PATH": f"{bindir}:{find_bin_dir()}:/usr/bin:/bin"}

    def run(command: str, server: bool = False) -> subprocess.Popen | None:
        command = command.replace("/home/ray", str(home)).replace(":5000,", f":{http_port},")
        command = command.replace("/home/ray", str(home)).replace(":5432/", f":{pg_port}/")
        command = command.replace("/tmp/mlflow.log", f"{home}/mlflow.log").replace(
            "/tmp/postgres.log", f"{home}/pg.log"
        )
        if server:  # the MLflow server: as root here (the venv's python), backgrounded as written
            command = command.replace("--port 5000", f"--port {http_port}")
            path = f"{Path(sys.executable).parent}:{env['PATH']}"
            return subprocess.Popen(["bash", "-c", command], env={**env, "PATH": path}, start_new_session=True)
        cmd = [RUNUSER, "-u", SERVICE_USER, "--", "bash", "-c", command] if as_service else ["bash", "-c", command]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=home)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        return None

    server = None
    try:
        for _ in range(2):
            for c in commands:
                if "mlflow server" not in c:
                    run(c)
        made = (home / "postgres-password").read_text().strip()
        assert len(made) >= 24 and (home / "postgres-password").stat().st_mode & 0o077 == 0
        (server_cmd,) = [c for c in commands if "mlflow server" in c]
        server = run(server_cmd, server=True)
        host = subprocess.check_output(["hostname", "-I"], text=True).split()[0]
        url = f"http://{host}:{http_port}"
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = "raydrat", password
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=5).read()
                    break
                except OSError:
                    log = (home / "mlflow.log").read_text() if (home / "mlflow.log").exists() else ""
                    try:
                        os.killpg(server.pid, 0)  # its processes still there (the shell exited at once)
                    except ProcessLookupError:
                        pytest.fail(f"mlflow server on the head exited: {log[-3000:]}")
                    assert time.monotonic() < deadline, f"mlflow server on the head did not serve: {log[-3000:]}"
                    time.sleep(2)
            client = MlflowClient(tracking_uri=url)
            exp = client.create_experiment("head-check")
            run_id = client.create_run(exp, run_name="on-postgres").info.run_id
            client.log_metric(run_id, "val_loss", 1.5, step=3)
        finally:
            del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
        rows = subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-U",
                "mlflow",
                "-d",
                "mlflow",
                "-tAc",
                f"SELECT r.name, m.key, m.value, m.step FROM runs r JOIN metrics m ON m.run_uuid = r.run_uuid "
                f"WHERE r.run_uuid = '{run_id}'",
            ],  # fmt: skip
            env={**env, "PGPASSWORD": made},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert rows.stdout.strip() == "on-postgres|val_loss|1.5|3", rows.stderr
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
        pg_ctl = f"{find_bin_dir()}/pg_ctl -D {home}/pgdata -m fast -w stop"
        subprocess.run(
            [RUNUSER, "-u", SERVICE_USER, "--", "bash", "-c", pg_ctl] if as_service else ["bash", "-c", pg_ctl],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(home, ignore_errors=True)
