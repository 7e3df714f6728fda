"""A trained model put to use: raydrat generate | eval | export, model.init_from, MLflow
models. Checkpoints are written by the training loop's own save (core.checkpoint.state), the
data is the demo corpus, transformers loads the exports, MLflow is a real SQLite store."""

from __future__ import annotations

import io
import itertools
import math
import os
import shutil
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from raydrat import tracking
from raydrat.cli import main
from raydrat.config import ConfigError, load_config
from raydrat.core.checkpoint.state import DataPosition, save_checkpoint
from raydrat.core.data.blocks import iter_blocks_local
from raydrat.core.data.tokenizer import load_tokenizer
from raydrat.core.evaluate import evaluate, token_byte_lengths
from raydrat.core.model.build import build_model
from raydrat.core.model.generate import generate
from raydrat.core.optim import build_optimizer
from raydrat.core.setup import initial_model, load_model
from raydrat.core.techniques.bundle import build_techniques
from raydrat.model_commands import _eval_batches, _Streamer
from raydrat.ray_train import resume


def debug_cfg(demo_dir: Path, storage: Path, *overrides: str):
    return load_config("debug", [f"data.demo_dir={demo_dir}", f"train.storage_path={storage}", *overrides])


def save_run(cfg, run_name: str, steps: int = 0, seed: int = 0) -> Path:
    """A run directory with one complete checkpoint, written as the training loop writes it
    (after ``steps`` optimizer steps on the run's own training blocks)."""
    model = build_model(cfg.model, seed=seed)
    optimizer = build_optimizer(model, cfg.optim)
    techniques = build_techniques(cfg, "fp32", torch.device("cpu"))
    for block in itertools.islice(_train_batches(cfg), steps):
        _, loss = model(block[:, :-1], block[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    ckpt = Path(cfg.train.storage_path) / run_name / "checkpoint_000000"
    save_checkpoint(ckpt, model, optimizer, steps, cfg.to_dict(), techniques, DataPosition())
    return ckpt


def _train_batches(cfg):
    blocks = iter_blocks_local(cfg.data, cfg.model.seq_len, cfg.model.vocab_size, "train")
    while chunk := list(itertools.islice(blocks, cfg.train.batch_size)):
        yield torch.from_numpy(np.stack(chunk)).long()


@pytest.fixture(scope="module")
def run(demo_dir, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    cfg = debug_cfg(demo_dir, storage)
    return cfg, save_run(cfg, "r1", steps=6)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- generate


def test_generate_streams_and_the_same_seed_gives_the_same_text(run, capsys):
    cfg, ckpt = run
    args = ("generate", str(ckpt), "--prompt", "def ", "--max-new-tokens", "24", "--no-stop")
    code, a, _ = cli(capsys, *args, "--seed", "3")
    assert code == 0 and a.startswith("def ") and len(a) > len("def \n")
    assert cli(capsys, *args, "--seed", "3")[1] == a
    assert cli(capsys, *args, "--seed", "4")[1] != a
    # the run name under --storage names the same run, and its newest checkpoint
    assert cli(capsys, *args, "--seed", "3", "--storage", cfg.train.storage_path)[1] == a
    # what is printed is the model's tokens: greedy CLI text = generate()'s greedy tokens decoded
    loaded = load_model(ckpt)
    tok = load_tokenizer(loaded.tokenizer_path, cfg.model.vocab_size)
    ids = generate(loaded.model, tok.encode("def ").ids, 24, temperature=0.0)
    greedy = cli(
        capsys, "generate", str(ckpt), "--prompt", "def ", "--max-new-tokens", "24", "--no-stop", "--temperature", "0"
    )[1]
    assert greedy == "def " + tok.decode(ids, skip_special_tokens=False) + "\n"


def test_streamer_writes_as_tokens_come_and_holds_partial_characters(run):
    cfg, ckpt = run
    tok = load_tokenizer(load_model(ckpt).tokenizer_path, cfg.model.vocab_size)
    ids = tok.encode("héllo wörld €uro").ids
    writes = []

    class Out(io.StringIO):
        def write(self, s):
            writes.append(s)
            return super().write(s)

    out = Out()
    stream = _Streamer(tok, out)
    for i in ids:
        stream(i)
    stream.finish()
    assert out.getvalue() == "héllo wörld €uro\n"
    assert len([w for w in writes if w]) >= 3  # streamed, not written once at the end
    assert all("\ufffd" not in w for w in writes)


# ----------------------------------------------------------------------------- eval


def test_eval_equals_the_training_loops_val_loss_and_counts_bytes(run):
    cfg, ckpt = run
    loaded = load_model(ckpt)
    tok = load_tokenizer(loaded.tokenizer_path, cfg.model.vocab_size)
    batches = list(itertools.islice(_eval_batches(cfg, None, cfg.train.batch_size), cfg.train.eval_batches))
    assert len(batches) == cfg.train.eval_batches
    result = evaluate(loaded.model, batches, cfg.train.eval_batches, token_byte_lengths(tok, cfg.model.vocab_size))
    # the training loop's val loss: the mean of the batches' mean cross-entropy, computed here apart
    with torch.no_grad():
        logits = [loaded.model(b[:, :-1])[0] for b in batches]
        means = [F.cross_entropy(lg.reshape(-1, lg.shape[-1]), b[:, 1:].reshape(-1)) for lg, b in zip(logits, batches)]
    assert result.loss == pytest.approx(float(torch.stack(means).mean()), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))

    # bytes through transformers' own GPT-2 byte alphabet (an independent implementation)
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # optional dep: the test's peer

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    eod = tok.token_to_id("<|endoftext|>")
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for block in batches:
            logits, _ = loaded.model(block[:, :-1])
            targets = block[:, 1:]
            nats += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
            for row in targets.tolist():
                raw = b"".join(bytes(byte_of[ch] for ch in tok.id_to_token(t)) for t in row if t != eod)
                nbytes += len(raw)
                text = tok.decode([t for t in row if t != eod], skip_special_tokens=False)
                assert raw.decode("utf-8", errors="replace") == text
    assert result.bytes == nbytes
    assert result.tokens == sum(b[:, 1:].numel() for b in batches)
    assert result.bits_per_byte == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)


def test_eval_cli_prints_and_logs_to_the_runs_mlflow_record(demo_dir, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = debug_cfg(demo_dir, tmp_path / "runs", f"tracking.tracking_uri={uri}")
    ckpt = save_run(cfg, "tracked")
    mlrun = tracking.Run.start(uri, "t", "tracked")
    resume.write_run_record(cfg, "tracked", uri, mlrun.run_id)
    code, out, err = cli(capsys, "eval", str(ckpt.parent))
    assert code == 0
    logged = mlrun.metric_history("eval/loss")
    assert len(logged) == 1 and f"loss: {logged[0][1]:.4f}" in out
    assert mlrun.metric_history("eval/bits_per_byte")[0][1] > 0
    assert f"logged to MLflow run {mlrun.run_id} in {uri}" in out  # the store it logged to
    assert "eval:" not in err  # a short evaluation prints no progress
    # --data: every block of a source (here the demo corpus again: more batches than val)
    code, out, _ = cli(capsys, "eval", str(ckpt), "--data", "demo", "--batches", "3")
    assert code == 0 and "3 batches" in out and len(mlrun.metric_history("eval/data/loss")) == 1


@pytest.mark.slow
def test_eval_names_the_store_with_its_password_masked_or_says_the_run_was_not_tracked(
    demo_dir, tmp_path, capsys, monkeypatch
):
    """The store named as `train` names it (a server's password masked); a checkpoint of an
    untracked run says so; an evaluation that lasts prints its progress on stderr (here every
    batch: the interval set to 0), with the rate and the totals at the end."""
    from raydrat import progress

    cfg = debug_cfg(demo_dir, tmp_path / "runs", "tracking.enabled=false")
    ckpt = save_run(cfg, "untracked")
    resume.write_run_record(cfg, "untracked", None, None)
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    code, out, err = cli(capsys, "eval", str(ckpt), "--batches", "3")
    assert code == 0 and "  not logged to MLflow: the checkpoint's run was not tracked" in out.splitlines()
    lines = [ln for ln in err.splitlines() if ln.startswith("eval: ")]
    tokens = cfg.train.batch_size * cfg.model.seq_len
    assert [ln.split(",")[0] for ln in lines[:3]] == ["eval: 1/3 batches", "eval: 2/3 batches", "eval: 3/3 batches"]
    assert (
        lines[-1].startswith("eval: 3 batches in ") and " batches/s, " in lines[-1] and lines[-1].endswith(" tokens/s")
    )
    rate, token_rate = (float(x.split()[0].replace(",", "")) for x in lines[-1].split(", ")[-2:])
    assert token_rate == pytest.approx(rate * tokens, rel=0.05)  # the batch rate is printed to 0.1

    # a server's URI with a password: the line masks it (the store is away: the figures wait)
    cfg = debug_cfg(demo_dir, tmp_path / "runs2")
    ckpt = save_run(cfg, "served")
    uri = "http://alice:s3cret@127.0.0.1:9"  # the discard port: nothing answers
    resume.write_run_record(cfg, "served", uri, "0" * 32)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code, out, err = cli(capsys, "eval", str(ckpt), "--batches", "1")
    assert code == 0, err
    line = out.splitlines()[-1]
    assert line.startswith(f"  kept for MLflow run {'0' * 32} in http://alice:***@127.0.0.1:9 in "), line
    assert "s3cret" not in out + err


def test_eval_logs_to_the_current_store_when_the_runs_own_is_away_or_to_the_one_named(
    demo_dir, tmp_path, capsys, monkeypatch
):
    """The run's store unreachable and the current store another one: a run of its own,
    eval-RUN, in the current store, tagged with the run it evaluates (password masked);
    --tracking-uri: such a run in the store named, the training run's store untouched."""
    cfg = debug_cfg(demo_dir, tmp_path / "runs")
    ckpt = save_run(cfg, "away")
    current = f"sqlite:///{tmp_path / 'current.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", current)
    client = MlflowClient(current)
    # the run's store is a server that does not answer; then one whose password was not recorded
    for recorded, shown in (("http://127.0.0.1:9", "http://127.0.0.1:9"), ("http://al:s3cret@127.0.0.1:9", None)):
        resume.write_run_record(cfg, "away", recorded, "0" * 32)
        code, out, err = cli(capsys, "eval", str(ckpt), "--batches", "1")
        assert code == 0, err
        assert "logging to the current store instead" in err and "s3cret" not in out + err
        run = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1)[0]
        assert run.info.run_name == "eval-away" and "eval/loss" in run.data.metrics
        assert run.data.tags["raydrat.evaluates.run"] == f"{shown or 'http://al:***@127.0.0.1:9'} {'0' * 32}"
        assert out.splitlines()[-1] == f"  logged to MLflow run {run.info.run_id} in {current}"

    named = f"sqlite:///{tmp_path / 'named.db'}"
    code, out, err = cli(capsys, "eval", str(ckpt), "--batches", "1", "--tracking-uri", named)
    assert code == 0, err
    client = MlflowClient(named)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "eval-away" and out.splitlines()[-1].endswith(f"in {named}")


