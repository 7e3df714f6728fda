"""The efficiency policy: per-step plans (active slots, recomputation decisions), the
resource loss, precision, and their metrics, for the Ray Train loop or any plain PyTorch
loop. The model stays pure: everything is applied from outside (wrapper flags and the
``active_slots`` argument).

A plain PyTorch loop (see docs/efficiency.md for a runnable version)::

    policy = EfficiencyPolicy(cfg, model, torch.device("cpu"))
    for step in range(cfg.train.steps):
        plan = policy.plan(step, tokens)           # slots + gate/budget decisions
        with plan.autocast():
            _, loss = model(idx, targets, **plan.forward_kwargs)
        plan.backward(plan.add_resource_loss(loss))  # task loss + resource loss
        plan.optimizer_step(optimizer)             # (GradScaler in fp16) + the gates' optimizer
        metrics = policy.record(step, loss.item())

``raydrat.train.step.train_step(..., hooks=plan)`` does the middle three lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raydrat.config import RaydratConfig
from raydrat.memory import BranchCost, measure_branch_costs
from raydrat.model.budget import solve_budget
from raydrat.model.gates import RecomputeGates
from raydrat.model.recompute import CheckpointWrapper, apply_recompute, iter_branches
from raydrat.model.slots import SlotController
from raydrat.train import metrics as M
from raydrat.train.precision import PrecisionPolicy


@dataclass
class StepPlan:
    """What one optimizer step runs: the active slots, which branches store their
    activations, and (gated) the straight-through store indicator for the resource loss.
    Also the hook object ``train_step`` calls (autocast, backward, optimizer step)."""

    active_slots: list[int] | None
    stored: list[bool]
    policy: "EfficiencyPolicy" = field(repr=False)
    store_ste: torch.Tensor | None = field(default=None, repr=False)
    _resource_added: bool = field(default=False, repr=False)

    @property
    def forward_kwargs(self) -> dict:
        return {} if self.active_slots is None else {"active_slots": self.active_slots}

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.policy.precision.autocast()

    def resource_loss(self) -> torch.Tensor | None:
        if self.store_ste is None:
            return None
        return self.policy.gates.resource_loss(self.store_ste, self.policy.active_mask(self))

    def add_resource_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` plus the resource loss (added once per plan, whatever the micro-batches)."""
        if self._resource_added or self.store_ste is None:
            return loss
        self._resource_added = True
        res = self.resource_loss()
        self.policy.last_resource_loss = float(res.detach())
        return loss + res.to(loss.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.policy.precision.backward(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.policy.precision.unscale_(optimizer)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.policy.precision.optimizer_step(optimizer)
        if self.policy.gate_optimizer is not None:
            self.policy.gate_optimizer.step()
            self.policy.gate_optimizer.zero_grad(set_to_none=True)
            self.policy.gates.update_multiplier(self.policy.active_mask(self))


class EfficiencyPolicy:
    """Builds and drives the techniques a config switches on, for one model."""

    def __init__(self, cfg: RaydratConfig, model: torch.nn.Module, device: torch.device, precision: str | None = None):
        self.cfg = cfg
        self.model = model
        self.device = device
        tc = cfg.train
        mode = tc.checkpointing
        apply_recompute(model, "none" if mode == "none" else "full")
        self.branches = [(layer, kind) for layer, kind, _ in iter_branches(model)]
        self.wrappers = [b for *_, b in iter_branches(model)]
        self.mode = mode
        self.slots = SlotController(cfg.slots, cfg.model.n_layer, tc.steps, seed=tc.seed)
        self.precision = PrecisionPolicy(
            precision or ("fp32" if tc.precision == "auto" else tc.precision),
            device,
            tc.precision_fallback,
            tc.precision_fallback_after,
            tc.precision_fallback_steps,
        )
        self.gates: RecomputeGates | None = None
        self.gate_optimizer: torch.optim.Optimizer | None = None
        if mode == "gated":
            self.gates = RecomputeGates(self.branches, cfg.gates, cfg.model.n_layer).to(device)
            self.gate_optimizer = torch.optim.Adam(self.gates.parameters(), lr=cfg.gates.lr)
        self.costs: list[BranchCost] | None = None
        self.outside_bytes = 0
        self.budget_stored: list[bool] | None = None
        self.last_plan: StepPlan | None = None
        self.last_resource_loss: float | None = None
        self.gate_history: list[tuple[int, list[float]]] = []
        self._measured_at: int | None = None

    # ---- costs ------------------------------------------------------------------------

    def needs_costs(self) -> bool:
        return self.mode in ("full", "gated", "budget")

    def measure(self, tokens: torch.Tensor) -> None:
        """Measure per-branch stored bytes and recompute FLOPs on a real micro-batch."""
        idx, targets = tokens[:, :-1], tokens[:, 1:]
        was_training = self.model.training
        self.model.train()
        self.costs, self.outside_bytes = measure_branch_costs(self.model, idx, targets, self.precision.autocast())
        self.model.train(was_training)
        self.model.zero_grad(set_to_none=True)
        if self.gates is not None:
            self.gates.set_measured(
                [c.stored_bytes for c in self.costs], [c.recompute_flops for c in self.costs], self.outside_bytes
            )
            self.gates.pretrain(self.gate_optimizer, self.cfg.gates.warmup_steps)
        if self.mode == "budget":
            budget = int(self.cfg.recompute.budget_mb * 2**20) - self.min_bytes()
            if budget < 0:
                raise ValueError(
                    f"recompute.budget_mb={self.cfg.recompute.budget_mb:g} is below the measured minimum "
                    f"{self.min_bytes() / 2**20:.3f} MB (every branch recomputed): raise it"
                )
            self.budget_stored = solve_budget(self.costs, budget).stored

    def min_bytes(self) -> int:
        """Saved bytes with every branch recomputed and every layer active (measured; the
        branch inputs are created outside the branches, so they are in ``outside_bytes``)."""
        assert self.costs is not None
        return self.outside_bytes

    # ---- planning -----------------------------------------------------------------------

    def plan(self, step: int, tokens: torch.Tensor | None = None) -> StepPlan:
        """The plan for ``step``, applied to the model's wrappers. ``tokens`` (a
        ``(B, T+1)`` micro-batch) is needed when costs must be (re)measured."""
        if self.needs_costs() and tokens is not None:
            due = self._measured_at is None or (
                self.mode == "gated" and step - self._measured_at >= self.cfg.gates.refresh_every
            )
            if due:
                self.measure(tokens)
                self._measured_at = step
        active = self.slots.plan(step)
        store_ste = None
        plan = StepPlan(active, [], self)
        if self.mode == "none":
            stored = [True] * len(self.branches)
        elif self.mode == "full":
            stored = [False] * len(self.branches)
        elif self.mode == "budget":
            if self.budget_stored is None:
                raise RuntimeError("checkpointing=budget: pass a micro-batch to the first plan() to measure costs")
            stored = list(self.budget_stored)
        else:
            hard, store_ste = self.gates.decide(self.active_mask(plan))
            stored = hard.tolist()
        for wrapper, s in zip(self.wrappers, stored):
            if isinstance(wrapper, CheckpointWrapper):
                wrapper.enabled = not s
        plan.stored, plan.store_ste = stored, store_ste
        self.last_plan = plan
        return plan

    def active_mask(self, plan: StepPlan) -> torch.Tensor:
        active = set(range(self.cfg.model.n_layer)) if plan.active_slots is None else set(plan.active_slots)
        return torch.tensor([1.0 if layer in active else 0.0 for layer, _ in self.branches], device=self.device)

    def plan_bytes(self, plan: StepPlan) -> int | None:
        """Saved activation bytes of ``plan`` from the measured per-branch costs."""
        if self.costs is None:
            return None
        active = self.active_mask(plan).tolist()
        return self.outside_bytes + sum(
            c.stored_bytes if a and s else 0 if a else -c.input_bytes
            for c, s, a in zip(self.costs, plan.stored, active)
        )

    def plan_recompute_flops(self, plan: StepPlan) -> int | None:
        if self.costs is None:
            return None
        active = self.active_mask(plan).tolist()
        return sum(int(a) * (0 if s else c.recompute_flops) for c, s, a in zip(self.costs, plan.stored, active))

    # ---- feedback and metrics -----------------------------------------------------------

    def record(self, step: int, loss: float | torch.Tensor) -> dict[str, float]:
        """Feed the step's loss back (adaptive slots, precision fallback) and return this
        step's efficiency metrics (names from :mod:`raydrat.train.metrics`). A tensor
        loss is only synchronised to the host when adaptive slots need it."""
        plan = self.last_plan
        values: dict[str, float] = {}
        if plan is not None:
            n_active = self.cfg.model.n_layer if plan.active_slots is None else len(plan.active_slots)
            values[M.ACTIVE_SLOTS] = float(n_active)
            values[M.STORED_FRACTION] = sum(plan.stored) / max(1, len(plan.stored))
            nbytes = self.plan_bytes(plan)
            if nbytes is not None:
                values[M.ACTIVATION_BYTES] = float(nbytes)
                values[M.RECOMPUTE_FLOPS] = float(self.plan_recompute_flops(plan))
            if self.cfg.slots.mode == "adaptive":
                self.slots.observe(float(loss), nbytes)
        if self.gates is not None:
            p = self.gates.probs().detach().cpu().tolist()
            self.gate_history.append((step + 1, p))
            for (layer, kind), pi in zip(self.branches, p):
                values[M.gate_prob_name(layer, kind)] = pi
            if self.last_resource_loss is not None:
                values[M.RESOURCE_LOSS] = self.last_resource_loss
            if self.gates.budgeted:
                values[M.GATE_MULTIPLIER] = float(self.gates.multiplier)
        message = self.precision.after_step(step)
        if message:
            values[M.PRECISION_SWITCHES] = float(len(self.precision.switches))
            M.setup_logging().info(message)
        if self.precision.scaler is not None:
            values[M.OVERFLOW_STEPS] = float(self.precision.skipped_total)
        return values

    # ---- checkpointing --------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything the policy learns or draws as it goes: gate logits, multiplier and
        costs, the gates' optimizer state, the slot controller (counters, RNG), the
        precision policy (GradScaler, fallback counters), the measured costs and when
        they were measured. ``load_state_dict`` on a fresh policy for the same config
        continues exactly where this one was (no re-measurement, no gate warm-up)."""
        state: dict = {
            "slots": self.slots.state_dict(),
            "precision": self.precision.state_dict(),
            "measured_at": self._measured_at,
            "costs": None if self.costs is None else [dataclasses.asdict(c) for c in self.costs],
            "outside_bytes": self.outside_bytes,
            "budget_stored": self.budget_stored,
        }
        if self.gates is not None:
            state["gates"] = self.gates.state_dict()
            state["gate_optimizer"] = self.gate_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.slots.load_state_dict(state["slots"])
        self.precision.load_state_dict(state["precision"])
        self._measured_at = state["measured_at"]
        self.costs = None if state["costs"] is None else [BranchCost(**c) for c in state["costs"]]
        self.outside_bytes = state["outside_bytes"]
        self.budget_stored = state["budget_stored"]
        if self.gates is not None and "gates" in state:
            self.gates.load_state_dict(state["gates"])
            self.gate_optimizer.load_state_dict(state["gate_optimizer"])

    def log_artifacts(self, tracking_uri: str, run_id: str) -> None:
        """Log the gate heat-map (gated runs) to the MLflow run."""
        import tempfile

        from raydrat import tracking

        with tempfile.TemporaryDirectory() as tmp:
            png = self.heatmap(Path(tmp) / Path(M.GATE_HEATMAP_ARTIFACT).name)
            if png is not None:
                tracking.log_artifact(tracking_uri, run_id, png, str(Path(M.GATE_HEATMAP_ARTIFACT).parent))

    def heatmap(self, path: str | Path) -> Path | None:
        """PNG heat-map of gate probabilities (rows: branches, columns: recorded steps)."""
        if not self.gate_history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [s for s, _ in self.gate_history]
        grid = torch.tensor([p for _, p in self.gate_history]).T.numpy()
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(self.branches) + 1.5))
        im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(self.branches)), [f"L{layer} {kind}" for layer, kind in self.branches])
        ticks = list(range(0, len(steps), max(1, len(steps) // 8)))
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
        ax.set_xlabel("step")
        ax.set_title("gate probability p (store activations)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out
