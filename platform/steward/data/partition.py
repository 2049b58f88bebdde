"""Which columns to read and which rows go to train, validation and test."""

from dataclasses import dataclass

import numpy as np

from steward.data.errors import DataError
from steward.data.sources import BUILTIN_INPUTS, Source
from steward.data.table import Table
from steward.spec.job import JobSpec


@dataclass(frozen=True)
class Columns:
    """The columns a job reads: model input, label (None for causal language modelling) and groups."""

    input: str
    label: str | None
    groups: tuple[str, ...]

    def fields(self) -> list[tuple[str, str]]:
        """(spec field, column) for every column to read."""
        label = [("data.label_column", self.label)] if self.label is not None else []
        return [("data.input_column", self.input), *label, *(("data.group_columns", g) for g in self.groups)]


def resolve_columns(spec: JobSpec, source: Source) -> Columns:
    """The spec's columns, with the builtin sources' defaults filled in; file: and hf: must name the input."""
    data, builtin = spec.data, spec.data.scheme == "builtin"
    column = data.input_column or (BUILTIN_INPUTS[data.location] if builtin else None)
    if column is None:
        shown = ", ".join(source.columns(next(iter(source.parts))))
        raise DataError("data.input_column", f"required for file: and hf: sources; columns are {shown}")
    label = None if spec.model.task == "causal_lm" else data.label_column or ("label" if builtin else None)
    return Columns(column, label, tuple(data.group_columns))


def parts_used(source: Source, splits: dict[str, float | str]) -> dict[str, str]:
    """Role (train/validation/test) -> the source part it is read from; fractions all come from one part."""
    available = list(source.parts)
    if all(isinstance(v, str) for v in splits.values()):
        wanted = {role: str(name) for role, name in splits.items()}
        missing = [(role, name) for role, name in wanted.items() if name not in source.parts]
        DataError.raise_all(
            [
                (
                    f"data.splits.{role}",
                    f"{source.name} has no split {name!r}; available splits are {', '.join(available)}",
                )
                for role, name in missing
            ]
        )
        return wanted
    if "train" in source.parts or len(available) == 1:
        base = "train" if "train" in source.parts else available[0]
        return dict.fromkeys(splits, base)
    raise DataError(
        "data.splits",
        f"fractions are taken from a `train` split, but {source.name} has splits {', '.join(available)}; "
        f"name the splits instead, e.g. {{train: {available[0]}}}",
    )


def check_columns(source: Source, columns: Columns, parts: dict[str, str]) -> None:
    """Raise one DataError listing every missing column (input, label, groups) of every part read."""
    problems = []
    for part in dict.fromkeys(parts.values()):
        have = source.columns(part)
        where = source.name if len(source.parts) == 1 else f"the {part!r} split of {source.name}"
        for field, column in columns.fields():
            if column not in have:
                problems.append((field, f"{column!r} is not a column of {where}; columns are {', '.join(have)}"))
    DataError.raise_all(problems)


def split_rows(
    source: Source, columns: Columns, splits: dict[str, float | str], seed: int
) -> dict[str, tuple[str, np.ndarray | None]]:
    """Role -> (source part, its rows in order; None for the whole part). Fractions are seeded and stratified by
    label, reading only the label column; raises DataError for a missing column or an empty split."""
    parts = parts_used(source, splits)
    check_columns(source, columns, parts)
    if all(isinstance(v, str) for v in splits.values()):
        chosen: dict[str, tuple[str, np.ndarray | None]] = {role: (part, None) for role, part in parts.items()}
    else:
        base = parts["train"]
        labels = source.read(base, [columns.label])[columns.label] if columns.label else None
        strata = [str(v) for v in labels] if labels is not None else None
        rows = fraction_rows(source.num_rows(base), {r: float(f) for r, f in splits.items()}, seed, strata)
        chosen = {role: (base, picked) for role, picked in rows.items()}
    empty = [
        role for role, (part, rows) in chosen.items() if (source.num_rows(part) if rows is None else len(rows)) == 0
    ]
    DataError.raise_all(
        [
            (f"data.splits.{role}", f"the {role} split of {source.name} has no rows; give it a larger share")
            for role in empty
        ]
    )
    return chosen


def split_tables(
    source: Source, columns: Columns, splits: dict[str, float | str], seed: int, roles: list[str] | None = None
) -> dict[str, Table]:
    """Read the splits (all, or the given roles) as Tables of the job's columns; see `split_rows`."""
    names = [c for _, c in columns.fields()]
    chosen = split_rows(source, columns, splits, seed)
    return {
        role: source.read(part, names, rows) for role, (part, rows) in chosen.items() if roles is None or role in roles
    }


def fraction_rows(n: int, fractions: dict[str, float], seed: int, strata: list[str] | None) -> dict[str, np.ndarray]:
    """Seeded row indices per role: round(fraction * n) rows each, every stratum (label) cut in proportion.

    Rows are lined up stratum by stratum (shuffled within each) against a sequence of roles spread evenly
    over the n slots, so each stratum gets its share of every role to within one row and totals are exact.
    """
    rng = np.random.default_rng([seed, 3])
    counts = np.diff(np.round(np.cumsum([0.0, *fractions.values()]) * n).astype(int))
    spread = np.concatenate([(np.arange(c) + 0.5) / c for c in counts if c > 0] or [np.zeros(0)])
    roles = np.repeat(np.arange(len(counts)), counts)[np.argsort(spread, kind="stable")]
    keys = np.asarray(strata) if strata is not None else np.zeros(n, dtype=np.int64)
    order = np.concatenate([rng.permutation(np.flatnonzero(keys == v)) for v in np.unique(keys)] or [np.zeros(0, int)])
    # Shuffle each split once more so its rows are not ordered by label.
    return {role: rng.permutation(order[roles == i]).astype(np.int64) for i, role in enumerate(fractions)}
