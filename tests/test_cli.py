"""The command line people expect: --version, train --print-config / --dry-run, --set typed
by the field it sets, one ``raydrat: error:`` line for bad input, and a quiet console."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import REPO, run_cli

from raydrat import __version__, console
from raydrat.cli import main
from raydrat.config import load_config


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("raydrat: error: "), err
    return err[0]


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"raydrat {__version__}"
    toml = (REPO / "pyproject.toml").read_text()
    assert 'version = {attr = "raydrat.__version__"}' in toml  # one source for the wheel and --version


def _commands(parser=None, prefix=("raydrat",)) -> list[str]:
    """Every command path the parser knows, e.g. ``raydrat bench overhead``."""
    import argparse

    from raydrat.cli import build_parser

    parser = parser or build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [" ".join(prefix)]
    return [c for name, p in subs[0].choices.items() for c in _commands(p, (*prefix, name))]


def test_help_is_written_for_users(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Train decoder-only transformers" in out and "raydrat train demo" in out
    assert "``" not in out and "delegates" not in out  # no internal docstring


def test_the_readme_lists_each_command_once():
    rows = [ln.split("|")[1].strip() for ln in (REPO / "README.md").read_text().splitlines() if ln.startswith("| `")]
    commands = _commands()
    assert "raydrat bench gpu" in commands and "raydrat bench recompute" in commands
    for command in commands:
        listed = [r for r in rows if r.startswith(f"`{command} ") or r.startswith(f"`{command}`")]
        assert len(listed) == 1, (command, listed)


def test_set_string_field_takes_the_text_as_given():
    cfg = load_config("debug", ["tracking.run_name=2024", "name=true", "data.sources=[{path: x.jsonl}]"])
    assert cfg.tracking.run_name == "2024" and cfg.name == "true"
    assert cfg.data.sources[0].path == "x.jsonl"  # a list still parses as YAML
    assert load_config("debug", ["tracking.run_name=null"]).tracking.run_name is None
    assert load_config("debug", ["tracking.run_name='a b'"]).tracking.run_name == "a b"


def test_set_int_field_takes_an_integral_float():
    cfg = load_config("debug", ["train.steps=1e3", "optim.warmup_steps=4.0", "train.batch_size=1.6e1"])
    assert (cfg.train.steps, cfg.optim.warmup_steps, cfg.train.batch_size) == (1000, 4, 16)
    assert type(cfg.train.steps) is int
    assert load_config("debug", ["optim.lr=1e-3"]).optim.lr == pytest.approx(1e-3)  # floats unchanged


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("train.steps=1.5", "train.steps"),
        ("train.steps=abc", "train.steps"),
        ("tracking.run_name", "tracking.run_name"),
    ],
)
def test_bad_set_is_one_error_line(override, culprit, capsys):
    assert main(["train", "debug", "--set", override, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raydrat: error: ") and err.count("raydrat: error:") == 1
    assert culprit in err


def test_print_config_is_the_resolved_config_redacted(capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-secret")
    uri = "http://alice:hunter2-secret@mlflow.example:5000"
    assert (
        main(["train", "debug", "--print-config", "--set", f"tracking.tracking_uri={uri}", "--set", "train.steps=1e2"])
        == 0
    )
    out = capsys.readouterr().out
    assert "hunter2-secret" not in out
    printed = yaml.safe_load(out)
    expected = load_config("debug", ["train.steps=100"]).to_dict()
    assert printed["tracking"]["tracking_uri"] == "http://alice:***@mlflow.example:5000"
    printed["tracking"]["tracking_uri"] = expected["tracking"]["tracking_uri"] = None
    assert printed == expected  # every resolved default, not just the recipe's keys
    assert load_config("debug").model_validate(printed)  # it loads back as a config


def test_dry_run_resolves_estimates_and_plans(demo_dir, tmp_path, capsys, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from raydrat.core.runtime import resolve

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(50)]}), tmp_path / "a.parquet", row_group_size=20)
    sets = [f"data.demo_dir={demo_dir}", f"data.sources=[{{path: {tmp_path}}}]", "train.device=cpu"]
    assert main(["train", "debug", "--dry-run", *(a for s in sets for a in ("--set", s))]) == 0
    out = capsys.readouterr().out
    est = resolve(load_config("debug", sets), gpus=0).estimate
    assert f"estimated peak {est.total_bytes / 2**20:,.2f} MiB" in out
    assert "device cpu, precision fp32" in out
    assert f"sources[0] {tmp_path} (parquet): 50 rows" in out and "3 units" in out  # 3 row groups
    assert "tokenizer-512.json (512 tokens; end of document '<|endoftext|>', id 0)" in out
    assert "read by 3 streams (data.streams 12)" in out and "every unit is read by one worker" in out
    assert not ray.is_initialized()  # nothing started, nothing trained or tracked
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet"]


def test_dry_run_writes_nothing_and_reads_the_demo_manifest_or_says_what_it_would_build(
    demo_dir, tmp_path, capsys, monkeypatch
):
    """The demo corpus absent: the dry run says what the run would build and the folder stays
    empty (it used to write the 11 MB corpus there); present: planned from its manifest and
    files, none of them touched."""
    from raydrat.core.data.demo import read_manifest, stdlib_documents

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["train", "debug", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    docs, _ = stdlib_documents()
    assert "data: the demo corpus, to build;" in out
    assert (
        f"sources[0] demo: absent from {tmp_path / 'data' / 'demo'}: the run builds it first from this Python's "
        f"standard library ({len(docs):,} documents, "
    ) in out
    assert "tokenizer-512.json absent: the run trains it on the demo corpus first" in out

    before = {p: p.stat().st_mtime_ns for p in demo_dir.rglob("*")}
    assert main(["train", "debug", "--dry-run", "--set", f"data.demo_dir={demo_dir}"]) == 0
    out = capsys.readouterr().out
    assert f"sources[0] demo (parquet): {read_manifest(demo_dir)['n_docs']:,} rows" in out
    assert {p: p.stat().st_mtime_ns for p in demo_dir.rglob("*")} == before
    assert list(tmp_path.iterdir()) == []


def test_dry_run_refuses_a_missing_source_in_one_line(tmp_path, capsys):
    assert main(["train", "debug", "--dry-run", "--set", f"data.sources=[{{path: {tmp_path}/nope}}]"]) == 2
    line = _error_line(capsys)
    assert "nope" in line and "data.sources" in line


def test_dry_run_refuses_what_the_machine_cannot_run(capsys):
    assert main(["train", "debug", "--dry-run", "--set", "train.device=cpu", "--set", "precision.mode=fp16"]) == 2
    assert "precision.mode=fp16" in _error_line(capsys)


def test_tune_dry_run_screens_every_trial(capsys):
    from raydrat.core.runtime import resolve
    from raydrat.tune.report import fmt_bytes
    from raydrat.tune.space import expand, load_space

    assert main(["tune", "smoke", "--dry-run"]) == 0
    out = capsys.readouterr().out
    space = load_space("smoke")
    budget = space.sweep.memory_budget_gb * 2**30
    trials = expand(space)
    for t in trials:  # each trial's estimate, recomputed from its own config
        est = resolve(t.config, gpus=0).estimate.total_bytes
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(t.name))
        assert f"estimated {fmt_bytes(est)}" in line
        assert ("admitted" in line) == (est <= budget), line
    refused = sum(resolve(t.config, gpus=0).estimate.total_bytes > budget for t in trials)
    assert refused >= 1 and f"{len(trials)} trial(s): {len(trials) - refused} admitted, {refused} refused" in out


def test_tune_dry_run_of_a_missing_space_is_one_line(capsys):
    assert main(["tune", "no-such-space", "--dry-run"]) == 2
    assert "smoke" in _error_line(capsys)  # the shipped spaces are listed


@pytest.mark.parametrize(
    "data, line, kept",
    [
        ({"pid": 7}, "[raydrat] step 5/20 | loss 6.1", True),
        ({"pid": 7}, "Reporting training result 1: TrainingReport(checkpoint=None, metrics={})", False),
        ({"pid": 7}, "Progress bars disabled. To enable, set ...", False),
        ({"pid": "raylet"}, "Task X failed. There are infinite retries remaining, so the task will be retried.", False),
        (
            {"pid": "raylet"},
            "WARNING: 8 PYTHON worker processes have been started on node: a0db with address: 192.0.2.2, which is "
            "4x the maximum expected startup concurrency (2).",
            False,
        ),
        ({"pid": "raylet"}, "A worker died or was killed while executing a task", True),
        ({"pid": "autoscaler"}, "Warning: The following resource request cannot be scheduled", True),
    ],
)
def test_quiet_console_keeps_raydrat_lines(data, line, kept):
    assert console.keep_line(data, line) is kept


QUIET_SCRIPT = textwrap.dedent("""
    import logging, sys, time
    import ray
    from raydrat import console
    from raydrat.ray_session import ensure_ray

    @ray.remote
    def talk():
        print("[raydrat] step 1/2 | loss 6.0", flush=True)
        logging.getLogger("ray.train.v2._internal.execution.context").warning(
            "Reporting training result 1: TrainingReport(checkpoint=None, metrics={})")
        print("Progress bars disabled.", flush=True)
        return 1

    with console.quiet_console(verbose=sys.argv[1] == "verbose"):
        ensure_ray(num_cpus=1)
        ray.get(talk.remote())
        time.sleep(3)  # the driver's log thread prints the worker's lines
        ray.shutdown()
