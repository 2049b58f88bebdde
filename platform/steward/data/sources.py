"""Sources: `builtin:`, `file:` and `hf:` data, loaded into named parts (a source's own splits) of tables."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steward.data.errors import DataError
from steward.data.synthetic import synthetic_options, synthetic_sequence, synthetic_text
from steward.data.table import Table, num_rows, take
from steward.spec.data import DataSpec

# Default input column per builtin source; every builtin source labels its rows in `label`.
BUILTIN_INPUTS = {"digits": "image", "synthetic-text": "text", "synthetic-sequence": "sequence"}
FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Source:
    """A loaded source: its parts by split name (one part, `train`, for a single table)."""

    name: str  # as the spec wrote it, for messages
    parts: dict[str, Any]  # split name -> Table, or a datasets.Dataset read lazily by `read`

    def columns(self, part: str) -> list[str]:
        """Column names of one part."""
        table = self.parts[part]
        return list(table) if isinstance(table, dict) else list(table.column_names)

    def num_rows(self, part: str) -> int:
        """Number of rows of one part."""
        table = self.parts[part]
        return num_rows(table) if isinstance(table, dict) else len(table)

    def read(self, part: str, columns: list[str], rows: np.ndarray | None = None) -> Table:
        """The given columns of one part as a Table: every row, or the given rows in that order."""
        table = self.parts[part]
        if isinstance(table, dict):
            picked = {c: table[c] for c in columns}
            return picked if rows is None else take(picked, rows)
        return self.arrow(part, columns, rows).to_dict()  # one Arrow -> Python conversion, not row by row

    def arrow(self, part: str, columns: list[str], rows: np.ndarray | None = None) -> Any:
        """The given columns (and rows) of a file: or hf: part as a datasets.Dataset, still on disk."""
        table = self.parts[part]
        picked = table.select_columns(columns)
        return picked if rows is None else picked.select(rows)


def load_source(data: DataSpec, seed: int) -> Source:
    """Load `data.source`; raise DataError naming data.source or data.options when it cannot be loaded."""
    if data.scheme == "builtin":
        return Source(data.source, {"train": _builtin(data.location, data.options, seed)})
    if data.scheme == "file":
        return Source(data.source, _file(data.location))
    return Source(data.source, _hub(data.location, data.options))


def _builtin(name: str, options: dict, seed: int) -> Table:
    if name == "digits":
        if options:
            raise DataError("data.options", f"builtin:digits takes no options; remove {', '.join(options)}")
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixels are counts 0..16 in the original data; [0, 1] keeps activations in a sane range.
        return {"image": (digits.images / 16.0).astype(np.float32), "label": digits.target.astype(np.int64)}
    merged = synthetic_options(name, options)
    if name == "synthetic-text":
        return synthetic_text(seed, **merged)
    return synthetic_sequence(seed, **merged)


def _file(location: str) -> dict[str, Any]:
    import datasets

    path = Path(location)
    if not path.exists():
        raise DataError(
            "data.source", f"file {location!r} does not exist; give the path of a csv, jsonl or parquet file"
        )
    if path.is_dir():
        return _parts(_from_disk(path, "data.source"))
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError("data.source", f"{path.name!r} is not a {', '.join(FORMATS)} file or a save_to_disk folder")
    try:
        return {"train": datasets.load_dataset(fmt, data_files=str(path), split="train")}
    except Exception as err:  # datasets raises many types for malformed files; all mean the same to a user
        raise DataError("data.source", f"could not read {location!r} as {fmt}: {err}") from err


def _from_disk(path: Path, field: str) -> Any:
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(field, f"{str(path)!r} is not a folder written by datasets' save_to_disk: {err}") from err


def _hub(location: str, options: dict) -> dict[str, Any]:
    import datasets

    name, _, config = location.partition(":")
    if Path(name).is_dir():
        return _parts(_from_disk(Path(name), "data.source"))
    try:
        loaded = datasets.load_dataset(name, config or None, **options)
    except Exception as err:  # offline, unknown name, bad option: all end the same way for the user
        raise DataError(
            "data.source",
            f"the dataset {location!r} could not be loaded from the Hugging Face Hub ({type(err).__name__}: {err}); "
            "for a local copy use `file:<path>` (csv, jsonl, parquet or a save_to_disk folder)",
        ) from err
    return _parts(loaded)


def _parts(loaded: Any) -> dict[str, Any]:
    """A DatasetDict keeps its split names; a single Dataset becomes the `train` part."""
    return dict(loaded) if hasattr(loaded, "keys") else {"train": loaded}
