"""raydrat.core.data and raydrat.ray_data: packing reconstructs the token stream, the split is deterministic and disjoint,
the Ray pipeline equals the local one, bad inputs raise DataError, the demo corpus is
reproducible. Most tests use a small synthetic corpus; Ray starts once for the module."""

from __future__ import annotations

import gzip
import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from raydrat.config import DataConfig
from raydrat.core.data import demo as demo_module
from raydrat.core.data import prepared
from raydrat.core.data.blocks import iter_blocks_local
from raydrat.core.data.demo import build_demo_corpus, read_manifest
from raydrat.core.data.errors import DataError
from raydrat.core.data.pack import pack_tokens
from raydrat.core.data.plan import plan_units, resolve_sources
from raydrat.core.data.position import DataPosition
from raydrat.core.data.read import read_unit
from raydrat.core.data.spec import make_spec
from raydrat.core.data.split import is_val_document
from raydrat.core.data.stream import epoch_blocks
from raydrat.core.data.tokenizer import load_tokenizer, special_ids, tokenizer_hash, train_tokenizer
from raydrat.ray_data import prepare as prep
from raydrat.ray_data.datasets import build_datasets
from raydrat.ray_data.stream import train_stream
from raydrat.ray_train.preflight import check_sources

SEQ_LEN = 16
BLOCK_LEN = SEQ_LEN + 1
VOCAB = 300
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi".split()


def make_docs(n: int, seed: int = 0) -> list[str | None]:
    """``n`` documents of 0 to 40 random words; every 25th is empty, one is null."""
    rng = random.Random(seed)
    docs: list[str | None] = [
        "" if i % 25 == 7 else f"doc{i} " + " ".join(rng.choices(WORDS, k=rng.randint(1, 40))) for i in range(n)
    ]
    docs[3] = None
    return docs


def write_parquet(path: Path, docs: list, column: str = "text", row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: pa.array(docs, pa.string())}), path, row_group_size=row_group_size)
    return path


def blocks_of(ds: ray.data.Dataset) -> list[tuple[int, ...]]:
    return sorted(tuple(row["tokens"].tolist()) for row in ds.take_all())


def train_rows(bundle) -> list[dict]:
    """The first epoch of a bundle's training stream, in the global order (seed 0), as rows."""
    return [{"tokens": b, "block_id": i} for i, b in epoch_blocks(bundle.train, 0, 0)]


def as_multiset(blocks) -> list[tuple[int, ...]]:
    return sorted(tuple(b.tolist()) for b in blocks)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    progress, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    yield
    ctx.enable_progress_bars = progress
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Three parquet files (one with several row groups) and a tokenizer trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    docs = make_docs(300)
    write_parquet(root / "a.parquet", docs[:100])
    write_parquet(root / "sub" / "b.parquet", docs[100:250], row_group_size=40)
    write_parquet(root / "c.parquet", docs[250:])
    tok_path = root.parent / f"{root.name}-tokenizer.json"
    train_tokenizer([d for d in docs if d], VOCAB, tok_path)
    return {"dir": root, "docs": docs, "tokenizer": tok_path}


def data_cfg(corpus: dict, path: str | Path | None = None, **kw) -> DataConfig:
    settings = dict(
        sources=[{"path": str(path or corpus["dir"])}],
        tokenizer_path=str(corpus["tokenizer"]),
        demo_dir=str(corpus["dir"].parent / "no-demo-here"),
        val_fraction=0.1,
        pack_rows=16,
        tokenize_batch_size=8,
    )
    settings.update(kw)
    return DataConfig(**settings)


# --------------------------------------------------------------------------------------
# layering
# --------------------------------------------------------------------------------------