""")


@pytest.mark.slow
def test_quiet_console_on_real_ray(tmp_path):
    """Against a real Ray instance (its internals the filter hooks into): quiet keeps only
    raydrat's line, without ANSI codes (output piped); verbose brings Ray's lines back."""
    script = tmp_path / "talk.py"
    script.write_text(QUIET_SCRIPT)
    out = {}
    for mode in ("quiet", "verbose"):
        p = subprocess.run(
            [sys.executable, str(script), mode],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert p.returncode == 0, p.stderr[-2000:]
        out[mode] = p.stdout + p.stderr
    assert "Reporting training result 1" in out["verbose"] and "Progress bars disabled" in out["verbose"]
    assert "[raydrat] step 1/2" in out["quiet"]
    assert "Reporting training result" not in out["quiet"] and "Progress bars disabled" not in out["quiet"]
    assert "\x1b[" not in out["quiet"] and "\x1b[" not in out["verbose"]


@pytest.mark.slow
def test_ray_failing_to_start_is_one_line_after_one_retry(demo_dir, tmp_path):
    """Ray's start made to fail (its temporary folder is a file): it is tried twice, then one
    line names the load average and how to join a running cluster instead; the run's folder
    is not left behind."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    sets = [f"data.demo_dir={demo_dir}", f"train.storage_path={tmp_path / 'rr'}", "tracking.enabled=false"]
    done = run_cli(
        ["train", "debug", *(a for s in sets for a in ("--set", s))], tmp_path, 300, {"RAY_TMPDIR": str(blocker)}
    )
    err = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr[-3000:]
    assert [ln for ln in err if "raydrat: error:" in ln] == err[-1:] and "Traceback" not in done.stderr, err
    assert err[-1].startswith("raydrat: error: Ray did not start a local instance (tried twice): NotADirectoryError")
    assert "load average" in err[-1] and "RAY_ADDRESS=auto" in err[-1]
    assert sum("trying once more" in ln for ln in err) == 1
    assert not list((tmp_path / "rr").glob("*"))


def test_data_prepare_checks_its_output_before_ray_starts(tmp_path, capsys):
    import ray

    (tmp_path / "file").write_text("")
    assert main(["data", "prepare", "debug", "--out", str(tmp_path / "file" / "out")]) == 2
    assert f"--out {tmp_path / 'file' / 'out'}: cannot write" in _error_line(capsys)
    assert not ray.is_initialized()


def test_bench_sync_keeps_the_quiet_console_of_train_unless_verbose(monkeypatch):
    """`bench sync` (its fault runs call Ray Train directly) prints raydrat's lines only, as
    `raydrat train` does, and Ray's own output with --verbose."""
    import raydrat.cli as cli

    quiet = []
    monkeypatch.setattr(cli, "_run_bench_sync", lambda *args: quiet.append(console._quiet))
    assert main(["bench", "sync", "debug", "--faults", "5"]) == 0
    assert main(["bench", "sync", "debug", "--verbose"]) == 0
    assert quiet == [True, False] and console._quiet is False
