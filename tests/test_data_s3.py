"""The data code (raydrat.core.data, raydrat.ray_data) against a real S3 endpoint: moto's server on 127.0.0.1 (random free port),
reached through pyarrow's S3 filesystem with ``endpoint_url``. The token stream read from
the bucket equals the same files read locally; ``prepare`` writes to the bucket and the
debug recipe trains from it; bad buckets and credentials stop with a clear message."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
import ray
from test_data import SEQ_LEN, VOCAB, as_multiset, make_docs, train_rows, write_parquet

from raydrat.bench.loopback import free_port
from raydrat.config import DataConfig, load_config
from raydrat.core.data.blocks import iter_blocks_local
from raydrat.core.data.errors import DataError
from raydrat.core.data.prepared import iter_prepared_blocks, read_manifest
from raydrat.core.data.tokenizer import train_tokenizer
from raydrat.ray_data.datasets import build_datasets
from raydrat.ray_data.prepare import prepare
from raydrat.tracking import artifact_repo

BUCKET = "corpus"
CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never probe an instance-metadata address
}


def _start_moto(env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server with a bucket holding parquet and text files, the same files on
    local disk, and Ray started with the credentials in its environment."""
    saved = {k: os.environ.get(k) for k in CREDS}
    os.environ.update(CREDS)
    proc, endpoint = _start_moto()
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        local = tmp_path_factory.mktemp("s3-local")
        docs = make_docs(240, seed=3)
        write_parquet(local / "pq" / "a.parquet", docs[:120], row_group_size=50)
        write_parquet(local / "pq" / "b.parquet", docs[120:200])
        (local / "txt").mkdir()
        for i, doc in enumerate(d for d in docs[200:] if d):
            if i % 2:
                (local / "txt" / f"{i:03d}.txt.gz").write_bytes(gzip.compress(doc.encode()))
            else:
                (local / "txt" / f"{i:03d}.txt").write_text(doc)
        (local / "lines").mkdir()
        (local / "lines" / "all.txt").write_text("\n".join(d for d in docs[:150] if d) + "\n")
        tok = local.parent / "s3-tokenizer.json"
        train_tokenizer([d for d in docs if d], VOCAB, tok)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            client.upload_file(str(path), BUCKET, f"data/{path.relative_to(local).as_posix()}")
        yield {"endpoint": endpoint, "local": local, "tokenizer": tok, "client": client}
    finally:
        if started:
            ray.shutdown()
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def sources(s3: dict, where: str) -> list[dict]:
    """The same three sources, on the bucket (``where = "s3"``) or on local disk."""
    root = f"s3://{BUCKET}/data" if where == "s3" else str(s3["local"])
    extra = {"endpoint_url": s3["endpoint"]} if where == "s3" else {}
    return [
        {"path": f"{root}/pq", **extra},
        {"path": f"{root}/txt", "format": "text", **extra},
        {"path": f"{root}/lines/*.txt", "format": "text", "text_mode": "line", **extra},
    ]


def cfg_for(s3: dict, where: str, **kw) -> DataConfig:
    settings = dict(
        sources=sources(s3, where),
        tokenizer_path=str(s3["tokenizer"]),
        val_fraction=0.1,
        pack_rows=16,
        tokenize_batch_size=8,
        demo_dir=str(s3["local"] / "no-demo"),
    )
    settings.update(kw)
    return DataConfig(**settings)


@pytest.mark.slow
def test_s3_token_stream_equals_local(s3):
    remote, local = cfg_for(s3, "s3"), cfg_for(s3, "local")
    for split in ("train", "val"):
        want = [b.tolist() for b in iter_blocks_local(local, SEQ_LEN, VOCAB, split)]
        assert want, split
        assert [b.tolist() for b in iter_blocks_local(remote, SEQ_LEN, VOCAB, split)] == want
    bundle = build_datasets(remote, SEQ_LEN, VOCAB)
    assert as_multiset(r["tokens"] for r in train_rows(bundle)) == as_multiset(
        iter_blocks_local(local, SEQ_LEN, VOCAB, "train")
    )
    assert as_multiset(r["tokens"] for r in bundle.val.take_all()) == as_multiset(
        iter_blocks_local(local, SEQ_LEN, VOCAB, "val")
    )
    assert any(f["path"].startswith("s3://corpus/data/txt/") for f in bundle.lineage["files"])


def test_s3_bad_inputs(s3):
    missing_bucket = cfg_for(s3, "s3", sources=[{"path": "s3://no-such-bucket/x", "endpoint_url": s3["endpoint"]}])
    with pytest.raises(
        DataError,
        match=r"data.sources\[0\].path = 's3://no-such-bucket/x': bucket 'no-such-bucket' does not exist .*"
        r"fix the bucket name in data.sources",
    ):
        build_datasets(missing_bucket, SEQ_LEN, VOCAB)
    for path in ("s3://no-such-bucket/*.parquet", "s3://no-such-bucket/", "s3://no-such-bucket/corpus/"):
        elsewhere = cfg_for(s3, "s3", sources=[{"path": path, "endpoint_url": s3["endpoint"]}])
        with pytest.raises(DataError, match=r"bucket 'no-such-bucket' does not exist") as err:
            build_datasets(elsewhere, SEQ_LEN, VOCAB)
        assert "no-such-bucket" in str(err.value) and "prefix" not in str(err.value), path
    missing_key = cfg_for(s3, "s3", sources=[{"path": f"s3://{BUCKET}/nope/", "endpoint_url": s3["endpoint"]}])
    with pytest.raises(DataError, match=r"s3://corpus/nope does not exist"):
        build_datasets(missing_key, SEQ_LEN, VOCAB)


