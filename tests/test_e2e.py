"""End to end: `raydrat train debug` through Ray Train, then the MLflow store holds the run."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from raydrat.cli import main

pytestmark = pytest.mark.slow


def _overrides(demo_dir: Path, tmp: Path) -> list[str]:
    return ["--set", f"data.demo_dir={demo_dir}", "--set", f"train.storage_path={tmp / 'ray_results'}"]


def test_train_debug_through_ray_records_mlflow_run(demo_dir: Path, tmp_path: Path, monkeypatch):
    proc = run_cli(["train", "debug", *_overrides(demo_dir, tmp_path)], cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "final validation loss:" in out
    assert "tokens/s" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out.replace("/mlflow ui", " mlflow ui")
    assert "step 10/20" in out  # progress visible on the console
    # a quiet console: raydrat's lines only, no Ray Train report dumps, no colour
    # codes into a pipe, one line per worker event
    assert "Reporting training result" not in out and "TrainingReport(" not in out
    assert "\x1b[" not in out
    worker_lines = [ln for ln in out.splitlines() if ln.startswith("(")]
    assert worker_lines and all("[raydrat]" in ln for ln in worker_lines), worker_lines

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = client.get_experiment_by_name("raydrat")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.d_model"] == "64"
    assert run.data.params["optim.lr"] == "0.003"
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == [10, 20]
    train_loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(train_loss) == 4 and train_loss[-1].value < train_loss[0].value
    for key in ("lr", "system/tokens_per_s", "grad_norm"):
        assert client.get_metric_history(run.info.run_id, key), key
    # the MLflow view: measured and estimated peak, the data as dataset inputs (its counts in
    # their profile, not as constant metrics), source tags, no params of unused sections
    assert [m.step for m in client.get_metric_history(run.info.run_id, "system/peak_mib")] == [10, 20]
    assert run.data.metrics["system/peak_mib"] > 0 and float(run.data.params["runtime.estimated_peak_mib"]) > 0
    assert not [k for k in run.data.metrics if k.startswith("data_")]
    assert {i.tags[0].value for i in run.inputs.dataset_inputs} == {"training", "validation"}
    assert run.data.tags["mlflow.source.name"].startswith("raydrat train debug")
    assert not [k for k in run.data.params if k.startswith(("sync.", "recompute.gates.", "tracking."))]
    monkeypatch.chdir(tmp_path)  # artifact locations are relative to the store (as `mlflow ui` runs there)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "tokenizer", "plots"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/loss_curve.png"]
    # a checkpoint was saved through ray.train.report
    assert list((tmp_path / "ray_results").rglob("state.pt"))


def _write_parquet(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _expect_one_line_error(capsys, argv: list[str], *needles: str) -> None:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    last = err.splitlines()[-1]
    assert last.startswith("raydrat: error:"), err
    for needle in needles:
        assert needle in err, err
    assert "Traceback" not in err


def test_bad_input_missing_corpus(capsys, ray_local, tmp_path: Path):
    missing = tmp_path / "nowhere"
    _expect_one_line_error(
        capsys,
        ["train", "debug", "--set", f"data.sources=[{{path: {missing}}}]", "--set", "tracking.enabled=false"],
        str(missing),
    )


def test_bad_input_parquet_without_text_column(capsys, ray_local, tmp_path: Path):
    f = _write_parquet(tmp_path / "c" / "a.parquet", pa.table({"body": ["hello world"] * 10}))
    _expect_one_line_error(
        capsys,
        ["train", "debug", "--set", f"data.sources=[{{path: {f.parent}}}]", "--set", "tracking.enabled=false"],
        "a.parquet",
        "text",
        "body",
    )


def test_bad_input_empty_corpus(capsys, ray_local, tmp_path: Path, demo_dir: Path):
    f = _write_parquet(tmp_path / "e" / "empty.parquet", pa.table({"text": pa.array([], pa.string())}))
    _expect_one_line_error(
        capsys,
        [
            "train",
            "debug",
            "--set",
            f"data.sources=[{{path: {f.parent}}}]",
            "--set",
            "tracking.enabled=false",
            "--set",
            f"data.tokenizer_path={demo_dir / 'tokenizer-512.json'}",
        ],
        str(f.parent),
    )


def test_bad_input_config_not_a_mapping(capsys, tmp_path: Path):
    p = tmp_path / "list.yaml"
    p.write_text("- model\n- data\n")
    _expect_one_line_error(capsys, ["train", str(p)], "list.yaml", "mapping")


def test_corrupt_page_found_mid_training_is_one_line(capsys, ray_local, tmp_path: Path, demo_dir: Path):
    """A parquet row group whose data page is damaged (valid footer) and that the up-front
    check does not read (data.val_max_units=1): found while training, it ends the run with
    one line naming the file and the row group, not a Ray traceback."""
    import random

    from faults import corrupt_data_page

    rng = random.Random(5)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    docs = [" ".join(rng.choices(words, k=60)) for _ in range(120)]
    f = tmp_path / "c" / "bad.parquet"
    f.parent.mkdir()
    pq.write_table(
        pa.table({"text": docs}),
        f,
        row_group_size=40,
        compression="none",
        use_dictionary=False,
        write_page_checksum=True,
    )
    corrupt_data_page(f, 2)
    rc = main(
        [
            "train",
            "debug",
            "--set",
            f"data.sources=[{{path: {f.parent}}}]",
            "--set",
            "data.val_max_units=1",
            "--set",
            "data.val_fraction=0.25",
            "--set",
            f"data.tokenizer_path={demo_dir / 'tokenizer-512.json'}",
            "--set",
            "tracking.enabled=false",
            "--set",
            f"train.storage_path={tmp_path / 'ray_results'}",
            "--set",
            "train.steps=40",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2, err[-3000:]
    last = err.splitlines()[-1]
    assert re.match(
        r"raydrat: error: \S*bad.parquet row group 2 is corrupt \(.*\): fix or remove it, or set "
        r"data.on_corrupt = skip$",
        last,
    ), err[-3000:]
    # one error line, the last (Ray's own logs of its worker's failure may come before it)
    assert sum(ln.startswith("raydrat: error:") for ln in err.splitlines()) == 1, err[-3000:]
