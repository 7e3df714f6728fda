"""Tokenizers people already have: a GPT-2-style file without a pad token, a directory saved
by transformers, end-of-text tokens named by the config, vocabulary sizes checked."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from raydrat.config.data import DataConfig
from raydrat.config.model import ModelConfig
from raydrat.core.data.blocks import iter_blocks_local
from raydrat.core.data.errors import DataError
from raydrat.core.data.tokenizer import (
    declared_special_tokens,
    load_tokenizer,
    special_ids,
    tokenizer_special_ids,
    vocab_size_of,
)
from raydrat.core.model.transformer import GPT

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron".split()
SEQ_LEN = 32


def texts(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc{i} " + " ".join(rng.choices(WORDS, k=rng.randint(3, 30))) for i in range(n)]


def gpt2_style(special: list[str], vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE built like GPT-2's (byte-level pre-tokenizer, post-processor and
    decoder; ``special`` its only special tokens), trained here: nothing downloaded."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer)
    return tok


@pytest.fixture(scope="module")
def gpt2_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "gpt2-style.json"
    gpt2_style(["<|endoftext|>"]).save(str(path))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    pq.write_table(pa.table({"text": texts()}), root / "docs.parquet")
    return root


def test_gpt2_style_tokenizer_without_pad_pads_with_eod_and_says_so(gpt2_file, caplog):
    with caplog.at_level(logging.WARNING, logger="raydrat.core.data.tokenizer"):
        tok = load_tokenizer(gpt2_file, 512)
    eod = tok.token_to_id("<|endoftext|>")
    assert tok.token_to_id("<|pad|>") is None
    assert special_ids(tok) == (eod, eod)
    assert f"has no pad token: padding with its end-of-text token <|endoftext|> (id {eod})" in caplog.text


def test_gpt2_style_tokenizer_trains_the_model(gpt2_file, corpus):
    """Blocks packed with the tokenizer's own end-of-text id, and a model learns on them."""
    n_vocab = vocab_size_of(load_tokenizer(gpt2_file, 512))
    cfg = DataConfig(sources=[{"path": str(corpus)}], tokenizer_path=str(gpt2_file), val_fraction=0.1, pack_rows=16)
    blocks = np.stack(list(iter_blocks_local(cfg, SEQ_LEN, 512, "train")))
    tok = load_tokenizer(gpt2_file, 512)
    eod = tok.token_to_id("<|endoftext|>")
    assert blocks.max() < n_vocab and (blocks == eod).any()
    first_doc = tok.decode(blocks.ravel().tolist(), skip_special_tokens=False).split("<|endoftext|>")[0]
    assert first_doc in texts()  # decodes back to a whole document

    torch.manual_seed(0)
    model = GPT(
        ModelConfig(vocab_size=512, seq_len=SEQ_LEN, d_model=64, n_layer=2, n_head=4, n_kv_head=2, activation="swiglu")
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.from_numpy(blocks[:8]).long()
    losses = []
    for _ in range(25):
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_transformers_directory_loads_with_its_declared_tokens(tmp_path):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=gpt2_style(["</s>", "<pad>"]), eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
    assert declared_special_tokens(tmp_path / "saved") == {"eos_token": "</s>", "pad_token": "<pad>"}
    tok = load_tokenizer(tmp_path / "saved", 512)  # no data.eod_token needed: the config names it
    eod, pad = tokenizer_special_ids(tmp_path / "saved", tok)
    assert (eod, pad) == (tok.token_to_id("</s>"), tok.token_to_id("<pad>"))
    # the same tokenizer.json without its config has no <|endoftext|>: the option is named
    bare = tmp_path / "bare.json"
    bare.write_text((tmp_path / "saved" / "tokenizer.json").read_text())
    with pytest.raises(DataError, match=r"no end-of-text token <\|endoftext\|>: set data.eod_token"):
        load_tokenizer(bare, 512)
    tok = load_tokenizer(bare, 512, eod_token="</s>")
    assert tokenizer_special_ids(bare, tok, "</s>")[0] == tok.token_to_id("</s>")


def test_pipeline_uses_the_configured_eod_token(tmp_path, corpus):
    path = tmp_path / "eos.json"
    gpt2_style(["</s>"]).save(str(path))
    with pytest.raises(DataError, match="set data.eod_token"):
        list(
            iter_blocks_local(
                DataConfig(sources=[{"path": str(corpus)}], tokenizer_path=str(path)), SEQ_LEN, 512, "train"
            )
        )
    cfg = DataConfig(sources=[{"path": str(corpus)}], tokenizer_path=str(path), eod_token="</s>")
    blocks = np.stack(list(iter_blocks_local(cfg, SEQ_LEN, 512, "train")))
    assert (blocks == load_tokenizer(path, 512, "</s>").token_to_id("</s>")).any()


def test_tokenizer_bad_inputs(tmp_path, gpt2_file):
    n = vocab_size_of(load_tokenizer(gpt2_file, 512))
    with pytest.raises(
        DataError, match=rf"has {n} tokens but model.vocab_size is 300: raise model.vocab_size to at least {n}"
    ):
        load_tokenizer(gpt2_file, 300)
    with pytest.raises(DataError, match=r"has no token '<eos>' \(data.eod_token\)"):
        load_tokenizer(gpt2_file, 512, eod_token="<eos>")
    (tmp_path / "not.json").write_text("vocab: [1, 2")
    with pytest.raises(DataError, match="not a valid tokenizers JSON file"):
        load_tokenizer(tmp_path / "not.json", 512)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="has no tokenizer.json: save a fast tokenizer"):
        load_tokenizer(tmp_path / "empty_dir", 512)


def test_the_dry_run_resolves_the_tokenizer_as_training_does(tmp_path, corpus):
    """``data.eod_token`` names the end-of-text token of a tokenizer without
    ``<|endoftext|>``: the dry run accepts what training accepts and names the token it
    uses; without it, both refuse with the same line."""
    from raydrat.config import load_config
    from raydrat.dry_run import describe

    path = tmp_path / "eos.json"
    gpt2_style(["</s>"]).save(str(path))
    sets = [f"data.sources=[{{path: {corpus}}}]", f"data.tokenizer_path={path}", "model.vocab_size=512"]
    lines = describe(load_config("debug", [*sets, "data.eod_token=</s>"]))
    eod = load_tokenizer(path, 512, "</s>").token_to_id("</s>")
    assert any(f"end of document '</s>', id {eod}" in line for line in lines), lines
    with pytest.raises(DataError, match=r"no end-of-text token <\|endoftext\|>: set data.eod_token"):
        describe(load_config("debug", sets))