def test_s3_wrong_credentials(s3):
    """A second moto server that checks credentials (it knows no access key)."""
    proc, endpoint = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        cfg = cfg_for(s3, "s3", sources=[{"path": f"s3://{BUCKET}/data/pq", "endpoint_url": endpoint}])
        with pytest.raises(
            DataError,
            match=r"data.sources\[0\].path = 's3://corpus/data/pq'.*access was refused to "
            r"the credentials used, access key id testing from AWS_ACCESS_KEY_ID",
        ):
            build_datasets(cfg, SEQ_LEN, VOCAB)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_prepare_to_s3_round_trip_and_train(s3, tmp_path):
    local = cfg_for(s3, "local")
    out = f"s3://{BUCKET}/prepared/run1"
    manifest = prepare(cfg_for(s3, "s3"), SEQ_LEN, VOCAB, out, s3["endpoint"])
    assert read_manifest(out, s3["endpoint"]) == manifest
    listed = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="prepared/run1/")["Contents"]
    assert {"prepared/run1/manifest.json"} < {o["Key"] for o in listed}
    assert all(f["etag"] for f in manifest["files"])
    # the prepared blocks are the streamed blocks, every token accounted for
    train = list(iter_prepared_blocks(out, "train", s3["endpoint"]))
    assert as_multiset(train) == as_multiset(iter_blocks_local(local, SEQ_LEN, VOCAB, "train"))
    c = manifest["counts"]
    assert c["train_blocks"] == len(train)
    assert c["train_tokens"] == c["train_blocks"] * (SEQ_LEN + 1) + c["train_dropped_tokens"]

    cfg = load_config(
        "debug",
        [
            f"data.prepared={out}",
            f"data.prepared_endpoint_url={s3['endpoint']}",
            f"data.tokenizer_path={s3['tokenizer']}",
            f"model.seq_len={SEQ_LEN}",
            f"model.vocab_size={VOCAB}",
            "train.steps=3",
            "train.eval_every=3",
            "train.batch_size=2",
            "optim.warmup_steps=1",
            "train.eval_batches=1",
            f"train.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}",
        ],
    )
    from raydrat.ray_train.trainer import run_training

    summary = run_training(cfg)
    assert summary.steps == 3 and np.isfinite(summary.final_val_loss)
    import mlflow

    client = mlflow.MlflowClient(summary.tracking_uri)
    lineage = json.loads(
        Path(
            artifact_repo(summary.tracking_uri, summary.mlflow_run_id).download_artifacts(
                "data/lineage.json", str(tmp_path)
            )
        ).read_text()
    )
    assert lineage["manifest"]["tokenizer_sha256"] == manifest["tokenizer_sha256"]
    run = client.get_run(summary.mlflow_run_id)
    train_input = next(i for i in run.inputs.dataset_inputs if i.tags[0].value == "training")
    assert json.loads(train_input.dataset.profile)["train_blocks"] == c["train_blocks"]

    # a manifest that does not match the config is refused before training
    with pytest.raises(DataError, match=r"seq_len 16 but model.seq_len is 32: set model.seq_len = 16"):
        build_datasets(cfg.data, 32, VOCAB)
    other_tok = tmp_path / "other.json"
    train_tokenizer(["something else entirely"] * 5, VOCAB, other_tok)
    bad = cfg.data.model_copy(update={"tokenizer_path": str(other_tok)})
    with pytest.raises(DataError, match=r"was prepared with tokenizer .* set data.tokenizer_path"):
        build_datasets(bad, SEQ_LEN, VOCAB)
    incomplete = cfg.data.model_copy(update={"prepared": f"s3://{BUCKET}/prepared/none"})
    with pytest.raises(DataError, match=r"manifest.json not found.*incomplete"):
        build_datasets(incomplete, SEQ_LEN, VOCAB)


