"""Everything a run or a model command starts from, built in one place.

:func:`build_fit_state` turns a config, its resolved :class:`~raydrat.core.runtime.Runtime`,
a device and a rank/world into the :class:`~raydrat.core.fit.FitState` the training loop
works on. The Ray Train worker (:mod:`raydrat.ray_train.worker`) and the in-process runs of
the benchmarks (:class:`raydrat.bench.local.LocalRun`) call it for training; with
``inference=True`` it builds the model that :func:`load_model` hands to ``raydrat eval``,
``generate`` and ``export``. For training, in this order:

1. the process's intra-op threads (``scaling.cpus_per_worker``), and the runtime checked
   on this device (:meth:`~raydrat.core.runtime.Runtime.verify`);
2. the allocator's accounting (:class:`~raydrat.core.memory.peak.PeakMemory`), made before
   the model so that the model's bytes count;
3. the model (:func:`initial_model`: seeded with ``train.seed``, then ``model.init_from``'s
   weights when set);
4. the techniques, each from its own section, applied from outside in their one order
   (:func:`~raydrat.core.techniques.bundle.build_techniques`,
   :func:`~raydrat.core.techniques.bundle.apply_techniques`);
5. the optimizer over the model to train, attached to the sync strategy.

Restoring a checkpoint into the state is the caller's (the Ray adapter restores the newest
one of its run). Torch only: no Ray, no MLflow.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from raydrat.config.model import ModelConfig
from raydrat.config.run import RaydratConfig
from raydrat.core.checkpoint.load import init_state, load_saved
from raydrat.core.fit import FitState
from raydrat.core.memory.peak import PeakMemory
from raydrat.core.model.build import build_model
from raydrat.core.model.transformer import GPT
from raydrat.core.optim import build_optimizer
from raydrat.core.runtime import Runtime
from raydrat.core.techniques.bundle import Techniques, apply_techniques, build_techniques


def initial_model(
    cfg: ModelConfig,
    seed: int | None = None,
    device: torch.device | str | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> GPT:
    """The model a run starts from: :func:`~raydrat.core.model.build.build_model` (seeded),
    then ``weights`` when given, else those of ``cfg.init_from`` when set
    (:func:`~raydrat.core.checkpoint.load.init_state`), on ``device``."""
    model = build_model(cfg, seed=seed)
    if weights is None and cfg.init_from:
        weights = init_state(cfg.init_from, cfg)
    if weights is not None:
        model.load_state_dict(weights)
    return model.to(device) if device is not None else model


def build_fit_state(
    cfg: RaydratConfig,
    runtime: Runtime | None,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    *,
    sample_steps: int = 2,
    sample_at: Collection[int] = (),
    inference: bool = False,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> FitState:
    """The :class:`FitState` of rank ``rank`` of ``world_size`` for ``cfg`` on ``device``
    (see the module docstring for what is built, in which order).

    ``sample_steps`` / ``sample_at``: the steps whose allocator peak is sampled on CPU
    (:class:`~raydrat.core.memory.peak.PeakMemory`'s ``first_steps`` / ``at_steps``; a
    benchmark samples others). ``weights``: the model's starting weights instead of its seeded
    initialisation and ``model.init_from``'s.

    ``inference=True``: the model alone, in eval mode with every layer in fp32 and no
    technique applied (:meth:`Techniques.plain`), no optimizer, the process's threads and
    the allocator left alone; ``runtime`` may be ``None``. What eval, generate and export
    run (:func:`load_model`)."""
    if inference:
        model = initial_model(cfg.model, device=device, weights=weights).eval()
        techniques = Techniques.plain(cfg.model.n_layer, device)
        return FitState(
            model=model,
            optimizer=None,
            techniques=techniques,
            train=cfg.train,
            optim=cfg.optim,
            seq_len=cfg.model.seq_len,
            rank=rank,
            world_size=world_size,
        )
    if runtime is None:
        raise ValueError("build_fit_state: training needs the resolved runtime (raydrat.core.runtime.resolve)")
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    runtime.verify(device, cfg.model.dropout)  # refuses what this device cannot run
    peak = PeakMemory(device, sample_steps, sample_at)
    with peak.region("build"):
        model = initial_model(cfg.model, seed=cfg.train.seed, device=device, weights=weights)
        techniques = build_techniques(cfg, runtime.precision, device, world_size)
        model = apply_techniques(model, techniques)  # recompute, compile, sync
        optimizer = build_optimizer(model, cfg.optim)
        techniques.sync.attach_optimizer(optimizer)
    return FitState(
        model=model,
        optimizer=optimizer,
        techniques=techniques,
        train=cfg.train,
        optim=cfg.optim,
        seq_len=cfg.model.seq_len,
        rank=rank,
        world_size=world_size,
        peak_memory=peak,
    )


@dataclass
class LoadedModel:
    """A trained model ready to use, with what it came with."""

    model: GPT
    model_cfg: ModelConfig
    cfg: RaydratConfig | None
    """The run's whole config (a checkpoint or a safetensors export with it), else ``None``."""
    tokenizer_path: Path | None
    source: Path
    step: int | None = None


def load_model(
    where: str | Path, storage_path: str | Path = "ray_results", device: torch.device | str = "cpu"
) -> LoadedModel:
    """The model ``where`` names (a checkpoint, a run directory or name under
    ``storage_path``, or an export: :func:`~raydrat.core.checkpoint.load.resolve_source`),
    built for inference on ``device`` by :func:`build_fit_state`, with its config and
    tokenizer."""
    saved = load_saved(where, storage_path)
    cfg = saved.cfg.model_copy(update={"model": saved.model_cfg}) if saved.cfg else RaydratConfig(model=saved.model_cfg)
    state = build_fit_state(cfg, None, torch.device(device), inference=True, weights=saved.weights)
    return LoadedModel(state.model, saved.model_cfg, saved.cfg, saved.tokenizer_path, saved.source, saved.step)
