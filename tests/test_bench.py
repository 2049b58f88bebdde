"""`steward bench`: the matrix spec, interleaving, compare on hand-made results, and real reduced benchmarks."""

import json

import pytest

from steward.bench.cells import matrix_cells, schedule
from steward.bench.machine import manifest, matmul_ceiling
from steward.bench.report import compare
from steward.spec import SpecError, load_job
from steward.train.estimate import zero_model_state_bytes
from tests.conftest import JOBS
from tests.test_cli import steward

TINY_BERT = ["model.params.hidden_size=32", "model.params.num_layers=1", "model.params.num_heads=2",
             "model.params.intermediate_size=64", "data.options.num_samples=300", "data.max_length=16",
             "data.tokenizer.vocab_size=300"]  # fmt: skip


def problems(job: str, *overrides: str) -> dict[str, str]:
    with pytest.raises(SpecError) as caught:
        load_job(JOBS / job, list(overrides))
    return {p.path: p.message for p in caught.value.problems}


def test_every_cell_of_the_matrix_in_matrix_order_with_readable_labels():
    spec = load_job(JOBS / "bench-serve.yaml")
    labels = [c.label for c in matrix_cells(spec)]
    assert labels == [
        "batching=off quantize=none",
        "batching=off quantize=int8",
        "batching={max_batch_size:16,batch_wait_timeout_ms:5} quantize=none",
        "batching={max_batch_size:16,batch_wait_timeout_ms:5} quantize=int8",
    ]
    listed = load_job(
        JOBS / "bench-zero.yaml", ["bench.cells=[{distributed.zero_stage: 3}, {distributed.zero_stage: 1}]"]
    )
    assert [c.values for c in matrix_cells(listed)] == [{"distributed.zero_stage": 3}, {"distributed.zero_stage": 1}]


def test_runs_are_interleaved_a_b_a_b():
    cells = matrix_cells(load_job(JOBS / "bench-zero.yaml"))
    order = [(repeat, cell.label) for repeat, cell in schedule(cells, 3)]
    assert order[:5] == [(0, "zero_stage=0"), (0, "zero_stage=1"), (0, "zero_stage=2"), (0, "zero_stage=3"),
                         (1, "zero_stage=0")]  # fmt: skip
    assert len(order) == 12 and all(order[i][1] != order[i + 1][1] for i in range(len(order) - 1))


def test_a_malformed_matrix_path_is_a_spec_error_naming_it():
    found = problems("bench-zero.yaml", "bench.matrix={distributed.zero_stag: [0, 1]}")
    assert "did you mean `zero_stage`?" in found["bench.matrix.distributed.zero_stag"]
    found = problems("bench-zero.yaml", "bench.matrix={name: [a, b]}")
    assert "name cannot be varied" in found["bench.matrix.name"]


def test_bad_values_cells_and_baselines_are_refused_before_anything_runs():
    found = problems("bench-zero.yaml", "bench.matrix={distributed.zero_stage: [0, 7]}")
    assert (
        "distributed.zero_stage" in found["bench.matrix.1"]
        and "{'distributed.zero_stage': 7}" in found["bench.matrix.1"]
    )
    found = problems("bench-zero.yaml", "bench.cells=[{distributed.zero_stage: 5}]")
    assert "not combinations of the matrix values" in found["bench.cells"]
    found = problems("bench-zero.yaml", "bench.baseline={distributed.zero_stage: 9}")
    assert "is not one of the cells" in found["bench.baseline"]
    found = problems("bench-zero.yaml", "bench.measure=[serve_latency]")
    assert "need a serve section" in found["bench.measure"]
    found = problems("bench-serve.yaml", "bench.load.concurrency=[0]")
    assert "between 1 and 512" in found["bench.load.concurrency"]


def test_the_cli_refuses_a_bad_matrix_with_exit_2_and_no_traceback(tmp_path):
    done = steward("bench", str(JOBS / "bench-zero.yaml"), "--set", "bench.matrix={distributed.zerostage: [0]}",
                   "--set", f"output_dir={tmp_path}")  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "bench.matrix.distributed.zerostage" in done.stderr and "zero_stage" in done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.iterdir())
    done = steward("bench", str(JOBS / "quickstart.yaml"))
    assert done.returncode == 2 and "no `bench` section" in done.stderr


