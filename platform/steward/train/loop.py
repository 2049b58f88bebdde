"""The per-worker training loop: runs inside every Ray Train worker, driven only by the spec dict it is given."""

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from steward import storage
from steward.data import DataInfo, Split, load_splits
from steward.data.stream import stream_batches, train_stream
from steward.models import save_model, task_loss
from steward.runs import read_history
from steward.spec import JobSpec
from steward.train.checkpoint import checkpoint_dir, restore
from steward.train.heap import compact_memory
from steward.train.probe import StepProbe, peak_memory_mb
from steward.train.session import Session, train_session
from steward.train.strategy import build_engine, build_model_for

HISTORY = "history.jsonl"


def train_loop(config: dict, session: Session | None = None) -> None:
    """Train one worker's share: build data, model and engine from the spec (validated once, by the driver or the
    trial), then epochs until done.

    Ray Train calls it with the config alone (a Train worker's session); a one-worker Tune trial passes its own.
    """
    spec: JobSpec = config["spec"]
    run_dir, info = Path(config["run_dir"]), DataInfo.from_dict(config["data_info"])
    run_uri = config.get("run_uri")
    session = session or train_session()
    rank, world = session.rank, session.world
    if run_uri:
        fetch_run_files(run_uri, run_dir, info, rank)
    torch.set_num_threads(max(1, int(spec.distributed.cpus_per_worker)))
    # Ray runs this loop in a thread beside the actor's own; at CPython's default 5 ms GIL switch interval the two
    # trade the GIL so often that steps slow down; 100 ms lets the loop run as it does under torchrun.
    sys.setswitchinterval(0.1)
    torch.manual_seed(spec.seed)

    # the splits training reads (a streamed job's train rows come from `train` below, never from memory)
    splits = load_splits(spec, info, ["train", "validation"])
    if spec.train.include_validation:
        validation = splits.pop("validation")
        if not spec.data.streaming:  # a streamed train split has the validation rows staged into it
            splits["train"] = splits["train"].concat(validation)
    train = TrainData(spec, info, session, None if spec.data.streaming else splits.pop("train"))
    steps_per_epoch = max(1, train.num_batches(world) // spec.train.grad_accum_steps)
    total = min(spec.train.epochs * steps_per_epoch, spec.train.max_steps or math.inf)
    if spec.distributed.strategy == "deepspeed":
        import deepspeed  # noqa: F401  (its libraries are not model state: load them before the baseline)
    if spec.distributed.compact_memory:
        compact_memory()
    base_memory = peak_memory_mb()
    engine = build_engine(build_model_for(spec, info), spec, int(total), session.prepare_model)
    fresh: dict = {"epoch": 0, "best": None, "stale": 0}
    state = restore(engine, session.latest_checkpoint(), config.get("initial_checkpoint")) or fresh
    engine.apply_optimizer_settings(spec)  # a resume or a PBT exploit may come with a changed learning rate
    history = History(run_dir / HISTORY, run_uri) if rank == 0 else None
    asked = config.get("probe")  # `steward bench` cells
    probe = StepProbe(asked["warmup"], asked["steps"], base_memory) if asked else None
    if history:  # a fresh start, a --resume, a restart after a worker failure, or a copied trial (PBT)
        history.rewind(state["epoch"])
        history.write({"kind": "start", "epoch": state["epoch"], "workers": world, "from": state.get("source")})

    for epoch in range(state["epoch"], spec.train.epochs):
        # Dropout's randomness, like the data order, is a function of (seed, epoch, rank): a resumed epoch replays.
        torch.manual_seed(spec.seed + 7919 * (epoch + 1) + rank)
        started = time.perf_counter()
        train_loss, seen = run_epoch(engine, spec, train, (epoch, rank, world), history, probe)
        seconds = time.perf_counter() - started
        metrics = {"epoch": epoch + 1, "step": engine.global_step, "train_loss": train_loss, "lr": engine.lr}
        metrics |= {"samples_per_s": seen[0] / seconds, "epoch_seconds": seconds}
        if info.modality == "text":  # real (unpadded) tokens, all workers together
            metrics["tokens_per_s"] = seen[1] / seconds
        metrics |= {"memory_added_mb": _max_across_ranks(peak_memory_mb() - base_memory)}
        metrics |= {"peak_memory_mb": _max_across_ranks(peak_memory_mb())}
        if "validation" in splits:
            metrics |= evaluate_split(engine, spec, splits["validation"], rank, world, prefix="val_")
        state = {"epoch": epoch + 1, **early_stopping(spec, metrics, state)}
        done = (
            state["stop"] or epoch + 1 == spec.train.epochs or engine.global_step >= total or bool(probe and probe.done)
        )
        metrics["final"] = done  # a Tune trial stopped at its final epoch still finishes (exports its model)
        if history:
            history.write({"kind": "epoch", **metrics})
        if done or (epoch + 1) % spec.train.checkpoint.every_epochs == 0:
            with checkpoint_dir(engine, rank, world, state) as checkpoint:
                session.report(metrics, checkpoint=checkpoint)
        else:
            session.report(metrics)
        if done:
            break
    if probe:
        measured = probe.summary(world)
        if history:
            history.write({"kind": "probe", **measured})
        return  # a bench cell's model is never used: exporting it would gather a large one whole on every rank
    export_model(engine, spec, info, run_dir, rank)
    if run_uri and rank == 0:
        storage.upload(run_dir, run_uri, ["model"])


def fetch_run_files(run_uri: str, run_dir: Path, info: DataInfo, rank: int) -> None:
    """Cluster storage: bring what this worker reads from the run folder to its node (the driver may be elsewhere).

    Every rank needs the tokenizer; rank 0 continues the history an earlier attempt (on any node) published.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    if info.tokenizer_dir and not Path(info.tokenizer_dir).exists():
        # Ranks on one node race for the folder: each downloads its own copy and the first rename wins.
        partial = Path(f"{info.tokenizer_dir}.{rank}.partial")
        storage.download(run_uri, partial, ["tokenizer"])
        with contextlib.suppress(OSError):
            os.rename(partial / "tokenizer", info.tokenizer_dir)
        shutil.rmtree(partial, ignore_errors=True)
    if rank == 0:  # the published history is the latest whichever node wrote it (absent on a first start)
        storage.download(run_uri, run_dir, [HISTORY])


class TrainData:
    """A worker's training rows: its shard of an in-memory Split, or of the Ray Data stream (data.streaming)."""

    def __init__(self, spec: JobSpec, info: DataInfo, session: Session, split: Split | None):
        self.spec, self.info, self.session, self.split = spec, info, session, split
        # Reweighing (train.mitigation) gives rows their own weights; otherwise the plain mean.
        self.weighted = split is not None and split.sample_weight is not None

    def num_batches(self, world: int) -> int:
        """Batches each rank takes in an epoch (the same on every rank: the tail rows are dropped)."""
        bs = self.spec.data.batch_size
        if self.split is not None:
            return self.split.num_batches(bs, world_size=world, train=True)
        return -(-((self.info.stream_rows or 0) // world) // bs)

    def batches(self, epoch: int, rank: int, world: int) -> Iterator[dict[str, Tensor]]:
        """This rank's batches for one epoch, in an order seeded by (seed, epoch)."""
        spec = self.spec
        if self.split is not None:
            return self.split.batches(
                spec.data.batch_size,
                shuffle=spec.data.shuffle,
                seed=spec.seed,
                epoch=epoch,
                rank=rank,
                world_size=world,
                train=True,
            )
        # A Ray Train worker streams the shard the trainer dealt it; a one-worker Tune trial streams it all.
        shard = self.session.dataset_shard("train") or train_stream(spec, self.info).iterator()
        return stream_batches(shard, spec, epoch, rank)


def run_epoch(
    engine, spec: JobSpec, train: TrainData, at: tuple[int, int, int], history, probe: StepProbe | None = None
) -> tuple[float, tuple[float, float]]:
    """One pass over this worker's batches at (epoch, rank, world); returns the mean loss and the samples and
    tokens all workers saw."""
    engine.train()
    if probe:
        probe.pause()
    total, count, samples, tokens = 0.0, 0, 0, 0
    started, epoch = time.perf_counter(), at[0]
    batches = train.batches(*at)
    for batch in batches:
        logits = engine(batch["inputs"], batch.get("attention_mask"))
        weight = batch["weight"] if train.weighted else None
        loss = task_loss(spec.model.task, logits.float(), batch["labels"], weight)
        stepped = engine.backward_step(loss)
        total, count, samples = total + loss.item(), count + 1, samples + len(batch["labels"])
        mask = batch.get("attention_mask")
        tokens += int(mask.sum()) if mask is not None else 0
        if probe:
            probe.batch(batch, stepped)
        if stepped and engine.global_step % spec.train.log_every_steps == 0 and history:
            # not ray.train.report: a Train V2 report is a barrier on the controller's poll
            metrics = {"epoch": epoch + 1, "step": engine.global_step, "loss": loss.item(), "lr": engine.lr}
            if mask is not None:  # this worker's rate times the workers, who step together
                metrics["tokens_per_s"] = tokens * at[2] / (time.perf_counter() - started)
            history.write({"kind": "step", **metrics})
        if (spec.train.max_steps and engine.global_step >= spec.train.max_steps) or (probe and probe.done):
            break
    sums = _sum_across_ranks([total, count, samples, tokens])
    return sums[0] / max(sums[1], 1.0), (sums[2], sums[3])


@torch.no_grad()
def evaluate_split(engine, spec: JobSpec, split: Split, rank: int, world: int, prefix: str) -> dict[str, float]:
    """Loss and accuracy (or perplexity) over a whole split, each rank doing its shard, summed across ranks."""
    engine.train(False)
    engine.sync_buffers()
    sums = torch.zeros(3, dtype=torch.float64)  # loss x count, correct, count
    lm = spec.model.task == "causal_lm"
    for batch in split.batches(spec.data.batch_size, rank=rank, world_size=world):
        logits = engine(batch["inputs"], batch.get("attention_mask")).float()
        labels, weight = batch["labels"], batch["weight"]
        if lm:  # task_loss is a mean over counted tokens: weigh each batch by its token count
            count = ((labels[:, 1:] != -100).sum(dim=1) * weight).sum()
            correct = torch.tensor(0.0)
        else:
            count = weight.sum()
            correct = ((logits.argmax(-1) == labels) * weight).sum()
        loss = task_loss(spec.model.task, logits, labels, weight)
        sums += torch.stack([loss * count, correct, count]).double()
    if dist.is_initialized():
        dist.all_reduce(sums)
    mean_loss = float(sums[0] / sums[2])
    if lm:
        return {f"{prefix}loss": mean_loss, f"{prefix}perplexity": math.exp(min(mean_loss, 50.0))}
    return {f"{prefix}loss": mean_loss, f"{prefix}accuracy": float(sums[1] / sums[2])}


def early_stopping(spec: JobSpec, metrics: dict, state: dict) -> dict:
    """Track the best value of the watched metric; `stop` once it has not improved for `patience` epochs."""
    rule = spec.train.early_stopping
    if rule is None or rule.metric not in metrics:
        return {"best": state.get("best"), "stale": 0, "stop": False}
    value, best = metrics[rule.metric], state.get("best")
    better = best is None or (value < best - rule.min_delta if rule.mode == "min" else value > best + rule.min_delta)
    stale = 0 if better else state.get("stale", 0) + 1
    return {"best": value if better else best, "stale": stale, "stop": stale >= rule.patience}


def export_model(engine, spec: JobSpec, info: DataInfo, run_dir: Path, rank: int) -> None:
    """Write the consolidated fp32 model (and tokenizer) that later stages load without DeepSpeed."""
    engine.sync_buffers()
    state = engine.full_state_dict()  # a collective under ZeRO-3: every rank takes part
    if rank != 0:
        return
    staging, final = run_dir / "model.partial", run_dir / "model"
    shutil.rmtree(staging, ignore_errors=True)
    exported = info
    if info.tokenizer_dir:
        shutil.copytree(info.tokenizer_dir, staging / "tokenizer")
        exported = replace(info, tokenizer_dir="tokenizer")  # relative to the model folder, so it can move
    save_model(staging, engine.module, state, spec.model, exported)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)


def _max_across_ranks(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def _sum_across_ranks(values: list[float]) -> list[float]:
    sums = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(sums)
    return sums.tolist()


class History:
    """Rank 0's append-only metrics log (Train V2 keeps only checkpointed metrics, so we keep the history).

    With `uri` (cluster storage) the log is published there after every record but step records, so a restart
    on another node, and the driver, find it.
    """

    def __init__(self, path: Path, uri: str | None = None):
        self.path, self.uri = path, uri

    def rewind(self, epoch: int) -> None:
        """Drop what an interrupted attempt logged after the checkpoint being resumed (epoch `epoch`)."""
        kept = [r for r in read_history(self.path) if r["kind"] == "start" or r["epoch"] <= epoch]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps({"time": time.time(), **record}) + "\n")
        if self.uri and record["kind"] != "step":
            storage.upload(self.path.parent, self.uri, [self.path.name])
