"""The single training loop that every Ray Train worker runs.

``train_loop_per_worker(loop_config)`` → build model and optimizer → restore the latest
checkpoint if Ray Train hands one → iterate this worker's shard → ``train_step`` → every
``log_every`` steps record metrics (rank 0, to MLflow) → every ``eval_every`` steps
``evaluate`` and ``ray.train.report(metrics, checkpoint=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray.train
import torch

from raydrat import tracking
from raydrat.config import RaydratConfig
from raydrat.model import GPT, apply_recompute
from raydrat.train import checkpoint as ckpt
from raydrat.train import metrics as M
from raydrat.train.oom import MicroBatchStep, PeakMemory
from raydrat.train.optim import build_optimizer, lr_at, set_lr
from raydrat.train.step import cycle_batches, evaluate, train_step


@dataclass
class LoopContext:
    """What the driver hands each worker besides the config."""

    tracking_uri: str | None
    run_id: str | None


def select_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but this worker sees no GPU: set train.device=auto")
        return ray.train.torch.get_device()
    return torch.device("cpu")


def build_model(cfg: RaydratConfig, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    apply_recompute(model, cfg.train.checkpointing)
    return model.to(device)


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
    cfg = RaydratConfig.model_validate(loop_config["config"])
    ctx = LoopContext(**loop_config["context"])
    tc = cfg.train
    world = ray.train.get_context()
    rank, world_size = world.get_world_rank(), world.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    device = select_device(tc.device)
    peak_mem = PeakMemory(device)

    model = build_model(cfg, device)
    peak_mem.watch(model)
    if world_size > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False)
    optimizer = build_optimizer(model, cfg.optim)

    start_step = 0
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            start_step = ckpt.restore(model, optimizer, ckpt.load_state(d))
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
        )

    stream = cycle_batches(lambda: (b["tokens"] for b in torch_batches(train_shard, cfg.data.shuffle_buffer)))
    tokens_per_step = tc.batch_size * tc.grad_accum * cfg.model.seq_len * world_size
    thr = M.Throughput(tc.steps - start_step, tokens_per_step)
    sink = MetricsSink(rank == 0, ctx, tc.steps)
    model.train()
    step_fn = MicroBatchStep(tc)

    for step in range(start_step, tc.steps):
        lr = lr_at(step, cfg.optim, tc.steps)
        set_lr(optimizer, lr)
        loss, grad_norm = step_fn(model, optimizer, [next(stream) for _ in range(tc.grad_accum)], cfg.optim.grad_clip)
        thr.step_done()
        done = step + 1
        last = done == tc.steps
        values: dict = {}
        if done % tc.log_every == 0 or last:
            values = {
                M.TRAIN_LOSS: loss.item(),
                M.LR: lr,
                M.TOKENS_PER_S: thr.rate(),
                M.TOKENS_SEEN: done * tokens_per_step,
            }
            if grad_norm is not None:
                values[M.GRAD_NORM] = float(grad_norm)
        evaluate_now = done % tc.eval_every == 0 or last
        save_now = evaluate_now or (tc.checkpoint_every and done % tc.checkpoint_every == 0)
        if evaluate_now:
            values[M.VAL_LOSS] = evaluate(model, (b["tokens"] for b in torch_batches(val_shard)), tc.eval_batches)
        if values:
            sink.record(done, values, thr.eta_s(done - start_step))
        if save_now:
            report = {**values, M.STEP: done, M.TOKENS_PER_S_AVG: thr.steady_rate()}
            report.update({M.PEAK_BYTES: peak_mem.peak() or 0, M.MICRO_BATCH: step_fn.micro_batch,
                           M.TRAIN_TIME_S: step_fn.train_time_s})
            if M.VAL_LOSS not in report:
                report[M.VAL_LOSS] = float("inf")
            if rank == 0:
                state = ckpt.training_state(model, optimizer, done, cfg.to_dict())
                with ckpt.checkpoint_dir(state) as d:
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(report, checkpoint=None)
