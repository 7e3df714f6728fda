"""Ray Jobs, as a user submits them: the shipped ``jobs/runtime_env.yaml`` installs raydrat
from the wheel built out of the checkout, through Ray's pip runtime env, on a head whose
Python has every dependency but not raydrat.

The head is started for these tests only (loopback, its own temp dir and ports) with a
Python that sees the test environment's packages except raydrat's (``envs.bare_python``):
so the job runs raydrat only if Ray's pip runtime env installed it. Offline: every dependency is
already there, so pip reads nothing but the wheel. The head is stopped by ending the
processes of that Ray session only (never `ray stop`, which would stop every Ray instance on
the machine)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from envs import bare_python

from raydrat import __version__
from raydrat.bench.loopback import free_port
from raydrat.config import ConfigError
from raydrat.job_submit import BUILD_COMMAND, check_wheel, main, pinned_runtime_env, wheel_name

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
SHIPPED = ("pyproject.toml", "README.md", "raydrat", "jobs")
"""What a checkout needs to build the wheel and submit: copied for each test, so nothing is
written into the repository."""


def checkout_copy(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "dist"))
        else:
            shutil.copy(src, dest / name)
    return dest


def build_wheel(checkout: Path) -> Path:
    """The documented build (``python -m pip wheel --no-deps -w jobs/dist .``), offline:
    without build isolation (setuptools is here) and without an index."""
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    subprocess.run([*cmd, "-w", "jobs/dist", "."], cwd=checkout, check=True, capture_output=True, timeout=300)
    return checkout / "jobs" / "dist" / wheel_name()


# ------------------------------------------------------------------ the shipped runtime env (fast)


def test_runtime_env_installs_the_versioned_wheel_from_the_working_dir():
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "jobs"
    assert env["pip"]["packages"] == [f"${{RAY_RUNTIME_ENV_CREATE_WORKING_DIR}}/dist/{wheel_name(__version__)}"]
    assert not any(k.endswith(("PASSWORD", "SECRET_ACCESS_KEY", "TOKEN")) for k in env.get("env_vars", {}))
    assert "/jobs/dist/" in (REPO / ".gitignore").read_text().split()  # built, never committed


def test_upload_carries_the_entrypoints_and_the_wheel_not_the_sources(tmp_path):
    """Ray's own working-dir packaging (what `ray job submit` runs) of the shipped runtime
    env: the entrypoints and the wheel go, and no copy of the package beside the wheel
    (the repository's .gitignore, which drops /jobs/dist/ from git, is not read: it lies
    above the working dir)."""
    import zipfile

    from ray._private.runtime_env.packaging import _zip_files

    checkout = checkout_copy(tmp_path / "checkout")
    shutil.copy(REPO / ".gitignore", checkout / ".gitignore")
    build_wheel(checkout)
    env = yaml.safe_load((checkout / "jobs" / "runtime_env.yaml").read_text())
    out = tmp_path / "pkg.zip"
    _zip_files(str(checkout / env["working_dir"]), env.get("excludes", []), str(out), include_gitignore=True)
    names = set(zipfile.ZipFile(out).namelist())
    assert {"train.py", "tune.py", "prepare.py", f"dist/{wheel_name()}"} <= names
    assert not any(n.startswith("raydrat/") for n in names)


def test_job_submit_refuses_a_missing_or_stale_wheel_naming_the_build_command(tmp_path, monkeypatch, capsys):
    from raydrat.cli import main as cli

    checkout = checkout_copy(tmp_path / "checkout")
    monkeypatch.chdir(checkout)
    assert cli(["job", "submit", "--", "python", "train.py", "debug"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"raydrat: error: jobs/runtime_env.yaml installs jobs/dist/{wheel_name()}, which is missing: "
        f"build it with `{BUILD_COMMAND}`"
    ]
    wheel = build_wheel(checkout)
    assert check_wheel(checkout) == wheel
    (checkout / "raydrat" / "recipes" / "debug.yaml").write_text("name: changed\n")
    with pytest.raises(ConfigError, match=r"does not hold the checkout's code .*raydrat/recipes/debug.yaml.*rebuild"):
        check_wheel(checkout)
    with pytest.raises(ConfigError, match="sets --runtime-env, --runtime-env-json, --working-dir itself"):
        main(["--working-dir", ".", "--", "python", "train.py"], checkout)


def test_the_pinned_requirement_is_what_pip_installs_and_verifies(tmp_path):
    """The helper's requirement (``raydrat @ file://${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/...
    #sha256=...``), written into a requirements file as Ray's pip runtime env writes it and
    read by pip as Ray runs it: the variable expanded, the file found, the digest checked."""
    checkout = checkout_copy(tmp_path / "checkout")
    build_wheel(checkout)
    env = pinned_runtime_env(checkout)
    (requirement,) = env["pip"]["packages"]
    assert env["working_dir"] == str(checkout / "jobs")
    for req, ok in ((requirement, True), (requirement[:-6] + "000000", False)):
        (tmp_path / "requirements.txt").write_text(req + "\n")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--no-deps",
                "--no-index",
                "--ignore-installed",
                "-r",
                str(tmp_path / "requirements.txt"),
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "RAY_RUNTIME_ENV_CREATE_WORKING_DIR": env["working_dir"]},
        )
        if ok:
            assert proc.returncode == 0 and f"Would install raydrat-{__version__}" in proc.stdout, proc.stderr
        else:
            assert proc.returncode != 0 and "THESE PACKAGES DO NOT MATCH THE HASHES" in proc.stderr


# ------------------------------------------------------------------ a real head (slow)


def _session_pids(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            pids.append(int(d.name))
    return pids


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PYTHONPATH")}
    # A private loopback head for this test only: no token authentication, so the job
    # client needs no token file shared with other Ray instances on this machine.
    env["RAY_AUTH_MODE"] = "disabled"
    # Inherited by the job's processes: a loopback head is never preempted, so Ray Train's
    # preemption watcher (one more actor process to start on 2 cores) is not needed.
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return env


@contextlib.contextmanager
def private_cluster(py: Path, cwd: Path, extra_nodes: int = 0):
    """A head on loopback with the job server (its own temp dir and ports), and
    ``extra_nodes`` more nodes on this machine joined to it; yields the dashboard's URL, the
    GCS address and the temp dir; ends every process of that Ray session after."""
    temp_dir = tempfile.mkdtemp(prefix="rdj", dir="/tmp")  # short: Ray's socket paths are limited
    ray_start = [str(py), "-m", "ray.scripts.scripts", "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]

    taken: set[int] = set()  # every port given out, each node's worker range whole: Ray refuses overlaps

    def port() -> int:
        while (p := free_port()) in taken:
            pass
        taken.add(p)
        return p

    def worker_ports() -> int:
        """The first of 101 ports for the node's workers, none of them given out before."""
        while True:
            first = free_port()
            workers = set(range(first, first + 101))
            if not taken & workers:
                taken.update(workers)
                return first

    def node_ports() -> list[str]:
        min_w = worker_ports()
        nm, om, agent, agent_grpc, metrics = (port() for _ in range(5))
        return [f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
                f"--min-worker-port={min_w}", f"--max-worker-port={min_w + 100}"]  # fmt: skip

    gcs, dash = port(), port()
    head = [*ray_start, "--head", f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
            "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp_dir}", *node_ports()]  # fmt: skip
    try:
        proc = subprocess.run(head, capture_output=True, text=True, env=_env(), timeout=300, cwd=cwd)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for _ in range(extra_nodes):
            node = [*ray_start, f"--address=127.0.0.1:{gcs}", "--num-cpus=2", *node_ports()]
            proc = subprocess.run(node, capture_output=True, text=True, env=_env(), timeout=300, cwd=cwd)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        yield f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", Path(temp_dir)
    finally:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 0)):
            for pid in _session_pids(temp_dir):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while time.time() < deadline and _session_pids(temp_dir):
                time.sleep(0.5)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head on loopback with the job server, started by a Python without raydrat."""
    root = tmp_path_factory.mktemp("bare")  # the head's working directory too: no raydrat folder there
    py = bare_python(root)
    missing = subprocess.run([str(py), "-c", "import raydrat"], capture_output=True, text=True, env=_env(), cwd=root)
    assert missing.returncode != 0 and "No module named 'raydrat'" in missing.stderr  # the premise
    with private_cluster(py, root) as (address, _, temp_dir):
        yield address, temp_dir


def _run(cmd: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=cwd)
    for line in (proc.stdout + proc.stderr).splitlines():
        print(f"  | {line}")  # the console of the test (pytest -s shows it)
    return proc


def _pip_envs(temp_dir: Path) -> list[Path]:
    return sorted(temp_dir.glob("session_latest/runtime_resources/pip/*/virtualenv"))


@pytest.mark.slow
def test_job_submit_installs_raydrat_from_the_wheel_trains_debug_and_records_mlflow(ray_head, demo_dir, tmp_path):
    """The documented lines, as they are: build the wheel, `ray job submit --runtime-env
    jobs/runtime_env.yaml --no-wait -- python train.py debug ...`, `ray job logs -f`; the
    job's raydrat is the wheel, installed by Ray's pip runtime env into a virtualenv of its
    own; the run finished in MLflow with its val_loss history."""
    address, temp_dir = ray_head
    checkout = checkout_copy(tmp_path / "checkout")
    build_wheel(checkout)
    db = tmp_path / "mlruns.db"
    job_id = f"raydrat-test-{uuid.uuid4().hex[:8]}"
    sets = {
        "data.sources": f"[{{path: {demo_dir / 'corpus' / 'part-00000.parquet'}}}]",
        "data.tokenizer_path": demo_dir / "tokenizer-512.json",
        "train.storage_path": tmp_path / "rr",
        "train.steps": 4,
        "train.eval_every": 2,
        "train.eval_batches": 1,
        "optim.warmup_steps": 1,
        "tracking.tracking_uri": f"sqlite:///{db}",
        "tracking.run_name": "from-a-job",
    }
    entry = ["python", "train.py", "debug", *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]
    submit = [RAY, "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
              "--runtime-env", "jobs/runtime_env.yaml", "--", *entry]  # fmt: skip
    print(f"$ {' '.join(submit[: submit.index('--')])} -- python train.py debug --set ...")
    proc = _run(submit, checkout, 600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    print(f"$ ray job logs -f {job_id}")
    try:
        logs = _run([RAY, "job", "logs", "-f", job_id, "--address", address], checkout, 900)
    except subprocess.TimeoutExpired:
        _stop_job(address, job_id)
        raise
    out = logs.stdout + logs.stderr

    from ray.job_submission import JobStatus, JobSubmissionClient

    status = JobSubmissionClient(address).get_job_status(job_id)
    assert status == JobStatus.SUCCEEDED, out[-6000:]
    assert "final validation loss:" in out
    # raydrat came from the wheel: installed into the pip runtime env's virtualenv
    (venv,) = _pip_envs(temp_dir)
    installed = list(venv.glob("lib/python*/site-packages/raydrat-*.dist-info"))
    assert [p.name for p in installed] == [f"raydrat-{__version__}.dist-info"]
    assert (installed[0].parent / "raydrat" / "recipes" / "debug.yaml").exists()
    # ran on the submitted-to cluster: its Train worker wrote to this head's session logs
    worker_logs = (temp_dir / "session_latest" / "logs").glob("worker-*")
    assert any("[raydrat] step 4/4" in f.read_text(errors="replace") for f in worker_logs)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("raydrat").experiment_id])
    assert [r.info.run_name for r in runs] == ["from-a-job"]
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["mlflow.source.type"] == "JOB"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss")] == [2, 4]


@pytest.mark.slow
def test_raydrat_job_submit_pins_the_wheel_so_a_rebuilt_one_gets_its_own_environment(ray_head, tmp_path):
    """`raydrat job submit`: the same wheel name with other contents is a new pip
    environment on the cluster (the shipped spec alone would reuse the one built before)."""
    address, temp_dir = ray_head
    checkout = checkout_copy(tmp_path / "checkout")
    build_wheel(checkout)
    before = set(_pip_envs(temp_dir))
    cmd = [sys.executable, "-m", "raydrat.cli", "job", "submit", "--address", address, "--", "python", "-m",
           "raydrat.cli", "--version"]  # fmt: skip
    env = {**_env(), "PYTHONPATH": str(REPO)}
    print("$ raydrat job submit --address ... -- python -m raydrat.cli --version")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=checkout)
    out = proc.stdout + proc.stderr
    for line in out.splitlines():
        print(f"  | {line}")
    assert proc.returncode == 0, out[-4000:]
    assert "[raydrat] ray job submit (runtime env jobs/runtime_env.yaml, wheel pinned) -- python -m" in out
    assert f"raydrat {__version__}" in out and "succeeded" in out
    (new,) = set(_pip_envs(temp_dir)) - before
    assert list(new.glob("lib/python*/site-packages/raydrat/cli.py"))


@pytest.mark.slow
def test_the_rayjob_runtime_env_runs_the_job_folder_from_a_zip_at_a_url(ray_head, tmp_path):
    """cluster/kuberay-rayjob.yaml's runtimeEnvYAML and entrypoint as they are, but for the
    URL to set: a zip of jobs/ made as its header says, served on loopback. The entrypoint's
    config (cluster-gpt2-small.yaml, `base: gpt2-small`) loads from the zip through the
    installed wheel: a dry run (no GPU here), which says the corpus is still the demo one."""
    address, _ = ray_head
    checkout = checkout_copy(tmp_path / "checkout")
    build_wheel(checkout)
    site = tmp_path / "site"
    zipped = shutil.make_archive(str(site / f"raydrat-jobs-{__version__}"), "zip", checkout, "jobs")  # top dir: jobs/
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port := free_port()), "--bind", "127.0.0.1", "-d", str(site)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        spec = yaml.safe_load((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())["spec"]
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        env["working_dir"] = f"http://127.0.0.1:{port}/{Path(zipped).name}"
        del env["env_vars"]["MLFLOW_TRACKING_URI"]  # no MLflow server here; a dry run logs nothing
        entry = [*spec["entrypoint"].split(), "--dry-run", "--set", "scaling.use_gpu=false"]
        cmd = [RAY, "job", "submit", "--address", address, "--runtime-env-json", json.dumps(env), "--", *entry]
        print(f"$ ray job submit --runtime-env-json <the RayJob's, at {env['working_dir']}> -- {' '.join(entry)}")
        proc = _run(cmd, tmp_path, 600)
    finally:
        server.terminate()
        server.wait(timeout=30)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "dry run of gpt2-small: config valid" in out and "2 worker(s)" in out
    assert "sources[0] demo: absent from" in out


@pytest.mark.slow
def test_the_cluster_config_left_at_the_demo_corpus_is_refused_on_two_nodes(tmp_path):
    """jobs/cluster-gpt2-small.yaml as shipped (the corpus left at `demo`), its two workers
    on a Ray cluster of two nodes: one line naming data.sources, before any work (no corpus
    built, nothing stored). The nodes are two raylets of this machine joined by loopback."""
    with private_cluster(Path(sys.executable), tmp_path, extra_nodes=1) as (_, gcs, temp_dir):
        env = {**_env(), "RAY_ADDRESS": gcs, "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "raydrat.cli", "train", str(REPO / "jobs" / "cluster-gpt2-small.yaml"),
               "--set", "scaling.use_gpu=false", "--set", "scaling.cpus_per_worker=0.5",
               "--set", f"train.storage_path={tmp_path / 'store'}", "--set", "tracking.enabled=false"]  # fmt: skip
        work = tmp_path / "work"
        work.mkdir()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=work)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("raydrat: error:")]
    assert proc.returncode == 2 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert lines == [
        "raydrat: error: data.sources[0].path is 'demo', the small embedded corpus built on the driver's disk, "
        "but scaling.num_workers=2 Train workers on a Ray cluster of 2 nodes read the corpus from every node: set "
        "data.sources to a parquet prefix every node reads (s3://bucket/corpus/ or a shared path such as "
        "/mnt/shared/corpus/; for the cluster examples, in jobs/cluster-gpt2-small.yaml)"
    ]
    assert list(work.iterdir()) == [] and not (tmp_path / "store").exists()


def _stop_job(address: str, job_id: str) -> None:
    from ray.job_submission import JobSubmissionClient

    try:
        JobSubmissionClient(address).stop_job(job_id)
    except Exception:  # the head is torn down by the fixture anyway
        pass
