"""`steward bench jobs/bench-memory.yaml`: a cell that runs out of memory is reported as such and the bench goes on,
shown under a small cap (Ray's memory monitor threshold), never by filling the machine."""

import json

import pytest

from tests.conftest import JOBS
from tests.test_cli import steward

TINY_GPT = ["model.params.hidden_size=32", "model.params.num_layers=1", "model.params.num_heads=2",
            "data.options.num_samples=100"]  # fmt: skip


@pytest.mark.slow
def test_a_cell_that_runs_out_of_memory_is_reported_and_the_bench_goes_on(tmp_path, monkeypatch):
    # The embedded Ray of this `steward bench` (and only it) believes its node full at 1% of its memory, so its
    # memory monitor kills each cell's training as it starts, however small the model.
    monkeypatch.setenv("RAY_memory_usage_threshold", "0.01")
    out = tmp_path / "runs"
    done = steward("bench", str(JOBS / "bench-memory.yaml"), "--set", f"output_dir={out}", "--set", "bench.cells=null",
                   "--set", "bench.matrix={distributed.zero_stage: [0, 3]}", "--set", "bench.matmul_size=256",
                   *(x for o in TINY_GPT for x in ("--set", o)))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    [found] = out.glob("*/*/bench.json")
    result = json.loads(found.read_text())
    assert result["complete"] and [c["label"] for c in result["cells"]] == ["zero_stage=0", "zero_stage=3"]
    for cell in result["cells"]:
        [run] = cell["runs"]
        assert "memory" in run["out_of_memory"].lower() and "samples_per_s" not in run
        assert 0 < run["estimate_mb"] < run["available_mb"] and run["parameters"] > 0  # the estimate let it start
    md = (found.parent / "bench.md").read_text()
    assert "| zero_stage=3 (out of memory) | 1 |" in md and "- zero_stage=0: out of memory: " in md
