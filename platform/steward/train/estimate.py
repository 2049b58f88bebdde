"""Will it fit? Each worker's peak memory, estimated from the spec before anything starts, against what Ray reports.

A worker holds its model states (parameters, gradients, optimizer states: split over the ranks by the ZeRO stage),
its activations for one micro-batch, DeepSpeed's communication buckets and a runtime constant (the Ray worker
process with torch, DeepSpeed and the data loaded, plus the allocator's and gloo's own buffers, measured here:
benchmarks/README.md, "Memory"). The model is built on the meta device, so no weight is ever allocated.
"""

import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steward.data import DataInfo, prepare_data
from steward.errors import StewardError
from steward.models import build_model
from steward.ray_env import connect
from steward.spec import JobSpec
from steward.train.strategy import deepspeed_config, zero_init_builds

MB = 2**20
# Bytes per parameter of (parameters, gradients, Adam optimizer states) -- Rajbhandari et al. 2020, section 3:
# mixed precision keeps 2-byte params and grads plus K=12 bytes of fp32 master copy, momentum and variance.
BYTES = {"fp32": (4.0, 4.0, 8.0), "bf16": (2.0, 2.0, 12.0), "fp16": (2.0, 2.0, 12.0)}
# Measured here (bench-memory): a training worker's resident memory besides model states, buckets and
# activations -- the process with torch, Ray, DeepSpeed and the data (~520 MB), and what its first steps add.
RUNTIME_MB = 750.0
# ...and what ZeRO-3 adds to it (its parameter coordinator, hooks and prefetch state), measured the same way.
STAGE3_RUNTIME_MB = 450.0
# Ray's memory monitor kills workers above this share of a node's memory (RAY_memory_usage_threshold's default);
# Ray's own processes and the driver keep RESERVED bytes of what is left.
MONITOR_THRESHOLD = 0.95
RESERVED = 3 * 2**30
# DeepSpeed's stage-0 gradient all-reduce flattens the gradients in buffers of this many elements (engine.py).
STAGE0_ALLREDUCE_ELEMENTS = 500_000_000


class WontFit(StewardError):
    """The spec's workers need more memory than the cluster's nodes have; the message names a setting that fits."""


def zero_model_state_bytes(params: int, stage: int, workers: int, precision: str = "fp32") -> float:
    """The ZeRO paper's model states one rank holds under `stage` (0 = plain data parallel) with `workers` ranks."""
    p, g, o = (b * params for b in BYTES[precision])
    if stage >= 1:
        o /= workers
    if stage >= 2:
        g /= workers
    if stage >= 3:
        p /= workers
    return p + g + o


@dataclass(frozen=True)
class ModelSize:
    """What the memory of a model depends on: its parameters and one micro-batch's activations."""

    parameters: int  # distinct (tied weights once)
    trainable: int
    largest_layer: int  # parameters of the largest module's own weights (what ZeRO-3 gathers at once)
    activation_bytes: int  # what one micro-batch's forward keeps for the backward, in fp32


@dataclass(frozen=True)
class Estimate:
    """One worker's peak memory, in bytes, by part."""

    model_states: float
    buckets: float
    activations: float
    runtime: float
    formula: float  # the ZeRO paper's model states, for comparison

    @property
    def total(self) -> float:
        return self.model_states + self.buckets + self.activations + self.runtime


@dataclass(frozen=True)
class Node:
    """A Ray node as the fit check sees it: its address, CPUs and the memory Ray found free when it started."""

    address: str
    cpus: float
    memory: float  # bytes: Ray's `memory` plus `object_store_memory` (the store fills only as objects are put)


def model_size(spec: JobSpec, info: DataInfo) -> ModelSize:
    """Parameters and activations of the spec's model, built on the meta device (no weight is allocated)."""
    with torch.device("meta"):
        model = _meta_model(spec, info)
    seen = {id(p): p for p in model.parameters()}.values()
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    config = getattr(getattr(model, "hf", None), "config", None)
    return ModelSize(
        parameters=sum(p.numel() for p in seen),
        trainable=sum(p.numel() for p in seen if p.requires_grad),
        largest_layer=largest,
        activation_bytes=transformer_activations(config, spec.data.batch_size, int(info.input_shape[0]))
        if config is not None
        else 0,  # CNNs and LSTMs here are small: their activations are within the runtime constant
    )