def test_s3_access_denied_is_a_credentials_error_never_a_corrupt_file(s3, monkeypatch):
    """A moto server that enforces IAM: the user may list the bucket but not read objects.
    Whatever data.on_corrupt says, the run stops with a credentials error that names the
    access key used, never its secret, and never calls the file corrupt."""
    # the first 5 requests are unauthenticated (the set-up below), IAM is enforced after them
    proc, endpoint = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "5"})
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        client.upload_file(str(s3["local"] / "pq" / "a.parquet"), BUCKET, "data/pq/a.parquet")
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
        iam.create_user(UserName="lister")
        iam.put_user_policy(
            UserName="lister",
            PolicyName="list-only",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    # AWS authorizes ListObjectsV2 as s3:ListBucket; moto 5.2 checks the operation's own name
                    "Statement": [
                        {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:ListObjectsV2"], "Resource": "*"}
                    ],
                }
            ),
        )
        key = iam.create_access_key(UserName="lister")["AccessKey"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        for on_corrupt in ("error", "skip"):
            cfg = cfg_for(
                s3,
                "s3",
                on_corrupt=on_corrupt,
                sources=[{"path": f"s3://{BUCKET}/data/pq/*.parquet", "endpoint_url": endpoint}],
            )
            with pytest.raises(DataError) as info:  # the listing is allowed, reading the footer is not
                build_datasets(cfg, SEQ_LEN, VOCAB)
            msg = str(info.value)
            assert "s3://corpus/data/pq/a.parquet" in msg and "ACCESS_DENIED" in msg, msg
            shown = f"{key['AccessKeyId'][:4]}…{key['AccessKeyId'][-4:]}"
            assert f"access key id {shown} from AWS_ACCESS_KEY_ID" in msg, msg
            assert "not a corrupt file" in msg and "not a readable parquet" not in msg, msg
            assert key["SecretAccessKey"] not in msg
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_prepare_checks_its_output_location_before_any_work(s3, tmp_path):
    """--out in a bucket that does not exist fails first: the sources (which do not exist
    either) are never looked at, nothing is written."""
    cfg = cfg_for(s3, "local", sources=[{"path": str(tmp_path / "no-corpus")}])
    with pytest.raises(DataError, match=r"--out s3://no-such-bucket/prepared: bucket 'no-such-bucket' does not exist"):
        prepare(cfg, SEQ_LEN, VOCAB, "s3://no-such-bucket/prepared", s3["endpoint"])
    names = {b["Name"] for b in s3["client"].list_buckets()["Buckets"]}
    assert names == {BUCKET}
    # the same order locally: an --out that cannot be created is named before the sources
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(DataError, match=r"--out .*a-file/prepared: cannot write"):
        prepare(cfg, SEQ_LEN, VOCAB, str(blocker / "prepared"))


def test_s3_jsonl_and_saved_dataset_equal_local_parquet(s3, tmp_path):
    """JSON Lines (.gz) and a saved Hugging Face dataset on the bucket: the same token stream
    as the same texts in a local parquet file, here and through Ray Data."""
    from test_data_formats import _write_all

    local = tmp_path / "formats"
    local.mkdir()
    files = _write_all(local, make_docs(120, seed=5))
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        s3["client"].upload_file(str(path), BUCKET, f"formats/{path.relative_to(local).as_posix()}")
    common = dict(
        tokenizer_path=str(s3["tokenizer"]), val_fraction=0.1, pack_rows=16, demo_dir=str(s3["local"] / "no-demo")
    )
    ref = DataConfig(sources=[{"path": str(files["parquet"])}], **common)
    for name in ("gz", "hfds"):
        remote = DataConfig(
            sources=[{"path": f"s3://{BUCKET}/formats/{name}", "endpoint_url": s3["endpoint"]}], **common
        )
        for split in ("train", "val"):
            want = [b.tolist() for b in iter_blocks_local(ref, SEQ_LEN, VOCAB, split)]
            assert want and [b.tolist() for b in iter_blocks_local(remote, SEQ_LEN, VOCAB, split)] == want
        bundle = build_datasets(remote, SEQ_LEN, VOCAB)
        assert as_multiset(r["tokens"] for r in train_rows(bundle)) == as_multiset(
            iter_blocks_local(ref, SEQ_LEN, VOCAB, "train")
        )
        assert bundle.stats.empty_docs == sum(1 for d in make_docs(120, seed=5) if not d)


def test_s3_bad_jsonl_line_through_ray_is_refused_or_counted(s3):
    """A line that is not JSON, found by Ray Data's up-front check: one DataError naming the
    file and line, or with on_corrupt = skip counted in the stats."""
    docs = [d for d in make_docs(80, seed=6) if d]
    lines = [json.dumps({"text": d}) for d in docs]
    lines[2] = "{not json"
    s3["client"].put_object(Bucket=BUCKET, Key="bad/c.jsonl", Body="\n".join(lines).encode())
    common = dict(
        sources=[{"path": f"s3://{BUCKET}/bad/c.jsonl", "endpoint_url": s3["endpoint"]}],
        tokenizer_path=str(s3["tokenizer"]),
        val_fraction=0.2,
        pack_rows=16,
        demo_dir=str(s3["local"] / "no-demo"),
    )
    with pytest.raises(DataError, match=r"s3://corpus/bad/c\.jsonl line 3 is not a JSON object .*on_corrupt = skip"):
        build_datasets(DataConfig(**common), SEQ_LEN, VOCAB)
    bundle = build_datasets(DataConfig(**common, on_corrupt="skip"), SEQ_LEN, VOCAB)
    assert bundle.stats.corrupt_lines == 1 and bundle.stats.docs == len(docs) - 1
    assert bundle.counts()["corrupt_lines"] == 1.0
