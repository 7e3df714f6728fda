"""The single training loop that every Ray Train worker runs.

``train_loop_per_worker(loop_config)`` → build model and optimizer → restore the latest
checkpoint if Ray Train hands one → iterate this worker's shard → ``train_step`` → every
``log_every`` steps record metrics (rank 0, to MLflow) → every ``eval_every`` steps
``evaluate`` and ``ray.train.report(metrics, checkpoint=...)``.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train
import torch

from raydrat import tracking
from raydrat.config import RaydratConfig
from raydrat.efficiency import resolve_runtime
from raydrat.model import GPT, apply_recompute
from raydrat.runtime import quiet_ray_data
from raydrat.policy import EfficiencyPolicy
from raydrat.train import checkpoint as ckpt
from raydrat.train import resume as R
from raydrat.train import metrics as M
from raydrat.train.oom import MicroBatchStep, PeakMemory
from raydrat.train.optim import build_optimizer, lr_at, set_lr
from raydrat.train.step import evaluate
from raydrat.train.sync import CommMeter, build_strategy


@dataclass
class LoopContext:
    """What the driver hands each worker besides the config."""

    tracking_uri: str | None
    run_id: str | None
    fault_step: int | None = None
    """Test hook: after this optimizer step, rank ``fault_rank`` of a worker group that did
    not start from a checkpoint kills its own process (SIGKILL)."""
    fault_rank: int = 0
    run_dir: str | None = None
    """The run's directory in Ray Train storage."""
    checkpoints_since: float = 0.0
    """Checkpoints in ``run_dir`` saved since this time are this run's to start from (0 with
    ``--resume``: any). A worker group starts from the newest of them and of the checkpoint
    Ray Train hands it: Ray Train records a save only once its controller has collected every
    worker's report, so a worker killed right after saving can leave the newest save out of
    Ray Train's record (then a retry, or ``--resume``, would start over or start too early)."""


def select_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but this worker sees no GPU: set train.device=auto")
        return ray.train.torch.get_device()
    return torch.device("cpu")