def _meta_model(spec: JobSpec, info: DataInfo) -> nn.Module:
    """The spec's model with meta tensors for weights. A pretrained Transformer is rebuilt from its config (Hugging
    Face loads no weights onto the meta device): the same architecture, so the same parameters."""
    model, params = spec.model, spec.model.params
    if model.family != "transformer" or not getattr(params, "pretrained", None):
        return build_model(model, info)
    from steward.models.adapter import add_adapter
    from steward.models.transformer import HFTransformer, resolve_config

    with tempfile.TemporaryDirectory(prefix="steward-estimate-") as folder:
        resolve_config(params, model.task, info).save_pretrained(folder)  # type: ignore[arg-type]
        built = build_model(model, info, config_dir=folder)
    if model.adapter is None:
        return built
    return HFTransformer(add_adapter(built.hf, model.adapter, model.task))  # type: ignore[arg-type]


def transformer_activations(config: Any, batch: int, length: int) -> int:
    """Bytes (fp32) a Transformer keeps for its backward pass over one micro-batch.

    Each layer keeps about ten hidden-wide tensors (layer norms, q, k, v, attention output, residuals), two
    feed-forward-wide ones and the attention probabilities of every head; then the logits, their log-softmax and
    its gradient over the vocabulary.
    """
    hidden = int(config.hidden_size)
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    tokens = batch * length
    per_layer = 10 * tokens * hidden + 2 * tokens * int(ffn) + 2 * int(config.num_attention_heads) * batch * length**2
    logits = 3 * tokens * int(config.vocab_size)
    return 4 * (int(config.num_hidden_layers) * per_layer + logits + tokens * hidden)


def estimate(spec: JobSpec, size: ModelSize) -> Estimate:
    """One worker's peak memory for `spec` with a model of `size`, as DeepSpeed (or DDP) lays it out."""
    dist, precision = spec.distributed, spec.train.precision
    n, t, w = size.parameters, size.trainable, dist.num_workers
    adam = spec.train.optimizer.name == "adamw"
    if dist.strategy == "ddp":  # autocast keeps the weights fp32 whatever the precision
        states, buckets = 4.0 * n + 4.0 * t + (8.0 if adam else 4.0) * t, 2 * 25.0 * MB
    else:
        states, buckets = _deepspeed_states(spec, size), _deepspeed_buckets(spec, size)
    # The loss runs in fp32 whatever the precision, so half precision saves less than half.
    activations = size.activation_bytes * (1.0 if precision == "fp32" else 0.6)
    formula = zero_model_state_bytes(t, dist.zero_stage if dist.strategy == "deepspeed" else 0, w, precision)
    formula += BYTES[precision][0] * (n - t)  # frozen weights (under an adapter): parameters only
    stage3 = dist.strategy == "deepspeed" and dist.zero_stage == 3
    runtime = (RUNTIME_MB + (STAGE3_RUNTIME_MB if stage3 else 0.0)) * MB
    return Estimate(states, buckets, activations, runtime, formula)


def _deepspeed_states(spec: JobSpec, size: ModelSize) -> float:
    """Model states per rank as DeepSpeed 0.19 keeps them.

    Parameters and gradients in the training precision; from stage 1 an fp32 copy of this rank's partition of the
    trained weights (kept even when they are fp32 already) and its optimizer states; at stage 0 in half precision
    DeepSpeed's optimizer keeps the fp32 copy of everything and makes fp32 copies of the gradients at each step.
    What was measured beyond this (bench-memory) is in RUNTIME_MB and the fp32 weights a model was built with.
    """
    dist, precision = spec.distributed, spec.train.precision
    n, t, w, stage = size.parameters, size.trainable, dist.num_workers, dist.zero_stage
    pb = 4.0 if precision == "fp32" else 2.0
    moments = 8.0 if spec.train.optimizer.name == "adamw" else 4.0
    params = pb * n / (w if stage == 3 else 1)
    grads = pb * t / (w if stage >= 2 else 1)
    master = 4.0 * t / (w if stage >= 1 else 1) if (stage >= 1 or precision != "fp32") else 0.0
    # At stage 0 in half precision the optimizer's step copies the gradients to fp32.
    copies = 4.0 * t if stage == 0 and precision != "fp32" else 0.0
    # Models are built in fp32: DeepSpeed casts them to half precision, and the fp32 weights it frees stay in the
    # allocator's heap (a partitioned build leaves only this rank's partitions there), unless the worker compacts.
    residue = precision != "fp32" and not dist.compact_memory
    built = 4.0 * n / (w if zero_init_builds(spec) else 1) if residue else 0.0
    # ZeRO 1-3 step the optimizer on an fp32 copy of this rank's gradient partition; at stages 1-2 a worker that
    # does not compact makes it in the heap its build left (counted in `built`).
    copies += 4.0 * t / w if stage == 3 or (stage >= 1 and dist.compact_memory) else 0.0
    return params + grads + master + copies + built + moments * t / (w if stage >= 1 else 1)


