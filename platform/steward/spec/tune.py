"""The `tune` section: a Ray Tune sweep over dotted paths of the job spec itself."""

import math
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from steward.spec.base import MAX_COUNT, MAX_SEED, Section, coerce_exponent

KINDS = ("choice", "grid", "uniform", "loguniform", "randint", "qrandint")
# Every listed value is validated as a spec variant before a trial starts; these bounds keep that quick.
MAX_VALUES, MAX_PATHS = 256, 32
# Ray Tune draws integers with numpy, which takes 64-bit bounds.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
MAX_EPOCHS = 100_000


class Distribution(Section):
    """One searched value, written as a single-key mapping: `{loguniform: [1.0e-4, 1.0e-2]}`."""

    choice: list[Any] | None = Field(
        None, min_length=1, max_length=MAX_VALUES, description="Sample one of these values."
    )
    grid: list[Any] | None = Field(
        None, min_length=1, max_length=MAX_VALUES, description="Try every one of these values."
    )
    uniform: tuple[float, float] | None = Field(None, description="[low, high]: a float, uniformly.")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high], low > 0: a float, log-uniformly.")
    randint: tuple[Int64, Int64] | None = Field(None, description="[low, high): an integer, uniformly.")
    qrandint: tuple[Int64, Int64, Int64] | None = Field(
        None, description="[low, high, q]: a multiple of q in [low, high]."
    )

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)

    @property
    def candidates(self) -> list[Any]:
        """Values that bound what this distribution can produce: each listed value, or both ends of a range."""
        args = self.args
        if self.kind in ("choice", "grid"):
            return list(args)
        return [args[0], args[1] - 1] if self.kind == "randint" else [args[0], args[1]]

    @field_validator("choice", "grid")
    @classmethod
    def _floats(cls, values: list[Any] | None) -> list[Any] | None:
        return None if values is None else [coerce_exponent(v) for v in values]

    @model_validator(mode="after")
    def _one_valid_kind(self) -> "Distribution":
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)}, e.g. {{uniform: [0.0, 0.5]}}; got {given}")
        args = self.args
        if self.kind in ("uniform", "loguniform", "randint", "qrandint") and not args[0] < args[1]:
            raise ValueError(f"{self.kind}: low must be below high, got {list(args)}")
        if self.kind == "loguniform" and args[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0, got {args[0]}")
        if self.kind == "qrandint" and args[2] <= 0:
            raise ValueError(f"qrandint: q must be > 0, got {args[2]}")
        return self


class FifoScheduler(Section):
    name: Literal["fifo"] = Field(description="Run every trial to the end.")


class AshaScheduler(Section):
    name: Literal["asha"] = Field(description="Asynchronous successive halving: stop the worst trials at rungs.")
    max_t: int | None = Field(
        None, ge=1, le=MAX_EPOCHS, description="Epochs a trial may run at most (default train.epochs)."
    )
    grace_period: int = Field(1, ge=1, le=MAX_EPOCHS, description="Epochs every trial runs before it can be stopped.")
    reduction_factor: float = Field(
        3, ge=2, le=1000, description="Keep 1 / reduction_factor of the trials at each rung."
    )


class PbtScheduler(Section):
    name: Literal["pbt"] = Field(description="Population based training: copy the best trials, perturb their config.")
    perturbation_interval: int = Field(1, ge=1, le=MAX_EPOCHS, description="Epochs between exploit/explore steps.")
    hyperparam_mutations: list[str] | None = Field(
        None, description="Search-space paths PBT may change mid-run (default: every non-grid path)."
    )
    quantile_fraction: float = Field(0.25, gt=0, le=0.5, description="Bottom fraction that copies the top one.")
    resample_probability: float = Field(0.25, ge=0, le=1, description="Chance to resample instead of perturb.")
    synch: bool = Field(
        False,
        description="Wait for every trial at each interval before copying (slower: waiting trials restart), so "
        "short trials that finish at different times still exploit each other.",
    )


class MedianStoppingScheduler(Section):
    name: Literal["median_stopping"] = Field(description="Stop a trial below the median of the others so far.")
    grace_period: int = Field(1, ge=1, le=MAX_EPOCHS, description="Epochs before a trial can be stopped.")
    min_samples_required: int = Field(3, ge=1, le=100_000, description="Trials needed before the median is trusted.")


SchedulerSpec = Annotated[
    FifoScheduler | AshaScheduler | PbtScheduler | MedianStoppingScheduler, Field(discriminator="name")
]


class TuneSpec(Section):
    metric: str = Field("val_loss", description="A metric the training loop reports each epoch, e.g. val_accuracy.")
    mode: Literal["min", "max"] = Field("min", description="Whether a lower or higher metric is better.")
    search_space: dict[str, Distribution] = Field(
        min_length=1,
        max_length=MAX_PATHS,
        description="Dotted spec paths (train.optimizer.lr, model.params.hidden_size, ...) to sample.",
    )
    search: Literal["random", "grid", "optuna"] = Field(
        "random", description="random (grid values crossed with samples), grid (only grid/choice), optuna (TPE)."
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Seed of the search algorithm (default: the job's seed)."
    )
    scheduler: SchedulerSpec = Field(
        default_factory=lambda: FifoScheduler(name="fifo"), description="Trial scheduler, chosen by `name`."
    )
    num_samples: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Trials to sample (default 4); with search: grid, how often the grid runs (default 1).",
    )
    max_concurrent_trials: int | None = Field(
        None, ge=1, le=10_000, description="Trials running at once (default: as fit)."
    )
    time_budget_s: float | None = Field(
        None, gt=0, le=MAX_COUNT, description="Stop starting and running trials after this long."
    )
    on_finish: Literal["keep_best", "retrain_best"] = Field(
        "keep_best",
        description="keep_best: the best trial's model becomes the run's model; "
        "retrain_best: retrain the best config on train + validation for the best trial's epochs.",
    )

    @property
    def samples(self) -> int:
        return self.num_samples or (1 if self.search == "grid" else 4)

    @property
    def num_trials(self) -> int:
        """Trials the sweep makes: Tune crosses every grid with each of the samples."""
        return self.samples * math.prod(len(d.args) for d in self.search_space.values() if self.enumerates(d))

    def enumerates(self, dist: Distribution) -> bool:
        """Whether every value of `dist` is tried (a grid, or a choice under search: grid) rather than sampled."""
        return dist.kind == "grid" or (self.search == "grid" and dist.kind == "choice")


def tune_problems(tune: TuneSpec, spec: dict[str, Any], reported: set[str]) -> dict[tuple, str]:
    """Cross-section checks of a tune section against the rest of the (dumped) spec, keyed by field location."""
    problems: dict[tuple, str] = {}
    if tune.metric not in reported:
        problems[("tune", "metric")] = f"training does not report {tune.metric!r}; use one of {sorted(reported)}"
    kinds = {path: dist.kind for path, dist in tune.search_space.items()}
    if tune.search == "grid" and (sampled := sorted(p for p, k in kinds.items() if k not in ("grid", "choice"))):
        problems[("tune", "search")] = f"grid search needs grid or choice values; {sampled} are sampled: use random"
    if tune.search == "optuna" and (grids := sorted(p for p, k in kinds.items() if k == "grid")):
        problems[("tune", "search")] = f"optuna samples, it cannot enumerate {grids}: use choice instead of grid"
    scheduler, epochs = tune.scheduler, spec["train"]["epochs"]
    if isinstance(scheduler, AshaScheduler) and scheduler.grace_period > (scheduler.max_t or epochs):
        problems[("tune", "scheduler", "grace_period")] = "must not exceed max_t (default train.epochs)"
    if isinstance(scheduler, AshaScheduler) and (scheduler.max_t or 0) > epochs:
        problems[("tune", "scheduler", "max_t")] = f"trials stop at train.epochs ({epochs}); lower max_t"
    if isinstance(scheduler, PbtScheduler):
        problems |= _pbt_problems(tune, scheduler, spec)
    return problems


def _pbt_problems(tune: TuneSpec, pbt: PbtScheduler, spec: dict[str, Any]) -> dict[tuple, str]:
    problems: dict[tuple, str] = {}
    if tune.search != "random":
        problems[("tune", "search")] = "pbt explores by itself: use search: random"
    every = spec["train"]["checkpoint"]["every_epochs"]
    if pbt.perturbation_interval % every:
        problems[("tune", "scheduler", "perturbation_interval")] = (
            f"PBT copies checkpoints: make it a multiple of train.checkpoint.every_epochs ({every})"
        )
    mutable = [p for p, d in tune.search_space.items() if d.kind != "grid"]
    unknown = sorted(set(pbt.hyperparam_mutations or []) - set(mutable))
    if unknown:
        problems[("tune", "scheduler", "hyperparam_mutations")] = f"{unknown} are not non-grid search_space paths"
    elif not (pbt.hyperparam_mutations or mutable):
        problems[("tune", "scheduler", "hyperparam_mutations")] = "PBT needs at least one non-grid path to mutate"
    return problems
