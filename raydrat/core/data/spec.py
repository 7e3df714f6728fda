"""What a worker needs to turn a unit into blocks (:class:`PackSpec`, sent to Ray tasks and
actors as it is), built from the data config, ``model.seq_len`` and ``model.vocab_size``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from raydrat.config.data import DataConfig
from raydrat.core.data.demo import build_demo_corpus, tokenizer_file
from raydrat.core.data.tokenizer import load_tokenizer, resolve_tokenizer_file, tokenizer_special_ids


@dataclass(frozen=True)
class PackSpec:
    """Everything a worker needs to turn a unit into blocks (sent to Ray tasks)."""

    tokenizer_json: str
    eod_id: int
    block_len: int
    val_fraction: float
    split_seed: int
    pack_rows: int
    tokenize_batch_size: int
    on_corrupt: str = "error"
    encoding: str = "utf-8"
    """Text files without a byte order mark are decoded as this (``data.encoding``)."""


def tokenizer_location(data_cfg: DataConfig, vocab_size: int) -> Path:
    """Where the run's tokenizer is: ``data.tokenizer_path`` (a transformers directory: its
    ``tokenizer.json``), or the demo tokenizer of this vocab size (which may not be trained
    yet). Nothing is built: the dry run asks this too."""
    if data_cfg.tokenizer_path:
        return resolve_tokenizer_file(Path(data_cfg.tokenizer_path).expanduser().absolute())
    return Path(data_cfg.demo_dir).absolute() / tokenizer_file(vocab_size)


def resolve_tokenizer_path(data_cfg: DataConfig, vocab_size: int) -> Path:
    """:func:`tokenizer_location`, the demo tokenizer trained first if it is not there."""
    if data_cfg.tokenizer_path:
        return tokenizer_location(data_cfg, vocab_size)
    return build_demo_corpus(data_cfg.demo_dir, vocab_size) / tokenizer_file(vocab_size)


def check_tokenizer(data_cfg: DataConfig, path: Path, vocab_size: int) -> tuple[Tokenizer, int]:
    """The tokenizer at ``path`` checked against ``vocab_size`` and its end-of-text id (the
    ``data.eod_token`` when set): what training and the dry run both use."""
    tok = load_tokenizer(path, vocab_size, data_cfg.eod_token)
    return tok, tokenizer_special_ids(path, tok, data_cfg.eod_token)[0]


def make_spec(data_cfg: DataConfig, seq_len: int, vocab_size: int) -> tuple[PackSpec, Path]:
    """The run's :class:`PackSpec` and the path of its tokenizer (checked against
    ``vocab_size``)."""
    tok_path = resolve_tokenizer_path(data_cfg, vocab_size)
    tok, eod_id = check_tokenizer(data_cfg, tok_path, vocab_size)
    spec = PackSpec(
        tokenizer_json=tok.to_str(),
        eod_id=eod_id,
        block_len=seq_len + 1,
        val_fraction=data_cfg.val_fraction,
        split_seed=data_cfg.split_seed,
        pack_rows=data_cfg.pack_rows,
        tokenize_batch_size=data_cfg.tokenize_batch_size,
        on_corrupt=data_cfg.on_corrupt,
        encoding=data_cfg.encoding,
    )
    return spec, tok_path
