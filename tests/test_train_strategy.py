"""Fast tier: the DeepSpeed config steward derives from a spec, checked by DeepSpeed's own config parser."""

import pytest

from steward.spec import load_job
from steward.train.strategy import deepspeed_config, validate_deepspeed
from tests.conftest import JOBS


def config(*overrides):
    spec = load_job(JOBS / "quickstart.yaml", list(overrides))
    validate_deepspeed(spec)  # DeepSpeed accepts it
    return deepspeed_config(spec)


def test_no_clipping_is_said_explicitly_since_deepspeed_defaults_to_clipping_at_one():
    assert config("train.grad_clip=null")["gradient_clipping"] == 0.0
    assert config("train.grad_clip=0.5")["gradient_clipping"] == 0.5


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_1_2_skip_the_gradient_norm_only_when_nothing_reads_it(stage):
    unclipped = config(f"distributed.zero_stage={stage}", "train.grad_clip=null")
    assert unclipped["zero_optimization"]["compute_grad_norm"] is False
    assert "compute_grad_norm" not in config(f"distributed.zero_stage={stage}")["zero_optimization"]  # clipping
    offload = config(f"distributed.zero_stage={stage}", "train.grad_clip=null", "distributed.offload_optimizer=cpu")
    assert "compute_grad_norm" not in offload["zero_optimization"]


def test_the_norm_stays_where_deepspeed_needs_it():
    assert "compute_grad_norm" not in config("distributed.zero_stage=3", "train.grad_clip=null")["zero_optimization"]
    bf16 = config("distributed.zero_stage=1", "train.grad_clip=null", "train.precision=bf16")
    assert "compute_grad_norm" not in bf16["zero_optimization"]


def test_deepspeed_op_builders_get_the_cpu_from_one_py_cpuinfo_subprocess_a_process(monkeypatch):
    import cpuinfo

    from steward.train.strategy import _ask_for_the_cpu_once

    asked = []
    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: asked.append(1) or {"arch": "X86_64", "flags": ["avx2"]})
    _ask_for_the_cpu_once()
    _ask_for_the_cpu_once()  # a second engine in the same process (a reused Tune trial) wraps nothing again
    assert cpuinfo.get_cpu_info() is cpuinfo.get_cpu_info() and asked == [1]


# Frees 100 blocks of 2 MiB each but the last (which keeps them below the heap's top), then prints how many MiB went
# back to the system.
FREED_BUT_HELD = """
import resource, sys, torch
from steward.train.heap import compact_memory
if sys.argv[1] == "compact":
    compact_memory()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
first = torch.ones(2**19)
del first  # a first mapped block freed: glibc raises its threshold to 2 MiB
blocks = [torch.ones(2**19) for _ in range(101)]
before = rss()
del blocks[:-1]
print((before - rss()) / 2**20)
"""


@pytest.mark.parametrize("mode", ["compact", "default"])
def test_a_compacting_worker_gives_back_the_blocks_it_frees(mode):
    """ZeRO's set-up and steps free blocks of 1-32 MiB (weights as built, partitions, gathered layers): by default
    glibc serves those from its heap, where the freed ones stay in the process; a compacting worker returns them."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FREED_BUT_HELD, mode], capture_output=True, text=True, check=True)
    returned_mib = float(out.stdout)
    if mode == "compact":
        assert returned_mib > 190
    else:
        assert returned_mib < 10  # what the compacting worker avoids, as measured in bench-memory
