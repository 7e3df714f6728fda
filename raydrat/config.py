"""Every raydrat setting, typed and validated once.

One pydantic model per component, ``extra="forbid"``, each field documented where it is
declared. ``load_config(path, overrides)`` reads a YAML recipe, applies ``--set a.b=c``
overrides and returns a validated :class:`RaydratConfig`; any problem raises
:class:`ConfigError` whose message names the YAML path of the bad key and what to do.

This module is the only place defaults live.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

RECIPES_DIR = Path(__file__).parent / "recipes"


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and the fix."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------


class ModelConfig(Section):
    vocab_size: int = Field(4096, ge=16)
    """Vocabulary size. Also the size the BPE tokenizer is trained to; a tokenizer with
    more tokens than this is refused."""
    seq_len: int = Field(256, ge=8)
    """Context length in tokens. The data pipeline packs ``seq_len + 1`` token blocks."""
    d_model: int = Field(256, ge=8)
    """Residual stream width."""
    n_layer: int = Field(4, ge=1)
    """Number of transformer layers (slots)."""
    n_head: int = Field(4, ge=1)
    """Number of query heads."""
    n_kv_head: int | None = Field(None, ge=1)
    """Number of key/value heads (grouped-query attention). ``None`` means ``n_head``
    (plain multi-head attention); 1 is multi-query attention. Must divide ``n_head``."""
    d_ff: int | None = Field(None, ge=1)
    """Hidden width of the MLP. ``None``: 4 * d_model, or 8/3 * d_model rounded up to a
    multiple of 64 for the gated activations (swiglu, geglu) to keep parameters equal."""
    activation: Literal["gelu", "relu", "silu", "swiglu", "geglu"] = "gelu"
    """MLP activation. ``swiglu``/``geglu`` are gated (three projections)."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalisation layer used before attention, before the MLP and before the head."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout probability on attention weights and residual branches."""
    bias: bool = False
    """Use bias terms in linear layers and LayerNorm."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output head."""
    rope_theta: float = Field(10000.0, gt=0)
    """RoPE base frequency."""
    init_std: float = Field(0.02, gt=0)
    """Standard deviation of the GPT-2 style normal init (residual projections are scaled
    by 1/sqrt(2 * n_layer))."""
    attention_backend: Literal["auto", "flash", "efficient", "math"] = "auto"
    """Kernel for ``F.scaled_dot_product_attention``. ``auto`` lets PyTorch choose."""

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_head "
                f"({self.n_head}): change one of them"
            )
        if (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"model.d_model / model.n_head = {self.d_model // self.n_head} must be even "
                "for RoPE: change model.d_model or model.n_head"
            )
        kv = self.kv_heads
        if self.n_head % kv:
            raise ValueError(
                f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({kv}): "
                f"choose n_kv_head from {[d for d in range(1, self.n_head + 1) if self.n_head % d == 0]}"
            )
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def gated_mlp(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.gated_mlp:
            hidden = int(8 * self.d_model / 3)
            return 64 * ((hidden + 63) // 64)
        return 4 * self.d_model


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------


class SourceConfig(Section):
    path: str
    """A file, a directory, a glob, an ``s3://bucket/prefix`` URI (a key, a prefix or a
    glob), or ``demo`` for the embedded corpus (built on first use from the running
    interpreter's standard library)."""
    format: Literal["parquet", "text"] = "parquet"
    """``parquet``: one document per row of ``text_column``. ``text``: plain text files
    (``.gz`` decompressed), split into documents by ``text_mode``."""
    text_column: str = "text"
    """Column holding the document text (parquet only); other columns are ignored."""
    text_mode: Literal["file", "line"] = "file"
    """Plain text only: ``file``: one document per file; ``line``: one per line (empty
    lines are counted as empty documents)."""
    weight: float | None = Field(None, gt=0)
    """Relative share of training tokens when several sources are mixed: a source's
    training blocks are repeated or subsampled (deterministically, by block) so that its
    share of the training stream is ``weight / sum(weights)`` (shares estimated from the
    sources' sizes). ``None`` on every source: sources are concatenated in their natural
    proportions. Give every source a weight or none."""
    endpoint_url: str | None = None
    """S3 only: endpoint of an S3-compatible store (MinIO, Ceph, GCS interop), e.g.
    ``http://127.0.0.1:9000``. ``None``: AWS. Credentials come from the standard chain
    (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, instance roles)."""
    region: str | None = None
    """S3 only: the bucket's region (``None``: ``AWS_DEFAULT_REGION`` or ``us-east-1``)."""


class DataConfig(Section):
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(path="demo")], min_length=1
    )
    """Where the documents come from."""
    demo_dir: str = "data/demo"
    """Where the embedded demo corpus and its tokenizer are written (relative paths are
    resolved against the working directory)."""
    tokenizer_path: str | None = None
    """A ``tokenizers`` JSON file. ``None``: ``tokenizer-<vocab_size>.json`` beside the demo corpus,
    trained on first use."""
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    """Share of documents held out for validation: a document goes to val when a keyed
    hash of its text (key ``split_seed``) falls below this fraction, so the split is
    deterministic, disjoint, and independent of file order and cluster size."""
    split_seed: int = 0
    """Seed of the train/val split hash."""
    tokenize_batch_size: int = Field(64, ge=1)
    """Documents per ``map_batches`` call when tokenizing."""
    pack_rows: int = Field(256, ge=1)
    """Documents per packing group (and plain-text files per unit of work): a group's
    documents are concatenated (each followed by the end-of-document token) and cut into
    ``seq_len + 1`` blocks; the group's last partial block is dropped and counted."""
    shuffle_buffer: int = Field(2048, ge=0)
    """Local shuffle buffer (in blocks) when iterating the training shard; 0 disables.
    Blocks arrive grouped by source file, so some shuffling keeps batches varied."""
    preserve_order: bool = True
    """Deliver the training blocks in the same order on every run (Ray Data's
    ``preserve_order``), so that, with the seeded local shuffle, a run resumed with
    ``--resume`` trains on exactly the batches an uninterrupted run would have. Turning it
    off lets a slow tokenizer task be overtaken (slightly higher ingest throughput on a busy
    cluster) at the price of run-to-run batch order. With several Train workers, Ray 2.60's
    ``streaming_split`` then deals each block to the worker that has received the fewest rows
    so far (not to whichever asks first), so each worker's stream is the same on every run
    too (an implementation property of Ray, not an API promise: docs/distributed.md)."""
    prefetch_batches: int = Field(2, ge=0)
    """Batches each Train worker fetches ahead of the one it trains on."""
    tokenize_actors: int = Field(0, ge=0)
    """Size of the tokenizer actor pool (each actor loads the tokenizer once). 0: the
    cluster's CPUs minus one per Train worker (at least 1)."""
    on_corrupt: Literal["error", "skip"] = "error"
    """A parquet or gzip file that cannot be read: ``error`` stops before training and
    names it; ``skip`` leaves it out and counts it (``skipped_files`` in the metrics and the
    manifest)."""
    val_max_units: int = Field(32, ge=1)
    """The val split is drawn from at most this many units of work (parquet row groups or
    groups of text files), spread evenly over the corpus, so building it costs the same for
    any corpus size. Val-rule documents of the other units are held out too (never
    trained on)."""
    prepared: str | None = None
    """A directory written by ``raydrat data prepare`` (local or ``s3://``): train on its
    blocks instead of reading ``sources``. Its manifest must match the tokenizer and
    ``model.seq_len``."""
    prepared_endpoint_url: str | None = None
    """S3-compatible endpoint for ``prepared`` (see ``sources[].endpoint_url``)."""
    tokenizer_sample_docs: int = Field(20000, ge=1)
    """``raydrat data tokenizer``: documents sampled (evenly over the units) to train the BPE."""

    @model_validator(mode="after")
    def _check_weights(self) -> "DataConfig":
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            missing = [str(i) for i, w in enumerate(weighted) if not w]
            raise ValueError(
                f"data.sources[{', '.join(missing)}].weight is missing: give every source a "
                "weight, or none (natural proportions)"
            )
        return self


