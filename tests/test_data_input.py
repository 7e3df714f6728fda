"""Input of any encoding, format and size: byte order marks decide the decoding (or the file
is refused naming its encoding), ``data.encoding`` for files without one, gzip read member by
member with trailing bytes counted, binary text columns decoded, all-null input said in one
line wherever it is read, a one-line document of many MB read in bounded memory and
tokenized exactly as a whole. No Ray: reading is the same code on Ray and off it."""

from __future__ import annotations

import gzip
import logging
import random
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data import SEQ_LEN, VOCAB, WORDS, data_cfg, make_docs, write_parquet

from raydrat.cli import main
from raydrat.core.data.blocks import iter_blocks_local, unit_runs
from raydrat.core.data.errors import DataError
from raydrat.core.data.pack import cached_tokenizer
from raydrat.core.data.plan import plan_corpus
from raydrat.core.data.read import read_unit, unit_pieces
from raydrat.core.data.spec import make_spec
from raydrat.core.data.tokenizer import train_tokenizer

TEXT = "Grüße aus Köln: naïve café, 日本語のテキスト, and plain ASCII words.\n" * 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("input")
    docs = [d for d in make_docs(200, seed=5) if d] + [TEXT]
    tok = root / "tok.json"
    train_tokenizer(docs, VOCAB, tok)
    return {"dir": root, "docs": docs, "tokenizer": tok}


def read_text_file(corpus: dict, path: Path, **kw) -> tuple[list[str], dict]:
    cfg = data_cfg(corpus, sources=[{"path": str(path), "format": "text"}], **kw)
    docs, counts = read_unit(plan_corpus(cfg).units[0], make_spec(cfg, SEQ_LEN, VOCAB)[0])
    return docs["train"] + docs["val"], counts


@pytest.mark.parametrize(
    "codec, bom",
    [
        ("utf-8", b"\xef\xbb\xbf"),
        ("utf-16-le", b"\xff\xfe"),
        ("utf-16-be", b"\xfe\xff"),
        ("utf-32-le", b"\xff\xfe\x00\x00"),
        ("utf-32-be", b"\x00\x00\xfe\xff"),
    ],
)
def test_a_byte_order_mark_decides_the_decoding(corpus, tmp_path, codec, bom):
    path = tmp_path / f"{codec}.txt"
    path.write_bytes(bom + TEXT.encode(codec))
    docs, counts = read_text_file(corpus, path)
    assert docs == [TEXT] and counts["invalid_utf8_docs"] == 0
    # the mark wins over data.encoding
    assert read_text_file(corpus, path, encoding="latin-1")[0] == [TEXT]
    gz = tmp_path / f"{codec}.txt.gz"
    gz.write_bytes(gzip.compress(bom + TEXT.encode(codec)))
    assert read_text_file(corpus, gz)[0] == [TEXT]


def test_a_wide_file_without_a_mark_is_refused_naming_its_encoding_or_read_as_data_encoding(corpus, tmp_path):
    path = tmp_path / "wide.txt"
    path.write_bytes("plain words in a file without a byte order mark\n".encode("utf-16-le") * 20)
    with pytest.raises(
        DataError,
        match=r"wide.txt has no byte order mark but is UTF-16-LE text \(NUL in every other byte\): "
        r"set data.encoding: utf-16-le, or convert it to UTF-8",
    ):
        read_text_file(corpus, path)
    docs, _ = read_text_file(corpus, path, encoding="utf-16-le")
    assert docs == ["plain words in a file without a byte order mark\n" * 20]
    path.write_bytes("text\n".encode("utf-32-be") * 20)
    with pytest.raises(DataError, match=r"is UTF-32-BE text \(NUL in every three bytes of four\): set data.encoding"):
        read_text_file(corpus, path)
    seven = tmp_path / "seven.txt"
    seven.write_bytes(b"+/v8" + b"Hi+AOk-")
    with pytest.raises(DataError, match=r"seven.txt starts with a UTF-7 byte order mark: .* convert it"):
        read_text_file(corpus, seven)