def test_manifest_and_ceiling_describe_this_machine():
    spec = load_job(JOBS / "bench-zero.yaml")
    found = manifest(spec)
    assert found["cores"] >= 1 and found["ram_gib"] > 0 and found["torch"].startswith("2.13")
    assert found["ray"].startswith("2.60") and found["deepspeed"] and found["transformers"]
    assert len(found["spec_hash"]) == 16 and found["git_commit"] and len(found["git_commit"]) == 40
    ceiling = matmul_ceiling(256, repeats=2)
    assert 1e8 < ceiling["flops_per_s"] < 1e14 and ceiling["size"] == 256


def test_zero_formula_partitions_what_each_stage_says():
    params = 1_000_000
    assert zero_model_state_bytes(params, 0, 2) == 16 * params
    assert zero_model_state_bytes(params, 1, 2) == (4 + 4 + 4) * params
    assert zero_model_state_bytes(params, 2, 2) == (4 + 2 + 4) * params
    assert zero_model_state_bytes(params, 3, 4) == 4 * params
    assert zero_model_state_bytes(params, 0, 2, "bf16") == 16 * params
    assert zero_model_state_bytes(params, 1, 4, "bf16") == (2 + 2 + 3) * params


def hand_made(samples: list[list[float]], cpu: str = "AMD EPYC") -> dict:
    machine = {"cpu": cpu, "cores": 2, "gpu": None, "ram_gib": 23.5, "torch": "2.13.0", "ray": "2.60.0",
               "deepspeed": "0.19.8", "transformers": "5.23.0"}  # fmt: skip
    cells = [
        {"label": f"zero_stage={i}", "runs": [{"samples_per_s": s, "peak_memory_mb": 100.0 * (i + 1)} for s in runs]}
        for i, runs in enumerate(samples)
    ]
    return {"manifest": machine, "ceiling": {"flops_per_s": 1e11}, "baseline": "zero_stage=0", "cells": cells,
            "measure": ["train_throughput"]}  # fmt: skip


