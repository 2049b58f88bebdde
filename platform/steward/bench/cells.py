"""Matrix cells: the spec variants a benchmark runs, their labels, and the interleaved order they run in."""

import copy
from dataclasses import dataclass
from typing import Any

from steward.spec import JobSpec
from steward.spec.base import set_dotted

# A cell trains until its probe has timed `bench.steps` steps, however many epochs that takes; nothing that would
# stop it sooner or pause it mid-measurement (early stopping, mid-run checkpoints) stays on.
TRAIN_UNTIL_TIMED = {
    "train.epochs": 100_000,
    "train.max_steps": None,
    "train.early_stopping": None,
    "train.checkpoint.every_epochs": 100_000,
}


@dataclass(frozen=True)
class Cell:
    index: int
    label: str
    values: dict[str, Any]


def matrix_cells(spec: JobSpec) -> list[Cell]:
    """The spec's bench cells in matrix order, each labelled by the values that set it apart."""
    assert spec.bench is not None
    combos = spec.bench.combinations()
    names = _short_names(list(spec.bench.matrix))
    return [
        Cell(i, " ".join(f"{names[path]}={_shown(value)}" for path, value in combo.items()), combo)
        for i, combo in enumerate(combos)
    ]


def baseline_cell(spec: JobSpec, cells: list[Cell]) -> Cell:
    """The cell the others are divided by: bench.baseline, else the first."""
    assert spec.bench is not None
    return next((c for c in cells if c.values == spec.bench.baseline), cells[0])


def schedule(cells: list[Cell], repeats: int) -> list[tuple[int, Cell]]:
    """(repeat, cell) in the order to run them: every cell once, then every cell again (A B A B, not A A B B).

    Slow drift of a noisy machine (thermal, a neighbour's job) then hits every cell alike.
    """
    return [(repeat, cell) for repeat in range(repeats) for cell in cells]


def cell_spec(spec: JobSpec, cell: Cell, output_dir: str, training: bool) -> JobSpec:
    """The job one cell runs: the spec with the cell's values (and, to measure training, run until timed)."""
    raw = copy.deepcopy(spec.model_dump(mode="json", exclude={"tune"}))
    settings = cell.values | (TRAIN_UNTIL_TIMED if training else {})
    for path, value in settings.items():
        set_dotted(raw, path, value)
    raw |= {"name": f"cell{cell.index}", "output_dir": output_dir}
    return JobSpec.model_validate(raw)


def _short_names(paths: list[str]) -> dict[str, str]:
    """Each path's last part, or the whole path where two paths share a last part."""
    last = [p.rsplit(".", 1)[-1] for p in paths]
    return {p: (name if last.count(name) == 1 else p) for p, name in zip(paths, last, strict=True)}


def _shown(value: Any) -> str:
    if value is None:
        return "off"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_shown(v)}" for k, v in value.items()) + "}"
    return str(value)