def build_model(cfg: RaydratConfig, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    apply_recompute(model, "none" if cfg.train.checkpointing == "none" else "full")  # gated/budget: EfficiencyPolicy sets the flags
    model = model.to(device)
    if cfg.train.compile != "off":
        model.compile(mode=cfg.train.compile)  # in place: parameter names unchanged
    return model


class MetricsSink:
    """Rank 0 writes metrics to MLflow and the console; other ranks do nothing."""

    def __init__(self, is_chief: bool, ctx: LoopContext, total_steps: int):
        self.active = is_chief
        self.ctx = ctx
        self.total = total_steps
        self.log = M.setup_logging()

    def record(self, step: int, values: dict, eta_s: float) -> None:
        if not self.active:
            return
        self.log.info(M.progress_line(step, self.total, values, eta_s))
        if self.ctx.tracking_uri and self.ctx.run_id:
            tracking.log_metrics(self.ctx.tracking_uri, self.ctx.run_id, values, step)


def train_loop_per_worker(loop_config: dict) -> None:
    clock = M.PhaseClock()
    cfg = RaydratConfig.model_validate(loop_config["config"])
    ctx = LoopContext(**loop_config["context"])
    tc = cfg.train
    world = ray.train.get_context()
    rank, world_size = world.get_world_rank(), world.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    device = select_device(tc.device)
    quiet_ray_data()
    runtime = resolve_runtime(cfg, device)  # refuses what this device cannot run
    peak_mem = PeakMemory(device)

    model = build_model(cfg, device)
    peak_mem.watch(model)
    policy = EfficiencyPolicy(cfg, model, device, runtime.precision)  # slots, gates, budget, precision
    strategy = build_strategy(cfg.sync, world_size, skips_layers=cfg.slots.mode != "all")
    model = strategy.wrap(model)
    optimizer = build_optimizer(model, cfg.optim)
    strategy.attach_optimizer(optimizer)

    start_step = 0
    position = ckpt.DataPosition()
    on_storage = R.latest_checkpoint(Path(ctx.run_dir), ctx.checkpoints_since, world_size) if ctx.run_dir else None
    restored = ckpt.newest(ray.train.get_checkpoint(), on_storage)
    rank_state = None
    if restored is not None:
        with restored.as_directory() as d:
            rank_state = ckpt.load_rank_state(d, rank)
            saved = ckpt.load_state(d)
            start_step = ckpt.restore(model, optimizer, saved, rank_state, strategy, position)
            policy_state = (rank_state or saved).get("policy")  # gates, slots, precision
            if policy_state is not None:
                policy.load_state_dict(policy_state)
    if rank_state is None:
        torch.manual_seed(tc.seed + 1000 * rank + start_step)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    def torch_batches(shard, local_shuffle: int = 0):
        return shard.iter_torch_batches(
            batch_size=tc.batch_size,
            dtypes=torch.long,
            device=device,
            drop_last=True,
            local_shuffle_buffer_size=local_shuffle or None,
            # seeded, so a resumed run skips exactly the batches it had already trained on
            local_shuffle_seed=(tc.seed + rank) if local_shuffle else None,
            prefetch_batches=cfg.data.prefetch_batches,
        )

    stream = ckpt.resumable_batches(lambda: (b["tokens"] for b in torch_batches(train_shard, cfg.data.shuffle_buffer)), position)
    tokens_per_step = tc.batch_size * tc.grad_accum * cfg.model.seq_len * world_size
    thr = M.Throughput(tc.steps - start_step, tokens_per_step)
    sink = MetricsSink(rank == 0, ctx, tc.steps)
    comm = CommMeter(strategy.comm)
    if restored is not None:
        sink.record(start_step, {M.RESUMED_FROM_STEP: start_step}, float("nan"))
    model.train()
    window_loss, window_steps = torch.zeros((), device=device), 0
    step_fn = MicroBatchStep(tc)  # train_step, retried with smaller micro-batches on OOM

    for step in range(start_step, tc.steps):
        lr = lr_at(step, cfg.optim, tc.steps)
        set_lr(optimizer, lr)
        t_step = time.perf_counter()
        with clock.timing(M.DATA_WAIT_S):
            micro = [next(stream) for _ in range(tc.grad_accum)]
        plan = policy.plan(step, micro[0])
        loss, grad_norm = step_fn(model, optimizer, micro, cfg.optim.grad_clip, hooks=plan, no_sync=strategy.no_sync)
        efficiency_values = policy.record(step, loss)
        window_loss += loss.detach()
        window_steps += 1
        done = step + 1
        last = done == tc.steps
        evaluate_now = done % tc.eval_every == 0 or last
        save_now = evaluate_now or (tc.checkpoint_every and done % tc.checkpoint_every == 0)
        strategy.after_optimizer_step(done)
        if save_now:  # replicas agree before they are evaluated or saved
            strategy.synchronize()
        comm.step_done(time.perf_counter() - t_step)
        thr.step_done()
        values: dict = {}
        if done % tc.log_every == 0 or last:
            values = {
                M.TRAIN_LOSS: (window_loss / window_steps).item(),
                M.LR: lr,
                M.TOKENS_PER_S: thr.rate(),
                M.TOKENS_SEEN: done * tokens_per_step,
            }
            if grad_norm is not None:
                values[M.GRAD_NORM] = float(grad_norm)
            window_loss.zero_()
            window_steps = 0
            values.update(efficiency_values)
            values.update(comm.window())
        if evaluate_now:
            with clock.timing(M.EVAL_S):
                values[M.VAL_LOSS] = evaluate(model, (b["tokens"] for b in torch_batches(val_shard)), tc.eval_batches)
        if values:
            sink.record(done, values, thr.eta_s(done - start_step))
        if save_now:
            report = {**values, M.STEP: done, M.TOKENS_PER_S_AVG: thr.steady_rate()}
            report.update({M.PEAK_BYTES: peak_mem.peak() or 0, M.MICRO_BATCH: step_fn.micro_batch,
                           M.TRAIN_TIME_S: step_fn.train_time_s, **clock.snapshot()})
            if M.VAL_LOSS not in report:
                report[M.VAL_LOSS] = float("inf")
            with clock.timing(M.CHECKPOINT_S):
                policy_state = policy.state_dict()  # gates, slots, precision: every rank's file, and state.pt
                state = None
                if rank == 0:
                    state = ckpt.training_state(model, optimizer, done, cfg.to_dict(),
                                                {"sync": strategy.state_dict(), "policy": policy_state})
                per_rank = {**ckpt.rank_state(optimizer, position), "policy": policy_state,
                            "node_ip": ray.util.get_node_ip_address()}  # where this rank ran
                with ckpt.checkpoint_dir(state, rank, per_rank) as d:
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
        if ctx.fault_step == done and rank == ctx.fault_rank and restored is None:
            time.sleep(1.0)  # let the controller register the last report first
            os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0 and ctx.tracking_uri and ctx.run_id:
        policy.log_artifacts(ctx.tracking_uri, ctx.run_id)