def test_data_encoding_decodes_files_without_a_mark(corpus, tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("café crème brûlée ".encode("latin-1") * 30)
    docs, counts = read_text_file(corpus, path, encoding="latin-1")
    assert docs == ["café crème brûlée " * 30] and counts["invalid_utf8_docs"] == 0
    docs, counts = read_text_file(corpus, path)  # as UTF-8: replaced and counted
    assert "\ufffd" in docs[0] and counts["invalid_utf8_docs"] == 1


def test_gzip_is_read_member_by_member_and_trailing_bytes_are_counted_not_fatal(corpus, tmp_path, caplog):
    first, second = TEXT[:700], TEXT[700:]
    path = tmp_path / "members.txt.gz"
    path.write_bytes(gzip.compress(first.encode()) + gzip.compress(second.encode()) + b"\x00garbage" * 4)
    with caplog.at_level(logging.WARNING):
        docs, counts = read_text_file(corpus, path)
    assert docs == [TEXT] and counts["corrupt_bytes"] == 32 and counts["skipped_files"] == 0
    assert "32 bytes after the last gzip member are not gzip data: ignored (corrupt_bytes)" in caplog.text
    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(gzip.compress(TEXT.encode())[:-12])
    with pytest.raises(DataError, match=r"cut.txt.gz is not a valid gzip file \(it ends inside a gzip member: "
                       r"truncated\): fix or remove it, or set data.on_corrupt = skip"):  # fmt: skip
        read_text_file(corpus, cut)
    docs, counts = read_text_file(corpus, cut, on_corrupt="skip")
    assert docs == [] and counts["skipped_files"] == 1


def test_a_binary_text_column_is_decoded_as_utf8_with_invalid_bytes_counted(corpus, tmp_path):
    texts = [d for d in corpus["docs"][:60]]
    as_str = write_parquet(tmp_path / "s" / "a.parquet", texts)
    raw = [t.encode() for t in texts]
    raw[5] = raw[5][:3] + b"\xff\xfe" + raw[5][3:]
    path = tmp_path / "b" / "a.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"text": pa.array(raw, pa.binary())}), path)
    docs, counts = read_unit(
        plan_corpus(data_cfg(corpus, path)).units[0], make_spec(data_cfg(corpus, path), 16, VOCAB)[0]
    )
    assert counts["invalid_utf8_docs"] == 1 and counts["docs"] == 60
    raw[5] = texts[5].encode()
    pq.write_table(pa.table({"text": pa.array(raw, pa.large_binary())}), path)
    want = [b.tolist() for b in iter_blocks_local(data_cfg(corpus, as_str), SEQ_LEN, VOCAB, "train")]
    assert [b.tolist() for b in iter_blocks_local(data_cfg(corpus, path), SEQ_LEN, VOCAB, "train")] == want
    pq.write_table(pa.table({"text": [1.5, 2.5]}), tmp_path / "f.parquet")
    with pytest.raises(DataError, match=r"is double, not text: set data.sources\[0\].text_column to a string"):
        plan_corpus(data_cfg(corpus, tmp_path / "f.parquet"))


def test_all_null_input_says_so_in_one_line_wherever_it_is_read(corpus, tmp_path, capsys, demo_dir):
    from test_model_use import debug_cfg, save_run

    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": pa.array([None, None, ""], pa.string())}), nulls)
    cfg = data_cfg(corpus, nulls)
    with pytest.raises(DataError, match=r"holds no text: all 3 documents are empty or null: point it at some text"):
        list(iter_blocks_local(cfg, SEQ_LEN, VOCAB, "train"))
    ckpt = save_run(debug_cfg(demo_dir, tmp_path / "runs"), "r")
    assert main(["eval", str(ckpt), "--data", str(nulls)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raydrat: error: data.sources") and "all 3 documents" in err[0]


@pytest.mark.slow
def test_a_huge_one_line_document_is_read_in_bounded_memory_and_tokenized_exactly(corpus, tmp_path):
    """A one-line document of 4 MB and one of 16 MB: the Python memory reading and packing
    them peaks at the same few MB (a chunk and a read slice), not at the document's size;
    the pieces' tokens are the whole document's."""
    rng = random.Random(0)
    words = [*WORDS, "naïve", "日本"]
    peaks = {}
    for mb in (4, 16):
        path = tmp_path / f"huge{mb}.txt"
        with open(path, "w", encoding="utf-8") as f:
            while f.tell() < mb * 1_000_000:
                f.write(" ".join(rng.choices(words, k=10000)) + " ")
        cfg = data_cfg(corpus, sources=[{"path": str(path), "format": "text", "text_mode": "line"}])
        spec, _ = make_spec(cfg, SEQ_LEN, VOCAB)
        unit = plan_corpus(cfg).units[0]
        split = ["train", "val"][next(unit_pieces(unit, spec)).label]
        tracemalloc.start()
        blocks = sum(len(r.ids) for r in unit_runs(unit, spec, split))
        peaks[mb] = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
        assert blocks > mb * 1_000_000 / 4 / BLOCK_FACTOR
    assert peaks[16] < 1.3 * peaks[4] and peaks[16] < 40, peaks
    head = path.read_text(encoding="utf-8")[:3_000_000]  # tokens of a 3 MB prefix, whole vs in pieces
    (tmp_path / "head.txt").write_text(head, encoding="utf-8")
    cfg = data_cfg(corpus, sources=[{"path": str(tmp_path / "head.txt"), "format": "text"}])
    spec, _ = make_spec(cfg, SEQ_LEN, VOCAB)
    tok = cached_tokenizer(spec.tokenizer_json)
    pieces = [p.text for p in unit_pieces(plan_corpus(cfg).units[0], spec)]
    assert len(pieces) > 8 and "".join(pieces) == head
    assert [t for p in pieces for t in tok.encode(p).ids] == tok.encode(head).ids


BLOCK_FACTOR = SEQ_LEN + 1