def test_generate_into_a_pipe_prints_its_progress_on_stderr_and_the_text_alone_on_stdout(run, capsys, monkeypatch):
    from raydrat import progress

    _, ckpt = run
    args = ("generate", str(ckpt), "--prompt", "def ", "--max-new-tokens", "6", "--no-stop", "--seed", "1")
    code, quiet, err = cli(capsys, *args)
    assert code == 0 and "generate:" not in err  # a short generation prints no progress
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    code, out, err = cli(capsys, *args)
    assert code == 0 and out == quiet  # the text is the same, and alone on stdout
    lines = [ln for ln in err.splitlines() if ln.startswith("generate: ")]
    assert [ln.split(",")[0] for ln in lines[:-1]] == [f"generate: {i}/6 tokens" for i in range(1, 7)]
    assert lines[-1].startswith("generate: 6 tokens in ") and lines[-1].endswith(" tokens/s")


# ----------------------------------------------------------------------------- export


def test_export_hf_loads_in_transformers_same_logits_and_greedy_text(run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg, ckpt = run
    out = tmp_path / "hf"
    assert cli(capsys, "export", str(ckpt), "--format", "hf", "--out", str(out))[0] == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    loaded = load_model(ckpt)
    idx = next(iter(_eval_batches(cfg, None, 2)))[:, :-1]
    with torch.no_grad():
        diff = (hf(idx).logits - loaded.model(idx)[0]).abs().max().item()
    assert diff <= 1e-4, diff
    prompt = "import os\n"
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = hf.generate(
            ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=hf_tok.pad_token_id
        )
    ours = generate(loaded.model, ids[0].tolist(), 20, temperature=0.0)
    assert hf_tok.decode(theirs[0, ids.shape[1] :]) == hf_tok.decode(ours)
    # generate reads the export directory too (its config.json carries raydrat's model config)
    a = cli(
        capsys, "generate", str(out), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12", "--no-stop"
    )[1]
    b = cli(
        capsys, "generate", str(ckpt), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12", "--no-stop"
    )[1]
    assert a == b


def test_export_safetensors_keeps_the_run_config(run, tmp_path, capsys):
    cfg, ckpt = run
    out = tmp_path / "st"
    assert cli(capsys, "export", str(ckpt), "--format", "safetensors", "--out", str(out))[0] == 0
    back, orig = load_model(out), load_model(ckpt)
    assert back.cfg == orig.cfg
    for (k, a), (_, b) in zip(back.model.state_dict().items(), orig.model.state_dict().items()):
        assert torch.equal(a, b), k


# ----------------------------------------------------------------------------- init_from


def test_init_from_an_export_or_a_checkpoint_continues_from_its_weights(run, tmp_path, capsys):
    cfg, ckpt = run
    cli(capsys, "export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf"))
    source = load_model(ckpt).model
    block = next(iter(_eval_batches(cfg, None, cfg.train.batch_size)))
    with torch.no_grad():
        want = float(source(block[:, :-1], block[:, 1:])[1])
        fresh = float(build_model(cfg.model, seed=5)(block[:, :-1], block[:, 1:])[1])
    for where in (tmp_path / "hf", ckpt.parent):
        model = initial_model(cfg.model.model_copy(update={"init_from": str(where)}), seed=5)
        with torch.no_grad():
            got = float(model(block[:, :-1], block[:, 1:])[1])
        assert got == pytest.approx(want, abs=1e-4), where  # first-step loss is the source's
    assert abs(fresh - want) > 0.05  # and not what a fresh init gives


