"""What a person watches and reads of a sweep: a live trial table, the results table, and a plot of every trial."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from ray import tune  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.live import Live  # noqa: E402
from rich.table import Table  # noqa: E402

from steward.tune.space import TIME_ATTR  # noqa: E402


@dataclass
class TrialRow:
    """What one trial did: completed (ran to its end), pruned (stopped by the scheduler or budget), or error."""

    trial_id: str
    status: str
    config: dict[str, Any]
    iterations: int = 0
    metric: float | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None


class LiveTable(tune.Callback):
    """A rich table of trials (state, config, iteration, latest metric), kept current while the sweep runs.

    Tune calls back on every result (hundreds a second with short trials), but a person sees the table at most
    REFRESH_HZ times a second; so events only note the trials, and the table is built when rich redraws it, in
    rich's own thread rather than Tune's control loop.
    Tune pickles its callbacks with the experiment, so the console and live display are made lazily and never
    pickled: a resumed sweep draws a fresh table.
    """

    REFRESH_HZ = 4

    def __init__(self, metric: str, paths: list[str]):
        self.metric, self.paths = metric, paths
        self._live: Live | None = None
        self._trials: list = []

    def __getstate__(self) -> dict:
        return {"metric": self.metric, "paths": self.paths, "_live": None, "_trials": []}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._note(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._note(trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._note(trials)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._note(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._note(trials)
        self.stop()

    def stop(self) -> None:
        if self._live:
            self._live.stop()  # draws the table a last time
            self._live = None

    def _note(self, trials: list) -> None:
        self._trials = trials
        if self._live is None:
            self._live = Live(console=Console(), refresh_per_second=self.REFRESH_HZ, get_renderable=self.table)
            self._live.start()

    def table(self) -> Table:
        """The table of the trials last noted."""
        table = Table(title=f"Trials ({self.metric})")
        for column in ("trial", "state", *headers(self.paths), "epoch", self.metric):
            table.add_column(column, justify="left" if column in ("trial", "state") else "right")
        for trial in list(self._trials):  # a copy: Tune may add trials while rich draws
            last = trial.last_result or {}
            values = [_short(trial.config.get(p)) for p in self.paths]
            metric = last.get(self.metric)
            shown = "" if metric is None else f"{metric:.4f}"
            table.add_row(trial.trial_id, trial.status.lower(), *values, str(last.get(TIME_ATTR, "")), shown)
        return table


def results_table(rows: list[TrialRow], metric: str, paths: list[str], best: TrialRow | None) -> Table:
    table = Table(title=f"Sweep results ({metric}), best marked *")
    for column in ("trial", "status", *headers(paths), "epochs", metric):
        table.add_column(column, justify="left" if column in ("trial", "status") else "right")
    for r in rows:
        mark = "*" if best and r.trial_id == best.trial_id else ""
        metric_text = "" if r.metric is None else f"{r.metric:.4f}"
        values = [_short(r.config.get(p)) for p in paths]
        table.add_row(r.trial_id + mark, r.status, *values, str(r.iterations), metric_text)
    return table


def plot_trials(rows: list[TrialRow], metric: str, path: Path) -> None:
    """Metric vs epoch for every trial; a pruned trial's line ends in an x where the scheduler stopped it."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if not r.curve:
            continue
        xs, ys = zip(*r.curve, strict=True)
        style = {"linestyle": "--", "alpha": 0.7} if r.status == "pruned" else {"linewidth": 2}
        (line,) = ax.plot(xs, ys, label=f"{r.trial_id} ({r.status})", **style)
        if r.status == "pruned":
            ax.plot(xs[-1], ys[-1], marker="x", markersize=10, color=line.get_color())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (Tune iteration)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial; x = stopped early")
    ax.legend(fontsize="x-small", ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def headers(paths: list[str]) -> list[str]:
    """Column names for search paths: the last part (lr, dropout) unless two paths share it."""
    last = [p.rsplit(".", 1)[-1] for p in paths]
    return [short if last.count(short) == 1 else path for short, path in zip(last, paths, strict=True)]


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
