"""How a sweep chooses its trials: ``search: random | grid`` (drawn up front) or one of Ray
Tune's searchers (``optuna`` | ``hyperopt`` | ``bohb``), every proposal admitted against the
memory budget before Tune launches it.

The design: :class:`AdmittingSearcher` wraps the searcher (as Tune's own
``ConcurrencyLimiter`` does) and screens each proposal in ``suggest``. A proposal over the
budget never becomes a Tune trial (no actor, no trial directory, no concurrency slot taken,
nothing for ASHA to rank): it is recorded ``infeasible`` at once, the wrapped searcher is
told it scored the worst possible value (``inf`` for ``mode: min``) so its model moves away
from that region, and the wrapper asks it again, within ``num_samples`` proposals in all.
Screening inside the trial function instead would launch a trial only to refuse it, hold
a slot while it does, and feed a fake result to the scheduler.
"""

from __future__ import annotations

import importlib.util
import math
import pickle
from collections.abc import Callable
from typing import Any

from ray import tune
from ray.tune.search import Searcher

from raydrat.tune.admission import SweepError, Verdict
from raydrat.tune.space import Space, TrialSpec
from raydrat.tune.trial import STATUS

SEARCHERS = ("random", "grid", "optuna", "hyperopt", "bohb")
PACKAGES = {"optuna": ("optuna",), "hyperopt": ("hyperopt",), "bohb": ("hpbandster", "ConfigSpace")}
"""The packages each Ray Tune searcher needs (import names)."""


def tune_domains(space: Space) -> dict[str, Any]:
    """The space as Ray Tune domains, for a searcher (``grid`` entries become choices)."""
    out = {}
    for d in space.dists:
        if d.kind in ("choice", "grid"):
            bad = [v for v in d.args if not isinstance(v, (bool, int, float, str)) and v is not None]
            if bad:
                raise SweepError(
                    f"{space.path}: space.{d.key}: search: {space.sweep.search} takes only "
                    f"scalar candidates, got {bad[0]!r}: use search: random or grid"
                )
            out[d.key] = tune.choice(list(d.args))
        elif d.kind == "uniform":
            out[d.key] = tune.uniform(*d.args)
        elif d.kind == "loguniform":
            out[d.key] = tune.loguniform(*d.args)
        else:
            out[d.key] = tune.randint(*d.args)
    return out


def missing_packages(search: str) -> list[str]:
    return [p for p in PACKAGES.get(search, ()) if importlib.util.find_spec(p) is None]


def build_searcher(space: Space, trials: list[TrialSpec] | None) -> Searcher:
    """The searcher ``search:`` names: the drawn ``trials`` for random/grid, else Ray Tune's
    integration, seeded by ``seed``. A missing package is an error naming it."""
    sweep = space.sweep
    if sweep.search in ("random", "grid"):
        return DrawnTrials(trials or [], sweep.metric, sweep.mode)
    missing = missing_packages(sweep.search)
    if missing:
        raise SweepError(
            f"{space.path}: search: {sweep.search} needs the package(s) {', '.join(missing)}, which are not "
            f"installed: pip install {' '.join(missing)} (or use search: {' | '.join(s for s in SEARCHERS if not missing_packages(s))})"
        )
    domains = tune_domains(space)
    kw = {"metric": sweep.metric, "mode": sweep.mode}
    # the searchers' packages are optional and heavy: imported only when one is chosen
    if sweep.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return OptunaSearch(space=OptunaSearch.convert_search_space(domains), seed=sweep.seed, **kw)
    if sweep.search == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(space=HyperOptSearch.convert_search_space(domains), random_state_seed=sweep.seed, **kw)
    from ray.tune.search.bohb import TuneBOHB

    return TuneBOHB(space=TuneBOHB.convert_search_space(domains), seed=sweep.seed, **kw)


class DrawnTrials(Searcher):
    """``search: random | grid``: the trials drawn up front, proposed in order."""

    def __init__(self, trials: list[TrialSpec], metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.params = [dict(t.params) for t in trials]
        self.position = 0

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.position >= len(self.params):
            return Searcher.FINISHED
        self.position += 1
        return dict(self.params[self.position - 1])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass


class AdmittingSearcher(Searcher):
    """Wraps a searcher: every proposal goes through ``screen(index, proposal) ->
    Verdict``; an admitted one becomes the Tune trial ``launch(verdict)`` returns the config
    of, a refused one goes to ``refuse(verdict)`` and the searcher learns it as the worst
    result. At most ``total`` proposals in all. A trial that ran out of memory counts as the
    worst result too; one that failed otherwise is reported to the searcher as an error."""

    def __init__(
        self,
        inner: Searcher,
        total: int,
        screen: Callable[[int, dict], Verdict],
        launch: Callable[[Verdict], dict],
        refuse: Callable[[Verdict], None],
        metric: str,
        mode: str,
    ):
        super().__init__(metric=metric, mode=mode)
        self.inner, self.total = inner, total
        self.screen, self.launch, self.refuse = screen, launch, refuse
        self.worst = math.inf if mode == "min" else -math.inf
        self.proposed = 0
        self.live: dict[str, str] = {}
        """Tune's trial id -> the id the wrapped searcher knows it by."""

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the wrapped searcher was built with the space, metric and mode

    def suggest(self, trial_id: str) -> dict | str | None:
        while self.proposed < self.total:
            inner_id = f"{trial_id}-{self.proposed}"
            proposal = self.inner.suggest(inner_id)
            if proposal is None:
                return None
            if proposal == Searcher.FINISHED:
                break
            verdict = self.screen(self.proposed, proposal)
            self.proposed += 1
            if verdict.refused is None:
                self.live[trial_id] = inner_id
                return self.launch(verdict)
            self.refuse(verdict)
            self.inner.on_trial_complete(inner_id, {self.metric: self.worst})
        self.proposed = self.total
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.live:
            self.inner.on_trial_result(self.live[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        inner_id = self.live.pop(trial_id, None)
        if inner_id is None:
            return
        result = dict(result or {})
        value = result.get(self.metric)
        if result.get(STATUS) == "oom":
            result[self.metric] = self.worst
        elif error or result.get(STATUS) == "failed" or not isinstance(value, (int, float)) or math.isnan(value):
            self.inner.on_trial_complete(inner_id, None, error=True)
            return
        self.inner.on_trial_complete(inner_id, result)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"inner": self.inner, "proposed": self.proposed, "live": self.live}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.inner, self.proposed, self.live = state["inner"], state["proposed"], state["live"]