def _deepspeed_buckets(spec: JobSpec, size: ModelSize) -> float:
    """DeepSpeed's communication buffers at their fullest, with this spec's bucket sizes (deepspeed_config)."""
    zero = deepspeed_config(spec)["zero_optimization"]
    pb = 4.0 if spec.train.precision == "fp32" else 2.0
    t, stage = size.trainable, spec.distributed.zero_stage
    if stage == 0:
        return pb * min(t, STAGE0_ALLREDUCE_ELEMENTS)
    reduce = pb * min(t, zero.get("reduce_bucket_size", 500_000_000))  # DeepSpeed's defaults where unset
    if stage < 3:
        return reduce
    # Gathered parameters: the layer running and those prefetched, at most max_live_parameters.
    prefetch = zero.get("stage3_prefetch_bucket_size", 50_000_000)
    live = min(size.parameters, zero.get("stage3_max_live_parameters", 1_000_000_000), prefetch)
    # A partitioned build leaves the partitions zero.Init made, freed when DeepSpeed flattens them, in the heap.
    residue = zero_init_builds(spec) and not spec.distributed.compact_memory
    flattened = pb * size.parameters / spec.distributed.num_workers if residue else 0.0
    return reduce + pb * (live + 2 * size.largest_layer) + flattened


def placement(spec: JobSpec, nodes: list[Node]) -> list[tuple[Node, int]]:
    """How many of the spec's workers each node takes, packed by CPUs as Ray Train places them."""
    left, placed = spec.distributed.num_workers, []
    for node in sorted(nodes, key=lambda n: -n.cpus):
        take = min(left, int(node.cpus // spec.distributed.cpus_per_worker))
        if take:
            placed.append((node, take))
            left -= take
    return placed


def usable(node: Node) -> float:
    """Bytes of `node` its training workers may fill: Ray's memory monitor kills workers once the node's memory is
    MONITOR_THRESHOLD full, and Ray's own processes (and the driver, on the head node) need RESERVED of the rest."""
    return max(0.0, node.memory * MONITOR_THRESHOLD - RESERVED)


def shortfall(spec: JobSpec, need: float, nodes: list[Node]) -> str | None:
    """Where `need` bytes a worker do not fit the nodes its workers land on, or None when every worker fits."""
    short = [
        f"node {node.address} has {usable(node) / 2**30:.1f} GiB for {count} worker(s) "
        f"({usable(node) / count / 2**30:.1f} GiB each)"
        for node, count in placement(spec, nodes)
        if need * count > usable(node)
    ]
    return "; ".join(short) or None


SHARDING: list[dict[str, Any]] = [
    {"zero_stage": 1},
    {"zero_stage": 2},
    {"zero_stage": 3},
    {"zero_stage": 3, "offload_optimizer": "cpu"},
    {"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"},
]
# Compacting workers step more slowly, so it is named only when no sharding or offload fits without it.
ALTERNATIVES = SHARDING + [{**change, "compact_memory": True} for change in SHARDING]


def alternative(spec: JobSpec, size: ModelSize, nodes: list[Node]) -> tuple[dict[str, Any], Estimate] | None:
    """The first ZeRO stage or offload setting (least sharding first) under which every worker fits."""
    dist = spec.distributed
    if dist.strategy != "deepspeed":
        return None
    for change in ALTERNATIVES:
        if change["zero_stage"] < dist.zero_stage or all(getattr(dist, k) == v for k, v in change.items()):
            continue
        changed = replace_distributed(spec, change)
        found = estimate(changed, size)
        if shortfall(changed, found.total, nodes) is None:
            return change, found
    return None


def replace_distributed(spec: JobSpec, change: dict[str, Any]) -> JobSpec:
    """`spec` with `change` applied to its distributed section (no validation needed: every change is valid)."""
    return spec.model_copy(update={"distributed": spec.distributed.model_copy(update=change)})


def refusal(spec: JobSpec, size: ModelSize, found: Estimate, nodes: list[Node]) -> str | None:
    """Why the spec's workers cannot fit `nodes`, naming the setting that would fit; None when they fit."""
    where = shortfall(spec, found.total, nodes)
    if where is None:
        return None
    dist = spec.distributed
    need = f"each of the {dist.num_workers} workers needs about {found.total / 2**30:.1f} GiB ({parts(found)})"
    better = alternative(spec, size, nodes)
    if better is not None:
        change, fits = better
        order = ("offload_params", "offload_optimizer", "zero_stage", "compact_memory")
        field = next(k for k in order if k in change and getattr(dist, k) != change[k])
        settings = ", ".join(f"distributed.{k}: {str(v).lower()}" for k, v in change.items())
        fix = f"set {settings} (about {fits.total / 2**30:.1f} GiB a worker), which fits"
        return f"distributed.{field}: {need}, but {where}; {fix}"
    what = "distributed.zero_stage" if dist.strategy == "deepspeed" else "distributed.strategy"
    return (
        f"{what}: {need}, but {where}; no ZeRO stage, offload or compact_memory fits: add nodes (ZeRO-3 splits the "
        "model states over every worker), or lower data.batch_size, data.max_length or the model's size"
    )


def parts(found: Estimate) -> str:
    return (
        f"model states {found.model_states / 2**30:.1f}, buckets {found.buckets / 2**30:.1f}, "
        f"activations {found.activations / 2**30:.1f}, runtime {found.runtime / 2**30:.1f} GiB"
    )


def ray_nodes() -> list[Node]:
    """The connected Ray cluster's live nodes with their CPUs and the memory Ray found free on each."""
    import ray

    return [
        Node(
            address=node["NodeManagerAddress"],
            cpus=float(node["Resources"].get("CPU", 0)),
            memory=float(node["Resources"].get("memory", 0) + node["Resources"].get("object_store_memory", 0)),
        )
        for node in ray.nodes()
        if node.get("Alive")
    ]


@dataclass(frozen=True)
class FitReport:
    """What `steward estimate` prints and `train` checks: the model, one worker's estimate, the nodes, the verdict."""

    size: ModelSize
    estimate: Estimate
    placed: list[tuple[Node, int]]
    problem: str | None


def check_fit(spec: JobSpec, info: DataInfo, nodes: list[Node]) -> FitReport:
    """The estimate for `spec` against `nodes`. GPU workers hold their model states in GPU memory, which Ray does not
    report: for them the estimate is shown but nothing is refused."""
    size = model_size(spec, info)
    found = estimate(spec, size)
    problem = None if spec.distributed.use_gpu else refusal(spec, size, found, nodes)
    return FitReport(size, found, placement(spec, nodes), problem)


def refuse_unfit(spec: JobSpec, info: DataInfo) -> None:
    """Raise WontFit when the spec's workers cannot fit the connected Ray cluster's nodes."""
    problem = check_fit(spec, info, ray_nodes()).problem
    if problem:
        raise WontFit(problem)


def estimate_job(spec: JobSpec, address: str | None) -> FitReport:
    """`steward estimate`: describe the data (a tokenizer is trained in a temporary folder), then check the fit
    against the Ray cluster at `address` (an embedded one when None)."""
    info = prepare_data(spec, None)
    try:
        connect(address, spec)
        return check_fit(spec, info, ray_nodes())
    finally:
        if info.tokenizer_dir:
            shutil.rmtree(info.tokenizer_dir, ignore_errors=True)