# --------------------------------------------------------------------------------------
# optimisation and training
# --------------------------------------------------------------------------------------


class OptimConfig(Section):
    name: Literal["adamw", "adamw_fused", "adamw8bit", "paged_adamw8bit", "sgd"] = "adamw"
    """Optimizer. ``adamw``: torch AdamW (foreach). ``adamw_fused``: torch AdamW with
    ``fused=True`` (one kernel per step). ``adamw8bit`` / ``paged_adamw8bit``:
    bitsandbytes 8-bit AdamW (block-wise quantised moments: about 2 bytes of state per
    parameter instead of 8; tensors under 4096 elements keep 32-bit states); the paged
    variant pages its states to host memory under GPU pressure (plain 8-bit on CPU).
    ``sgd``: plain SGD (no momentum; ``weight_decay`` applied as L2), mainly for checking
    that sync strategies are equivalent."""
    lr: float = Field(3e-4, gt=0)
    """Peak learning rate (after warmup)."""
    min_lr: float = Field(3e-5, ge=0)
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warmup length in optimizer steps."""
    weight_decay: float = Field(0.1, ge=0)
    """Decoupled weight decay, applied to matrices only (not to norms, biases)."""
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this value; 0 disables clipping."""

    @model_validator(mode="after")
    def _check_lr(self) -> "OptimConfig":
        if self.min_lr > self.lr:
            raise ValueError(
                f"optim.min_lr ({self.min_lr}) exceeds optim.lr ({self.lr}): lower min_lr"
            )
        return self