def test_init_from_another_architecture_names_the_parameter_and_both_shapes(run, capsys):
    cfg, ckpt = run
    wider = cfg.model.model_copy(update={"init_from": str(ckpt), "d_ff": 64})
    with pytest.raises(
        ConfigError,
        match=r"layers\.0\.mlp_branch\.layer\.gate_proj\.weight has shape \(192, 64\) "
        r"but the config's model needs \(64, 64\): set model\.d_ff",
    ):
        initial_model(wider)


# ----------------------------------------------------------------------------- bad input


def test_bad_sources_are_one_line_each(run, tmp_path, capsys, demo_dir):
    cfg, ckpt = run
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken" / "checkpoint_000001"
    shutil.copytree(ckpt, broken)
    os.remove(broken / "manifest-rank0.json")
    lnorm = debug_cfg(demo_dir, tmp_path / "runs", "model.norm=layernorm")
    ln_ckpt = save_run(lnorm, "ln")
    cases = [
        (("generate", str(tmp_path / "nope"), "--prompt", "x"), "does not exist"),
        (("eval", str(tmp_path / "empty")), "is not a raydrat checkpoint, run or export"),
        (("generate", str(broken), "--prompt", "x"), "is incomplete (no manifest"),
        (("generate", str(broken.parent), "--prompt", "x"), "has no complete checkpoint"),
        (
            ("export", str(ln_ckpt), "--format", "hf", "--out", str(tmp_path / "x")),
            "model.activation=swiglu with model.norm=layernorm",
        ),
        (("generate", str(ckpt), "--prompt", "x", "--top-p", "1.5"), "--top-p 1.5 is out of range"),
    ]
    for args, culprit in cases:
        code, _, err = cli(capsys, *args)
        assert code == 2, args
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("raydrat: error: ") and culprit in lines[0], (args, err)
    assert not (tmp_path / "x").exists()  # refused before anything was written