def test_core_data_imports_without_ray_or_mlflow():
    """The data blocks are layer 2: a fresh interpreter that imports every module of
    raydrat.core.data has loaded neither ray nor mlflow (transitive imports included)."""
    core = Path(__file__).resolve().parents[1] / "raydrat" / "core" / "data"
    mods = sorted(p.stem for p in core.glob("*.py") if p.stem != "__init__")
    assert {"blocks", "plan", "read", "split", "pack", "prepared"} <= set(mods)
    code = "".join(f"import raydrat.core.data.{m}\n" for m in mods) + (
        "import sys; print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'}))"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=core.parents[2], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------
# packing and splitting (pure)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_len", [1, 5, 17, 1000])
def test_packed_blocks_reconstruct_the_stream(block_len):
    rng = random.Random(block_len)
    docs = [[rng.randrange(2, 50) for _ in range(rng.randrange(0, 30))] for _ in range(20)]
    blocks, leftover = pack_tokens(docs, eod_id=1, block_len=block_len)
    stream = [t for d in docs for t in (*d, 1)]
    assert all(len(b) == block_len for b in blocks)
    assert [t for b in blocks for t in b] == stream[: len(stream) - leftover]
    assert leftover == len(stream) % block_len
    assert pack_tokens([], eod_id=1, block_len=block_len) == ([], 0)


def test_split_rule_is_stable_and_near_val_fraction():
    texts = [f"document number {i}" for i in range(4000)]
    val = [i for i, t in enumerate(texts) if is_val_document(t, 0, 0.1)]
    # Pinned: changing the rule silently moves documents between train and val.
    assert len(val) == 404 and val[:5] == [2, 3, 12, 20, 32]
    assert val != [i for i, t in enumerate(texts) if is_val_document(t, 1, 0.1)]  # seeded


# --------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------


def reference_blocks(corpus: dict, cfg: DataConfig) -> dict[str, list[list[int]]]:
    """The documented rule, written out plainly: per parquet row group (files sorted), skip
    empty documents, split by text hash, pack each split in groups of pack_rows documents."""
    tok = load_tokenizer(corpus["tokenizer"], VOCAB)
    eod, _ = special_ids(tok)
    out: dict[str, list[list[int]]] = {"train": [], "val": []}
    for path in sorted(corpus["dir"].rglob("*.parquet")):
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            texts = [t for t in pf.read_row_group(rg)["text"].to_pylist() if t]
            for split in out:
                docs = [t for t in texts if is_val_document(t, cfg.split_seed, cfg.val_fraction) == (split == "val")]
                for i in range(0, len(docs), cfg.pack_rows):
                    ids = [tok.encode(d).ids for d in docs[i : i + cfg.pack_rows]]
                    out[split] += pack_tokens(ids, eod, BLOCK_LEN)[0]
    return out


def test_local_blocks_follow_the_documented_rule(corpus):
    cfg = data_cfg(corpus)
    expected = reference_blocks(corpus, cfg)
    for split in ("train", "val"):
        got = [b.tolist() for b in iter_blocks_local(cfg, SEQ_LEN, VOCAB, split)]
        assert got == expected[split]
        assert got == [b.tolist() for b in iter_blocks_local(cfg, SEQ_LEN, VOCAB, split)]
    assert not {tuple(b) for b in expected["train"]} & {tuple(b) for b in expected["val"]}
    n_train, n_val = len(expected["train"]), len(expected["val"])
    assert n_val > 0 and 0.03 < n_val / (n_train + n_val) < 0.25


@pytest.mark.slow
def test_ray_pipeline_equals_local_and_is_deterministic(corpus):
    cfg = data_cfg(corpus)
    bundle = build_datasets(cfg, SEQ_LEN, VOCAB)
    train, val = train_rows(bundle), bundle.val.take_all()
    for rows in (train, val):
        assert all(r["tokens"].dtype == np.int32 and r["tokens"].shape == (BLOCK_LEN,) for r in rows)
        assert len({r["block_id"] for r in rows}) == len(rows)
    assert as_multiset(r["tokens"] for r in train) == as_multiset(iter_blocks_local(cfg, SEQ_LEN, VOCAB, "train"))
    assert as_multiset(r["tokens"] for r in val) == as_multiset(iter_blocks_local(cfg, SEQ_LEN, VOCAB, "val"))

    docs = [d for d in corpus["docs"] if d]
    stats = bundle.stats
    assert (stats.docs, stats.empty_docs) == (len(docs), len(corpus["docs"]) - len(docs))
    val_docs = [d for d in docs if is_val_document(d, 0, 0.1)]
    assert stats.val_docs == len(val_docs) and stats.val_blocks == len(val)
    tok = load_tokenizer(bundle.tokenizer_path, VOCAB)
    assert stats.val_tokens == sum(len(tok.encode(d).ids) + 1 for d in val_docs)
    # Every val token is either in a block or counted as dropped.
    assert stats.val_tokens == stats.val_blocks * BLOCK_LEN + stats.val_dropped_tokens
    assert bundle.tokenizer_sha256 == tokenizer_hash(corpus["tokenizer"])

    again = build_datasets(cfg, SEQ_LEN, VOCAB)
    assert [r["block_id"] for r in train_rows(again)] == [r["block_id"] for r in train]
    assert blocks_of(again.val) == as_multiset(r["tokens"] for r in val)


def test_text_files_and_gzip(corpus, tmp_path):
    docs = [d for d in corpus["docs"] if d][:120]
    for i, doc in enumerate(docs):
        path = tmp_path / "txt" / f"{i:04d}.txt"
        path.parent.mkdir(exist_ok=True)
        if i % 3:
            path.write_text(doc, encoding="utf-8")
        else:
            path.with_suffix(".txt.gz").write_bytes(gzip.compress(doc.encode("utf-8")))
    (tmp_path / "txt" / "_SUCCESS").write_text("")
    cfg = data_cfg(corpus, sources=[{"path": str(tmp_path / "txt"), "format": "text"}])
    assert len(resolve_sources(cfg)) == len(docs)
    bundle = build_datasets(cfg, SEQ_LEN, VOCAB)
    assert bundle.stats.docs == len(docs)
    assert as_multiset(r["tokens"] for r in train_rows(bundle)) == as_multiset(
        iter_blocks_local(cfg, SEQ_LEN, VOCAB, "train")
    )


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


def test_missing_corpus_path(corpus, tmp_path):
    cfg = data_cfg(corpus, tmp_path / "nope")
    with pytest.raises(DataError, match=r"data.sources\[0\].path .*nope.* does not exist.*raydrat data demo"):
        resolve_sources(cfg)
    with pytest.raises(DataError, match="matches no files"):
        plan_units(data_cfg(corpus, tmp_path / "*.parquet"))


def test_parquet_without_text_column(corpus, tmp_path):
    path = write_parquet(tmp_path / "body.parquet", ["some text"], column="body")
    with pytest.raises(DataError, match=re.escape(f"{path} has no column 'text' (columns: body)")):
        build_datasets(data_cfg(corpus, path), SEQ_LEN, VOCAB)
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"column 'text' of .*ints.parquet is int64, not text"):
        plan_units(data_cfg(corpus, tmp_path / "ints.parquet"))