class TrainConfig(Section):
    steps: int = Field(100, ge=1)
    """Optimizer steps to train."""
    batch_size: int = Field(8, ge=1)
    """Sequences per micro-batch per worker."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    eval_every: int = Field(50, ge=1)
    """Evaluate on the validation set every this many optimizer steps (and at the end)."""
    eval_batches: int = Field(8, ge=1)
    """Validation micro-batches per evaluation (at most the whole val set)."""
    log_every: int = Field(10, ge=1)
    """Print and record training metrics every this many optimizer steps."""
    checkpoint_every: int = Field(0, ge=0)
    """Save a checkpoint every this many steps; 0: only at evaluations."""
    checkpoints_to_keep: int = Field(2, ge=1)
    """Checkpoints kept on disk (best by validation loss)."""
    checkpointing: Literal["none", "full", "gated", "budget"] = "none"
    """Activation recomputation policy, applied to the attention and MLP branches from
    outside the model. ``none``: store everything. ``full``: recompute every branch.
    ``gated``: learnable per-branch gates decide each step (section ``gates``).
    ``budget``: the exact optimum (knapsack) that fits ``recompute.budget_mb`` of saved
    activations with the least recomputed FLOPs. Recomputation is exact: the loss is
    unchanged, memory is traded for step time."""
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    """Numeric precision of the forward/backward pass. Parameters, gradients and optimizer
    states stay fp32; ``bf16``/``fp16`` run matmuls under ``torch.autocast``; ``fp16``
    adds a ``GradScaler`` and needs a CUDA GPU. ``auto``: bf16 on a GPU that supports it,
    else fp16 on a GPU, else fp32."""
    precision_fallback: Literal["none", "bf16", "fp32"] = "none"
    """Dynamic precision policy for fp16: after ``precision_fallback_after`` consecutive
    overflow-skipped steps switch to this precision for ``precision_fallback_steps`` steps
    (each switch is logged). ``none``: never switch."""
    precision_fallback_after: int = Field(3, ge=1)
    """Consecutive fp16 overflow steps (GradScaler skips) that trigger the fallback."""
    precision_fallback_steps: int = Field(100, ge=1)
    """Steps run in the fallback precision before fp16 is tried again."""
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    """``torch.compile`` mode for the model (``off``: eager)."""
    seed: int = 1337
    """Seed for model init and data order."""
    storage_path: str = "ray_results"
    """Ray Train storage for checkpoints (relative paths resolve against the working
    directory)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: CUDA when the worker has a GPU, else CPU."""
    max_failures: int = Field(0, ge=-1)
    """Ray Train ``FailureConfig(max_failures)``: how many times a failed worker group is
    restarted from the latest checkpoint; -1 retries forever."""
    auto_microbatch: bool = False
    """On an out-of-memory error, retry the step with half the micro-batch and twice the
    accumulation (same global batch), down to ``train.min_micro_batch``; the micro-batch
    in use is reported as ``micro_batch_size``."""
    min_micro_batch: int = Field(1, ge=1)
    """Smallest micro-batch ``train.auto_microbatch`` may shrink to before giving up."""


class GatesConfig(Section):
    """Learnable recomputation gates (``train.checkpointing: gated``): one gate per
    attention branch and per MLP branch, applied from outside the model."""

    temperature: float = Field(1.0, gt=0)
    """Gate probability ``p = sigmoid(logit / temperature)``."""
    init_logit: float = 0.0
    """Initial logit of every gate (0: p = 0.5)."""
    decision: Literal["threshold", "sample"] = "threshold"
    """Hard store/recompute decision: ``threshold`` stores when ``p >= 0.5``; ``sample``
    draws Bernoulli(p) each step. The gradient reaches p by the straight-through estimator."""
    lam: float = Field(1e-2, ge=0)
    """lambda: weight of the memory term ``sum(p_i * c_i)`` (c_i: normalised cost of
    storing branch i). Must be >= 0."""
    mu: float = Field(1e-2, ge=0)
    """mu: weight of the recompute term ``sum((1 - p_i) * r_i)`` (r_i: normalised cost of
    recomputing branch i). Must be >= 0."""
    cost_model: Literal["uniform", "layer_weighted", "activation_size"] = "activation_size"
    """Costs c_i, r_i: ``uniform`` (all 1), ``layer_weighted`` (grow with depth), or
    ``activation_size`` (measured saved bytes and recompute FLOPs per branch)."""
    memory_budget_mb: float | None = Field(None, gt=0)
    """``memory_budget`` form: saved activation MB per micro-batch (embedding and logits
    included, as ``recompute.budget_mb``) the gates must fit. The gates then minimise the
    recompute cost under this budget: a Lagrange multiplier (started at ``lam``, moved by
    ``dual_lr``) penalises expected bytes above it, and each step's hard plan stores
    branches in order of p while they fit, so it never exceeds the budget. ``mu`` is not
    used in this form. ``None``: plain form."""
    lr: float = Field(0.05, gt=0)
    """Learning rate of the gates' own Adam optimizer (separate from ``optim.lr``)."""
    dual_lr: float = Field(0.05, gt=0)
    """memory_budget form: step of the Lagrange multiplier's dual ascent, per gate update,
    per unit of relative excess ``expected bytes / budget - 1``."""
    warmup_steps: int = Field(300, ge=0)
    """Gate-only updates run after each cost measurement (a few tiny tensor ops each, no
    model pass: the resource loss depends only on the gates and the measured costs), so the
    gates start near their fixed point instead of spending the first training steps getting
    there. 0: none."""
    refresh_every: int = Field(100, ge=1)
    """Re-measure the activation_size costs every this many steps."""


