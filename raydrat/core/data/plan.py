"""Plan (driver, metadata only): sources resolve to files, files to *units* of work: one
parquet row group, or ``data.pack_rows`` plain-text files (one document per file, ``.gz``
decompressed), or one text file in ``line`` mode. Parquet schemas are checked here, so a
missing text column fails before any work starts. A unit's index in the plan is its
``unit_id``; weighted mixing gives each source a rate (see :func:`rates_for_sizes`; the
rates are set from measured sizes by :mod:`raydrat.core.data.mixing`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from raydrat.config.data import DataConfig, SourceConfig
from raydrat.core.data.demo import CORPUS_DIR, ensure_demo_corpus
from raydrat.core.data.errors import DataError
from raydrat.core.data.sources import (
    CorruptFile,
    Location,
    describe_os_error,
    filesystem,
    fs_path,
    is_credential_error,
    list_files,
    location_for,
    text_size,
    uri,
)

DEMO_SOURCE = "demo"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
HF_STATE = "state.json"
"""What ``datasets.Dataset.save_to_disk`` writes beside its ``.arrow`` files (their order)."""
HF_DICT = "dataset_dict.json"
"""What ``datasets.DatasetDict.save_to_disk`` writes above one directory per split."""


@dataclass(frozen=True)
class Unit:
    """One task's worth of documents: a parquet row group, a few text files (``file``
    mode), one text file (``line`` mode), one JSON Lines file, or one ``.arrow`` file of a
    saved Hugging Face dataset."""

    unit_id: int
    source: int
    format: Literal["parquet", "text", "jsonl", "hf"]
    files: tuple[str, ...]
    row_group: int  # parquet only; -1 for text
    text_column: str
    text_mode: str
    loc: Location
    rate: float = 1.0
    """Training blocks of this unit are emitted ``rate`` times on average (weighted mixing)."""

    def to_row(self) -> dict:
        return {**asdict(self), "files": list(self.files), "loc": asdict(self.loc)}

    @classmethod
    def from_row(cls, row: dict) -> Unit:
        return cls(**{**row, "files": tuple(row["files"]), "loc": Location(**row["loc"])})


@dataclass
class Plan:
    """What the driver learns from metadata alone."""

    units: list[Unit]
    files: list[tuple[Location, pafs.FileInfo]]
    source_bytes: list[int]
    """Estimated text bytes per source (parquet: uncompressed column size)."""
    skipped_files: list[str]
    """Unreadable files left out (``data.on_corrupt = skip``), with the reason."""
    rows: int
    """Rows (parquet) or files (text) in the plan; 0 means the corpus holds nothing."""
    source_rows: list[int] = field(default_factory=list)
    """Rows (parquet, from the footers) or files (text) per source."""
    source_formats: list[str] = field(default_factory=list)
    """Each source's format (given, or inferred from the file names)."""


def resolve_sources(cfg: DataConfig) -> list[str]:
    """Every input file (as a path or ``s3://`` URI), source by source, each source's files
    sorted. ``path: demo`` builds the demo corpus first if it is missing."""
    return [uri(loc, info.path) for loc, info in plan_corpus(cfg).files]


def _resolve_demo(src: SourceConfig, cfg: DataConfig) -> SourceConfig:
    if src.path != DEMO_SOURCE:
        return src
    demo_dir = Path(cfg.demo_dir).absolute()
    ensure_demo_corpus(demo_dir)
    return src.model_copy(update={"path": str(demo_dir / CORPUS_DIR), "format": "parquet"})


def _parquet_row_groups(loc: Location, path: str, column: str, index: int) -> list[tuple[int, int, int]]:
    """``(row group, rows, text bytes)`` of the non-empty row groups of ``path`` after
    checking that ``column`` holds strings. An unreadable file raises CorruptFile; a refused
    permission or credential, or a missing file, is a plain DataError (never skipped as
    corrupt)."""
    name = uri(loc, path)
    hint = "" if path.endswith(".parquet") else (f"; if it is a text file, set data.sources[{index}].format: text")
    try:
        pf = pq.ParquetFile(filesystem(loc).open_input_file(path))
        schema = pf.schema_arrow
        meta = pf.metadata
    except Exception as exc:  # pyarrow raises several types for unreadable files
        if isinstance(exc, OSError) and (
            is_credential_error(exc)
            or isinstance(exc, FileNotFoundError)
            or "parquet" not in str(exc).lower()
            and "magic" not in str(exc).lower()
        ):
            raise describe_os_error(name, exc, loc) from None
        raise CorruptFile(f"{name} is not a readable parquet file ({exc}){hint}") from None
    key = f"data.sources[{index}].text_column"
    if column not in schema.names:
        raise DataError(f"{name} has no column {column!r} (columns: {', '.join(schema.names)}): set {key}")
    _check_text_type(schema.field(column).type, column, name, key)
    out = []
    for rg in range(meta.num_row_groups):
        g = meta.row_group(rg)
        if g.num_rows > 0:
            leaf = next(
                (g.column(c) for c in range(g.num_columns) if g.column(c).path_in_schema.split(".")[0] == column), None
            )
            size = leaf.total_uncompressed_size if leaf is not None else g.total_byte_size
            out.append((rg, g.num_rows, size))
    return out