@pytest.mark.parametrize(
    "docs, match",
    [
        (
            ["", None, ""],
            "produced no blocks of seq_len\\+1 = 17 tokens: all 3 documents are empty",
        ),
        ([], "produced no blocks of seq_len\\+1 = 17 tokens: it holds no documents"),
        (
            ["a b", "c"],
            "produced no blocks of seq_len\\+1 = 17 tokens: its 2 documents are too short",
        ),
    ],
    ids=["all-empty", "empty-file", "too-short"],
)
def test_empty_corpus(corpus, tmp_path, docs, match):
    path = write_parquet(tmp_path / "empty.parquet", docs)
    with pytest.raises(DataError, match=match):
        build_datasets(data_cfg(corpus, path), SEQ_LEN, VOCAB)


def test_prepare_of_all_null_input_says_so_and_publishes_nothing(corpus, tmp_path):
    path = write_parquet(tmp_path / "nulls.parquet", [None, None, ""])
    out = tmp_path / "prepared"
    with pytest.raises(
        DataError, match=r"all 3 documents are empty or null: point data.sources at some text \(nothing was published\)"
    ):
        prep.prepare(data_cfg(corpus, path), SEQ_LEN, VOCAB, str(out))
    assert not (out / "manifest.json").exists()


def test_corpus_too_small_for_val(corpus, tmp_path):
    train_only = [d for d in corpus["docs"][:60] if d and not is_val_document(d, 0, 0.1)]
    path = write_parquet(tmp_path / "small.parquet", train_only)
    with pytest.raises(DataError, match=r"too small to hold out a validation block with data.val_fraction = 0.1"):
        build_datasets(data_cfg(corpus, path), SEQ_LEN, VOCAB)