# ----------------------------------------------------------------------------- MLflow models


def test_model_logged_loads_with_mlflow_pytorch_and_registers(run, tmp_path, monkeypatch):
    cfg, ckpt = run
    monkeypatch.chdir(tmp_path)  # MLflow resolves nothing against the test's cwd: the store's folder is used
    uri = f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}"
    (tmp_path / "store").mkdir()
    mlrun = tracking.Run.start(uri, "models", "m")
    model = load_model(ckpt).model
    model_uri = mlrun.log_model(model, "model", registered_model_name="raydrat-debug", step=12)
    assert mlrun.status() == "RUNNING"  # logging a model leaves the run as it was
    mlflow.set_tracking_uri(uri)
    try:
        os.chdir(tmp_path / "store")
        back = mlflow.pytorch.load_model(model_uri)
        versions = MlflowClient(uri).search_model_versions("name='raydrat-debug'")
        by_name = mlflow.pytorch.load_model("models:/raydrat-debug/1")
    finally:
        mlflow.set_tracking_uri("")
    idx = torch.randint(0, cfg.model.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])
        assert torch.equal(by_name(idx)[0], model(idx)[0])
    assert [v.run_id for v in versions] == [mlrun.run_id]
    assert not (tmp_path / "mlartifacts").exists()  # artifacts beside the store, not in the cwd