class RecomputeConfig(Section):
    budget_mb: float | None = Field(None, gt=0)
    """Activation-memory budget (MB of saved activations per micro-batch, including the
    embedding and logits terms) for ``train.checkpointing: budget``. Required there."""


class SlotsConfig(Section):
    """Which transformer layers (slots) run each training step. Evaluation always runs all."""

    mode: Literal["all", "layerdrop", "progressive", "adaptive", "fixed"] = "all"
    """``all``; ``layerdrop``: each layer kept with probability ``keep``; ``progressive``:
    keep probability decays from 1 toward ``floor`` over training, deeper layers dropped
    more; ``adaptive``: more slots when the loss plateaus, fewer under memory pressure,
    within [``min_slots``, ``max_slots``]; ``fixed``: the layers in ``fixed``."""
    keep: float = Field(0.5, gt=0, le=1)
    """Keep probability per layer (layerdrop). Must be in (0, 1]."""
    floor: float = Field(0.5, gt=0, le=1)
    """Final keep probability of the deepest layer (progressive). Must be in (0, 1]."""
    decay: float = Field(5.0, gt=0)
    """Progressive: global keep ``theta(t) = (1 - floor) * exp(-decay * t / steps) + floor``."""
    fixed: list[int] | None = None
    """Layer indices to run (fixed)."""
    min_slots: int = Field(1, ge=1)
    """Adaptive: fewest active layers."""
    max_slots: int | None = Field(None, ge=1)
    """Adaptive: most active layers (``None``: model.n_layer)."""
    start_slots: int | None = Field(None, ge=1)
    """Adaptive: active layers at the start (``None``: min_slots)."""
    patience: int = Field(20, ge=1)
    """Adaptive: steps without a relative loss improvement of ``plateau_tol`` that count as a plateau."""
    plateau_tol: float = Field(0.01, ge=0)
    """Adaptive: relative improvement of the smoothed loss below which it has plateaued."""
    memory_limit_mb: float | None = Field(None, gt=0)
    """Adaptive: drop a slot when measured activation MB exceed this (``None``: no limit)."""


