"""One training cell: run the spec variant on Ray Train with the step probe on; count the FLOPs of one step."""

import json
import re
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from steward.data import DataInfo, load_splits
from steward.errors import StewardError
from steward.models import build_model, count_parameters, task_loss
from steward.ray_env import check_resources
from steward.runs import create_run, read_history, set_status
from steward.spec import JobSpec
from steward.train.estimate import MB, FitReport, check_fit, ray_nodes, usable, zero_model_state_bytes
from steward.train.launch import TrainingError, build_trainer, error_chain, prepare, root_cause


class BenchError(StewardError):
    """A cell that cannot be measured as asked; says which setting to change."""


def step_cost(spec: JobSpec, info: DataInfo) -> dict:
    """FLOPs per training sample, counted by torch's FlopCounterMode over one forward + backward.

    For Transformers the 6·N·tokens rule (N: parameters outside embeddings, tokens: padded positions) is given
    alongside: the usual back-of-envelope figure the counted one can be checked against.
    """
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, info)
    batch = next(iter(load_splits(spec, info)["train"].batches(spec.data.batch_size, train=True)))
    with FlopCounterMode(display=False) as counter:
        logits = model(batch["inputs"], batch.get("attention_mask"))
        task_loss(spec.model.task, logits.float(), batch["labels"], None).backward()
    samples = len(batch["labels"])
    cost = {"parameters": count_parameters(model), "flops_per_sample": counter.get_total_flops() / samples}
    if spec.model.family == "transformer":
        embedded = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
        positions = batch["inputs"].shape[1]
        cost["flops_per_sample_6n"] = 6.0 * (cost["parameters"] - embedded) * positions
    return cost


def run_train_cell(spec: JobSpec, costs: dict[str, dict]) -> dict:
    """Train one cell until its probe has timed `bench.steps` steps; its throughput, memory and FLOP/s.

    A cell the memory estimate says cannot fit is refused and one that runs out of memory is reported as such:
    either way the bench goes on. `costs` keeps each model's step cost across cells: it is counted once.
    """
    run_dir = create_run(spec)
    info = prepare(spec, run_dir)
    check_resources(spec)
    key = cost_key(spec)
    if key not in costs:
        costs[key] = step_cost(spec, info)
    cost, bench = costs[key], spec.bench
    assert bench is not None
    fit = check_fit(spec, info, ray_nodes())
    estimated = {"parameters": cost["parameters"], **estimate_measures(fit)}
    if fit.problem:
        set_status(run_dir, "failed", error=fit.problem)
        return estimated | {"refused": fit.problem, "run_dir": str(run_dir)}
    launched = time.time()
    try:
        build_trainer(spec, run_dir, info, probe={"warmup": bench.warmup_steps, "steps": bench.steps}).fit()
    except Exception as err:
        set_status(run_dir, "failed", error=root_cause(err))
        if not ran_out_of_memory(err):
            raise TrainingError(root_cause(err)) from err
        return estimated | {"out_of_memory": root_cause(err), "run_dir": str(run_dir)}
    finally:
        # The bench keeps what it measured, not the weights: a large cell's checkpoint is many gigabytes.
        shutil.rmtree(run_dir / "train", ignore_errors=True)
    set_status(run_dir, "succeeded")
    return estimated | train_measures(spec, run_dir, cost, launched)


def cost_key(spec: JobSpec) -> str:
    """What a step's FLOPs depend on: the model and the data, not how the training is distributed."""
    return json.dumps(spec.model_dump(mode="json", include={"model", "data", "seed"}), sort_keys=True)


def estimate_measures(fit: FitReport) -> dict:
    """`steward estimate`'s figures for the cell, beside which its measured memory is put."""
    found = fit.estimate
    return {
        "estimate_mb": found.total / MB,
        "estimate_added_mb": (found.total - found.runtime) / MB,
        "estimate_states_mb": found.model_states / MB,
        "available_mb": min((usable(node) / count for node, count in fit.placed), default=0.0) / MB,
    }


# What a worker that ran out of memory leaves in the error: Ray's memory monitor killing it, the allocator refusing,
# or the kernel killing it (SIGKILL: exit code 137 or -9).
OUT_OF_MEMORY = re.compile(
    r"out ?of ?memory|running low on memory|memory monitor|can't allocate memory|cannot allocate memory|"
    r"MemoryError|SIGKILL|exit code (137|-9)\b",
    re.I,
)


def ran_out_of_memory(err: BaseException) -> bool:
    """Whether a failed fit failed because a worker ran out of memory."""
    return any(OUT_OF_MEMORY.search(f"{type(e).__name__}: {e}") for e in error_chain(err))


def train_measures(spec: JobSpec, run_dir: Path, cost: dict, launched: float) -> dict:
    """The probe's record, turned into the numbers a bench result holds."""
    probe = next((r for r in read_history(run_dir / "history.jsonl") if r["kind"] == "probe"), None)
    losses = [r["loss"] for r in read_history(run_dir / "history.jsonl") if r["kind"] == "step"]
    if probe is None or not probe["samples_per_s"]:
        raise BenchError(
            f"{spec.name}: no training step was timed after the warm-up; use more data or fewer "
            "bench.warmup_steps (every epoch's first step is not timed: it follows evaluation)"
        )
    dist = spec.distributed
    stage = dist.zero_stage if dist.strategy == "deepspeed" else 0
    formula = zero_model_state_bytes(cost["parameters"], stage, dist.num_workers, spec.train.precision) / 2**20
    measured = {
        "samples_per_s": probe["samples_per_s"],
        "tokens_per_s": probe["tokens_per_s"],
        "time_to_first_step_s": probe["first_step_at"] - launched,
        "timed_steps": probe["timed_steps"],
        "peak_memory_mb": max(probe["peak_memory_mb"]),
        "peak_memory_mb_per_worker": probe["peak_memory_mb"],
        "memory_added_mb": max(probe["memory_added_mb"]),
        "memory_formula_mb": formula,
        "flops_per_s": cost["flops_per_sample"] * probe["samples_per_s"],
    }
    if "flops_per_sample_6n" in cost:
        measured["flops_per_s_6n"] = cost["flops_per_sample_6n"] * probe["samples_per_s"]
    return measured | {"losses": losses, "run_dir": str(run_dir)}
