"""The embedded demo corpus: the ``.py`` files of the running interpreter's standard library.

Layout of the demo directory (``data.demo_dir``)::

    corpus/part-00000.parquet ...  columns ``path`` (relative to the stdlib) and ``text``;
                                   one document per source file, in sorted path order
    tokenizer-<vocab>.json         byte-level BPE of that vocab size trained on the corpus
                                   (one file per vocab size, written via temp file + rename)
    manifest.json                  what was built: python version, sizes, shard hashes

The corpus is built in a temporary directory that is renamed into place once complete (a
directory without a manifest is incomplete and is rebuilt) and is never rewritten afterwards
(unless ``force``), so runs reading it are safe from later builds. The tokenizer depends on
``vocab_size``: each size has its own file, trained on first use (a few seconds) and
never rewritten, so runs with different ``model.vocab_size`` can share a demo directory
(two processes training the same size at once write identical files; the rename makes
either one win whole). Everything is
deterministic for a given Python installation (sorted files, fixed trainer settings). A
directory built by another Python version is kept as it is (its manifest says which one);
``force=True`` rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raydrat.atomic import write_text
from raydrat.core.data.tokenizer import train_tokenizer

log = logging.getLogger(__name__)

CORPUS_DIR = "corpus"


def tokenizer_file(vocab_size: int) -> str:
    """File name of the demo tokenizer of ``vocab_size`` tokens."""
    return f"tokenizer-{vocab_size}.json"


MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1

EXCLUDED_DIRS = frozenset(
    "site-packages dist-packages __pycache__".split()  # third-party code, bytecode
    + "test tests idlelib lib2to3 turtledemo ensurepip".split()  # tests, tools, demos
)
"""Directories of the standard library left out of the corpus (at any depth)."""
MAX_CORPUS_BYTES = 32 * 2**20
"""Stop adding files (in sorted order) once the corpus holds this much text: a cap for
unusual installations; a CPython 3.11 stdlib is about 11 MB after the exclusions."""
SHARD_BYTES = 2**20
"""A new parquet shard starts once the current one holds this much text. Each shard is one
row group, the pipeline's unit of parallel work."""


def stdlib_documents() -> tuple[list[tuple[str, str]], int]:
    """``([(relative path, text), ...], n_skipped)`` for the standard library's ``.py`` files,
    sorted by path. Files that are not UTF-8 are skipped and counted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]  # prune, don't descend
        rel_dir = Path(dirpath).relative_to(root)
        found += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    docs: list[tuple[str, str]] = []
    n_bytes = skipped = 0
    for rel in sorted(found):
        raw = (root / rel).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped += 1
            continue
        if n_bytes + len(raw) > MAX_CORPUS_BYTES:
            break
        docs.append((rel, text))
        n_bytes += len(raw)
    return docs, skipped


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a complete demo directory, or ``None``."""
    try:
        return json.loads((Path(out_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def ensure_demo_corpus(out_dir: str | Path, force: bool = False) -> dict[str, Any]:
    """Build the corpus shards and manifest unless they exist; return the manifest.
    Needs no tokenizer (the pipeline calls this to resolve ``path: demo``)."""
    out_dir = Path(out_dir).absolute()
    manifest = None if force else read_manifest(out_dir)
    if manifest is not None:
        return manifest
    start = time.perf_counter()
    docs, skipped = stdlib_documents()
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        files = _write_shards(tmp / CORPUS_DIR, docs)
        manifest = {
            "format": MANIFEST_FORMAT,
            "source": "python standard library, .py files",
            "python_version": ".".join(map(str, sys.version_info[:3])),
            "excluded_dirs": sorted(EXCLUDED_DIRS),
            "n_docs": len(docs),
            "n_bytes": sum(f["n_bytes"] for f in files),
            "n_skipped_non_utf8": skipped,
            "files": files,
        }
        _write_json(tmp / MANIFEST_FILE, manifest)
        manifest = _swap_in(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "demo corpus: %d stdlib files, %.1f MB in %s (%.1fs)",
        manifest["n_docs"],
        manifest["n_bytes"] / 1e6,
        out_dir,
        time.perf_counter() - start,
    )
    return manifest


def build_demo_corpus(out_dir: str | Path, vocab_size: int, force: bool = False) -> Path:
    """Make ``out_dir`` hold the demo corpus and ``tokenizer-<vocab_size>.json``, a tokenizer
    of ``vocab_size`` trained on it; return ``out_dir``. Fast when both exist; ``force``
    rebuilds everything."""
    out_dir = Path(out_dir).absolute()
    manifest = ensure_demo_corpus(out_dir, force=force)
    tok_path = out_dir / tokenizer_file(vocab_size)
    if tok_path.is_file():
        return out_dir
    start = time.perf_counter()
    texts = [
        text
        for f in manifest["files"]
        for text in pq.read_table(out_dir / f["path"], columns=["text"])["text"].to_pylist()
    ]
    train_tokenizer(texts, vocab_size, tok_path)  # temp file + rename: never half-written
    log.info("demo tokenizer: vocab %d trained in %.1fs", vocab_size, time.perf_counter() - start)
    return out_dir


def _write_shards(corpus_dir: Path, docs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    corpus_dir.mkdir(parents=True)
    shards: list[list[tuple[str, str]]] = [[]]
    size = 0
    for doc in docs:
        if size >= SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(doc)
        size += len(doc[1].encode("utf-8"))
    files = []
    for i, shard in enumerate(s for s in shards if s):
        rel = f"{CORPUS_DIR}/part-{i:05d}.parquet"
        table = pa.table(
            {"path": [p for p, _ in shard], "text": [t for _, t in shard]},
            schema=pa.schema([("path", pa.string()), ("text", pa.string())]),
        )
        pq.write_table(table, corpus_dir.parent / rel, row_group_size=len(shard))
        files.append(
            {
                "path": rel,
                "n_docs": len(shard),
                "n_bytes": sum(len(t.encode("utf-8")) for _, t in shard),
                "sha256": hashlib.sha256((corpus_dir.parent / rel).read_bytes()).hexdigest(),
            }
        )
    return files


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _swap_in(tmp: Path, out_dir: Path) -> dict[str, Any]:
    """Rename the finished ``tmp`` to ``out_dir`` (moving an incomplete or forced-over
    ``out_dir`` aside first). If another process finished first, keep its build."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        theirs = read_manifest(out_dir)
        if theirs is None:
            raise
        return theirs
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return json.loads((out_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