class ScalingConfig(Section):
    num_workers: int = Field(1, ge=1)
    """Ray Train workers."""
    use_gpu: Literal["auto"] | bool = "auto"
    """``auto``: one GPU per worker when the Ray cluster has GPUs."""
    cpus_per_worker: float = Field(1, gt=0)
    """CPUs reserved for each training worker. Torch intra-op threads follow this value."""
    worker_resources: dict[str, float] = Field(default_factory=dict)
    """Extra Ray resources each training worker requests, e.g. ``{raydrat_link_node: 1}``
    to place one worker on each node that advertises one (``ray start --resources``)."""
    wait_for_resources: bool = False
    """Start even when the Ray cluster has fewer CPUs/GPUs than the workers need (an
    autoscaling cluster will add nodes); otherwise such a run is refused up front."""

    @model_validator(mode="after")
    def _check_worker_resources(self) -> "ScalingConfig":
        for key, value in self.worker_resources.items():
            if key in ("CPU", "GPU"):
                raise ValueError(f"scaling.worker_resources.{key}: set scaling.cpus_per_worker or "
                                 "scaling.use_gpu instead")
            if not value > 0:
                raise ValueError(f"scaling.worker_resources.{key}={value}: give a positive amount")
        return self


class SyncConfig(Section):
    """How the Ray Train workers synchronise (see docs/distributed.md)."""

    mode: Literal["ddp", "local"] = "ddp"
    """``ddp``: gradients all-reduced every optimizer step (PyTorch DDP). ``local``: each
    worker takes ``sync_steps`` optimizer steps on its own shard, then parameters are
    averaged across workers (local SGD; DiLoCo with ``outer_optimizer``)."""
    sync_steps: int = Field(1, ge=1)
    """``local`` only: optimizer steps between parameter averages."""
    average_optimizer_state: bool = False
    """``local`` only: also average the optimizer's floating-point state (e.g. AdamW
    moments) at each sync; otherwise it stays local to each worker."""
    outer_optimizer: Literal["none", "nesterov"] = "none"
    """``local`` only: ``nesterov`` treats the averaged change since the last sync as a
    pseudo-gradient for an outer SGD with Nesterov momentum (DiLoCo)."""
    outer_lr: float = Field(0.7, gt=0)
    """Learning rate of the outer optimizer."""
    outer_momentum: float = Field(0.9, ge=0, lt=1)
    """Nesterov momentum of the outer optimizer."""
    bucket_cap_mb: float | None = Field(None, gt=0)
    """``ddp`` only: DDP gradient bucket size in MB (``None``: PyTorch's default, 25)."""
    find_unused_parameters: bool = False
    """``ddp`` only: let DDP tolerate parameters without gradients in a step (always on
    when ``slots.mode`` is not ``all``: skipped layers get no gradients)."""
    latency_s: float = Field(0.0, ge=0)
    """Extra delay before each collective, simulating a slow link (benchmarks)."""

    @model_validator(mode="after")
    def _check_mode(self) -> "SyncConfig":
        set_fields = self.model_fields_set
        if self.mode == "local":
            ddp_only = sorted(k for k in ("bucket_cap_mb", "find_unused_parameters") if k in set_fields
                              and getattr(self, k) != type(self).model_fields[k].default)
            if ddp_only:
                raise ValueError(
                    f"sync.{', sync.'.join(ddp_only)} only apply to sync.mode=ddp: remove them or "
                    "set sync.mode=ddp"
                )
        else:
            local_only = sorted(
                k for k in ("sync_steps", "average_optimizer_state", "outer_optimizer")
                if getattr(self, k) != type(self).model_fields[k].default
            )
            if local_only:
                raise ValueError(
                    f"sync.{', sync.'.join(local_only)} only apply to sync.mode=local: set "
                    "sync.mode=local or remove them"
                )
        return self


