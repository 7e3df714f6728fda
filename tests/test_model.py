"""The transformer, recomputation and activation measurement do what they claim."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from raydrat.config import ConfigError, ModelConfig, config_from_dict
from raydrat.core.model.transformer import (
    GPT,
    Attention,
    CrossEntropy,
    RMSNorm,
    RotaryEmbedding,
    sdpa_grouped_heads,
)
from raydrat.core.techniques.recompute.measure import (
    grad_bytes,
    optimizer_state_bytes,
    param_bytes,
    saved_activation_bytes,
)
from raydrat.core.techniques.recompute.wrapper import CheckpointWrapper, apply_recompute, iter_branches

TINY = dict(vocab_size=64, seq_len=16, d_model=32, n_layer=2, n_head=4)


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def build(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**overrides))


def batch(cfg: ModelConfig, B: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (B, cfg.seq_len + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


@pytest.fixture(autouse=True)
def _restore_rng():
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


# --------------------------------------------------------------------------------------
# forward semantics
# --------------------------------------------------------------------------------------


def test_causal_future_tokens_do_not_change_past_logits():
    model = build(n_kv_head=2).eval()
    idx, _ = batch(model.cfg)
    t = 7
    changed = idx.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % model.cfg.vocab_size
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    assert_close(logits_changed[:, : t + 1], logits[:, : t + 1])
    assert not torch.allclose(logits_changed[:, t + 1], logits[:, t + 1])


def reference_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as a complex rotation of the pairs (i, i + D/2): x (B, T, heads, D)."""
    T, D = x.shape[1], x.shape[-1]
    freqs = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    rot = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), torch.outer(torch.arange(T), freqs))
    xc = torch.complex(x[..., : D // 2].double(), x[..., D // 2 :].double()) * rot[:, None, :]
    return torch.cat([xc.real, xc.imag], dim=-1).float()


def reference_attention(attn: Attention, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """softmax(QK^T / sqrt(D) + causal mask) V per query head, written out by hand."""
    B, T, _ = x.shape
    H, K, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    q = reference_rope((x @ attn.q_proj.weight.T).view(B, T, H, D), cfg.rope_theta)
    k = reference_rope((x @ attn.k_proj.weight.T).view(B, T, K, D), cfg.rope_theta)
    v = (x @ attn.v_proj.weight.T).view(B, T, K, D)
    mask = torch.full((T, T), float("-inf")).triu(1)
    heads = []
    for h in range(H):
        kv = h // (H // K)
        scores = q[:, :, h] @ k[:, :, kv].transpose(1, 2) / math.sqrt(D) + mask  # (B, T, T)
        heads.append(scores.softmax(-1) @ v[:, :, kv])  # (B, T, D)
    return torch.cat(heads, dim=-1) @ attn.out_proj.weight.T


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_attention_matches_manual_reference(n_kv_head):
    cfg = tiny(n_kv_head=n_kv_head)
    torch.manual_seed(0)
    attn = Attention(cfg).eval()
    x = torch.randn(2, cfg.seq_len, cfg.d_model)
    assert_close(attn(x), reference_attention(attn, x, cfg), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["math", "flash"])  # both have CPU kernels
def test_attention_backend_selection_gives_same_result(backend):
    idx, targets = batch(tiny())
    _, loss = build().eval()(idx, targets)
    _, loss_backend = build(attention_backend=backend).eval()(idx, targets)
    assert_close(loss_backend, loss)


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "swiglu", "geglu"])
def test_each_activation_builds_and_trains(activation):
    model = build(activation=activation)
    mlp = model.layers["0"].mlp_branch.layer
    assert (mlp.gate_proj is not None) == model.cfg.gated_mlp
    assert mlp.up_proj.out_features == model.cfg.ff_dim
    idx, targets = batch(model.cfg)
    logits, loss = model(idx, targets)
    loss.backward()
    assert logits.shape == (*idx.shape, model.cfg.vocab_size)
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("norm,bias", [("rmsnorm", False), ("layernorm", False), ("layernorm", True)])
def test_norms(norm, bias):
    model = build(norm=norm, bias=bias)
    expected = RMSNorm if norm == "rmsnorm" else torch.nn.LayerNorm
    assert isinstance(model.norm, expected)
    assert isinstance(model.layers["1"].attn_branch.norm, expected)
    assert (model.layers["0"].attn_branch.layer.q_proj.bias is not None) == bias
    if norm == "layernorm":
        assert (model.norm.bias is not None) == bias
    idx, targets = batch(model.cfg)
    _, loss = model(idx, targets)
    assert torch.isfinite(loss)


def test_rmsnorm_normalises_to_unit_rms():
    x = 5 * torch.randn(3, 7, 32)
    y = RMSNorm(32)(x)
    assert_close(y.pow(2).mean(-1), torch.ones(3, 7), rtol=1e-4, atol=1e-4)


def test_tied_head_shares_storage_and_counts_once():
    tied, untied = build(tie_embeddings=True), build(tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    table = tied.cfg.vocab_size * tied.cfg.d_model
    assert untied.num_params() == tied.num_params() + table
    assert tied.num_params(exclude_embeddings=True) == tied.num_params() - table
    assert len(tied.state_dict()) == len(untied.state_dict())  # keys kept, one shared tensor


def test_residual_projections_get_scaled_init():
    model = build(n_layer=8, d_model=128, n_head=4, seq_len=16)
    block = model.layers["3"]
    std = model.cfg.init_std
    assert block.attn_branch.layer.q_proj.weight.std().item() == pytest.approx(std, rel=0.1)
    scaled = std / math.sqrt(2 * 8)
    assert block.attn_branch.layer.out_proj.weight.std().item() == pytest.approx(scaled, rel=0.1)
    assert block.mlp_branch.layer.down_proj.weight.std().item() == pytest.approx(scaled, rel=0.1)


# --------------------------------------------------------------------------------------
# recomputation
# --------------------------------------------------------------------------------------


def loss_and_grads(model: GPT, idx, targets, seed: int = 123):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_full_recompute_same_loss_and_grads_fewer_saved_bytes(dropout):
    plain = build(n_layer=4, n_kv_head=2, dropout=dropout).train()
    recomputed = apply_recompute(copy.deepcopy(plain), "full").train()
    idx, targets = batch(plain.cfg)

    loss, grads = loss_and_grads(plain, idx, targets)
    loss_rc, grads_rc = loss_and_grads(recomputed, idx, targets)
    assert_close(loss_rc, loss)
    assert grads_rc.keys() == grads.keys()
    for name in grads:
        assert_close(grads_rc[name], grads[name], msg=name)

    saved = saved_activation_bytes(plain, idx, targets)
    saved_rc = saved_activation_bytes(recomputed, idx, targets)
    assert saved_rc / saved < 0.6, (saved_rc, saved)


def test_backward_recomputes_each_branch():
    model = apply_recompute(build(), "full").train()
    calls = []
    for _, kind, wrapper in iter_branches(model):
        # a pre-hook: recomputation stops early, once the last tensor backward needs exists
        wrapper.layer.register_forward_pre_hook(lambda *_, kind=kind: calls.append(kind))
    idx, targets = batch(model.cfg)
    _, loss = model(idx, targets)
    assert len(calls) == 2 * model.cfg.n_layer  # forward: once per branch
    loss.backward()
    assert len(calls) == 4 * model.cfg.n_layer  # backward ran every branch again


def test_recompute_is_idempotent_and_toggleable():
    model = build()
    apply_recompute(model, "full")
    apply_recompute(model, "full")
    branches = list(iter_branches(model))
    assert [(i, kind) for i, kind, _ in branches] == [(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")]
    assert all(type(b) is CheckpointWrapper and b.enabled for *_, b in branches)
    assert all(not isinstance(b.inner, CheckpointWrapper) for *_, b in branches)
    branches[0][2].enabled = False  # a per-step policy can switch one branch off
    model.eval()
    assert not any(b.inner.training for *_, b in branches)
    apply_recompute(model, "none")
    assert not any(isinstance(b, CheckpointWrapper) for *_, b in iter_branches(model))
    with pytest.raises(ValueError, match="'none' or 'full'"):
        apply_recompute(model, "selective")


@pytest.mark.parametrize("saved_policy,loaded_policy", [("full", "none"), ("none", "full")])
def test_state_dict_loads_across_recompute_policies(saved_policy, loaded_policy):
    source = apply_recompute(build(seed=0), saved_policy)
    target = apply_recompute(build(seed=1), loaded_policy)
    plain_keys = list(build().state_dict())
    assert list(source.state_dict()) == plain_keys
    assert [n for n, _ in source.named_parameters()] == [n for n, _ in build().named_parameters()]
    target.load_state_dict(source.state_dict())  # strict
    idx, _ = batch(source.cfg)
    assert_close(target.eval()(idx)[0], source.eval()(idx)[0])


# --------------------------------------------------------------------------------------
# slots, training, errors
# --------------------------------------------------------------------------------------


def test_skipped_slots_keep_names_and_get_no_gradient():
    model = build(n_layer=3)
    keys = list(model.state_dict())
    idx, targets = batch(model.cfg)
    logits, loss = model(idx, targets, active_slots=[2, 0])
    loss.backward()
    assert list(model.state_dict()) == keys
    for key, block in model.layers.items():
        grads = [p.grad for p in block.parameters()]
        if key == "1":
            assert all(g is None for g in grads)
        else:
            assert all(g is not None for g in grads)
    # same as running the two layers by hand
    x = model.tok_emb(idx)
    x = model.layers["2"](model.layers["0"](x))
    assert_close(logits, model.lm_head(model.norm(x)))


def test_loss_falls_when_overfitting_one_batch():
    model = build(n_kv_head=2, activation="swiglu").train()
    idx, targets = batch(model.cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        _, loss = model(idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_ignore_index_targets_do_not_count():
    model = build().eval()
    idx, targets = batch(model.cfg)
    logits, _ = model(idx, targets)
    masked = targets.clone()
    masked[:, 8:] = -100
    _, loss = model(idx, masked)
    expected = F.cross_entropy(logits[:, :8].reshape(-1, model.cfg.vocab_size), targets[:, :8].reshape(-1))
    assert_close(loss, expected)


def test_bad_inputs_raise():
    model = build(n_layer=3)
    too_long = torch.zeros(1, model.cfg.seq_len + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"model\.seq_len"):
        model(too_long)
    idx, _ = batch(model.cfg)
    with pytest.raises(ValueError, match=r"active_slots \[3\] out of range"):
        model(idx, active_slots=[0, 3])
    with pytest.raises(ValueError, match=r"active_slots has duplicates \[1\]"):
        model(idx, active_slots=[1, 1])
    with pytest.raises(ValueError, match="active_slots must be layer indices"):
        model(idx, active_slots=[0.5])


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.n_kv_head"):
        config_from_dict({"model": {"n_head": 4, "n_kv_head": 3}})
    with pytest.raises(ConfigError, match=r"model\.n_head"):
        config_from_dict({"model": {"d_model": 30, "n_head": 4}})


# --------------------------------------------------------------------------------------
# training-state bytes
# --------------------------------------------------------------------------------------


def test_param_grad_and_optimizer_bytes():
    model = build()
    n = model.num_params()
    assert param_bytes(model) == 4 * n
    assert grad_bytes(model) == 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert optimizer_state_bytes(optimizer) == 0
    idx, targets = batch(model.cfg)
    model(idx, targets)[1].backward()
    optimizer.step()
    assert grad_bytes(model) == 4 * n
    n_tensors = len(list(model.parameters()))
    assert optimizer_state_bytes(optimizer) == 2 * 4 * n + n_tensors * 4  # exp_avg, exp_avg_sq, step


# --------------------------------------------------------------------------------------
# the faster forms compute the plain forward (the textbook implementations, kept here)
# --------------------------------------------------------------------------------------


def plain_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Plain RoPE: (B, T, heads, D) halves rotated separately and concatenated."""
    T, D = x.shape[1], x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    cos, sin = angles.cos().float()[:, None, :], angles.sin().float()[:, None, :]  # (T, 1, D/2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def plain_attention(attn: Attention, x: torch.Tensor, theta: float) -> torch.Tensor:
    """Plain grouped-query attention: key/value heads repeated with repeat_interleave."""
    B, T, _ = x.shape
    H, K, D = attn.n_head, attn.n_kv_head, attn.head_dim
    q = plain_rope(attn.q_proj(x).view(B, T, H, D), theta)
    k = plain_rope(attn.k_proj(x).view(B, T, K, D), theta)
    v = attn.v_proj(x).view(B, T, K, D)
    k, v = k.repeat_interleave(H // K, dim=2), v.repeat_interleave(H // K, dim=2)
    y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
    return attn.out_proj(y.transpose(1, 2).reshape(B, T, H * D))


def plain_forward(model: GPT, idx: torch.Tensor, targets: torch.Tensor):
    """The plain GPT forward and loss (F.cross_entropy) over the same parameters."""
    x = model.tok_emb(idx)
    for block in model.layers.values():
        a = block.attn_branch
        x = x + plain_attention(a.layer, a.norm(x), model.cfg.rope_theta)
        x = x + block.mlp_branch(x)
    logits = model.lm_head(model.norm(x))
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    return logits, loss


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("enable_gqa", [True, False])
def test_faster_rope_gqa_and_loss_equal_the_plain_forward(n_kv_head, enable_gqa):
    """Same logits, loss and gradients as the plain rotate-half RoPE, repeat_interleave GQA
    and F.cross_entropy: a checkpoint gives the same logits under either form."""
    model = build(n_kv_head=n_kv_head, activation="swiglu", seq_len=32, d_model=64)
    for block in model.layers.values():
        block.attn_branch.layer.enable_gqa = enable_gqa
    idx, targets = batch(model.cfg)
    targets = targets.clone()
    targets[0, :5] = -100  # ignored targets too
    logits, loss = model(idx, targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_logits, ref_loss = plain_forward(model, idx, targets)
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    assert_close(logits, ref_logits)
    assert_close(loss, ref_loss)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert_close(g, r, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_table_form_equals_rotating_the_halves(dtype):
    rope = RotaryEmbedding(16, 40, 500.0)
    x = torch.randn(3, 40, 2, 16).to(dtype).requires_grad_()
    grad = torch.randn(3, 40, 2, 16)
    out, ref = rope(x), plain_rope(x, 500.0)
    assert out.dtype == ref.dtype  # bf16 x and fp32 tables promote as in the plain form
    assert_close(out, ref)
    (g,) = torch.autograd.grad(out, x, grad)
    x32 = x.detach().float().requires_grad_()
    (ref_g,) = torch.autograd.grad(plain_rope(x32, 500.0), x32, grad)  # the exact gradient, in fp32
    assert g.dtype == dtype
    assert_close(g.float(), ref_g, **({} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}))
    assert_close(rope(x[:, 7:19], start=7), ref[:, 7:19])  # the decoding offset


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_equals_torch(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(50, 37, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, 37, (50,), generator=g)
    targets[::4] = -100
    loss = CrossEntropy.apply(logits, targets)
    (grad,) = torch.autograd.grad(loss, logits)
    ref = F.cross_entropy(logits.float(), targets, ignore_index=-100)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert_close(loss, ref)
    assert grad.dtype == dtype
    assert_close(grad, ref_grad)
    again = CrossEntropy.apply(logits, targets)
    again.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run twice"):
        again.backward()


def test_grouped_heads_only_where_the_kernel_takes_them():
    """On CUDA only flash attention takes grouped heads: fp32 or a mask would fall to the
    math kernel (O(T^2) memory), so k, v are repeated there."""
    assert sdpa_grouped_heads("cpu", torch.float32) and sdpa_grouped_heads("cpu", torch.float32, masked=True)
    assert sdpa_grouped_heads("cuda", torch.bfloat16) and sdpa_grouped_heads("cuda", torch.float16)
    assert not sdpa_grouped_heads("cuda", torch.float32)
    assert not sdpa_grouped_heads("cuda", torch.bfloat16, masked=True)
    assert not Attention(tiny(n_kv_head=2, attention_backend="efficient")).enable_gqa