@pytest.mark.slow
def test_a_run_logs_its_final_and_best_models_and_registers_the_best(demo_dir, tmp_path, monkeypatch, ray_local):
    """Through Ray Train: the weights are spoiled after step 10, so the step-20 save is worse
    than the step-10 one: both are logged, the best registered; both load with
    mlflow.pytorch and equal their checkpoints' models."""
    import faults

    from raydrat.ray_train.trainer import run_training

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = debug_cfg(
        demo_dir,
        tmp_path / "runs",
        f"tracking.tracking_uri={uri}",
        "tracking.register_model=rd",
        "train.steps=20",
        "train.eval_every=10",
    )
    summary = run_training(cfg, fit_callbacks=[faults.SpoilAt(12)])
    c = MlflowClient(uri)
    models = {m.name: m for m in c.search_logged_models([summary.run.experiment_id()])}
    assert set(models) == {"model", "best_model"}
    assert all(m.source_run_id == summary.run.run_id for m in models.values())
    (version,) = c.search_model_versions("name='rd'")
    assert models["best_model"].model_id in version.source and version.run_id == summary.run.run_id
    mlflow.set_tracking_uri(uri)
    try:
        best = mlflow.pytorch.load_model("models:/rd/1")
        final = mlflow.pytorch.load_model(models["model"].model_uri)
    finally:
        mlflow.set_tracking_uri("")
    run_dir = tmp_path / "runs" / summary.run_name
    steps = {}
    for ckpt in (p for p in run_dir.glob("checkpoint_*") if p.is_dir()):
        loaded = load_model(ckpt)
        steps[loaded.step] = loaded.model
    idx = torch.randint(0, cfg.model.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(best(idx)[0], steps[10](idx)[0])
        assert torch.equal(final(idx)[0], steps[20](idx)[0])
    assert summary.run.status() == "FINISHED"
