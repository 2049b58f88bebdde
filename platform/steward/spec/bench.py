"""The `bench` section: a matrix of spec variants, what to measure of each, and which cell the others are divided by."""

import itertools
import math
from typing import Any, Literal

from pydantic import Field, model_validator

from steward.spec.base import Section, raise_problems

Measure = Literal["train_throughput", "serve_latency", "serve_throughput"]
MAX_CELLS = 256


class LoadSpec(Section):
    concurrency: list[int] = Field(
        [1, 32], min_length=1, max_length=32, description="Concurrent clients; each level is measured on its own."
    )
    seconds: float = Field(5.0, gt=0.0, le=300.0, description="How long each concurrency level sends requests.")
    max_requests: int = Field(20_000, ge=10, le=1_000_000, description="Most requests sent at one level.")
    warmup_requests: int = Field(20, ge=0, le=10_000, description="Requests sent first and not counted.")
    instances: int = Field(1, ge=1, le=1024, description="Records in each request body.")

    @model_validator(mode="after")
    def _bounded(self) -> "LoadSpec":
        if any(c < 1 or c > 512 for c in self.concurrency):
            raise_problems(self, {"concurrency": "every level must be between 1 and 512 clients"})
        return self


class BenchSpec(Section):
    matrix: dict[str, list[Any]] = Field(
        min_length=1,
        max_length=16,
        description="Dotted spec paths to the values each takes, e.g. `distributed.zero_stage: [0, 1, 2, 3]`.",
    )
    cells: list[dict[str, Any]] | None = Field(
        None,
        min_length=1,
        max_length=MAX_CELLS,
        description="Run only these combinations of matrix values (default: the cross product).",
    )
    baseline: dict[str, Any] | None = Field(
        None, description="The cell every other is divided by, as its matrix values (default: the first cell)."
    )
    measure: list[Measure] = Field(["train_throughput"], min_length=1, description="What to record of each cell.")
    repeats: int = Field(3, ge=1, le=50, description="Runs of each cell, interleaved (A B A B, not A A B B).")
    warmup_steps: int = Field(3, ge=0, le=10_000, description="Optimizer steps run before timing starts.")
    steps: int = Field(20, ge=1, le=1_000_000, description="Optimizer steps timed after the warm-up.")
    load: LoadSpec = Field(default_factory=LoadSpec, description="The built-in load generator (serve_* measures).")
    matmul_size: int = Field(
        2048, ge=64, le=16_384, description="Side of the square fp32 GEMM that measures the machine's ceiling."
    )

    @model_validator(mode="after")
    def _cells_in_matrix(self) -> "BenchSpec":
        problems = {}
        if empty := [path for path, values in self.matrix.items() if not values]:
            problems["matrix"] = f"{', '.join(empty)}: give each path at least one value"
        if self.cells is not None:
            bad = [i for i, cell in enumerate(self.cells) if _not_in_matrix(cell, self.matrix)]
            if bad:
                problems["cells"] = f"cells {bad} are not combinations of the matrix values; give every path one"
        if self.baseline is not None and self.size <= MAX_CELLS and self.baseline not in self.combinations():
            problems["baseline"] = "is not one of the cells; give a value for every matrix path, as in `cells`"
        raise_problems(self, problems)
        return self

    @property
    def size(self) -> int:
        """How many cells the bench runs, counted without listing them (a cross product can be huge)."""
        return len(self.cells) if self.cells is not None else math.prod(len(v) for v in self.matrix.values())

    @property
    def training(self) -> bool:
        return "train_throughput" in self.measure

    @property
    def serving(self) -> bool:
        return any(m.startswith("serve_") for m in self.measure)

    def combinations(self) -> list[dict[str, Any]]:
        """The cells to run, each a mapping from matrix path to value, in matrix order."""
        if self.cells is not None:
            return [dict(cell) for cell in self.cells]
        paths = list(self.matrix)
        return [dict(zip(paths, values, strict=True)) for values in itertools.product(*self.matrix.values())]


def _not_in_matrix(cell: dict[str, Any], matrix: dict[str, list[Any]]) -> bool:
    return set(cell) != set(matrix) or any(value not in matrix[path] for path, value in cell.items())