def test_invalid_utf8_is_replaced_and_counted(corpus, tmp_path):
    (tmp_path / "ok.txt").write_text(" ".join(WORDS * 20), encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 " * 50)
    (tmp_path / "lines.txt").write_bytes(b"good line\nbad \xff line\n\nlast\n")
    cfg = data_cfg(corpus, sources=[{"path": str(tmp_path / "*.txt"), "format": "text"}])
    bundle = build_datasets(cfg, SEQ_LEN, VOCAB)
    # bad.txt, and lines.txt as one document (file mode): both kept, replaced, counted
    assert bundle.stats.invalid_utf8_docs == 2 and bundle.stats.docs == 3
    assert bundle.counts()["invalid_utf8_docs"] == 2.0
    lines = data_cfg(corpus, sources=[{"path": str(tmp_path / "lines.txt"), "format": "text", "text_mode": "line"}])
    docs, counts = read_unit(plan_units(lines)[0], make_spec(lines, SEQ_LEN, VOCAB)[0])
    assert sorted(docs["train"] + docs["val"]) == sorted(["good line", "bad \ufffd line", "last"])
    assert counts["invalid_utf8_docs"] == 1 and counts["empty_docs"] == 1


def test_tokenizer_errors(corpus, tmp_path):
    n = load_tokenizer(corpus["tokenizer"], VOCAB).get_vocab_size()
    with pytest.raises(DataError, match=rf"has {n} tokens but model.vocab_size is 260: raise model.vocab_size"):
        load_tokenizer(corpus["tokenizer"], 260)
    with pytest.raises(
        DataError,
        match=r"missing.json not found: run `raydrat data demo` or set data.tokenizer_path",
    ):
        load_tokenizer(tmp_path / "missing.json", VOCAB)
    with pytest.raises(DataError, match=r"model.vocab_size \(100\) is below the 258 tokens"):
        train_tokenizer(["abc"], 100, tmp_path / "t.json")
    cfg = data_cfg(corpus, tokenizer_path=str(corpus["tokenizer"]))
    with pytest.raises(DataError, match="model.vocab_size is 260"):
        build_datasets(cfg, SEQ_LEN, 260)


# --------------------------------------------------------------------------------------
# the demo corpus
# --------------------------------------------------------------------------------------


def test_demo_corpus_is_reproducible(tmp_path):
    first = build_demo_corpus(tmp_path / "a", 512)
    second = build_demo_corpus(tmp_path / "b", 512)
    manifest = read_manifest(first)
    assert manifest == read_manifest(second)
    assert tokenizer_hash(first / "tokenizer-512.json") == tokenizer_hash(second / "tokenizer-512.json")
    assert load_tokenizer(first / "tokenizer-512.json", 512).get_vocab_size() == 512
    assert 5e6 < manifest["n_bytes"] < 40e6 and manifest["n_docs"] > 100
    shards = sorted(p.name for p in (first / "corpus").iterdir())
    assert shards == [Path(f["path"]).name for f in manifest["files"]]
    start = time.perf_counter()
    assert build_demo_corpus(first, 512) == first
    assert time.perf_counter() - start < 0.5


@pytest.fixture
def tiny_stdlib(monkeypatch):
    """Replace the standard library by a few documents (fast demo builds)."""
    docs = [(f"m{i}.py", f"def f{i}(x):\n    return x * {i}\n" * 20) for i in range(30)]
    monkeypatch.setattr(demo_module, "stdlib_documents", lambda: (docs, 0))


def crash(*args, **kwargs):
    raise RuntimeError("crash")


def test_demo_keeps_one_tokenizer_per_vocab_size(tiny_stdlib, tmp_path):
    out = build_demo_corpus(tmp_path / "demo", 300)
    shards = {p: p.stat().st_mtime_ns for p in (out / "corpus").iterdir()}
    small = (out / "tokenizer-300.json").read_bytes()
    build_demo_corpus(out, 400)
    assert {p: p.stat().st_mtime_ns for p in (out / "corpus").iterdir()} == shards
    assert (out / "tokenizer-300.json").read_bytes() == small  # not overwritten
    assert load_tokenizer(out / "tokenizer-400.json", 400).get_vocab_size() > 300
    assert load_tokenizer(out / "tokenizer-300.json", 300).get_vocab_size() <= 300
    assert not list(out.glob(".*tmp*"))


def test_demo_crash_leaves_nothing_complete(tiny_stdlib, tmp_path, monkeypatch):
    write_json = demo_module._write_json
    monkeypatch.setattr(demo_module, "_write_json", crash)
    with pytest.raises(RuntimeError):
        build_demo_corpus(tmp_path / "demo", 300)
    assert list(tmp_path.iterdir()) == []  # neither the demo dir nor the temporary one
    monkeypatch.setattr(demo_module, "_write_json", write_json)
    monkeypatch.setattr(demo_module, "train_tokenizer", crash)
    with pytest.raises(RuntimeError):
        build_demo_corpus(tmp_path / "demo", 300)
    assert not (tmp_path / "demo" / "tokenizer-300.json").exists()  # so the next call retrains
    monkeypatch.setattr(demo_module, "train_tokenizer", train_tokenizer)
    build_demo_corpus(tmp_path / "demo", 300)
    assert (tmp_path / "demo" / "tokenizer-300.json").is_file()


# --------------------------------------------------------------------------------------
# mixing, corrupt files, prepare, the tokenizer command
# --------------------------------------------------------------------------------------


def test_weighted_mixing_gives_the_expected_proportions(corpus, tmp_path):
    """Source A holds ~4x the text of B; weights 1:3 must give B ~75% of training tokens."""
    rng = random.Random(7)
    a = [" ".join(rng.choices(WORDS, k=30)) for _ in range(800)]
    b = [" ".join(rng.choices(WORDS, k=30)) for _ in range(200)]
    write_parquet(tmp_path / "a" / "a.parquet", a, row_group_size=100)
    write_parquet(tmp_path / "b" / "b.parquet", b, row_group_size=50)
    cfg = data_cfg(
        corpus, sources=[{"path": str(tmp_path / "a"), "weight": 1.0}, {"path": str(tmp_path / "b"), "weight": 3.0}]
    )
    plan = plan_units(cfg)
    source_of = {u.unit_id: u.source for u in plan}
    rates = {u.source: u.rate for u in plan}
    assert rates[0] < 1 < rates[1]
    rows = train_rows(build_datasets(cfg, SEQ_LEN, VOCAB))
    share_b = sum(source_of[r["block_id"] >> 32] for r in rows) / len(rows)
    assert abs(share_b - 0.75) < 0.05, share_b
    natural = data_cfg(corpus, sources=[{"path": str(tmp_path / "a")}, {"path": str(tmp_path / "b")}])
    n_natural = sum(1 for _ in iter_blocks_local(natural, SEQ_LEN, VOCAB, "train"))
    assert abs(len(rows) - n_natural) / n_natural < 0.1  # an epoch keeps about its size
    with pytest.raises(Exception, match=r"data.sources\[1\].weight is missing"):
        data_cfg(corpus, sources=[{"path": str(tmp_path / "a"), "weight": 1.0}, {"path": str(tmp_path / "b")}])


def test_corrupt_parquet_is_named_or_skipped_and_counted(corpus, tmp_path):
    write_parquet(tmp_path / "good.parquet", [d for d in corpus["docs"][:200] if d])
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(DataError, match=r"bad.parquet is not a readable parquet file.*data.on_corrupt = skip"):
        build_datasets(data_cfg(corpus, tmp_path), SEQ_LEN, VOCAB)
    bundle = build_datasets(data_cfg(corpus, tmp_path, on_corrupt="skip"), SEQ_LEN, VOCAB)
    assert bundle.stats.skipped_files == 1
    assert "bad.parquet" in bundle.lineage["skipped_files"][0]


@pytest.mark.slow
def test_prepare_conserves_tokens_and_publishes_last(corpus, tmp_path, monkeypatch):
    cfg = data_cfg(corpus)
    out = tmp_path / "prepared"
    manifest = prep.prepare(cfg, SEQ_LEN, VOCAB, str(out))
    c = manifest["counts"]
    tok = load_tokenizer(corpus["tokenizer"], VOCAB)
    docs = [d for d in corpus["docs"] if d]
    train_docs = [d for d in docs if not is_val_document(d, 0, 0.1)]
    # every token of every training document (plus its end-of-document token) is either in
    # a block or counted as a packing-group tail
    assert c["train_tokens"] == sum(len(tok.encode(d).ids) + 1 for d in train_docs)
    assert c["train_tokens"] == c["train_blocks"] * BLOCK_LEN + c["train_dropped_tokens"]
    assert (c["docs"], c["empty_docs"]) == (len(docs), len(corpus["docs"]) - len(docs))
    assert as_multiset(prepared.iter_prepared_blocks(str(out), "train")) == as_multiset(
        iter_blocks_local(cfg, SEQ_LEN, VOCAB, "train")
    )
    assert manifest["files"][0]["sha256"] and manifest["seq_len"] == SEQ_LEN
    # a prepare that fails before publishing leaves the old manifest (and its shards) intact
    monkeypatch.setattr(prep, "publish_manifest", crash)
    with pytest.raises(RuntimeError):
        prep.prepare(cfg, SEQ_LEN, VOCAB, str(out))
    assert prepared.read_manifest(str(out)) == manifest
    assert (out / manifest["train_files"][0]).is_file()
    with pytest.raises(DataError, match=r"manifest.json not found.*incomplete"):
        prepared.read_manifest(str(tmp_path / "never-prepared"))


def test_tokenizer_command_trains_on_a_sample(corpus, tmp_path):
    from conftest import run_cli

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        f"model: {{vocab_size: {VOCAB}}}\ndata:\n  sources: [{{path: {corpus['dir']}}}]\n  tokenizer_sample_docs: 50\n"
    )
    out = tmp_path / "tok.json"
    res = run_cli(["data", "tokenizer", str(cfg_path), "--out", str(out)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "trained on 50 documents" in res.stdout
    assert 258 < load_tokenizer(out, VOCAB).get_vocab_size() <= VOCAB
    res = run_cli(
        [
            "data",
            "tokenizer",
            str(cfg_path),
            "--out",
            str(out),
            "--set",
            f"data.sources=[{{path: {tmp_path / 'nope'}}}]",
        ],
        cwd=tmp_path,
    )
    assert res.returncode == 2 and "nope does not exist" in res.stderr


def test_prepare_command_prints_the_counts(corpus, tmp_path, capsys):
    from raydrat.cli import main

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        f"model: {{vocab_size: {VOCAB}, seq_len: {SEQ_LEN}}}\n"
        f"data:\n  sources: [{{path: {corpus['dir']}}}]\n  tokenizer_path: {corpus['tokenizer']}\n"
        "  val_fraction: 0.1\n  pack_rows: 16\n"
    )
    assert main(["data", "prepare", str(cfg_path), "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    docs = [d for d in corpus["docs"] if d]
    assert f"{len(docs):,} documents ({len(corpus['docs']) - len(docs)} empty skipped" in out
    assert f"data.prepared={tmp_path / 'p'}" in out


# --------------------------------------------------------------------------------------
# reader failures are one line; formats inferred; NUL counted; mixing met in tokens
# --------------------------------------------------------------------------------------


def write_checked_parquet(path: Path, docs: list, row_group_size: int) -> Path:
    """Uncompressed, no dictionary, page checksums: damage to a data page is detectable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"text": pa.array(docs, pa.string())}),
        path,
        row_group_size=row_group_size,
        compression="none",
        use_dictionary=False,
        write_page_checksum=True,
    )
    return path


@pytest.mark.slow
def test_corrupt_data_page_is_named_with_its_row_group_and_honours_on_corrupt(corpus, tmp_path):
    from faults import corrupt_data_page

    from raydrat.cli import error_message

    docs = [d for d in corpus["docs"] if d]
    bad = write_checked_parquet(tmp_path / "c" / "bad.parquet", docs[:180], row_group_size=60)
    corrupt_data_page(bad, 2)  # the footer stays valid: the plan sees three good row groups
    # val_max_units=1: the check reads unit 0 only, the damage is found while streaming
    cfg = data_cfg(corpus, bad.parent, val_max_units=1)
    want = r"bad.parquet row group 2 is corrupt \(.*CRC.*\): fix or remove it, or set data.on_corrupt = skip"
    with pytest.raises(DataError, match=want):
        list(iter_blocks_local(cfg, SEQ_LEN, VOCAB, "train"))
    bundle = build_datasets(cfg, SEQ_LEN, VOCAB)
    with pytest.raises(Exception) as info:  # the training stream: what the CLI prints is the same one line
        train_rows(bundle)
    assert re.fullmatch(f".*{want}", error_message(info.value)), error_message(info.value)[:3000]

    skip = data_cfg(corpus, bad.parent, val_max_units=1, on_corrupt="skip")
    rows = train_rows(build_datasets(skip, SEQ_LEN, VOCAB))
    local = list(iter_blocks_local(skip, SEQ_LEN, VOCAB, "train"))
    assert as_multiset(r["tokens"] for r in rows) == as_multiset(local) and local
    good = write_checked_parquet(tmp_path / "g" / "good.parquet", docs[:120], row_group_size=60)
    assert as_multiset(local) == as_multiset(
        iter_blocks_local(data_cfg(corpus, good.parent, val_max_units=1), SEQ_LEN, VOCAB, "train")
    )

    out = tmp_path / "prepared"  # prepare: one line, and nothing half-written
    with pytest.raises(DataError, match=r"row group 2 is corrupt"):
        prep.prepare(cfg, SEQ_LEN, VOCAB, str(out))
    assert sorted(p.name for p in out.iterdir()) == []


def test_text_sources_without_a_format_are_read_as_text(corpus, tmp_path):
    docs = [d for d in corpus["docs"][:60] if d]
    d = tmp_path / "txt"
    d.mkdir()
    for i, doc in enumerate(docs):
        if i % 2:
            (d / f"{i:03d}.txt.gz").write_bytes(gzip.compress(doc.encode()))
        else:
            (d / f"{i:03d}.txt").write_text(doc)
    explicit = data_cfg(corpus, sources=[{"path": str(d), "format": "text"}])
    want = as_multiset(iter_blocks_local(explicit, SEQ_LEN, VOCAB, "train"))
    for path in (d, d / "*.txt*"):
        inferred = data_cfg(corpus, sources=[{"path": str(path)}])
        assert as_multiset(iter_blocks_local(inferred, SEQ_LEN, VOCAB, "train")) == want
    one = data_cfg(corpus, sources=[{"path": str(d / "001.txt.gz")}])
    assert plan_units(one)[0].format == "text"
    assert plan_units(data_cfg(corpus))[0].format == "parquet"  # a directory of parquet files
    forced = data_cfg(corpus, sources=[{"path": str(d / "000.txt"), "format": "parquet"}])
    with pytest.raises(DataError, match=r"000.txt is not a readable parquet file .*set data.sources\[0\].format: text"):
        plan_units(forced)


def test_nul_bytes_are_replaced_and_counted_like_invalid_utf8(corpus, tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "nul.txt").write_bytes(b"binary\x00junk " * 20)
    (tmp_path / "t" / "ok.txt").write_text("plain words " * 20)
    cfg = data_cfg(corpus, sources=[{"path": str(tmp_path / "t")}])
    docs, counts = read_unit(plan_units(cfg)[0], make_spec(cfg, SEQ_LEN, VOCAB)[0])
    assert counts["invalid_utf8_docs"] == 1 and counts["docs"] == 2
    assert not any("\x00" in t for t in docs["train"] + docs["val"])
    assert any("binary\ufffdjunk" in t for t in docs["train"] + docs["val"])
    write_parquet(tmp_path / "p" / "nul.parquet", ["a\x00b " * 30, "clean text " * 30, None])
    pcfg = data_cfg(corpus, sources=[{"path": str(tmp_path / "p")}])
    docs, counts = read_unit(plan_units(pcfg)[0], make_spec(pcfg, SEQ_LEN, VOCAB)[0])
    assert counts["invalid_utf8_docs"] == 1 and counts["docs"] == 2 and counts["empty_docs"] == 1


def test_weighted_mixing_is_met_in_tokens_whatever_the_parquet_encoding(corpus, tmp_path):
    """Source A repeats 30 documents 25 times (its dictionary-encoded column stores each
    once), source B holds 750 distinct ones of the same length; weights 1:1 must give each
    about half of the training tokens, on Ray and locally."""
    from raydrat.core.data.blocks import plan_local, unit_blocks
    from raydrat.core.data.plan import plan_corpus

    rng = random.Random(11)
    distinct = [" ".join(rng.choices(WORDS, k=30)) for _ in range(30)]
    write_parquet(tmp_path / "a" / "a.parquet", distinct * 25, row_group_size=150)  # pyarrow's default: dictionary
    write_parquet(
        tmp_path / "b" / "b.parquet", [" ".join(rng.choices(WORDS, k=30)) for _ in range(750)], row_group_size=150
    )
    cfg = data_cfg(
        corpus, sources=[{"path": str(tmp_path / "a"), "weight": 1.0}, {"path": str(tmp_path / "b"), "weight": 1.0}]
    )
    footers = plan_corpus(cfg).source_bytes
    assert footers[1] > 4 * footers[0]  # the metadata says A is a small fraction of B: rates from it would be wrong
    spec = make_spec(cfg, SEQ_LEN, VOCAB)[0]
    plan = plan_local(cfg, spec)
    tokens = [0, 0]
    for unit in plan.units:
        for _, blocks in unit_blocks(unit, spec, "train"):
            tokens[unit.source] += blocks.size
    assert abs(tokens[0] / sum(tokens) - 0.5) < 0.05, tokens
    source_of = {u.unit_id: u.source for u in plan.units}
    bundle = build_datasets(cfg, SEQ_LEN, VOCAB)
    rows = train_rows(bundle)
    share_a = sum(1 for r in rows if source_of[r["block_id"] >> 32] == 0) / len(rows)
    assert abs(share_a - 0.5) < 0.05, share_a
    # what the run reports is measured too: each source's text bytes, and shares that fit them
    truth = [
        sum(len(t.encode()) for t in pq.read_table(tmp_path / n / f"{n}.parquet")["text"].to_pylist()) for n in "ab"
    ]
    for got, want in zip(bundle.lineage["source_text_bytes"], truth, strict=True):
        assert abs(got - want) / want < 0.1, (bundle.lineage["source_text_bytes"], truth)
    sizes = bundle.lineage["source_sizes"]
    assert [s["token_share_target"] for s in sizes] == [0.5, 0.5]
    assert all(abs(s["token_share_planned"] - 0.5) < 1e-9 for s in sizes)
    assert abs(sizes[0]["token_share_natural"] - 0.5) < 0.1  # the footers alone said about 0.2
    # the worker's stream (train_stream) reports each unit it read whole: the achieved shares
    position = DataPosition()
    for _ in train_stream(bundle.train, position, 0, 1, 8, 0, counter=bundle.counter):
        if position.epoch >= 1:
            break
    (line,) = bundle.achieved_shares()
    shares = [float(x) for x in re.findall(r"achieved ([0-9.]+)%", line)]
    assert line.startswith("data: epoch 0: sources[0] target 50.0%") and abs(shares[0] - 50) < 5, line


@pytest.mark.slow
def test_prepare_keeps_generations_a_reader_holds_and_cleans_crashed_prefixes(corpus, tmp_path):
    """A run that opened a prepared directory reads it to the end while later prepares
    publish new generations; old ones go once no reader holds them; what a killed prepare
    left is removed by the next one."""
    from raydrat.cli import main
    from raydrat.core.data.prepared import Lease
    from raydrat.core.data.sources import location_for

    cfg = data_cfg(corpus)
    out = tmp_path / "prepared"
    first = prep.prepare(cfg, SEQ_LEN, VOCAB, str(out), keep=1)
    reader = build_datasets(cfg.model_copy(update={"prepared": str(out)}), SEQ_LEN, VOCAB)  # holds a lease
    second = prep.prepare(cfg, SEQ_LEN, VOCAB, str(out), keep=1)
    third = prep.prepare(cfg, SEQ_LEN, VOCAB, str(out), keep=1)
    # the reader's generation survived two prepares with keep=1; the unread middle one did not
    assert as_multiset(r["tokens"] for r in train_rows(reader)) == as_multiset(
        prepared.iter_prepared_blocks(str(out), "train")
    )
    assert (out / first["shards"]).is_dir() and not (out / second["shards"]).exists()
    assert prepared.read_manifest(str(out))["published"] == [third["shards"]]

    # a prepare killed mid-way: its shards and its lease (its process is gone) stay behind
    crashed = out / "shards-20260101-000000-deadbeef"
    shutil.copytree(out / third["shards"], crashed)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease = Lease(location_for(str(out)), str(out), crashed.name, "a killed prepare")
    lease._write()
    record = json.loads(Path(lease.path).read_text())
    Path(lease.path).write_text(json.dumps({**record, "pid": int(dead.stdout)}))

    reader.release()
    fourth = prep.prepare(cfg, SEQ_LEN, VOCAB, str(out), keep=2)  # cleans up before and after it writes
    left = sorted(p.name for p in out.glob("shards-*"))
    assert left == sorted([third["shards"], fourth["shards"]]), left
    assert not (out / "leases").exists()  # every lease released, the dead one removed
    # `raydrat data gc` keeps only what is asked for
    assert main(["data", "gc", str(out), "--keep", "1"]) == 0
    assert sorted(p.name for p in out.glob("shards-*")) == [fourth["shards"]]


def test_the_checks_before_ray_build_no_demo_corpus_and_still_check_the_other_sources(tmp_path, demo_dir):
    """`path: demo` not built yet is left to the run (built after the cluster checks, which may
    refuse it); the other sources and a named tokenizer are still checked, a built demo corpus
    and its tokenizer too."""
    from raydrat.config import load_config

    absent = tmp_path / "demo"
    cfg = load_config("debug", [f"data.demo_dir={absent}"])
    check_sources(cfg)
    assert not absent.exists() and list(tmp_path.iterdir()) == []
    wrong = load_config(
        "debug", [f"data.demo_dir={absent}", f"data.sources=[{{path: demo}}, {{path: {tmp_path / 'nope'}}}]"]
    )
    with pytest.raises(DataError, match="nope"):
        check_sources(wrong)
    assert not absent.exists()
    small = load_config("debug", [f"data.demo_dir={demo_dir}", "model.vocab_size=300"])  # no tokenizer of 300 there
    check_sources(small)
    assert not (demo_dir / "tokenizer-300.json").exists()
    named = [
        f"data.demo_dir={absent}",
        f"data.tokenizer_path={demo_dir / 'tokenizer-512.json'}",
        "model.vocab_size=300",
    ]
    with pytest.raises(DataError, match="has 512 tokens but model.vocab_size is 300"):
        check_sources(load_config("debug", named))
    assert not absent.exists()