class TrackingConfig(Section):
    enabled: bool = True
    """Record the run in MLflow."""
    tracking_uri: str | None = None
    """MLflow tracking URI. ``None``: ``$MLFLOW_TRACKING_URI`` if set, else the embedded
    SQLite store ``sqlite:///mlruns.db`` in the working directory."""
    experiment: str = "raydrat"
    """MLflow experiment name."""
    run_name: str | None = None
    """MLflow run name. ``None``: the config's ``name`` plus a timestamp."""


class RaydratConfig(Section):
    name: str = "raydrat"
    """Name of the run (Ray Train run directory and default MLflow run name)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    recompute: RecomputeConfig = Field(default_factory=RecomputeConfig)
    slots: SlotsConfig = Field(default_factory=SlotsConfig)

    @model_validator(mode="after")
    def _check_cross(self) -> "RaydratConfig":
        if self.train.min_micro_batch > self.train.batch_size:
            raise ValueError(
                f"train.min_micro_batch ({self.train.min_micro_batch}) exceeds train.batch_size "
                f"({self.train.batch_size}): lower train.min_micro_batch"
            )
        if self.optim.warmup_steps >= self.train.steps and self.train.steps > 1:
            raise ValueError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) must be below train.steps "
                f"({self.train.steps}): lower optim.warmup_steps"
            )
        from raydrat.efficiency import check_static

        check_static(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Flattened ``{"section.key": value}`` view (MLflow params, Tune spaces)."""
        return flatten(self.to_dict())


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``d["a"]["b"]["c"] = value`` for ``dotted == "a.b.c"``, creating mappings."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"override key {dotted!r} is not a dotted path like 'optim.lr'")
    node = d
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(
                f"override {dotted!r}: {'.'.join(parts[: i + 1])} is a value, not a section"
            )
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-3"`` → ``("optim.lr", 0.001)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.strip(), value


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (for 'allowed keys')."""
    model: Any = RaydratConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        candidates = [ann, *(inner or ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "<top level>"
        if err["type"] == "extra_forbidden":
            owner = _section_at(loc)
            allowed = sorted(owner.model_fields) if owner else []
            lines.append(f"  {path}: unknown key; allowed keys here: {', '.join(allowed)}")
        elif err["type"] == "value_error":
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"  {path or 'config'}: {msg}" if loc else f"  {msg}")
        else:
            lines.append(f"  {path}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def resolve_shipped_yaml(path: str | Path, folder: Path, kind: str, shipped_kind: str) -> Path:
    """``path`` if it exists, else the shipped ``folder/NAME.yaml`` it names. The error
    ("config file ... not found (shipped recipes: ...)") lists what is shipped."""
    p = Path(path)
    if p.exists():
        return p
    for candidate in (folder / p.name, folder / f"{p.name}.yaml"):
        if candidate.exists():
            return candidate
    shipped = ", ".join(sorted(q.stem for q in folder.glob("*.yaml"))) or "none"
    raise ConfigError(f"{kind} {str(path)!r} not found (shipped {shipped_kind}: {shipped})")


def resolve_recipe(path: str | Path) -> Path:
    """A recipe path, or the name of a shipped recipe (``debug`` / ``debug.yaml``)."""
    return resolve_shipped_yaml(path, RECIPES_DIR, "config file", "recipes")


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config must be a YAML mapping of sections (model:, data:, ...), "
            f"got a {type(data).__name__}"
        )
    return data


def config_from_dict(
    data: dict[str, Any], overrides: list[str] | None = None, origin: str = "<dict>"
) -> RaydratConfig:
    data = copy.deepcopy(data)
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    try:
        return RaydratConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origin)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RaydratConfig:
    """Load a YAML recipe (a path or a shipped recipe name) and apply overrides."""
    p = resolve_recipe(path)
    return config_from_dict(read_yaml_mapping(p), overrides, origin=str(p))


# --------------------------------------------------------------------------------------
# sweeps (tune_spaces/*.yaml)
# --------------------------------------------------------------------------------------


class SchedulerConfig(Section):
    type: Literal["asha", "none"] = "asha"
    """``asha``: asynchronous successive halving on the sweep metric; ``none``: every trial
    runs to the end."""
    grace_period: int = Field(1, ge=1)
    """Optimizer steps a trial runs before ASHA may stop it (counted in reported steps)."""
    reduction_factor: float = Field(2.0, gt=1)
    """ASHA keeps the best 1/reduction_factor of trials at each rung."""


class TrialResourcesConfig(Section):
    trial_cpu: float = Field(0.1, gt=0)
    """CPUs held by each trial's driver function (it only waits for its TorchTrainer; the
    training workers reserve ``scaling.cpus_per_worker`` each on top)."""
    gpu_memory_gb: float | None = Field(None, gt=0)
    """Memory of one GPU, used to size a trial's GPU fraction. ``None``: read from the
    local CUDA device when there is one."""
    data_cpu_headroom: float = Field(1.0, ge=0)
    """CPUs left free for Ray Data tasks when checking that ``max_concurrent`` trials fit."""


class SweepConfig(Section):
    name: str = "sweep"
    """Name of the sweep (Tune experiment directory prefix, MLflow parent run name)."""
    base: str = "debug"
    """Base recipe: a YAML path (relative to the space file) or a shipped recipe name."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Fixed dotted settings applied to every trial, e.g. ``train.steps: 6``."""
    space: dict[str, Any] = Field(default_factory=dict)
    """Dotted config key → ``{choice: [...]}``, ``{grid: [...]}``, ``{uniform: [lo, hi]}``,
    ``{loguniform: [lo, hi]}`` or ``{randint: [lo, hi]}`` (hi excluded); optionally with
    ``when: {other.key: value-or-list}`` to apply it only to trials where that holds."""
    metric: str = "val_loss"
    """Metric the scheduler and the "best" trial use."""
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(1, ge=1)
    """Random samples per grid point (Tune semantics: trials = num_samples x grid size)."""
    seed: int = 0
    """Seed of the random sampling (the same seed gives the same trials)."""
    max_concurrent: int = Field(1, ge=1)
    """Trials running at once, at most (also limited by resources and the budget)."""
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    memory_budget_gb: float | None = Field(None, gt=0)
    """Peak memory one trial's worker may use (estimated before launch). Trials over it are
    recorded as ``infeasible`` and never launched. ``None``: no budget."""
    resources: TrialResourcesConfig = Field(default_factory=TrialResourcesConfig)
    storage_path: str = "ray_results/tune"
    """Where the Tune experiment (and its trials' Ray Train runs) are stored."""
