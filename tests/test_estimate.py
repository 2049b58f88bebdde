"""Will it fit? The memory estimate: parameters counted on the meta device, DeepSpeed's layout per ZeRO stage, the
refusal naming a setting that fits; `steward train` refusing before any worker starts."""

import json
import resource

import pytest

from steward.bench.cells import cell_spec, matrix_cells
from steward.data import prepare_data
from steward.spec import load_job
from steward.train.estimate import (
    MB,
    ModelSize,
    Node,
    estimate,
    model_size,
    placement,
    refusal,
    replace_distributed,
    usable,
    zero_model_state_bytes,
)
from tests.conftest import JOBS
from tests.test_cli import steward

GIB = 2**30
BIG = ModelSize(parameters=737_000_000, trainable=737_000_000, largest_layer=9_400_000, activation_bytes=200 * MB)
# A 12 B-parameter GPT-2: more than any stage fits on one machine of this size.
HUGE = ["model.params.hidden_size=4096", "model.params.num_layers=60", "model.params.num_heads=32"]


def bench_spec(*overrides: str):
    return load_job(JOBS / "bench-memory.yaml", list(overrides))


@pytest.fixture(scope="module")
def info():
    return prepare_data(bench_spec(), None)


def test_parameters_are_counted_on_the_meta_device_without_allocating_weights(info):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sizes = {}
    for cell in matrix_cells(bench_spec()):
        spec = cell_spec(bench_spec(), cell, "unused", training=True)
        sizes[spec.model.params.hidden_size] = model_size(spec, info)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 300  # the 737 M model alone would take 2.8 GiB in fp32
    for hidden, layers in ((768, 14), (1024, 28), (1536, 26)):
        found = sizes[hidden]
        # GPT-2: 12·d² a block (attention 4d², feed-forward 8d²), plus the token and position tables
        blocks = 12 * hidden * hidden * layers
        assert blocks < found.parameters < blocks + (info.vocab_size + 64 + 13 * layers + 2) * hidden + 10
        assert found.trainable == found.parameters and found.activation_bytes > 0
    assert 0.95e8 < sizes[768].parameters < 1.05e8 and 7.2e8 < sizes[1536].parameters < 7.6e8


def test_each_zero_stage_keeps_what_deepspeed_keeps_per_rank():
    n, fp32 = BIG.parameters, bench_spec("train.precision=fp32")
    found = {stage: estimate(replace_distributed(fp32, {"zero_stage": stage}), BIG) for stage in (0, 1, 2, 3)}
    # fp32 Adam: params, grads and two moments on every rank at stage 0; from stage 1 DeepSpeed adds an fp32 copy of
    # the rank's partition, which it keeps even when the weights are fp32.
    assert found[0].model_states == 16 * n
    assert found[1].model_states == 4 * n + 4 * n + (4 + 8) * n / 2
    assert found[2].model_states == 4 * n + (4 + 4 + 8) * n / 2
    assert found[3].model_states == (4 + 4 + 4 + 8 + 4) * n / 2  # and the step's fp32 copy of the gradients
    totals = [found[stage].total for stage in (0, 1, 2, 3)]
    assert totals[0] > totals[1] > totals[2] and totals[3] < totals[0]
    # the ZeRO paper's formula is reported beside it, and agrees at stage 0
    assert found[0].formula == zero_model_state_bytes(n, 0, 2) and found[3].formula == 8 * n
    # bf16: the paper's 16 bytes a parameter from stage 1 on; at stage 0 the optimizer also copies the gradients to
    # fp32 at every step
    # (the model is built in fp32 and cast: partitioned under ZeRO-3, whole otherwise)
    bf16 = {stage: estimate(bench_spec(f"distributed.zero_stage={stage}"), BIG) for stage in (0, 3)}
    assert bf16[3].model_states == (2 + 2 + 4 + 8 + 4) * n / 2 + 4 * n / 2 and bf16[3].formula == 8 * n
    assert bf16[0].model_states == (2 + 2 + 4 + 8 + 4) * n + 4 * n
    # a compacting worker gives the built weights and zero.Init's partitions back (distributed.compact_memory)
    compact = {
        stage: estimate(bench_spec(f"distributed.zero_stage={stage}", "distributed.compact_memory=true"), BIG)
        for stage in (0, 3)
    }
    assert compact[3].model_states == bf16[3].model_states - 4 * n / 2
    assert compact[3].buckets == bf16[3].buckets - 2 * n / 2
    assert compact[0].model_states == bf16[0].model_states - 4 * n and compact[0].buckets == bf16[0].buckets