def plan_corpus(cfg: DataConfig) -> Plan:
    """The units of work of every source, in a fixed order (their index is ``unit_id``),
    from metadata only (listings, parquet footers, gzip trailers)."""
    raw: list[tuple[int, dict]] = []
    files: list[tuple[Location, pafs.FileInfo]] = []
    sizes = [0] * len(cfg.sources)
    skipped: list[str] = []
    rows = 0
    source_rows = [0] * len(cfg.sources)
    formats: list[str] = []
    for i, src in enumerate(cfg.sources):
        src = _resolve_demo(src, cfg)
        where = f"data.sources[{i}].path = {src.path!r}"
        loc = location_for(src.path, src.endpoint_url, src.region)
        fmt = src.format or _infer_format(src.path, loc, where)
        formats.append(fmt)
        if fmt == "hf":
            infos = _hf_files(loc, src.path, where, i)
        else:
            infos = list_files(src.path, loc, {"parquet": ".parquet", "jsonl": JSONL_SUFFIXES}.get(fmt), where)
        files += [(loc, info) for info in infos]
        common = dict(source=i, format=fmt, text_column=src.text_column, text_mode=src.text_mode, loc=loc)
        if fmt == "parquet":
            for info in infos:
                try:
                    groups = _parquet_row_groups(loc, info.path, src.text_column, i)
                except CorruptFile as exc:
                    if cfg.on_corrupt == "error":
                        raise DataError(f"{exc}: fix or remove it, or set data.on_corrupt = skip") from None
                    skipped.append(str(exc))
                    continue
                for rg, n, size in groups:
                    raw.append((i, dict(common, files=(info.path,), row_group=rg)))
                    rows += n
                    source_rows[i] += n
                    sizes[i] += size
        else:
            if fmt == "hf":
                for info in infos:
                    _check_arrow_column(loc, info.path, src.text_column, i)
            sizes[i] += sum(text_size(loc, info) for info in infos)
            rows += sum(1 for info in infos if info.size > 0)
            source_rows[i] += sum(1 for info in infos if info.size > 0)
            step = 1 if src.text_mode == "line" or fmt in ("jsonl", "hf") else cfg.pack_rows
            for start in range(0, len(infos), step):
                chunk = tuple(info.path for info in infos[start : start + step])
                raw.append((i, dict(common, files=chunk, row_group=-1)))
    rates = rates_for_sizes(cfg, sizes)
    units = [Unit(unit_id=n, rate=rates[i], **kw) for n, (i, kw) in enumerate(raw)]
    return Plan(units, files, sizes, skipped, rows, source_rows, formats)


def _infer_format(path: str, loc: Location, where: str) -> str:
    """``data.sources[].format`` left out: ``parquet`` for a ``.parquet`` file, or a directory,
    prefix or glob holding ``.parquet`` files; ``jsonl`` for a JSON Lines file or a place
    holding them; ``hf`` for a directory written by ``save_to_disk``; ``text`` otherwise."""
    bare = path.rstrip("/")
    if bare.endswith(".parquet"):
        return "parquet"
    if bare.endswith(JSONL_SUFFIXES):
        return "jsonl"
    infos = list_files(path, loc, None, where)
    root = fs_path(path)
    if any(i.path in (f"{root}/{HF_STATE}", f"{root}/{HF_DICT}") for i in infos):
        return "hf"
    if any(i.path.endswith(".parquet") for i in infos):
        return "parquet"
    return "jsonl" if any(i.path.endswith(JSONL_SUFFIXES) for i in infos) else "text"