def test_compare_divides_b_medians_by_a_medians_and_warns_on_other_machines(tmp_path):
    a = hand_made([[100.0, 90.0, 110.0], [50.0, 60.0, 40.0]])
    b = hand_made([[200.0, 150.0, 300.0], [45.0, 45.0, 45.0]], cpu="Intel Xeon")
    rows, warnings = compare(a, b)
    got = {(r["cell"], r["metric"]): r["ratio"] for r in rows}
    assert got[("zero_stage=0", "samples_per_s")] == pytest.approx(2.0)  # medians 200 / 100
    assert got[("zero_stage=1", "samples_per_s")] == pytest.approx(0.9)  # 45 / 50
    assert got[("zero_stage=1", "peak_memory_mb")] == pytest.approx(1.0)
    assert warnings == ["cpu differs: AMD EPYC vs Intel Xeon"]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    done = steward("bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert done.returncode == 0, done.stderr
    assert "cpu differs: AMD EPYC vs Intel Xeon" in done.stderr and "2.000" in done.stdout and "0.900" in done.stdout
    (tmp_path / "bad.json").write_text("{")
    done = steward("bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "bad.json"))
    assert done.returncode == 2 and "not a readable bench.json" in done.stderr


def only_run(out) -> tuple:
    [found] = out.glob("*/*/bench.json")
    return found.parent, json.loads(found.read_text())


@pytest.mark.slow
def test_a_reduced_training_matrix_runs_end_to_end_and_records_every_field(tmp_path):
    # One repeat: a training run costs ~30 s here; repeats and their interleaving are run end to end by the serving
    # matrix below, where a repeat costs seconds (the same runner and summary).
    out = tmp_path / "runs"
    done = steward("bench", str(JOBS / "bench-zero.yaml"), "--set", f"output_dir={out}", "--set",
                   "bench.matrix={distributed.zero_stage: [0, 2]}", "--set", "bench.repeats=1", "--set",
                   "bench.steps=4", "--set", "bench.warmup_steps=1", "--set", "bench.matmul_size=512",
                   *(x for o in TINY_BERT for x in ("--set", o)))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir, result = only_run(out)
    assert result["complete"] and result["baseline"] == "zero_stage=0"
    assert [(o["cell"], o["repeat"]) for o in result["order"]] == [("zero_stage=0", 0), ("zero_stage=2", 0)]
    assert {"cpu", "cores", "gpu", "ram_gib", "torch", "ray", "deepspeed", "transformers", "spec_hash",
            "git_commit"} <= set(result["manifest"])  # fmt: skip
    assert result["ceiling"]["flops_per_s"] > 1e8
    for cell in result["cells"]:
        assert len(cell["runs"]) == 1
        for run in cell["runs"]:
            assert run["samples_per_s"] > 0 and run["tokens_per_s"] > 0 and run["timed_steps"] == 4
            assert run["time_to_first_step_s"] > 0 and len(run["peak_memory_mb_per_worker"]) == 2
            assert run["memory_added_mb"] > 0 and run["memory_formula_mb"] > 0
            assert run["flops_per_s"] > 0 and run["flops_per_s_6n"] > 0
            # torch's counted FLOPs and the 6·N·tokens rule agree to within attention's and the head's share
            assert 0.5 < run["flops_per_s"] / run["flops_per_s_6n"] < 3
        summary = cell["summary"]["samples_per_s"]
        assert summary["min"] <= summary["median"] <= summary["max"]
        assert 0 < cell["summary"]["ceiling_fraction"]["median"] < 1
    zero2 = result["cells"][1]
    assert zero2["ratios"]["samples_per_s"] == pytest.approx(
        zero2["summary"]["samples_per_s"]["median"] / result["cells"][0]["summary"]["samples_per_s"]["median"]
    )
    assert (
        zero2["summary"]["memory_formula_mb"]["median"] < result["cells"][0]["summary"]["memory_formula_mb"]["median"]
    )
    md = (run_dir / "bench.md").read_text()
    assert "| zero_stage=2 | 1 |" in md and "(1.00x)" in md and "Matmul ceiling" in md
    assert (run_dir / "throughput.png").stat().st_size > 1000 and (run_dir / "memory.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_reduced_serving_matrix_trains_once_and_loads_each_cell(tmp_path):
    out = tmp_path / "runs"
    done = steward("bench", str(JOBS / "bench-serve.yaml"), "--set", f"output_dir={out}", "--set",
                   "bench.matrix={serve.batching: [null, {max_batch_size: 8, batch_wait_timeout_ms: 5}]}",
                   "--set", "bench.baseline=null", "--set", "bench.repeats=2", "--set", "train.epochs=1",
                   "--set", "distributed.num_workers=1", "--set", "bench.load={concurrency: [1, 8], seconds: 1}",
                   "--set", "bench.matmul_size=256", *(x for o in TINY_BERT for x in ("--set", o)))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir, result = only_run(out)
    assert len(list((run_dir / "cells").glob("*/*/model"))) == 1  # one training run served by every cell
    off, batched = (cell["label"] for cell in result["cells"])
    assert [(o["cell"], o["repeat"]) for o in result["order"]] == [(off, 0), (batched, 0), (off, 1), (batched, 1)]
    for cell in result["cells"]:
        assert len(cell["runs"]) == 2
        qps = cell["summary"]["c8_qps"]
        assert qps["min"] <= qps["median"] <= qps["max"] and qps["n"] == 2
        for run in cell["runs"]:
            assert [level["concurrency"] for level in run["levels"]] == [1, 8]
            for level in run["levels"]:
                assert level["requests"] > 0 and level["qps"] > 0
                assert 0 < level["p50_ms"] <= level["p95_ms"] <= level["p99_ms"]
    assert result["cells"][1]["ratios"]["c8_qps"] == pytest.approx(
        result["cells"][1]["summary"]["c8_qps"]["median"] / result["cells"][0]["summary"]["c8_qps"]["median"]
    )
    md = (run_dir / "bench.md").read_text()
    assert "p99 ms c=8" in md and f"| {batched} | 2 |" in md
    assert (run_dir / "throughput.png").exists()
