"""What a worker needs to turn a unit into blocks (:class:`PackSpec`, sent to Ray tasks and
actors as it is), built from the data config, ``model.seq_len`` and ``model.vocab_size``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


def resolve_tokenizer_path(data_cfg: DataConfig, vocab_size: int) -> Path:
    """``data.tokenizer_path`` (a transformers directory: its ``tokenizer.json``), or the demo
    tokenizer of this vocab size (trained on first use)."""
    if data_cfg.tokenizer_path:
        return resolve_tokenizer_file(Path(data_cfg.tokenizer_path).expanduser().absolute())
    return build_demo_corpus(data_cfg.demo_dir, vocab_size) / tokenizer_file(vocab_size)


def make_spec(data_cfg: DataConfig, seq_len: int, vocab_size: int) -> tuple[PackSpec, Path]:
    """The run's :class:`PackSpec` and the path of its tokenizer (checked against
    ``vocab_size``)."""
    tok_path = resolve_tokenizer_path(data_cfg, vocab_size)
    tok = load_tokenizer(tok_path, vocab_size, data_cfg.eod_token)
    spec = PackSpec(
        tokenizer_json=tok.to_str(),
        eod_id=tokenizer_special_ids(tok_path, tok, data_cfg.eod_token)[0],
        block_len=seq_len + 1,
        val_fraction=data_cfg.val_fraction,
        split_seed=data_cfg.split_seed,
        pack_rows=data_cfg.pack_rows,
        tokenize_batch_size=data_cfg.tokenize_batch_size,
        on_corrupt=data_cfg.on_corrupt,
    )
    return spec, tok_path