def _read_json(loc: Location, path: str) -> dict | None:
    try:
        with filesystem(loc).open_input_stream(path) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except OSError as exc:
        if "not found" in str(exc).lower() or "does not exist" in str(exc).lower():
            return None
        raise describe_os_error(uri(loc, path), exc, loc) from None
    except ValueError as exc:
        raise DataError(f"{uri(loc, path)} is not valid JSON ({exc}): save the dataset again") from None


def _hf_files(loc: Location, path: str, where: str, index: int) -> list[pafs.FileInfo]:
    """The ``.arrow`` files of a dataset saved with ``save_to_disk``, in its row order (as
    its ``state.json`` lists them). A ``DatasetDict`` is refused, naming its splits."""
    root = fs_path(path)
    state = _read_json(loc, f"{root}/{HF_STATE}")
    if state is None:
        splits = (_read_json(loc, f"{root}/{HF_DICT}") or {}).get("splits")
        if splits:
            raise DataError(
                f"{where} is a saved DatasetDict (splits: {', '.join(splits)}): point "
                f"data.sources[{index}].path at one split, e.g. {path.rstrip('/')}/{splits[0]}"
            )
        raise DataError(
            f"{where} holds no {HF_STATE}: it is not a dataset written by datasets' save_to_disk; "
            f"save it with Dataset.save_to_disk, or set data.sources[{index}].format"
        )
    names = [d["filename"] for d in state.get("_data_files", [])]
    fs = filesystem(loc)
    try:
        infos = fs.get_file_info([f"{root}/{n}" for n in names])
    except OSError as exc:
        raise describe_os_error(where, exc, loc) from None
    missing = [uri(loc, i.path) for i in infos if i.type != pafs.FileType.File]
    if missing or not infos:
        raise DataError(
            f"{where}: the saved dataset lists missing files ({', '.join(missing) or 'none listed'}): save it again"
        )
    return infos


def _check_arrow_column(loc: Location, path: str, column: str, index: int) -> None:
    """A saved dataset's ``.arrow`` file holds ``column`` as text (its schema message only is read)."""
    name = uri(loc, path)
    key = f"data.sources[{index}].text_column"
    try:
        with filesystem(loc).open_input_file(path) as f:
            schema = ipc.open_stream(f).schema
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, pa.ArrowInvalid):
            raise describe_os_error(name, exc, loc) from None
        raise DataError(f"{name} is not a readable Arrow stream ({exc}): save the dataset again") from None
    if column not in schema.names:
        raise DataError(f"{name} has no column {column!r} (columns: {', '.join(schema.names)}): set {key}")
    _check_text_type(schema.field(column).type, column, name, key)


def is_text_type(typ: pa.DataType) -> bool:
    """A column raydrat reads documents from: strings, or bytes holding UTF-8."""
    return any(
        check(typ)
        for check in (
            pa.types.is_string,
            pa.types.is_large_string,
            pa.types.is_string_view,
            pa.types.is_binary,
            pa.types.is_large_binary,
            pa.types.is_binary_view,
        )
    )


def _check_text_type(typ: pa.DataType, column: str, name: str, key: str) -> None:
    if not is_text_type(typ):
        raise DataError(
            f"column {column!r} of {name} is {typ}, not text: set {key} to a string (or UTF-8 binary) column"
        )


def rates_for_sizes(cfg: DataConfig, sizes: list[float]) -> list[float]:
    """Per source, how many times each training block is emitted on average so that the
    sources' shares of the stream follow their weights, given each source's size (the plan's
    metadata estimate, or the tokens :mod:`raydrat.core.data.mixing` measured). The epoch
    keeps about the natural total size: over-weighted sources repeat blocks, under-weighted
    ones skip some."""
    weights = [s.weight for s in cfg.sources]
    if weights[0] is None or len(weights) == 1:
        return [1.0] * len(weights)
    total_w, total_b = sum(weights), sum(sizes)
    for i, size in enumerate(sizes):
        if size == 0:
            raise DataError(
                f"data.sources[{i}] = {cfg.sources[i].path!r} has weight {weights[i]} but holds "
                "no text: remove it or give it some documents"
            )
    return [(w / total_w) / (b / total_b) for w, b in zip(weights, sizes, strict=True)]


def plan_units(cfg: DataConfig) -> list[Unit]:
    """The units of work of every source (see :func:`plan_corpus`)."""
    return plan_corpus(cfg).units


def sample_units(units: list[Unit], n: int) -> list[Unit]:
    """At most ``n`` units spread evenly over ``units`` (all of them when there are few)."""
    if len(units) <= n:
        return list(units)
    return [units[(i * len(units)) // n] for i in range(n)]
