"""JSON Lines and saved Hugging Face datasets as corpus sources: the same texts give the same
token stream as in parquet (the reference format), locally and on S3, with the same
accounting and one-line errors."""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydrat.cli import main
from raydrat.config import DataConfig
from raydrat.core.data.blocks import iter_blocks_local
from raydrat.core.data.errors import DataError
from raydrat.core.data.plan import plan_corpus
from raydrat.core.data.read import read_unit
from raydrat.core.data.spec import make_spec

SEQ, VOCAB = 32, 512


def _texts(n: int = 120, seed: int = 0) -> list[str | None]:
    rng = random.Random(seed)
    words = ["ray", "data", "train", "tokens", "block", "model", "\u00e9t\u00e9", "\u4e2d\u6587", "json", "line"]
    out: list[str | None] = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) for _ in range(n)]
    out[3] = ""  # an empty document
    out[7] = None  # a missing text
    out[11] = 'quote " and newline\n inside'
    return out


def _write_all(tmp: Path, texts: list[str | None]) -> dict[str, Path]:
    """The same documents as parquet (one row group), jsonl, jsonl.gz and a saved dataset."""
    import datasets  # the writer of the `hf` format; heavy to import, only these tests need it

    datasets.disable_progress_bars()

    pq.write_table(
        pa.table({"text": pa.array(texts, pa.string()), "id": list(range(len(texts)))}),
        tmp / "c.parquet",
        row_group_size=len(texts),
    )
    lines = [json.dumps({"id": i, "text": t} if t is not None else {"id": i}) for i, t in enumerate(texts)]
    (tmp / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp / "gz").mkdir()
    (tmp / "gz" / "c.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))}).save_to_disk(str(tmp / "hfds"))
    return {"parquet": tmp / "c.parquet", "jsonl": tmp / "c.jsonl", "jsonl.gz": tmp / "gz", "hf": tmp / "hfds"}


def _cfg(demo_dir: Path, path: Path | str, **src) -> DataConfig:
    return DataConfig(
        sources=[{"path": str(path), **src}],
        demo_dir=str(demo_dir),
        tokenizer_path=str(demo_dir / "tokenizer-512.json"),
        pack_rows=16,
        val_fraction=0.2,
    )


def _stream(cfg: DataConfig, split: str) -> np.ndarray:
    return np.concatenate(list(iter_blocks_local(cfg, SEQ, VOCAB, split)))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("formats")
    return _write_all(tmp, _texts())


def test_formats_are_inferred(demo_dir, corpora):
    assert plan_corpus(_cfg(demo_dir, corpora["jsonl"])).source_formats == ["jsonl"]
    assert plan_corpus(_cfg(demo_dir, corpora["jsonl.gz"])).source_formats == ["jsonl"]  # a directory of .jsonl.gz
    assert plan_corpus(_cfg(demo_dir, corpora["hf"])).source_formats == ["hf"]


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "hf"])
def test_same_token_stream_as_parquet(demo_dir, corpora, fmt):
    ref = _cfg(demo_dir, corpora["parquet"])
    other = _cfg(demo_dir, corpora[fmt])
    for split in ("train", "val"):
        a, b = _stream(ref, split), _stream(other, split)
        assert a.shape == b.shape and a.size > 0
        np.testing.assert_array_equal(a, b)
    spec, _ = make_spec(other, SEQ, VOCAB)
    (unit,) = plan_corpus(other).units
    (ref_unit,) = plan_corpus(ref).units
    counts, ref_counts = read_unit(unit, spec)[1], read_unit(ref_unit, spec)[1]
    assert counts == {**ref_counts, "corrupt_lines": 0}
    assert counts["empty_docs"] == 2  # "" and the missing text, counted as in parquet


def test_bad_jsonl_line_is_refused_or_counted_and_skipped(demo_dir, tmp_path):
    texts = [t for t in _texts() if t]
    lines = [json.dumps({"text": t}) for t in texts]
    lines[5] = '{"text": "cut off'
    lines[9] = "[1, 2]"
    (tmp_path / "bad.jsonl").write_text("\n".join(lines), encoding="utf-8")
    cfg = _cfg(demo_dir, tmp_path / "bad.jsonl")
    spec, _ = make_spec(cfg, SEQ, VOCAB)
    (unit,) = plan_corpus(cfg).units
    with pytest.raises(DataError, match=r"bad\.jsonl line 6 is not a JSON object .*data\.on_corrupt = skip"):
        read_unit(unit, spec)
    skip = cfg.model_copy(update={"on_corrupt": "skip"})
    spec_skip, _ = make_spec(skip, SEQ, VOCAB)
    docs, counts = read_unit(unit, spec_skip)
    assert counts["corrupt_lines"] == 2 and counts["docs"] == len(texts) - 2 and counts["skipped_files"] == 0
    good = [t for i, t in enumerate(texts) if i not in (5, 9)]
    assert sorted(docs["train"] + docs["val"]) == sorted(good)


def test_bad_inputs_are_one_error_line(demo_dir, tmp_path, corpora, capsys):
    import datasets  # writes the DatasetDict refused below

    datasets.disable_progress_bars()

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["a"]}), "test": datasets.Dataset.from_dict({"text": ["b"]})}
    ).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "num.jsonl").write_text('{"text": 5}\n{"text": 6}\n')
    cases = [
        (
            tmp_path / "dd",
            "hf",
            "is a saved DatasetDict (splits: train, test): point data.sources[0].path at one split",
        ),
        (corpora["hf"], "hf", "has no column 'body' (columns: text, id): set data.sources[0].text_column"),
        (corpora["parquet"].parent, "hf", "holds no state.json"),
        (tmp_path / "num.jsonl", "jsonl", "field 'text' is int64, not text: set data.sources[0].text_column"),
    ]
    for path, fmt, message in cases:
        column = "body" if "body" in message else "text"
        sets = [
            f"data.sources=[{{path: {path}, format: {fmt}, text_column: {column}}}]",
            f"data.demo_dir={demo_dir}",
            f"data.tokenizer_path={demo_dir / 'tokenizer-512.json'}",
        ]
        argv = (
            ["data", "prepare", "debug", "--out", str(tmp_path / "out")]
            if fmt == "jsonl"
            else ["train", "debug", "--dry-run"]
        )
        if fmt == "jsonl":  # a field type is found by reading, as `data prepare` and training do
            cfg = _cfg(demo_dir, path)
            with pytest.raises(DataError, match=re.escape(message)):
                list(iter_blocks_local(cfg, SEQ, VOCAB, "train"))
            continue
        assert main([*argv, *(a for s in sets for a in ("--set", s))]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("raydrat: error: ") and message in err[0], err