def test_a_spec_that_cannot_fit_is_refused_naming_the_stage_that_would():
    node = Node("10.0.0.1", cpus=2, memory=24 * GIB)
    spec = bench_spec("distributed.zero_stage=0", "train.precision=fp32")
    need = estimate(spec, BIG).total
    message = refusal(spec, BIG, estimate(spec, BIG), [node])
    assert message is not None
    assert message.startswith(f"distributed.zero_stage: each of the 2 workers needs about {need / GIB:.1f} GiB")
    assert f"node 10.0.0.1 has {usable(node) / GIB:.1f} GiB for 2 worker(s)" in message
    assert "set distributed.zero_stage: 2 (about" in message and "which fits" in message
    # what it names does fit, and the stage it skipped does not
    assert (
        refusal(
            replace_distributed(spec, {"zero_stage": 2}),
            BIG,
            estimate(replace_distributed(spec, {"zero_stage": 2}), BIG),
            [node],
        )
        is None
    )
    assert refusal(
        replace_distributed(spec, {"zero_stage": 1}),
        BIG,
        estimate(replace_distributed(spec, {"zero_stage": 1}), BIG),
        [node],
    )
    # nothing fits a small node: the message says so and what else to change
    small = Node("10.0.0.2", cpus=2, memory=8 * GIB)
    message = refusal(spec, BIG, estimate(spec, BIG), [small])
    assert message is not None and "no ZeRO stage, offload or compact_memory fits: add nodes" in message


def test_compacting_is_named_when_no_sharding_or_offload_fits_without_it():
    spec = bench_spec("distributed.zero_stage=3")
    compact = replace_distributed(spec, {"compact_memory": True})
    need, compact_need = estimate(spec, BIG).total, estimate(compact, BIG).total
    node = Node("10.0.0.1", cpus=2, memory=(2 * compact_need + 3 * GIB) / 0.95 + 0.1 * GIB)
    assert 2 * need > usable(node)  # neither stage 3 nor any offload fits as the heap pools what it frees
    message = refusal(spec, BIG, estimate(spec, BIG), [node])
    assert message is not None and message.startswith("distributed.compact_memory: each of the 2 workers")
    assert "set distributed.zero_stage: 3, distributed.compact_memory: true (about" in message
    assert refusal(compact, BIG, estimate(compact, BIG), [node]) is None


def test_workers_are_placed_by_cpus_and_each_node_is_checked_for_its_own():
    spec = bench_spec("distributed.num_workers=3", "distributed.zero_stage=3")
    nodes = [Node("a", cpus=1, memory=16 * GIB), Node("b", cpus=2, memory=16 * GIB)]
    assert [(node.address, count) for node, count in placement(spec, nodes)] == [("b", 2), ("a", 1)]
    need = estimate(spec, BIG).total
    # node b holds two workers and runs short first: the message names it and not a
    room = (need + 3 * GIB) / 0.95 + 0.1 * GIB  # one worker's estimate, Ray's own share and a little
    one_each = [Node("a", cpus=1, memory=room), Node("b", cpus=2, memory=room)]
    message = refusal(spec, BIG, estimate(spec, BIG), one_each)
    assert message is not None and "node b has" in message and "node a" not in message


@pytest.mark.slow
def test_train_refuses_a_spec_that_cannot_fit_with_exit_2_before_any_worker_starts(tmp_path):
    out = tmp_path / "runs"
    done = steward(
        "train", str(JOBS / "bench-memory.yaml"), "--set", f"output_dir={out}", *(x for o in HUGE for x in ("--set", o))
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "error: distributed.zero_stage: each of the 2 workers needs about" in done.stderr
    assert "no ZeRO stage, offload or compact_memory fits" in done.stderr and "Traceback" not in done.stderr
    [run_dir] = out.glob("bench-memory/*")
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "no ZeRO stage, offload or compact_memory fits" in status["error"]
    assert not (run_dir / "history.jsonl").exists() and not (run_dir / "train").exists()  # no worker ever ran
    done = steward("estimate", str(JOBS / "bench-memory.yaml"), "--set", "model.params.num_layers=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fits" in done.stdout and "ZeRO formula" in done.stdout and "runtime" in done.stdout
