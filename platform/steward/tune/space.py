"""spec.tune -> Ray Tune objects (search space, search algorithm, scheduler), and a trial's values -> its spec.

Each distribution kind maps to exactly one Tune constructor: nothing in a spec is ever evaluated as code.
"""

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    MedianStoppingRule,
    PopulationBasedTraining,
    TrialScheduler,
)
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher

from steward.spec import JobSpec, validate_job
from steward.spec.base import set_dotted
from steward.spec.tune import AshaScheduler, Distribution, MedianStoppingScheduler, PbtScheduler, TuneSpec

TIME_ATTR = "training_iteration"  # one Tune iteration is one epoch: the loop reports once per epoch


def domain(dist: Distribution, enumerate_all: bool = False) -> Any:
    """The Ray Tune object for one distribution; `enumerate_all` makes it a grid of its values."""
    args = dist.args
    if enumerate_all:
        return tune.grid_search(list(args))
    constructors: dict[str, Callable[..., Any]] = {
        "choice": tune.choice,
        "uniform": tune.uniform,
        "loguniform": tune.loguniform,
        "randint": tune.randint,
        "qrandint": tune.qrandint,
    }
    return constructors[dist.kind](list(args)) if dist.kind == "choice" else constructors[dist.kind](*args)


def param_space(spec: TuneSpec) -> dict[str, Any]:
    """Tune's param_space: one flat key per dotted spec path."""
    return {path: domain(dist, spec.enumerates(dist)) for path, dist in spec.search_space.items()}


def search_algorithm(spec: TuneSpec, seed: int, max_concurrent: int) -> Searcher | BasicVariantGenerator:
    """The seeded search algorithm, running at most max_concurrent trials at once."""
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent)  # TPE, Optuna's default sampler
    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)


def scheduler(spec: TuneSpec, epochs: int) -> TrialScheduler:
    """The trial scheduler; metric and mode come from the TuneConfig."""
    chosen = spec.scheduler
    if isinstance(chosen, AshaScheduler):
        return ASHAScheduler(
            time_attr=TIME_ATTR,
            max_t=chosen.max_t or epochs,
            grace_period=chosen.grace_period,
            reduction_factor=chosen.reduction_factor,
        )
    if isinstance(chosen, MedianStoppingScheduler):
        return MedianStoppingRule(
            time_attr=TIME_ATTR, grace_period=chosen.grace_period, min_samples_required=chosen.min_samples_required
        )
    if isinstance(chosen, PbtScheduler):
        paths = chosen.hyperparam_mutations or [p for p, d in spec.search_space.items() if d.kind != "grid"]
        mutations = {p: _mutation(spec.search_space[p]) for p in paths}
        return PopulationBasedTraining(
            time_attr=TIME_ATTR,
            perturbation_interval=chosen.perturbation_interval,
            hyperparam_mutations=mutations,
            quantile_fraction=chosen.quantile_fraction,
            resample_probability=chosen.resample_probability,
            synch=chosen.synch,
        )
    return FIFOScheduler()


def _mutation(dist: Distribution) -> Any:
    # A list makes PBT step to a neighbouring value; a Domain makes it scale by 0.8 / 1.2 or resample.
    return list(dist.args) if dist.kind == "choice" else domain(dist)


def trial_spec(base: dict[str, Any], values: dict[str, Any], tune_spec: TuneSpec) -> JobSpec:
    """The spec one trial runs: the sweep's spec (without `tune`) with the trial's values, validated like any spec.

    PBT scales numbers by 0.8 / 1.2, so values are brought back into their range (and onto their integer grid).
    """
    raw = copy.deepcopy(base)
    for path, value in values.items():
        dist = tune_spec.search_space.get(path)
        set_dotted(raw, path, _on_grid(dist, value) if dist else value)
    return validate_job(raw, f"trial {values}", Path.cwd())


def _on_grid(dist: Distribution, value: Any) -> Any:
    if dist.kind in ("uniform", "loguniform"):
        return min(max(value, dist.args[0]), dist.args[1])
    if dist.kind == "randint":
        low, high = dist.args
        return min(max(round(value), low), high - 1)
    if dist.kind == "qrandint":
        low, high, q = dist.args
        return min(max(round(value / q) * q, low), high)
    return value
